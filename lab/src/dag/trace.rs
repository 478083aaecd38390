//! The run's trace (the scenario's `trace` option): the first flow's executions complete inside
//! an `execute` span whose W3C trace context the producer records with the completion; the tree
//! hands the event over inside its delivery span (a child of that span, linked to it); the
//! promoter resolves the children inside a `promote` span of the same trace. One trace from a
//! parent's completion to its children's promotion, exported to stdout (the example) or kept in
//! memory (the test).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// The target of the scenario's own spans.
pub const TARGET: &str = "ff_completions_lab::dag";

/// The target of the tree's delivery spans.
pub const DELIVERY_TARGET: &str = "ff_completions::delivery";

/// A layer exporting the scenario's spans and the tree's delivery spans (nothing else) through
/// `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let targets = Targets::new().with_target(TARGET, Level::INFO).with_target(DELIVERY_TARGET, Level::INFO);
    tracing_opentelemetry::layer().with_tracer(provider.tracer("ff-completions-dag")).with_filter(targets)
}

/// A provider that prints each span to stdout as it ends.
pub fn stdout_provider() -> SdkTracerProvider {
    SdkTracerProvider::builder().with_simple_exporter(opentelemetry_stdout::SpanExporter::default()).build()
}

/// A provider that keeps the spans in memory, and the exporter to read them from.
pub fn memory_provider() -> (SdkTracerProvider, InMemorySpanExporter) {
    let exporter = InMemorySpanExporter::default();
    (SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build(), exporter)
}

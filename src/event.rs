//! What subscribers receive: typed completion events, and the seed's `CompletionPayload` and
//! its stream.

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;

use futures::Stream;

use crate::cursor::StreamCursor;

use crate::trace_context::TraceParent;
use crate::types::{ExecutionId, FlowId, Namespace, TimestampMs};

/// The terminal state an execution reached.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum CompletionOutcome {
    /// Finished successfully.
    Success,
    /// Failed with no retries left.
    Failed,
    /// Cancelled by an operator or a flow cancellation.
    Cancelled,
    /// Its deadline passed.
    Expired,
    /// Never ran because a parent did not succeed.
    Skipped,
    /// An outcome this version does not know; the raw wire string is kept.
    Other(String),
}

impl CompletionOutcome {
    /// Maps a wire string; `failure` decodes as [`CompletionOutcome::Failed`]; unknown strings
    /// become [`CompletionOutcome::Other`], never an error.
    pub fn from_wire(s: &str) -> Self {
        match s {
            "success" => Self::Success,
            "failed" | "failure" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "expired" => Self::Expired,
            "skipped" => Self::Skipped,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The wire string producers write.
    pub fn as_wire(&self) -> &str {
        match self {
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::Skipped => "skipped",
            Self::Other(s) => s,
        }
    }

    /// The five outcomes producers write.
    pub const ALL: [CompletionOutcome; 5] =
        [Self::Success, Self::Failed, Self::Cancelled, Self::Expired, Self::Skipped];
}

impl fmt::Display for CompletionOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_wire())
    }
}

/// One completion, as a subscriber receives it. Built by [`CompletionEvent::new`] and the
/// `with_*` methods; fields may be added in later versions.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CompletionEvent {
    /// Where to resume from to receive the events after this one.
    pub cursor: StreamCursor,
    /// The execution that reached a terminal state.
    pub execution_id: ExecutionId,
    /// The flow it belongs to, if any.
    pub flow_id: Option<FlowId>,
    /// The terminal state.
    pub outcome: CompletionOutcome,
    /// The execution's namespace, if any.
    pub namespace: Option<Namespace>,
    /// The execution's tags.
    pub tags: BTreeMap<String, String>,
    /// When the producer committed it (backend clock).
    pub at: TimestampMs,
    /// The W3C trace context of the producer's span, when it recorded one (a `traceparent`
    /// column or stream field; a malformed value is dropped with a logged note).
    pub traceparent: Option<TraceParent>,
}

impl CompletionEvent {
    /// An event with no flow, namespace, tags or trace context.
    pub fn new(cursor: StreamCursor, execution_id: ExecutionId, outcome: CompletionOutcome, at: TimestampMs) -> Self {
        Self {
            cursor,
            execution_id,
            flow_id: None,
            outcome,
            namespace: None,
            tags: BTreeMap::new(),
            at,
            traceparent: None,
        }
    }

    /// Sets the producer's trace context.
    #[must_use]
    pub fn with_traceparent(mut self, traceparent: Option<TraceParent>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// An OpenTelemetry context whose parent is the producer's span (an empty context when the
    /// producer recorded none): `span.set_parent(event.trace_context())` continues the
    /// producer's trace in a consumer's span (`tracing_opentelemetry::OpenTelemetrySpanExt`).
    #[cfg(feature = "opentelemetry")]
    pub fn trace_context(&self) -> opentelemetry::Context {
        self.traceparent.map_or_else(opentelemetry::Context::new, |tp| tp.context())
    }

    /// Sets the flow.
    #[must_use]
    pub fn with_flow_id(mut self, flow_id: Option<FlowId>) -> Self {
        self.flow_id = flow_id;
        self
    }

    /// Sets the namespace.
    #[must_use]
    pub fn with_namespace(mut self, namespace: Option<Namespace>) -> Self {
        self.namespace = namespace;
        self
    }

    /// Sets the tags.
    #[must_use]
    pub fn with_tags(mut self, tags: BTreeMap<String, String>) -> Self {
        self.tags = tags;
        self
    }

    /// The seed's payload shape for this event.
    pub fn to_payload(&self) -> CompletionPayload {
        let mut payload = CompletionPayload::new(self.execution_id, self.outcome.as_wire(), None, self.at);
        payload.flow_id = self.flow_id;
        payload
    }
}

/// The seed's completion payload, yielded by [`crate::CompletionBackend`] streams.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct CompletionPayload {
    /// The execution that reached a terminal state.
    pub execution_id: ExecutionId,
    /// The outcome wire string.
    pub outcome: String,
    /// Result bytes, when a producer stores them (none of ours do yet).
    pub payload_bytes: Option<Vec<u8>>,
    /// When the producer committed it.
    pub produced_at_ms: TimestampMs,
    /// The flow, when known.
    pub flow_id: Option<FlowId>,
}

impl CompletionPayload {
    /// A payload without a flow.
    pub fn new(
        execution_id: ExecutionId,
        outcome: impl Into<String>,
        payload_bytes: Option<Vec<u8>>,
        produced_at_ms: TimestampMs,
    ) -> Self {
        Self { execution_id, outcome: outcome.into(), payload_bytes, produced_at_ms, flow_id: None }
    }

    /// Attaches a flow.
    #[must_use]
    pub fn with_flow_id(mut self, flow_id: FlowId) -> Self {
        self.flow_id = Some(flow_id);
        self
    }
}

/// The seed's untyped stream of payloads.
pub type CompletionStream = Pin<Box<dyn Stream<Item = CompletionPayload> + Send>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_and_failure_decodes_as_failed() {
        for outcome in CompletionOutcome::ALL {
            assert_eq!(CompletionOutcome::from_wire(outcome.as_wire()), outcome);
        }
        assert_eq!(CompletionOutcome::from_wire("failure"), CompletionOutcome::Failed);
        assert_eq!(CompletionOutcome::from_wire("timed_out"), CompletionOutcome::Other("timed_out".into()));
    }
}

#[cfg(all(test, feature = "serde"))]
mod serde_tests {
    use super::*;

    #[test]
    fn an_event_round_trips_through_json_with_its_cursor_as_hex() {
        let flow = FlowId::new();
        let event = CompletionEvent::new(
            StreamCursor::new(vec![0x03, 0x00, 0x2a]),
            ExecutionId::new_in(&flow),
            CompletionOutcome::Failed,
            TimestampMs(1_700_000_000_123),
        )
        .with_flow_id(Some(flow))
        .with_namespace(Some(Namespace::new("tenant-a")))
        .with_tags([("pool".to_owned(), "gpu".to_owned())].into_iter().collect());
        let json = serde_json::to_value(&event).unwrap_or_default();
        assert_eq!(json["cursor"], "03002a");
        assert_eq!(json["execution_id"], event.execution_id.to_string());
        let back: CompletionEvent = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, event);
        assert!(serde_json::from_str::<StreamCursor>("\"zz\"").is_err(), "a malformed cursor is refused");
    }
}

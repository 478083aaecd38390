//! The supervisor's maintenance jobs: per backend, a trim job (when retention is configured)
//! and a gauge job. Both are tasks the supervisor owns (aborted with it), never actors: they
//! read the backend on their own schedule and never touch the supervisor's mailbox.

use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

use tracing::Instrument;

use crate::actors::ids::BackendId;
use crate::backends::CompletionSource;
use crate::config::{MAX_INTERVAL, MIN_QUERY_INTERVAL, Retention};

/// Runs a backend's trim job every `retention.interval` until the supervisor goes away.
pub(super) fn spawn_trim_job(
    backend: BackendId,
    source: Arc<dyn CompletionSource>,
    retention: Retention,
) -> AbortOnDropHandle<()> {
    let span = tracing::info_span!("ff_trim", backend = %backend);
    AbortOnDropHandle::new(tokio::spawn(
        async move {
            // `Retention` fields are public: keep the interval where `tokio::time` accepts it.
            let every = retention.interval.clamp(MIN_QUERY_INTERVAL, MAX_INTERVAL);
            let mut interval = tokio::time::interval(every);
            let mut failing = false;
            loop {
                interval.tick().await;
                match source.trim(&retention).await {
                    Ok(removed) => {
                        if failing {
                            tracing::info!("trim works again");
                        }
                        failing = false;
                        if removed > 0 {
                            tracing::info!(removed, "trimmed completion history");
                        }
                    }
                    // Once per run of failures at warn; the repeats at debug.
                    Err(err) if !failing => {
                        failing = true;
                        tracing::warn!(error = %err, "trim failed; will retry");
                    }
                    Err(err) => tracing::debug!(error = %err, "trim failed again"),
                }
            }
        }
        .instrument(span),
    ))
}

/// Records a backend's health gauges every `every` until the supervisor goes away.
pub(super) fn spawn_gauge_job(
    backend: BackendId,
    source: Arc<dyn CompletionSource>,
    every: Duration,
) -> AbortOnDropHandle<()> {
    let span = tracing::info_span!("ff_gauges", backend = %backend);
    AbortOnDropHandle::new(tokio::spawn(
        async move {
            let mut interval = tokio::time::interval(every);
            loop {
                interval.tick().await;
                match source.gauges().await {
                    Ok(gauges) => gauges
                        .into_iter()
                        .for_each(|(name, v)| crate::metrics::backend_gauge(backend.as_str(), name, v)),
                    Err(err) => tracing::debug!(error = %err, "backend gauges unavailable"),
                }
            }
        }
        .instrument(span),
    ))
}

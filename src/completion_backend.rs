//! The seed's backend-agnostic subscription trait. There is deliberately no
//! `publish_completion`: producers write completions atomically beside the data.

use async_trait::async_trait;

use crate::cursor::StreamCursor;
use crate::error::EngineError;
use crate::event::CompletionStream;
use crate::instance_tags::InstanceTagSubscription;
use crate::lease_history::{LeaseHistoryFilter, LeaseHistorySubscription};
use crate::scanner_filter::ScannerFilter;
use crate::signal_delivery::{SignalDeliveryFilter, SignalDeliverySubscription};

fn not_provided(op: &'static str) -> EngineError {
    EngineError::unavailable(op, "this backend does not provide this event family")
}

/// Subscribe to completions. Object-safe: hold it as `Arc<dyn CompletionBackend>`.
/// Each call returns an independent stream; the supervisor handle implements it (on a tree with
/// one backend: with several, name one through [`crate::SubscribeRequest::on_backend`]).
///
/// ```no_run
/// use std::sync::Arc;
/// use futures::StreamExt;
/// use ff_completions::{CompletionBackend, CompletionSupervisorHandle};
///
/// # async fn demo(tree: CompletionSupervisorHandle) -> Result<(), ff_completions::EngineError> {
/// let backend: Arc<dyn CompletionBackend> = Arc::new(tree);
/// let mut completions = backend.subscribe_completions().await?;
/// while let Some(payload) = completions.next().await {
///     println!("{} reached {}", payload.execution_id, payload.outcome);
/// }
/// # Ok(()) }
/// ```
#[async_trait]
pub trait CompletionBackend: Send + Sync {
    /// Every completion from now on.
    ///
    /// # Errors
    /// The backend or the tree is unavailable.
    async fn subscribe_completions(&self) -> Result<CompletionStream, EngineError>;

    /// Completions matching `filter` from now on.
    ///
    /// # Errors
    /// The backend or the tree is unavailable.
    async fn subscribe_completions_filtered(&self, filter: &ScannerFilter) -> Result<CompletionStream, EngineError>;

    /// Lease-history events matching `filter`, after `from` (a lease-history cursor; empty:
    /// from now on). The default answers [`EngineError::Unavailable`].
    ///
    /// # Errors
    /// A cursor of another family ([`EngineError::Validation`]), an expired one, or the backend
    /// or the tree unavailable.
    async fn subscribe_lease_history(
        &self,
        from: StreamCursor,
        filter: &LeaseHistoryFilter,
    ) -> Result<LeaseHistorySubscription, EngineError> {
        let _ = (from, filter);
        Err(not_provided("subscribe lease history"))
    }

    /// Signal-delivery events matching `filter`, after `from` (a signal-delivery cursor;
    /// empty: from now on). The default answers [`EngineError::Unavailable`].
    ///
    /// # Errors
    /// As [`Self::subscribe_lease_history`].
    async fn subscribe_signal_delivery(
        &self,
        from: StreamCursor,
        filter: &SignalDeliveryFilter,
    ) -> Result<SignalDeliverySubscription, EngineError> {
        let _ = (from, filter);
        Err(not_provided("subscribe signal delivery"))
    }

    /// Instance-tag events: no backend produces them yet.
    ///
    /// # Errors
    /// [`EngineError::Unavailable`], always.
    async fn subscribe_instance_tags(&self, from: StreamCursor) -> Result<InstanceTagSubscription, EngineError> {
        let _ = from;
        Err(not_provided("subscribe instance tags"))
    }
}

#[allow(dead_code)]
fn _assert_dyn_compatible(backend: std::sync::Arc<dyn CompletionBackend>) -> std::sync::Arc<dyn CompletionBackend> {
    backend
}

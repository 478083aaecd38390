//! The seed's backend-agnostic subscription trait. There is deliberately no
//! `publish_completion`: producers write completions atomically beside the data.

use async_trait::async_trait;

use crate::error::EngineError;
use crate::event::CompletionStream;
use crate::scanner_filter::ScannerFilter;

/// Subscribe to completions. Object-safe: hold it as `Arc<dyn CompletionBackend>`.
/// Each call returns an independent stream of payloads until the tree shuts down (or the
/// subscription fails). The supervisor handle implements it, on a tree with one backend; the
/// typed, resumable, filtered way in is [`crate::CompletionSupervisorHandle::subscribe`].
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
}

#[allow(dead_code)]
fn _assert_dyn_compatible(backend: std::sync::Arc<dyn CompletionBackend>) -> std::sync::Arc<dyn CompletionBackend> {
    backend
}

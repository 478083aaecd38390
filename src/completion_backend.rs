//! The seed's backend-agnostic subscription trait. There is deliberately no
//! `publish_completion`: producers write completions atomically beside the data.

use async_trait::async_trait;

use crate::cursor::StreamCursor;
use crate::error::EngineError;
use crate::event::{CompletionPayload, CompletionStream};
use crate::scanner_filter::ScannerFilter;
use crate::types::ExecutionId;

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

    /// A cursor at or before every completion committed after this call returns: read it
    /// before submitting work, and [`Self::await_completion`] with it later.
    ///
    /// # Errors
    /// The backend or the tree is unavailable; a backend without awaits answers
    /// [`EngineError::Unavailable`] (the default).
    async fn completion_position(&self) -> Result<StreamCursor, EngineError> {
        Err(EngineError::Unavailable {
            op: "completion position",
            detail: "this completion backend does not await single executions".into(),
            source: None,
        })
    }

    /// The completion of `execution_id` after `after` (a cursor read before the work was
    /// submitted, as [`Self::completion_position`] gives), however early it landed.
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use ff_completions::{CompletionBackend, ExecutionId};
    ///
    /// # async fn demo(backend: Arc<dyn CompletionBackend>, id: ExecutionId) -> Result<(), ff_completions::EngineError> {
    /// let before = backend.completion_position().await?;
    /// // ... submit the work of `id` ...
    /// let payload = backend.await_completion(&id, &before).await?;
    /// println!("{} reached {}", payload.execution_id, payload.outcome);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The backend or the tree is unavailable, the cursor is malformed or expired; a backend
    /// without awaits answers [`EngineError::Unavailable`] (the default).
    async fn await_completion(
        &self,
        execution_id: &ExecutionId,
        after: &StreamCursor,
    ) -> Result<CompletionPayload, EngineError> {
        let _ = (execution_id, after);
        Err(EngineError::Unavailable {
            op: "await completion",
            detail: "this completion backend does not await single executions".into(),
            source: None,
        })
    }
}

#[allow(dead_code)]
fn _assert_dyn_compatible(backend: std::sync::Arc<dyn CompletionBackend>) -> std::sync::Arc<dyn CompletionBackend> {
    backend
}

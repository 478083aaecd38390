//! Wake-ups sent after the producer's commit, never inside it: a transaction that queued a
//! NOTIFY holds Postgres' global notify lock from pre-commit through its WAL flush, so notifying
//! commits cannot share a flush. [`CommitWake`] sends `ff_completions_wake()` from an autocommit
//! connection once the commit has returned, one at a time; wake-ups asked for while one is in
//! flight coalesce into the next.

use std::fmt;
use std::sync::Arc;

use sqlx::postgres::PgPool;
use tokio::sync::Notify;

use crate::actors::AbortOnDrop;

/// Coalesced after-commit wake-ups of the listeners on channel `ff_completion`.
#[derive(Clone)]
pub struct CommitWake {
    wanted: Arc<Notify>,
    _sender: Arc<AbortOnDrop>,
}

impl CommitWake {
    /// Starts the task that sends wake-ups through `pool`; it ends when the last clone is dropped.
    pub fn spawn(pool: PgPool) -> Self {
        let wanted = Arc::new(Notify::new());
        let waiting = wanted.clone();
        let sender = tokio::spawn(async move {
            loop {
                waiting.notified().await;
                // A lost wake-up only delays delivery until the listener's next poll.
                if let Err(e) = sqlx::query("SELECT ff_completions_wake()").execute(&pool).await {
                    tracing::debug!(error = %e, "after-commit wake-up failed; listeners poll anyway");
                }
            }
        });
        Self { wanted, _sender: Arc::new(AbortOnDrop(sender)) }
    }

    /// Asks for one wake-up after the commits made so far; never waits.
    pub fn wake(&self) {
        self.wanted.notify_one();
    }
}

impl fmt::Debug for CommitWake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CommitWake")
    }
}

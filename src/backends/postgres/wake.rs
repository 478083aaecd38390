//! Wake-ups sent after the producer's commit, never inside it: a transaction that queued a
//! NOTIFY holds Postgres' global notify lock from pre-commit through its WAL flush, so notifying
//! commits cannot share a flush. [`CommitWake`] sends `ff_completions_wake()` from an autocommit
//! connection once the commit has returned, one at a time and at most one per
//! [`MIN_WAKE_INTERVAL`]; wake-ups asked for meanwhile coalesce into the next.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::Notify;

use tokio_util::task::AbortOnDropHandle;

/// The least time between two wake-ups of one [`CommitWake`]. The first commit after a quiet
/// spell wakes the listener at once; while commits keep coming the listener is reading anyway
/// and polls every 2 ms after each read that found rows, so more NOTIFYs would only cost the
/// server (measured: one per millisecond took a fifth of the producers' commits/s on 2 cores).
pub const MIN_WAKE_INTERVAL: Duration = Duration::from_millis(10);

/// Coalesced after-commit wake-ups of the listeners on channel `ff_completion`.
#[derive(Clone)]
pub struct CommitWake {
    wanted: Arc<Notify>,
    _sender: Arc<AbortOnDropHandle<()>>,
}

impl CommitWake {
    /// Starts the task that sends wake-ups through `pool`; it ends when the last clone is dropped.
    pub fn spawn(pool: PgPool) -> Self {
        let wanted = Arc::new(Notify::new());
        let waiting = wanted.clone();
        let sender = tokio::spawn(async move {
            loop {
                waiting.notified().await;
                let sent = tokio::time::Instant::now();
                // A lost wake-up only delays delivery until the listener's next poll.
                if let Err(e) = sqlx::query("SELECT ff_completions_wake()").execute(&pool).await {
                    tracing::debug!(error = %e, "after-commit wake-up failed; listeners poll anyway");
                }
                tokio::time::sleep_until(sent + MIN_WAKE_INTERVAL).await;
            }
        });
        Self { wanted, _sender: Arc::new(AbortOnDropHandle::new(sender)) }
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

//! An in-memory backend for the actors' own tests: no server, milliseconds per test. Behind the
//! same seam as the real backends ([`CompletionSource`], [`Waker`]), with faults to inject: a
//! dropped connection, rows held back by an open transaction, an expired (trimmed) cursor, a
//! slow read, a backend that is down.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::seam::{Batch, CompletionSource, Positioned, ReadPosition, StartAt, Wake, Waker};
use crate::config::Retention;
use crate::cursor::{Frontier, Position, StreamCursor, decode_sqlite_cursor, encode_sqlite_cursor};
use crate::error::Error;
use crate::event::{CompletionEvent, CompletionOutcome};
use crate::family::Family;
use crate::types::{ExecutionId, FlowId, TimestampMs};

#[derive(Default)]
struct Inner {
    /// Committed events; the event at index `i` is at position `(0, i + 1)`.
    events: Vec<Positioned>,
    /// The newest this many events are held back: committed, not readable yet.
    held_back: usize,
    /// Events at or below this position were trimmed.
    trimmed_to: Position,
    /// The next this many calls fail as a dropped connection.
    failing_calls: u32,
    /// Every call fails as a refused connection.
    down: bool,
    /// Every read fails as on a missing table (not transient).
    broken_reads: bool,
    /// Each read waits this long first.
    read_delay: Duration,
    /// Reads made.
    reads: u64,
    /// It produces completions only (as a backend without the other families).
    completions_only: bool,
    /// What `resolve_start` says of where the listener's path begins (see `StartAt`).
    read_alone_until: Option<Position>,
    wakers: Vec<mpsc::UnboundedSender<Result<Wake, Error>>>,
}

/// The in-memory backend. Cursors use the SQLite family's encoding.
#[derive(Default)]
pub(crate) struct MemorySource {
    inner: Mutex<Inner>,
}

fn lost(op: &'static str) -> Error {
    Error::transport(op, "connection reset by the test")
}

impl MemorySource {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This backend behind the seam the supervisor uses (connecting always works; calls fail
    /// while it is down).
    pub(crate) fn lazy(self: &Arc<Self>) -> super::lazy::LazySource {
        let me = self.clone();
        super::lazy::LazySource::new(
            "memory",
            Box::new(move || {
                let source: Arc<dyn CompletionSource> = me.clone();
                Box::pin(async move { Ok(super::lazy::Connected { source, groups: None }) })
            }),
        )
    }

    /// Commits `n` completions and wakes every waker; returns their executions.
    pub(crate) fn commit(&self, n: usize) -> Vec<ExecutionId> {
        let mut inner = self.inner();
        let flow = FlowId::new();
        let ids: Vec<ExecutionId> = (0..n).map(|_| ExecutionId::new_in(&flow)).collect();
        for id in &ids {
            let pos = Position::new(0, inner.events.len() as u64 + 1);
            let event = CompletionEvent::new(
                encode_sqlite_cursor(pos.lo as i64),
                *id,
                CompletionOutcome::Success,
                TimestampMs::now(),
            );
            inner.events.push(Positioned { pos, event: event.into() });
        }
        inner.wakers.retain(|w| w.send(Ok(Wake::Notified)).is_ok());
        ids
    }

    /// Makes it a backend that produces completions only.
    pub(crate) fn set_completions_only(&self, only: bool) {
        self.inner().completions_only = only;
    }

    /// Commits `n` lease acquisitions by `worker` (lease-history events, their cursors tagged)
    /// and wakes every waker; returns their executions.
    pub(crate) fn commit_leases(&self, n: usize, worker: &str) -> Vec<ExecutionId> {
        use crate::lease_history::{LeaseEntry, LeaseHistoryEvent};
        let mut inner = self.inner();
        let flow = FlowId::new();
        let ids: Vec<ExecutionId> = (0..n).map(|_| ExecutionId::new_in(&flow)).collect();
        for id in &ids {
            let pos = Position::new(0, inner.events.len() as u64 + 1);
            let event = LeaseHistoryEvent::Acquired {
                cursor: Family::LeaseHistory.tag_cursor(encode_sqlite_cursor(pos.lo as i64)),
                execution_id: *id,
                lease_id: None,
                worker_instance_id: Some(worker.into()),
                at: TimestampMs::now(),
            };
            let entry = LeaseEntry { event, namespace: None, worker: Some(worker.into()) };
            inner.events.push(Positioned { pos, event: super::seam::FamilyEvent::LeaseHistory(entry) });
        }
        inner.wakers.retain(|w| w.send(Ok(Wake::Notified)).is_ok());
        ids
    }

    /// The position of the `n`-th event committed (1-based).
    pub(crate) fn position(n: u64) -> Position {
        Position::new(0, n)
    }

    /// Holds back the newest `n` events (as an open transaction would), or releases them (0).
    pub(crate) fn hold_back(&self, n: usize) {
        self.inner().held_back = n;
    }

    /// Trims every event up to the `n`-th.
    pub(crate) fn trim_to(&self, n: u64) {
        self.inner().trimmed_to = Self::position(n);
    }

    /// Fails the next `n` calls as a dropped connection.
    pub(crate) fn fail_next_calls(&self, n: u32) {
        self.inner().failing_calls = n;
    }

    /// Makes every call fail as a refused connection, or work again.
    pub(crate) fn set_down(&self, down: bool) {
        self.inner().down = down;
    }

    /// Makes every read fail as on a missing table (a schema problem, not transient).
    pub(crate) fn break_reads(&self) {
        self.inner().broken_reads = true;
    }

    /// Makes every read wait `delay` first.
    /// Subscriptions start off the listener's path until their reads reach `until`.
    pub(crate) fn set_read_alone_until(&self, until: Option<Position>) {
        self.inner().read_alone_until = until;
    }

    pub(crate) fn set_read_delay(&self, delay: Duration) {
        self.inner().read_delay = delay;
    }

    /// Drops every open notification connection: each waker fails.
    pub(crate) fn drop_connections(&self) {
        for w in self.inner().wakers.drain(..) {
            let _ = w.send(Err(lost("wait for a notification")));
        }
    }

    /// Reads made so far.
    pub(crate) fn reads(&self) -> u64 {
        self.inner().reads
    }

    /// Fails the call if the backend is down or a failure is pending.
    fn check(inner: &mut Inner, op: &'static str) -> Result<(), Error> {
        if inner.down {
            return Err(Error::unavailable(op, "connection refused by the test"));
        }
        if inner.failing_calls > 0 {
            inner.failing_calls -= 1;
            return Err(lost(op));
        }
        Ok(())
    }

    fn readable(inner: &Inner) -> &[Positioned] {
        &inner.events[..inner.events.len() - inner.held_back.min(inner.events.len())]
    }
}

#[async_trait]
impl CompletionSource for MemorySource {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn cursor_of(&self, at: &Frontier) -> StreamCursor {
        encode_sqlite_cursor(at.single().lo as i64)
    }

    fn produces(&self, family: Family) -> bool {
        family == Family::Completion || !self.inner().completions_only
    }

    async fn resolve_start(&self, cursor: &StreamCursor) -> Result<StartAt, Error> {
        let mut inner = self.inner();
        Self::check(&mut inner, "resolve a cursor")?;
        let after = decode_sqlite_cursor(cursor)?.map_or(Position::ZERO, |id| Self::position(id as u64));
        if after < inner.trimmed_to {
            return Err(Error::CursorExpired { oldest: Some(self.cursor_of(&Frontier::at(inner.trimmed_to))) });
        }
        Ok(StartAt {
            read_alone_until: inner.read_alone_until.map(Frontier::at),
            ..StartAt::after(Frontier::at(after))
        })
    }

    async fn tail(&self) -> Result<Frontier, Error> {
        let mut inner = self.inner();
        Self::check(&mut inner, "read the tail")?;
        Ok(Frontier::at(Self::readable(&inner).last().map_or(Position::ZERO, |e| e.pos)))
    }

    async fn read_after(&self, after: &Frontier, limit: usize) -> Result<Batch, Error> {
        let after = after.single();
        let delay = self.inner().read_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut inner = self.inner();
        inner.reads += 1;
        Self::check(&mut inner, "read completions")?;
        if inner.broken_reads {
            return Err(Error::schema("read completions", "no outbox table"));
        }
        if after < inner.trimmed_to {
            let at = Frontier::at(after);
            return Ok(Batch {
                start: at.clone(),
                end: at,
                expired: Some(Frontier::at(inner.trimmed_to)),
                ..Batch::default()
            });
        }
        let held_back = inner.held_back > 0;
        let events: Vec<Positioned> =
            Self::readable(&inner).iter().filter(|e| e.pos > after).take(limit).cloned().collect();
        let end = events.last().map_or(after, |e| e.pos);
        Ok(Batch {
            start: Frontier::at(after),
            end: Frontier::at(end),
            full: events.len() == limit,
            held_back,
            events,
            ..Batch::default()
        })
    }

    async fn trim(&self, _retention: &Retention) -> Result<u64, Error> {
        Ok(0)
    }

    async fn open_waker(&self, _read: ReadPosition) -> Result<Box<dyn Waker>, Error> {
        let mut inner = self.inner();
        Self::check(&mut inner, "open the notification connection")?;
        let (tx, rx) = mpsc::unbounded_channel();
        inner.wakers.push(tx);
        Ok(Box::new(MemoryWaker(rx)))
    }
}

/// A notification connection of the in-memory backend.
struct MemoryWaker(mpsc::UnboundedReceiver<Result<Wake, Error>>);

#[async_trait]
impl Waker for MemoryWaker {
    async fn wait(&mut self) -> Result<Wake, Error> {
        self.0.recv().await.unwrap_or_else(|| Err(lost("wait for a notification")))
    }
}

impl MemorySource {
    /// The events a listener would fan out after reading events `after + 1 ..= upto`.
    pub(crate) fn events_between(&self, after: u64, upto: u64) -> Vec<Positioned> {
        self.inner().events.iter().filter(|e| e.pos.lo > after && e.pos.lo <= upto).cloned().collect()
    }
}

//! The seam between the actor tree and the backends: what a listener or filter needs from a
//! backend ([`CompletionSource`]: read a batch after a position, find the tail, open a waker)
//! and from its notification connection ([`Waker`]: wait for the next reason to read), and
//! the events and batches that cross it. No type here names a database.

use async_trait::async_trait;

use crate::config::Retention;
use crate::cursor::{Frontier, Position, StreamCursor};
use crate::error::Error;
use crate::event::CompletionEvent;
use crate::family::Family;
use crate::lease_history::LeaseEntry;
use crate::signal_delivery::SignalEntry;
use crate::types::TimestampMs;

/// An event of any family, as a source decodes it and the listener fans it out. The families
/// share the backend's order (one lane space, one listener); each filter selects its own.
#[derive(Clone, Debug, PartialEq, Eq)]
// Every backend's reader decodes the other families.
#[cfg_attr(not(any(test, feature = "sqlite", feature = "postgres", feature = "valkey")), allow(dead_code))]
pub enum FamilyEvent {
    /// A completion (its cursor in the completion form).
    Completion(CompletionEvent),
    /// A lease change (its cursor tagged lease history).
    LeaseHistory(LeaseEntry),
    /// A signal delivery (its cursor tagged signal delivery).
    SignalDelivery(SignalEntry),
}

impl FamilyEvent {
    /// When the producer committed it.
    pub(crate) fn at(&self) -> TimestampMs {
        match self {
            Self::Completion(e) => e.at,
            Self::LeaseHistory(e) => e.event.at(),
            Self::SignalDelivery(e) => e.event.at,
        }
    }

    /// The completion, if it is one.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn completion(&self) -> Option<&CompletionEvent> {
        match self {
            Self::Completion(e) => Some(e),
            _ => None,
        }
    }
}

impl From<CompletionEvent> for FamilyEvent {
    fn from(event: CompletionEvent) -> Self {
        Self::Completion(event)
    }
}

/// An event with its position in the backend's order.
#[derive(Clone, Debug)]
pub(crate) struct Positioned {
    pub pos: Position,
    pub event: FamilyEvent,
}

/// One read: the events after `start`, in order within each lane, up to `end`: every event
/// above `start` and covered by `end` is in it (or in `skipped`).
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// The exclusive lower bound the read started from.
    pub start: Frontier,
    /// In each lane, the position of the last row read, bad rows included; `start` where
    /// nothing was read.
    pub end: Frontier,
    /// Decoded events, ascending within each lane.
    pub events: Vec<Positioned>,
    /// Rows that could not be decoded, skipped: their position and why.
    pub skipped: Vec<(Position, String)>,
    /// The read hit its limit: more rows may be waiting.
    pub full: bool,
    /// Rows exist above `end` that cannot be read yet: read again soon even without a wake-up.
    /// No backend sets it today (Postgres batches between snapshots wait for no transaction);
    /// the listener keeps honouring it for backends whose order must wait.
    pub held_back: bool,
    /// Events after `start` were trimmed away up to these positions (the lanes that lost
    /// some): a reader at `start` has lost them (the batch is otherwise empty).
    pub expired: Option<Frontier>,
    /// The history `start` was read in is not the backend's any more (Postgres: its tick is
    /// missing or another one, after a restore or a lossy failover): no position of it can be
    /// read exactly. The backend's history goes on from this frontier; the text says what was
    /// found (the batch is otherwise empty).
    pub lost: Option<(Frontier, String)>,
}

/// Where a subscription starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StartAt {
    /// Deliver events strictly after this frontier.
    pub after: Frontier,
    /// Also drop events of the first batch read (`after.major`) whose `lo` half is at or below
    /// this (resuming the original `event_id`-only Postgres cursor).
    pub lo_floor: Option<u64>,
    /// Until the subscriber's own reads reach this position, no live batch continues from it:
    /// `after` is not on the listener's path (a Postgres cursor of an earlier form resumes by
    /// reading a whole snapshot, whose positions say nothing of which live rows it has seen).
    pub read_alone_until: Option<Frontier>,
}

impl StartAt {
    pub(crate) const fn after(after: Frontier) -> Self {
        Self { after, lo_floor: None, read_alone_until: None }
    }
}

/// Where the listener a waker serves has read up to, now: a waker that reads (Valkey) starts
/// each read there or after it, never behind what the listener read without it (a catch-up,
/// a safety tick, a read after a reconnect).
#[derive(Clone)]
pub(crate) struct ReadPosition(std::sync::Arc<dyn Fn() -> Frontier + Send + Sync>);

impl ReadPosition {
    pub(crate) fn new(now: impl Fn() -> Frontier + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(now))
    }

    /// The listener's position now.
    // Only a reading waker asks.
    #[cfg_attr(not(feature = "valkey"), allow(dead_code))]
    pub(crate) fn now(&self) -> Frontier {
        (self.0)()
    }
}

/// Why a listener should read.
#[derive(Debug)]
// Which variants a build constructs depends on the backends compiled in.
#[allow(dead_code)]
pub(crate) enum Wake {
    /// A notification arrived.
    Notified,
    /// The notification connection was lost and re-made: anything may have been missed.
    Reconnected,
    /// The waker read the events itself (a blocking stream read).
    Fetched(Batch),
}

/// The notification side of a backend: one dedicated connection per listener.
#[async_trait]
pub(crate) trait Waker: Send + 'static {
    /// Waits for the next reason to read.
    ///
    /// # Errors
    /// When the connection is lost and cannot be re-made here; the listener restarts.
    async fn wait(&mut self) -> Result<Wake, Error>;
}

/// What the actor tree needs from a backend.
///
/// Every family is read through it: `read_after` returns the events of all families in the
/// backend's one order (lease history and signal delivery rows beside the completions), each
/// as a [`FamilyEvent`] whose cursor is already tagged with its family
/// ([`crate::cursor::Family::tag_cursor`]); a row of a known family that cannot be decoded
/// (an unknown lease kind, a missing id) goes to `Batch::skipped`. `cursor_of` and
/// `resolve_start` speak the untagged (completion-form) position: the filter strips and adds
/// the family tag.
#[async_trait]
pub(crate) trait CompletionSource: Send + Sync + 'static {
    /// `postgres`, `valkey` or `sqlite`.
    fn kind(&self) -> &'static str;

    /// The public cursor of a frontier.
    fn cursor_of(&self, at: &Frontier) -> StreamCursor;

    /// Whether this backend's producers write events of `family` (completions always). A
    /// subscription of a family its backend does not produce is refused with
    /// [`Error::Unavailable`] once the backend answers, rather than left silent. A
    /// backend that adds a family overrides it.
    fn produces(&self, family: Family) -> bool {
        family == Family::Completion
    }

    /// Decodes a cursor of this family (empty = tail) and checks it is still retained.
    async fn resolve_start(&self, cursor: &StreamCursor) -> Result<StartAt, Error>;

    /// The frontier of the newest events readable now.
    async fn tail(&self) -> Result<Frontier, Error>;

    /// Reads up to `limit` events after `after`, in order, from the shared pool.
    async fn read_after(&self, after: &Frontier, limit: usize) -> Result<Batch, Error>;

    /// Removes history as `retention` says, recording the boundary; returns events removed.
    async fn trim(&self, retention: &Retention) -> Result<u64, Error>;

    /// Health numbers of the backend, recorded as `ff_completions_backend_gauge{name}`. Backends
    /// without any report none.
    async fn gauges(&self) -> Result<Vec<(&'static str, f64)>, Error> {
        Ok(Vec::new())
    }

    /// Whether each flow partition is a lane of its own (Valkey's partition streams) rather
    /// than every partition sharing one order.
    fn lanes_are_partitions(&self) -> bool {
        false
    }

    /// Opens the dedicated notification connection, registered before it returns, so a read
    /// made after this call misses nothing. A reading waker reads from the listener's position
    /// (`read`) as it is at each wake-up.
    async fn open_waker(&self, read: ReadPosition) -> Result<Box<dyn Waker>, Error>;
}

//! The state kept outside the actors, so that a restart resumes where the dead actor stopped
//! ([`ListenerShared`], [`SubscriberShared`]), and the batch a listener fans out to its filters
//! ([`LiveBatch`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use super::request::TailWait;
use crate::backends::{Positioned, StartAt};
use crate::cursor::{Frontier, Position, StreamCursor};
use crate::types::TimestampMs;

/// A batch the listener read, shared by every filter of its backend without copying.
#[derive(Debug)]
pub(crate) struct LiveBatch {
    /// How many events the listener had read before this batch (the first event's index).
    pub first_index: u64,
    /// Exclusive lower bound: the listener's cursor before the read.
    pub start: Frontier,
    /// The listener's cursor after the read.
    pub end: Frontier,
    pub events: Vec<Positioned>,
}

/// A filter's delivery mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FilterMode {
    /// Delivering the listener's live batches.
    Live,
    /// Reading the backend from its own cursor until it reaches the live head.
    CatchingUp,
    /// The subscriber's buffer is full; waiting for room, live batches are dropped.
    Blocked,
    /// Waiting for the backend to tell where the subscription starts (it was unreachable when
    /// the subscriber subscribed).
    Starting,
}

impl FilterMode {
    fn to_u8(self) -> u8 {
        match self {
            Self::Live => 0,
            Self::CatchingUp => 1,
            Self::Blocked => 2,
            Self::Starting => 3,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Live,
            2 => Self::Blocked,
            3 => Self::Starting,
            _ => Self::CatchingUp,
        }
    }
}

/// What survives a listener's restart: its cursor and its counters.
#[derive(Debug, Default)]
pub(crate) struct ListenerShared {
    /// The last position read; `None` until the first start resolves the tail. `events_read`
    /// moves under the same lock, so [`Self::head`] is a consistent pair.
    pub cursor: Mutex<Option<Frontier>>,
    /// The first cursor this listener ever had: the tail it read when its backend first
    /// answered (or at spawn). A tail subscription made before that starts here.
    pub first_cursor: std::sync::OnceLock<Frontier>,
    pub events_read: AtomicU64,
    pub rows_skipped: AtomicU64,
    pub reconnects: AtomicU64,
    /// Restarts by the supervisor.
    pub restarts: AtomicU64,
    /// Restarts since the current outage began; the listener resets it when it is live again.
    pub outage_restarts: AtomicU64,
    pub live: std::sync::atomic::AtomicBool,
    /// Set by the listener once a read worked, cleared by the supervisor when it starts one:
    /// tells the restart policy whether the last incarnation had a healthy life.
    pub became_live: std::sync::atomic::AtomicBool,
    /// When the listener last lost its connection or died; cleared when it is live again.
    pub down_since: Mutex<Option<std::time::Instant>>,
    pub last_error: Mutex<Option<String>>,
}

impl ListenerShared {
    pub(crate) fn cursor(&self) -> Option<Frontier> {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_cursor(&self, at: Frontier) {
        let _ = self.first_cursor.set(at.clone());
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
    }

    /// Moves the cursor to `end` over `events` more events read; returns the number of events
    /// read before them (the index of the first one).
    pub(crate) fn advance(&self, end: &Frontier, events: u64) -> u64 {
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        *cursor = Some(end.clone());
        self.events_read.fetch_add(events, Ordering::Relaxed)
    }

    /// The cursor and the number of events read up to it, taken together.
    pub(crate) fn head(&self) -> (Option<Frontier>, u64) {
        let cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        (cursor.clone(), self.events_read.load(Ordering::Relaxed))
    }

    pub(crate) fn set_error(&self, err: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = err;
    }

    /// Records that the listener is down (kept from the first failure of an outage).
    pub(crate) fn mark_down(&self) {
        self.live.store(false, Ordering::Relaxed);
        if let Ok(mut since) = self.down_since.lock() {
            since.get_or_insert_with(std::time::Instant::now);
        }
    }
}

/// What a subscriber's lag is measured from (see [`SubscriberShared::lag_events`]).
#[derive(Clone, Copy, Debug, Default)]
struct LagMarks {
    /// At the last sync with a live batch: how many events the listener had read up to the
    /// delivered position, and the subscriber's `processed` count then.
    synced: Option<(u64, u64)>,
    /// Occurred-at of the oldest event the filter knows it has not processed yet.
    pending_at: Option<TimestampMs>,
}

/// What survives a filter's restart: where the subscription starts, the subscriber's
/// delivered position and counters.
#[derive(Debug)]
pub(crate) struct SubscriberShared {
    /// What the subscriber asked for (empty: the tail).
    pub from: StreamCursor,
    /// For a tail subscription: the listener's cursor when the subscriber subscribed, the start
    /// to use if the backend cannot tell its tail then.
    pub tail_fallback: Option<Frontier>,
    /// For a tail subscription: whether the subscriber's call waits while the backend cannot
    /// tell its tail (or fails at once).
    pub tail_wait: TailWait,
    /// Where delivery starts, once resolved (the filter resolves it, then keeps it).
    start: std::sync::OnceLock<StartAt>,
    delivered: Mutex<Frontier>,
    /// Events processed (delivered or filtered out).
    pub processed: AtomicU64,
    mode: AtomicU8,
    pub delivered_count: AtomicU64,
    pub live_batches_dropped: AtomicU64,
    pub catch_up_reads: AtomicU64,
    /// Set by the filter once it handled a message to the end, cleared by the supervisor when
    /// it judges the filter's exit: tells the restart policy whether the last incarnation was
    /// healthy (a sink that panics on every delivery never is).
    pub healthy: std::sync::atomic::AtomicBool,
    lag: Mutex<LagMarks>,
}

impl SubscriberShared {
    /// A subscription from `from` (empty: the tail), not resolved yet.
    pub(crate) fn new(from: StreamCursor, tail_fallback: Option<Frontier>) -> Self {
        Self {
            from,
            tail_fallback,
            tail_wait: TailWait::Wait,
            start: std::sync::OnceLock::new(),
            delivered: Mutex::new(Frontier::default()),
            processed: AtomicU64::new(0),
            mode: AtomicU8::new(FilterMode::Starting.to_u8()),
            delivered_count: AtomicU64::new(0),
            live_batches_dropped: AtomicU64::new(0),
            catch_up_reads: AtomicU64::new(0),
            healthy: std::sync::atomic::AtomicBool::new(false),
            lag: Mutex::new(LagMarks::default()),
        }
    }

    /// Sets what a tail subscription does while the backend cannot tell its tail.
    #[must_use]
    pub(crate) fn with_tail_wait(mut self, tail_wait: TailWait) -> Self {
        self.tail_wait = tail_wait;
        self
    }

    /// Where delivery starts; `None` until resolved.
    pub(crate) fn start(&self) -> Option<StartAt> {
        self.start.get().cloned()
    }

    /// Fixes where delivery starts (once; later calls are ignored) and returns it.
    /// `read_at_start`: how many events the listener had read up to `start.after`, when known
    /// (the subscriber starts at the listener's cursor).
    pub(crate) fn resolve(&self, start: StartAt, read_at_start: Option<u64>) -> StartAt {
        self.start
            .get_or_init(|| {
                self.set_delivered(start.after.clone());
                if let Some(read) = read_at_start {
                    self.lag_marks().synced = Some((read, 0));
                }
                start
            })
            .clone()
    }

    /// Drop events of the floor's batch (`major`) whose `lo` half is at or below its `lo`
    /// (resuming an `event_id`-only cursor: later batches may hold lower ids committed late).
    pub(crate) fn lo_floor(&self) -> Option<Position> {
        self.start().and_then(|s| s.lo_floor.map(|lo| Position::with_major(s.after.single().major, 0, lo)))
    }

    pub(crate) fn delivered(&self) -> Frontier {
        self.delivered.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_delivered(&self, at: Frontier) {
        *self.delivered.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }

    /// Moves the delivered frontier up to `pos` in its lane.
    pub(crate) fn advance_delivered(&self, pos: Position) {
        self.delivered.lock().unwrap_or_else(|p| p.into_inner()).advance(pos);
    }

    /// Moves the delivered frontier up to `at`.
    pub(crate) fn join_delivered(&self, at: &Frontier) {
        self.delivered.lock().unwrap_or_else(|p| p.into_inner()).join(at);
    }

    pub(crate) fn mode(&self) -> FilterMode {
        FilterMode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    pub(crate) fn set_mode(&self, mode: FilterMode) {
        self.mode.store(mode.to_u8(), Ordering::Relaxed);
    }

    fn lag_marks(&self) -> std::sync::MutexGuard<'_, LagMarks> {
        self.lag.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the listener had read `read_up_to_delivered` events up to the delivered
    /// position (learnt from a live batch that contains it).
    pub(crate) fn sync_lag(&self, read_up_to_delivered: u64) {
        self.lag_marks().synced = Some((read_up_to_delivered, self.processed.load(Ordering::Relaxed)));
    }

    /// Sets the occurred-at of the oldest event not processed yet (`None`: nothing pending).
    pub(crate) fn set_pending(&self, at: Option<TimestampMs>) {
        self.lag_marks().pending_at = at;
    }

    /// Sets the oldest pending event's time unless one is already known.
    pub(crate) fn note_pending(&self, at: TimestampMs) {
        self.lag_marks().pending_at.get_or_insert(at);
    }

    /// Events the listener has read past this subscriber's delivered position: the listener's
    /// read count, minus its count at the delivered position when the filter last met a live
    /// batch containing it, minus what the filter processed since. `None` until that first
    /// meeting for a subscriber that started away from the listener's cursor.
    pub(crate) fn lag_events(&self, listener: &ListenerShared) -> Option<u64> {
        let (synced_read, synced_processed) = self.lag_marks().synced?;
        let since = self.processed.load(Ordering::Relaxed).saturating_sub(synced_processed);
        let read = listener.events_read.load(Ordering::Relaxed);
        Some(read.saturating_sub(synced_read).saturating_sub(since))
    }

    /// Milliseconds from the occurred-at of the oldest event not processed yet to `now`; 0 when
    /// nothing is pending (or the producer's clock is ahead).
    pub(crate) fn lag_ms(&self, now: TimestampMs) -> u64 {
        self.lag_marks().pending_at.map_or(0, |at| now.millis_since(at))
    }
}

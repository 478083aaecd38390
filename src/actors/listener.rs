//! Listener actor: one per backend.
//!
//! Parent: the supervisor. Children: none (a waker task it owns).
//! In: [`ListenerMsg`] from its waker task (`Woken`, `Fetched`, `WakerFailed`), from its own
//! timers (`Woken(Tick)`, `Woken(HeldBack)`). The supervisor's stats read its shared state.
//! Out: `FilterMsg::Live` batches, shared as `Arc`, to every filter of its backend.
//!
//! On start it opens the notification connection first (registered before it returns), then
//! reads from its cursor, then lives on wake-ups. A lost connection it cannot re-make ends the
//! actor with an error; the supervisor restarts it with backoff, and the new one resumes from
//! the cursor kept in [`ListenerShared`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use super::filter::Fanout;
use super::ids::BackendId;
use super::shared::{ListenerShared, LiveBatch};
use crate::backends::{Batch, CompletionSource, ReadPosition, Wake, Waker};
use crate::cursor::Frontier;
use crate::error::Error;
use crate::metrics;

/// Why a listener reads now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeReason {
    /// First read after (re)start.
    Startup,
    /// A notification arrived.
    Notified,
    /// The notification connection was re-made: something may have been missed.
    Reconnected,
    /// The periodic safety tick.
    Tick,
    /// Rows were held back by an open transaction: look again.
    HeldBack,
    /// The previous read was full: continue.
    Continue,
}

/// Messages of the listener.
pub enum ListenerMsg {
    /// Read above the cursor. Sent by the waker task, the tick timer, or the listener itself.
    Woken(WakeReason),
    /// A reading waker (Valkey: the partitions a message named) fetched this batch. Sent by
    /// the waker task.
    Fetched(Batch),
    /// The waker's connection is gone. Sent by the waker task; the listener fails and is restarted.
    WakerFailed(Error),
}

/// How a listener is configured.
pub struct ListenerArguments {
    /// The backend's name in the supervisor.
    pub backend_id: BackendId,
    /// The backend.
    pub(crate) source: Arc<dyn CompletionSource>,
    /// Cursor and counters kept across restarts.
    pub(crate) shared: Arc<ListenerShared>,
    /// The filters of this backend's subscribers.
    pub(crate) fanout: Arc<Fanout>,
    /// Safety tick: read even without a wake-up this often (at least 1 ms: the supervisor
    /// clamps it).
    pub tick: Duration,
    /// How soon to look again when an open transaction holds rows back.
    pub held_back_repoll: Duration,
    /// Rows per read.
    pub batch_size: usize,
}

/// A listener's running state.
pub struct Listening {
    args: ListenerArguments,
    span: tracing::Span,
    cursor: Frontier,
    repoll_scheduled: bool,
    held_back_since: Option<std::time::Instant>,
    /// A tick is in the mailbox: the tick task sends no other until it is handled.
    tick_pending: Arc<AtomicBool>,
    _waker_task: Option<AbortOnDropHandle<()>>,
    _tick_task: Option<AbortOnDropHandle<()>>,
}

/// The listener actor.
pub struct Listener;

impl Actor for Listener {
    type Msg = ListenerMsg;
    type State = Listening;
    type Arguments = ListenerArguments;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Inside ractor's own `Actor{id}` span, which carries the actor id.
        let span = tracing::info_span!("ff_listener", backend = %args.backend_id, kind = args.source.kind());
        Ok(Listening {
            span,
            args,
            cursor: Frontier::default(),
            repoll_scheduled: false,
            held_back_since: None,
            tick_pending: Arc::new(AtomicBool::new(false)),
            _waker_task: None,
            _tick_task: None,
        })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        state.connect(myself).instrument(span).await.map_err(Into::into)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        async move {
            match message {
                ListenerMsg::Woken(reason) => state.on_woken(&myself, reason).await,
                ListenerMsg::Fetched(batch) => state.on_fetched(&myself, batch).await,
                ListenerMsg::WakerFailed(err) => Err(state.on_waker_failed(err)),
            }
        }
        .instrument(span)
        .await
        .map_err(Into::into)
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        state.args.shared.mark_down();
        Ok(())
    }
}

impl Listening {
    /// Opens the waker (registered before it returns), then starts reading from the cursor.
    async fn connect(&mut self, myself: ActorRef<ListenerMsg>) -> Result<(), Error> {
        let shared = &self.args.shared;
        self.cursor = match shared.cursor() {
            Some(pos) => pos,
            None => {
                let tail = self.args.source.tail().await?;
                shared.set_cursor(tail.clone());
                tail
            }
        };
        let read = {
            let shared = shared.clone();
            ReadPosition::new(move || shared.cursor().unwrap_or_default())
        };
        let waker = self.args.source.open_waker(read).await?;
        self._waker_task = Some(AbortOnDropHandle::new(tokio::spawn(run_waker(waker, myself.clone()))));
        self._tick_task = Some(spawn_ticker(myself.clone(), self.args.tick, self.tick_pending.clone()));
        shared.set_error(None);
        let outage = shared.down_since.lock().map(|mut d| d.take()).unwrap_or(None).map(|t| t.elapsed());
        let attempts = shared.outage_restarts.swap(0, Ordering::Relaxed);
        match outage {
            // The supervisor warned once when the outage began; this is its one closing line.
            Some(outage) => tracing::info!(?outage, attempts, "reconnected"),
            None => tracing::info!("listener connected"),
        }
        myself
            .cast(ListenerMsg::Woken(WakeReason::Startup))
            .map_err(|_| Error::Actor { detail: "listener mailbox closed during start".into() })
    }

    /// Reads above the cursor, a few batches per message so the mailbox stays responsive.
    async fn on_woken(&mut self, myself: &ActorRef<ListenerMsg>, reason: WakeReason) -> Result<(), Error> {
        match reason {
            WakeReason::HeldBack => self.repoll_scheduled = false,
            WakeReason::Tick => self.tick_pending.store(false, Ordering::Relaxed),
            WakeReason::Reconnected => {
                self.args.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                metrics::listener_reconnected(self.args.backend_id.as_str());
                tracing::warn!(backend = %self.args.backend_id, "notification connection re-made; catching up");
            }
            _ => {}
        }
        let cursor_before = self.cursor.clone();
        for _ in 0..8 {
            let batch = self.args.source.read_after(&self.cursor, self.args.batch_size).await?;
            // A read worked: this incarnation is live and healthy (one whose reads fail at once
            // is not, and restarts with backoff rather than in a hot loop).
            self.args.shared.live.store(true, Ordering::Relaxed);
            self.args.shared.became_live.store(true, Ordering::Relaxed);
            let (full, held_back) = (batch.full, batch.held_back);
            self.publish(batch);
            self.note_held_back(held_back);
            if reason == WakeReason::Tick && self.cursor == cursor_before {
                self.heartbeat();
            }
            if held_back && !self.repoll_scheduled {
                self.repoll_scheduled = true;
                myself.send_after(self.args.held_back_repoll, || ListenerMsg::Woken(WakeReason::HeldBack));
            }
            if !full {
                return Ok(());
            }
        }
        let _ = myself.cast(ListenerMsg::Woken(WakeReason::Continue));
        Ok(())
    }

    /// Accepts a batch a reading waker fetched, first filling any gap below it.
    async fn on_fetched(&mut self, myself: &ActorRef<ListenerMsg>, batch: Batch) -> Result<(), Error> {
        if !self.cursor.covers_all(&batch.start) {
            self.on_woken(myself, WakeReason::Continue).await?;
        }
        self.publish(batch);
        Ok(())
    }

    /// An empty batch at the cursor: a filter that is behind the live head without knowing it
    /// (it joined between two batches) sees the gap and catches up within one tick.
    fn heartbeat(&self) {
        let (_, read) = self.args.shared.head();
        let live = Arc::new(LiveBatch {
            first_index: read,
            start: self.cursor.clone(),
            end: self.cursor.clone(),
            events: Vec::new(),
        });
        self.args.fanout.send(&live);
    }

    fn note_held_back(&mut self, held_back: bool) {
        self.held_back_since = match (held_back, self.held_back_since) {
            (true, None) => Some(std::time::Instant::now()),
            (true, since) => since,
            (false, _) => None,
        };
        metrics::held_back(self.args.backend_id.as_str(), self.held_back_since.map(|t| t.elapsed().as_secs_f64()));
    }

    fn on_waker_failed(&mut self, err: Error) -> Error {
        self.args.shared.mark_down();
        self.args.shared.set_error(Some(err.to_string()));
        // The supervisor logs the failure (once per outage) when this listener exits with it.
        tracing::debug!(error = %err, "notification connection lost");
        err
    }

    /// Advances the cursor over a batch and fans it out to every filter.
    fn publish(&mut self, mut batch: Batch) {
        if let Some((resume, reason)) = batch.lost.take() {
            // The backend's history is not the one the cursor was read in (a restore, a lossy
            // failover): the filters' positions may belong to it too. Each reads from its own
            // position, which ends its subscriber with the typed error if it does; the listener
            // goes on in the backend's history.
            tracing::error!(backend = %self.args.backend_id, cursor = ?self.cursor, ?resume, %reason, "the backend's history changed under the listener; subscriptions in the old one end");
            self.cursor = resume;
            self.args.shared.set_cursor(self.cursor.clone());
            self.args.fanout.send_history_lost();
            return;
        }
        if let Some(boundary) = batch.expired.filter(|b| !self.cursor.covers_all(b)) {
            // History after the cursor was trimmed while this listener was behind. Filters find
            // out for their own subscribers; the listener itself moves on to what is kept.
            tracing::warn!(backend = %self.args.backend_id, cursor = ?self.cursor, ?boundary, "listener cursor expired; resuming at the oldest retained position");
            self.cursor.join(&boundary);
            self.args.shared.set_cursor(self.cursor.clone());
            return;
        }
        for (pos, reason) in &batch.skipped {
            if !self.cursor.covers(*pos) {
                tracing::error!(backend = %self.args.backend_id, position = ?pos, %reason, "skipped a malformed completion row");
                self.args.shared.rows_skipped.fetch_add(1, Ordering::Relaxed);
                metrics::rows_skipped(self.args.backend_id.as_str(), 1);
            }
        }
        batch.events.retain(|e| !self.cursor.covers(e.pos));
        if self.cursor.covers_all(&batch.end) {
            return;
        }
        let shared = &self.args.shared;
        let count = batch.events.len() as u64;
        let end = self.cursor.joined(&batch.end);
        let first_index = shared.advance(&end, count);
        let live =
            Arc::new(LiveBatch { first_index, start: self.cursor.joined(&batch.start), end, events: batch.events });
        self.cursor = live.end.clone();
        metrics::events_read(self.args.backend_id.as_str(), count);
        self.args.fanout.send(&live);
    }
}

/// Casts a `Tick` wake-up every `tick`, but never a second one while the first is still in the
/// mailbox: a tick shorter than a read cannot grow the mailbox.
fn spawn_ticker(listener: ActorRef<ListenerMsg>, tick: Duration, pending: Arc<AtomicBool>) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            if pending.swap(true, Ordering::Relaxed) {
                continue;
            }
            if listener.cast(ListenerMsg::Woken(WakeReason::Tick)).is_err() {
                return;
            }
        }
    }))
}

/// Forwards the waker's wake-ups to the listener until either side is gone.
async fn run_waker(mut waker: Box<dyn Waker>, listener: ActorRef<ListenerMsg>) {
    loop {
        let msg = match waker.wait().await {
            Ok(Wake::Notified) => ListenerMsg::Woken(WakeReason::Notified),
            Ok(Wake::Reconnected) => ListenerMsg::Woken(WakeReason::Reconnected),
            Ok(Wake::Fetched(batch)) => ListenerMsg::Fetched(batch),
            Err(err) => {
                let _ = listener.cast(ListenerMsg::WakerFailed(err));
                return;
            }
        };
        if listener.cast(msg).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;

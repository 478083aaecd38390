//! Filter actor: one per subscriber.
//!
//! Parent: the supervisor. Children: none (at most one task waiting for room in the sink).
//! In: `Live` batches from the listener, `Resolve` and `CatchUp` from itself, `SinkReady` from
//! its waiting task. The supervisor's stats read its shared state.
//! Out: the answer to the subscriber's `Subscribe` call, then matching events, in order and
//! once each, into the subscriber's [`Sink`].
//!
//! First it resolves where the subscription starts (the tail, or after a cursor) and answers
//! the subscriber: with its id, or with a typed error (an expired or malformed cursor). A tail
//! subscription is answered only once its start is fixed at or before anything committed after
//! the answer: the backend's tail, or, when the backend cannot be reached, the listener's
//! cursor when the subscriber subscribed, or else the first position the listener reads since
//! (the call waits for it, or fails at once with `Unavailable` when the request said
//! `without_waiting`). It never asks the backend for the tail after answering, since that tail
//! would skip what was committed in between. A cursor subscription is answered at once while
//! the backend cannot be reached, and starts once the backend can check the cursor.
//!
//! The filter never waits on its subscriber. When the sink is full it stops where it is,
//! drops live batches while it waits for room, then reads the backend from its own cursor
//! (batched, through the shared pool) until it meets the live batches again. Whatever it
//! receives twice (live and read, or replayed after a restart) is dropped by position.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use tokio_util::task::AbortOnDropHandle;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::Instrument;

use super::ids::{BackendId, SubscriberId};
use super::request::TailWait;
use super::shared::{FilterMode, ListenerShared, LiveBatch, SubscriberShared};
use super::sink::{Sent, Sink};
use crate::backends::{Batch, CompletionSource, Positioned, StartAt};
use crate::backoff::Backoff;
use crate::config::BackendRetry;
use crate::cursor::{Frontier, StreamCursor};
use crate::error::Error;
use crate::metrics::SubscriberMetrics;

/// Stop reason a filter gives when its subscriber dropped the stream.
pub(crate) const SUBSCRIBER_GONE: &str = "subscriber gone";
/// Stop reason a filter gives after handing its subscriber a final error.
pub(crate) const SUBSCRIPTION_FAILED: &str = "subscription failed";

/// Where the new subscriber's id (or why it was refused) goes.
pub(crate) type SubscribeReply = RpcReplyPort<Result<SubscriberId, Error>>;

/// Messages of the filter.
pub enum FilterMsg {
    /// Find where the subscription starts. Sent by the filter itself.
    Resolve,
    /// A batch the listener read. Sent by the listener.
    Live(Arc<LiveBatch>),
    /// Read the next batch from the backend. Sent by the filter itself.
    CatchUp,
    /// The sink has room again. Sent by the filter's waiting task.
    SinkReady,
    /// The backend's history is not the one the listener's cursor was read in (a restore, a
    /// lossy failover): read from the delivered position, which ends the subscriber with
    /// [`Error::CursorHistoryLost`] if it belongs to the old one. Sent by the listener.
    HistoryLost,
}

/// How a filter is configured.
pub struct FilterArguments {
    /// The subscription it serves.
    pub subscriber_id: SubscriberId,
    /// The subscriber's name, for its metrics series (none without one).
    pub name: Option<String>,
    pub(crate) source: Arc<dyn CompletionSource>,
    /// Which family, which of its events, and where to deliver them.
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) shared: Arc<SubscriberShared>,
    /// The listener's shared state (its read count gives this subscriber's lag).
    pub(crate) listener: Arc<ListenerShared>,
    /// The backend's name, for metrics.
    pub backend_id: BackendId,
    /// Rows per catch-up read.
    pub batch_size: usize,
    /// Delay policy for catch-up reads and start resolutions that fail transiently.
    pub retry: BackendRetry,
    /// The subscriber's pending `Subscribe` call; `None` after a restart.
    pub(crate) reply: Option<SubscribeReply>,
}

/// A filter's running state.
pub struct FilterState {
    args: FilterArguments,
    span: tracing::Span,
    metrics: SubscriberMetrics,
    delivered: Frontier,
    mode: FilterMode,
    failed_reads: u32,
    /// The subscriber's call, until it is answered.
    reply: Option<SubscribeReply>,
    /// Events delivered since the metrics were last recorded.
    unreported: u64,
    _sink_waiter: Option<AbortOnDropHandle<()>>,
}

/// What delivering a run of events ended with.
enum Delivery {
    /// Every event was processed.
    Done,
    /// The sink is full; the rest waits for a catch-up read.
    Full,
    /// The subscriber is gone.
    Closed,
}

/// The filter actor.
pub struct Filter;

impl Actor for Filter {
    type Msg = FilterMsg;
    type State = FilterState;
    type Arguments = FilterArguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        mut args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let delivered = args.shared.delivered();
        let mode = if args.shared.start().is_some() {
            myself.cast(FilterMsg::CatchUp)?;
            FilterMode::CatchingUp
        } else {
            myself.cast(FilterMsg::Resolve)?;
            FilterMode::Starting
        };
        args.shared.set_mode(mode);
        let reply = args.reply.take();
        let metrics = SubscriberMetrics::new(args.backend_id.as_str(), args.name.as_deref());
        // Inside ractor's own `Actor{id}` span, which carries the actor id.
        let span = tracing::info_span!("ff_filter", backend = %args.backend_id, subscriber = %args.subscriber_id);
        Ok(FilterState {
            args,
            span,
            metrics,
            delivered,
            mode,
            failed_reads: 0,
            reply,
            unreported: 0,
            _sink_waiter: None,
        })
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
                FilterMsg::Resolve => state.on_resolve(&myself).await,
                FilterMsg::Live(batch) => state.on_live(&myself, &batch),
                FilterMsg::CatchUp => state.on_catch_up(&myself).await,
                FilterMsg::SinkReady => state.on_sink_ready(&myself),
                FilterMsg::HistoryLost => state.on_history_lost(&myself),
            }
            state.record_metrics();
            state.args.shared.healthy.store(true, Ordering::Relaxed);
        }
        .instrument(span)
        .await;
        Ok(())
    }
}

impl FilterState {
    /// Finds where the subscription starts and answers the subscriber (see the module docs).
    async fn on_resolve(&mut self, myself: &ActorRef<FilterMsg>) {
        if self.mode != FilterMode::Starting {
            return;
        }
        let tail = self.args.shared.from.is_empty();
        if tail && self.reply.is_none() {
            // Answered already: only the listener's first cursor may start it now.
            if !self.start_at_listeners_first_cursor(myself) {
                self.retry_resolve(myself, None);
            }
            return;
        }
        let source = &self.args.source;
        let result = if tail {
            source.tail().await.map(StartAt::after)
        } else {
            source.resolve_start(&self.args.shared.from).await
        };
        let family = self.args.sink.family();
        match result {
            Ok(_) if !source.produces(family) => {
                let err = Error::unavailable(
                    "subscribe",
                    format!("the {} backend does not produce {} events", source.kind(), family.name()),
                );
                tracing::warn!(subscriber = %self.args.subscriber_id, error = %err, "subscription refused");
                self.end_with_error(myself, err);
            }
            Ok(start) => self.begin(myself, start),
            Err(err) if err.is_transient() && tail => self.on_tail_unknown(myself, err),
            Err(err) if err.is_transient() => {
                self.answer(myself);
                self.retry_resolve(myself, Some(&err));
            }
            Err(err) => {
                tracing::warn!(subscriber = %self.args.subscriber_id, error = %err, "subscription refused");
                let err = self.in_family(err);
                self.end_with_error(myself, err);
            }
        }
    }

    /// The backend cannot tell its tail now. A position the tree has read is a start at or
    /// before anything committed after the subscriber's call returns: the listener's cursor
    /// when the subscriber subscribed, or else its first read since. Without one the call
    /// waits for the backend (answered once it or the listener tells a position), or fails at
    /// once when the subscriber said not to wait.
    fn on_tail_unknown(&mut self, myself: &ActorRef<FilterMsg>, err: Error) {
        if let Some(pos) = self.args.shared.tail_fallback.clone() {
            self.begin(myself, StartAt::after(pos));
            return;
        }
        if self.start_at_listeners_first_cursor(myself) {
            return;
        }
        match self.args.shared.tail_wait {
            TailWait::FailFast if self.reply.is_some() => {
                let detail = format!(
                    "the {} backend cannot tell its tail yet (unreachable, and the tree has read nothing from it)",
                    self.args.source.kind()
                );
                tracing::debug!(subscriber = %self.args.subscriber_id, error = %err, "tail subscription refused: not waiting");
                self.end_with_error(myself, Error::unavailable("subscribe", detail).with_source(err));
            }
            _ => self.retry_resolve(myself, Some(&err)),
        }
    }

    /// Starts a tail subscription at the listener's first cursor, if it has one yet.
    fn start_at_listeners_first_cursor(&mut self, myself: &ActorRef<FilterMsg>) -> bool {
        let Some(first) = self.args.listener.first_cursor.get().cloned() else { return false };
        self.begin(myself, StartAt::after(first));
        true
    }

    /// Tries the resolution again after the backend's backoff delay.
    fn retry_resolve(&mut self, myself: &ActorRef<FilterMsg>, err: Option<&Error>) {
        let delay = Backoff::from_retry(&self.args.retry).delay(self.failed_reads);
        if self.failed_reads == 0 {
            let error = err.map(ToString::to_string);
            tracing::warn!(?error, ?delay, "backend unreachable; the subscription starts once it answers");
        }
        self.failed_reads = self.failed_reads.saturating_add(1);
        myself.send_after(delay, || FilterMsg::Resolve);
    }

    /// Fixes the start, answers the subscriber, and catches up from there.
    fn begin(&mut self, myself: &ActorRef<FilterMsg>, start: StartAt) {
        // Starting at the listener's cursor, the lag in events is known from the first event.
        let (head, read) = self.args.listener.head();
        let read_at_start = (head.as_ref() == Some(&start.after) && start.lo_floor.is_none()).then_some(read);
        self.delivered = self.args.shared.resolve(start, read_at_start).after;
        self.args.sink.started(&self.delivered);
        self.failed_reads = 0;
        self.answer(myself);
        self.set_mode(FilterMode::CatchingUp);
        let _ = myself.cast(FilterMsg::CatchUp);
    }

    /// Answers the subscriber's call with its id, if not answered yet. A caller that gave up
    /// waiting (its future was dropped) gets no subscription: this filter ends.
    fn answer(&mut self, myself: &ActorRef<FilterMsg>) {
        if let Some(reply) = self.reply.take()
            && reply.send(Ok(self.args.subscriber_id)).is_err()
        {
            tracing::debug!(subscriber = %self.args.subscriber_id, "the subscriber stopped waiting for its answer");
            myself.stop(Some(SUBSCRIBER_GONE.into()));
        }
    }

    fn on_live(&mut self, myself: &ActorRef<FilterMsg>, batch: &LiveBatch) {
        if self.mode == FilterMode::Starting {
            // A live batch means the listener has a cursor: a tail subscription waiting for its
            // first one can start (the batch itself is read again by the catch-up). That cursor
            // was read after the subscriber subscribed (it had none then, or the subscription
            // would have started at it), so it misses nothing committed after the call returns.
            if self.args.shared.from.is_empty() {
                self.start_at_listeners_first_cursor(myself);
            }
            return;
        }
        let on_listeners_path = self
            .args
            .shared
            .start()
            .and_then(|s| s.read_alone_until)
            .is_none_or(|until| self.delivered.covers_all(&until));
        let contiguous = on_listeners_path && self.delivered.covers_all(&batch.start);
        match self.mode {
            FilterMode::Blocked | FilterMode::Starting => self.count_dropped(batch),
            FilterMode::CatchingUp if !contiguous => self.count_dropped(batch),
            FilterMode::Live if !contiguous => {
                self.count_dropped(batch);
                // The oldest missed event is at least as old as this batch's first.
                if let Some(first) = batch.events.first() {
                    self.args.shared.note_pending(first.event.at());
                }
                self.set_mode(FilterMode::CatchingUp);
                let _ = myself.cast(FilterMsg::CatchUp);
            }
            FilterMode::Live | FilterMode::CatchingUp => {
                self.set_mode(FilterMode::Live);
                let outcome = self.deliver(&batch.events);
                if matches!(outcome, Delivery::Done) {
                    self.args.shared.set_pending(None);
                }
                self.after_delivery(myself, outcome, &batch.end);
            }
        }
        self.sync_lag(batch);
    }

    /// A live batch that spans the delivered position tells how many events the listener had
    /// read up to it: the subscriber's lag in events is exact from here.
    fn sync_lag(&self, batch: &LiveBatch) {
        if self.delivered.covers_all(&batch.start) && batch.end.covers_all(&self.delivered) {
            let below = batch.events.iter().filter(|e| self.delivered.covers(e.pos)).count() as u64;
            self.args.shared.sync_lag(batch.first_index + below);
        }
    }

    /// Records the delivered count and both lag gauges once per message.
    fn record_metrics(&mut self) {
        let shared = &self.args.shared;
        let lag_ms = shared.lag_ms(crate::types::TimestampMs::now());
        self.metrics.delivered(std::mem::take(&mut self.unreported), lag_ms);
        if let Some(lag) = shared.lag_events(&self.args.listener) {
            self.metrics.lag_events(lag);
        }
    }

    async fn on_catch_up(&mut self, myself: &ActorRef<FilterMsg>) {
        if self.mode != FilterMode::CatchingUp {
            return;
        }
        self.args.shared.catch_up_reads.fetch_add(1, Ordering::Relaxed);
        self.metrics.catch_up_read();
        match self.args.source.read_after(&self.delivered, self.args.batch_size).await {
            Ok(Batch { lost: Some((resume, reason)), .. }) => {
                tracing::warn!(subscriber = %self.args.subscriber_id, %reason, "subscriber cursor's history is lost");
                let tail = Some(self.cursor_at(&resume));
                self.end_with_error(myself, Error::CursorHistoryLost { reason, tail });
            }
            Ok(batch) if batch.expired.as_ref().is_some_and(|b| !self.delivered.covers_all(b)) => {
                let oldest = batch.expired.map(|b| self.cursor_at(&self.delivered.joined(&b)));
                tracing::warn!(subscriber = %self.args.subscriber_id, ?oldest, "subscriber cursor expired");
                self.end_with_error(myself, Error::CursorExpired { oldest });
            }
            Ok(batch) => {
                if self.failed_reads > 0 {
                    tracing::info!(failed_reads = self.failed_reads, "catch-up reads resumed");
                    self.failed_reads = 0;
                }
                // The first event above the delivered position is the oldest one pending.
                let pending = batch.events.iter().find(|e| !self.delivered.covers(e.pos)).map(|e| e.event.at());
                if pending.is_some() || !batch.full {
                    self.args.shared.set_pending(pending);
                }
                let outcome = self.deliver(&batch.events);
                self.after_delivery(myself, outcome, &batch.end);
                if self.mode == FilterMode::CatchingUp {
                    if batch.full {
                        let _ = myself.cast(FilterMsg::CatchUp);
                    } else {
                        // At the live head: the next live batch continues from here.
                        self.set_mode(FilterMode::Live);
                    }
                }
            }
            Err(err) if err.is_transient() => {
                let delay = Backoff::from_retry(&self.args.retry).delay(self.failed_reads);
                // Once per run of failures at warn; the repeats at debug.
                if self.failed_reads == 0 {
                    tracing::warn!(error = %err, ?delay, "catch-up read failed; retrying with backoff");
                } else {
                    tracing::debug!(error = %err, ?delay, attempt = self.failed_reads, "catch-up read failed again");
                }
                self.failed_reads = self.failed_reads.saturating_add(1);
                myself.send_after(delay, || FilterMsg::CatchUp);
            }
            Err(err) => {
                tracing::error!(subscriber = %self.args.subscriber_id, error = %err, "catch-up failed; ending the subscription");
                self.end_with_error(myself, err);
            }
        }
    }

    /// Hands the subscriber an error it cannot recover from, then ends the subscription.
    fn end_with_error(&mut self, myself: &ActorRef<FilterMsg>, err: Error) {
        if let Some(reply) = self.reply.take() {
            // Not subscribed yet: the error is the answer to the call.
            let _ = reply.send(Err(err));
        } else {
            self.args.sink.send_error(err);
        }
        myself.stop(Some(SUBSCRIPTION_FAILED.into()));
    }

    /// A live subscriber reads from its own position now: a position of the lost history ends
    /// it with the typed error, one of the backend's current history goes on (a catching-up or
    /// blocked subscriber reads from its position anyway, a starting one resolves its own).
    fn on_history_lost(&mut self, myself: &ActorRef<FilterMsg>) {
        if self.mode == FilterMode::Live {
            self.set_mode(FilterMode::CatchingUp);
            let _ = myself.cast(FilterMsg::CatchUp);
        }
    }

    fn on_sink_ready(&mut self, myself: &ActorRef<FilterMsg>) {
        self._sink_waiter = None;
        if self.mode == FilterMode::Blocked {
            self.set_mode(FilterMode::CatchingUp);
            let _ = myself.cast(FilterMsg::CatchUp);
        }
    }

    /// Delivers events above the delivered position that match, advancing it over each one
    /// processed. The shared cursor is written right after each send, with no await between,
    /// so a kill can never separate the two.
    fn deliver(&mut self, events: &[Positioned]) -> Delivery {
        let (mut sent_count, mut processed) = (0u64, 0u64);
        let outcome = self.deliver_each(events, &mut sent_count, &mut processed);
        self.args.shared.processed.fetch_add(processed, Ordering::Relaxed);
        self.unreported += sent_count;
        outcome
    }

    fn deliver_each(&mut self, events: &[Positioned], sent_count: &mut u64, processed: &mut u64) -> Delivery {
        let floor = self.args.shared.lo_floor();
        for item in events {
            if self.delivered.covers(item.pos) {
                continue;
            }
            let above_floor = floor.is_none_or(|f| item.pos.major != f.major || item.pos.lo > f.lo);
            let sent = if above_floor { self.offer(item) } else { None };
            match sent {
                None => {}
                Some(Sent::Done) => *sent_count += 1,
                Some(Sent::Full) => {
                    // This event is now the oldest the subscriber has not received.
                    self.args.shared.set_pending(Some(item.event.at()));
                    return Delivery::Full;
                }
                Some(Sent::Closed) => return Delivery::Closed,
            }
            *processed += 1;
            self.delivered.advance(item.pos);
            self.args.shared.advance_delivered(item.pos);
        }
        Delivery::Done
    }

    /// Hands `item` to the sink if it is of the subscriber's family and matches its filter;
    /// `None` when it is not wanted. A completion costs what it cost before families existed:
    /// one more tag compared.
    fn offer(&self, item: &Positioned) -> Option<Sent> {
        self.args.sink.offer(item, &|cursor| self.stamp(item, cursor), &self.args.shared.delivered_count)
    }

    /// The cursor of the event to hand over: with a backend of several lanes it must name every
    /// lane (the delivered frontier with this event in it), not only the event's own.
    fn stamp(&self, item: &Positioned, cursor: &mut StreamCursor) {
        if item.pos.lane != 0 || self.delivered.positions().len() > 1 {
            let mut after = self.delivered.clone();
            after.advance(item.pos);
            *cursor = self.cursor_at(&after);
        }
    }

    /// The public cursor of the subscriber's family at `at`.
    fn cursor_at(&self, at: &Frontier) -> StreamCursor {
        self.args.sink.family().tag_cursor(self.args.source.cursor_of(at))
    }

    /// A source's error as this subscription's family must see it: the oldest cursor of a
    /// `CursorExpired` tagged with the family.
    fn in_family(&self, err: Error) -> Error {
        match err {
            Error::CursorExpired { oldest } => {
                Error::CursorExpired { oldest: oldest.map(|c| self.args.sink.family().tag_cursor(c)) }
            }
            other => other,
        }
    }

    fn after_delivery(&mut self, myself: &ActorRef<FilterMsg>, outcome: Delivery, end: &Frontier) {
        match outcome {
            Delivery::Done => {
                if !self.delivered.covers_all(end) {
                    self.delivered.join(end);
                    self.args.shared.join_delivered(end);
                }
                self.args.sink.passed(&self.delivered);
            }
            Delivery::Full => {
                self.set_mode(FilterMode::Blocked);
                self.wait_for_room(myself);
            }
            Delivery::Closed => {
                tracing::debug!(subscriber = %self.args.subscriber_id, "subscriber dropped its stream");
                myself.stop(Some(SUBSCRIBER_GONE.into()));
            }
        }
    }

    fn wait_for_room(&mut self, myself: &ActorRef<FilterMsg>) {
        let Some(room) = self.args.sink.room() else { return };
        let me = myself.clone();
        self._sink_waiter = Some(AbortOnDropHandle::new(tokio::spawn(async move {
            if room.await {
                let _ = me.cast(FilterMsg::SinkReady);
            }
        })));
    }

    fn set_mode(&mut self, mode: FilterMode) {
        match (self.mode, mode) {
            (from, FilterMode::CatchingUp) if from != FilterMode::CatchingUp => {
                tracing::info!(?from, position = ?self.delivered, "catch-up started")
            }
            (FilterMode::CatchingUp, FilterMode::Live) => tracing::info!(position = ?self.delivered, "caught up"),
            (from, to) if from != to => tracing::debug!(?from, ?to, "filter mode changed"),
            _ => {}
        }
        self.mode = mode;
        self.args.shared.set_mode(mode);
    }

    fn count_dropped(&self, batch: &LiveBatch) {
        if batch.events.is_empty() {
            return;
        }
        self.args.shared.live_batches_dropped.fetch_add(1, Ordering::Relaxed);
        self.metrics.batch_dropped();
    }
}

/// The filters a listener fans its batches out to, one registry per backend: the supervisor
/// adds and removes filters, the listener casts each batch to every one.
#[derive(Default)]
pub(crate) struct Fanout(RwLock<HashMap<SubscriberId, ActorRef<FilterMsg>>>);

impl Fanout {
    pub(crate) fn insert(&self, id: SubscriberId, filter: ActorRef<FilterMsg>) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).insert(id, filter);
    }

    pub(crate) fn remove(&self, id: SubscriberId) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// Casts `batch` to every filter (shared, never copied).
    pub(crate) fn send(&self, batch: &Arc<LiveBatch>) {
        for filter in self.0.read().unwrap_or_else(|p| p.into_inner()).values() {
            let _ = filter.cast(FilterMsg::Live(batch.clone()));
        }
    }

    /// Tells every filter that the backend's history is not the one the listener read before.
    pub(crate) fn send_history_lost(&self) {
        for filter in self.0.read().unwrap_or_else(|p| p.into_inner()).values() {
            let _ = filter.cast(FilterMsg::HistoryLost);
        }
    }
}

#[cfg(test)]
mod tests;

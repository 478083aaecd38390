//! Filter actor: one per subscriber.
//!
//! Parent: the supervisor. Children: none (at most one task waiting for room in the sink).
//! In: `Live` batches from the listener, `CatchUp` from itself, `SinkReady` from its waiting
//! task. The supervisor's stats read its shared state.
//! Out: matching events, in order and once each, into the subscriber's [`Sink`].
//!
//! The filter never waits on its subscriber. When the sink is full it stops where it is,
//! drops live batches while it waits for room, then reads the backend from its own cursor
//! (batched, through the shared pool) until it meets the live batches again. Whatever it
//! receives twice (live and read, or replayed after a restart) is dropped by position.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc::error::TrySendError;
use tracing::Instrument;

use super::{AbortOnDrop, BackendId, FilterMode, ListenerShared, LiveBatch, Sink, SubscriberId, SubscriberShared};
use crate::backends::{CompletionSource, Positioned};
use crate::backoff::Backoff;
use crate::config::BackendRetry;
use crate::cursor::Position;
use crate::error::EngineError;
use crate::filter::ScannerFilter;
use crate::metrics::SubscriberMetrics;

/// Messages of the filter.
pub enum FilterMsg {
    /// A batch the listener read. Sent by the listener.
    Live(Arc<LiveBatch>),
    /// Read the next batch from the backend. Sent by the filter itself.
    CatchUp,
    /// The sink has room again. Sent by the filter's waiting task.
    SinkReady,
}

/// How a filter is configured.
pub struct FilterArguments {
    /// The subscription it serves.
    pub subscriber_id: SubscriberId,
    pub(crate) source: Arc<dyn CompletionSource>,
    /// What the subscriber wants.
    pub filter: ScannerFilter,
    /// Where to deliver.
    pub sink: Sink,
    pub(crate) shared: Arc<SubscriberShared>,
    /// The listener's shared state (its read count gives this subscriber's lag).
    pub(crate) listener: Arc<ListenerShared>,
    /// The backend's name, for metrics.
    pub backend_id: BackendId,
    /// Rows per catch-up read.
    pub batch_size: usize,
    /// Delay policy for catch-up reads that fail transiently.
    pub retry: BackendRetry,
}

/// A filter's running state.
pub struct FilterState {
    args: FilterArguments,
    span: tracing::Span,
    metrics: SubscriberMetrics,
    delivered: Position,
    mode: FilterMode,
    failed_reads: u32,
    /// Events delivered since the metrics were last recorded.
    unreported: u64,
    _sink_waiter: Option<AbortOnDrop>,
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
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let delivered = args.shared.delivered();
        args.shared.set_mode(FilterMode::CatchingUp);
        myself.cast(FilterMsg::CatchUp)?;
        let metrics = SubscriberMetrics::new(&args.backend_id, args.subscriber_id);
        // Inside ractor's own `Actor{id}` span, which carries the actor id.
        let span = tracing::info_span!("ff_filter", backend = %args.backend_id, subscriber = %args.subscriber_id);
        Ok(FilterState {
            args,
            span,
            metrics,
            delivered,
            mode: FilterMode::CatchingUp,
            failed_reads: 0,
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
                FilterMsg::Live(batch) => state.on_live(&myself, &batch),
                FilterMsg::CatchUp => state.on_catch_up(&myself).await,
                FilterMsg::SinkReady => state.on_sink_ready(&myself),
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
    fn on_live(&mut self, myself: &ActorRef<FilterMsg>, batch: &LiveBatch) {
        let contiguous = batch.start <= self.delivered;
        match self.mode {
            FilterMode::Blocked => self.count_dropped(batch),
            FilterMode::CatchingUp if !contiguous => self.count_dropped(batch),
            FilterMode::Live if !contiguous => {
                self.count_dropped(batch);
                // The oldest missed event is at least as old as this batch's first.
                if let Some(first) = batch.events.first() {
                    self.args.shared.note_pending(first.event.at);
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
                self.after_delivery(myself, outcome, batch.end);
            }
        }
        self.sync_lag(batch);
    }

    /// A live batch that spans the delivered position tells how many events the listener had
    /// read up to it: the subscriber's lag in events is exact from here.
    fn sync_lag(&self, batch: &LiveBatch) {
        if batch.start <= self.delivered && self.delivered <= batch.end {
            let below = batch.events.partition_point(|e| e.pos <= self.delivered) as u64;
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
        match self.args.source.read_after(self.delivered, self.args.batch_size).await {
            Ok(batch) if batch.expired.is_some_and(|b| b > self.delivered) => {
                let oldest = batch.expired.map(|b| self.args.source.cursor_of(b));
                tracing::warn!(subscriber = %self.args.subscriber_id, ?oldest, "subscriber cursor expired");
                self.end_with_error(myself, EngineError::CursorExpired { oldest });
            }
            Ok(batch) => {
                if self.failed_reads > 0 {
                    tracing::info!(failed_reads = self.failed_reads, "catch-up reads resumed");
                    self.failed_reads = 0;
                }
                // The first event above the delivered position is the oldest one pending.
                let pending = batch.events.iter().find(|e| e.pos > self.delivered).map(|e| e.event.at);
                if pending.is_some() || !batch.full {
                    self.args.shared.set_pending(pending);
                }
                let outcome = self.deliver(&batch.events);
                self.after_delivery(myself, outcome, batch.end);
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
    fn end_with_error(&mut self, myself: &ActorRef<FilterMsg>, err: EngineError) {
        if let Sink::Channel(tx) = &self.args.sink {
            let tx = tx.clone();
            // The error must not be lost to a full buffer: wait for room off the actor.
            tokio::spawn(async move {
                let _ = tx.send(Err(err)).await;
            });
        }
        myself.stop(Some(super::supervisor::SUBSCRIPTION_FAILED.into()));
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
        let floor = self.args.shared.lo_floor;
        for item in events {
            if item.pos <= self.delivered {
                continue;
            }
            let wanted = floor.is_none_or(|f| item.pos.lo > f) && self.args.filter.matches_event(&item.event);
            if wanted {
                // Counted before the send: whoever receives the event finds it counted.
                self.args.shared.delivered_count.fetch_add(1, Ordering::Relaxed);
                let sent = match &self.args.sink {
                    Sink::Channel(tx) => match tx.try_send(Ok(item.event.clone())) {
                        Ok(()) => Delivery::Done,
                        Err(TrySendError::Full(_)) => Delivery::Full,
                        Err(TrySendError::Closed(_)) => Delivery::Closed,
                    },
                    Sink::Actor(send) => {
                        if send(item.event.clone()) {
                            Delivery::Done
                        } else {
                            Delivery::Closed
                        }
                    }
                };
                match sent {
                    Delivery::Done => *sent_count += 1,
                    Delivery::Full => {
                        self.args.shared.delivered_count.fetch_sub(1, Ordering::Relaxed);
                        // This event is now the oldest the subscriber has not received.
                        self.args.shared.set_pending(Some(item.event.at));
                        return Delivery::Full;
                    }
                    Delivery::Closed => {
                        self.args.shared.delivered_count.fetch_sub(1, Ordering::Relaxed);
                        return Delivery::Closed;
                    }
                }
            }
            *processed += 1;
            self.delivered = item.pos;
            self.args.shared.set_delivered(item.pos);
        }
        Delivery::Done
    }

    fn after_delivery(&mut self, myself: &ActorRef<FilterMsg>, outcome: Delivery, end: Position) {
        match outcome {
            Delivery::Done => {
                if end > self.delivered {
                    self.delivered = end;
                    self.args.shared.set_delivered(end);
                }
            }
            Delivery::Full => {
                self.set_mode(FilterMode::Blocked);
                self.wait_for_room(myself);
            }
            Delivery::Closed => {
                tracing::debug!(subscriber = %self.args.subscriber_id, "subscriber dropped its stream");
                myself.stop(Some(super::supervisor::SUBSCRIBER_GONE.into()));
            }
        }
    }

    fn wait_for_room(&mut self, myself: &ActorRef<FilterMsg>) {
        let Sink::Channel(tx) = &self.args.sink else { return };
        let tx = tx.clone();
        let me = myself.clone();
        self._sink_waiter = Some(AbortOnDrop(tokio::spawn(async move {
            if tx.reserve().await.is_ok() {
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

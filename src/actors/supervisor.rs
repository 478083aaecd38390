//! Supervisor actor: the root of the completion tree.
//!
//! Parent: none, or the engine's actor (`spawn_linked`). Children: one listener per backend,
//! one filter per subscriber.
//! In: [`SupervisorMsg`] from the handle (`Subscribe`, `Unsubscribe`, `Stats`, `ChildCell`),
//! from its own timers (`RestartListener`), and supervision events from its children.
//!
//! It overrides `handle_supervisor_evt` (ractor's default stops the parent when a child
//! exits): a listener that dies is restarted with backoff and resumes from the cursor kept
//! in its `ListenerShared`; a filter that dies is restarted from its subscriber's delivered
//! cursor. Only crashes that are not connection trouble count towards the restart
//! intensity; beyond it the supervisor fails, which escalates to its parent.
//!
//! Logging: the first failure of an outage is one `warn` line (with the error and the backoff
//! delay); the restarts that follow are `debug`; the listener logs `reconnected` once at
//! `info`, with the attempt count and the outage length, when it is live again. Everything
//! the supervisor does runs in an `ff_supervisor` span naming its backends.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::Instrument;

use super::filter::{Filter, FilterArguments, FilterMsg};
use super::listener::{Listener, ListenerArguments, ListenerMsg};
use super::{AbortOnDrop, BackendId, ListenerShared, ListenerState, Sink, SubscriberId, SubscriberShared};
use crate::backends::{CompletionSource, StartAt, open_source};
use crate::backoff::Backoff;
use crate::config::Retention;
use crate::cursor::StreamCursor;
use crate::error::EngineError;
use crate::filter::ScannerFilter;

pub use super::stats::{ListenerStats, SubscriberStats, SupervisorStats};
pub use super::supervisor_config::{
    MAX_BATCH_SIZE, MAX_INTERVAL, MAX_SUBSCRIBER_BUFFER, MIN_INTERVAL, MIN_QUERY_INTERVAL, RestartIntensity,
    SupervisorConfig,
};

/// Stop reason a filter gives when its subscriber dropped the stream.
pub(crate) const SUBSCRIBER_GONE: &str = "subscriber gone";
/// Stop reason a filter gives after handing its subscriber a final error.
pub(crate) const SUBSCRIPTION_FAILED: &str = "subscription failed";

/// Where a subscription starts and what it wants.
#[derive(Clone, Debug, Default)]
pub struct SubscribeRequest {
    /// Backend name; `None` picks the first configured backend.
    pub backend: Option<BackendId>,
    /// The subscriber's filter.
    pub filter: ScannerFilter,
    /// Resume after this cursor; empty means from the tail.
    pub from: StreamCursor,
}

impl SubscribeRequest {
    /// New events only.
    pub fn tail() -> Self {
        Self::default()
    }

    /// Events after `cursor` (an empty cursor means the tail).
    pub fn from_cursor(cursor: StreamCursor) -> Self {
        Self { from: cursor, ..Self::default() }
    }

    /// Sets the filter.
    #[must_use]
    pub fn with_filter(mut self, filter: ScannerFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Picks a backend by name.
    #[must_use]
    pub fn on_backend(mut self, backend: impl Into<BackendId>) -> Self {
        self.backend = Some(backend.into());
        self
    }
}

/// Which child a cell request names.
#[derive(Clone, Debug)]
pub enum ChildKey {
    /// The listener of a backend.
    Listener(BackendId),
    /// The filter of a subscriber.
    Filter(SubscriberId),
}

/// Messages of the supervisor.
pub enum SupervisorMsg {
    /// Adds a subscriber. Sent by the handle.
    Subscribe {
        /// What and where from.
        request: SubscribeRequest,
        /// Where to deliver.
        sink: Sink,
        /// The new subscriber's id, or why it was refused.
        reply: RpcReplyPort<Result<SubscriberId, EngineError>>,
    },
    /// Removes a subscriber. Sent by the handle or a dropped subscription.
    Unsubscribe(SubscriberId),
    /// Starts a listener again after its backoff. Sent by the supervisor itself.
    RestartListener(BackendId),
    /// Reports every listener and subscriber. Sent by the handle.
    Stats(RpcReplyPort<SupervisorStats>),
    /// The cell of a child, for operators and fault injection. Sent by the handle.
    ChildCell(ChildKey, RpcReplyPort<Option<ActorCell>>),
}

struct ListenerSlot {
    source: Arc<dyn CompletionSource>,
    _jobs: [Option<AbortOnDrop>; 2],
    shared: Arc<ListenerShared>,
    backoff: Backoff,
    actor: Option<ActorRef<ListenerMsg>>,
    started_at: Instant,
    attempt: u32,
    /// The backoff delay before the latest restart.
    last_delay: Option<Duration>,
    crashes: VecDeque<Instant>,
}

struct SubscriberSlot {
    backend: BackendId,
    filter: ScannerFilter,
    sink: Sink,
    shared: Arc<SubscriberShared>,
    actor: Option<ActorRef<FilterMsg>>,
    restarts: u64,
}

enum Child {
    Listener(BackendId),
    Filter(SubscriberId),
}

/// The supervisor's state.
pub struct SupervisorState {
    config: SupervisorConfig,
    span: tracing::Span,
    listeners: HashMap<BackendId, ListenerSlot>,
    order: Vec<BackendId>,
    subscribers: HashMap<SubscriberId, SubscriberSlot>,
    children: HashMap<ActorId, Child>,
    next_subscriber: u64,
}

/// The supervisor actor. Spawn it through [`crate::CompletionSupervisorHandle`], or directly
/// with `Actor::spawn_linked(name, CompletionSupervisor, config, parent)`.
pub struct CompletionSupervisor;

impl Actor for CompletionSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorConfig;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        config: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let names: Vec<&str> = config.backends.iter().map(|(id, _)| id.as_str()).collect();
        // Inside ractor's own `Actor{id}` span, which carries the actor id.
        let span = tracing::info_span!("ff_supervisor", backends = %names.join(","));
        let config = config.clamped();
        SupervisorState::start(config, span.clone()).instrument(span).await.map_err(Into::into)
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        async move {
            for id in state.order.clone() {
                state.start_listener(&myself, &id).await;
            }
        }
        .instrument(span)
        .await;
        Ok(())
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
                SupervisorMsg::Subscribe { request, sink, reply } => {
                    let result = state.subscribe(&myself, request, sink).await;
                    let _ = reply.send(result);
                }
                SupervisorMsg::Unsubscribe(id) => state.unsubscribe(id),
                SupervisorMsg::RestartListener(id) => state.start_listener(&myself, &id).await,
                SupervisorMsg::Stats(reply) => {
                    let _ = reply.send(state.stats());
                }
                SupervisorMsg::ChildCell(key, reply) => {
                    let _ = reply.send(state.child_cell(&key));
                }
            }
        }
        .instrument(span)
        .await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        async move {
            match event {
                SupervisionEvent::ActorTerminated(cell, _, reason) => {
                    state.on_child_exit(&myself, &cell, reason, None).await
                }
                SupervisionEvent::ActorFailed(cell, err) => {
                    let crash = err.downcast_ref::<EngineError>().is_none_or(|e| !e.is_transient());
                    let reason = Some(err.to_string());
                    state.on_child_exit(&myself, &cell, reason, Some(crash)).await
                }
                _ => Ok(()),
            }
        }
        .instrument(span)
        .await
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let stopping = myself.stop_children_and_wait(Some("supervisor stopping".into()), Some(Duration::from_secs(5)));
        stopping.instrument(state.span.clone()).await;
        Ok(())
    }
}

/// Runs a backend's trim job every `retention.interval` until the supervisor goes away.
fn spawn_trim_job(backend: BackendId, source: Arc<dyn CompletionSource>, retention: Retention) -> AbortOnDrop {
    let span = tracing::info_span!("ff_trim", backend = %backend);
    AbortOnDrop(tokio::spawn(
        async move {
            // `Retention` fields are public: keep the interval where `tokio::time` accepts it.
            let every = retention.interval.clamp(MIN_QUERY_INTERVAL, MAX_INTERVAL);
            let mut interval = tokio::time::interval(every);
            let mut failing = false;
            loop {
                interval.tick().await;
                match source.trim(&retention).await {
                    Ok(removed) => {
                        if failing {
                            tracing::info!("trim works again");
                        }
                        failing = false;
                        if removed > 0 {
                            tracing::info!(removed, "trimmed completion history");
                        }
                    }
                    // Once per run of failures at warn; the repeats at debug.
                    Err(err) if !failing => {
                        failing = true;
                        tracing::warn!(error = %err, "trim failed; will retry");
                    }
                    Err(err) => tracing::debug!(error = %err, "trim failed again"),
                }
            }
        }
        .instrument(span),
    ))
}

/// Records a backend's health gauges every `every` until the supervisor goes away.
fn spawn_gauge_job(backend: BackendId, source: Arc<dyn CompletionSource>, every: Duration) -> AbortOnDrop {
    let span = tracing::info_span!("ff_gauges", backend = %backend);
    AbortOnDrop(tokio::spawn(
        async move {
            let mut interval = tokio::time::interval(every);
            loop {
                interval.tick().await;
                match source.gauges().await {
                    Ok(gauges) => {
                        gauges.into_iter().for_each(|(name, v)| crate::metrics::backend_gauge(&backend, name, v))
                    }
                    Err(err) => tracing::debug!(error = %err, "backend gauges unavailable"),
                }
            }
        }
        .instrument(span),
    ))
}

impl SupervisorState {
    /// Connects to every backend and fixes each listener's first cursor.
    async fn start(config: SupervisorConfig, span: tracing::Span) -> Result<Self, EngineError> {
        if config.backends.is_empty() {
            return Err(EngineError::validation("a completion supervisor needs at least one backend"));
        }
        let mut listeners = HashMap::new();
        let mut order = Vec::new();
        for (id, backend) in &config.backends {
            if listeners.contains_key(id) {
                return Err(EngineError::validation(format!("backend name {id:?} is used twice")));
            }
            let source = open_source(backend).await?;
            // The first cursor is fixed before any subscriber resolves its own tail, so no
            // subscriber ever starts below the listener's live head unnoticed.
            let shared = Arc::new(ListenerShared::default());
            shared.set_cursor(source.tail().await?);
            let trim_job = backend.retention.clone().map(|r| spawn_trim_job(id.clone(), source.clone(), r));
            let gauge_job = spawn_gauge_job(id.clone(), source.clone(), config.gauge_interval);
            let slot = ListenerSlot {
                source,
                _jobs: [trim_job, Some(gauge_job)],
                shared,
                backoff: Backoff::from_retry(&backend.retry),
                actor: None,
                started_at: Instant::now(),
                attempt: 0,
                last_delay: None,
                crashes: VecDeque::new(),
            };
            listeners.insert(id.clone(), slot);
            order.push(id.clone());
        }
        Ok(Self {
            config,
            span,
            listeners,
            order,
            subscribers: HashMap::new(),
            children: HashMap::new(),
            next_subscriber: 1,
        })
    }

    async fn start_listener(&mut self, myself: &ActorRef<SupervisorMsg>, id: &BackendId) {
        let Some(slot) = self.listeners.get_mut(id) else { return };
        if slot.actor.is_some() {
            return;
        }
        let args = ListenerArguments {
            backend_id: id.clone(),
            source: slot.source.clone(),
            shared: slot.shared.clone(),
            tick: self.config.tick,
            held_back_repoll: self.config.held_back_repoll,
            batch_size: self.config.batch_size,
        };
        slot.started_at = Instant::now();
        match Actor::spawn_linked(None, Listener, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.children.insert(actor.get_id(), Child::Listener(id.clone()));
                slot.actor = Some(actor);
            }
            Err(err) => {
                slot.shared.mark_down();
                self.schedule_listener_restart(myself, id, &format!("failed to spawn: {err}"));
            }
        }
    }

    /// Schedules a listener's restart after its backoff delay. The first failure of an outage is
    /// logged at `warn`, the ones after it at `debug`, until the listener is live again.
    fn schedule_listener_restart(&mut self, myself: &ActorRef<SupervisorMsg>, id: &BackendId, reason: &str) {
        let Some(slot) = self.listeners.get_mut(id) else { return };
        if slot.started_at.elapsed() > slot.backoff.cap() * 4 {
            slot.attempt = 0;
        }
        let delay = slot.backoff.delay(slot.attempt);
        slot.attempt = slot.attempt.saturating_add(1);
        slot.last_delay = Some(delay);
        slot.shared.restarts.fetch_add(1, Ordering::Relaxed);
        crate::metrics::listener_restarted(id);
        let first_of_outage = slot.shared.outage_restarts.fetch_add(1, Ordering::Relaxed) == 0;
        if first_of_outage {
            tracing::warn!(backend = %id, reason, ?delay, "listener exited; restarting it with backoff until it is live again");
        } else {
            tracing::debug!(backend = %id, reason, attempt = slot.attempt, ?delay, "listener exited again; restarting");
        }
        let id = id.clone();
        myself.send_after(delay, move || SupervisorMsg::RestartListener(id));
    }

    async fn on_child_exit(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        cell: &ActorCell,
        reason: Option<String>,
        crash: Option<bool>,
    ) -> Result<(), ActorProcessingErr> {
        match self.children.remove(&cell.get_id()) {
            Some(Child::Listener(id)) => {
                if let Some(slot) = self.listeners.get_mut(&id) {
                    slot.actor = None;
                    slot.shared.mark_down();
                    if let Some(r) = &reason {
                        slot.shared.set_error(Some(r.clone()));
                    }
                    if crash == Some(true) {
                        self.count_crash(&id)?;
                    }
                }
                self.schedule_listener_restart(myself, &id, reason.as_deref().unwrap_or("stopped"));
            }
            Some(Child::Filter(sub)) => {
                let gone = reason.as_deref().is_some_and(|r| r == SUBSCRIBER_GONE || r == SUBSCRIPTION_FAILED);
                if gone {
                    self.unsubscribe(sub);
                } else if self.subscribers.contains_key(&sub) {
                    tracing::warn!(subscriber = %sub, reason = reason.as_deref().unwrap_or("stopped"), "filter exited; restarting from its cursor");
                    self.start_filter(myself, sub).await;
                }
            }
            None => {}
        }
        Ok(())
    }

    fn count_crash(&mut self, id: &BackendId) -> Result<(), EngineError> {
        let (Some(limit), Some(slot)) = (self.config.restart_intensity, self.listeners.get_mut(id)) else {
            return Ok(());
        };
        let now = Instant::now();
        slot.crashes.push_back(now);
        while slot.crashes.front().is_some_and(|t| now.duration_since(*t) > limit.within) {
            slot.crashes.pop_front();
        }
        if slot.crashes.len() > limit.max_restarts as usize {
            tracing::error!(backend = %id, crashes = slot.crashes.len(), "listener crash loop; escalating");
            return Err(EngineError::Actor {
                detail: format!("listener {id} crashed {} times within {:?}", slot.crashes.len(), limit.within),
            });
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        request: SubscribeRequest,
        sink: Sink,
    ) -> Result<SubscriberId, EngineError> {
        let backend = match request.backend {
            Some(b) => b,
            None => self.order.first().cloned().ok_or_else(|| EngineError::validation("no backend configured"))?,
        };
        let slot = self
            .listeners
            .get(&backend)
            .ok_or_else(|| EngineError::validation(format!("no backend named {backend:?}")))?;
        let start = if request.from.is_empty() {
            StartAt::after(slot.source.tail().await?)
        } else {
            slot.source.resolve_start(&request.from).await?
        };
        // Starting at the listener's cursor, the lag in events is known from the first event.
        let (head, read) = slot.shared.head();
        let read_at_start = (head == Some(start.after) && start.lo_floor.is_none()).then_some(read);
        let id = SubscriberId(self.next_subscriber);
        self.next_subscriber += 1;
        self.subscribers.insert(
            id,
            SubscriberSlot {
                backend,
                filter: request.filter,
                sink,
                shared: Arc::new(SubscriberShared::new(start, read_at_start)),
                actor: None,
                restarts: 0,
            },
        );
        self.start_filter(myself, id).await;
        Ok(id)
    }

    async fn start_filter(&mut self, myself: &ActorRef<SupervisorMsg>, id: SubscriberId) {
        let Some(sub) = self.subscribers.get_mut(&id) else { return };
        let Some(listener) = self.listeners.get(&sub.backend) else { return };
        if sub.actor.is_some() {
            sub.restarts += 1;
        }
        let args = FilterArguments {
            subscriber_id: id,
            source: listener.source.clone(),
            filter: sub.filter.clone(),
            sink: sub.sink.clone(),
            shared: sub.shared.clone(),
            listener: listener.shared.clone(),
            backend_id: sub.backend.clone(),
            batch_size: self.config.batch_size,
            retry: Default::default(),
        };
        match Actor::spawn_linked(None, Filter, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.children.insert(actor.get_id(), Child::Filter(id));
                listener.shared.filters.write().unwrap_or_else(|p| p.into_inner()).insert(id, actor.clone());
                sub.actor = Some(actor);
            }
            Err(err) => {
                tracing::error!(subscriber = %id, error = %err, "filter failed to spawn; dropping the subscription");
                self.unsubscribe(id);
            }
        }
    }

    fn unsubscribe(&mut self, id: SubscriberId) {
        let Some(sub) = self.subscribers.remove(&id) else { return };
        if let Some(listener) = self.listeners.get(&sub.backend) {
            listener.shared.filters.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
        if let Some(actor) = sub.actor {
            self.children.remove(&actor.get_id());
            actor.stop(Some(SUBSCRIBER_GONE.into()));
        }
    }

    fn stats(&self) -> SupervisorStats {
        let now = crate::types::TimestampMs::now();
        let listeners = self
            .order
            .iter()
            .filter_map(|id| self.listeners.get(id).map(|slot| (id, slot)))
            .map(|(id, slot)| {
                let shared = &slot.shared;
                let state = match (&slot.actor, shared.live.load(Ordering::Relaxed)) {
                    (Some(_), true) => ListenerState::Live,
                    (Some(_), false) => ListenerState::Starting,
                    (None, _) => ListenerState::Restarting,
                };
                ListenerStats {
                    backend: id.clone(),
                    kind: slot.source.kind(),
                    state,
                    cursor: shared.cursor().map(|p| slot.source.cursor_of(p)),
                    restarts: shared.restarts.load(Ordering::Relaxed),
                    restart_delay: slot.last_delay,
                    reconnects: shared.reconnects.load(Ordering::Relaxed),
                    events_read: shared.events_read.load(Ordering::Relaxed),
                    rows_skipped: shared.rows_skipped.load(Ordering::Relaxed),
                    last_error: shared.last_error.lock().map(|e| e.clone()).unwrap_or(None),
                }
            })
            .collect();
        let mut subscribers: Vec<SubscriberStats> = self
            .subscribers
            .iter()
            .filter_map(|(id, sub)| {
                let listener = self.listeners.get(&sub.backend)?;
                let source = &listener.source;
                let shared = &sub.shared;
                Some(SubscriberStats {
                    id: *id,
                    backend: sub.backend.clone(),
                    cursor: source.cursor_of(shared.delivered()),
                    mode: shared.mode(),
                    delivered: shared.delivered_count.load(Ordering::Relaxed),
                    lag_events: shared.lag_events(&listener.shared),
                    lag_ms: shared.lag_ms(now),
                    live_batches_dropped: shared.live_batches_dropped.load(Ordering::Relaxed),
                    catch_up_reads: shared.catch_up_reads.load(Ordering::Relaxed),
                    restarts: sub.restarts,
                })
            })
            .collect();
        subscribers.sort_by_key(|s| s.id);
        SupervisorStats { listeners, subscribers }
    }

    fn child_cell(&self, key: &ChildKey) -> Option<ActorCell> {
        match key {
            ChildKey::Listener(id) => self.listeners.get(id)?.actor.as_ref().map(|a| a.get_cell()),
            ChildKey::Filter(id) => self.subscribers.get(id)?.actor.as_ref().map(|a| a.get_cell()),
        }
    }
}

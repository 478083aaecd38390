//! Supervisor actor: the root of the completion tree.
//!
//! Parent: none, or the engine's actor (`spawn_linked`). Children: one listener per backend,
//! one filter per subscriber.
//! In: [`SupervisorMsg`] from the handle (`Subscribe`, `Unsubscribe`, `Stats`, `ChildCell`),
//! from its own timers (`RestartListener`, `RestartFilter`), and supervision events from its
//! children.
//!
//! It overrides `handle_supervisor_evt` (ractor's default stops the parent when a child
//! exits): a listener that dies resumes from the cursor kept in its `ListenerShared`, a filter
//! from its subscriber's delivered cursor. Both follow one `restart` policy: at once after a
//! healthy life, with growing backoff while the child fails to become live, and crashes that
//! are not connection trouble count towards the restart intensity; beyond it the supervisor
//! fails, which escalates to its parent.
//!
//! Files, by concern: `restart` (the policy, pure), `supervision` (starting children and
//! judging their exits), `subscriptions` (adding and removing subscribers), `jobs` (trim and
//! gauge tasks), `report` (stats and child cells).
//!
//! Logging: the first failure of an outage is one `warn` line (with the error and the backoff
//! delay); the restarts that follow are `debug`; the listener logs `reconnected` once at
//! `info`, with the attempt count and the outage length, when it is live again. Everything
//! the supervisor does runs in an `ff_supervisor` span naming its backends.

mod jobs;
mod report;
pub(crate) mod restart;
pub(crate) mod subscriptions;
mod supervision;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::Instrument;

use self::restart::RestartPolicy;
use super::filter::FilterMsg;
use super::listener::ListenerMsg;
use super::{BackendId, ListenerShared, Sink, SubscriberId, SubscriberShared};
use crate::backends::lazy::LazySource;
use crate::backends::{CompletionSource, lazy_source};
use crate::backoff::Backoff;
use crate::config::BackendConfig;
use crate::config::BackendRetry;
use crate::cursor::StreamCursor;
use crate::error::EngineError;
use crate::scanner_filter::ScannerFilter;

pub use super::stats::{ListenerStats, SubscriberStats, SupervisorStats};
pub use super::supervisor_config::{
    MAX_BATCH_SIZE, MAX_INTERVAL, MAX_SUBSCRIBER_BUFFER, MIN_QUERY_INTERVAL, RestartIntensity, SupervisorConfig,
};

/// Stop reason a filter gives when its subscriber dropped the stream.
pub(crate) const SUBSCRIBER_GONE: &str = "subscriber gone";
/// Stop reason a filter gives after handing its subscriber a final error.
pub(crate) const SUBSCRIPTION_FAILED: &str = "subscription failed";

/// Where a subscription starts and what it wants.
///
/// ```
/// use ff_completions::{Namespace, ScannerFilter, StreamCursor, SubscribeRequest};
///
/// # let saved_hex = "";
/// // Resume after the cursor the subscriber persisted (empty: the tail), one tenant only,
/// // with metrics under the name "promoter".
/// let request = SubscribeRequest::from_cursor(StreamCursor::from_hex(saved_hex)?)
///     .with_filter(ScannerFilter::new().with_namespace(Namespace::new("tenant-a")))
///     .with_name("promoter");
/// assert_eq!(request.name.as_deref(), Some("promoter"));
/// # Ok::<(), ff_completions::EngineError>(())
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct SubscribeRequest {
    /// Backend name; `None` picks the first configured backend.
    pub backend: Option<BackendId>,
    /// The subscriber's filter.
    pub filter: ScannerFilter,
    /// Resume after this cursor; empty means from the tail.
    pub from: StreamCursor,
    /// A name for the subscriber's metrics series and stats; unnamed subscribers record no
    /// per-subscriber series (their ids are never reused, so such series would grow without
    /// bound).
    pub name: Option<String>,
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

    /// Names the subscriber: its metrics carry `subscriber="<name>"`. Give each long-lived
    /// subscriber its own name (at most 64 characters, no control characters); subscribers
    /// sharing a name share their series.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Picks a backend by name.
    #[must_use]
    pub fn on_backend(mut self, backend: impl Into<BackendId>) -> Self {
        self.backend = Some(backend.into());
        self
    }

    /// A durable subscription named `name`, with one consumer at a time: the backend keeps
    /// its acknowledged position (see [`crate::DurableRequest`]; subscribe it with
    /// [`crate::CompletionSupervisorHandle::subscribe_durable`]). For several processes
    /// sharing the work, [`crate::DurableRequest::group`].
    pub fn durable(name: impl Into<String>) -> crate::durable::DurableRequest {
        crate::durable::DurableRequest::exclusive(name)
    }
}

/// A backend's connection, as the supervisor's listener holds it (opaque).
#[doc(hidden)]
#[derive(Clone)]
pub struct BackendSource(pub(crate) Arc<dyn CompletionSource>);

impl std::fmt::Debug for BackendSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendSource({})", self.0.kind())
    }
}

/// Which child a cell request names.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub enum ChildKey {
    /// The listener of a backend.
    Listener(BackendId),
    /// The filter of a subscriber.
    Filter(SubscriberId),
}

/// Messages of the supervisor. Engines normally go through [`crate::CompletionSupervisorHandle`];
/// the variants are public so that an engine's own actors can address the tree directly.
#[non_exhaustive]
pub enum SupervisorMsg {
    /// Adds a subscriber. Sent by the handle.
    Subscribe {
        /// What and where from.
        request: SubscribeRequest,
        /// Where to deliver.
        sink: Sink,
        /// The new subscriber's id, or why it was refused. The new filter answers it once it
        /// knows where the subscription starts, or that the backend cannot tell yet.
        reply: RpcReplyPort<Result<SubscriberId, EngineError>>,
    },
    /// Removes a subscriber. Sent by the handle or a dropped subscription.
    Unsubscribe(SubscriberId),
    /// Starts a listener again after its backoff. Sent by the supervisor itself.
    RestartListener(BackendId),
    /// Starts a filter again after its backoff. Sent by the supervisor itself.
    RestartFilter(SubscriberId),
    /// Reports every listener and subscriber. Sent by the handle.
    Stats(RpcReplyPort<SupervisorStats>),
    /// The backend a durable subscription keeps its group on (the listener's connection).
    /// Sent by the handle.
    #[doc(hidden)]
    Source(Option<BackendId>, RpcReplyPort<Result<BackendSource, EngineError>>),
    /// The cell of a child, for fault injection. Sent by the handle (feature `testing`).
    #[doc(hidden)]
    ChildCell(ChildKey, RpcReplyPort<Option<ActorCell>>),
}

struct ListenerSlot {
    source: Arc<dyn CompletionSource>,
    _jobs: [Option<AbortOnDropHandle<()>>; 2],
    shared: Arc<ListenerShared>,
    /// The backend's retry policy: the listener's and its filters' restart backoff, and the
    /// filters' catch-up retries.
    retry: BackendRetry,
    policy: RestartPolicy,
    actor: Option<ActorRef<ListenerMsg>>,
    /// The backoff delay before the latest restart.
    last_delay: Option<Duration>,
}

struct SubscriberSlot {
    backend: BackendId,
    name: Option<String>,
    filter: ScannerFilter,
    sink: Sink,
    shared: Arc<SubscriberShared>,
    policy: RestartPolicy,
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
                    state.subscribe(&myself, request, sink, reply).await
                }
                SupervisorMsg::Unsubscribe(id) => state.unsubscribe(id),
                SupervisorMsg::RestartListener(id) => state.start_listener(&myself, &id).await,
                SupervisorMsg::RestartFilter(id) => state.start_filter(&myself, id, None).await,
                SupervisorMsg::Stats(reply) => {
                    let _ = reply.send(state.stats());
                }
                SupervisorMsg::Source(backend, reply) => {
                    let source = state.backend_named(backend).and_then(|id| {
                        state
                            .listeners
                            .get(&id)
                            .map(|slot| BackendSource(slot.source.clone()))
                            .ok_or_else(|| EngineError::validation(format!("no backend named {id}")))
                    });
                    let _ = reply.send(source);
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
                    state.on_child_exit(&myself, &cell, reason, false)
                }
                SupervisionEvent::ActorFailed(cell, err) => {
                    let crash = err.downcast_ref::<EngineError>().is_none_or(|e| !e.is_transient());
                    state.on_child_exit(&myself, &cell, Some(err.to_string()), crash)
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

/// The backend named `id`, connected on first use (in the crate's own tests, an in-memory one
/// when the config names one).
fn source_for(config: &SupervisorConfig, id: &BackendId, backend: &BackendConfig) -> LazySource {
    #[cfg(test)]
    if let Some((_, memory)) = config.test_sources.0.iter().find(|(name, _)| name == id) {
        return memory.lazy();
    }
    let _ = (config, id);
    lazy_source(backend)
}

impl SupervisorState {
    /// Prepares every backend's slot. Connects (and fixes each listener's first cursor) only
    /// when the config says `connect_at_start`; otherwise the listeners connect in the
    /// background and nothing here waits for a backend.
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
            let lazy = Arc::new(source_for(&config, id, backend));
            let shared = Arc::new(ListenerShared::default());
            if config.connect_at_start {
                // Fail fast, with the backend's own typed error; the first cursor is then fixed
                // before any subscriber resolves its own tail.
                lazy.connect().await?;
                shared.set_cursor(lazy.tail().await?);
            }
            let source: Arc<dyn CompletionSource> = lazy;
            let trim_job = backend.retention.clone().map(|r| jobs::spawn_trim_job(id.clone(), source.clone(), r));
            let gauge_job = jobs::spawn_gauge_job(id.clone(), source.clone(), config.gauge_interval);
            let policy = RestartPolicy::new(Backoff::from_retry(&backend.retry), config.restart_intensity);
            let slot = ListenerSlot {
                source,
                _jobs: [trim_job, Some(gauge_job)],
                shared,
                retry: backend.retry.clone(),
                policy,
                actor: None,
                last_delay: None,
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
}

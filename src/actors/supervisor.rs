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
mod subscriptions;
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
use super::awaits::AwaitHub;
use super::filter::{Fanout, FilterMsg, SubscribeReply};
use super::ids::{BackendId, SubscriberId};
use super::listener::ListenerMsg;
use super::request::TailWait;
use super::shared::{ListenerShared, SubscriberShared};
use super::sink::Sink;
use super::stats::SupervisorStats;
use super::supervisor_config::SupervisorConfig;
use crate::backends::lazy::LazySource;
use crate::backends::{CompletionSource, lazy_source};
use crate::backoff::Backoff;
use crate::config::BackendConfig;
use crate::config::BackendRetry;
use crate::cursor::StreamCursor;
use crate::error::Error;

/// A new subscriber: what it wants and where its events go.
pub(crate) struct NewSubscriber {
    /// The backend's name; `None` picks the only one.
    pub backend: Option<BackendId>,
    /// Resume after this cursor (of the sink's family); empty: the tail.
    pub from: StreamCursor,
    /// The name of its metrics series.
    pub name: Option<String>,
    /// Which family, which of its events, and where they go.
    pub sink: Arc<dyn Sink>,
    /// Whether a tail subscription waits for a backend that cannot tell its tail yet.
    pub tail_wait: TailWait,
}

/// Which child a cell request names.
#[derive(Clone, Debug)]
pub(crate) enum ChildKey {
    /// The listener of a backend.
    Listener(BackendId),
    /// The filter of a subscriber.
    Filter(SubscriberId),
}

/// A message to the supervisor. Build none yourself: address the tree through
/// [`crate::CompletionSupervisorHandle`] (made from the supervisor's `ActorRef` with
/// [`crate::CompletionSupervisorHandle::from_actor`] when you spawned the actor yourself).
pub struct SupervisorMsg(pub(crate) Command);

impl From<Command> for SupervisorMsg {
    fn from(command: Command) -> Self {
        Self(command)
    }
}

/// What a [`SupervisorMsg`] asks.
pub(crate) enum Command {
    /// Adds a subscriber; the new filter answers once it knows where the subscription starts,
    /// or that the backend cannot tell yet. Sent by the handle.
    Subscribe(NewSubscriber, SubscribeReply),
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
    Backend(Option<BackendId>, RpcReplyPort<Result<Arc<LazySource>, Error>>),
    /// The cell of a child. Sent by the handle.
    ChildCell(ChildKey, RpcReplyPort<Option<ActorCell>>),
    /// The hub of the awaits of one execution's completion on a backend, and its name. Sent by
    /// the handle.
    Awaits(Option<BackendId>, RpcReplyPort<Result<(BackendId, Arc<AwaitHub>), Error>>),
}

struct ListenerSlot {
    source: Arc<LazySource>,
    /// The awaits of one execution's completion, served by one shared subscription.
    awaits: Arc<AwaitHub>,
    _jobs: [Option<AbortOnDropHandle<()>>; 2],
    shared: Arc<ListenerShared>,
    /// The filters of this backend's subscribers.
    fanout: Arc<Fanout>,
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
    sink: Arc<dyn Sink>,
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
        SupervisorMsg(command): Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        async move {
            match command {
                Command::Subscribe(subscriber, reply) => state.subscribe(&myself, subscriber, reply).await,
                Command::Unsubscribe(id) => state.unsubscribe(id),
                Command::RestartListener(id) => state.start_listener(&myself, &id).await,
                Command::RestartFilter(id) => state.start_filter(&myself, id, None).await,
                Command::Stats(reply) => {
                    let _ = reply.send(state.stats());
                }
                Command::Backend(backend, reply) => {
                    let _ = reply.send(state.backend(backend));
                }
                Command::ChildCell(key, reply) => {
                    let _ = reply.send(state.child_cell(&key));
                }
                Command::Awaits(backend, reply) => {
                    let _ = reply.send(state.awaits(backend));
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
                    let crash = err.downcast_ref::<Error>().is_none_or(|e| !e.is_transient());
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
    async fn start(config: SupervisorConfig, span: tracing::Span) -> Result<Self, Error> {
        if config.backends.is_empty() {
            return Err(Error::validation("a completion supervisor needs at least one backend"));
        }
        let mut listeners = HashMap::new();
        let mut order = Vec::new();
        for (id, backend) in &config.backends {
            if listeners.contains_key(id) {
                return Err(Error::validation(format!("backend name {id:?} is used twice")));
            }
            let lazy = Arc::new(source_for(&config, id, backend));
            let shared = Arc::new(ListenerShared::default());
            if config.connect_at_start {
                // Fail fast, with the backend's own typed error; the first cursor is then fixed
                // before any subscriber resolves its own tail.
                lazy.connect().await?;
                shared.set_cursor(lazy.tail().await?);
            }
            let source: Arc<dyn CompletionSource> = lazy.clone();
            let trim_job = backend.retention.clone().map(|r| jobs::spawn_trim_job(id.clone(), source.clone(), r));
            let gauge_job = jobs::spawn_gauge_job(id.clone(), source, config.gauge_interval);
            let policy = RestartPolicy::new(Backoff::from_retry(&backend.retry), config.restart_intensity);
            let slot = ListenerSlot {
                awaits: AwaitHub::new(lazy.clone(), config.batch_size),
                source: lazy,
                _jobs: [trim_job, Some(gauge_job)],
                shared,
                fanout: Arc::default(),
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

//! The handle engines hold: spawn the tree, subscribe, read stats, shut down. One way to
//! subscribe, whatever the family: [`CompletionSupervisorHandle::subscribe`] takes any
//! [`Subscribe`] request (a [`SubscribeRequest`] of a family, or a durable request) and returns
//! its typed subscription; [`CompletionSupervisorHandle::subscribe_actor`] delivers a family to
//! an actor instead. The handle also implements the seed's [`CompletionBackend`] so code written
//! against it works unchanged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use ractor::{Actor, ActorCell, ActorRef, SpawnErr};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use super::awaits::{AwaitHub, AwaitSink, CompletionWatch};
use super::ids::{BackendId, SubscriberId};
use super::request::{Completions, Event, SubscribeRequest, TailWait};
use super::sink::{FamilySink, Out, Passed};
use super::stats::SupervisorStats;
use super::supervisor::{ChildKey, Command, CompletionSupervisor, NewSubscriber, SupervisorMsg};
use super::supervisor_config::SupervisorConfig;
use crate::backends::lazy::LazySource;
use crate::completion_backend::CompletionBackend;
use crate::cursor::StreamCursor;
use crate::error::Error;
use crate::event::{CompletionEvent, CompletionPayload, CompletionStream};
use crate::scanner_filter::ScannerFilter;
use crate::types::ExecutionId;

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) mod sealed {
    /// Keeps [`super::Subscribe`] to the crate's own requests.
    pub trait Sealed {}
}

/// A request [`CompletionSupervisorHandle::subscribe`] takes, and the subscription it gives:
/// a [`SubscribeRequest`] of any family ([`crate::Completions`], [`crate::LeaseHistory`],
/// [`crate::SignalDelivery`], [`crate::InstanceTags`]) gives a [`Subscription`] of that
/// family's events; a [`crate::DurableRequest`] gives a [`crate::DurableSubscription`].
pub trait Subscribe: sealed::Sealed + Send + Sized {
    /// What subscribing gives.
    type Subscription;

    /// Subscribes on `tree` (through [`CompletionSupervisorHandle::subscribe`]).
    #[doc(hidden)]
    fn subscribe_on(
        self,
        tree: &CompletionSupervisorHandle,
    ) -> impl Future<Output = Result<Self::Subscription, Error>> + Send;
}

impl<E: Event> sealed::Sealed for SubscribeRequest<E> {}

impl<E: Event> Subscribe for SubscribeRequest<E> {
    type Subscription = Subscription<E>;

    async fn subscribe_on(self, tree: &CompletionSupervisorHandle) -> Result<Subscription<E>, Error> {
        let (tx, rx) = mpsc::channel(tree.subscriber_buffer);
        let id = tree.add_subscriber(self, Out::Channel(tx)).await?;
        Ok(Subscription { id, inner: ReceiverStream::new(rx), supervisor: tree.actor.clone() })
    }
}

/// A cloneable handle on a running completion tree.
#[derive(Clone, Debug)]
pub struct CompletionSupervisorHandle {
    actor: ActorRef<SupervisorMsg>,
    subscriber_buffer: usize,
}

fn actor_error(what: &str, err: impl std::fmt::Display) -> Error {
    Error::Actor { detail: format!("{what}: {err}") }
}

/// A failed spawn, keeping the type of the supervisor's own error (a backend that cannot be
/// reached stays transient).
fn spawn_error(err: SpawnErr) -> Error {
    match err {
        SpawnErr::StartupFailed(inner) => match inner.downcast::<Error>() {
            Ok(err) => *err,
            Err(other) => actor_error("completion supervisor failed to start", other),
        },
        other => actor_error("completion supervisor failed to start", other),
    }
}

impl CompletionSupervisorHandle {
    /// Spawns a stand-alone tree. It returns at once: each listener connects (installing the
    /// schema or the function library) in the background, retrying with its backoff while its
    /// backend is down. With [`SupervisorConfig::with_connect_at_start`] it connects to every
    /// backend before it returns instead.
    ///
    /// # Errors
    /// A bad config ([`Error::Validation`]); with `connect_at_start`, a backend that cannot be
    /// reached, with the backend's own typed error (transient for a refused connection:
    /// [`Error::is_transient`]).
    pub async fn spawn(config: SupervisorConfig) -> Result<(Self, JoinHandle<()>), Error> {
        let config = config.clamped();
        let buffer = config.subscriber_buffer;
        let (actor, join) = Actor::spawn(None, CompletionSupervisor, config).await.map_err(spawn_error)?;
        Ok((Self::from_actor(actor, buffer), join))
    }

    /// Spawns the tree under an engine's actor, which then receives its supervision events.
    ///
    /// ```no_run
    /// # async fn demo(engine_actor: ractor::ActorCell) -> Result<(), ff_completions::Error> {
    /// use ff_completions::{BackendConfig, CompletionSupervisorHandle, SupervisorConfig};
    /// use std::time::Duration;
    ///
    /// let config = SupervisorConfig::new()
    ///     .with_backend(BackendConfig::from_url("postgres://app@db/engine")?)
    ///     .with_restart_intensity(5, Duration::from_secs(60)); // then escalate to `engine_actor`
    /// let (tree, _join) = CompletionSupervisorHandle::spawn_linked(engine_actor, config).await?;
    /// # drop(tree); Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Self::spawn`].
    pub async fn spawn_linked(parent: ActorCell, config: SupervisorConfig) -> Result<(Self, JoinHandle<()>), Error> {
        let config = config.clamped();
        let buffer = config.subscriber_buffer;
        let (actor, join) =
            Actor::spawn_linked(None, CompletionSupervisor, config, parent).await.map_err(spawn_error)?;
        Ok((Self::from_actor(actor, buffer), join))
    }

    /// Wraps a supervisor spawned by other means (`subscriber_buffer` is clamped as
    /// [`SupervisorConfig::with_subscriber_buffer`] does).
    pub fn from_actor(actor: ActorRef<SupervisorMsg>, subscriber_buffer: usize) -> Self {
        Self { actor, subscriber_buffer: subscriber_buffer.clamp(1, crate::config::MAX_SUBSCRIBER_BUFFER) }
    }

    /// The supervisor's actor.
    pub fn actor(&self) -> &ActorRef<SupervisorMsg> {
        &self.actor
    }

    /// Events buffered per channel subscriber.
    pub(crate) fn subscriber_buffer(&self) -> usize {
        self.subscriber_buffer
    }

    /// Asks the supervisor something and waits for its answer.
    async fn ask<T: Send + 'static>(
        &self,
        what: &'static str,
        command: impl FnOnce(ractor::RpcReplyPort<T>) -> Command,
    ) -> Result<T, Error> {
        self.actor
            .call(|reply| command(reply).into(), Some(CALL_TIMEOUT))
            .await
            .map_err(|e| actor_error(what, e))?
            .success_or(actor_error(what, "no reply"))
    }

    async fn add_subscriber<E: Event>(&self, request: SubscribeRequest<E>, out: Out<E>) -> Result<SubscriberId, Error> {
        self.add_subscriber_passed(request, out, None).await
    }

    /// Subscribes to completions, learning how far the subscription's filter has got (what a
    /// durable member needs to move the positions of partitions whose events it never sees).
    pub(crate) async fn subscribe_passed(
        &self,
        request: Completions,
    ) -> Result<(Subscription<CompletionEvent>, Arc<Passed>), Error> {
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        let passed = Arc::new(Passed::default());
        let id = self.add_subscriber_passed(request, Out::Channel(tx), Some(passed.clone())).await?;
        Ok((Subscription { id, inner: ReceiverStream::new(rx), supervisor: self.actor.clone() }, passed))
    }

    async fn add_subscriber_passed<E: Event>(
        &self,
        request: SubscribeRequest<E>,
        out: Out<E>,
        passed: Option<Arc<Passed>>,
    ) -> Result<SubscriberId, Error> {
        let Some(family) = E::FAMILY else {
            return Err(Error::unavailable("subscribe", "no backend produces this event family yet"));
        };
        let SubscribeRequest { backend, filter, from, name, tail_wait } = request;
        let sink = Arc::new(FamilySink { family, filter, out, passed });
        let subscriber = NewSubscriber { backend, from, name, sink, tail_wait };
        // No timeout: a tail subscription may wait for its backend (the caller bounds it).
        self.actor
            .call(|reply| Command::Subscribe(subscriber, reply).into(), None)
            .await
            .map_err(|e| actor_error("subscribe", e))?
            .success_or(actor_error("subscribe", "no reply"))?
    }

    /// Subscribes: events arrive in order, once each, from the request's start (the tail, or
    /// after a cursor), matching its filter. The request names the family and the subscription
    /// is typed by it.
    ///
    /// ```no_run
    /// # async fn demo(tree: ff_completions::CompletionSupervisorHandle, saved: ff_completions::StreamCursor) -> Result<(), ff_completions::Error> {
    /// use futures::StreamExt;
    /// use ff_completions::{Completions, DurableRequest, LeaseHistory, Namespace, ScannerFilter};
    ///
    /// let filter = ScannerFilter::new().with_namespace(Namespace::new("tenant-a"));
    /// let mut completions = tree.subscribe(Completions::from_cursor(saved).with_filter(filter)).await?;
    /// let mut leases = tree.subscribe(LeaseHistory::tail()).await?;
    /// // Durable: the backend keeps the position; the engine's instances share the partitions.
    /// let mut promoter = tree.subscribe(DurableRequest::group("promoter")).await?;
    /// while let Some(event) = completions.next().await {
    ///     let event = event?; // a CompletionEvent, with its cursor
    /// #   drop(event);
    /// }
    /// # drop((leases, promoter)); Ok(()) }
    /// ```
    ///
    /// # Errors
    /// A malformed cursor or one of another family ([`Error::Validation`]), an expired one
    /// ([`Error::CursorExpired`]), an unknown backend name, a family no backend produces
    /// ([`Error::Unavailable`]), or a dead tree. While the backend is down the subscription is
    /// accepted and starts once the backend answers: a cursor is then checked (an expired one
    /// ends the stream with `CursorExpired`), and a tail subscription starts at the last
    /// position the tree read, or, if it has read none yet, at the tail the tree first reads
    /// once the backend is reachable. A durable request: see [`crate::DurableRequest`].
    pub async fn subscribe<R: Subscribe>(&self, request: R) -> Result<R::Subscription, Error> {
        request.subscribe_on(self).await
    }

    /// Subscribes an actor: each event of the request's family is cast to it as
    /// `M::from(event)`. Its mailbox is unbounded, so a slow actor holds its backlog in memory.
    ///
    /// ```no_run
    /// use ff_completions::{CompletionEvent, CompletionSupervisorHandle, Completions};
    /// use ractor::{Actor, ActorProcessingErr, ActorRef};
    ///
    /// struct Promoter;
    /// enum PromoterMsg { Completed(CompletionEvent) }
    /// impl From<CompletionEvent> for PromoterMsg {
    ///     fn from(event: CompletionEvent) -> Self { Self::Completed(event) }
    /// }
    ///
    /// impl Actor for Promoter {
    ///     type Msg = PromoterMsg;
    ///     type State = ();
    ///     type Arguments = ();
    ///     async fn pre_start(&self, _: ActorRef<PromoterMsg>, _: ()) -> Result<(), ActorProcessingErr> {
    ///         Ok(())
    ///     }
    ///     async fn handle(&self, _: ActorRef<PromoterMsg>, msg: PromoterMsg, _: &mut ()) -> Result<(), ActorProcessingErr> {
    ///         let PromoterMsg::Completed(event) = msg;
    ///         println!("promote the children of {}", event.execution_id);
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # async fn demo(tree: CompletionSupervisorHandle) -> Result<(), Box<dyn std::error::Error>> {
    /// let (promoter, _) = Actor::spawn(None, Promoter, ()).await?;
    /// let id = tree.subscribe_actor(Completions::tail().with_name("promoter"), promoter).await?;
    /// # drop(id); Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Self::subscribe`].
    pub async fn subscribe_actor<E, M>(
        &self,
        request: SubscribeRequest<E>,
        actor: ActorRef<M>,
    ) -> Result<SubscriberId, Error>
    where
        E: Event,
        M: ractor::Message + From<E>,
    {
        self.add_subscriber(request, Out::actor(actor)).await
    }

    /// Watches one execution's completion: the returned [`CompletionWatch`] resolves to the
    /// execution's completion event, committed after this call returned, however late it is
    /// awaited. Create it before submitting the work, then submit, then await it.
    ///
    /// ```no_run
    /// # async fn demo(tree: ff_completions::CompletionSupervisorHandle, id: ff_completions::ExecutionId) -> Result<(), ff_completions::Error> {
    /// let done = tree.watch_completion(id).await?; // before the work is submitted
    /// // ... enqueue the execution `id` ...
    /// let event = tokio::time::timeout(std::time::Duration::from_secs(30), done)
    ///     .await
    ///     .map_err(|_| ff_completions::Error::Timeout { op: "await completion" })??;
    /// println!("{} reached {}", event.execution_id, event.outcome);
    /// # Ok(()) }
    /// ```
    ///
    /// Every await of the tree's backend shares one subscription, started by the first; a
    /// pending await costs a map entry and a oneshot channel. Dropping the watch gives it up
    /// (timeouts and cancellation are the caller's: `tokio::time::timeout`, `select!`).
    ///
    /// # Errors
    /// A tree with several backends ([`Error::Validation`]: this call uses the only one), or a
    /// dead tree. While the backend cannot be reached and the tree has read nothing from it,
    /// the first await's call waits for it (as a tail subscription does). The watch itself
    /// resolves to an error when the shared subscription ends with one (its history lost, say).
    pub async fn watch_completion(&self, execution_id: ExecutionId) -> Result<CompletionWatch, Error> {
        self.await_hub().await?.watch(execution_id)
    }

    /// The execution's completion after `after`: a completion cursor read before the work was
    /// submitted (from [`Self::completion_position`], [`CompletionWatch::cursor`], or an event
    /// the engine had received), so a completion that landed before this call is still found.
    /// The empty cursor means "committed after this call returned".
    ///
    /// ```no_run
    /// # async fn demo(tree: ff_completions::CompletionSupervisorHandle, id: ff_completions::ExecutionId) -> Result<(), ff_completions::Error> {
    /// let before = tree.completion_position().await?; // stored with the job, say
    /// // ... enqueue the execution `id`; it may well complete before the await below ...
    /// let event = tree.await_completion(id, &before).await?;
    /// # drop(event); Ok(()) }
    /// ```
    ///
    /// Completions that reached the shared subscription before the await began are read back
    /// from the backend, from `after` up to where the subscription stood (batched, through the
    /// shared pool); the later ones arrive through the subscription.
    ///
    /// # Errors
    /// As [`Self::watch_completion`]; a malformed cursor or one of another family
    /// ([`Error::Validation`]), an expired one ([`Error::CursorExpired`]) or one of another
    /// history ([`Error::CursorHistoryLost`]).
    pub async fn await_completion(
        &self,
        execution_id: ExecutionId,
        after: &StreamCursor,
    ) -> Result<CompletionEvent, Error> {
        self.await_hub().await?.completion_after(execution_id, after).await
    }

    /// A completion cursor at or before everything committed after this call returns, for a
    /// later [`Self::await_completion`]: where the awaits' shared subscription stands (no
    /// read of the backend once it runs).
    ///
    /// # Errors
    /// As [`Self::watch_completion`].
    pub async fn completion_position(&self) -> Result<StreamCursor, Error> {
        self.await_hub().await?.position()
    }

    /// The awaits' hub of the only backend, its shared subscription started.
    async fn await_hub(&self) -> Result<Arc<AwaitHub>, Error> {
        let (backend, hub) = self.ask("await completion", |reply| Command::Awaits(None, reply)).await??;
        if hub.is_running() {
            return Ok(hub);
        }
        let starting = hub.starting().lock().await;
        if !hub.is_running() {
            let subscriber = NewSubscriber {
                backend: Some(backend),
                from: StreamCursor::empty(),
                name: Some("awaits".to_owned()),
                sink: Arc::new(AwaitSink(hub.clone())),
                tail_wait: TailWait::Wait,
            };
            self.actor
                .call(|reply| Command::Subscribe(subscriber, reply).into(), None)
                .await
                .map_err(|e| actor_error("await completion", e))?
                .success_or(actor_error("await completion", "no reply"))??;
        }
        drop(starting);
        Ok(hub)
    }

    /// Ends a subscription.
    pub fn unsubscribe(&self, id: SubscriberId) {
        let _ = self.actor.cast(Command::Unsubscribe(id).into());
    }

    /// A snapshot of every listener and subscriber.
    ///
    /// # Errors
    /// A dead tree.
    pub async fn stats(&self) -> Result<SupervisorStats, Error> {
        self.ask("stats", Command::Stats).await
    }

    /// The backend named `name` (or the only one), as its listener holds it: the group store
    /// of durable subscriptions.
    pub(crate) async fn backend(&self, name: Option<BackendId>) -> Result<Arc<LazySource>, Error> {
        self.ask("subscribe durably", |reply| Command::Backend(name, reply)).await?
    }

    /// The listener actor of a backend, if running: to watch it, or to kill it in a
    /// fault-injection test (the supervisor restarts it from its cursor).
    pub async fn listener_cell(&self, backend: &str) -> Option<ActorCell> {
        self.child_cell(ChildKey::Listener(BackendId::from(backend))).await
    }

    /// The filter actor of a subscriber, if running: to watch it, or to kill it in a
    /// fault-injection test (the supervisor restarts it from the subscriber's cursor).
    pub async fn filter_cell(&self, id: SubscriberId) -> Option<ActorCell> {
        self.child_cell(ChildKey::Filter(id)).await
    }

    async fn child_cell(&self, key: ChildKey) -> Option<ActorCell> {
        self.ask("child cell", |reply| Command::ChildCell(key, reply)).await.ok().flatten()
    }

    /// Stops the tree and waits for every actor to exit. Subscriptions end.
    pub async fn shutdown(&self) {
        let _ = self.actor.stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(10))).await;
    }
}

/// The seed's name for a subscription to completions: a `Stream` of
/// `Result<CompletionEvent, Error>`.
pub type CompletionSubscription = Subscription<CompletionEvent>;

/// A live subscription: a `Stream` of the events of one family (completions by default) that
/// unsubscribes when dropped.
#[derive(Debug)]
pub struct Subscription<E = CompletionEvent> {
    id: SubscriberId,
    inner: ReceiverStream<Result<E, Error>>,
    supervisor: ActorRef<SupervisorMsg>,
}

impl<E> Subscription<E> {
    /// This subscription's id in its supervisor.
    pub fn id(&self) -> SubscriberId {
        self.id
    }
}

impl<E> Stream for Subscription<E> {
    type Item = Result<E, Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl<E> Drop for Subscription<E> {
    fn drop(&mut self) {
        let _ = self.supervisor.cast(Command::Unsubscribe(self.id).into());
    }
}

#[async_trait]
impl CompletionBackend for CompletionSupervisorHandle {
    async fn completion_position(&self) -> Result<StreamCursor, Error> {
        CompletionSupervisorHandle::completion_position(self).await
    }

    async fn await_completion(
        &self,
        execution_id: &ExecutionId,
        after: &StreamCursor,
    ) -> Result<CompletionPayload, Error> {
        CompletionSupervisorHandle::await_completion(self, *execution_id, after).await.map(|event| event.to_payload())
    }

    async fn subscribe_completions(&self) -> Result<CompletionStream, Error> {
        self.subscribe_completions_filtered(&ScannerFilter::NOOP).await
    }

    async fn subscribe_completions_filtered(&self, filter: &ScannerFilter) -> Result<CompletionStream, Error> {
        let sub = self.subscribe(Completions::tail().with_filter(filter.clone())).await?;
        let payloads = sub
            .take_while(|item| futures::future::ready(item.is_ok()))
            .filter_map(|item| async move { item.ok().map(|event| event.to_payload()) });
        Ok(Box::pin(payloads))
    }
}

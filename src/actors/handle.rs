//! The handle engines hold: spawn the tree, subscribe, read stats, shut down. It also
//! implements the seed's [`CompletionBackend`] so code written against it works unchanged.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use ractor::{Actor, ActorCell, ActorRef, SpawnErr};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use super::supervisor::{CompletionSupervisor, SubscribeRequest, SupervisorConfig, SupervisorMsg, SupervisorStats};
#[cfg(any(test, feature = "testing"))]
use super::{BackendId, supervisor::ChildKey};
use super::{FamilySink, Sink, SubscriberId};
use crate::completion_backend::CompletionBackend;
use crate::cursor::StreamCursor;
use crate::durable::{DurableRequest, DurableSubscription};
use crate::error::EngineError;
use crate::event::{CompletionEvent, CompletionStream};
use crate::instance_tags::InstanceTagSubscription;
use crate::lease_history::{LeaseHistoryEvent, LeaseHistoryFilter, LeaseHistorySubscription};
use crate::scanner_filter::ScannerFilter;
use crate::signal_delivery::{SignalDeliveryEvent, SignalDeliveryFilter, SignalDeliverySubscription};

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A cloneable handle on a running completion tree.
#[derive(Clone, Debug)]
pub struct CompletionSupervisorHandle {
    actor: ActorRef<SupervisorMsg>,
    subscriber_buffer: usize,
}

fn actor_error(what: &str, err: impl std::fmt::Display) -> EngineError {
    EngineError::Actor { detail: format!("{what}: {err}") }
}

/// A failed spawn, keeping the type of the supervisor's own error (a backend that cannot be
/// reached stays transient).
fn spawn_error(err: SpawnErr) -> EngineError {
    match err {
        SpawnErr::StartupFailed(inner) => match inner.downcast::<EngineError>() {
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
    /// A bad config ([`EngineError::Validation`]); with `connect_at_start`, a backend that
    /// cannot be reached, with the backend's own typed error (transient for a refused
    /// connection: [`EngineError::is_transient`]).
    pub async fn spawn(config: SupervisorConfig) -> Result<(Self, JoinHandle<()>), EngineError> {
        let config = config.clamped();
        let buffer = config.subscriber_buffer;
        let (actor, join) = Actor::spawn(None, CompletionSupervisor, config).await.map_err(spawn_error)?;
        Ok((Self::from_actor(actor, buffer), join))
    }

    /// Spawns the tree under an engine's actor, which then receives its supervision events.
    ///
    /// ```no_run
    /// # async fn demo(engine_actor: ractor::ActorCell) -> Result<(), ff_completions::EngineError> {
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
    pub async fn spawn_linked(
        parent: ActorCell,
        config: SupervisorConfig,
    ) -> Result<(Self, JoinHandle<()>), EngineError> {
        let config = config.clamped();
        let buffer = config.subscriber_buffer;
        let (actor, join) =
            Actor::spawn_linked(None, CompletionSupervisor, config, parent).await.map_err(spawn_error)?;
        Ok((Self::from_actor(actor, buffer), join))
    }

    /// Wraps a supervisor spawned by other means (`subscriber_buffer` is clamped as
    /// [`SupervisorConfig::with_subscriber_buffer`] does).
    pub fn from_actor(actor: ActorRef<SupervisorMsg>, subscriber_buffer: usize) -> Self {
        Self { actor, subscriber_buffer: subscriber_buffer.clamp(1, super::supervisor::MAX_SUBSCRIBER_BUFFER) }
    }

    /// The supervisor's actor.
    pub fn actor(&self) -> &ActorRef<SupervisorMsg> {
        &self.actor
    }

    async fn add_subscriber(&self, request: SubscribeRequest, sink: Sink) -> Result<SubscriberId, EngineError> {
        self.actor
            .call(|reply| SupervisorMsg::Subscribe { request, sink, reply }, Some(CALL_TIMEOUT))
            .await
            .map_err(|e| actor_error("subscribe", e))?
            .success_or(actor_error("subscribe", "no reply"))
            .and_then(|r| r)
    }

    /// Subscribes with a filter and a start position; events arrive in order, once each.
    ///
    /// # Errors
    /// A malformed or foreign cursor ([`EngineError::Validation`]), an expired one
    /// ([`EngineError::CursorExpired`]), an unknown backend name, or a dead tree. While the
    /// backend is down the subscription is accepted and starts once the backend answers: a
    /// cursor is then checked (an expired one ends the stream with `CursorExpired`), and a
    /// tail subscription starts at the last position the tree read, or, if it has read none
    /// yet, at the tail the tree first reads once the backend is reachable.
    pub async fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription, EngineError> {
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        let id = self.add_subscriber(request, Sink::Channel(tx)).await?;
        Ok(Subscription { id, inner: ReceiverStream::new(rx), supervisor: self.actor.clone() })
    }

    /// Subscribes durably: completions of the partitions this member holds, from the
    /// positions the backend stores under the request's name, in order per partition; the
    /// consumer acknowledges them ([`DurableSubscription::ack`], an [`crate::AckTicket`] in
    /// its own transaction, or after delivery). A group's members share the partitions.
    ///
    /// ```no_run
    /// # async fn demo(tree: ff_completions::CompletionSupervisorHandle) -> Result<(), ff_completions::EngineError> {
    /// use futures::StreamExt;
    /// use ff_completions::{DurableRequest, SubscribeRequest};
    ///
    /// // One consumer; a restarted process resumes where the last one acknowledged.
    /// let mut promoter = tree.subscribe_durable(SubscribeRequest::durable("promoter")).await?;
    /// // Or: every instance of the engine joins the group and gets a share of the partitions.
    /// let _shared = tree.subscribe_durable(DurableRequest::group("promoter-group")).await?;
    /// while let Some(event) = promoter.next().await {
    ///     let event = event?;
    ///     // ... promote the children of event.execution_id ...
    ///     promoter.ack(&event.cursor).await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// A name or member id of more than 64 characters or with a control character, or an
    /// unknown backend ([`EngineError::Validation`]); a dead tree. While the backend is down
    /// the subscription is accepted and starts once the backend answers; errors the member
    /// cannot retry (a backend without durable groups) end the stream.
    pub async fn subscribe_durable(&self, request: DurableRequest) -> Result<DurableSubscription, EngineError> {
        let backend = request.backend.clone();
        let source = self
            .actor
            .call(|reply| SupervisorMsg::Source(backend, reply), Some(CALL_TIMEOUT))
            .await
            .map_err(|e| actor_error("subscribe durably", e))?
            .success_or(actor_error("subscribe durably", "no reply"))??;
        crate::durable::member::start(self.clone(), request, source.0, self.subscriber_buffer)
    }

    /// Subscribes an actor: each event is cast to it as `M::from(event)`. Its mailbox is
    /// unbounded, so a slow actor holds its backlog in memory.
    ///
    /// ```no_run
    /// use ff_completions::{CompletionEvent, CompletionSupervisorHandle, SubscribeRequest};
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
    /// let id = tree.subscribe_actor(SubscribeRequest::tail().with_name("promoter"), promoter).await?;
    /// # drop(id); Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Self::subscribe`].
    pub async fn subscribe_actor<M>(
        &self,
        request: SubscribeRequest,
        actor: ActorRef<M>,
    ) -> Result<SubscriberId, EngineError>
    where
        M: ractor::Message + From<CompletionEvent>,
    {
        self.add_subscriber(request, Sink::actor(actor)).await
    }

    /// Subscribes to lease history: each lease change matching `filter`, in order, once each,
    /// from the request's start (tail, or after a lease-history cursor). The request's
    /// backend and name apply; its completion filter must be empty. The events come through
    /// the same listener as completions (one notification connection per backend).
    ///
    /// # Errors
    /// As [`Self::subscribe`]; a cursor of another family, or a completion filter, is
    /// [`EngineError::Validation`].
    pub async fn subscribe_lease_history(
        &self,
        request: SubscribeRequest,
        filter: LeaseHistoryFilter,
    ) -> Result<Subscription<LeaseHistoryEvent>, EngineError> {
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        let id = self.add_subscriber(request, Sink::LeaseHistory(Box::new(filter), FamilySink::Channel(tx))).await?;
        Ok(Subscription { id, inner: ReceiverStream::new(rx), supervisor: self.actor.clone() })
    }

    /// Subscribes an actor to lease history: each event is cast to it as `M::from(event)`.
    ///
    /// # Errors
    /// As [`Self::subscribe_lease_history`].
    pub async fn subscribe_lease_history_actor<M>(
        &self,
        request: SubscribeRequest,
        filter: LeaseHistoryFilter,
        actor: ActorRef<M>,
    ) -> Result<SubscriberId, EngineError>
    where
        M: ractor::Message + From<LeaseHistoryEvent>,
    {
        self.add_subscriber(request, Sink::LeaseHistory(Box::new(filter), FamilySink::actor(actor))).await
    }

    /// Subscribes to signal deliveries: each delivery matching `filter`, in order, once each,
    /// from the request's start (tail, or after a signal-delivery cursor), through the same
    /// listener as completions.
    ///
    /// # Errors
    /// As [`Self::subscribe_lease_history`].
    pub async fn subscribe_signal_delivery(
        &self,
        request: SubscribeRequest,
        filter: SignalDeliveryFilter,
    ) -> Result<Subscription<SignalDeliveryEvent>, EngineError> {
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        let id = self.add_subscriber(request, Sink::SignalDelivery(Box::new(filter), FamilySink::Channel(tx))).await?;
        Ok(Subscription { id, inner: ReceiverStream::new(rx), supervisor: self.actor.clone() })
    }

    /// Subscribes an actor to signal deliveries: each event is cast to it as `M::from(event)`.
    ///
    /// # Errors
    /// As [`Self::subscribe_lease_history`].
    pub async fn subscribe_signal_delivery_actor<M>(
        &self,
        request: SubscribeRequest,
        filter: SignalDeliveryFilter,
        actor: ActorRef<M>,
    ) -> Result<SubscriberId, EngineError>
    where
        M: ractor::Message + From<SignalDeliveryEvent>,
    {
        self.add_subscriber(request, Sink::SignalDelivery(Box::new(filter), FamilySink::actor(actor))).await
    }

    /// Instance tags have no producer on any backend yet.
    ///
    /// # Errors
    /// Always [`EngineError::Unavailable`].
    pub async fn subscribe_instance_tags(
        &self,
        _request: SubscribeRequest,
    ) -> Result<InstanceTagSubscription, EngineError> {
        Err(instance_tags_unavailable())
    }

    /// Subscribes any [`Sink`], a closure included (feature `testing`).
    ///
    /// # Errors
    /// As [`Self::subscribe`].
    #[cfg(feature = "testing")]
    pub async fn subscribe_sink(&self, request: SubscribeRequest, sink: Sink) -> Result<SubscriberId, EngineError> {
        self.add_subscriber(request, sink).await
    }

    /// Ends a subscription.
    pub fn unsubscribe(&self, id: SubscriberId) {
        let _ = self.actor.cast(SupervisorMsg::Unsubscribe(id));
    }

    /// A snapshot of every listener and subscriber.
    ///
    /// # Errors
    /// A dead tree.
    pub async fn stats(&self) -> Result<SupervisorStats, EngineError> {
        self.actor
            .call(SupervisorMsg::Stats, Some(CALL_TIMEOUT))
            .await
            .map_err(|e| actor_error("stats", e))?
            .success_or(actor_error("stats", "no reply"))
    }

    /// The listener actor of a backend, if running, for fault injection (feature `testing`).
    #[cfg(any(test, feature = "testing"))]
    pub async fn listener_cell(&self, backend: &str) -> Option<ActorCell> {
        self.child_cell(ChildKey::Listener(BackendId::from(backend))).await
    }

    /// The filter actor of a subscriber, if running, for fault injection (feature `testing`).
    #[cfg(any(test, feature = "testing"))]
    pub async fn filter_cell(&self, id: SubscriberId) -> Option<ActorCell> {
        self.child_cell(ChildKey::Filter(id)).await
    }

    #[cfg(any(test, feature = "testing"))]
    async fn child_cell(&self, key: ChildKey) -> Option<ActorCell> {
        self.actor.call(|r| SupervisorMsg::ChildCell(key, r), Some(CALL_TIMEOUT)).await.ok()?.success_or(()).ok()?
    }

    /// Stops the tree and waits for every actor to exit. Subscriptions end.
    pub async fn shutdown(&self) {
        let _ = self.actor.stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(10))).await;
    }
}

fn instance_tags_unavailable() -> EngineError {
    EngineError::unavailable("subscribe instance tags", "no backend produces instance tag events yet")
}

/// A live subscription: a `Stream` of events of one family (completions by default) that
/// unsubscribes when dropped.
#[derive(Debug)]
pub struct Subscription<E = CompletionEvent> {
    id: SubscriberId,
    inner: ReceiverStream<Result<E, EngineError>>,
    supervisor: ActorRef<SupervisorMsg>,
}

impl<E: Send + 'static> Subscription<E> {
    /// This subscription's id in its supervisor.
    pub fn id(&self) -> SubscriberId {
        self.id
    }

    /// Boxes it as the seed's subscription type of its family ([`crate::CompletionSubscription`],
    /// [`LeaseHistorySubscription`], [`SignalDeliverySubscription`]).
    pub fn boxed(self) -> Pin<Box<dyn Stream<Item = Result<E, EngineError>> + Send>> {
        Box::pin(self)
    }
}

impl<E> Stream for Subscription<E> {
    type Item = Result<E, EngineError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl<E> Drop for Subscription<E> {
    fn drop(&mut self) {
        let _ = self.supervisor.cast(SupervisorMsg::Unsubscribe(self.id));
    }
}

#[async_trait]
impl CompletionBackend for CompletionSupervisorHandle {
    async fn subscribe_completions(&self) -> Result<CompletionStream, EngineError> {
        self.subscribe_completions_filtered(&ScannerFilter::NOOP).await
    }

    async fn subscribe_completions_filtered(&self, filter: &ScannerFilter) -> Result<CompletionStream, EngineError> {
        let sub = self.subscribe(SubscribeRequest::tail().with_filter(filter.clone())).await?;
        let payloads = sub
            .take_while(|item| futures::future::ready(item.is_ok()))
            .filter_map(|item| async move { item.ok().map(|event| event.to_payload()) });
        Ok(Box::pin(payloads))
    }

    async fn subscribe_lease_history(
        &self,
        from: StreamCursor,
        filter: &LeaseHistoryFilter,
    ) -> Result<LeaseHistorySubscription, EngineError> {
        Ok(CompletionSupervisorHandle::subscribe_lease_history(
            self,
            SubscribeRequest::from_cursor(from),
            filter.clone(),
        )
        .await?
        .boxed())
    }

    async fn subscribe_signal_delivery(
        &self,
        from: StreamCursor,
        filter: &SignalDeliveryFilter,
    ) -> Result<SignalDeliverySubscription, EngineError> {
        Ok(CompletionSupervisorHandle::subscribe_signal_delivery(
            self,
            SubscribeRequest::from_cursor(from),
            filter.clone(),
        )
        .await?
        .boxed())
    }

    async fn subscribe_instance_tags(&self, _from: StreamCursor) -> Result<InstanceTagSubscription, EngineError> {
        Err(instance_tags_unavailable())
    }
}

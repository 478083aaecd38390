//! Adding and removing subscribers: each one is a filter actor with a slot that outlives it.
//! Nothing here waits for a backend: the new filter resolves where its subscription starts and
//! answers the subscriber itself.

use std::sync::Arc;

use ractor::{Actor, ActorRef};

use super::restart::RestartPolicy;
use super::{Child, NewSubscriber, SubscriberSlot, SupervisorMsg, SupervisorState};
use crate::actors::awaits::AwaitHub;
use crate::actors::filter::{Filter, FilterArguments, SUBSCRIBER_GONE, SubscribeReply};
use crate::actors::ids::{BackendId, SubscriberId};
use crate::actors::shared::SubscriberShared;
use crate::backends::lazy::LazySource;
use crate::backoff::Backoff;
use crate::error::Error;

impl SupervisorState {
    /// Adds a subscriber and starts its filter, which replies once it knows where the
    /// subscription starts (or that the backend cannot tell yet).
    pub(super) async fn subscribe(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        subscriber: NewSubscriber,
        reply: SubscribeReply,
    ) {
        let NewSubscriber { backend, from, name, sink, tail_wait } = subscriber;
        let backend = match check_name(name.as_deref()).and_then(|()| self.backend_named(backend)) {
            Ok(backend) => backend,
            Err(err) => {
                let _ = reply.send(Err(err));
                return;
            }
        };
        // A cursor of another family is refused here, before any backend is asked.
        let from = match sink.family().untag_cursor(&from) {
            Ok(from) => from,
            Err(err) => {
                let _ = reply.send(Err(err));
                return;
            }
        };
        let Some(slot) = self.listeners.get(&backend) else { return };
        // A tail subscription falls back to the listener's cursor while the backend is down.
        let fallback = if from.is_empty() { slot.shared.cursor() } else { None };
        let id = SubscriberId(self.next_subscriber);
        self.next_subscriber += 1;
        let policy = RestartPolicy::new(Backoff::from_retry(&slot.retry), self.config.restart_intensity);
        self.subscribers.insert(
            id,
            SubscriberSlot {
                backend,
                name,
                sink,
                shared: Arc::new(SubscriberShared::new(from, fallback).with_tail_wait(tail_wait)),
                policy,
                actor: None,
                restarts: 0,
            },
        );
        self.start_filter(myself, id, Some(reply)).await;
    }

    /// The backend named `name` (or the only one), connected on first use, for a durable
    /// subscription's group store.
    pub(super) fn backend(&self, name: Option<BackendId>) -> Result<Arc<LazySource>, Error> {
        let id = self.backend_named(name)?;
        self.listeners
            .get(&id)
            .map(|slot| slot.source.clone())
            .ok_or_else(|| Error::validation(format!("no backend named {id}")))
    }

    /// The hub of the awaits on the backend named `name` (or the only one), and its name.
    pub(super) fn awaits(&self, name: Option<BackendId>) -> Result<(BackendId, Arc<AwaitHub>), Error> {
        let id = self.backend_named(name)?;
        self.listeners
            .get(&id)
            .map(|slot| (id.clone(), slot.awaits.clone()))
            .ok_or_else(|| Error::validation(format!("no backend named {id}")))
    }

    /// The named backend, or the only one configured. A tree with several backends refuses a
    /// request that names none (it would otherwise pick one silently).
    pub(super) fn backend_named(&self, name: Option<BackendId>) -> Result<BackendId, Error> {
        let backend = match name {
            Some(name) => name,
            None => match self.order.as_slice() {
                [only] => only.clone(),
                [] => return Err(Error::validation("no backend configured")),
                several => {
                    let names: Vec<&str> = several.iter().map(BackendId::as_str).collect();
                    return Err(Error::validation(format!(
                        "this tree has {} backends ({}); name one with the request's on_backend",
                        names.len(),
                        names.join(", ")
                    )));
                }
            },
        };
        if !self.listeners.contains_key(&backend) {
            return Err(Error::validation(format!("no backend named {backend:?}")));
        }
        Ok(backend)
    }

    /// Starts a subscriber's filter (again, after a restart: `reply` is then `None`).
    pub(super) async fn start_filter(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: SubscriberId,
        reply: Option<SubscribeReply>,
    ) {
        let Some(sub) = self.subscribers.get_mut(&id) else { return };
        let Some(listener) = self.listeners.get(&sub.backend) else { return };
        if sub.actor.is_some() {
            return;
        }
        let args = FilterArguments {
            subscriber_id: id,
            source: listener.source.clone(),
            sink: sub.sink.clone(),
            shared: sub.shared.clone(),
            listener: listener.shared.clone(),
            backend_id: sub.backend.clone(),
            name: sub.name.clone(),
            batch_size: self.config.batch_size,
            retry: listener.retry.clone(),
            reply,
        };
        match Actor::spawn_linked(None, Filter, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.children.insert(actor.get_id(), Child::Filter(id));
                listener.fanout.insert(id, actor.clone());
                sub.actor = Some(actor);
            }
            Err(err) => {
                // The reply port went down with the arguments: the subscriber's call fails.
                tracing::error!(subscriber = %id, error = %err, "filter failed to spawn; dropping the subscription");
                self.unsubscribe(id);
            }
        }
    }

    pub(super) fn unsubscribe(&mut self, id: SubscriberId) {
        let Some(sub) = self.subscribers.remove(&id) else { return };
        if let Some(listener) = self.listeners.get(&sub.backend) {
            listener.fanout.remove(id);
        }
        if let Some(actor) = sub.actor {
            self.children.remove(&actor.get_id());
            actor.stop(Some(SUBSCRIBER_GONE.into()));
        }
    }
}

/// A subscriber name is a metrics label value: short, not empty, no control characters (the
/// rule of group names).
fn check_name(name: Option<&str>) -> Result<(), Error> {
    name.map_or(Ok(()), |name| crate::types::check_name("subscriber name", name))
}

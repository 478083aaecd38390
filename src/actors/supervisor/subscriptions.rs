//! Adding and removing subscribers: each one is a filter actor with a slot that outlives it.

use std::sync::Arc;

use ractor::{Actor, ActorRef};

use super::restart::RestartPolicy;
use super::{Child, SUBSCRIBER_GONE, SubscribeRequest, SubscriberSlot, SupervisorMsg, SupervisorState};
use crate::actors::filter::{Filter, FilterArguments};
use crate::actors::{Sink, SubscriberId, SubscriberShared};
use crate::backends::StartAt;
use crate::backoff::Backoff;
use crate::error::EngineError;

impl SupervisorState {
    pub(super) async fn subscribe(
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
        let policy = RestartPolicy::new(Backoff::from_retry(&slot.retry), self.config.restart_intensity);
        self.subscribers.insert(
            id,
            SubscriberSlot {
                backend,
                filter: request.filter,
                sink,
                shared: Arc::new(SubscriberShared::new(start, read_at_start)),
                policy,
                actor: None,
                restarts: 0,
            },
        );
        self.start_filter(myself, id).await;
        Ok(id)
    }

    pub(super) async fn start_filter(&mut self, myself: &ActorRef<SupervisorMsg>, id: SubscriberId) {
        let Some(sub) = self.subscribers.get_mut(&id) else { return };
        let Some(listener) = self.listeners.get(&sub.backend) else { return };
        if sub.actor.is_some() {
            return;
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
            retry: listener.retry.clone(),
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

    pub(super) fn unsubscribe(&mut self, id: SubscriberId) {
        let Some(sub) = self.subscribers.remove(&id) else { return };
        if let Some(listener) = self.listeners.get(&sub.backend) {
            listener.shared.filters.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
        if let Some(actor) = sub.actor {
            self.children.remove(&actor.get_id());
            actor.stop(Some(SUBSCRIBER_GONE.into()));
        }
    }
}

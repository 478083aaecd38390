//! What the supervisor reports: stats of every child, and a child's cell. Both answer from
//! state in memory, never from the backend, so they answer at once during an outage.

use std::sync::atomic::Ordering;

use ractor::ActorCell;

use super::{ChildKey, SupervisorState};
use crate::actors::stats::{ListenerState, ListenerStats, SubscriberStats, SupervisorStats};
use crate::backends::CompletionSource;
use crate::cursor::StreamCursor;

impl SupervisorState {
    pub(super) fn stats(&self) -> SupervisorStats {
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
                    cursor: shared.cursor().map(|p| slot.source.cursor_of(&p)),
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
                    name: sub.name.clone(),
                    // Empty (the tail) until the filter knows where the subscription starts; in
                    // the subscriber's family.
                    cursor: shared.start().map_or_else(StreamCursor::empty, |_| {
                        sub.sink.family().tag_cursor(source.cursor_of(&shared.delivered()))
                    }),
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

    pub(super) fn child_cell(&self, key: &ChildKey) -> Option<ActorCell> {
        match key {
            ChildKey::Listener(id) => self.listeners.get(id)?.actor.as_ref().map(|a| a.get_cell()),
            ChildKey::Filter(id) => self.subscribers.get(id)?.actor.as_ref().map(|a| a.get_cell()),
        }
    }
}

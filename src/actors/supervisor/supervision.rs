//! Starting children and judging their exits: every restart decision goes through the child's
//! [`RestartPolicy`](super::restart::RestartPolicy).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};

use super::restart::{Exit, Verdict};
use super::{Child, Command, SupervisorMsg, SupervisorState};
use crate::actors::filter::{SUBSCRIBER_GONE, SUBSCRIPTION_FAILED};
use crate::actors::ids::{BackendId, SubscriberId};
use crate::actors::listener::{Listener, ListenerArguments};
use crate::error::Error;

impl SupervisorState {
    pub(super) async fn start_listener(&mut self, myself: &ActorRef<SupervisorMsg>, id: &BackendId) {
        let Some(slot) = self.listeners.get_mut(id) else { return };
        if slot.actor.is_some() {
            return;
        }
        let args = ListenerArguments {
            backend_id: id.clone(),
            source: slot.source.clone(),
            shared: slot.shared.clone(),
            fanout: slot.fanout.clone(),
            tick: self.config.tick,
            held_back_repoll: self.config.held_back_repoll,
            batch_size: self.config.batch_size,
        };
        slot.shared.became_live.store(false, Ordering::Relaxed);
        match Actor::spawn_linked(None, Listener, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.children.insert(actor.get_id(), Child::Listener(id.clone()));
                slot.actor = Some(actor);
            }
            Err(err) => {
                slot.shared.mark_down();
                let reason = format!("failed to spawn: {err}");
                // A listener's start does no I/O: a failure here is a crash.
                if let Err(err) = self.restart_listener(myself, id, &reason, true) {
                    tracing::error!(backend = %id, error = %err, "listener cannot be started");
                }
            }
        }
    }

    /// Judges a listener's exit and schedules its restart (at once after a healthy life). The
    /// first failure of an outage is logged at `warn`, the ones after it at `debug`, until the
    /// listener is live again.
    ///
    /// # Errors
    /// A crash loop beyond the restart intensity.
    fn restart_listener(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: &BackendId,
        reason: &str,
        crash: bool,
    ) -> Result<(), Error> {
        let Some(slot) = self.listeners.get_mut(id) else { return Ok(()) };
        let was_live = slot.shared.became_live.swap(false, Ordering::Relaxed);
        let delay = match slot.policy.on_exit(Exit { was_live, crash }, Instant::now()) {
            Verdict::Restart(delay) => delay,
            Verdict::Escalate(why) => {
                tracing::error!(backend = %id, %why, "listener crash loop; escalating");
                return Err(Error::Actor { detail: format!("listener {id} {why}") });
            }
        };
        slot.last_delay = Some(delay);
        slot.shared.restarts.fetch_add(1, Ordering::Relaxed);
        crate::metrics::listener_restarted(id.as_str());
        let first_of_outage = slot.shared.outage_restarts.fetch_add(1, Ordering::Relaxed) == 0;
        let attempt = slot.policy.failures();
        if first_of_outage {
            tracing::warn!(backend = %id, reason, ?delay, "listener exited; restarting it until it is live again");
        } else {
            tracing::debug!(backend = %id, reason, attempt, ?delay, "listener exited again; restarting");
        }
        schedule(myself, delay, Command::RestartListener(id.clone()));
        Ok(())
    }

    /// Judges a filter's exit and schedules its restart from its subscriber's delivered cursor.
    ///
    /// # Errors
    /// A crash loop beyond the restart intensity.
    fn restart_filter(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: SubscriberId,
        reason: &str,
        crash: bool,
    ) -> Result<(), Error> {
        let Some(sub) = self.subscribers.get_mut(&id) else { return Ok(()) };
        sub.actor = None;
        let was_live = sub.shared.healthy.swap(false, Ordering::Relaxed);
        match sub.policy.on_exit(Exit { was_live, crash }, Instant::now()) {
            Verdict::Restart(delay) => {
                sub.restarts += 1;
                tracing::warn!(subscriber = %id, reason, ?delay, "filter exited; restarting from its cursor");
                schedule(myself, delay, Command::RestartFilter(id));
                Ok(())
            }
            Verdict::Escalate(why) => {
                tracing::error!(subscriber = %id, %why, "filter crash loop; escalating");
                Err(Error::Actor { detail: format!("filter of {id} {why}") })
            }
        }
    }

    pub(super) fn on_child_exit(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        cell: &ActorCell,
        reason: Option<String>,
        crash: bool,
    ) -> Result<(), ActorProcessingErr> {
        let why = reason.as_deref().unwrap_or("stopped");
        match self.children.remove(&cell.get_id()) {
            Some(Child::Listener(id)) => {
                if let Some(slot) = self.listeners.get_mut(&id) {
                    slot.actor = None;
                    slot.shared.mark_down();
                    if let Some(r) = &reason {
                        slot.shared.set_error(Some(r.clone()));
                    }
                }
                self.restart_listener(myself, &id, why, crash)?;
            }
            Some(Child::Filter(sub)) => {
                if why == SUBSCRIBER_GONE || why == SUBSCRIPTION_FAILED {
                    self.unsubscribe(sub);
                } else {
                    self.restart_filter(myself, sub, why, crash)?;
                }
            }
            None => {}
        }
        Ok(())
    }
}

/// Sends `command` to the supervisor itself, at once or after `delay`.
fn schedule(myself: &ActorRef<SupervisorMsg>, delay: Duration, command: Command) {
    if delay.is_zero() {
        let _ = myself.cast(command.into());
    } else {
        myself.send_after(delay, move || command.into());
    }
}

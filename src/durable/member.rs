//! A member's two tasks. The heartbeat task renews the member's leases every third of their
//! ttl, learns which partitions it holds, moves the positions of partitions whose events it
//! does not receive up to where its read has got, writes the acknowledgements made after
//! delivery, and hands out parked events an operator asked to replay; it never waits on the
//! consumer, so a slow consumer does not lose its leases. The delivery task reads the tree from
//! the held partitions' positions and hands over the events the ledger admits; when partitions
//! are gained (or a refused event is to be read again) it reads again from theirs. A read the
//! backend refuses (history trimmed away, or lost) stalls the partitions it concerns and goes on
//! with the others: nothing ends the member but the consumer, a newer process under its member
//! id, or an error it cannot retry.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::request::DurableRequest;
use super::subscription::{DurableSubscription, Shared, Stalled};
use crate::actors::handle::{CompletionSupervisorHandle, Subscribe, Subscription, sealed};
use crate::actors::request::Completions;
use crate::actors::sink::Passed;
use crate::backends::CompletionSource;
use crate::backends::groups::{Heartbeat, Lease, Sharing, check_heartbeat, event_of};
use crate::backends::lazy::LazySource;
use crate::cursor::{Frontier, decode_event_frontier};
use crate::error::Error;
use crate::event::CompletionEvent;

/// Admitted events, each with its admission (see [`super::ledger::Ledger::is_current`]).
pub(crate) type Out = mpsc::Sender<Result<(CompletionEvent, u64), Error>>;

/// The member id of an exclusive subscription that names none: every process subscribing
/// under the name is the same member, so a new one takes over at once.
const EXCLUSIVE_MEMBER: &str = "exclusive";

/// How soon a member looks again at a lease that lapsed without being taken.
const LAPSED_RETRY: Duration = Duration::from_millis(100);

/// How long a task waits before trying the backend again.
const RETRY: Duration = Duration::from_millis(200);

impl sealed::Sealed for DurableRequest {}

/// Subscribes durably: completions of the partitions this member holds, from the positions
/// the backend stores under the request's name, in order per partition; the consumer
/// acknowledges them ([`DurableSubscription::ack`], a [`crate::AckTicket`] in its own
/// transaction, or after delivery), or refuses them ([`DurableSubscription::nack`]). While the
/// backend is down the subscription is accepted and starts once the backend answers; errors
/// the member cannot retry (a backend without durable groups, a newer process under its
/// member id) end the stream.
impl Subscribe for DurableRequest {
    type Subscription = DurableSubscription;

    async fn subscribe_on(self, tree: &CompletionSupervisorHandle) -> Result<DurableSubscription, Error> {
        let backend = tree.backend(self.backend.clone()).await?;
        start(tree.clone(), self, backend)
    }
}

/// Starts a member of `request`'s group on `backend`, reading through `tree`.
fn start(
    tree: CompletionSupervisorHandle,
    request: DurableRequest,
    backend: Arc<LazySource>,
) -> Result<DurableSubscription, Error> {
    let member = match (&request.member, request.sharing) {
        (Some(member), _) => member.clone(),
        (None, Sharing::Exclusive) => EXCLUSIVE_MEMBER.to_owned(),
        (None, Sharing::Shared) => uuid::Uuid::new_v4().to_string(),
    };
    let incarnation = uuid::Uuid::new_v4().simple().to_string();
    // Every heartbeat's checks (names, lease ttl), before anything runs: bad input is refused
    // here rather than ending the stream at the first heartbeat.
    let no_start = Frontier::default();
    check_heartbeat(&Heartbeat {
        group: &request.name,
        member: &member,
        incarnation: &incarnation,
        ttl: request.lease_ttl,
        sharing: request.sharing,
        rejoin: true,
        start: &no_start,
        unacked: &[],
    })?;
    let source: Arc<dyn CompletionSource> = backend.clone();
    let (plan_tx, plan_rx) = watch::channel(0u64);
    let shared = Arc::new(Shared::new(&request, member, incarnation, source, backend, plan_tx));
    let (tx, rx) = mpsc::channel(tree.subscriber_buffer());
    let stop = CancellationToken::new();
    tokio::spawn(heartbeats(shared.clone(), request.clone(), tx.clone(), stop.clone()));
    tokio::spawn(delivery(shared.clone(), tree, request.clone(), plan_rx, tx, stop.clone()));
    Ok(DurableSubscription {
        shared,
        events: rx,
        ack_after_delivery: request.ack_after_delivery,
        handed_out: None,
        stop,
    })
}

/// Notes how far the current read has got (every event up to there was taken).
fn catch_up_progress(shared: &Shared) {
    if let Some((generation, passed)) = shared.reading()
        && let Some(through) = passed.through()
    {
        shared.ledger().set_progress(generation, through);
    }
}

/// Moves held partitions with nothing unacknowledged up to where the read has got (see
/// [`super::ledger::Ledger::watermark_acks`]).
async fn write_watermarks(shared: &Shared) {
    catch_up_progress(shared);
    let acks = shared.ledger().watermark_acks();
    if acks.is_empty() {
        return;
    }
    // Not counted as acknowledgements of events: no event is acknowledged by them.
    match shared.groups.ack(&shared.group, &shared.member, &acks).await {
        Ok(()) => shared.ledger().acked(&acks),
        Err(err) => {
            tracing::debug!(group = %shared.group, member = %shared.member, %err, "idle partitions not moved up")
        }
    }
}

/// Writes the acknowledgements made after delivery; those that failed for a reason that
/// passes are tried again at the next flush.
async fn flush_acks(shared: &Shared) {
    let cursors = shared.take_auto_acks();
    if cursors.is_empty() {
        return;
    }
    let (acks, parked) = shared.ledger().acks_for(&cursors);
    let written = match shared.write_acks(acks).await {
        Ok(()) => shared.write_settles(parked).await,
        Err(err) => Err(err),
    };
    match written {
        Ok(()) => {}
        Err(err) if err.is_transient() => {
            tracing::debug!(group = %shared.group, member = %shared.member, %err, "acknowledgements after delivery not written yet; retrying");
            shared.requeue_auto_acks(cursors);
        }
        Err(err) => {
            tracing::warn!(group = %shared.group, member = %shared.member, %err, "acknowledgements after delivery not written")
        }
    }
}

async fn heartbeats(shared: Arc<Shared>, request: DurableRequest, out: Out, stop: CancellationToken) {
    let interval = request.lease_ttl / 3;
    let mut rejoin = true;
    let mut superseded = false;
    let mut start: Option<Frontier> = None;
    let mut next_beat = Instant::now();
    let mut flush = tokio::time::interval(DurableRequest::ACK_FLUSH_INTERVAL);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(next_beat) => {
                flush_acks(&shared).await;
                // Before the heartbeat: a partition it frees leaves with a fresh position.
                if !rejoin {
                    write_watermarks(&shared).await;
                }
                next_beat = Instant::now() + interval;
                // Bounded: a heartbeat that hangs is a retry, not a lost lease.
                let beaten = tokio::time::timeout(interval, beat(&shared, &request, rejoin, &mut start)).await;
                match beaten.unwrap_or(Err(Error::Timeout { op: "durable group heartbeat" })) {
                    Ok(leases) => {
                        rejoin = false;
                        hand_out_replays(&shared, &leases, &out).await;
                        if request.sharing == Sharing::Shared
                            && let Some(at) = next_lapse(&shared).await
                        {
                            next_beat = next_beat.min(at);
                        }
                    }
                    Err(err) if err.is_transient() => {
                        tracing::warn!(group = %shared.group, member = %shared.member, %err, "heartbeat failed; retrying");
                        next_beat = Instant::now() + RETRY.min(interval);
                    }
                    Err(err) => {
                        // Superseded: the partitions are the newer incarnation's now.
                        superseded = matches!(err, Error::Fenced { .. });
                        let _ = out.send(Err(err)).await;
                        break;
                    }
                }
            }
            _ = flush.tick(), if request.ack_after_delivery => flush_acks(&shared).await,
        }
    }
    stop.cancel();
    if superseded {
        return;
    }
    flush_acks(&shared).await;
    write_watermarks(&shared).await;
    if let Err(err) = shared.groups.leave(&shared.group, &shared.member, &shared.incarnation).await {
        tracing::debug!(group = %shared.group, member = %shared.member, %err, "leaving the group failed; its leases expire");
    }
}

/// When the next lease held by another member runs out (plus a margin), if before the next
/// regular heartbeat: a heartbeat then takes a dead member's partitions over at once rather
/// than up to a third of the ttl later.
async fn next_lapse(shared: &Shared) -> Option<Instant> {
    /// After the lease's expiry: the backend's clock decides, ours may run a little ahead.
    const MARGIN: Duration = Duration::from_millis(20);
    let view = match shared.groups.view(&shared.group).await {
        Ok(view) => view?,
        Err(err) => {
            tracing::debug!(group = %shared.group, %err, "reading the group failed");
            return None;
        }
    };
    let now = crate::types::TimestampMs::now();
    let soonest = view
        .partitions
        .iter()
        .filter_map(|p| p.owner.as_ref())
        .filter(|(owner, _)| *owner != shared.member)
        .map(|(_, at)| *at)
        .min()?;
    // A lease that already lapsed and is not taken yet (it ran out just before this heartbeat,
    // or a paused transaction holds its row): look again soon, not in a loop.
    let wait = match soonest.0.saturating_sub(now.0) {
        left if left > 0 => Duration::from_millis(left as u64) + MARGIN,
        _ => LAPSED_RETRY,
    };
    Some(Instant::now() + wait)
}

/// One heartbeat: the leases held afterwards. When partitions were gained, the delivery task
/// is told to read the tree again.
async fn beat(
    shared: &Shared,
    request: &DurableRequest,
    rejoin: bool,
    start: &mut Option<Frontier>,
) -> Result<Vec<Lease>, Error> {
    let start = match start {
        Some(start) => start,
        None => start.insert(shared.source.tail().await?),
    };
    let unacked = shared.ledger().unacked();
    let heartbeat = Heartbeat {
        group: &shared.group,
        member: &shared.member,
        incarnation: &shared.incarnation,
        ttl: request.lease_ttl,
        sharing: request.sharing,
        rejoin,
        start,
        unacked: &unacked,
    };
    let leases = shared.groups.heartbeat(&heartbeat).await?;
    let lanes_are_partitions = shared.source.lanes_are_partitions();
    let mut ledger = shared.ledger();
    ledger.set_lanes_are_partitions(lanes_are_partitions);
    let change = ledger.apply(&leases);
    let stats = ledger.stats();
    let generation = ledger.generation();
    drop(ledger);
    let unacked = stats.iter().map(|h| h.unacked).sum();
    let oldest = stats.iter().filter_map(|h| h.oldest_unacked).min();
    let stalled = stats.iter().filter(|h| h.stalled.is_some()).count();
    let parked = leases.iter().map(|l| u64::from(l.parked)).sum();
    crate::metrics::group_held(&shared.group, stats.len(), unacked, oldest, stalled, parked);
    if change.gained + change.lost > 0 {
        crate::metrics::group_rebalanced(&shared.group);
        tracing::info!(group = %shared.group, member = %shared.member, held = leases.len(), gained = change.gained, lost = change.lost, "partitions moved");
        tracing::debug!(group = %shared.group, member = %shared.member, partitions = ?leases.iter().map(|l| (l.partition, l.token, l.acked.hi, l.acked.lo)).collect::<Vec<_>>(), "partitions held");
    }
    if change.gained > 0 {
        shared.plan.send_replace(generation);
    }
    Ok(leases)
}

/// Hands out the parked events an operator asked to replay, of the partitions held, as room
/// in the subscriber's buffer allows (never waiting for it: the rest at the next heartbeat).
async fn hand_out_replays(shared: &Shared, leases: &[Lease], out: &Out) {
    if leases.iter().all(|l| l.replays == 0) {
        return;
    }
    let parked = match shared.groups.parked(&shared.group).await {
        Ok(parked) => parked,
        Err(err) => {
            tracing::debug!(group = %shared.group, %err, "reading the parked events failed");
            return;
        }
    };
    for p in parked.into_iter().filter(|p| p.replay && leases.iter().any(|l| l.partition == p.partition)) {
        let event = match event_of(&p.event) {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(group = %shared.group, partition = p.partition, %err, "a parked event cannot be replayed");
                continue;
            }
        };
        let Ok(permit) = out.try_reserve() else { return };
        if let Some(admission) = shared.ledger().admit_replay(&event, p.partition, p.position) {
            permit.send(Ok((event, admission)));
        }
    }
}

async fn delivery(
    shared: Arc<Shared>,
    tree: CompletionSupervisorHandle,
    request: DurableRequest,
    mut plan: watch::Receiver<u64>,
    out: Out,
    stop: CancellationToken,
) {
    let mut reading: Option<(Subscription, u64, Arc<Passed>)> = None;
    loop {
        let read_again_now = tokio::select! {
            () = stop.cancelled() => break,
            changed = plan.changed() => {
                if changed.is_err() {
                    break;
                }
                plan.borrow_and_update();
                true
            }
            item = next(&mut reading) => match item {
                Some((Ok(mut event), generation, passed)) => {
                    let admitted = shared.ledger().admit(&mut event, generation);
                    passed.took();
                    match admitted {
                        Ok(Some(admission)) => {
                            tracing::trace!(group = %shared.group, member = %shared.member, generation, execution = %event.execution_id, "admitted");
                            if out.send(Ok((event, admission))).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => {
                            tracing::trace!(group = %shared.group, member = %shared.member, generation, execution = %event.execution_id, "not admitted");
                        }
                        Err(err) => tracing::warn!(group = %shared.group, %err, "event skipped: its cursor names no position"),
                    }
                    false
                }
                // History the read needs is gone: read again, which stalls what cannot go on.
                Some((Err(Error::CursorExpired { .. } | Error::CursorHistoryLost { .. }), _, _)) => {
                    catch_up_progress(&shared);
                    true
                }
                Some((Err(err), _, _)) => {
                    let _ = out.send(Err(err)).await;
                    break;
                }
                None => break,
            },
        };
        if read_again_now {
            catch_up_progress(&shared);
            reading = None;
            shared.set_reading(None);
            match read_again(&shared, &tree, &request, &stop).await {
                Ok(Some((subscription, generation, passed))) => {
                    tracing::debug!(group = %shared.group, member = %shared.member, generation, "reading the tree again");
                    shared.set_reading(Some((generation, passed.clone())));
                    reading = Some((subscription, generation, passed));
                }
                Ok(None) => {}
                Err(err) => {
                    let _ = out.send(Err(err)).await;
                    break;
                }
            }
        }
    }
    stop.cancel();
}

/// The next item of the current read, with its generation and progress (pending forever
/// without a read).
async fn next(
    reading: &mut Option<(Subscription, u64, Arc<Passed>)>,
) -> Option<(Result<CompletionEvent, Error>, u64, Arc<Passed>)> {
    match reading {
        Some((subscription, generation, passed)) => {
            let (generation, passed) = (*generation, passed.clone());
            subscription.next().await.map(|item| (item, generation, passed))
        }
        None => std::future::pending().await,
    }
}

/// Subscribes to the tree from the held partitions' positions (`None` when none is to be
/// read). A start the backend refuses (expired, or of a lost history) stalls the partitions
/// it concerns, and the read starts from the others'.
async fn read_again(
    shared: &Shared,
    tree: &CompletionSupervisorHandle,
    request: &DurableRequest,
    stop: &CancellationToken,
) -> Result<Option<(Subscription, u64, Arc<Passed>)>, Error> {
    loop {
        // Lanes of partitions not read start at the tail (their events are not wanted).
        let tail = if shared.source.lanes_are_partitions() {
            match shared.source.tail().await {
                Ok(tail) => tail,
                Err(err) if err.is_transient() && !stop.is_cancelled() => {
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                Err(err) => return Err(err),
            }
        } else {
            Frontier::default()
        };
        let (from, generation) = {
            let ledger = shared.ledger();
            (ledger.read_from(&tail), ledger.generation())
        };
        let Some(from) = from else { return Ok(None) };
        let mut subscribe =
            Completions::from_cursor(shared.source.cursor_of(&from)).with_filter(request.filter.clone());
        if let Some(backend) = &request.backend {
            subscribe = subscribe.on_backend(backend.clone());
        }
        let why = match tree.subscribe_passed(subscribe).await {
            Ok((subscription, passed)) => return Ok(Some((subscription, generation, passed))),
            Err(Error::CursorExpired { oldest }) => {
                let floor = oldest.as_ref().and_then(|c| decode_event_frontier(c).ok().flatten());
                (Stalled::Expired { oldest }, floor)
            }
            Err(Error::CursorHistoryLost { reason, .. }) => (Stalled::HistoryLost { reason }, None),
            Err(err) if err.is_transient() && !stop.is_cancelled() => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(err) => return Err(err),
        };
        let (why, floor) = why;
        let stalled = shared.ledger().stall(&from, floor.as_ref(), &why);
        if stalled.is_empty() {
            // Refused, yet no held partition is below what the backend keeps: look again soon.
            tokio::time::sleep(RETRY).await;
        } else {
            crate::metrics::group_stalled(&shared.group, stalled.len());
            tracing::error!(group = %shared.group, member = %shared.member, partitions = ?stalled, reason = %why, "partitions stalled: their positions name events the backend no longer has; move their positions (see GroupAdmin::move_positions) to go on");
        }
    }
}

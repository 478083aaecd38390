//! A member's two tasks. The heartbeat task renews the member's leases every third of their
//! ttl, learns which partitions it holds, and writes the acknowledgements made after
//! delivery; it never waits on the consumer, so a slow consumer does not lose its leases. The
//! delivery task reads the tree from the held partitions' positions and hands over the
//! events the ledger admits; when partitions are gained it reads again from theirs.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::request::DurableRequest;
use super::subscription::{DurableSubscription, Shared};
use crate::actors::handle::{CompletionSupervisorHandle, Subscribe, Subscription, sealed};
use crate::actors::request::Completions;
use crate::backends::CompletionSource;
use crate::backends::groups::{Heartbeat, Sharing, check_heartbeat};
use crate::backends::lazy::LazySource;
use crate::cursor::Frontier;
use crate::error::Error;
use crate::event::CompletionEvent;

/// Admitted events, each with the token of the lease it was admitted under.
type Out = mpsc::Sender<Result<(CompletionEvent, u64), Error>>;

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
/// transaction, or after delivery). While the backend is down the subscription is accepted
/// and starts once the backend answers; errors the member cannot retry (a backend without
/// durable groups, a newer process under an exclusive name) end the stream.
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
    // Every heartbeat's checks (names, lease ttl), before anything runs: bad input is refused
    // here rather than ending the stream at the first heartbeat.
    let no_start = Frontier::default();
    check_heartbeat(&Heartbeat {
        group: &request.name,
        member: &member,
        ttl: request.lease_ttl,
        sharing: request.sharing,
        rejoin: true,
        start: &no_start,
    })?;
    let source: Arc<dyn CompletionSource> = backend.clone();
    let shared = Arc::new(Shared::new(request.name.clone(), member, source, backend));
    let (tx, rx) = mpsc::channel(tree.subscriber_buffer());
    let stop = CancellationToken::new();
    let (plan_tx, plan_rx) = watch::channel(0u64);
    tokio::spawn(heartbeats(shared.clone(), request.clone(), plan_tx, tx.clone(), stop.clone()));
    tokio::spawn(delivery(shared.clone(), tree, request.clone(), plan_rx, tx, stop.clone()));
    Ok(DurableSubscription {
        shared,
        events: rx,
        ack_after_delivery: request.ack_after_delivery,
        handed_out: None,
        stop,
    })
}

/// Moves idle partitions up to where the read has got (see [`super::ledger::Ledger::watermark_acks`]).
async fn write_watermarks(shared: &Shared) {
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

/// Writes the acknowledgements made after delivery.
async fn flush_acks(shared: &Shared) {
    let cursors = shared.take_auto_acks();
    if cursors.is_empty() {
        return;
    }
    let acks = shared.ledger().acks_for(&cursors);
    if let Err(err) = shared.write_acks(acks).await {
        tracing::warn!(group = %shared.group, member = %shared.member, %err, "acknowledgements after delivery not written");
    }
}

async fn heartbeats(
    shared: Arc<Shared>,
    request: DurableRequest,
    plan: watch::Sender<u64>,
    out: Out,
    stop: CancellationToken,
) {
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
                next_beat = Instant::now() + interval;
                match beat(&shared, &request, rejoin, &mut start).await {
                    Ok(gained) => {
                        rejoin = false;
                        write_watermarks(&shared).await;
                        if let Some(generation) = gained {
                            plan.send_replace(generation);
                        }
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
    if let Err(err) = shared.groups.leave(&shared.group, &shared.member).await {
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

/// One heartbeat; `Some(generation)` when partitions were gained (the tree must be read again).
async fn beat(
    shared: &Shared,
    request: &DurableRequest,
    rejoin: bool,
    start: &mut Option<Frontier>,
) -> Result<Option<u64>, Error> {
    let start = match start {
        Some(start) => start,
        None => start.insert(shared.source.tail().await?),
    };
    let heartbeat = Heartbeat {
        group: &shared.group,
        member: &shared.member,
        ttl: request.lease_ttl,
        sharing: request.sharing,
        rejoin,
        start,
    };
    let leases = shared.groups.heartbeat(&heartbeat).await?;
    let lanes_are_partitions = shared.source.lanes_are_partitions();
    let mut ledger = shared.ledger();
    ledger.set_lanes_are_partitions(lanes_are_partitions);
    let change = ledger.apply(&leases);
    // Nobody else takes an exclusive subscription's partitions: new tokens on partitions it
    // kept mean a newer process subscribed under the name (its rejoin raised them).
    if !rejoin && request.sharing == Sharing::Exclusive && change.retokened > 0 {
        return Err(Error::Fenced {
            detail: format!("another process took the durable subscription {:?} over", shared.group),
        });
    }
    let stats = ledger.stats();
    drop(ledger);
    let unacked = stats.iter().map(|h| h.unacked).sum();
    let oldest = stats.iter().filter_map(|h| h.oldest_unacked).min();
    crate::metrics::group_held(&shared.group, stats.len(), unacked, oldest);
    if change.gained + change.lost > 0 {
        crate::metrics::group_rebalanced(&shared.group);
        tracing::info!(group = %shared.group, member = %shared.member, held = leases.len(), gained = change.gained, lost = change.lost, "partitions moved");
        tracing::debug!(group = %shared.group, member = %shared.member, partitions = ?leases.iter().map(|l| (l.partition, l.token, l.acked.hi, l.acked.lo)).collect::<Vec<_>>(), "partitions held");
    }
    Ok((change.gained > 0).then(|| shared.ledger().generation()))
}

async fn delivery(
    shared: Arc<Shared>,
    tree: CompletionSupervisorHandle,
    request: DurableRequest,
    mut plan: watch::Receiver<u64>,
    out: Out,
    stop: CancellationToken,
) {
    let mut reading: Option<(Subscription, u64)> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            changed = plan.changed() => {
                if changed.is_err() {
                    break;
                }
                let generation = *plan.borrow_and_update();
                reading = None;
                match read_again(&shared, &tree, &request, &stop).await {
                    Ok(Some(subscription)) => {
                        tracing::debug!(group = %shared.group, member = %shared.member, generation, "reading the tree again");
                        reading = Some((subscription, generation));
                    }
                    Ok(None) => {}
                    Err(err) => {
                        let _ = out.send(Err(err)).await;
                        break;
                    }
                }
            }
            item = next(&mut reading) => match item {
                Some(Ok((mut event, generation))) => {
                    let admitted = shared.ledger().admit(&mut event, generation);
                    match admitted {
                        Ok(Some(token)) => {
                            tracing::trace!(group = %shared.group, member = %shared.member, generation, execution = %event.execution_id, "admitted");
                            if out.send(Ok((event, token))).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => {
                            tracing::trace!(group = %shared.group, member = %shared.member, generation, execution = %event.execution_id, "not admitted");
                        }
                        Err(err) => tracing::warn!(group = %shared.group, %err, "event skipped: its cursor names no position"),
                    }
                }
                Some(Err(err)) => {
                    let _ = out.send(Err(err)).await;
                    break;
                }
                None => break,
            },
        }
    }
    stop.cancel();
}

/// The next event of the current read (pending forever without one).
async fn next(reading: &mut Option<(Subscription, u64)>) -> Option<Result<(CompletionEvent, u64), Error>> {
    match reading {
        Some((subscription, generation)) => {
            let generation = *generation;
            subscription.next().await.map(|item| item.map(|event| (event, generation)))
        }
        None => std::future::pending().await,
    }
}

/// Subscribes to the tree from the held partitions' positions (`None` when none is held).
async fn read_again(
    shared: &Shared,
    tree: &CompletionSupervisorHandle,
    request: &DurableRequest,
    stop: &CancellationToken,
) -> Result<Option<Subscription>, Error> {
    loop {
        // Lanes of partitions not held start at the tail (their events are not wanted).
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
        let Some(from) = shared.ledger().read_from(&tail) else { return Ok(None) };
        let mut subscribe =
            Completions::from_cursor(shared.source.cursor_of(&from)).with_filter(request.filter.clone());
        if let Some(backend) = &request.backend {
            subscribe = subscribe.on_backend(backend.clone());
        }
        return tree.subscribe(subscribe).await.map(Some);
    }
}

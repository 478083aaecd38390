//! What a durable subscriber gets: the [`DurableSubscription`] stream, [`AckTicket`]s to
//! acknowledge inside its own transaction, refusals ([`DurableSubscription::nack`]), and
//! [`GroupStats`].

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::ledger::{AckOf, Ledger};
use super::request::DurableRequest;
use crate::actors::sink::Passed;
use crate::backends::CompletionSource;
use crate::backends::groups::{Ack, AckConnection, GroupStore, Nack, Nacked, stored_event};
use crate::cursor::StreamCursor;
use crate::error::Error;
use crate::event::CompletionEvent;
use crate::types::TimestampMs;

/// What the subscription and its tasks share.
pub(crate) struct Shared {
    pub(crate) group: String,
    pub(crate) member: String,
    /// This process's incarnation of the member id.
    pub(crate) incarnation: String,
    /// Refusals after which an event is parked.
    park_after: u32,
    /// The backend's completion source (its tail, lanes and cursors).
    pub(crate) source: Arc<dyn CompletionSource>,
    /// The backend's group store.
    pub(crate) groups: Arc<dyn GroupStore>,
    /// Tells the delivery task to read the tree again (the ledger's new generation).
    pub(crate) plan: watch::Sender<u64>,
    ledger: Mutex<Ledger>,
    /// The current read of the tree: its generation and how far it has got.
    reading: Mutex<Option<(u64, Arc<Passed>)>>,
    /// Cursors delivered and to acknowledge (after delivery).
    auto_acks: Mutex<Vec<StreamCursor>>,
}

impl Shared {
    pub(crate) fn new(
        request: &DurableRequest,
        member: String,
        incarnation: String,
        source: Arc<dyn CompletionSource>,
        groups: Arc<dyn GroupStore>,
        plan: watch::Sender<u64>,
    ) -> Self {
        Self {
            group: request.name.clone(),
            member,
            incarnation,
            park_after: request.park_after,
            source,
            groups,
            plan,
            ledger: Mutex::new(Ledger::new(false)),
            reading: Mutex::new(None),
            auto_acks: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn reading(&self) -> Option<(u64, Arc<Passed>)> {
        self.reading.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_reading(&self, reading: Option<(u64, Arc<Passed>)>) {
        *self.reading.lock().unwrap_or_else(|p| p.into_inner()) = reading;
    }

    /// Puts back acknowledgements after delivery that could not be written yet.
    pub(crate) fn requeue_auto_acks(&self, mut cursors: Vec<StreamCursor>) {
        let mut queued = self.auto_acks.lock().unwrap_or_else(|p| p.into_inner());
        cursors.append(&mut queued);
        *queued = cursors;
    }

    /// Settles replayed parked events and records them; a fenced write records nothing.
    pub(crate) async fn write_settles(&self, acks: Vec<Ack>) -> Result<(), Error> {
        if acks.is_empty() {
            return Ok(());
        }
        let result = self.groups.settle(&self.group, &self.member, &acks).await;
        match &result {
            Ok(()) => {
                crate::metrics::group_replayed(&self.group, acks.len() as u64);
                self.ledger().settled(&acks);
            }
            Err(Error::Fenced { .. }) => crate::metrics::group_fenced(&self.group),
            Err(_) => {}
        }
        result
    }

    /// Records a cursor delivered, to acknowledge after delivery.
    pub(crate) fn push_auto_ack(&self, cursor: StreamCursor) {
        self.auto_acks.lock().unwrap_or_else(|p| p.into_inner()).push(cursor);
    }

    pub(crate) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn take_auto_acks(&self) -> Vec<StreamCursor> {
        std::mem::take(&mut *self.auto_acks.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Writes acks and records them; a fenced write records nothing (the next heartbeat
    /// tells what is still held).
    pub(crate) async fn write_acks(&self, acks: Vec<Ack>) -> Result<(), Error> {
        if acks.is_empty() {
            return Ok(());
        }
        let result = self.groups.ack(&self.group, &self.member, &acks).await;
        match &result {
            Ok(()) => {
                crate::metrics::group_acked(&self.group, acks.len() as u64);
                self.ledger().acked(&acks);
            }
            Err(Error::Fenced { .. }) => crate::metrics::group_fenced(&self.group),
            Err(_) => {}
        }
        result
    }
}

/// A live durable subscription: a `Stream` of the completions of the partitions this member
/// holds, in order per partition, each once while the member holds its partition (and, out of
/// that order, parked events an operator asked to replay). Dropping it leaves the group (its
/// partitions move at once).
///
/// The stream ends only when another process subscribes under the same member id (or the same
/// exclusive name: `Fenced`), or on an error it cannot retry. History the backend no longer has
/// (a position trimmed away while no member ran, a restored database) does not end it: those
/// partitions stall, [`GroupStats`] says which and why, and an operator moves their positions
/// ([`crate::GroupAdmin::move_positions`]).
///
/// An event's cursor is what acknowledges it. On Valkey it names the event's own place, its
/// partition's stream id, rather than every partition stream the member has read: resuming a
/// plain subscription from it would read the other partitions from their start (a durable
/// subscription resumes from the positions the backend stores).
pub struct DurableSubscription {
    pub(crate) shared: Arc<Shared>,
    /// Admitted events with the token of the lease each was admitted under.
    pub(crate) events: mpsc::Receiver<Result<(CompletionEvent, u64), Error>>,
    pub(crate) ack_after_delivery: bool,
    /// The last event handed out, acknowledged when the next one is asked for.
    pub(crate) handed_out: Option<StreamCursor>,
    pub(crate) stop: CancellationToken,
}

impl std::fmt::Debug for DurableSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableSubscription")
            .field("group", &self.shared.group)
            .field("member", &self.shared.member)
            .finish_non_exhaustive()
    }
}

impl DurableSubscription {
    /// The subscription's (group's) name.
    pub fn name(&self) -> &str {
        &self.shared.group
    }

    /// This member's id.
    pub fn member(&self) -> &str {
        &self.shared.member
    }

    /// The partitions this member holds now, ascending.
    pub fn partitions(&self) -> Vec<u16> {
        self.shared.ledger().held().collect()
    }

    /// Acknowledges the event with `cursor` and every earlier event of its partition: the
    /// stored position moves past it, so no member receives them again. A replayed parked
    /// event is no longer parked once acknowledged.
    ///
    /// # Errors
    /// [`Error::Fenced`] when the member no longer holds the event's partition (a rebalance,
    /// a lapsed lease taken over: another member delivers it again); [`Error::Validation`] for a
    /// cursor this subscription did not deliver, or already acknowledged; backend errors.
    pub async fn ack(&self, cursor: &StreamCursor) -> Result<(), Error> {
        let ack = self.shared.ledger().ack_for(cursor)?;
        match ack {
            AckOf::Position(ack) => self.shared.write_acks(vec![ack]).await,
            AckOf::Parked(ack) => self.shared.write_settles(vec![ack]).await,
        }
    }

    /// A ticket to acknowledge the event with `cursor` inside the engine's own transaction,
    /// so that the event's effect and its acknowledgement commit together (Postgres, SQLite).
    ///
    /// # Errors
    /// As [`Self::ack`], before anything is written.
    pub fn ticket(&self, cursor: &StreamCursor) -> Result<AckTicket, Error> {
        let ack = self.shared.ledger().ack_for(cursor)?;
        Ok(AckTicket { group: self.shared.group.clone(), member: self.shared.member.clone(), ack })
    }

    /// Refuses `event`, for `reason` (kept with the event when it is parked): the event is
    /// delivered again, with every later event of its partition this member had delivered, and
    /// after [`DurableRequest::with_park_after`] refusals (counted by the backend, whichever
    /// member refused it) it is *parked* beside the group's positions instead, with the reason
    /// and the count: its partition goes on past it (as after an ack of it, which also counts
    /// for the partition's earlier events), and an operator lists it and replays or discards it
    /// ([`crate::GroupAdmin`]). A replayed parked event refused again stays parked.
    ///
    /// # Errors
    /// As [`Self::ack`].
    pub async fn nack(&self, event: &CompletionEvent, reason: impl Into<String>) -> Result<Nacked, Error> {
        let reason = reason.into();
        let ack = self.shared.ledger().ack_for(&event.cursor)?;
        let (ack, replayed) = match ack {
            AckOf::Position(ack) => (ack, false),
            AckOf::Parked(ack) => (ack, true),
        };
        let stored = stored_event(event);
        let nack = Nack {
            partition: ack.partition,
            token: ack.token,
            position: ack.position,
            reason: &reason,
            park_after: self.shared.park_after,
            event: &stored,
            replayed,
        };
        let shared = &self.shared;
        let outcome = shared.groups.nack(&shared.group, &shared.member, &nack).await;
        match &outcome {
            Ok(Nacked::Retry { .. }) => {
                crate::metrics::group_nacked(&shared.group, false);
                let generation = {
                    let mut ledger = shared.ledger();
                    ledger.rewind(ack.partition, ack.position);
                    ledger.generation()
                };
                shared.plan.send_replace(generation);
            }
            Ok(Nacked::Parked { .. }) => {
                crate::metrics::group_nacked(&shared.group, !replayed);
                if replayed {
                    shared.ledger().settled(&[ack]);
                } else {
                    shared.ledger().acked(&[ack]);
                }
                tracing::warn!(group = %shared.group, member = %shared.member, partition = ack.partition, execution = %event.execution_id, %reason, "event parked");
            }
            Err(Error::Fenced { .. }) => crate::metrics::group_fenced(&shared.group),
            Err(_) => {}
        }
        outcome
    }

    /// The group as the backend stores it, with this member's own unacknowledged counts.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn stats(&self) -> Result<GroupStats, Error> {
        let view = self.shared.groups.view(&self.shared.group).await?.unwrap_or_default();
        let local = self.shared.ledger().stats();
        let now = TimestampMs::now();
        let members = view
            .members
            .iter()
            .map(|(member, expires)| GroupMemberStats {
                member: member.clone(),
                lease_expires_at: *expires,
                partitions: view
                    .partitions
                    .iter()
                    .filter(|p| p.owner.as_ref().is_some_and(|(o, at)| o == member && *at > now))
                    .count(),
            })
            .collect();
        let partitions = view
            .partitions
            .iter()
            .map(|p| {
                let mine = local.iter().find(|l| l.partition == p.partition);
                GroupPartitionStats {
                    partition: p.partition,
                    owner: p.owner.as_ref().filter(|(_, at)| *at > now).map(|(o, _)| o.clone()),
                    token: p.token,
                    unacked: mine.map(|l| l.unacked),
                    oldest_unacked_ms: mine.and_then(|l| l.oldest_unacked).map(|at| now.millis_since(at)),
                    stalled: mine.and_then(|l| l.stalled.clone()),
                    attempts: p.attempts,
                    parked: p.parked,
                }
            })
            .collect();
        Ok(GroupStats { group: self.shared.group.clone(), member: self.shared.member.clone(), members, partitions })
    }
}

impl Stream for DurableSubscription {
    type Item = Result<CompletionEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ack_after_delivery
            && let Some(done) = self.handed_out.take()
        {
            self.shared.push_auto_ack(done);
        }
        loop {
            let (event, admission) = match self.events.poll_recv(cx) {
                Poll::Ready(Some(Ok(admitted))) => admitted,
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            // Read before its partition moved away (and perhaps came back under a new token),
            // or before it was read again after a refusal: not this member's to hand out any
            // more; a read from the stored position delivers it again.
            if !self.shared.ledger().is_current(&event.cursor, admission) {
                tracing::trace!(group = %self.shared.group, member = %self.shared.member, execution = %event.execution_id, "dropped: its partition moved");
                continue;
            }
            if self.ack_after_delivery {
                self.handed_out = Some(event.cursor.clone());
            }
            return Poll::Ready(Some(Ok(event)));
        }
    }
}

impl Drop for DurableSubscription {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An acknowledgement to commit inside the engine's own transaction, with the event's effect:
/// if the member lost the partition meanwhile, the ack fails with [`Error::Fenced`]
/// (the new holder delivers the event again), and if the event's position is already
/// acknowledged (its effect committed before), with [`Error::AlreadyAcknowledged`];
/// either way the transaction must roll back.
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn demo(sub: &ff_completions::DurableSubscription, event: &ff_completions::CompletionEvent, pool: &sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use ff_completions::Error;
///
/// let ticket = sub.ticket(&event.cursor)?;
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE app_child SET eligible = true WHERE parent = $1")
///     .bind(event.execution_id.to_string())
///     .execute(&mut *tx)
///     .await?;
/// match ticket.commit_in(&mut *tx).await {
///     Ok(()) => tx.commit().await?, // the effect and its ack commit together
///     // Another member handles the event, or its effect committed before: dropping `tx`
///     // rolls this one back.
///     Err(Error::Fenced { .. } | Error::AlreadyAcknowledged { .. }) => {}
///     Err(err) => return Err(err.into()),
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckTicket {
    group: String,
    member: String,
    ack: AckOf,
}

impl AckTicket {
    /// The flow partition of the acknowledged event.
    pub fn partition(&self) -> u16 {
        match self.ack {
            AckOf::Position(ack) | AckOf::Parked(ack) => ack.partition,
        }
    }

    /// Writes the acknowledgement on `conn` (a `sqlx::PgConnection` or
    /// `sqlx::SqliteConnection`), inside the transaction the caller has open on it. A
    /// replayed parked event's ticket removes it from the parked events.
    ///
    /// # Errors
    /// [`Error::Fenced`] or [`Error::AlreadyAcknowledged`] (roll the transaction back: another
    /// member or an earlier commit handles the event), or the database's error.
    pub async fn commit_in<C: AckConnection + ?Sized>(&self, conn: &mut C) -> Result<(), Error> {
        let written = match &self.ack {
            AckOf::Position(ack) => conn.ack_in(&self.group, &self.member, std::slice::from_ref(ack), true).await,
            AckOf::Parked(ack) => conn.settle_in(&self.group, &self.member, std::slice::from_ref(ack), true).await,
        };
        self.counted(written)
    }

    /// Counts a fenced or already acknowledged commit (a written one counts once its
    /// transaction is known to commit, which only the caller knows: it is not counted).
    fn counted(&self, result: Result<(), Error>) -> Result<(), Error> {
        match &result {
            Err(Error::Fenced { .. }) => crate::metrics::group_fenced(&self.group),
            Err(Error::AlreadyAcknowledged { .. }) => crate::metrics::group_already_acknowledged(&self.group),
            _ => {}
        }
        result
    }
}

/// A durable group as stored, for dashboards and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStats {
    /// The group's name.
    pub group: String,
    /// The member that asked.
    pub member: String,
    /// Live members.
    pub members: Vec<GroupMemberStats>,
    /// Every partition, ascending.
    pub partitions: Vec<GroupPartitionStats>,
}

/// One live member of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupMemberStats {
    /// Its id.
    pub member: String,
    /// When its lease runs out without a heartbeat.
    pub lease_expires_at: TimestampMs,
    /// How many partitions it holds.
    pub partitions: usize,
}

/// One partition of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupPartitionStats {
    /// The flow partition.
    pub partition: u16,
    /// The member holding it (an unexpired lease), if any.
    pub owner: Option<String>,
    /// Its fencing token.
    pub token: u64,
    /// Events the asking member delivered and has not acknowledged (`None` for partitions it
    /// does not hold).
    pub unacked: Option<usize>,
    /// Age of the oldest of them, by commit time.
    pub oldest_unacked_ms: Option<u64>,
    /// Why the asking member cannot read it, if it holds it and cannot (`None` otherwise).
    pub stalled: Option<Stalled>,
    /// Refusals of the event its consumers refuse now (0: none).
    pub attempts: u32,
    /// Its parked events.
    pub parked: u32,
}

/// Why a member holds a partition it cannot read: its position names events the backend no
/// longer has. The member holds it unread (its other partitions go on) until an operator moves
/// its position ([`crate::GroupAdmin::move_positions`]): to the oldest position kept (accepting
/// the loss), to the tail, or to a cursor.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stalled {
    /// Retention removed events after its position (`CursorExpired`): every member of the group
    /// was gone, or its partitions were free, for longer than the backend keeps history.
    Expired {
        /// The oldest position the backend still keeps, when known.
        oldest: Option<StreamCursor>,
    },
    /// Its position was read in a history the database no longer has (`CursorHistoryLost`: a
    /// restored backup or dump, a lossy failover).
    HistoryLost {
        /// What the backend found instead.
        reason: String,
    },
}

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Expired { oldest: Some(oldest) } => {
                write!(f, "events after its position were trimmed away; the oldest position kept is {oldest}")
            }
            Self::Expired { oldest: None } => f.write_str("events after its position were trimmed away"),
            Self::HistoryLost { reason } => write!(f, "its position's history is not in the database: {reason}"),
        }
    }
}

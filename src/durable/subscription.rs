//! What a durable subscriber gets: the [`DurableSubscription`] stream, [`AckTicket`]s to
//! acknowledge inside its own transaction, and [`GroupStats`].

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ledger::Ledger;
use crate::backends::CompletionSource;
use crate::backends::groups::{Ack, AckConnection, GroupStore};
use crate::cursor::StreamCursor;
use crate::error::Error;
use crate::event::CompletionEvent;
use crate::types::TimestampMs;

/// What the subscription and its tasks share.
pub(crate) struct Shared {
    pub(crate) group: String,
    pub(crate) member: String,
    /// The backend's completion source (its tail, lanes and cursors).
    pub(crate) source: Arc<dyn CompletionSource>,
    /// The backend's group store.
    pub(crate) groups: Arc<dyn GroupStore>,
    ledger: Mutex<Ledger>,
    /// Cursors delivered and to acknowledge (after delivery).
    auto_acks: Mutex<Vec<StreamCursor>>,
}

impl Shared {
    pub(crate) fn new(
        group: String,
        member: String,
        source: Arc<dyn CompletionSource>,
        groups: Arc<dyn GroupStore>,
    ) -> Self {
        let (ledger, auto_acks) = (Mutex::new(Ledger::new(false)), Mutex::new(Vec::new()));
        Self { group, member, source, groups, ledger, auto_acks }
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
/// holds, in order per partition, each once while the member holds its partition. Dropping
/// it leaves the group (its partitions move at once).
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
    /// stored position moves past it, so no member receives them again.
    ///
    /// # Errors
    /// [`Error::Validation`] for a cursor this subscription did not deliver (or already
    /// acknowledged); [`Error::Fenced`] when the member no longer holds the event's
    /// partition (another member will deliver it again); backend errors.
    pub async fn ack(&self, cursor: &StreamCursor) -> Result<(), Error> {
        let ack = self.shared.ledger().ack_for(cursor)?;
        self.shared.write_acks(vec![ack]).await
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
            let (event, token) = match self.events.poll_recv(cx) {
                Poll::Ready(Some(Ok(admitted))) => admitted,
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            // Read before its partition moved away (and perhaps came back under a new token):
            // not this member's to hand out any more; a read from the stored position delivers
            // it again if it comes back.
            if !self.shared.ledger().is_current(&event.cursor, token) {
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
    ack: Ack,
}

impl AckTicket {
    /// The flow partition of the acknowledged event.
    pub fn partition(&self) -> u16 {
        self.ack.partition
    }

    /// Writes the acknowledgement on `conn` (a `sqlx::PgConnection` or
    /// `sqlx::SqliteConnection`), inside the transaction the caller has open on it.
    ///
    /// # Errors
    /// [`Error::Fenced`] or [`Error::AlreadyAcknowledged`] (roll the transaction back: another
    /// member or an earlier commit handles the event), or the database's error.
    pub async fn commit_in<C: AckConnection + ?Sized>(&self, conn: &mut C) -> Result<(), Error> {
        let acks = std::slice::from_ref(&self.ack);
        self.counted(conn.ack_in(&self.group, &self.member, acks, true).await)
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
}

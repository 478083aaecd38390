//! Durable named subscriptions and groups. The backend keeps, per name, the acknowledged
//! position of each flow partition; processes subscribing under one name share the
//! partitions through leases that expire and fencing tokens that grow, so each completion is
//! handled by one member, in order per partition, and a restarted process resumes from the
//! stored positions with nothing persisted by the engine.
//!
//! - [`store`]: the contract with the backends (heartbeat, fenced ack, leave, view).
//! - [`ledger`]: what a member knows between heartbeats, without I/O.
//! - [`member`]: the member's two tasks (heartbeats and acks; reading the tree).
//!
//! ```text
//! DurableSubscription ── events ◄── delivery task ◄── tree subscription (from the held positions)
//!        │ ack / ticket                  │ admits held partitions only
//!        ▼                               ▼
//!      Ledger ◄──── heartbeat task ───► backend: members, leases, acknowledged positions
//! ```

pub(crate) mod ledger;
pub(crate) mod member;
pub(crate) mod store;

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::actors::BackendId;
use crate::backends::CompletionSource;
use crate::cursor::StreamCursor;
use crate::error::EngineError;
use crate::event::CompletionEvent;
use crate::scanner_filter::ScannerFilter;
use crate::types::TimestampMs;
use ledger::Ledger;
use store::{Ack, Sharing};

/// The default lease of a member's partitions: a member that dies loses them this long after
/// its last heartbeat (heartbeats come every third of it).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// A durable subscription to completions: made with [`crate::SubscribeRequest::durable`]
/// (one consumer at a time) or [`DurableRequest::group`] (members share the partitions),
/// subscribed with [`crate::CompletionSupervisorHandle::subscribe_durable`].
#[derive(Clone, Debug)]
pub struct DurableRequest {
    pub(crate) name: String,
    pub(crate) sharing: Sharing,
    pub(crate) member: Option<String>,
    pub(crate) filter: ScannerFilter,
    pub(crate) backend: Option<BackendId>,
    pub(crate) lease_ttl: Duration,
    pub(crate) ack_after_delivery: bool,
}

impl DurableRequest {
    /// A durable subscription with one consumer: the backend stores its position under
    /// `name`; a process that subscribes again under the name takes every partition over at
    /// once and fences the previous consumer: its acks fail with [`EngineError::Fenced`], and
    /// its stream ends with `Fenced` at its next heartbeat. A new name starts at the tail.
    pub fn exclusive(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            sharing: Sharing::Exclusive,
            member: None,
            filter: ScannerFilter::default(),
            backend: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            ack_after_delivery: false,
        }
    }

    /// A member of the group `name`: live members share the 256 flow partitions evenly, each
    /// completion goes to the member holding its partition, and a member that dies loses its
    /// partitions to the others once its lease expires. A new group starts at the tail.
    pub fn group(name: impl Into<String>) -> Self {
        Self { sharing: Sharing::Shared, ..Self::exclusive(name) }
    }

    /// Names the member (1 to 64 characters, no control characters); a random id otherwise.
    /// A member that restarts under its own id takes its partitions back at once (fencing its
    /// earlier incarnation) instead of waiting for their leases to expire.
    #[must_use]
    pub fn with_member(mut self, member: impl Into<String>) -> Self {
        self.member = Some(member.into());
        self
    }

    /// Only completions matching `filter` are delivered; the others are acknowledged with the
    /// next delivered event of their partition.
    #[must_use]
    pub fn with_filter(mut self, filter: ScannerFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Picks a backend by name.
    #[must_use]
    pub fn on_backend(mut self, backend: impl Into<BackendId>) -> Self {
        self.backend = Some(backend.into());
        self
    }

    /// How long the member's partitions stay its own without a heartbeat (at least 300 ms, at
    /// most a day; default [`DEFAULT_LEASE_TTL`]): a dead member's partitions move after this.
    #[must_use]
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(MIN_LEASE_TTL);
        self
    }

    /// Acknowledges each event once the consumer asks for the next one (and within
    /// [`ACK_FLUSH_INTERVAL`]): delivery at least once, with no ack calls. Without it the
    /// consumer acknowledges with [`DurableSubscription::ack`] or an [`AckTicket`].
    #[must_use]
    pub fn with_ack_after_delivery(mut self) -> Self {
        self.ack_after_delivery = true;
        self
    }

    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The shortest lease a member may ask for.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(300);

/// How often acknowledgements made after delivery are written.
pub const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// What the subscription and its tasks share.
pub(crate) struct Shared {
    pub(crate) group: String,
    pub(crate) member: String,
    pub(crate) source: Arc<dyn CompletionSource>,
    ledger: Mutex<Ledger>,
    /// Cursors delivered and to acknowledge (after delivery).
    auto_acks: Mutex<Vec<StreamCursor>>,
}

impl Shared {
    pub(crate) fn new(group: String, member: String, source: Arc<dyn CompletionSource>) -> Self {
        Self { group, member, source, ledger: Mutex::new(Ledger::new(false)), auto_acks: Mutex::new(Vec::new()) }
    }

    pub(crate) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn take_auto_acks(&self) -> Vec<StreamCursor> {
        std::mem::take(&mut *self.auto_acks.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Writes acks and records them; a fenced write records nothing (the next heartbeat
    /// tells what is still held).
    pub(crate) async fn write_acks(&self, acks: Vec<Ack>) -> Result<(), EngineError> {
        if acks.is_empty() {
            return Ok(());
        }
        let result = self.source.group_ack(&self.group, &self.member, &acks).await;
        match &result {
            Ok(()) => {
                crate::metrics::group_acked(&self.group, acks.len() as u64);
                self.ledger().acked(&acks);
            }
            Err(EngineError::Fenced { .. }) => crate::metrics::group_fenced(&self.group),
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
    pub(crate) events: mpsc::Receiver<Result<(CompletionEvent, u64), EngineError>>,
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
    /// [`EngineError::Validation`] for a cursor this subscription did not deliver (or already
    /// acknowledged); [`EngineError::Fenced`] when the member no longer holds the event's
    /// partition (another member will deliver it again); backend errors.
    pub async fn ack(&self, cursor: &StreamCursor) -> Result<(), EngineError> {
        let ack = self.shared.ledger().ack_for(cursor)?;
        self.shared.write_acks(vec![ack]).await
    }

    /// A ticket to acknowledge the event with `cursor` inside the engine's own transaction,
    /// so that the event's effect and its acknowledgement commit together (Postgres, SQLite).
    ///
    /// # Errors
    /// As [`Self::ack`], before anything is written.
    pub fn ticket(&self, cursor: &StreamCursor) -> Result<AckTicket, EngineError> {
        let ack = self.shared.ledger().ack_for(cursor)?;
        Ok(AckTicket { group: self.shared.group.clone(), member: self.shared.member.clone(), ack })
    }

    /// The group as the backend stores it, with this member's own unacknowledged counts.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn stats(&self) -> Result<GroupStats, EngineError> {
        let view = self.shared.source.group_view(&self.shared.group).await?.unwrap_or_default();
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
    type Item = Result<CompletionEvent, EngineError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ack_after_delivery
            && let Some(done) = self.handed_out.take()
        {
            self.shared.auto_acks.lock().unwrap_or_else(|p| p.into_inner()).push(done);
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
/// if the member lost the partition meanwhile, the ack fails with [`EngineError::Fenced`]
/// (the new holder delivers the event again), and if the event's position is already
/// acknowledged (its effect committed before), with [`EngineError::AlreadyAcknowledged`];
/// either way the transaction must roll back.
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn demo(sub: &ff_completions::DurableSubscription, event: &ff_completions::CompletionEvent, pool: &sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use ff_completions::EngineError;
///
/// let ticket = sub.ticket(&event.cursor)?;
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE app_child SET eligible = true WHERE parent = $1")
///     .bind(event.execution_id.to_string())
///     .execute(&mut *tx)
///     .await?;
/// match ticket.commit_in_postgres(&mut tx).await {
///     Ok(()) => tx.commit().await?, // the effect and its ack commit together
///     // Another member handles the event, or its effect committed before: dropping `tx`
///     // rolls this one back.
///     Err(EngineError::Fenced { .. } | EngineError::AlreadyAcknowledged { .. }) => {}
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

    /// Writes the acknowledgement on `conn`, inside the caller's transaction.
    ///
    /// # Errors
    /// [`EngineError::Fenced`] or [`EngineError::AlreadyAcknowledged`] (roll the transaction
    /// back: another member or an earlier commit handles the event), or the database's error.
    #[cfg(feature = "postgres")]
    pub async fn commit_in_postgres(&self, conn: &mut sqlx::PgConnection) -> Result<(), EngineError> {
        let acks = std::slice::from_ref(&self.ack);
        self.counted(crate::backends::postgres::groups::ack_in(conn, &self.group, &self.member, acks, true).await)
    }

    /// Writes the acknowledgement on `conn`, inside the caller's transaction.
    ///
    /// # Errors
    /// [`EngineError::Fenced`] or [`EngineError::AlreadyAcknowledged`] (roll the transaction
    /// back: another member or an earlier commit handles the event), or the database's error.
    #[cfg(feature = "sqlite")]
    pub async fn commit_in_sqlite(&self, conn: &mut sqlx::SqliteConnection) -> Result<(), EngineError> {
        let acks = std::slice::from_ref(&self.ack);
        self.counted(crate::backends::sqlite::groups::ack_in(conn, &self.group, &self.member, acks, true).await)
    }

    /// Counts a fenced or already acknowledged commit (a written one counts once its
    /// transaction is known to commit, which only the caller knows: it is not counted).
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    fn counted(&self, result: Result<(), EngineError>) -> Result<(), EngineError> {
        match &result {
            Err(EngineError::Fenced { .. }) => crate::metrics::group_fenced(&self.group),
            Err(EngineError::AlreadyAcknowledged { .. }) => crate::metrics::group_already_acknowledged(&self.group),
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

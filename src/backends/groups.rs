//! The seam between durable subscriptions and a backend's group store, beside
//! [`super::CompletionSource`]: what a backend stores for a named group (members, one lease per
//! flow partition, the acknowledged position of each partition) and the three atomic operations
//! on it ([`GroupStore`]), plus the ack inside a caller's own transaction ([`AckConnection`],
//! what an [`crate::AckTicket`] commits through). Each backend implements them beside its data
//! (a SQL function, a Lua function, one SQLite transaction); the durable member task never
//! names a database.
//!
//! Positions are lane-free: `(major, hi, lo)` of the backend's order ([`Position`] without its
//! lane). On Postgres and SQLite every partition's position is a position in the one global
//! order; on Valkey it is the stream id `(0, ms, seq)` in that partition's own stream.
//!
//! Every backend keeps the same rules, with the server's clock:
//!
//! - **Heartbeat** (one atomic step, serialized per group) of one *incarnation* of a member id
//!   (a process's subscription; a random id per subscription):
//!   1. A group that does not exist is created: every partition `0..PARTITION_COUNT` free,
//!      token 0, acknowledged at the heartbeat's start position.
//!   2. Members whose lease expired are removed. When another incarnation holds the member id
//!      and this heartbeat is not its incarnation's first (`rejoin`), it is refused with
//!      [`crate::Error::Fenced`] and nothing changes: a newer process took the member id over.
//!      Otherwise the member id is this incarnation's, its lease now + ttl.
//!   3. Every partition the member id holds is renewed to now + ttl (even if its lease had
//!      lapsed: nobody took it in between), its unacknowledged count set from the heartbeat's;
//!      one held under another incarnation (or every one, on `rejoin`) gets token + 1 and
//!      becomes this incarnation's. On Postgres a partition's lease *is* its holder's member
//!      row (held while the row of the owner's incarnation has not expired, lapsed otherwise):
//!      renewing the member renews them all, and a partition row is written only when one of
//!      its values changes, so that a heartbeat leaves no dead row versions for an open
//!      transaction to keep. A partition row another transaction holds (Postgres: an ack
//!      inside an engine's open transaction) is never waited for: it is left as it is until a
//!      later heartbeat, and still returned when it is this incarnation's.
//!   4. Its share: all partitions when exclusive; [`fair_share`] of the live members when
//!      shared.
//!   5. Above its share, it frees its highest-numbered partitions (owner none; the token is
//!      left for the next holder to raise). Below it, it takes free or lapsed partitions in
//!      ascending order, each with token + 1.
//!   6. It returns the partitions this incarnation holds, ascending, with token, acknowledged
//!      position, and the count of the partition's parked events and of those to replay.
//! - **Ack** (atomic, all or nothing): an unknown group is a validation error; each ack's
//!   partition must be held by the member with the ack's token, or the whole call is
//!   [`crate::Error::Fenced`] and nothing is written. A lease that ran out and that
//!   nobody took yet still counts: only a takeover (token + 1) moves a partition's events to
//!   another member, and it is the next holder of a new token that delivers a refused ack's
//!   event again (refused for a lapse alone, the event would be lost once the member renewed
//!   its lease with the same token and acknowledged a later one). The acknowledged
//!   position becomes the higher of the stored one and the ack's. An ack inside the engine's
//!   transaction (Postgres and SQLite, an [`crate::AckTicket`]) must move its position up:
//!   one at or below the stored position is [`crate::Error::AlreadyAcknowledged`],
//!   nothing is written, and the engine's transaction rolls back, so that an event's effect
//!   commits once even if the event was handed out twice.
//! - **Leave** of an incarnation: its membership (not a newer incarnation's) is removed and the
//!   partitions it holds freed (tokens unchanged); an unknown group or member changes nothing.
//! - **Nack** (atomic, fenced as an ack): the consumer refuses an event. Attempts on one
//!   position of a partition are counted beside it (a nack of another position starts again at
//!   one); once they reach the group's limit the event is *parked* beside the group's
//!   positions with the reason and attempts, and the partition's position moves past it (as an
//!   ack would). A nack of a replayed parked event counts one more attempt; it stays parked.
//! - **Parked events** are listed, marked for replay (the holder of the partition hands them
//!   out again) or removed. Acknowledging a replayed one (**settle**, fenced as an ack) removes
//!   it; inside the engine's transaction, one no longer parked is
//!   [`crate::Error::AlreadyAcknowledged`].
//! - **Move** (an operator's): sets partitions' positions (up or down) and raises their tokens,
//!   refused with [`crate::Error::Validation`] while a member holds one with an unexpired lease
//!   unless forced.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::cursor::{Frontier, Position, StreamCursor};
use crate::error::Error;
use crate::event::{CompletionEvent, CompletionOutcome};
use crate::types::{ExecutionId, FlowId, Namespace, PARTITION_COUNT, TimestampMs, check_name};

/// A backend's durable-group store: the operations of the module's rules, each atomic on the
/// backend.
#[async_trait]
pub(crate) trait GroupStore: Send + Sync + 'static {
    /// Joins or renews a member, rebalances the group's partition leases and returns the
    /// leases the member holds now, with their tokens and acknowledged positions.
    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Vec<Lease>, Error>;

    /// Applies `acks` atomically: all of them, or none when the member no longer holds one of
    /// the partitions with the ack's token ([`Error::Fenced`]). A position at or below the
    /// stored one changes nothing. An unknown group is [`Error::Validation`].
    async fn ack(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error>;

    /// Removes an incarnation of a member: the leases it holds are freed at once for the others
    /// to take.
    async fn leave(&self, group: &str, member: &str, incarnation: &str) -> Result<(), Error>;

    /// The stored state of a group; `None` for a group never created.
    async fn view(&self, group: &str) -> Result<Option<GroupView>, Error>;

    /// Refuses an event (see the module's rules): what became of it.
    async fn nack(&self, group: &str, member: &str, nack: &Nack<'_>) -> Result<Nacked, Error>;

    /// Acknowledges replayed parked events (removes them), all or none ([`Error::Fenced`]).
    async fn settle(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error>;

    /// Sets partitions' positions, raising their tokens; refused while a member holds one of
    /// them unless `force`.
    async fn move_positions(&self, group: &str, moves: &[(u16, Position)], force: bool) -> Result<(), Error>;

    /// The group's parked events, by partition and position.
    async fn parked(&self, group: &str) -> Result<Vec<Parked>, Error>;

    /// Marks parked events for replay, or removes them: those named, or every one for `None`.
    /// Returns how many.
    async fn mark_parked(&self, group: &str, which: Option<&[(u16, Position)]>, mark: ParkedMark)
    -> Result<u64, Error>;
}

pub(crate) mod sealed {
    /// Keeps [`super::AckConnection`] to the crate's own stores.
    pub trait Sealed {}
}

/// A database connection on which an [`crate::AckTicket`] is written inside the caller's own
/// transaction: a `sqlx::Transaction` of Postgres or SQLite, or the `sqlx::PgConnection` or
/// `sqlx::SqliteConnection` it runs on (features `postgres`, `sqlite`). Valkey has no
/// transaction to join: its acks are their own calls.
pub trait AckConnection: sealed::Sealed + Send {
    /// Applies `acks` for `member` of `group` inside the transaction open on this connection:
    /// all of them, or none (and the transaction must roll back). With `once`, each ack must
    /// move its partition's position up.
    #[doc(hidden)]
    fn ack_in<'a>(
        &'a mut self,
        group: &'a str,
        member: &'a str,
        acks: &'a [Ack],
        once: bool,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Acknowledges replayed parked events (`acks` name their partition, token and position)
    /// inside the transaction open on this connection: all of them, or none. With `once`, each
    /// must still be parked.
    #[doc(hidden)]
    fn settle_in<'a>(
        &'a mut self,
        group: &'a str,
        member: &'a str,
        acks: &'a [Ack],
        once: bool,
    ) -> BoxFuture<'a, Result<(), Error>>;
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
impl<DB: sqlx::Database> sealed::Sealed for sqlx::Transaction<'_, DB> where DB::Connection: AckConnection {}

/// A transaction as sqlx hands it out: the ack is written on its connection.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
impl<DB: sqlx::Database> AckConnection for sqlx::Transaction<'_, DB>
where
    DB::Connection: AckConnection,
{
    fn ack_in<'a>(
        &'a mut self,
        group: &'a str,
        member: &'a str,
        acks: &'a [Ack],
        once: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        (**self).ack_in(group, member, acks, once)
    }

    fn settle_in<'a>(
        &'a mut self,
        group: &'a str,
        member: &'a str,
        acks: &'a [Ack],
        once: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        (**self).settle_in(group, member, acks, once)
    }
}

/// How a member shares its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// One consumer holds every partition; a new incarnation of the member takes them over
    /// at once, fencing the previous one.
    Exclusive,
    /// Live members share the partitions evenly; a member's leases outlive it by their ttl.
    Shared,
}

/// One heartbeat of a member: join or renew, rebalance, and learn what it holds.
#[derive(Clone, Debug)]
pub struct Heartbeat<'a> {
    /// The group's name (validated: 1 to 64 characters, no control characters).
    pub group: &'a str,
    /// The member's id (validated like a name).
    pub member: &'a str,
    /// This process's incarnation of the member id (validated like a name).
    pub incarnation: &'a str,
    /// How long its leases last without another heartbeat.
    pub ttl: Duration,
    /// Exclusive or shared.
    pub sharing: Sharing,
    /// The first heartbeat of this incarnation: it claims the member id, and every lease the
    /// member id already holds gets a new token (an earlier process with the same id can no
    /// longer ack, and its heartbeats are refused).
    pub rejoin: bool,
    /// Events delivered and not acknowledged, per partition the member holds (recorded for
    /// the operators' report).
    pub unacked: &'a [(u16, u32)],
    /// Where a new group starts (its partitions' acknowledged positions): the tail when the
    /// group is created. Ignored for an existing group. On Postgres and SQLite its single
    /// position; on Valkey its position in each partition's lane.
    pub start: &'a Frontier,
}

/// A partition lease a member holds after a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The flow partition (0..[`PARTITION_COUNT`]).
    pub partition: u16,
    /// The fencing token: it grows each time the partition changes hands (or its holder
    /// rejoins); an ack must name the current one.
    pub token: u64,
    /// The partition's acknowledged position (lane 0).
    pub acked: Position,
    /// Its parked events.
    pub parked: u32,
    /// Those of them an operator asked to replay.
    pub replays: u32,
}

/// One acknowledgement: move `partition`'s acknowledged position up to `position`, if the
/// member still holds it with `token`. A position at or below the stored one is a no-op
/// (refused inside the engine's transaction: see the module's rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The flow partition.
    pub partition: u16,
    /// The token of the lease it was delivered under.
    pub token: u64,
    /// The acknowledged event's position (lane 0).
    pub position: Position,
}

/// A group as stored, for stats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupView {
    /// Live members (lease not expired) and when each expires.
    pub members: Vec<(String, TimestampMs)>,
    /// Every partition: its holder (if any, expired leases included with their expiry; on
    /// Postgres the expiry of the holder's member row, 0 once that row was removed), token and
    /// acknowledged position, ascending by partition.
    pub partitions: Vec<PartitionView>,
}

/// One partition of a stored group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionView {
    /// The flow partition.
    pub partition: u16,
    /// Its holder and when its lease expires; `None` when free.
    pub owner: Option<(String, TimestampMs)>,
    /// Its fencing token.
    pub token: u64,
    /// Its acknowledged position (lane 0).
    pub acked: Position,
    /// Events its holder delivered and had not acknowledged, as of its last heartbeat.
    pub unacked: u32,
    /// Nacks of the event its consumers refuse now (0: none).
    pub attempts: u32,
    /// The reason of the last nack, if any.
    pub reason: Option<String>,
    /// Its parked events.
    pub parked: u32,
}

/// A consumer's refusal of a delivered event (see the module's rules).
#[derive(Clone, Debug)]
pub struct Nack<'a> {
    /// The event's partition.
    pub partition: u16,
    /// The token it was delivered under.
    pub token: u64,
    /// Its position (lane 0).
    pub position: Position,
    /// Why the consumer refused it.
    pub reason: &'a str,
    /// Attempts after which it is parked (at least 1).
    pub park_after: u32,
    /// The event as parked (its stored form, JSON).
    pub event: &'a str,
    /// A replayed parked event rather than one read from the partition.
    pub replayed: bool,
}

/// What a nack did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nacked {
    /// The event is delivered again; this was its `attempts`-th refusal.
    Retry {
        /// Refusals so far.
        attempts: u32,
    },
    /// The event is parked (or stays parked) after `attempts` refusals; its partition goes on.
    Parked {
        /// Refusals so far.
        attempts: u32,
    },
}

/// A parked event as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parked {
    /// Its partition.
    pub partition: u16,
    /// Its position there (lane 0).
    pub position: Position,
    /// The event as delivered (its stored form, JSON).
    pub event: String,
    /// The reason of its last refusal.
    pub reason: String,
    /// Refusals.
    pub attempts: u32,
    /// When it was parked (the backend's clock).
    pub parked_at: TimestampMs,
    /// An operator asked to replay it.
    pub replay: bool,
}

/// What the group store's `mark_parked` does to parked events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParkedMark {
    /// Hand them out again.
    Replay,
    /// Remove them.
    Discard,
}

/// An event as a parked one keeps it: JSON of its fields and cursor.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredEvent {
    cursor: String,
    execution_id: String,
    flow_id: Option<String>,
    outcome: String,
    namespace: Option<String>,
    tags: std::collections::BTreeMap<String, String>,
    at: i64,
}

/// The stored form of `event`.
pub(crate) fn stored_event(event: &CompletionEvent) -> String {
    let stored = StoredEvent {
        cursor: event.cursor.to_hex(),
        execution_id: event.execution_id.to_string(),
        flow_id: event.flow_id.map(|f| f.to_string()),
        outcome: event.outcome.as_wire().to_owned(),
        namespace: event.namespace.as_ref().map(|n| n.as_str().to_owned()),
        tags: event.tags.clone(),
        at: event.at.0,
    };
    serde_json::to_string(&stored).unwrap_or_default()
}

/// The event of a stored form.
///
/// # Errors
/// [`Error::Validation`] for text that is not one.
pub(crate) fn event_of(stored: &str) -> Result<CompletionEvent, Error> {
    let bad = |what: &dyn std::fmt::Display| Error::validation(format!("a parked event is malformed: {what}"));
    let s: StoredEvent = serde_json::from_str(stored).map_err(|e| bad(&e))?;
    let execution = ExecutionId::parse(&s.execution_id).map_err(|e| bad(&e))?;
    let flow = s.flow_id.as_deref().map(uuid::Uuid::parse_str).transpose().map_err(|e| bad(&e))?.map(FlowId::from_uuid);
    Ok(CompletionEvent::new(
        StreamCursor::from_hex(&s.cursor)?,
        execution,
        CompletionOutcome::from_wire(&s.outcome),
        TimestampMs(s.at),
    )
    .with_flow_id(flow)
    .with_namespace(s.namespace.map(Namespace::new))
    .with_tags(s.tags))
}

/// How many partitions a member should hold with `live` members (itself included): the
/// ceiling of an even share, so every partition has a holder.
// The SQL function and the Lua library compute it beside the data; the SQLite store calls it.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) fn fair_share(live: usize) -> usize {
    let partitions = usize::from(PARTITION_COUNT);
    partitions.div_ceil(live.max(1))
}

/// The longest lease a heartbeat may ask for.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Checks the group name and member id every operation names: each backend's operations call
/// it first, before they touch anything.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite", feature = "valkey")), allow(dead_code))]
pub(crate) fn check_member(group: &str, member: &str) -> Result<(), Error> {
    check_name("group name", group)?;
    check_name("member id", member)
}

/// Checks a heartbeat ([`check_member`], the incarnation like a name, and a ttl from 1 ms to
/// [`MAX_TTL`]); returns its ttl in whole milliseconds.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite", feature = "valkey")), allow(dead_code))]
pub(crate) fn check_heartbeat(beat: &Heartbeat<'_>) -> Result<u64, Error> {
    check_member(beat.group, beat.member)?;
    check_name("member incarnation", beat.incarnation)?;
    if beat.ttl < Duration::from_millis(1) || beat.ttl > MAX_TTL {
        return Err(Error::validation(format!("a lease ttl of {:?} is outside 1 ms to {MAX_TTL:?}", beat.ttl)));
    }
    Ok(beat.ttl.as_millis() as u64)
}

/// A position's `(major, hi, lo)` as SQL bigints; a word above `i64::MAX` is a validation error
/// (never wrapped into a negative, which would compare below every stored position).
#[cfg(feature = "sqlite")]
pub(crate) fn sql_words(p: Position) -> Result<[i64; 3], Error> {
    let word =
        |w: u64| i64::try_from(w).map_err(|_| Error::validation(format!("position {p:?} does not fit the SQL store")));
    Ok([word(p.major)?, word(p.hi)?, word(p.lo)?])
}

/// The position of stored `(major, hi, lo)` bigints (lane 0).
#[cfg(feature = "sqlite")]
pub(crate) fn from_sql_words(major: i64, hi: i64, lo: i64) -> Position {
    Position::with_major(major.max(0) as u64, hi.max(0) as u64, lo.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_shares_cover_every_partition() {
        assert_eq!([1, 2, 3, 255, 256, 300].map(fair_share), [256, 128, 86, 2, 1, 1]);
        assert_eq!(fair_share(0), 256, "no live member counts as one");
    }

    #[test]
    fn names_of_1_to_64_characters_without_control_characters_pass() {
        assert!(check_name("group", &"é".repeat(64)).is_ok());
        for bad in [String::new(), "x".repeat(65), "a\0b".into(), "a\nb".into()] {
            assert!(matches!(check_name("group", &bad), Err(Error::Validation { .. })), "{bad:?}");
        }
    }

    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[test]
    fn sql_words_refuse_a_word_above_i64_max_and_round_trip_the_rest() {
        let p = Position::with_major(1, i64::MAX as u64, 0);
        let [major, hi, lo] = sql_words(p).expect("fits");
        assert_eq!(from_sql_words(major, hi, lo), p);
        let over = Position::with_major(0, 0, i64::MAX as u64 + 1);
        assert!(matches!(sql_words(over), Err(Error::Validation { .. })));
    }
}

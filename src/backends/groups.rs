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
//! - **Heartbeat** (one atomic step, serialized per group):
//!   1. A group that does not exist is created: every partition `0..PARTITION_COUNT` free,
//!      token 0, acknowledged at the heartbeat's start position.
//!   2. The member's own lease is set to expire at now + ttl; members whose lease expired are
//!      removed.
//!   3. On `rejoin`, every partition the member id holds gets token + 1.
//!   4. Every partition the member holds is renewed to now + ttl (even if its lease had
//!      lapsed: nobody took it in between).
//!   5. Its share: all partitions when exclusive; [`fair_share`] of the live members when
//!      shared.
//!   6. Above its share, it frees its highest-numbered partitions (owner none; the token is
//!      left for the next holder to raise). Below it, it takes free or lapsed partitions in
//!      ascending order, each with token + 1.
//!   7. It returns the partitions it holds, ascending, with token and acknowledged position.
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
//! - **Leave**: the member is removed and its partitions freed (tokens unchanged); an unknown
//!   group or member changes nothing.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::cursor::{Frontier, Position};
use crate::error::Error;
use crate::types::{PARTITION_COUNT, TimestampMs, check_name};

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

    /// Removes a member: its leases are freed at once for the others to take.
    async fn leave(&self, group: &str, member: &str) -> Result<(), Error>;

    /// The stored state of a group; `None` for a group never created.
    async fn view(&self, group: &str) -> Result<Option<GroupView>, Error>;
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
    /// How long its leases last without another heartbeat.
    pub ttl: Duration,
    /// Exclusive or shared.
    pub sharing: Sharing,
    /// The first heartbeat of this incarnation: every lease the member id already holds gets a
    /// new token (an earlier process with the same id can no longer ack).
    pub rejoin: bool,
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
    /// Every partition: its holder (if any, expired leases included with their expiry), token
    /// and acknowledged position, ascending by partition.
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

/// Checks a heartbeat ([`check_member`], and a ttl from 1 ms to [`MAX_TTL`]); returns its ttl
/// in whole milliseconds.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite", feature = "valkey")), allow(dead_code))]
pub(crate) fn check_heartbeat(beat: &Heartbeat<'_>) -> Result<u64, Error> {
    check_member(beat.group, beat.member)?;
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

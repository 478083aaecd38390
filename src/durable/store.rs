//! The contract between durable subscriptions and a backend: what a backend stores for a
//! named group (members, one lease per flow partition, the acknowledged position of each
//! partition) and the three atomic operations on it. Each backend implements it beside its
//! data (a SQL function, a Lua function, one SQLite transaction), through
//! [`crate::backends::CompletionSource`]; the member task in [`super::member`] never names a
//! database.
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
//!   partition must be held by the member with the ack's token and an unexpired lease, or the
//!   whole call is [`crate::EngineError::Fenced`] and nothing is written; the acknowledged
//!   position becomes the higher of the stored one and the ack's.
//! - **Leave**: the member is removed and its partitions freed (tokens unchanged); an unknown
//!   group or member changes nothing.

use std::time::Duration;

use crate::cursor::{Frontier, Position};
use crate::types::{PARTITION_COUNT, TimestampMs};

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
/// member still holds it with `token`. A position at or below the stored one is a no-op.
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
/// ceiling of an even share, so every partition has a holder. (The Valkey library computes
/// the same in Lua, beside the data; stores written in Rust call this.)
#[allow(dead_code)]
pub(crate) fn fair_share(live: usize) -> usize {
    let partitions = usize::from(PARTITION_COUNT);
    partitions.div_ceil(live.max(1))
}

/// The longest group name or member id, in characters.
pub(crate) const MAX_NAME_CHARS: usize = 64;

/// Checks a group name or member id: 1 to 64 characters, no control characters (NUL
/// included). It is stored by the backend and used as a metrics label.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), crate::error::EngineError> {
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(crate::error::EngineError::validation(format!(
            "{what} {name:?} must be 1 to {MAX_NAME_CHARS} characters without control characters"
        )));
    }
    Ok(())
}

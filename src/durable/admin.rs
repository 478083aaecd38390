//! What operators do to a durable group from outside its members ([`GroupAdmin`]): see it
//! whole (members, leases, each partition's position, the backlog it has to read, what its
//! holder delivered and has not acknowledged, refusals and parked events), move its positions
//! (to the tail, to the oldest position kept, to a cursor), and list, replay or discard its
//! parked events. The `group_admin` example is its command line.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use super::subscription::{GroupMemberStats, Stalled};
use crate::backends::groups::{ParkedMark, event_of};
use crate::backends::{CompletionSource, Connected, FamilyEvent, open_source};
use crate::config::BackendConfig;
use crate::cursor::{Frontier, Position, StreamCursor, decode_event_frontier};
use crate::error::Error;
use crate::event::CompletionEvent;
use crate::types::{PARTITION_COUNT, TimestampMs};

/// Events read at most to count a group's backlog; past it, counts are lower bounds.
const BACKLOG_READ: u64 = 100_000;

/// Rows per read while counting.
const BACKLOG_PAGE: usize = 2_000;

/// Operations on a backend's durable groups, for operators (and their tools) rather than
/// members: see [`GroupAdmin::show`], [`GroupAdmin::move_positions`] and the parked events.
///
/// ```no_run
/// # async fn demo() -> Result<(), ff_completions::Error> {
/// use ff_completions::{BackendConfig, GroupAdmin, MoveTo};
///
/// let admin = GroupAdmin::open(&BackendConfig::from_url("postgres://ops@db/engine")?).await?;
/// if let Some(report) = admin.show("promoter").await? {
///     for p in report.partitions.iter().filter(|p| p.backlog.stalled().is_some()) {
///         println!("partition {} cannot be read: {:?}", p.partition, p.backlog);
///     }
/// }
/// // Accept what retention removed: every stalled partition goes on from the oldest kept.
/// admin.move_positions("promoter", &MoveTo::Oldest, None, true).await?;
/// # Ok(()) }
/// ```
pub struct GroupAdmin {
    backend: Connected,
}

impl fmt::Debug for GroupAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupAdmin").field("backend", &self.backend.source.kind()).finish()
    }
}

/// Where [`GroupAdmin::move_positions`] moves positions.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MoveTo {
    /// The newest events: everything written so far is skipped.
    Tail,
    /// The oldest position the backend still keeps: what retention removed is given up, the
    /// rest is delivered.
    Oldest,
    /// A cursor's position (in each partition's lane, on Valkey): delivery resumes after it.
    Cursor(StreamCursor),
}

/// A group as operators see it ([`GroupAdmin::show`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupReport {
    /// The group's name.
    pub group: String,
    /// Live members.
    pub members: Vec<GroupMemberStats>,
    /// Every partition, ascending.
    pub partitions: Vec<PartitionReport>,
    /// Parked events of the whole group.
    pub parked: u64,
}

/// One partition of a [`GroupReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionReport {
    /// The flow partition.
    pub partition: u16,
    /// Its holder and when its lease runs out, if a member holds it (an expired lease nobody
    /// took yet included).
    pub owner: Option<(String, TimestampMs)>,
    /// Its fencing token.
    pub token: u64,
    /// Its stored position, as a cursor ([`MoveTo::Cursor`] takes it).
    pub position: StreamCursor,
    /// What it has to read.
    pub backlog: Backlog,
    /// Events its holder delivered and had not acknowledged at its last heartbeat.
    pub unacked: u32,
    /// Refusals of the event its consumers refuse now (0: none), with the last reason.
    pub attempts: u32,
    /// The last refusal's reason, if any.
    pub reason: Option<String>,
    /// Its parked events.
    pub parked: u32,
}

/// A partition's backlog: completions written after its position (of any namespace or tag:
/// a group's filter is its members' own).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backlog {
    /// This many (at least this many when `more`: counting stops after 100,000 events read).
    Events {
        /// Completions after the position.
        count: u64,
        /// Counting stopped early: there may be more.
        more: bool,
    },
    /// The position cannot be read: a member stalls it until it is moved.
    Stalled(Stalled),
}

impl Backlog {
    /// Why the partition cannot be read, if it cannot.
    pub fn stalled(&self) -> Option<&Stalled> {
        match self {
            Self::Stalled(why) => Some(why),
            Self::Events { .. } => None,
        }
    }
}

/// Names one parked event: its partition and its position there. Printed and parsed as
/// `<partition>/<position words>` (`17/0-1700000000000-3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParkedId {
    partition: u16,
    position: Position,
}

impl ParkedId {
    /// Its partition.
    pub fn partition(&self) -> u16 {
        self.partition
    }
}

impl fmt::Display for ParkedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.position;
        write!(f, "{}/{}-{}-{}-{}", self.partition, p.major, p.hi, p.lo, p.minor)
    }
}

impl FromStr for ParkedId {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let bad = || Error::validation(format!("{text:?} is not a parked event's id (<partition>/<a>-<b>-<c>-<d>)"));
        let (partition, words) = text.split_once('/').ok_or_else(bad)?;
        let partition: u16 = partition.parse().map_err(|_| bad())?;
        let words: Vec<u64> = words.split('-').map(str::parse).collect::<Result<_, _>>().map_err(|_| bad())?;
        let [major, hi, lo, minor] = words[..] else { return Err(bad()) };
        if partition >= PARTITION_COUNT {
            return Err(bad());
        }
        let minor = u32::try_from(minor).map_err(|_| bad())?;
        Ok(Self { partition, position: Position { lane: 0, major, hi, lo, minor, check: 0 } })
    }
}

/// A parked event ([`GroupAdmin::parked`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedEvent {
    /// Its id, for [`GroupAdmin::replay`] and [`GroupAdmin::discard`].
    pub id: ParkedId,
    /// The event as it was delivered.
    pub event: CompletionEvent,
    /// The reason of its last refusal.
    pub reason: String,
    /// Refusals.
    pub attempts: u32,
    /// When it was parked (the backend's clock).
    pub parked_at: TimestampMs,
    /// Replay was asked for, and its partition's holder has not acknowledged it yet.
    pub replay: bool,
}

impl GroupAdmin {
    /// Connects to `config`'s backend (installing its schema or function library, as the tree
    /// does).
    ///
    /// # Errors
    /// As the tree's connect; [`Error::Unavailable`] for a backend without durable groups.
    pub async fn open(config: &BackendConfig) -> Result<Self, Error> {
        let backend = open_source(config).await?;
        if backend.groups.is_none() {
            return Err(Error::unavailable("durable group", format!("{} keeps no durable groups", config.kind())));
        }
        Ok(Self { backend })
    }

    fn groups(&self) -> Result<&dyn crate::backends::groups::GroupStore, Error> {
        self.backend.groups.as_deref().ok_or_else(|| Error::unavailable("durable group", "no durable groups"))
    }

    fn source(&self) -> &dyn CompletionSource {
        self.backend.source.as_ref()
    }

    /// The group as stored, with each partition's backlog; `None` for a group never created.
    ///
    /// # Errors
    /// [`Error::Validation`] for a bad name; backend errors.
    pub async fn show(&self, group: &str) -> Result<Option<GroupReport>, Error> {
        let Some(view) = self.groups()?.view(group).await? else { return Ok(None) };
        let now = TimestampMs::now();
        let positions: Vec<(u16, Position)> = view.partitions.iter().map(|p| (p.partition, p.acked)).collect();
        let backlogs = self.backlogs(&positions).await?;
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
        let partitions: Vec<PartitionReport> = view
            .partitions
            .iter()
            .map(|p| PartitionReport {
                partition: p.partition,
                owner: p.owner.clone(),
                token: p.token,
                position: self.cursor_of(p.partition, p.acked),
                backlog: backlogs.get(&p.partition).cloned().unwrap_or(Backlog::Events { count: 0, more: false }),
                unacked: p.unacked,
                attempts: p.attempts,
                reason: p.reason.clone(),
                parked: p.parked,
            })
            .collect();
        let parked = partitions.iter().map(|p| u64::from(p.parked)).sum();
        Ok(Some(GroupReport { group: group.to_owned(), members, partitions, parked }))
    }

    /// The cursor of `partition`'s position.
    fn cursor_of(&self, partition: u16, position: Position) -> StreamCursor {
        let lane = if self.source().lanes_are_partitions() { partition } else { 0 };
        self.source().cursor_of(&Frontier::at(position.in_lane(lane)))
    }

    /// Moves the positions of `partitions` (every partition for `None`) to `to`, raising their
    /// tokens: a member holding one reads it again from there. Refused while a member holds one
    /// of them with a lease that has not run out, unless `force`. Returns the partitions moved.
    ///
    /// # Errors
    /// [`Error::Validation`] for an unknown group, a partition out of range, a held partition
    /// without `force`, or a malformed cursor; [`Error::CursorExpired`] or
    /// [`Error::CursorHistoryLost`] for a cursor the backend cannot read from; backend errors.
    pub async fn move_positions(
        &self,
        group: &str,
        to: &MoveTo,
        partitions: Option<&[u16]>,
        force: bool,
    ) -> Result<Vec<u16>, Error> {
        let partitions: Vec<u16> = match partitions {
            Some(p) => p.to_vec(),
            None => (0..PARTITION_COUNT).collect(),
        };
        if let Some(p) = partitions.iter().find(|p| **p >= PARTITION_COUNT) {
            return Err(Error::validation(format!("partition {p} out of range")));
        }
        let frontier = match to {
            MoveTo::Tail => self.source().tail().await?,
            MoveTo::Oldest => self.oldest().await?,
            MoveTo::Cursor(cursor) => self.source().resolve_start(cursor).await?.after,
        };
        let lanes_are_partitions = self.source().lanes_are_partitions();
        let moves: Vec<(u16, Position)> = partitions
            .iter()
            .map(|p| {
                let lane = if lanes_are_partitions { *p } else { 0 };
                (*p, Position { lane: 0, check: 0, ..frontier.get(lane) })
            })
            .collect();
        self.groups()?.move_positions(group, &moves, force).await?;
        tracing::warn!(group, ?to, partitions = ?partitions, force, "positions moved by an operator");
        Ok(partitions)
    }

    /// The oldest position the backend keeps in each lane (the start where nothing was
    /// trimmed).
    async fn oldest(&self) -> Result<Frontier, Error> {
        let source = self.source();
        let start = if source.lanes_are_partitions() {
            Frontier::from_positions((0..PARTITION_COUNT).map(Position::lane_start))
        } else {
            Frontier::at(Position::ZERO)
        };
        match source.resolve_start(&source.cursor_of(&start)).await {
            Ok(_) => Ok(start),
            Err(Error::CursorExpired { oldest: Some(oldest) }) => {
                Ok(start.joined(&decode_event_frontier(&oldest)?.unwrap_or_default()))
            }
            Err(err) => Err(err),
        }
    }

    /// The group's parked events, by partition and position.
    ///
    /// # Errors
    /// [`Error::Validation`] for a bad name or a malformed stored event; backend errors.
    pub async fn parked(&self, group: &str) -> Result<Vec<ParkedEvent>, Error> {
        self.groups()?
            .parked(group)
            .await?
            .into_iter()
            .map(|p| {
                Ok(ParkedEvent {
                    id: ParkedId { partition: p.partition, position: p.position },
                    event: event_of(&p.event)?,
                    reason: p.reason,
                    attempts: p.attempts,
                    parked_at: p.parked_at,
                    replay: p.replay,
                })
            })
            .collect()
    }

    /// Asks for parked events (every one for `None`) to be handed out again: the holder of each
    /// one's partition delivers it (out of its partition's order) at its next heartbeat; its
    /// ack (or ticket) removes it, a refusal keeps it parked. Returns how many.
    ///
    /// # Errors
    /// [`Error::Validation`] for a bad name; backend errors.
    pub async fn replay(&self, group: &str, which: Option<&[ParkedId]>) -> Result<u64, Error> {
        self.mark(group, which, ParkedMark::Replay).await
    }

    /// Removes parked events (every one for `None`). Returns how many.
    ///
    /// # Errors
    /// [`Error::Validation`] for a bad name; backend errors.
    pub async fn discard(&self, group: &str, which: Option<&[ParkedId]>) -> Result<u64, Error> {
        self.mark(group, which, ParkedMark::Discard).await
    }

    async fn mark(&self, group: &str, which: Option<&[ParkedId]>, mark: ParkedMark) -> Result<u64, Error> {
        let which: Option<Vec<(u16, Position)>> =
            which.map(|ids| ids.iter().map(|i| (i.partition, i.position)).collect());
        self.groups()?.mark_parked(group, which.as_deref(), mark).await
    }

    /// Each partition's backlog from its position: completions counted by reading the
    /// backend (at most [`BACKLOG_READ`] events), or why it cannot be read.
    async fn backlogs(&self, positions: &[(u16, Position)]) -> Result<BTreeMap<u16, Backlog>, Error> {
        let source = self.source();
        let lanes_are_partitions = source.lanes_are_partitions();
        let mut out = BTreeMap::new();
        let mut reading: BTreeMap<u16, Position> = positions.iter().copied().collect();
        let tail = if lanes_are_partitions { source.tail().await? } else { Frontier::default() };
        let start = loop {
            let start = if lanes_are_partitions {
                // Lanes not counted (the old single stream, partitions found stalled) from the
                // tail: at 0-0, a trimmed one would refuse the read again.
                let others = tail.positions().iter().copied().filter(|p| !reading.contains_key(&p.lane));
                let mine = reading.iter().map(|(p, pos)| pos.in_lane(*p));
                Frontier::from_positions(mine.chain(others))
            } else {
                match reading.values().min() {
                    Some(min) => Frontier::at(*min),
                    None => return Ok(out),
                }
            };
            let refused = match source.resolve_start(&source.cursor_of(&start)).await {
                Ok(_) => break start,
                Err(Error::CursorExpired { oldest }) => {
                    let floor = oldest.as_ref().and_then(|c| decode_event_frontier(c).ok().flatten());
                    (Stalled::Expired { oldest }, floor)
                }
                Err(Error::CursorHistoryLost { reason, .. }) => (Stalled::HistoryLost { reason }, None),
                Err(err) => return Err(err),
            };
            let stalled: Vec<u16> = reading
                .iter()
                .filter(|(p, pos)| match (&refused.1, lanes_are_partitions) {
                    (Some(floor), true) => floor.get(**p) > pos.in_lane(**p),
                    (Some(floor), false) => **pos < Position { lane: 0, ..floor.single() },
                    (None, true) => true,
                    (None, false) => **pos <= start.single(),
                })
                .map(|(p, _)| *p)
                .collect();
            if stalled.is_empty() {
                return Err(Error::CursorExpired { oldest: None });
            }
            for p in stalled {
                reading.remove(&p);
                out.insert(p, Backlog::Stalled(refused.0.clone()));
            }
            if reading.is_empty() {
                return Ok(out);
            }
        };
        let mut counts: BTreeMap<u16, u64> = reading.keys().map(|p| (*p, 0)).collect();
        let (mut at, mut read, mut more) = (start, 0u64, false);
        loop {
            let batch = source.read_after(&at, BACKLOG_PAGE).await?;
            if batch.expired.is_some() || batch.lost.is_some() {
                // Trimmed or lost while counting: what was counted stands, as a lower bound.
                more = true;
                break;
            }
            for item in &batch.events {
                read += 1;
                let FamilyEvent::Completion(event) = &item.event else { continue };
                let partition = event.execution_id.partition();
                let Some(position) = reading.get(&partition) else { continue };
                let lane = if lanes_are_partitions { partition } else { 0 };
                if item.pos.lane == lane && (Position { lane: 0, ..item.pos }) > *position {
                    *counts.entry(partition).or_default() += 1;
                }
            }
            at.join(&batch.end);
            if !batch.full {
                break;
            }
            if read >= BACKLOG_READ {
                more = true;
                break;
            }
        }
        for (partition, count) in counts {
            out.insert(partition, Backlog::Events { count, more });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_id_prints_and_parses_back() {
        let id =
            ParkedId { partition: 17, position: Position { lane: 0, major: 0, hi: 1_700, lo: 3, minor: 0, check: 0 } };
        assert_eq!(id.to_string(), "17/0-1700-3-0");
        assert_eq!(id.to_string().parse::<ParkedId>().expect("parses"), id);
        for bad in ["", "17", "256/0-0-0-0", "1/0-0-0", "x/0-0-0-0", "1/0-0-0-99999999999"] {
            assert!(matches!(bad.parse::<ParkedId>(), Err(Error::Validation { .. })), "{bad}");
        }
    }
}

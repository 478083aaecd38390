//! What a member knows between heartbeats, with no I/O: the partitions it holds (token,
//! acknowledged position, how far it has read, whether it cannot read them), the events it
//! handed out and has not acknowledged, the replayed parked events it handed out, how far its
//! read of the tree has got, and where a new read must start. The member's tasks and the
//! subscription share it behind a mutex; its rules are unit-tested without a server.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::subscription::Stalled;
use crate::backends::groups::{Ack, Lease};
use crate::cursor::{
    Frontier, Position, StreamCursor, VALKEY_LEGACY_LANE, decode_event_frontier, encode_valkey_frontier,
};
use crate::error::Error;
use crate::event::CompletionEvent;
use crate::types::TimestampMs;

/// Cursors of events whose partition moved away, remembered so that their `ack` answers
/// `Fenced` rather than "never delivered" (the oldest are forgotten beyond this many).
const MOVED_KEPT: usize = 16_384;

/// One partition the member holds.
#[derive(Debug)]
struct Held {
    token: u64,
    /// The stored acknowledged position (lane 0).
    acked: Position,
    /// How far the member has read it (delivered, passed over, or acknowledged): later events
    /// only.
    delivered: Position,
    /// The read generation from which this partition's events may be delivered: a partition
    /// gained (or rewound) mid-read waits for a read that starts at its position.
    readable_from: u64,
    /// Delivered and not acknowledged, in order: position, cursor, commit time.
    pending: VecDeque<(Position, StreamCursor, TimestampMs)>,
    /// Why it cannot be read: its position names events the backend no longer has. It is held
    /// and left unread until an operator moves its position (a new token).
    stalled: Option<Stalled>,
}

/// A handed-out event's place, the token of the lease it was handed out under, and which
/// admission it was (a copy read before a rewind or a move is another admission).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Delivered {
    partition: u16,
    position: Position,
    token: u64,
    admission: u64,
}

/// What a heartbeat changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Change {
    /// Partitions gained (or re-tokened): the tree must be read again from their positions.
    pub gained: usize,
    /// Partitions lost.
    pub lost: usize,
}

/// What acknowledging a handed-out event writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AckOf {
    /// An event read from its partition: its partition's position moves past it.
    Position(Ack),
    /// A replayed parked event: it is no longer parked.
    Parked(Ack),
}

/// The member's book of partitions and handed-out events.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// Valkey: each partition is its own lane; elsewhere one lane holds every partition.
    lanes_are_partitions: bool,
    held: BTreeMap<u16, Held>,
    by_cursor: HashMap<StreamCursor, Delivered>,
    /// Replayed parked events handed out and not settled.
    replays: HashMap<StreamCursor, Delivered>,
    /// Cursors handed out whose partition moved away, oldest first.
    moved: HashMap<StreamCursor, u16>,
    moved_order: VecDeque<StreamCursor>,
    /// The generation of the newest read plan (raised when partitions are gained or rewound).
    generation: u64,
    admissions: u64,
    /// The newest frontier a read of the tree has passed entirely (every event up to it was
    /// taken by the member), with that read's generation.
    progress: Option<(u64, Frontier)>,
}

/// One partition's local numbers, for stats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldStats {
    pub partition: u16,
    pub token: u64,
    pub acked: Position,
    pub unacked: usize,
    pub oldest_unacked: Option<TimestampMs>,
    pub stalled: Option<Stalled>,
}

/// The highest position at or below `p` that a group store keeps exactly. A Postgres row's
/// position names the row's partition key, which the stores do not keep (a stored position is
/// past every row of its event id): a watermark there is lowered to past the previous event id,
/// so that a row of another partition with the same event id is never passed over.
fn storable_floor(p: Position) -> Position {
    if p.minor == 0 || p.postgres_key() == Position::AFTER_EVERY_KEY {
        return p;
    }
    Position::postgres_without_key(p.major, p.hi, p.postgres_event_id().saturating_sub(1))
}

impl Ledger {
    pub(crate) fn new(lanes_are_partitions: bool) -> Self {
        Self {
            lanes_are_partitions,
            held: BTreeMap::new(),
            by_cursor: HashMap::new(),
            replays: HashMap::new(),
            moved: HashMap::new(),
            moved_order: VecDeque::new(),
            generation: 0,
            admissions: 0,
            progress: None,
        }
    }

    /// Whether each partition is its own lane (known once the backend is connected).
    pub(crate) fn set_lanes_are_partitions(&mut self, lanes_are_partitions: bool) {
        self.lanes_are_partitions = lanes_are_partitions;
    }

    /// The newest read plan's generation.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Partitions held now.
    pub(crate) fn held(&self) -> impl Iterator<Item = u16> + '_ {
        self.held.keys().copied()
    }

    /// Takes a heartbeat's answer: keeps what is still held with the same token (its
    /// acknowledged position moved up), forgets what was lost (its handed-out events now answer
    /// `Fenced`), and starts gained or re-tokened partitions at their acknowledged position
    /// from the next read generation.
    pub(crate) fn apply(&mut self, leases: &[Lease]) -> Change {
        let mut change = Change::default();
        let now_held: BTreeMap<u16, &Lease> = leases.iter().map(|l| (l.partition, l)).collect();
        let lost: Vec<u16> = self.held.keys().filter(|p| !now_held.contains_key(p)).copied().collect();
        for partition in lost {
            self.forget(partition);
            change.lost += 1;
        }
        let next_generation = self.generation + 1;
        for (partition, lease) in now_held {
            match self.held.get_mut(&partition) {
                Some(held) if held.token == lease.token => {
                    held.acked = held.acked.max(lease.acked);
                    held.delivered = held.delivered.max(held.acked);
                    self.prune(partition);
                }
                _ => {
                    self.forget(partition);
                    self.held.insert(
                        partition,
                        Held {
                            token: lease.token,
                            acked: lease.acked,
                            delivered: lease.acked,
                            readable_from: next_generation,
                            pending: VecDeque::new(),
                            stalled: None,
                        },
                    );
                    change.gained += 1;
                }
            }
        }
        if change.gained > 0 {
            self.generation = next_generation;
        }
        change
    }

    /// Drops a partition: what it handed out is remembered as moved.
    fn forget(&mut self, partition: u16) {
        let Some(held) = self.held.remove(&partition) else { return };
        for (_, cursor, _) in held.pending {
            self.by_cursor.remove(&cursor);
            self.remember_moved(cursor, partition);
        }
        let replays: Vec<StreamCursor> =
            self.replays.iter().filter(|(_, d)| d.partition == partition).map(|(c, _)| c.clone()).collect();
        for cursor in replays {
            self.replays.remove(&cursor);
            self.remember_moved(cursor, partition);
        }
    }

    fn remember_moved(&mut self, cursor: StreamCursor, partition: u16) {
        if self.moved.insert(cursor.clone(), partition).is_none() {
            self.moved_order.push_back(cursor);
        }
        while self.moved_order.len() > MOVED_KEPT {
            if let Some(old) = self.moved_order.pop_front() {
                self.moved.remove(&old);
            }
        }
    }

    /// Drops pending events at or below the acknowledged position.
    fn prune(&mut self, partition: u16) {
        let Some(held) = self.held.get_mut(&partition) else { return };
        while held.pending.front().is_some_and(|(pos, _, _)| *pos <= held.acked) {
            if let Some((_, cursor, _)) = held.pending.pop_front() {
                self.by_cursor.remove(&cursor);
            }
        }
    }

    /// `partition`'s position in `frontier` (lane 0).
    fn lane_position(&self, frontier: &Frontier, partition: u16) -> Position {
        let lane = if self.lanes_are_partitions { partition } else { 0 };
        Position { lane: 0, ..frontier.get(lane) }
    }

    /// The event's position in its partition.
    fn position_of(&self, event: &CompletionEvent) -> Result<Position, Error> {
        let frontier = decode_event_frontier(&event.cursor)?
            .ok_or_else(|| Error::validation("a delivered event has an empty cursor"))?;
        Ok(self.lane_position(&frontier, event.execution_id.partition()))
    }

    /// Whether to hand out `event`, read by a read of `generation`: its partition is held,
    /// readable and readable in that read, and it is after what was read there. Records it as
    /// pending and returns its admission (see [`Self::is_current`]).
    ///
    /// On Valkey the event's cursor becomes the event's own place, its partition's stream id
    /// (a frontier naming that lane only): a read's cursor names every lane it has read, and
    /// two reads that interleave the lanes differently can give two different events the same
    /// cursor, which could then not tell them apart when acknowledged.
    ///
    /// # Errors
    /// A cursor that names no position (a bug of the reader, not of the subscriber).
    pub(crate) fn admit(&mut self, event: &mut CompletionEvent, generation: u64) -> Result<Option<u64>, Error> {
        let partition = event.execution_id.partition();
        let position = self.position_of(event)?;
        let Some(held) = self.held.get_mut(&partition) else { return Ok(None) };
        if generation < held.readable_from || held.stalled.is_some() || position <= held.delivered {
            return Ok(None);
        }
        held.delivered = position;
        if self.lanes_are_partitions {
            event.cursor = encode_valkey_frontier(&[(partition, position.hi, position.lo)]);
        }
        held.pending.push_back((position, event.cursor.clone(), event.at));
        self.admissions += 1;
        let delivered = Delivered { partition, position, token: held.token, admission: self.admissions };
        self.moved.remove(&event.cursor);
        self.by_cursor.insert(event.cursor.clone(), delivered);
        Ok(Some(self.admissions))
    }

    /// Records a replayed parked event of `partition` at `position` to hand out, unless its
    /// partition is not held or it is out already; returns its admission.
    pub(crate) fn admit_replay(&mut self, event: &CompletionEvent, partition: u16, position: Position) -> Option<u64> {
        let held = self.held.get(&partition)?;
        if self.replays.contains_key(&event.cursor) {
            return None;
        }
        self.admissions += 1;
        let delivered = Delivered { partition, position, token: held.token, admission: self.admissions };
        self.moved.remove(&event.cursor);
        self.replays.insert(event.cursor.clone(), delivered);
        Some(self.admissions)
    }

    /// Whether the event handed out as `admission` is still this member's to hand out: its
    /// partition is held under the token it was admitted under, it is not acknowledged, and it
    /// was not read again since (after its partition moved away and back, or was rewound).
    pub(crate) fn is_current(&self, cursor: &StreamCursor, admission: u64) -> bool {
        let current = |d: &Delivered| d.admission == admission && self.still_held(d);
        self.by_cursor.get(cursor).is_some_and(current) || self.replays.get(cursor).is_some_and(current)
    }

    /// Whether `delivered`'s partition is still held under the token it was delivered under.
    fn still_held(&self, delivered: &Delivered) -> bool {
        self.held.get(&delivered.partition).is_some_and(|held| held.token == delivered.token)
    }

    /// The handed-out event of `cursor`: whether a replay, and where.
    fn handed_out(&self, cursor: &StreamCursor) -> Result<(bool, Delivered), Error> {
        let found = match (self.replays.get(cursor), self.by_cursor.get(cursor)) {
            (Some(d), _) => (true, *d),
            (None, Some(d)) => (false, *d),
            (None, None) => {
                return Err(match self.moved.get(cursor) {
                    Some(partition) => Error::Fenced {
                        detail: format!(
                            "partition {partition} moved to another member, which delivers its events again"
                        ),
                    },
                    None => Error::validation(format!(
                        "cursor {cursor} was not delivered to this subscription or was already acknowledged"
                    )),
                });
            }
        };
        if !self.still_held(&found.1) {
            return Err(Error::Fenced {
                detail: format!(
                    "partition {} moved to another member, which delivers its events again",
                    found.1.partition
                ),
            });
        }
        Ok(found)
    }

    /// The ack for a handed-out, not yet acknowledged event's cursor (acknowledging an event
    /// read from its partition acknowledges every earlier one of its partition).
    ///
    /// # Errors
    /// [`Error::Fenced`] when its partition moved away; [`Error::Validation`] for a cursor this
    /// member did not hand out or already acknowledged.
    pub(crate) fn ack_for(&self, cursor: &StreamCursor) -> Result<AckOf, Error> {
        let (replayed, d) = self.handed_out(cursor)?;
        let ack = Ack { partition: d.partition, token: d.token, position: d.position };
        Ok(if replayed { AckOf::Parked(ack) } else { AckOf::Position(ack) })
    }

    /// The acks of `cursors` (unknown ones skipped): one per partition for the highest of the
    /// events read from partitions, and one per replayed parked event.
    pub(crate) fn acks_for(&self, cursors: &[StreamCursor]) -> (Vec<Ack>, Vec<Ack>) {
        let mut best: BTreeMap<u16, Ack> = BTreeMap::new();
        let mut parked = Vec::new();
        for ack in cursors.iter().filter_map(|c| self.ack_for(c).ok()) {
            match ack {
                AckOf::Position(ack) => {
                    let slot = best.entry(ack.partition).or_insert(ack);
                    if ack.position > slot.position {
                        *slot = ack;
                    }
                }
                AckOf::Parked(ack) => parked.push(ack),
            }
        }
        (best.into_values().collect(), parked)
    }

    /// Records acks the store accepted.
    pub(crate) fn acked(&mut self, acks: &[Ack]) {
        for ack in acks {
            if let Some(held) = self.held.get_mut(&ack.partition).filter(|h| h.token == ack.token) {
                held.acked = held.acked.max(ack.position);
                held.delivered = held.delivered.max(held.acked);
                self.prune(ack.partition);
            }
        }
    }

    /// Records replayed parked events the store settled.
    pub(crate) fn settled(&mut self, acks: &[Ack]) {
        self.replays.retain(|_, d| !acks.iter().any(|a| a.partition == d.partition && a.position == d.position));
    }

    /// After a refused event was delivered again (a retry): its partition is read again from
    /// it, with every later event handed out (earlier ones stay handed out).
    pub(crate) fn rewind(&mut self, partition: u16, position: Position) {
        let next_generation = self.generation + 1;
        let Some(held) = self.held.get_mut(&partition) else { return };
        let mut again = Vec::new();
        while held.pending.back().is_some_and(|(pos, _, _)| *pos >= position) {
            if let Some((_, cursor, _)) = held.pending.pop_back() {
                again.push(cursor);
            }
        }
        held.delivered = held.pending.back().map_or(held.acked, |(pos, _, _)| *pos).max(held.acked);
        held.readable_from = next_generation;
        self.generation = next_generation;
        for cursor in again {
            self.by_cursor.remove(&cursor);
        }
    }

    /// Notes how far the read of `generation` has got: every event up to `through` was taken.
    /// Partitions readable in that read have read that far.
    pub(crate) fn set_progress(&mut self, generation: u64, through: Frontier) {
        let lanes_are_partitions = self.lanes_are_partitions;
        for (partition, held) in &mut self.held {
            if held.readable_from <= generation && held.stalled.is_none() {
                let lane = if lanes_are_partitions { *partition } else { 0 };
                held.delivered = held.delivered.max(Position { lane: 0, ..through.get(lane) });
            }
        }
        self.progress = Some((generation, through));
    }

    /// Acks that move held partitions with nothing handed out and unacknowledged up to where
    /// the read has got: nothing of theirs is left up to there (lease and signal entries,
    /// completions the filter leaves out, or nothing at all). Without them such a partition
    /// would keep an old position, which retention removes from under it.
    pub(crate) fn watermark_acks(&self) -> Vec<Ack> {
        let Some((generation, through)) = &self.progress else { return Vec::new() };
        self.held
            .iter()
            .filter(|(_, h)| h.readable_from <= *generation && h.stalled.is_none() && h.pending.is_empty())
            .map(|(partition, h)| Ack {
                partition: *partition,
                token: h.token,
                position: storable_floor(self.lane_position(through, *partition)),
            })
            .filter(|ack| self.held.get(&ack.partition).is_some_and(|h| h.acked < ack.position))
            .collect()
    }

    /// Where a read of the tree starts so that every held partition that can be read
    /// continues after what it read: the lowest such position on a one-lane backend; per lane
    /// on Valkey (lanes not read, the single stream of earlier versions among them, start at
    /// `tail`: their events are not wanted). `None` when nothing is to be read.
    pub(crate) fn read_from(&self, tail: &Frontier) -> Option<Frontier> {
        let readable: Vec<(u16, &Held)> =
            self.held.iter().filter(|(_, h)| h.stalled.is_none()).map(|(p, h)| (*p, h)).collect();
        if readable.is_empty() {
            return None;
        }
        if self.lanes_are_partitions {
            let mine = readable.iter().map(|(p, h)| h.delivered.in_lane(*p));
            let others = tail.positions().iter().copied().filter(|p| {
                p.lane == VALKEY_LEGACY_LANE || !readable.iter().any(|(partition, _)| *partition == p.lane)
            });
            Some(Frontier::from_positions(mine.chain(others)))
        } else {
            readable.iter().map(|(_, h)| h.delivered).min().map(Frontier::at)
        }
    }

    /// A read from `asked` ([`Self::read_from`]) was refused (its cursor expired, with `oldest`
    /// the oldest position kept, or its history is lost): stalls the partitions whose read
    /// cannot go on, for `why`, and returns them. On Valkey those of the lanes
    /// `oldest` names above `asked`; on one lane those below `oldest`, or, when no oldest
    /// position is known, those at the lowest position (the next read tells about the rest).
    pub(crate) fn stall(&mut self, asked: &Frontier, oldest: Option<&Frontier>, why: &Stalled) -> Vec<u16> {
        let lanes_are_partitions = self.lanes_are_partitions;
        let lowest = asked.single();
        let stalled: Vec<u16> = self
            .held
            .iter()
            .filter(|(_, h)| h.stalled.is_none())
            .filter(|(partition, h)| match (oldest, lanes_are_partitions) {
                (Some(oldest), true) => oldest.get(**partition) > asked.get(**partition),
                (Some(oldest), false) => h.delivered < Position { lane: 0, ..oldest.single() },
                (None, true) => true,
                (None, false) => h.delivered <= Position { lane: 0, ..lowest },
            })
            .map(|(p, _)| *p)
            .collect();
        for partition in &stalled {
            if let Some(held) = self.held.get_mut(partition) {
                held.stalled = Some(why.clone());
            }
        }
        stalled
    }

    /// Events handed out and not acknowledged, per held partition (for the heartbeat).
    pub(crate) fn unacked(&self) -> Vec<(u16, u32)> {
        self.held.iter().map(|(p, h)| (*p, u32::try_from(h.pending.len()).unwrap_or(u32::MAX))).collect()
    }

    /// Local numbers of every held partition.
    pub(crate) fn stats(&self) -> Vec<HeldStats> {
        self.held
            .iter()
            .map(|(partition, held)| HeldStats {
                partition: *partition,
                token: held.token,
                acked: held.acked,
                unacked: held.pending.len(),
                oldest_unacked: held.pending.front().map(|(_, _, at)| *at),
                stalled: held.stalled.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;

//! What a member knows between heartbeats, with no I/O: the partitions it holds (token,
//! acknowledged position, how far it has delivered), the events it delivered and has not yet
//! acknowledged, and where a new read of the tree must start. The member task and the
//! subscription share it behind a mutex; its rules are unit-tested without a server.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::backends::groups::{Ack, Lease};
use crate::cursor::{Frontier, Position, StreamCursor, decode_event_frontier, encode_valkey_frontier};
use crate::error::Error;
use crate::event::CompletionEvent;
use crate::types::{PARTITION_COUNT, TimestampMs};

/// One partition the member holds.
#[derive(Debug)]
struct Held {
    token: u64,
    /// The stored acknowledged position (lane 0).
    acked: Position,
    /// The last position delivered (or acknowledged): later events only.
    delivered: Position,
    /// The read generation from which this partition's events may be delivered: a partition
    /// gained mid-read waits for a read that starts at its acknowledged position.
    readable_from: u64,
    /// Delivered and not acknowledged, in order: position, cursor, commit time.
    pending: VecDeque<(Position, StreamCursor, TimestampMs)>,
}

/// A delivered event's place and the token of the lease it was delivered under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Delivered {
    partition: u16,
    position: Position,
    token: u64,
}

/// What a heartbeat changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Change {
    /// Partitions gained (or re-tokened): the tree must be read again from their positions.
    pub gained: usize,
    /// Partitions lost.
    pub lost: usize,
    /// Partitions held before and after whose token changed: another incarnation of this
    /// member id rejoined in between.
    pub retokened: usize,
}

/// The member's book of partitions and pending acknowledgements.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// Valkey: each partition is its own lane; elsewhere one lane holds every partition.
    lanes_are_partitions: bool,
    held: BTreeMap<u16, Held>,
    by_cursor: HashMap<StreamCursor, Delivered>,
    /// The generation of the newest read plan (raised when partitions are gained).
    generation: u64,
    /// On a one-lane backend, the position of the last event a read of this generation
    /// passed on (any partition's): every held partition readable in it has seen all of its
    /// events up to there.
    read_through: Option<(u64, Position)>,
}

/// One partition's local numbers, for stats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldStats {
    pub partition: u16,
    pub token: u64,
    pub acked: Position,
    pub unacked: usize,
    pub oldest_unacked: Option<TimestampMs>,
}

impl Ledger {
    pub(crate) fn new(lanes_are_partitions: bool) -> Self {
        Self {
            lanes_are_partitions,
            held: BTreeMap::new(),
            by_cursor: HashMap::new(),
            generation: 0,
            read_through: None,
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
    /// acknowledged position moved up), forgets what was lost (its pending events can no
    /// longer be acknowledged), and starts gained partitions at their acknowledged position
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
                held => {
                    if held.is_some() {
                        change.retokened += 1;
                    }
                    self.forget(partition);
                    self.held.insert(
                        partition,
                        Held {
                            token: lease.token,
                            acked: lease.acked,
                            delivered: lease.acked,
                            readable_from: next_generation,
                            pending: VecDeque::new(),
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

    fn forget(&mut self, partition: u16) {
        if let Some(held) = self.held.remove(&partition) {
            for (_, cursor, _) in held.pending {
                self.by_cursor.remove(&cursor);
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

    /// The event's position in its partition.
    fn position_of(&self, event: &CompletionEvent) -> Result<Position, Error> {
        let frontier = decode_event_frontier(&event.cursor)?
            .ok_or_else(|| Error::validation("a delivered event has an empty cursor"))?;
        let lane = if self.lanes_are_partitions { event.execution_id.partition() } else { 0 };
        Ok(Position { lane: 0, ..frontier.get(lane) })
    }

    /// Whether to deliver `event`, read by a read of `generation`: its partition is held and
    /// readable in that read, and it is after what was delivered there. Records it as pending
    /// and returns the token of the lease it is delivered under (see [`Self::is_current`]).
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
        if !self.lanes_are_partitions && self.read_through.is_none_or(|(g, p)| g < generation || p < position) {
            self.read_through = Some((generation, position));
        }
        let Some(held) = self.held.get_mut(&partition) else { return Ok(None) };
        if generation < held.readable_from || position <= held.delivered {
            return Ok(None);
        }
        held.delivered = position;
        if self.lanes_are_partitions {
            event.cursor = encode_valkey_frontier(&[(partition, position.hi, position.lo)]);
        }
        held.pending.push_back((position, event.cursor.clone(), event.at));
        let token = held.token;
        self.by_cursor.insert(event.cursor.clone(), Delivered { partition, position, token });
        Ok(Some(token))
    }

    /// Whether an event delivered under `token` is still this member's to handle: its
    /// partition is held under that token and the event is not acknowledged. An event read
    /// before its partition moved away and came back (a new token) is not: the read from the
    /// stored position delivers it again.
    pub(crate) fn is_current(&self, cursor: &StreamCursor, token: u64) -> bool {
        self.by_cursor.get(cursor).is_some_and(|d| d.token == token && self.still_held(d))
    }

    /// Whether `delivered`'s partition is still held under the token it was delivered under.
    fn still_held(&self, delivered: &Delivered) -> bool {
        self.held.get(&delivered.partition).is_some_and(|held| held.token == delivered.token)
    }

    /// The ack for a delivered, not yet acknowledged event's cursor (acknowledging it
    /// acknowledges every earlier event of its partition).
    ///
    /// # Errors
    /// [`Error::Validation`] for a cursor this member did not deliver or already
    /// acknowledged, or of a partition it no longer holds.
    pub(crate) fn ack_for(&self, cursor: &StreamCursor) -> Result<Ack, Error> {
        let delivered = self.by_cursor.get(cursor).ok_or_else(|| {
            Error::validation(format!(
                "cursor {cursor} was not delivered to this subscription, was already acknowledged, or its partition \
                 moved to another member"
            ))
        })?;
        if !self.still_held(delivered) {
            return Err(Error::validation(format!("partition {} is no longer held", delivered.partition)));
        }
        Ok(Ack { partition: delivered.partition, token: delivered.token, position: delivered.position })
    }

    /// One ack per partition for the highest of `cursors` (unknown ones skipped).
    pub(crate) fn acks_for(&self, cursors: &[StreamCursor]) -> Vec<Ack> {
        let mut best: BTreeMap<u16, Ack> = BTreeMap::new();
        for ack in cursors.iter().filter_map(|c| self.ack_for(c).ok()) {
            let slot = best.entry(ack.partition).or_insert(ack);
            if ack.position > slot.position {
                *slot = ack;
            }
        }
        best.into_values().collect()
    }

    /// Acks that move idle partitions up to where the read has got: a held partition with
    /// nothing unacknowledged has no event left up to the last position the current read
    /// passed on (one-lane backends order every partition in one sequence). Without them a
    /// partition with rare events keeps an old position, and every new read would start there.
    pub(crate) fn watermark_acks(&self) -> Vec<Ack> {
        let Some((generation, through)) = self.read_through else { return Vec::new() };
        if self.lanes_are_partitions {
            return Vec::new();
        }
        self.held
            .iter()
            .filter(|(_, h)| h.readable_from <= generation && h.pending.is_empty() && h.acked < through)
            .map(|(partition, h)| Ack { partition: *partition, token: h.token, position: through })
            .collect()
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

    /// Where a read of the tree starts so that every held partition continues after what it
    /// delivered: the lowest such position on a one-lane backend; per lane on Valkey (lanes
    /// not held start at `tail`, their events are not wanted). `None` when nothing is held.
    pub(crate) fn read_from(&self, tail: &Frontier) -> Option<Frontier> {
        if self.held.is_empty() {
            return None;
        }
        if self.lanes_are_partitions {
            let positions = (0..PARTITION_COUNT).map(|lane| match self.held.get(&lane) {
                Some(held) => held.delivered.in_lane(lane),
                None => tail.get(lane),
            });
            Some(Frontier::from_positions(positions))
        } else {
            self.held.values().map(|h| h.delivered).min().map(Frontier::at)
        }
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
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::encode_sqlite_cursor;
    use crate::event::CompletionOutcome;
    use crate::types::ExecutionId;

    fn event(partition: u16, id: i64) -> CompletionEvent {
        let execution = ExecutionId::from_parts(partition, uuid::Uuid::new_v4());
        CompletionEvent::new(encode_sqlite_cursor(id), execution, CompletionOutcome::Success, TimestampMs(id))
    }

    fn lease(partition: u16, token: u64, acked: u64) -> Lease {
        Lease { partition, token, acked: Position::new(0, acked) }
    }

    #[test]
    fn only_held_partitions_after_their_position_are_admitted_once() {
        let mut ledger = Ledger::new(false);
        assert_eq!(ledger.apply(&[lease(1, 1, 10), lease(2, 1, 5)]), Change { gained: 2, lost: 0, retokened: 0 });
        let generation = ledger.generation();
        assert!(ledger.admit(&mut event(1, 9), generation).unwrap().is_none(), "at or below the acknowledged position");
        assert!(ledger.admit(&mut event(1, 11), generation).unwrap().is_some());
        assert!(ledger.admit(&mut event(1, 11), generation).unwrap().is_none(), "a replay of a delivered event");
        assert!(ledger.admit(&mut event(3, 12), generation).unwrap().is_none(), "a partition held by another member");
        assert!(ledger.admit(&mut event(2, 6), generation).unwrap().is_some());
        assert_eq!(ledger.read_from(&Frontier::default()), Some(Frontier::at(Position::new(0, 6))));
    }

    #[test]
    fn a_gained_partition_waits_for_a_read_from_its_position() {
        let mut ledger = Ledger::new(false);
        ledger.apply(&[lease(1, 1, 10)]);
        let first = ledger.generation();
        assert!(ledger.admit(&mut event(1, 20), first).unwrap().is_some());
        ledger.apply(&[lease(1, 1, 10), lease(2, 4, 3)]);
        assert!(
            ledger.admit(&mut event(2, 21), first).unwrap().is_none(),
            "the old read skipped partition 2's earlier events"
        );
        assert_eq!(ledger.read_from(&Frontier::default()), Some(Frontier::at(Position::new(0, 3))));
        let second = ledger.generation();
        assert!(second > first);
        assert!(
            ledger.admit(&mut event(1, 15), second).unwrap().is_none(),
            "partition 1 continues after what it delivered"
        );
        assert!(ledger.admit(&mut event(2, 4), second).unwrap().is_some());
    }

    #[test]
    fn acks_need_a_delivered_cursor_carry_the_token_and_prune() {
        let mut ledger = Ledger::new(false);
        ledger.apply(&[lease(7, 3, 0)]);
        let g = ledger.generation();
        let (mut a, mut b) = (event(7, 1), event(7, 2));
        ledger.admit(&mut a, g).unwrap();
        ledger.admit(&mut b, g).unwrap();
        assert!(matches!(ledger.ack_for(&encode_sqlite_cursor(99)), Err(Error::Validation { .. })));
        let ack = ledger.ack_for(&b.cursor).unwrap();
        assert_eq!(ack, Ack { partition: 7, token: 3, position: Position::new(0, 2) });
        assert_eq!(ledger.acks_for(&[a.cursor.clone(), b.cursor.clone()]), vec![ack]);
        ledger.acked(&[ack]);
        assert!(ledger.ack_for(&a.cursor).is_err(), "acknowledging b acknowledged a");
        assert_eq!(ledger.stats()[0].unacked, 0);
    }

    #[test]
    fn a_lost_or_re_tokened_partition_forgets_its_pending_events() {
        let mut ledger = Ledger::new(false);
        ledger.apply(&[lease(1, 1, 0), lease(2, 1, 0)]);
        let g = ledger.generation();
        let (mut a, mut b) = (event(1, 1), event(2, 2));
        assert_eq!(ledger.admit(&mut a, g).unwrap(), Some(1));
        assert_eq!(ledger.admit(&mut b, g).unwrap(), Some(1));
        assert!(ledger.is_current(&b.cursor, 1));
        assert_eq!(ledger.apply(&[lease(2, 2, 0)]), Change { gained: 1, lost: 1, retokened: 1 });
        assert!(ledger.ack_for(&a.cursor).is_err());
        assert!(ledger.ack_for(&b.cursor).is_err(), "delivered under token 1, which is fenced now");
        assert!(!ledger.is_current(&a.cursor, 1) && !ledger.is_current(&b.cursor, 1));
        let generation = ledger.generation();
        assert_eq!(ledger.admit(&mut b, generation).unwrap(), Some(2), "redelivered from the acknowledged position");
        // The copy read under token 1 and still waiting to be handed out is not current; the
        // one read again under token 2 is, and acknowledges with token 2.
        assert!(!ledger.is_current(&b.cursor, 1), "a copy read before the partition came back");
        assert!(ledger.is_current(&b.cursor, 2));
        assert_eq!(ledger.ack_for(&b.cursor).unwrap().token, 2);
        ledger.acked(&[ledger.ack_for(&b.cursor).unwrap()]);
        assert!(!ledger.is_current(&b.cursor, 2), "acknowledged");
    }

    #[test]
    fn idle_partitions_move_up_to_where_the_read_has_got() {
        let mut ledger = Ledger::new(false);
        ledger.apply(&[lease(1, 1, 0), lease(2, 1, 0), lease(3, 1, 0)]);
        let g = ledger.generation();
        let mut busy = event(1, 10);
        assert!(ledger.admit(&mut busy, g).unwrap().is_some());
        assert!(
            ledger.admit(&mut event(9, 12), g).unwrap().is_none(),
            "another member's partition still moves the read"
        );
        let acks = ledger.watermark_acks();
        assert_eq!(
            acks.iter().map(|a| (a.partition, a.position)).collect::<Vec<_>>(),
            [(2, Position::new(0, 12)), (3, Position::new(0, 12))]
        );
        ledger.acked(&acks);
        assert!(ledger.admit(&mut event(2, 11), g).unwrap().is_none(), "below its new position");
        // A partition gained later waits for a read of its own generation.
        ledger.apply(&[lease(1, 1, 0), lease(2, 1, 12), lease(3, 1, 12), lease(4, 7, 0)]);
        assert!(ledger.watermark_acks().iter().all(|a| a.partition != 4));
        assert!(Ledger::new(true).watermark_acks().is_empty());
    }

    #[test]
    fn on_valkey_each_partition_reads_from_its_own_lane() {
        let mut ledger = Ledger::new(true);
        ledger.apply(&[Lease { partition: 4, token: 1, acked: Position::new(100, 2) }]);
        let tail = Frontier::from_positions([Position::new(500, 0).in_lane(4), Position::new(700, 1).in_lane(9)]);
        let from = ledger.read_from(&tail).unwrap();
        assert_eq!(from.get(4), Position::new(100, 2).in_lane(4));
        assert_eq!(from.get(9), Position::new(700, 1).in_lane(9));
        let cursor = crate::cursor::encode_valkey_frontier(&[(4, 100, 3), (9, 700, 1)]);
        let execution = ExecutionId::from_parts(4, uuid::Uuid::new_v4());
        let mut event = CompletionEvent::new(cursor, execution, CompletionOutcome::Success, TimestampMs(1));
        let generation = ledger.generation();
        assert!(ledger.admit(&mut event, generation).unwrap().is_some());
        assert_eq!(ledger.ack_for(&event.cursor).unwrap().position, Position::new(100, 3));
        assert_eq!(event.cursor, crate::cursor::encode_valkey_frontier(&[(4, 100, 3)]), "the event's own place");
    }

    #[test]
    fn on_valkey_two_events_that_two_reads_gave_one_cursor_stay_apart() {
        // Read 1 passed x (lane 2) then e (lane 7); read 2 passed e then x: after both, each
        // read's frontier is the same, so e's cursor in read 1 is x's cursor in read 2.
        let mut ledger = Ledger::new(true);
        ledger.apply(&[lease(2, 1, 0), lease(7, 1, 0)]);
        let generation = ledger.generation();
        let same = crate::cursor::encode_valkey_frontier(&[(2, 50, 0), (7, 60, 0)]);
        let at = |partition: u16| {
            let execution = ExecutionId::from_parts(partition, uuid::Uuid::new_v4());
            CompletionEvent::new(same.clone(), execution, CompletionOutcome::Success, TimestampMs(1))
        };
        let (mut e, mut x) = (at(7), at(2));
        assert!(ledger.admit(&mut e, generation).unwrap().is_some());
        assert!(ledger.admit(&mut x, generation).unwrap().is_some());
        assert_ne!(e.cursor, x.cursor);
        let ack = ledger.ack_for(&x.cursor).unwrap();
        ledger.acked(&[ack]);
        assert_eq!(ledger.ack_for(&e.cursor).unwrap().partition, 7, "acknowledging x left e acknowledgeable");
    }
}

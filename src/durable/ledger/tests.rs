use super::*;
use crate::cursor::encode_sqlite_cursor;
use crate::event::CompletionOutcome;
use crate::types::ExecutionId;

fn event(partition: u16, id: i64) -> CompletionEvent {
    let execution = ExecutionId::from_parts(partition, uuid::Uuid::new_v4());
    CompletionEvent::new(encode_sqlite_cursor(id), execution, CompletionOutcome::Success, TimestampMs(id))
}

fn lease(partition: u16, token: u64, acked: u64) -> Lease {
    Lease { partition, token, acked: Position::new(0, acked), parked: 0, replays: 0 }
}

fn position(ack: AckOf) -> Ack {
    match ack {
        AckOf::Position(ack) => ack,
        AckOf::Parked(ack) => panic!("a replay: {ack:?}"),
    }
}

#[test]
fn only_held_partitions_after_their_position_are_admitted_once() {
    let mut ledger = Ledger::new(false);
    assert_eq!(ledger.apply(&[lease(1, 1, 10), lease(2, 1, 5)]), Change { gained: 2, lost: 0 });
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
    let ack = position(ledger.ack_for(&b.cursor).unwrap());
    assert_eq!(ack, Ack { partition: 7, token: 3, position: Position::new(0, 2) });
    assert_eq!(ledger.acks_for(&[a.cursor.clone(), b.cursor.clone()]), (vec![ack], vec![]));
    ledger.acked(&[ack]);
    assert!(matches!(ledger.ack_for(&a.cursor), Err(Error::Validation { .. })), "acknowledging b acknowledged a");
    assert_eq!(ledger.stats()[0].unacked, 0);
}

#[test]
fn a_lost_or_re_tokened_partition_forgets_its_pending_events_and_their_acks_are_fenced() {
    let mut ledger = Ledger::new(false);
    ledger.apply(&[lease(1, 1, 0), lease(2, 1, 0)]);
    let g = ledger.generation();
    let (mut a, mut b) = (event(1, 1), event(2, 2));
    let first_a = ledger.admit(&mut a, g).unwrap().expect("admitted");
    let first_b = ledger.admit(&mut b, g).unwrap().expect("admitted");
    assert!(ledger.is_current(&b.cursor, first_b));
    assert_eq!(ledger.apply(&[lease(2, 2, 0)]), Change { gained: 1, lost: 1 });
    assert!(matches!(ledger.ack_for(&a.cursor), Err(Error::Fenced { .. })), "partition 1 moved away");
    assert!(matches!(ledger.ack_for(&b.cursor), Err(Error::Fenced { .. })), "delivered under token 1, fenced now");
    assert!(!ledger.is_current(&a.cursor, first_a) && !ledger.is_current(&b.cursor, first_b));
    let generation = ledger.generation();
    let again = ledger.admit(&mut b, generation).unwrap().expect("redelivered from the acknowledged position");
    // The copy read under token 1 and still waiting to be handed out is not current; the one
    // read again under token 2 is, and acknowledges with token 2.
    assert!(!ledger.is_current(&b.cursor, first_b), "a copy read before the partition came back");
    assert!(ledger.is_current(&b.cursor, again));
    let ack = position(ledger.ack_for(&b.cursor).unwrap());
    assert_eq!(ack.token, 2);
    ledger.acked(&[ack]);
    assert!(!ledger.is_current(&b.cursor, again), "acknowledged");
    assert!(matches!(ledger.ack_for(&b.cursor), Err(Error::Validation { .. })), "acknowledged, not moved");
}

#[test]
fn a_rewound_partition_reads_its_refused_event_and_the_later_ones_again_and_drops_the_copies_read_before() {
    let mut ledger = Ledger::new(false);
    ledger.apply(&[lease(4, 1, 0), lease(5, 1, 0)]);
    let g = ledger.generation();
    let mut events: Vec<CompletionEvent> = [1, 2, 3].map(|id| event(4, id)).into();
    let admitted: Vec<u64> = events.iter_mut().map(|e| ledger.admit(e, g).unwrap().expect("admitted")).collect();
    let mut other = event(5, 4);
    ledger.admit(&mut other, g).unwrap();
    ledger.rewind(4, Position::new(0, 2));
    assert!(ledger.is_current(&events[0].cursor, admitted[0]), "the event before the refused one stays handed out");
    assert!(!ledger.is_current(&events[1].cursor, admitted[1]) && !ledger.is_current(&events[2].cursor, admitted[2]));
    assert_eq!(ledger.read_from(&Frontier::default()), Some(Frontier::at(Position::new(0, 1))));
    let next = ledger.generation();
    assert!(ledger.admit(&mut events[1], g).unwrap().is_none(), "the old read does not hand it out again");
    let again = ledger.admit(&mut events[1], next).unwrap().expect("the refused event again");
    assert!(ledger.is_current(&events[1].cursor, again));
    assert!(!ledger.is_current(&events[1].cursor, admitted[1]), "the copy read before the rewind");
    assert!(ledger.admit(&mut other, next).unwrap().is_none(), "the other partition goes on where it was");
}

#[test]
fn held_partitions_with_nothing_unacknowledged_move_up_to_where_the_read_has_got() {
    let mut ledger = Ledger::new(false);
    ledger.apply(&[lease(1, 1, 0), lease(2, 1, 0), lease(3, 1, 0)]);
    let g = ledger.generation();
    assert!(ledger.watermark_acks().is_empty(), "the read has passed nothing yet");
    let mut busy = event(1, 10);
    assert!(ledger.admit(&mut busy, g).unwrap().is_some());
    ledger.set_progress(g, Frontier::at(Position::new(0, 12)));
    let acks = ledger.watermark_acks();
    assert_eq!(
        acks.iter().map(|a| (a.partition, a.position)).collect::<Vec<_>>(),
        [(2, Position::new(0, 12)), (3, Position::new(0, 12))],
        "partition 1 has an event handed out and not acknowledged"
    );
    ledger.acked(&acks);
    assert!(ledger.admit(&mut event(2, 11), g).unwrap().is_none(), "below its new position");
    assert_eq!(ledger.read_from(&Frontier::default()), Some(Frontier::at(Position::new(0, 12))), "read on from there");
    // A partition gained later waits for a read of its own generation.
    ledger.apply(&[lease(1, 1, 0), lease(2, 1, 12), lease(3, 1, 12), lease(4, 7, 0)]);
    ledger.set_progress(g, Frontier::at(Position::new(0, 20)));
    assert!(ledger.watermark_acks().iter().all(|a| a.partition != 4));
}

#[test]
fn a_postgres_watermark_inside_a_transaction_stops_short_of_the_rows_sharing_its_event_id() {
    let mut ledger = Ledger::new(false);
    ledger.apply(&[lease(9, 1, 0)]);
    let g = ledger.generation();
    let row = Position::postgres(9, 700, 42, 3, 0);
    ledger.set_progress(g, Frontier::at(row));
    let ack = ledger.watermark_acks()[0];
    assert!(ack.position < Position::postgres(9, 700, 42, 9, 0), "partition 9's row of event 42 is not passed");
    assert_eq!(ack.position, Position::postgres_without_key(9, 700, 41));
    let end = Position::postgres(11, 0, 0, Position::postgres_key_word(None), 0);
    ledger.set_progress(g, Frontier::at(end));
    assert_eq!(ledger.watermark_acks()[0].position, end, "a batch's end is kept as it is");
}

#[test]
fn on_valkey_each_partition_reads_from_its_own_lane_and_the_old_single_stream_from_the_tail() {
    let mut ledger = Ledger::new(true);
    ledger.apply(&[Lease { partition: 4, token: 1, acked: Position::new(100, 2), parked: 0, replays: 0 }]);
    let tail = Frontier::from_positions([
        Position::new(500, 0).in_lane(4),
        Position::new(700, 1).in_lane(9),
        Position::new(30, 0).in_lane(VALKEY_LEGACY_LANE),
    ]);
    let from = ledger.read_from(&tail).unwrap();
    assert_eq!(from.get(4), Position::new(100, 2).in_lane(4));
    assert_eq!(from.get(9), Position::new(700, 1).in_lane(9));
    assert_eq!(from.get(VALKEY_LEGACY_LANE), Position::new(30, 0).in_lane(VALKEY_LEGACY_LANE), "never read again");
    let cursor = crate::cursor::encode_valkey_frontier(&[(4, 100, 3), (9, 700, 1)]);
    let execution = ExecutionId::from_parts(4, uuid::Uuid::new_v4());
    let mut event = CompletionEvent::new(cursor, execution, CompletionOutcome::Success, TimestampMs(1));
    let generation = ledger.generation();
    assert!(ledger.admit(&mut event, generation).unwrap().is_some());
    assert_eq!(position(ledger.ack_for(&event.cursor).unwrap()).position, Position::new(100, 3));
    assert_eq!(event.cursor, crate::cursor::encode_valkey_frontier(&[(4, 100, 3)]), "the event's own place");
    // The read passes lease entries of lane 4: the partition moves with it once its event is
    // acknowledged.
    ledger.set_progress(generation, Frontier::from_positions([Position::new(900, 0).in_lane(4)]));
    assert!(ledger.watermark_acks().is_empty(), "an event is handed out and not acknowledged");
    ledger.acked(&[position(ledger.ack_for(&event.cursor).unwrap())]);
    assert_eq!(ledger.watermark_acks()[0].position, Position::new(900, 0));
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
    let ack = position(ledger.ack_for(&x.cursor).unwrap());
    ledger.acked(&[ack]);
    assert_eq!(position(ledger.ack_for(&e.cursor).unwrap()).partition, 7, "acknowledging x left e acknowledgeable");
}

#[test]
fn a_refused_read_stalls_exactly_the_partitions_that_cannot_go_on_and_the_rest_reads_on() {
    let expired = Stalled::Expired { oldest: None };
    // One lane: those below the oldest position kept.
    let mut ledger = Ledger::new(false);
    ledger.apply(&[lease(1, 1, 5), lease(2, 1, 9), lease(3, 1, 20)]);
    let asked = ledger.read_from(&Frontier::default()).unwrap();
    let oldest = Frontier::at(Position::new(0, 10));
    assert_eq!(ledger.stall(&asked, Some(&oldest), &expired), [1, 2]);
    assert_eq!(ledger.read_from(&Frontier::default()), Some(Frontier::at(Position::new(0, 20))));
    let g = ledger.generation();
    assert!(ledger.admit(&mut event(1, 30), g).unwrap().is_none(), "a stalled partition hands nothing out");
    ledger.set_progress(g, Frontier::at(Position::new(0, 40)));
    assert_eq!(ledger.watermark_acks().iter().map(|a| a.partition).collect::<Vec<_>>(), [3], "nor moves");
    assert_eq!(ledger.stats()[0].stalled, Some(expired.clone()));
    // A lost history without an oldest position: the lowest first.
    let lost = Stalled::HistoryLost { reason: "restored".into() };
    let mut ledger = Ledger::new(false);
    ledger.apply(&[lease(1, 1, 5), lease(2, 1, 5), lease(3, 1, 20)]);
    let asked = ledger.read_from(&Frontier::default()).unwrap();
    assert_eq!(ledger.stall(&asked, None, &lost), [1, 2]);
    // An operator's move (a new token) makes it readable again.
    ledger.apply(&[lease(1, 2, 50), lease(2, 1, 5), lease(3, 1, 20)]);
    assert_eq!(ledger.stats()[0].stalled, None);
    assert_eq!(ledger.stats()[1].stalled, Some(lost));
    // Valkey: the lanes whose oldest kept entry is above where the read asked to start.
    let mut ledger = Ledger::new(true);
    ledger.apply(&[lease(1, 1, 5), lease(2, 1, 5)]);
    let asked = ledger.read_from(&Frontier::default()).unwrap();
    let oldest = Frontier::from_positions([Position::new(0, 5).in_lane(1), Position::new(0, 8).in_lane(2)]);
    assert_eq!(ledger.stall(&asked, Some(&oldest), &expired), [2]);
    assert_eq!(ledger.read_from(&Frontier::default()).map(|f| f.positions().len()), Some(1));
}

#[test]
fn a_replayed_parked_event_acknowledges_as_parked_once_per_admission() {
    let mut ledger = Ledger::new(false);
    ledger.apply(&[lease(6, 3, 50)]);
    let parked = event(6, 40);
    let admission = ledger.admit_replay(&parked, 6, Position::new(0, 40)).expect("held");
    assert!(ledger.admit_replay(&parked, 6, Position::new(0, 40)).is_none(), "out already");
    assert!(ledger.is_current(&parked.cursor, admission));
    let Ok(AckOf::Parked(ack)) = ledger.ack_for(&parked.cursor) else { panic!("a replay") };
    assert_eq!(ack, Ack { partition: 6, token: 3, position: Position::new(0, 40) });
    assert_eq!(ledger.acks_for(std::slice::from_ref(&parked.cursor)), (vec![], vec![ack]));
    ledger.settled(&[ack]);
    assert!(matches!(ledger.ack_for(&parked.cursor), Err(Error::Validation { .. })));
    assert!(ledger.admit_replay(&event(7, 1), 7, Position::new(0, 1)).is_none(), "a partition not held");
}

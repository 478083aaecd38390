//! The filter's mode machine, dedupe, lag and start resolution, against the in-memory backend:
//! no server, no supervisor, milliseconds per test.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tokio::sync::{mpsc, oneshot};

use super::{Filter, FilterArguments, FilterMsg, SubscribeReply};
use crate::actors::ids::SubscriberId;
use crate::actors::request::{Event, TailWait};
use crate::actors::shared::{FilterMode, ListenerShared, LiveBatch, SubscriberShared};
use crate::actors::sink::{FamilySink, Out};
use crate::backends::StartAt;
use crate::backends::memory::MemorySource;
use crate::config::BackendRetry;
use crate::cursor::{Frontier, StreamCursor, encode_sqlite_cursor};
use crate::error::Error;
use crate::event::CompletionEvent;
use crate::lease_history::{LeaseHistoryEvent, LeaseHistoryFilter};
use crate::types::ExecutionId;

const WAIT: Duration = Duration::from_secs(10);

type Events = mpsc::Receiver<Result<CompletionEvent, Error>>;

struct Bed {
    source: Arc<MemorySource>,
    listener: Arc<ListenerShared>,
    shared: Arc<SubscriberShared>,
    filter: ActorRef<FilterMsg>,
    events: Events,
    answer: oneshot::Receiver<Result<SubscriberId, Error>>,
}

/// A new subscriber's filter with a `buffer`-event channel, over `source`.
async fn bed(source: Arc<MemorySource>, shared: SubscriberShared, buffer: usize) -> Bed {
    spawn(source, shared, buffer, true).await
}

/// A filter restarted for a subscriber already answered (its start already resolved).
async fn restarted(source: Arc<MemorySource>, shared: SubscriberShared, buffer: usize) -> Bed {
    spawn(source, shared, buffer, false).await
}

/// A filter of subscriber `id` delivering the events of `E` that match `filter` into `tx`,
/// from the subscription in `shared`, over `source`; `reply` is the pending subscribe call.
fn arguments<E: Event>(
    id: u64,
    source: &Arc<MemorySource>,
    filter: E::Filter,
    tx: mpsc::Sender<Result<E, Error>>,
    shared: Arc<SubscriberShared>,
    reply: Option<SubscribeReply>,
) -> FilterArguments {
    let family = E::FAMILY.expect("a family the backends produce");
    FilterArguments {
        subscriber_id: SubscriberId(id),
        name: None,
        source: source.clone(),
        sink: Arc::new(FamilySink { family, filter, out: Out::Channel(tx), passed: None }),
        shared,
        listener: Arc::new(ListenerShared::default()),
        backend_id: "memory".into(),
        batch_size: 4,
        retry: BackendRetry::new(2, 1, 3, 0),
        reply,
    }
}

async fn spawn(source: Arc<MemorySource>, shared: SubscriberShared, buffer: usize, new: bool) -> Bed {
    let (tx, events) = mpsc::channel(buffer);
    let (reply, answer) = oneshot::channel();
    let shared = Arc::new(shared);
    let args =
        arguments::<CompletionEvent>(1, &source, Default::default(), tx, shared.clone(), new.then(|| reply.into()));
    let listener = args.listener.clone();
    let (filter, _) = Actor::spawn(None, Filter, args).await.expect("spawn the filter");
    Bed { source, listener, shared, filter, events, answer }
}

/// The batch a listener would fan out after reading events `after + 1 ..= upto`, the first of
/// them being the `after + 1`-th event it read.
fn live(source: &MemorySource, after: u64, upto: u64) -> Arc<LiveBatch> {
    Arc::new(LiveBatch {
        first_index: after,
        start: Frontier::at(MemorySource::position(after)),
        end: Frontier::at(MemorySource::position(upto)),
        events: source.events_between(after, upto),
    })
}

fn from_start() -> SubscriberShared {
    SubscriberShared::new(encode_sqlite_cursor(0), None)
}

async fn answered(bed: &mut Bed) -> Result<SubscriberId, Error> {
    tokio::time::timeout(WAIT, &mut bed.answer).await.expect("answered in time").expect("an answer")
}

async fn take(events: &mut Events, n: usize) -> Vec<ExecutionId> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Some(Ok(event))) => out.push(event.execution_id),
            other => panic!("after {} of {n} events: {other:?}", out.len()),
        }
    }
    out
}

async fn nothing_more(events: &mut Events) {
    if let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(50), events.recv()).await {
        panic!("expected nothing more, got {item:?}");
    }
}

async fn wait_for_mode(shared: &SubscriberShared, mode: FilterMode) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while shared.mode() != mode {
        assert!(tokio::time::Instant::now() < deadline, "still {:?}, not {mode:?}", shared.mode());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn live_batches_delivered_twice_or_overlapping_reach_the_subscriber_once_in_order() {
    let mut bed = bed(MemorySource::new(), from_start(), 64).await;
    answered(&mut bed).await.expect("subscribed");
    wait_for_mode(&bed.shared, FilterMode::Live).await;
    let ids = bed.source.commit(5);
    for (after, upto) in [(0, 3), (0, 3), (1, 5), (4, 5)] {
        bed.filter.cast(FilterMsg::Live(live(&bed.source, after, upto))).expect("cast");
    }
    assert_eq!(take(&mut bed.events, 5).await, ids);
    nothing_more(&mut bed.events).await;
    assert_eq!(bed.source.reads(), 1, "no catch-up read: the live batches were contiguous");
}

#[tokio::test]
async fn a_gap_between_live_batches_is_read_from_the_backend() {
    let mut bed = bed(MemorySource::new(), from_start(), 64).await;
    answered(&mut bed).await.expect("subscribed");
    wait_for_mode(&bed.shared, FilterMode::Live).await;
    let ids = bed.source.commit(6);
    bed.filter.cast(FilterMsg::Live(live(&bed.source, 0, 2))).expect("cast");
    bed.filter.cast(FilterMsg::Live(live(&bed.source, 4, 6))).expect("cast");
    assert_eq!(take(&mut bed.events, 6).await, ids);
    nothing_more(&mut bed.events).await;
    assert!(bed.shared.catch_up_reads.load(std::sync::atomic::Ordering::Relaxed) >= 2);
}

#[tokio::test]
async fn a_full_sink_blocks_drops_live_batches_then_catches_up_everything_in_order() {
    let mut bed = bed(MemorySource::new(), from_start(), 2).await;
    answered(&mut bed).await.expect("subscribed");
    wait_for_mode(&bed.shared, FilterMode::Live).await;
    let mut ids = bed.source.commit(6);
    bed.filter.cast(FilterMsg::Live(live(&bed.source, 0, 6))).expect("cast");
    wait_for_mode(&bed.shared, FilterMode::Blocked).await;
    ids.extend(bed.source.commit(5));
    bed.filter.cast(FilterMsg::Live(live(&bed.source, 6, 11))).expect("cast");
    let deadline = tokio::time::Instant::now() + WAIT;
    while bed.shared.live_batches_dropped.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the blocked filter never dropped the live batch");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(take(&mut bed.events, 11).await, ids, "the dropped batch came back through catch-up reads");
    wait_for_mode(&bed.shared, FilterMode::Live).await;
    nothing_more(&mut bed.events).await;
}

#[tokio::test]
async fn a_start_and_catch_up_reads_that_lose_their_connection_are_retried_until_they_deliver() {
    let source = MemorySource::new();
    let ids = source.commit(9);
    source.fail_next_calls(2);
    let mut bed = bed(source.clone(), from_start(), 64).await;
    // The resolution failed: the subscriber is answered at once and started once it works.
    answered(&mut bed).await.expect("subscribed");
    assert_eq!(take(&mut bed.events, 9).await, ids);
    wait_for_mode(&bed.shared, FilterMode::Live).await;

    let shared = SubscriberShared::new(encode_sqlite_cursor(0), None);
    shared.resolve(StartAt::after(Frontier::at(MemorySource::position(0))), None);
    let reads = source.reads();
    source.fail_next_calls(3);
    let mut bed = restarted(source, shared, 64).await;
    assert_eq!(take(&mut bed.events, 9).await, ids);
    assert!(bed.source.reads() - reads >= 6, "three failed reads, then three of at most four events");
    wait_for_mode(&bed.shared, FilterMode::Live).await;
}

#[tokio::test]
async fn a_trimmed_cursor_is_refused_at_subscribe_and_ends_a_restarted_filter_with_cursor_expired() {
    let source = MemorySource::new();
    source.commit(10);
    source.trim_to(5);
    let mut refused = bed(source.clone(), SubscriberShared::new(encode_sqlite_cursor(2), None), 8).await;
    match answered(&mut refused).await {
        Err(Error::CursorExpired { oldest: Some(oldest) }) => assert_eq!(oldest, encode_sqlite_cursor(5)),
        other => panic!("expected CursorExpired, got {other:?}"),
    }
    // A filter restarted from a delivered cursor that was trimmed meanwhile.
    let shared = SubscriberShared::new(encode_sqlite_cursor(6), None);
    shared.resolve(StartAt::after(Frontier::at(MemorySource::position(6))), None);
    source.trim_to(8);
    let mut again = restarted(source, shared, 8).await;
    match tokio::time::timeout(WAIT, again.events.recv()).await {
        Ok(Some(Err(Error::CursorExpired { oldest: Some(_) }))) => {}
        other => panic!("expected CursorExpired on the stream, got {other:?}"),
    }
}

#[tokio::test]
async fn a_tail_subscription_made_while_the_backend_is_down_waits_and_starts_at_the_listeners_first_cursor() {
    let source = MemorySource::new();
    source.set_down(true);
    let mut bed = bed(source, SubscriberShared::new(StreamCursor::empty(), None), 64).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut bed.answer).await.is_err(),
        "no answer while nobody can tell the tail"
    );
    assert_eq!(bed.shared.mode(), FilterMode::Starting);
    // The backend comes back with history; the listener reads its tail first.
    bed.source.commit(3);
    bed.listener.set_cursor(Frontier::at(MemorySource::position(3)));
    let later = bed.source.commit(2);
    bed.filter.cast(FilterMsg::Live(live(&bed.source, 3, 5))).expect("cast");
    answered(&mut bed).await.expect("answered once the listener has a position");
    bed.source.set_down(false);
    assert_eq!(take(&mut bed.events, 2).await, later, "from the listener's first cursor, nothing before");
    nothing_more(&mut bed.events).await;
}

#[tokio::test]
async fn a_tail_subscription_that_says_not_to_wait_is_refused_at_once_while_the_backend_is_down() {
    let source = MemorySource::new();
    source.set_down(true);
    let shared = SubscriberShared::new(StreamCursor::empty(), None).with_tail_wait(TailWait::FailFast);
    let mut refused = bed(source.clone(), shared, 64).await;
    match answered(&mut refused).await {
        Err(err @ Error::Unavailable { .. }) => assert!(err.is_transient(), "{err:?}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // With a position the tree read, it need not wait: it starts there.
    let fallback = Some(Frontier::at(MemorySource::position(0)));
    let shared = SubscriberShared::new(StreamCursor::empty(), fallback).with_tail_wait(TailWait::FailFast);
    let mut started = bed(source, shared, 64).await;
    answered(&mut started).await.expect("started at the tree's last read");
}

#[tokio::test]
async fn a_tail_subscription_made_during_an_outage_starts_at_the_listeners_last_cursor() {
    let source = MemorySource::new();
    source.commit(4);
    source.set_down(true);
    let fallback = Some(Frontier::at(MemorySource::position(2)));
    let mut bed = bed(source, SubscriberShared::new(StreamCursor::empty(), fallback), 64).await;
    answered(&mut bed).await.expect("answered while the backend is down");
    bed.source.set_down(false);
    let ids = bed
        .source
        .events_between(2, 4)
        .iter()
        .filter_map(|e| e.event.completion().map(|c| c.execution_id))
        .collect::<Vec<_>>();
    assert_eq!(take(&mut bed.events, 2).await, ids, "what the listener had not read yet");
}

#[tokio::test]
async fn lag_in_events_counts_what_the_listener_read_past_the_subscriber() {
    let mut bed = bed(MemorySource::new(), SubscriberShared::new(StreamCursor::empty(), None), 64).await;
    bed.listener.set_cursor(Frontier::at(MemorySource::position(0)));
    answered(&mut bed).await.expect("subscribed");
    wait_for_mode(&bed.shared, FilterMode::Live).await;
    assert_eq!(bed.shared.lag_events(&bed.listener), Some(0));
    bed.source.commit(7);
    bed.listener.advance(&Frontier::at(MemorySource::position(7)), 7);
    assert_eq!(bed.shared.lag_events(&bed.listener), Some(7), "read by the listener, not delivered yet");
    bed.filter.cast(FilterMsg::Live(live(&bed.source, 0, 7))).expect("cast");
    take(&mut bed.events, 7).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while bed.shared.lag_events(&bed.listener) != Some(0) {
        assert!(tokio::time::Instant::now() < deadline, "lag {:?}", bed.shared.lag_events(&bed.listener));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A start off the listener's path (a Postgres cursor of an earlier form, read as a whole
/// snapshot) takes no live batch until its own reads reach that path: a live batch that seems to
/// continue from its position is dropped, and its reads deliver everything once, in order.
#[tokio::test]
async fn a_start_off_the_listeners_path_takes_no_live_batch_until_its_reads_reach_it() {
    let source = MemorySource::new();
    let ids = source.commit(10);
    source.set_read_alone_until(Some(MemorySource::position(10)));
    source.set_read_delay(Duration::from_millis(20));
    let mut bed = bed(source, from_start(), 64).await;
    answered(&mut bed).await.expect("subscribed");
    bed.filter.cast(FilterMsg::Live(live(&bed.source, 0, 10))).expect("cast a live batch");
    assert_eq!(take(&mut bed.events, 10).await, ids);
    let dropped = bed.shared.live_batches_dropped.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dropped, 1, "the live batch was not taken as a continuation");
}

/// A lease-history subscriber's filter with a `buffer`-event channel (worker filter `worker`,
/// if any), from the start of `source`.
async fn lease_bed(
    source: Arc<MemorySource>,
    worker: Option<&str>,
    buffer: usize,
) -> (ActorRef<FilterMsg>, mpsc::Receiver<Result<LeaseHistoryEvent, Error>>) {
    let (tx, rx) = mpsc::channel(buffer);
    let filter = worker.map_or_else(LeaseHistoryFilter::new, |w| LeaseHistoryFilter::new().with_worker(w.into()));
    let args = arguments::<LeaseHistoryEvent>(2, &source, filter, tx, Arc::new(from_start()), None);
    let (filter, _) = Actor::spawn(None, Filter, args).await.expect("spawn the filter");
    (filter, rx)
}

#[tokio::test]
async fn a_lease_filter_delivers_its_family_only_once_each_in_order_through_live_and_catch_up() {
    let source = MemorySource::new();
    let mut expected = Vec::new();
    for _ in 0..3 {
        source.commit(2);
        expected.extend(source.commit_leases(2, "w1"));
        source.commit_leases(1, "w2");
    }
    // A buffer of 2: the filter blocks, drops live batches and catches up from the backend.
    let (filter, mut rx) = lease_bed(source.clone(), Some("w1"), 2).await;
    for (after, upto) in [(0, 5), (3, 10), (5, 15)] {
        filter.cast(FilterMsg::Live(live(&source, after, upto))).expect("cast");
    }
    let mut got = Vec::new();
    while got.len() < expected.len() {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(Ok(event))) => got.push(event),
            other => panic!("after {} events: {other:?}", got.len()),
        }
    }
    assert_eq!(got.iter().map(|e| *e.execution_id()).collect::<Vec<_>>(), expected);
    for event in &got {
        assert_eq!(event.cursor().as_bytes()[1], crate::cursor::LEASE_HISTORY_CURSOR_TAG, "{event:?}");
    }
    assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv()).await.is_err(), "nothing more");
}

#[tokio::test]
async fn a_completion_filter_passes_over_other_families() {
    let source = MemorySource::new();
    let mut ids = source.commit(2);
    source.commit_leases(3, "w");
    ids.extend(source.commit(2));
    let mut bed = bed(source, from_start(), 64).await;
    answered(&mut bed).await.expect("subscribed");
    assert_eq!(take(&mut bed.events, 4).await, ids);
    nothing_more(&mut bed.events).await;
    assert_eq!(bed.shared.delivered_count.load(std::sync::atomic::Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_family_its_backend_does_not_produce_is_refused_as_unavailable_once_the_backend_answers() {
    let source = MemorySource::new();
    source.set_completions_only(true);
    let (tx, rx) = mpsc::channel::<Result<LeaseHistoryEvent, Error>>(4);
    let (reply, answer) = oneshot::channel();
    let args = arguments(3, &source, LeaseHistoryFilter::new(), tx, Arc::new(from_start()), Some(reply.into()));
    let _filter = Actor::spawn(None, Filter, args).await.expect("spawn the filter");
    match tokio::time::timeout(WAIT, answer).await {
        Ok(Ok(Err(Error::Unavailable { detail, .. }))) => assert!(detail.contains("lease history"), "{detail}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    drop(rx);
}

//! The listener against the in-memory backend: a dropped notification connection, rows held
//! back by an open transaction, slow reads. No server, milliseconds per test.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::Actor;

use super::{Listener, ListenerArguments};
use crate::actors::shared::ListenerShared;
use crate::backends::memory::MemorySource;
use crate::cursor::{Frontier, Position};

const WAIT: Duration = Duration::from_secs(10);

async fn spawn(source: Arc<MemorySource>) -> (Arc<ListenerShared>, tokio::task::JoinHandle<()>) {
    let shared = Arc::new(ListenerShared::default());
    let args = ListenerArguments {
        backend_id: "memory".into(),
        source,
        shared: shared.clone(),
        fanout: Arc::default(),
        // Long enough that only wake-ups and held-back re-polls read in these tests.
        tick: Duration::from_secs(3600),
        held_back_repoll: Duration::from_millis(2),
        batch_size: 3,
    };
    let (_, join) = Actor::spawn(None, Listener, args).await.expect("spawn the listener");
    (shared, join)
}

async fn wait_for_cursor(shared: &ListenerShared, pos: Position) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while shared.cursor() != Some(Frontier::at(pos)) {
        assert!(tokio::time::Instant::now() < deadline, "cursor {:?}, not {pos:?}", shared.cursor());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_listener_starts_at_the_tail_and_reads_every_committed_event_in_batches() {
    let source = MemorySource::new();
    source.commit(2);
    let (shared, _join) = spawn(source.clone()).await;
    wait_for_cursor(&shared, MemorySource::position(2)).await;
    assert_eq!(shared.first_cursor.get(), Some(&Frontier::at(MemorySource::position(2))));
    source.commit(7);
    wait_for_cursor(&shared, MemorySource::position(9)).await;
    assert_eq!(shared.events_read.load(Ordering::Relaxed), 7, "history before the start is not read");
}

#[tokio::test]
async fn a_dropped_notification_connection_ends_the_listener_with_a_transient_error() {
    let source = MemorySource::new();
    let (shared, join) = spawn(source.clone()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !shared.became_live.load(Ordering::Relaxed) {
        assert!(tokio::time::Instant::now() < deadline, "the first read never worked");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    source.drop_connections();
    tokio::time::timeout(WAIT, join).await.expect("the listener ends").expect("join");
    assert!(!shared.live.load(Ordering::Relaxed));
    let error = shared.last_error.lock().map(|e| e.clone()).unwrap_or(None).expect("the error is kept");
    assert!(error.contains("the connection failed"), "{error}");
}

#[tokio::test]
async fn a_listener_whose_reads_fail_from_the_start_never_counts_as_live() {
    let source = MemorySource::new();
    // The notification connection opens; every read fails, as on a dropped outbox table.
    source.break_reads();
    let (shared, join) = spawn(source).await;
    tokio::time::timeout(WAIT, join).await.expect("the listener ends").expect("join");
    assert!(!shared.became_live.load(Ordering::Relaxed), "connected, but no read ever worked");
}

#[tokio::test]
async fn rows_held_back_by_an_open_transaction_are_read_again_without_a_wake_up() {
    let source = MemorySource::new();
    let (shared, _join) = spawn(source.clone()).await;
    wait_for_cursor(&shared, Position::ZERO).await;
    source.hold_back(2);
    source.commit(5);
    wait_for_cursor(&shared, MemorySource::position(3)).await;
    // Released with no commit and no notification: only the held-back re-poll finds them.
    source.hold_back(0);
    wait_for_cursor(&shared, MemorySource::position(5)).await;
}

#[tokio::test]
async fn wake_ups_during_a_slow_read_are_not_lost() {
    let source = MemorySource::new();
    let (shared, _join) = spawn(source.clone()).await;
    wait_for_cursor(&shared, Position::ZERO).await;
    source.set_read_delay(Duration::from_millis(20));
    for _ in 0..5 {
        source.commit(2);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for_cursor(&shared, MemorySource::position(10)).await;
    assert_eq!(shared.events_read.load(Ordering::Relaxed), 10);
}

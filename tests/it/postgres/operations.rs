//! What operators do to a database, with real servers: a crash under asynchronous commit, a
//! restored base backup older than a cursor, `pg_dump`/`pg_restore` into a new cluster. A
//! cursor the database cannot honour is refused by name ([`Error::CursorHistoryLost`]),
//! never stalled on or read against the wrong snapshot, and the tree goes on by itself for
//! tails and fresh subscribers.

use super::*;
use crate::support::postgres::{PrivatePg, Settings, connect_when_up};
use ff_completions::{Completions, Error};

/// Commits are asynchronous and the WAL writer waits 10 s: a crash loses what the last 10 s of
/// asynchronous commits wrote, as a server with `synchronous_commit = off` does.
const ASYNC_COMMIT: Settings = &[("synchronous_commit", "off"), ("wal_writer_delay", "10000ms")];

/// A base backup needs full page writes.
const BACKUP_READY: Settings = &[("synchronous_commit", "on"), ("full_page_writes", "on")];

async fn engine_on(url: &str) -> Arc<PostgresEngine> {
    Arc::new(PostgresEngine::connect(&BackendConfig::postgres(url)).await.expect("engine"))
}

async fn tree_on(url: &str) -> CompletionSupervisorHandle {
    CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(url)))
        .await
        .expect("spawn")
        .0
}

/// The subscription from `cursor` is refused as history this database does not have, naming
/// why, with the tail of the history it does have.
async fn assert_history_lost(tree: &CompletionSupervisorHandle, cursor: &StreamCursor) -> StreamCursor {
    match tree.subscribe(Completions::from_cursor(cursor.clone())).await {
        Err(Error::CursorHistoryLost { reason, tail: Some(tail) }) => {
            assert!(reason.contains("tick"), "the reason names the tick: {reason}");
            tail
        }
        other => panic!("a cursor of lost history must be refused, got {:?}", other.map(|s| s.id())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_asynchronous_commit_a_crash_keeps_the_ticks_cursors_name_and_a_live_tail_gets_nothing_twice() {
    init_tracing();
    let pg = PrivatePg::start_with(ASYNC_COMMIT).await;
    let url = pg.url();
    let engine = engine_on(&url).await;
    let live_tree = tree_on(&url).await;
    let mut live = live_tree.subscribe(Completions::tail()).await.expect("tail");
    let before = complete_n(&*engine, 10).await;
    let seen = take_events(&mut live, 10, WAIT).await;
    assert_exactly_once(&seen, &before, true);
    let saved = seen[9].cursor.clone();

    pg.stop_immediate().await;
    pg.restart().await;
    drop(connect_when_up(&url).await);

    // A process restarted after the crash resumes from the last cursor it printed.
    let resumed_tree = tree_on(&url).await;
    let mut resumed = resumed_tree.subscribe(Completions::from_cursor(saved)).await.expect("resume");
    let engine = engine_on(&url).await;
    let after = complete_n(&*engine, 5).await;
    assert_exactly_once(&take_events(&mut resumed, 5, WAIT).await, &after, true);
    assert_no_more(&mut resumed, QUIET).await;
    // The tree that lived through the crash delivers them once, and nothing it delivered before.
    assert_exactly_once(&take_events(&mut live, 5, WAIT).await, &after, true);
    assert_no_more(&mut live, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_base_backup_older_than_a_cursor_refuses_it_and_the_tree_goes_on_for_tails() {
    init_tracing();
    let pg = PrivatePg::start_with(BACKUP_READY).await;
    let (url, port) = (pg.url(), pg.port);
    let engine = engine_on(&url).await;
    let tree = tree_on(&url).await;
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    let first = complete_n(&*engine, 10).await;
    assert_exactly_once(&take_events(&mut live, 10, WAIT).await, &first, true);
    let backup = pg.base_backup().await;
    let later = complete_n(&*engine, 20).await;
    let seen = take_events(&mut live, 20, WAIT).await;
    assert_exactly_once(&seen, &later, true);
    let saved = seen[19].cursor.clone();
    drop(engine);
    // The server is replaced by the backup, on the same address: the tree reconnects to it.
    pg.stop_immediate().await;
    drop(pg);
    let restored = PrivatePg::start_from(backup, BACKUP_READY, Some(port)).await;
    let engine = engine_on(&url).await;
    // The live subscriber's history is gone: it ends with the cause, never skips or stalls.
    match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut live)).await {
        Ok(Some(Err(Error::CursorHistoryLost { reason, .. }))) => assert!(reason.contains("tick"), "{reason}"),
        other => panic!("the live subscriber's history was lost: expected CursorHistoryLost, got {other:?}"),
    }
    // Resumed before and after the restored database recorded more ticks than the cursor's.
    assert_history_lost(&tree, &saved).await;
    let mut tail = tree.subscribe(Completions::tail()).await.expect("a tail on the same tree");
    let fresh = complete_n(&*engine, 100).await;
    assert_exactly_once(&take_events(&mut tail, 100, WAIT).await, &fresh, true);
    let tail_cursor = assert_history_lost(&tree, &saved).await;
    let mut from_tail = tree.subscribe(Completions::from_cursor(tail_cursor)).await.expect("from the tail");
    let more = complete_n(&*engine, 3).await;
    assert_exactly_once(&take_events(&mut from_tail, 3, WAIT).await, &more, true);
    assert_exactly_once(&take_events(&mut tail, 3, WAIT).await, &more, true);
    drop(restored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_pg_dump_and_pg_restore_into_a_new_cluster_old_cursors_are_refused_and_new_rows_flow() {
    init_tracing();
    let old = PrivatePg::start().await;
    let old_url = old.url_of("engine");
    let mut admin = connect_when_up(&old.url()).await;
    sqlx::query("CREATE DATABASE engine").execute(&mut admin).await.expect("createdb");
    let engine = engine_on(&old_url).await;
    let tree = tree_on(&old_url).await;
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    // Enough transactions that the old cluster's ids run well ahead of a new cluster's.
    let history = complete_n(&*engine, 300).await;
    let seen = take_events(&mut live, 300, WAIT).await;
    assert_exactly_once(&seen, &history, true);
    tree.shutdown().await;
    drop(engine);

    let new = PrivatePg::start().await;
    old.dump_into("engine", &new, "engine").await;
    let url = new.url_of("engine");
    let engine = engine_on(&url).await;
    let tree = tree_on(&url).await;
    let mut tail = tree.subscribe(Completions::tail()).await.expect("a tail");
    let fresh = complete_n(&*engine, 10).await;
    assert_exactly_once(&take_events(&mut tail, 10, WAIT).await, &fresh, true);
    assert_history_lost(&tree, &seen[299].cursor).await;
    assert_history_lost(&tree, &seen[10].cursor).await;
    // The copied history is still read, as history from before this database's own.
    let mut everything =
        tree.subscribe(Completions::from_cursor(encode_postgres_event_cursor(0))).await.expect("from the start");
    assert_exactly_once(&take_events(&mut everything, 310, WAIT).await, &[&history[..], &fresh[..]].concat(), true);
    assert_no_more(&mut everything, QUIET).await;
}

//! Postgres retention by age: old rows go, new ones stay, cursors below them expire; an age
//! beyond the representable past removes nothing.

use super::*;
use ff_completions::{Completions, Error};

/// A database with rows committed long ago (by their `occurred_at_ms`), each with its cursor,
/// new ones from the engine, and a tree trimming it by age every 50 ms.
async fn aged_outbox(
    max_age: Duration,
    old_times: &[i64],
) -> (Fixture, Vec<(ExecutionId, StreamCursor)>, Vec<ExecutionId>) {
    init_tracing();
    let url = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let mut old = Vec::new();
    for at in old_times {
        let id = insert_row(&mut conn, *at).await;
        old.push((id, cursor_of(&mut conn, id).await));
    }
    let new = complete_n(&*engine, 3).await;
    // Each old row's cursor as the reader hands it out (the earlier form is kept for tests of it).
    for (id, cursor) in &mut old {
        *cursor = reader_cursor_of(&mut conn, *id).await;
    }
    let backend =
        BackendConfig::postgres(&url).with_retention(Retention::max_age(max_age).every(Duration::from_millis(50)));
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend)).await.expect("spawn");
    (Fixture { url, tree, engine }, old, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_removes_old_rows_keeps_new_ones_and_expires_cursors_below_them() {
    let two_hours_ago = TimestampMs::now().0 - 2 * 3_600_000;
    let (f, old, new) = aged_outbox(Duration::from_secs(3_600), &[i64::MIN, 1_000, two_hours_ago]).await;
    wait_until(WAIT, "the trim job to remove the old rows", || async { outbox_order(&f.url).await.len() == new.len() })
        .await;
    assert_eq!(outbox_order(&f.url).await, new, "exactly the rows older than an hour are gone");

    let boundary = old[2].1.clone();
    for (_, below) in &old[..2] {
        match f.tree.subscribe(Completions::from_cursor(below.clone())).await {
            Err(Error::CursorExpired { oldest: Some(oldest) }) => {
                assert_eq!(oldest, boundary, "the oldest cursor is the last trimmed row's")
            }
            other => panic!("a cursor below the trimmed rows must expire, got {:?}", other.map(|s| s.id())),
        }
    }
    let mut resumed = f.tree.subscribe(Completions::from_cursor(boundary)).await.expect("resume at the boundary");
    assert_exactly_once(&take_events(&mut resumed, new.len(), WAIT).await, &new, true);
    let more = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut resumed, 2, WAIT).await, &more, true);
    assert_no_more(&mut resumed, QUIET).await;
    assert_nothing_restarted(&f.tree.stats().await.expect("stats"));
}

const TRIM_WAITING_ON_A_LOCK: &str = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
     AND query LIKE 'SELECT ff_completions_trim%' AND wait_event_type = 'Lock'";

const TRIM_RUNNING: &str = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
     AND query LIKE 'SELECT ff_completions_trim%' AND state = 'active'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_age_beyond_the_representable_past_removes_nothing() {
    let (f, old, new) = aged_outbox(Duration::from_secs(u64::MAX / 2), &[i64::MIN, 0, 1_000]).await;
    // The outbox stays locked until a trim run is seen waiting on it: the job does run.
    let mut locker = PgConnection::connect(&f.url).await.expect("connect");
    let mut tx = sqlx::Connection::begin(&mut locker).await.expect("begin");
    sqlx::query("LOCK TABLE ff_completion_event IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.expect("lock");
    let mut watcher = PgConnection::connect(&f.url).await.expect("connect");
    let started = std::time::Instant::now();
    loop {
        let waiting: i64 =
            sqlx::query_scalar(TRIM_WAITING_ON_A_LOCK).fetch_one(&mut watcher).await.expect("pg_stat_activity");
        if waiting > 0 {
            break;
        }
        assert!(started.elapsed() < WAIT, "no trim run was seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.rollback().await.expect("unlock");
    // That run and a few more (one every 50 ms) finish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    while sqlx::query_scalar::<_, i64>(TRIM_RUNNING).fetch_one(&mut watcher).await.expect("pg_stat_activity") > 0 {
        assert!(started.elapsed() < WAIT, "a trim run never finished");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let old_ids: Vec<ExecutionId> = old.iter().map(|(id, _)| *id).collect();
    assert_eq!(outbox_order(&f.url).await, [&old_ids[..], &new[..]].concat(), "nothing was trimmed");
    let boundaries: i64 = sqlx::query_scalar("SELECT count(*) FROM ff_completion_retention")
        .fetch_one(&mut watcher)
        .await
        .expect("retention");
    assert_eq!(boundaries, 0, "no trim boundary was recorded");
    let mut sub = f.tree.subscribe(Completions::from_cursor(old[0].1.clone())).await.expect("still retained");
    assert_exactly_once(&take_events(&mut sub, 5, WAIT).await, &[&old_ids[1..], &new[..]].concat(), true);
    assert_no_more(&mut sub, QUIET).await;
}

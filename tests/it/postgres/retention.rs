//! Postgres retention in reader order: whole batches go, by the age of their tick or by the
//! count of rows in later batches; cursors below the cut expire; a trim never holds delivery
//! back; a host's own DELETE or TRUNCATE expires exactly the readers that would miss its rows.

use super::*;
use ff_completions::{Completions, Error};

/// Records a tick: what committed before is a batch of its own.
async fn tick(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT ff_completions_tick()").fetch_one(conn).await.expect("tick")
}

/// Makes every tick up to `upto` look `by_ms` older, as time passing would.
async fn age_ticks(conn: &mut PgConnection, upto: i64, by_ms: i64) {
    sqlx::query("UPDATE ff_completion_tick SET created_at_ms = created_at_ms - $2 WHERE tick_id <= $1")
        .bind(upto)
        .bind(by_ms)
        .execute(conn)
        .await
        .expect("age ticks");
}

/// Inserts `n` rows stamped `occurred_at_ms`, one transaction each, then records a tick.
async fn batch_of(conn: &mut PgConnection, n: usize, occurred_at_ms: i64) -> Vec<ExecutionId> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(insert_row(conn, occurred_at_ms).await);
    }
    tick(conn).await;
    ids
}

/// A database with the subsystem installed and no reader running: only the test records ticks.
async fn quiet_database() -> (String, PgConnection) {
    init_tracing();
    let url = fresh_database().await;
    PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("install");
    let conn = PgConnection::connect(&url).await.expect("connect");
    (url, conn)
}

/// Plans a trim and runs its steps to the end, as the trim job does; returns the rows removed.
async fn trim(conn: &mut PgConnection, max_age_ms: Option<i64>, keep: Option<i64>) -> i64 {
    sqlx::query("SELECT ff_completions_trim_plan($1, $2)")
        .bind(max_age_ms)
        .bind(keep)
        .execute(&mut *conn)
        .await
        .expect("plan");
    let mut removed = 0;
    loop {
        let (rows, done): (i64, bool) = sqlx::query_as("SELECT o_rows, o_done FROM ff_completions_trim_step(1000)")
            .fetch_one(&mut *conn)
            .await
            .expect("step");
        removed += rows;
        if done {
            return removed;
        }
    }
}

/// A row stamped long ago (a backfill, a producer with a slow clock) is as old as its batch:
/// age retention goes by when batches were read, so it neither goes early nor takes younger
/// rows with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_retention_never_removes_a_row_younger_than_the_age() {
    let (url, mut conn) = quiet_database().await;
    let two_hours_ago = TimestampMs::now().0 - 2 * 3_600_000;
    let mut rows = batch_of(&mut conn, 100, TimestampMs::now().0).await;
    rows.extend(batch_of(&mut conn, 1, two_hours_ago).await);
    let second = tick(&mut conn).await;
    rows.extend(batch_of(&mut conn, 100, TimestampMs::now().0).await);
    assert_eq!(trim(&mut conn, Some(3_600_000), None).await, 0, "every row is seconds old");
    assert_eq!(outbox_order(&url).await, rows);

    // An hour and a half later (for the first two batches), they go, and only they.
    age_ticks(&mut conn, second, 5_400_000).await;
    assert_eq!(trim(&mut conn, Some(3_600_000), None).await, 101);
    assert_eq!(outbox_order(&url).await, rows[101..]);
}

/// The trim job by age: whole old batches go, cursors below them expire with the oldest
/// cursor, which resumes exactly after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_removes_old_batches_keeps_new_ones_and_expires_cursors_below_them() {
    init_tracing();
    let url = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let mut old = Vec::new();
    for _ in 0..3 {
        let id = insert_row(&mut conn, 1).await;
        old.push((id, reader_cursor_of(&mut conn, id).await));
    }
    let last_old = tick(&mut conn).await;
    age_ticks(&mut conn, last_old, 2 * 3_600_000).await;
    let new = complete_n(&*engine, 3).await;
    let backend = BackendConfig::postgres(&url)
        .with_retention(Retention::max_age(Duration::from_secs(3_600)).every(Duration::from_millis(50)));
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend)).await.expect("spawn");
    wait_until(WAIT, "the trim job to remove the old rows", || async { outbox_order(&url).await.len() == new.len() })
        .await;
    assert_eq!(outbox_order(&url).await, new, "exactly the batches older than an hour are gone");

    let mut oldest = None;
    for (_, below) in &old {
        match tree.subscribe(Completions::from_cursor(below.clone())).await {
            Err(Error::CursorExpired { oldest: Some(o) }) => oldest = Some(o),
            other => panic!("a cursor below the trimmed rows must expire, got {:?}", other.map(|s| s.id())),
        }
    }
    let oldest = oldest.expect("an oldest cursor");
    let mut resumed = tree.subscribe(Completions::from_cursor(oldest)).await.expect("resume at the oldest");
    assert_exactly_once(&take_events(&mut resumed, new.len(), WAIT).await, &new, true);
    let more = complete_n(&*engine, 2).await;
    assert_exactly_once(&take_events(&mut resumed, 2, WAIT).await, &more, true);
    assert_no_more(&mut resumed, QUIET).await;
    assert_nothing_restarted(&tree.stats().await.expect("stats"));
}

/// A transaction that took a low txid and committed last is the newest in reader order, not
/// the oldest: count retention keeping `n` rows never expires a reader fewer than `n` behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_retention_never_expires_a_reader_within_the_kept_count() {
    let f = fixture().await;
    let mut reader = f.tree.subscribe(Completions::tail()).await.expect("a reader");
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let mut late = PgConnection::connect(&f.url).await.expect("connect");
    let mut tx = late.begin().await.expect("begin");
    let l = insert_row(&mut tx, 1).await;
    let mut rows = batch_of(&mut conn, 150, 1).await;
    rows.extend(batch_of(&mut conn, 150, 1).await);
    tx.commit().await.expect("commit L");
    tick(&mut conn).await;
    rows.push(l);
    assert_eq!(reader_order(&f.url).await, rows, "L is read last");

    // A reader 100 rows behind: it has read the first 201.
    let read = take_events(&mut reader, 201, WAIT).await;
    assert_exactly_once(&read, &rows[..201], true);
    let behind = read[200].cursor.clone();
    drop(reader);
    // Whole batches go (the tree's reader records ticks of its own too): at most the 191 that
    // leave 110 rows.
    let removed = trim(&mut conn, None, Some(110)).await;
    assert!((1..=191).contains(&removed), "{removed} removed");
    let mut resumed = f.tree.subscribe(Completions::from_cursor(behind)).await.expect("within the kept count");
    assert_exactly_once(&take_events(&mut resumed, 100, WAIT).await, &rows[201..], true);
    assert_no_more(&mut resumed, QUIET).await;
}

/// History from before the outbox was adopted is the first batch's: it ages with that batch,
/// not at the first trim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_from_before_adoption_age_like_the_rest() {
    init_tracing();
    let url = fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "CREATE TABLE ff_completion_event (event_id bigserial PRIMARY KEY, execution_id uuid, flow_id uuid, \
         outcome text, namespace text, instance_tag text, occurred_at_ms bigint, partition_key smallint)",
    )
    .execute(&mut conn)
    .await
    .expect("a host's outbox");
    let before = [insert_row(&mut conn, 1).await, insert_row(&mut conn, 1).await];
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("adopt");
    let first = tick(&mut conn).await;
    let after = complete_n(&engine, 2).await;
    tick(&mut conn).await;
    assert_eq!(trim(&mut conn, Some(3_600_000), None).await, 0, "all of it is young");
    assert_eq!(outbox_order(&url).await.len(), 4, "the adopted rows are kept");
    age_ticks(&mut conn, first, 2 * 3_600_000).await;
    assert_eq!(trim(&mut conn, Some(3_600_000), None).await, 2);
    let left = outbox_order(&url).await;
    assert!(before.iter().all(|id| !left.contains(id)) && left == after, "{left:?}");
}

/// The cut is recorded first; the deletes run in small transactions that never hold the tick
/// lock: a trim stuck behind a locked row leaves delivery alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_never_holds_delivery_back() {
    let f = fixture().await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let old = batch_of(&mut conn, 20, 1).await;
    let last_old = tick(&mut conn).await;
    age_ticks(&mut conn, last_old, 2 * 3_600_000).await;
    // Another session holds one of the old rows: the trim's delete waits on it.
    let mut holder = PgConnection::connect(&f.url).await.expect("connect");
    let mut held = holder.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM ff_completion_event WHERE execution_id = $1 FOR UPDATE")
        .bind(old[0].uuid())
        .execute(&mut *held)
        .await
        .expect("lock a row");
    let url = f.url.clone();
    let trimming = tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        trim(&mut conn, Some(3_600_000), None).await
    });
    let watcher = sqlx::PgPool::connect(&f.url).await.expect("connect");
    wait_until(WAIT, "the trim to wait on the held row", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
               AND query LIKE '%ff_completions_trim_step%' AND wait_event_type = 'Lock'",
        )
        .fetch_one(&watcher)
        .await
        .expect("pg_stat_activity")
            > 0
    })
    .await;
    let mut live = f.tree.subscribe(Completions::tail()).await.expect("tail");
    let new = complete_n(&*f.engine, 3).await;
    assert_exactly_once(&take_events(&mut live, 3, WAIT).await, &new, true);
    assert!(!trimming.is_finished(), "the trim was still waiting while delivery went on");
    held.rollback().await.expect("release");
    assert_eq!(trimming.await.expect("trim"), 20);
}

/// A host's own DELETE of outbox rows (an outbox clean-up): a reader whose cursor is below a
/// deleted row expires, never skips it; a reader past it, and the live tail, go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_delete_expires_exactly_the_readers_that_would_miss_its_rows() {
    let f = fixture().await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let mut live = f.tree.subscribe(Completions::tail()).await.expect("tail");
    let first = batch_of(&mut conn, 3, 1).await;
    let second = batch_of(&mut conn, 3, 1).await;
    let seen = take_events(&mut live, 6, WAIT).await;
    let (before_first, after_first) = (seen[0].cursor.clone(), seen[2].cursor.clone());
    sqlx::query("DELETE FROM ff_completion_event WHERE execution_id = $1")
        .bind(first[1].uuid())
        .execute(&mut conn)
        .await
        .expect("the host deletes one row");
    match f.tree.subscribe(Completions::from_cursor(before_first)).await {
        Err(Error::CursorExpired { oldest: Some(_) }) => {}
        other => panic!("a reader that would miss the deleted row must expire, got {:?}", other.map(|s| s.id())),
    }
    let mut past = f.tree.subscribe(Completions::from_cursor(after_first)).await.expect("past the deleted row");
    assert_exactly_once(&take_events(&mut past, 3, WAIT).await, &second, true);
    let more = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut live, 2, WAIT).await, &more, true);
}

/// Rows a host deletes before any tick saw them were never readable by anyone: every reader
/// that had not read past them, the live tail included, expires once a tick sees their
/// transaction (the tick lock is held meanwhile, so no reader can see them first). The delete
/// commits while the listener's tick waits for that lock: the tick that then records the
/// transaction must account for the delete, not only a later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_deleted_before_any_tick_saw_them_expire_the_readers_that_missed_them() {
    let f = fixture().await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let mut live = f.tree.subscribe(Completions::tail()).await.expect("tail");
    let before = complete_n(&*f.engine, 2).await;
    let seen = take_events(&mut live, 2, WAIT).await;
    assert_exactly_once(&seen, &before, true);
    let mut ticks = PgConnection::connect(&f.url).await.expect("connect");
    sqlx::query("SELECT pg_advisory_lock(hashtext('ff_completion_tick'), 0)")
        .execute(&mut ticks)
        .await
        .expect("hold the tick lock");
    let gone = insert_row(&mut conn, 1).await;
    let watch = sqlx::PgPool::connect(&f.url).await.expect("connect");
    crate::support::wait_until(WAIT, "the listener's tick waits for the tick lock", || {
        let watch = watch.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
                   AND wait_event_type = 'Lock' AND wait_event = 'advisory')",
            )
            .fetch_one(&watch)
            .await
            .unwrap_or(false)
        }
    })
    .await;
    sqlx::query("DELETE FROM ff_completion_event WHERE execution_id = $1")
        .bind(gone.uuid())
        .execute(&mut conn)
        .await
        .expect("delete before any tick");
    sqlx::query("SELECT pg_advisory_unlock(hashtext('ff_completion_tick'), 0)")
        .execute(&mut ticks)
        .await
        .expect("release the tick lock");
    match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut live)).await {
        Ok(Some(Err(Error::CursorExpired { oldest: Some(_) }))) => {}
        other => panic!("the tail missed a committed row: expected CursorExpired, got {other:?}"),
    }
    // A new tail goes on.
    let mut tail = f.tree.subscribe(Completions::tail()).await.expect("a new tail");
    let after = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut tail, 2, WAIT).await, &after, true);
}

/// TRUNCATE of the outbox: every reader that had not read everything expires; new rows go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_outbox_expires_every_reader_behind_it() {
    let f = fixture().await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let mut live = f.tree.subscribe(Completions::tail()).await.expect("tail");
    batch_of(&mut conn, 3, 1).await;
    let seen = take_events(&mut live, 3, WAIT).await;
    sqlx::query("TRUNCATE ff_completion_event").execute(&mut conn).await.expect("truncate");
    match f.tree.subscribe(Completions::from_cursor(seen[0].cursor.clone())).await {
        Err(Error::CursorExpired { .. }) => {}
        other => panic!("a reader behind a truncation must expire, got {:?}", other.map(|s| s.id())),
    }
    let more = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut live, 2, WAIT).await, &more, true);
}

const TRIM_WAITING_ON_A_LOCK: &str = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
     AND query LIKE 'SELECT ff_completions_trim%' AND wait_event_type = 'Lock'";

const TRIM_RUNNING: &str = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
     AND query LIKE 'SELECT ff_completions_trim%' AND state = 'active'";

/// An age beyond the representable past removes nothing and records no cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_age_beyond_the_representable_past_removes_nothing() {
    init_tracing();
    let url = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let old = batch_of(&mut conn, 3, i64::MIN).await;
    let last_old = tick(&mut conn).await;
    age_ticks(&mut conn, last_old, i64::MAX / 2).await;
    let new = complete_n(&*engine, 3).await;
    let backend = BackendConfig::postgres(&url)
        .with_retention(Retention::max_age(Duration::from_secs(u64::MAX / 2)).every(Duration::from_millis(50)));
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend)).await.expect("spawn");
    // The tick table stays locked until a trim run is seen waiting on it: the job does run.
    let mut locker = PgConnection::connect(&url).await.expect("connect");
    let mut tx = sqlx::Connection::begin(&mut locker).await.expect("begin");
    sqlx::query("LOCK TABLE ff_completion_tick IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.expect("lock");
    let watcher = sqlx::PgPool::connect(&url).await.expect("connect");
    wait_until(WAIT, "a trim run", || async {
        sqlx::query_scalar::<_, i64>(TRIM_WAITING_ON_A_LOCK).fetch_one(&watcher).await.expect("activity") > 0
    })
    .await;
    tx.rollback().await.expect("unlock");
    // That run and a few more (one every 50 ms) finish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_until(WAIT, "the trim runs to finish", || async {
        sqlx::query_scalar::<_, i64>(TRIM_RUNNING).fetch_one(&watcher).await.expect("activity") == 0
    })
    .await;
    assert_eq!(outbox_order(&url).await, [&old[..], &new[..]].concat(), "nothing was trimmed");
    let cuts: i64 = sqlx::query_scalar("SELECT count(*) FROM ff_completion_retention")
        .fetch_one(&watcher)
        .await
        .expect("retention");
    assert_eq!(cuts, 0, "no cut was recorded");
    let mut sub =
        tree.subscribe(Completions::from_cursor(encode_postgres_event_cursor(0))).await.expect("still retained");
    assert_exactly_once(&take_events(&mut sub, 6, WAIT).await, &[&old[..], &new[..]].concat(), true);
    assert_no_more(&mut sub, QUIET).await;
}

//! Postgres end to end: producer SQL functions -> outbox -> listener -> filter -> subscriber,
//! against a real server the harness starts.

use std::sync::Arc;
use std::time::Duration;

use ff_completions::testing::{
    encode_postgres_batch_cursor, encode_postgres_cursor, encode_postgres_event_cursor, encode_sqlite_cursor,
    encode_valkey_cursor, postgres::LISTENER_APPLICATION_NAME,
};
use ff_completions::{
    BackendConfig, CompletionOutcome, CompletionSupervisorHandle, EngineError, ExecutionId, ExecutionSpec, Namespace,
    PostgresEngine, Retention, ScannerFilter, StreamCursor, SubscribeRequest, SupervisorConfig, TimestampMs,
};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::contract::{self, QUIET, WAIT, assert_nothing_restarted, complete_n, running};
use crate::support::{
    assert_exactly_once, assert_no_more, init_tracing,
    postgres::{complete_by_sql, fresh_database, reader_order},
    take_events, wait_until,
};

struct Fixture {
    url: String,
    tree: CompletionSupervisorHandle,
    engine: Arc<PostgresEngine>,
}

async fn fixture_with(config: impl FnOnce(SupervisorConfig) -> SupervisorConfig) -> Fixture {
    init_tracing();
    let url = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let config = config(SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)));
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn tree");
    Fixture { url, tree, engine }
}

/// A fresh database on the shared test server.
async fn backend() -> BackendConfig {
    init_tracing();
    BackendConfig::postgres(fresh_database().await)
}

async fn fixture() -> Fixture {
    fixture_with(|c| c).await
}

/// The outbox's execution ids in `(txid, event_id)` order: which rows are there.
async fn outbox_order(url: &str) -> Vec<ExecutionId> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let rows: Vec<(uuid::Uuid, i16)> =
        sqlx::query_as("SELECT execution_id, partition_key FROM ff_completion_event ORDER BY txid, event_id")
            .fetch_all(&mut conn)
            .await
            .expect("read outbox");
    rows.into_iter().map(|(u, p)| ExecutionId::from_parts(p as u16, u)).collect()
}

async fn terminate_listen_connections(url: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1")
        .bind(LISTENER_APPLICATION_NAME)
        .fetch_one(&mut conn)
        .await
        .expect("terminate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_round_trips_with_all_fields() {
    contract::every_outcome_round_trips_with_all_fields(backend().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_by_namespace_tag_and_both_on_one_listener() {
    contract::filters_by_namespace_tag_and_both_on_one_listener(backend().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_filter_values_round_trip_and_match_exactly() {
    contract::hostile_filter_values_round_trip_and_match_exactly(backend().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_a_mid_stream_cursor_gets_exactly_the_rest_in_order() {
    contract::resume_from_a_mid_stream_cursor_gets_exactly_the_rest_in_order(backend().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_event_id_cursor_still_resumes() {
    let f = fixture().await;
    let ids = complete_n(&*f.engine, 12).await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let eid = event_id_of(&mut conn, ids[4]).await;
    let mut sub =
        f.tree.subscribe(SubscribeRequest::from_cursor(encode_postgres_event_cursor(eid))).await.expect("sub");
    assert_exactly_once(&take_events(&mut sub, 7, WAIT).await, &ids[5..], true);
    assert_no_more(&mut sub, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_gets_only_new_events() {
    contract::tail_gets_only_new_events(backend().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_foreign_cursors_are_validation_errors() {
    contract::malformed_and_foreign_cursors_are_validation_errors(
        backend().await,
        vec![encode_valkey_cursor(1, 2), encode_sqlite_cursor(3)],
    )
    .await;
}

/// Transaction A takes a lower event_id and stays open while B commits a higher one.
async fn open_transaction_with_a_completion(f: &Fixture) -> (sqlx::Transaction<'static, sqlx::Postgres>, ExecutionId) {
    let ids = running(&*f.engine, ExecutionSpec::new, 1).await;
    let mut tx = f.engine.pool().begin().await.expect("begin");
    complete_by_sql(&mut tx, ids[0]).await;
    (tx, ids[0])
}

/// A transaction that took a lower event_id and commits late is delivered once, after the
/// completions committed while it was open, which it never held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_with_lower_event_id_is_delivered() {
    let f = fixture().await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let (tx_a, a) = open_transaction_with_a_completion(&f).await;
    let b = complete_n(&*f.engine, 1).await;
    // B committed: it arrives while A is still open.
    assert_exactly_once(&take_events(&mut sub, 1, WAIT).await, &b, true);
    tx_a.commit().await.expect("commit A");
    assert_exactly_once(&take_events(&mut sub, 1, WAIT).await, &[a], true);
    assert_eq!(reader_order(&f.url).await, vec![b[0], a], "commit order, not event_id order");
    assert_no_more(&mut sub, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_is_delivered_even_when_the_listener_dies_meanwhile() {
    let f = fixture().await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let (tx_a, a) = open_transaction_with_a_completion(&f).await;
    let b = complete_n(&*f.engine, 3).await;
    for _ in 0..3 {
        let cell = f.tree.listener_cell("postgres").await.expect("listener");
        cell.kill();
        wait_until(WAIT, "listener restart", || async {
            f.tree.listener_cell("postgres").await.is_some_and(|c| c.get_id() != cell.get_id())
        })
        .await;
    }
    tx_a.commit().await.expect("commit A");
    let events = take_events(&mut sub, 4, WAIT).await;
    assert!(events.iter().any(|e| e.execution_id == a));
    assert!(b.iter().all(|id| events.iter().any(|e| e.execution_id == *id)));
    assert_exactly_once(&events, &reader_order(&f.url).await, true);
    assert_no_more(&mut sub, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_insert_leaves_a_hole_that_never_stalls_delivery() {
    let f = fixture().await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let (tx_a, _) = open_transaction_with_a_completion(&f).await;
    let b = complete_n(&*f.engine, 2).await;
    tx_a.rollback().await.expect("rollback A");
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &b, true);
    let c = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &c, true);
    assert_no_more(&mut sub, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listener_and_terminated_connection_lose_nothing_under_concurrent_producers() {
    let f = fixture().await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub"));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let (engine, stop) = (f.engine.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    contract::complete_claimed(&*engine, 10).await;
                }
            })
        })
        .collect();
    let (mut kills, mut terminations) = (0, 0);
    for _ in 0..6 {
        wait_until(WAIT, "listener back", || async { f.tree.listener_cell("postgres").await.is_some() }).await;
        if let Some(cell) = f.tree.listener_cell("postgres").await {
            cell.kill();
            kills += 1;
        }
        tokio::time::sleep(Duration::from_millis(80)).await;
        terminations += terminate_listen_connections(&f.url).await;
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer");
    }
    assert!(kills >= 5 && terminations >= 1, "faults injected: {kills} kills, {terminations} terminations");
    let expected = reader_order(&f.url).await;
    assert!(expected.len() >= 40, "producers committed {}", expected.len());
    for sub in &mut subs {
        let events = take_events(sub, expected.len(), WAIT).await;
        assert_exactly_once(&events, &expected, true);
        assert_no_more(sub, QUIET).await;
    }
    let stats = f.tree.stats().await.expect("stats");
    assert!(stats.listeners[0].restarts >= 5, "{:?}", stats.listeners[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_does_not_delay_a_fast_one_and_later_gets_everything() {
    contract::slow_subscriber_does_not_delay_a_fast_one_and_later_gets_everything(backend().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_subscribers_share_one_listen_connection() {
    let f = fixture().await;
    let mut subs = Vec::new();
    for i in 0..50 {
        let filter =
            if i % 2 == 0 { ScannerFilter::new() } else { ScannerFilter::new().with_namespace(Namespace::new("x")) };
        subs.push(f.tree.subscribe(SubscribeRequest::tail().with_filter(filter)).await.expect("sub"));
    }
    let ids = complete_n(&*f.engine, 20).await;
    for (i, sub) in subs.iter_mut().enumerate() {
        if i % 2 == 0 {
            assert_exactly_once(&take_events(sub, 20, WAIT).await, &ids, true);
        }
    }
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let (listeners, listening): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE application_name = $1), count(*) FILTER (WHERE query ILIKE 'LISTEN%') \
         FROM pg_stat_activity WHERE datname = current_database()",
    )
    .bind(LISTENER_APPLICATION_NAME)
    .fetch_one(&mut conn)
    .await
    .expect("pg_stat_activity");
    assert_eq!((listeners, listening), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_skipped_once_and_the_events_around_them_arrive() {
    let f = fixture().await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let before = complete_n(&*f.engine, 3).await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let bad_rows = [
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES (NULL, 'success', 1, 1)",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES (gen_random_uuid(), 'success', 1, 999)",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES (gen_random_uuid(), NULL, 1, 1)",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES (gen_random_uuid(), 'success', NULL, 1)",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key, tags) VALUES (gen_random_uuid(), 'success', 1, 1, '[1,2]')",
    ];
    for sql in bad_rows {
        sqlx::query(sql).execute(&mut conn).await.expect("insert bad row");
    }
    let after = complete_n(&*f.engine, 3).await;
    let events = take_events(&mut sub, 6, WAIT).await;
    assert_exactly_once(&events, &[before, after].concat(), true);
    assert_no_more(&mut sub, QUIET).await;
    let stats = f.tree.stats().await.expect("stats");
    assert_eq!(stats.listeners[0].rows_skipped, 5, "each bad row is reported once");
    assert!(stats.listeners[0].restarts == 0, "the listener never died: {:?}", stats.listeners[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcome_strings_arrive_as_other() {
    let f = fixture().await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    sqlx::query("INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES (gen_random_uuid(), 'timed_out', 1, 7)")
        .execute(&mut conn)
        .await
        .expect("insert");
    let events = take_events(&mut sub, 1, WAIT).await;
    assert_eq!(events[0].outcome, CompletionOutcome::Other("timed_out".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_cursors_expire_with_the_oldest_cursor_and_slow_subscribers_are_told() {
    contract::trimmed_cursors_expire_with_the_oldest_cursor_and_slow_subscribers_are_told(backend().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_only_mode_delivers_without_any_listen_connection() {
    init_tracing();
    let url = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let backend = BackendConfig::from_url(&format!("{url}?ff_poll_ms=50")).expect("poll-only url");
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend)).await.expect("spawn");
    let mut sub = tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let ids = complete_n(&*engine, 30).await;
    assert_exactly_once(&take_events(&mut sub, 30, WAIT).await, &ids, true);
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND (application_name = $1 OR query ILIKE 'LISTEN%')",
    )
    .bind(LISTENER_APPLICATION_NAME)
    .fetch_one(&mut conn)
    .await
    .expect("pg_stat_activity");
    assert_eq!(listening, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_of_the_original_shape_is_adopted_and_its_rows_delivered() {
    init_tracing();
    let url = fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "CREATE TABLE ff_completion_event (event_id bigserial PRIMARY KEY, execution_id uuid NOT NULL, flow_id uuid, \
         outcome text NOT NULL, namespace text, instance_tag text, occurred_at_ms bigint NOT NULL, \
         partition_key smallint NOT NULL)",
    )
    .execute(&mut conn)
    .await
    .expect("seed-shaped table");
    let old: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    for id in &old {
        sqlx::query(
            "INSERT INTO ff_completion_event (execution_id, outcome, namespace, instance_tag, occurred_at_ms, partition_key) \
             VALUES ($1, 'failure', 'legacy', 'inst=9', 1, 3)",
        )
        .bind(id)
        .execute(&mut conn)
        .await
        .expect("seed row");
    }
    // A subscriber of the original design had seen the first row: it resumes from its 9-byte cursor.
    let first_id: i64 =
        sqlx::query_scalar("SELECT min(event_id) FROM ff_completion_event").fetch_one(&mut conn).await.expect("id");
    let f = {
        let engine =
            Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("migrates the old table"));
        let (tree, _) =
            CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)))
                .await
                .expect("spawn");
        Fixture { url: url.clone(), tree, engine }
    };
    let mut sub =
        f.tree.subscribe(SubscribeRequest::from_cursor(encode_postgres_event_cursor(first_id))).await.expect("sub");
    let events = take_events(&mut sub, 2, WAIT).await;
    let got: Vec<_> = events.iter().map(|e| e.execution_id.uuid()).collect();
    assert_eq!(got, old[1..].to_vec());
    assert!(
        events
            .iter()
            .all(|e| e.outcome == CompletionOutcome::Failed && e.tags.get("inst").map(String::as_str) == Some("9"))
    );
    let fresh = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &fresh, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_the_connection_is_a_prompt_typed_error() {
    init_tracing();
    let port = crate::support::free_port();
    let backend = BackendConfig::postgres(format!("postgres://app:secret-pw@127.0.0.1:{port}/db"))
        .with_timeouts(ff_completions::BackendTimeouts::default().with_connect(Duration::from_secs(2)));
    let started = std::time::Instant::now();
    let err = CompletionSupervisorHandle::spawn(
        SupervisorConfig::new().with_backend(backend.clone()).with_connect_at_start(true),
    )
    .await
    .expect_err("refused");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(err.is_transient(), "a refused connection is worth retrying: {err}");
    assert!(!err.to_string().contains("secret-pw"), "{err}");
    match ff_completions::connect_engine(&backend).await {
        Err(e @ (EngineError::Transport { .. } | EngineError::Unavailable { .. })) => {
            assert!(!e.to_string().contains("secret-pw"))
        }
        other => panic!("expected a transport error, got {:?}", other.err()),
    }
}

/// Inserts one valid outbox row by hand, as a foreign producer might; returns its execution.
/// `(seq_scan, idx_scan)` of the outbox, as the server's statistics have them now.
async fn outbox_scans(conn: &mut PgConnection) -> (i64, i64) {
    sqlx::query_as(
        "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'ff_completion_event'",
    )
    .fetch_one(conn)
    .await
    .expect("outbox statistics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_the_txid_index_and_never_scan_the_whole_outbox() {
    const ROWS: usize = 50_000;
    init_tracing();
    let url = fresh_database().await;
    let config = BackendConfig::postgres(&url);
    drop(PostgresEngine::connect(&config).await.expect("engine installs the schema"));
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "INSERT INTO ff_completion_event (execution_id, outcome, namespace, occurred_at_ms, partition_key) \
         SELECT gen_random_uuid(), 'success', 'ns', 1, 0 FROM generate_series(1, $1)",
    )
    .bind(ROWS as i64)
    .execute(&mut conn)
    .await
    .expect("history");
    sqlx::query("ANALYZE ff_completion_event").execute(&mut conn).await.expect("analyze");
    let (seq_before, idx_before) = outbox_scans(&mut conn).await;

    let (tree, _) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(config.clone()))
        .await
        .expect("spawn tree");
    let mut events =
        tree.subscribe(SubscribeRequest::from_cursor(encode_postgres_cursor(0, 0))).await.expect("subscribe");
    let replayed = take_events(&mut events, ROWS, Duration::from_secs(120)).await;
    assert_eq!(replayed.len(), ROWS);
    drop(events);
    // Server processes report their scans when they exit.
    tree.shutdown().await;
    let pages = (ROWS / 512) as i64;
    let deadline = std::time::Instant::now() + WAIT;
    let scans = loop {
        let scans = outbox_scans(&mut conn).await;
        if scans.1 - idx_before >= pages || std::time::Instant::now() > deadline {
            break scans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(scans.1 - idx_before >= pages, "the readers' index scans were reported: {scans:?}");
    assert_eq!(scans.0, seq_before, "no read scanned the whole outbox ({} index scans)", scans.1 - idx_before);
}

/// Pages of the outbox and its indexes (hit or read) that `probe` touched, run with snapshots
/// `s1` and `s2` bound as `$1` and `$2`, as PL/pgSQL passes them: from the server's I/O
/// statistics of the outbox alone (flushed before and after), so the catalog pages a busy
/// server makes a backend read again do not count.
async fn outbox_pages_touched(conn: &mut PgConnection, probe: &'static str, s1: &str, s2: &str) -> i64 {
    async fn pages_so_far(conn: &mut PgConnection) -> i64 {
        sqlx::query("SELECT pg_stat_force_next_flush()").execute(&mut *conn).await.expect("flush statistics");
        sqlx::query_scalar(
            "SELECT heap_blks_hit + heap_blks_read + coalesce(idx_blks_hit, 0) + coalesce(idx_blks_read, 0) \
               FROM pg_statio_user_tables WHERE relname = 'ff_completion_event'",
        )
        .fetch_one(&mut *conn)
        .await
        .expect("outbox I/O statistics")
    }
    let before = pages_so_far(conn).await;
    sqlx::query(probe).bind(s1).bind(s2).execute(&mut *conn).await.expect("probe");
    pages_so_far(conn).await - before
}

/// The reader's probes at the head of a large outbox touch a few pages, whatever its size: each
/// probe has one lower bound (a scalar bound beside a row comparison let a btree scan start at
/// the outbox's first page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_at_the_head_of_a_large_outbox_touch_a_few_pages() {
    init_tracing();
    let url = fresh_database().await;
    drop(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("schema"));
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) \
         SELECT gen_random_uuid(), 'success', 1, 0 FROM generate_series(1, 100000)",
    )
    .execute(&mut conn)
    .await
    .expect("history");
    sqlx::query("ANALYZE ff_completion_event").execute(&mut conn).await.expect("analyze");
    // A transaction left open in another session: every tick below sees it in progress, so the
    // probes of in-progress transactions run (against an outbox one transaction wrote).
    let mut bystander = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut bystander).await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut bystander).await.expect("a transaction id");
    sqlx::query("SELECT ff_completions_tick()").execute(&mut conn).await.expect("tick");
    for _ in 0..3 {
        insert_row(&mut conn, 1).await;
    }
    sqlx::query("SELECT ff_completions_tick()").execute(&mut conn).await.expect("tick");
    let ticks: Vec<String> =
        sqlx::query_scalar("SELECT snapshot::text FROM ff_completion_tick ORDER BY tick_id DESC LIMIT 2")
            .fetch_all(&mut conn)
            .await
            .expect("ticks");
    let (newest, previous) = (&ticks[0], &ticks[1]);
    let batch = "SELECT * FROM ff_completions_batch_rows(6, $1::pg_snapshot, $2::pg_snapshot, 0, 0, 512)";
    let since = "SELECT ff_completions_committed_since($1::pg_snapshot), $2::text";
    let batch = outbox_pages_touched(&mut conn, batch, previous, newest).await;
    let (since, idle) = (
        outbox_pages_touched(&mut conn, since, previous, newest).await,
        outbox_pages_touched(&mut conn, since, newest, newest).await,
    );
    eprintln!("pages read at the head of 100,000 rows: batch {batch}, wake-up probes {since} / {idle}");
    assert!(batch < 30, "a batch of 3 rows at the head read {batch} pages");
    assert!(since < 30 && idle < 30, "a wake-up probe read {since} / {idle} pages");
}

async fn insert_row(conn: &mut PgConnection, occurred_at_ms: i64) -> ExecutionId {
    let id = ExecutionId::from_parts(7, uuid::Uuid::new_v4());
    sqlx::query(
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES ($1, 'success', $2, 7)",
    )
    .bind(id.uuid())
    .bind(occurred_at_ms)
    .execute(conn)
    .await
    .expect("insert row");
    id
}

/// The earlier-form `(txid, event_id)` cursor of the outbox row of `id`.
async fn cursor_of(conn: &mut PgConnection, id: ExecutionId) -> StreamCursor {
    let (txid, event_id): (i64, i64) =
        sqlx::query_as("SELECT txid::text::int8, event_id FROM ff_completion_event WHERE execution_id = $1")
            .bind(id.uuid())
            .fetch_one(conn)
            .await
            .expect("row position");
    encode_postgres_cursor(txid as u64, event_id)
}

/// The reader's cursor of the outbox row of `id`, computed from the ticks (one is recorded first):
/// the batch of the first tick that sees it.
async fn reader_cursor_of(conn: &mut PgConnection, id: ExecutionId) -> StreamCursor {
    sqlx::query("SELECT ff_completions_tick()").execute(&mut *conn).await.expect("tick");
    let (tick, txid, event_id): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT min(t.tick_id) FROM ff_completion_tick t WHERE pg_visible_in_snapshot(e.txid, t.snapshot)), \
                e.txid::text::int8, e.event_id FROM ff_completion_event e WHERE e.execution_id = $1",
    )
    .bind(id.uuid())
    .fetch_one(conn)
    .await
    .expect("row position");
    encode_postgres_batch_cursor(3 * tick as u64, txid as u64, event_id)
}

/// No listener or filter of the tree was ever restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_the_earliest_and_latest_commit_times_are_delivered_without_any_restart() {
    // A subscriber that reads nothing until the end fills its buffer of 2 and falls behind at
    // one of the earliest rows: its lag is then measured from that row's commit time.
    let f = fixture_with(|c| c.with_subscriber_buffer(2)).await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let before = complete_n(&*f.engine, 2).await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let mut odd = Vec::new();
    for at in contract::EXTREME_TIMES {
        odd.push(insert_row(&mut conn, at).await);
    }
    let after = complete_n(&*f.engine, 2).await;
    contract::assert_extreme_times_arrive(&f.tree, &mut sub, [before, odd, after]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_megabyte_namespace_tags_and_outcome_are_delivered_whole_and_the_events_around_them_arrive() {
    const MIB: i32 = 1 << 20;
    let f = fixture().await;
    let mut all = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let huge_ns = Namespace::new("n".repeat(MIB as usize));
    let mut only_huge_ns = f
        .tree
        .subscribe(SubscribeRequest::tail().with_filter(ScannerFilter::new().with_namespace(huge_ns)))
        .await
        .expect("sub");
    let before = complete_n(&*f.engine, 2).await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let huge_rows = [
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key, namespace) \
         VALUES ($1, 'success', 1, 7, repeat('n', $2))",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key, tags) \
         VALUES ($1, 'success', 1, 7, jsonb_build_object('big', repeat('t', $2)))",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key, instance_tag) \
         VALUES ($1, repeat('o', $2), 1, 7, 'k=' || repeat('v', $2))",
    ];
    let mut huge = Vec::new();
    for sql in huge_rows {
        let id = ExecutionId::from_parts(7, uuid::Uuid::new_v4());
        sqlx::query(sql).bind(id.uuid()).bind(MIB).execute(&mut conn).await.expect("insert huge row");
        huge.push(id);
    }
    let after = complete_n(&*f.engine, 2).await;
    let events = take_events(&mut all, 7, WAIT).await;
    assert_exactly_once(&events, &[before, huge.clone(), after].concat(), true);
    assert_eq!(events[2].namespace.as_ref().map(|n| n.as_str().len()), Some(MIB as usize));
    assert_eq!(events[3].tags.get("big").map(String::len), Some(MIB as usize));
    assert_eq!(events[4].outcome, CompletionOutcome::Other("o".repeat(MIB as usize)));
    assert_eq!(events[4].tags.get("k").map(String::len), Some(MIB as usize));
    assert_exactly_once(&take_events(&mut only_huge_ns, 1, WAIT).await, &huge[..1], true);
    assert_no_more(&mut all, QUIET).await;
    assert_no_more(&mut only_huge_ns, QUIET).await;
    let stats = f.tree.stats().await.expect("stats");
    assert_eq!(stats.listeners[0].rows_skipped, 0);
    assert_nothing_restarted(&stats);
}

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
        match f.tree.subscribe(SubscribeRequest::from_cursor(below.clone())).await {
            Err(EngineError::CursorExpired { oldest: Some(oldest) }) => {
                assert_eq!(oldest, boundary, "the oldest cursor is the last trimmed row's")
            }
            other => panic!("a cursor below the trimmed rows must expire, got {:?}", other.map(|s| s.id())),
        }
    }
    let mut resumed = f.tree.subscribe(SubscribeRequest::from_cursor(boundary)).await.expect("resume at the boundary");
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
    let mut sub = f.tree.subscribe(SubscribeRequest::from_cursor(old[0].1.clone())).await.expect("still retained");
    assert_exactly_once(&take_events(&mut sub, 5, WAIT).await, &[&old_ids[1..], &new[..]].concat(), true);
    assert_no_more(&mut sub, QUIET).await;
}

/// The `event_id` of the outbox row of `id`.
async fn event_id_of(conn: &mut PgConnection, id: ExecutionId) -> i64 {
    sqlx::query_scalar("SELECT event_id FROM ff_completion_event WHERE execution_id = $1")
        .bind(id.uuid())
        .fetch_one(conn)
        .await
        .expect("event id")
}

/// Runs the trim function once, keeping the newest `keep` rows; returns the rows removed.
async fn trim_keeping(conn: &mut PgConnection, keep: i64) -> i64 {
    sqlx::query_scalar("SELECT ff_completions_trim(NULL, $1)").bind(keep).fetch_one(conn).await.expect("trim")
}

async fn assert_expired_at_subscribe(f: &Fixture, event_id: i64, oldest: &StreamCursor) {
    match f.tree.subscribe(SubscribeRequest::from_cursor(encode_postgres_event_cursor(event_id))).await {
        Err(EngineError::CursorExpired { oldest: Some(got) }) => assert_eq!(&got, oldest, "the trimmed boundary"),
        other => {
            panic!("event id {event_id}: a trimmed row it had not seen must expire it, got {:?}", other.map(|s| s.id()))
        }
    }
}

/// An `event_id`-only cursor (the original 9-byte form) knows no transaction, so it is checked
/// against the highest `event_id` ever trimmed: it expires at subscribe when a row it had not
/// seen was trimmed (even one the `(txid, event_id)` boundary alone would let it skip), and
/// resumes right after the trimmed rows when it had seen them all (even when the trim cut a
/// transaction in two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_cursor_expires_exactly_when_a_row_it_had_not_seen_was_trimmed() {
    let f = fixture().await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let (a, b, c) = (insert_row(&mut conn, 1).await, insert_row(&mut conn, 1).await, insert_row(&mut conn, 1).await);
    let (ea, eb, ec) =
        (event_id_of(&mut conn, a).await, event_id_of(&mut conn, b).await, event_id_of(&mut conn, c).await);
    let at_b = reader_cursor_of(&mut conn, b).await;
    assert_eq!(trim_keeping(&mut conn, 1).await, 2, "a and b are trimmed");
    // The next row after `a` is in a later transaction than the boundary (b): only the trimmed
    // event ids show that `b` was lost.
    assert_expired_at_subscribe(&f, ea, &at_b).await;

    let mut tx = conn.begin().await.expect("begin");
    let (d, e) = (insert_row(&mut tx, 1).await, insert_row(&mut tx, 1).await);
    tx.commit().await.expect("commit d and e");
    let g = insert_row(&mut conn, 1).await;
    let ed = event_id_of(&mut conn, d).await;
    let at_d = reader_cursor_of(&mut conn, d).await;
    assert_eq!(trim_keeping(&mut conn, 2).await, 2, "c and d are trimmed, e and g kept");
    for lost_after in [ea, eb, ec] {
        assert_expired_at_subscribe(&f, lost_after, &at_d).await;
    }
    let mut resumed =
        f.tree.subscribe(SubscribeRequest::from_cursor(encode_postgres_event_cursor(ed))).await.expect("resume at d");
    assert_exactly_once(&take_events(&mut resumed, 2, WAIT).await, &[e, g], true);
    let more = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut resumed, 2, WAIT).await, &more, true);
    assert_no_more(&mut resumed, QUIET).await;
    // Trimmed before the highest event id was recorded: unknown, so every such cursor expires.
    sqlx::query("UPDATE ff_completion_retention SET trimmed_max_event_id = NULL")
        .execute(&mut conn)
        .await
        .expect("forget the highest trimmed event id");
    assert_expired_at_subscribe(&f, ed, &at_d).await;
    assert_nothing_restarted(&f.tree.stats().await.expect("stats"));
}

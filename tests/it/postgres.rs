//! Postgres end to end: producer SQL functions -> outbox -> listener -> filter -> subscriber,
//! against a real server the harness starts.

use std::sync::Arc;
use std::time::Duration;

use ff_completions::{
    BackendConfig, CompletionOutcome, CompletionSupervisorHandle, EngineError, ExecutionId, ExecutionSpec, Namespace,
    ScannerFilter, SubscribeRequest, SupervisorConfig,
    backends::postgres::{LISTENER_APPLICATION_NAME, PostgresEngine},
    encode_postgres_event_cursor, encode_sqlite_cursor, encode_valkey_cursor,
};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::contract::{self, QUIET, WAIT, complete_n, running};
use crate::support::{
    assert_exactly_once, assert_no_more, init_tracing, postgres::fresh_database, take_events, wait_until,
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

/// The outbox's execution ids in the readers' order, `(txid, event_id)`.
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
    let eid: i64 = sqlx::query_scalar("SELECT event_id FROM ff_completion_event WHERE execution_id = $1")
        .bind(ids[4].uuid())
        .fetch_one(&mut conn)
        .await
        .expect("event id");
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
    let done: bool = sqlx::query_scalar("SELECT ff_complete_execution($1)")
        .bind(ids[0].uuid())
        .fetch_one(&mut *tx)
        .await
        .expect("A");
    assert!(done);
    (tx, ids[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_with_lower_event_id_is_delivered() {
    let f = fixture().await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let (tx_a, a) = open_transaction_with_a_completion(&f).await;
    let b = complete_n(&*f.engine, 1).await;
    // B is held back behind A's open transaction: nothing may be delivered out of order.
    assert_no_more(&mut sub, Duration::from_millis(500)).await;
    tx_a.commit().await.expect("commit A");
    let events = take_events(&mut sub, 2, WAIT).await;
    let mut got: Vec<_> = events.iter().map(|e| e.execution_id).collect();
    got.sort();
    let mut want = vec![a, b[0]];
    want.sort();
    assert_eq!(got, want);
    assert_exactly_once(&events, &outbox_order(&f.url).await, true);
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
    assert_exactly_once(&events, &outbox_order(&f.url).await, true);
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
    let expected = outbox_order(&f.url).await;
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
    let err = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend.clone()))
        .await
        .expect_err("refused");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(!err.to_string().contains("secret-pw"), "{err}");
    match ff_completions::connect_engine(&backend).await {
        Err(e @ (EngineError::Transport { .. } | EngineError::Unavailable { .. })) => {
            assert!(!e.to_string().contains("secret-pw"))
        }
        other => panic!("expected a transport error, got {:?}", other.err()),
    }
}

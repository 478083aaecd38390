//! Postgres end to end: producer SQL functions -> outbox -> listener -> filter -> subscriber,
//! against a real server the harness starts.

use std::sync::Arc;
use std::time::Duration;

use ff_completions::{
    BackendConfig, CompletionOutcome, CompletionSupervisorHandle, Engine, EngineError, ExecutionId, ExecutionSpec,
    FailOutcome, FilterMode, FlowId, Namespace, ScannerFilter, StreamCursor, SubscribeRequest, SupervisorConfig,
    backends::postgres::{LISTENER_APPLICATION_NAME, PostgresEngine},
    encode_postgres_event_cursor, encode_sqlite_cursor, encode_valkey_cursor,
};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::support::{
    assert_exactly_once, assert_no_more, init_tracing, postgres::fresh_database, take_events, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);
const QUIET: Duration = Duration::from_millis(300);

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

async fn fixture() -> Fixture {
    fixture_with(|c| c).await
}

/// Creates and claims `n` executions of one flow, returning them in creation order.
async fn running(engine: &PostgresEngine, spec: impl Fn(&FlowId) -> ExecutionSpec, n: usize) -> Vec<ExecutionId> {
    let flow = FlowId::new();
    engine.create_flow(&flow, None).await.expect("flow");
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let s = spec(&flow);
        engine.create_execution(&s).await.expect("create");
        ids.push(s.id);
    }
    let mut claimed = 0;
    while claimed < n {
        claimed += engine.claim("test-worker", n).await.expect("claim").len();
    }
    ids
}

/// Completes `n` fresh executions one after the other; returns them in commit order.
async fn complete_n(engine: &PostgresEngine, n: usize) -> Vec<ExecutionId> {
    let ids = running(engine, ExecutionSpec::new, n).await;
    for id in &ids {
        assert!(engine.complete(id).await.expect("complete"));
    }
    ids
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
    let f = fixture().await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("subscribe");
    let flow = FlowId::new();
    f.engine.create_flow(&flow, Some(&Namespace::new("tenant-a"))).await.expect("flow");
    let spec = |f: &FlowId| ExecutionSpec::new(f).with_namespace("tenant-a").with_tag("inst", "i-1").with_tag("k", "v");
    let (ok, bad, cancelled, expired) = (spec(&flow), spec(&flow), spec(&flow), spec(&flow));
    let child = spec(&flow).with_parents(vec![bad.id]);
    for s in [&ok, &bad, &cancelled, &expired, &child] {
        f.engine.create_execution(s).await.expect("create");
    }
    let before = ff_completions::TimestampMs::now();
    let mut claimed = f.engine.claim("w", 10).await.expect("claim");
    claimed.sort();
    assert_eq!(claimed.len(), 4, "the child is blocked on its parent");
    assert!(f.engine.complete(&ok.id).await.expect("complete"));
    assert_eq!(f.engine.fail(&bad.id, false).await.expect("fail"), FailOutcome::TerminalFailed);
    assert!(f.engine.cancel(&cancelled.id).await.expect("cancel"));
    assert!(f.engine.expire(&expired.id).await.expect("expire"));
    let resolved = f.engine.resolve_dependency(&bad.id, &child.id).await.expect("resolve");
    assert_eq!(resolved, ff_completions::DependencyResolution::Skipped);

    let events = take_events(&mut sub, 5, WAIT).await;
    let expected = [
        (ok.id, CompletionOutcome::Success),
        (bad.id, CompletionOutcome::Failed),
        (cancelled.id, CompletionOutcome::Cancelled),
        (expired.id, CompletionOutcome::Expired),
        (child.id, CompletionOutcome::Skipped),
    ];
    for (event, (id, outcome)) in events.iter().zip(expected) {
        assert_eq!(event.execution_id, id);
        assert_eq!(event.outcome, outcome);
        assert_eq!(event.flow_id, Some(flow));
        assert_eq!(event.namespace, Some(Namespace::new("tenant-a")));
        assert_eq!(event.tags.get("inst").map(String::as_str), Some("i-1"));
        assert_eq!(event.tags.get("k").map(String::as_str), Some("v"));
        assert!(event.at >= ff_completions::TimestampMs(before.0 - 5_000) && event.at.0 <= before.0 + 60_000);
        assert!(!event.cursor.is_empty());
    }
    assert_no_more(&mut sub, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_by_namespace_tag_and_both_on_one_listener() {
    let f = fixture().await;
    let ns = |n: &str| ScannerFilter::new().with_namespace(Namespace::new(n));
    let mut by_ns = f.tree.subscribe(SubscribeRequest::tail().with_filter(ns("a"))).await.expect("sub");
    let mut by_tag = f
        .tree
        .subscribe(SubscribeRequest::tail().with_filter(ScannerFilter::new().with_instance_tag("inst", "1")))
        .await
        .expect("sub");
    let mut by_both = f
        .tree
        .subscribe(SubscribeRequest::tail().with_filter(ns("a").with_instance_tag("inst", "1")))
        .await
        .expect("sub");
    let mut everything = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");

    let combos = [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")];
    let mut made = Vec::new();
    for (n, t) in combos {
        let ids = running(&f.engine, |fl| ExecutionSpec::new(fl).with_namespace(n).with_tag("inst", t), 2).await;
        for id in &ids {
            f.engine.complete(id).await.expect("complete");
        }
        made.push((n, t, ids));
    }
    let pick = |keep: &dyn Fn(&str, &str) -> bool| -> Vec<ExecutionId> {
        made.iter().filter(|(n, t, _)| keep(n, t)).flat_map(|(_, _, ids)| ids.clone()).collect()
    };
    let want_ns = pick(&|n, _| n == "a");
    let want_tag = pick(&|_, t| t == "1");
    let want_both = pick(&|n, t| n == "a" && t == "1");
    let want_all = pick(&|_, _| true);
    assert_exactly_once(&take_events(&mut by_ns, want_ns.len(), WAIT).await, &want_ns, true);
    assert_exactly_once(&take_events(&mut by_tag, want_tag.len(), WAIT).await, &want_tag, true);
    assert_exactly_once(&take_events(&mut by_both, want_both.len(), WAIT).await, &want_both, true);
    assert_exactly_once(&take_events(&mut everything, want_all.len(), WAIT).await, &want_all, true);
    for sub in [&mut by_ns, &mut by_tag, &mut by_both, &mut everything] {
        assert_no_more(sub, QUIET).await;
    }
    let stats = f.tree.stats().await.expect("stats");
    assert_eq!(stats.listeners.len(), 1, "four subscribers share one listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_a_mid_stream_cursor_gets_exactly_the_rest_in_order() {
    let f = fixture().await;
    let mut first = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let ids = complete_n(&f.engine, 40).await;
    let seen = take_events(&mut first, 40, WAIT).await;
    let cursor = seen[14].cursor.clone();
    drop(first);

    let mut resumed = f.tree.subscribe(SubscribeRequest::from_cursor(cursor)).await.expect("resume");
    let rest = take_events(&mut resumed, 25, WAIT).await;
    assert_exactly_once(&rest, &ids[15..], true);
    // Live events continue after the replay with no gap and no duplicate.
    let more = complete_n(&f.engine, 10).await;
    assert_exactly_once(&take_events(&mut resumed, 10, WAIT).await, &more, true);
    assert_no_more(&mut resumed, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_event_id_cursor_still_resumes() {
    let f = fixture().await;
    let ids = complete_n(&f.engine, 12).await;
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
    let f = fixture().await;
    complete_n(&f.engine, 10).await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let fresh = complete_n(&f.engine, 5).await;
    assert_exactly_once(&take_events(&mut sub, 5, WAIT).await, &fresh, true);
    assert_no_more(&mut sub, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_foreign_cursors_are_validation_errors() {
    let f = fixture().await;
    let bad = [
        StreamCursor::new(vec![0x02, 1, 2]),
        StreamCursor::new(vec![0x7f; 17]),
        encode_valkey_cursor(1, 2),
        encode_sqlite_cursor(3),
    ];
    for cursor in bad {
        match f.tree.subscribe(SubscribeRequest::from_cursor(cursor.clone())).await {
            Err(EngineError::Validation { .. }) => {}
            other => panic!("{cursor:?} gave {:?}", other.map(|s| s.id())),
        }
    }
    match f.tree.subscribe(SubscribeRequest::tail().on_backend("nope")).await {
        Err(EngineError::Validation { .. }) => {}
        other => panic!("unknown backend gave {:?}", other.map(|s| s.id())),
    }
}

/// Transaction A takes a lower event_id and stays open while B commits a higher one.
async fn open_transaction_with_a_completion(f: &Fixture) -> (sqlx::Transaction<'static, sqlx::Postgres>, ExecutionId) {
    let ids = running(&f.engine, ExecutionSpec::new, 1).await;
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
    let b = complete_n(&f.engine, 1).await;
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
    let b = complete_n(&f.engine, 3).await;
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
    let b = complete_n(&f.engine, 2).await;
    tx_a.rollback().await.expect("rollback A");
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &b, true);
    let c = complete_n(&f.engine, 2).await;
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
                    for id in running(&engine, ExecutionSpec::new, 10).await {
                        engine.complete(&id).await.expect("complete");
                    }
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
    let f = fixture_with(|c| c.with_subscriber_buffer(16).with_batch_size(64)).await;
    let mut slow = f.tree.subscribe(SubscribeRequest::tail()).await.expect("slow");
    let mut fast = f.tree.subscribe(SubscribeRequest::tail()).await.expect("fast");
    let (slow_id, fast_id) = (slow.id(), fast.id());
    let ids = complete_n(&f.engine, 1500).await;
    // The fast one gets everything while the slow one has not read a single event.
    assert_exactly_once(&take_events(&mut fast, ids.len(), WAIT).await, &ids, true);
    let stats = f.tree.stats().await.expect("stats");
    let slow_stats = stats.subscribers.iter().find(|s| s.id == slow_id).expect("slow stats");
    assert_eq!(slow_stats.delivered, 16, "only its buffer is filled");
    assert_eq!(slow_stats.mode, FilterMode::Blocked);
    assert!(slow_stats.live_batches_dropped > 0, "live batches are dropped, not queued: {slow_stats:?}");
    let fast_stats = stats.subscribers.iter().find(|s| s.id == fast_id).expect("fast stats");
    assert_eq!(fast_stats.delivered, ids.len() as u64);
    // Now the slow one reads: everything, once, in order, caught up from the backend.
    assert_exactly_once(&take_events(&mut slow, ids.len(), WAIT).await, &ids, true);
    assert_no_more(&mut slow, QUIET).await;
    let stats = f.tree.stats().await.expect("stats");
    let slow_stats = stats.subscribers.iter().find(|s| s.id == slow_id).expect("slow stats");
    assert!(slow_stats.catch_up_reads > 1, "{slow_stats:?}");
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
    let ids = complete_n(&f.engine, 20).await;
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
    let before = complete_n(&f.engine, 3).await;
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
    let after = complete_n(&f.engine, 3).await;
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
    let retention = ff_completions::config::Retention::max_events(5).every(Duration::from_millis(50));
    init_tracing();
    let url = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let config = SupervisorConfig::new()
        .with_backend(BackendConfig::postgres(&url).with_retention(retention))
        .with_subscriber_buffer(4);
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn");
    let mut fast = tree.subscribe(SubscribeRequest::tail()).await.expect("fast");
    let mut slow = tree.subscribe(SubscribeRequest::tail()).await.expect("slow");
    let ids = complete_n(&engine, 20).await;
    let seen = take_events(&mut fast, 20, WAIT).await;
    wait_until(WAIT, "the trim job", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ff_completion_event").fetch_one(engine.pool()).await.ok()
            == Some(5)
    })
    .await;

    let oldest = match tree.subscribe(SubscribeRequest::from_cursor(seen[2].cursor.clone())).await {
        Err(EngineError::CursorExpired { oldest: Some(oldest) }) => oldest,
        other => panic!("expected CursorExpired, got {:?}", other.map(|s| s.id())),
    };
    let mut resumed = tree.subscribe(SubscribeRequest::from_cursor(oldest)).await.expect("resume at oldest");
    assert_exactly_once(&take_events(&mut resumed, 5, WAIT).await, &ids[15..], true);

    // The slow subscriber read nothing; its buffer holds 4 events, the rest was trimmed away.
    assert_exactly_once(&take_events(&mut slow, 4, WAIT).await, &ids[..4], true);
    match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut slow)).await {
        Ok(Some(Err(EngineError::CursorExpired { oldest: Some(_) }))) => {}
        other => panic!("expected CursorExpired on the stream, got {other:?}"),
    }
    assert!(tokio::time::timeout(WAIT, futures::StreamExt::next(&mut slow)).await.expect("ends").is_none());
    // The tree carries on for everyone else.
    let more = complete_n(&engine, 3).await;
    assert_exactly_once(&take_events(&mut fast, 3, WAIT).await, &more, true);
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
    let ids = complete_n(&engine, 30).await;
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
    let fresh = complete_n(&f.engine, 2).await;
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

//! Postgres delivery: late and rolled-back transactions, many subscribers on one connection,
//! polling without LISTEN, bad rows, odd outcomes, extreme times and very large rows.

use super::*;
use ff_completions::Completions;

/// A transaction that took a lower event_id and commits late is delivered once, after the
/// completions committed while it was open, which it never held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_with_lower_event_id_is_delivered() {
    let f = fixture().await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
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
async fn rolled_back_insert_leaves_a_hole_that_never_stalls_delivery() {
    let f = fixture().await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let (tx_a, _) = open_transaction_with_a_completion(&f).await;
    let b = complete_n(&*f.engine, 2).await;
    tx_a.rollback().await.expect("rollback A");
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &b, true);
    let c = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &c, true);
    assert_no_more(&mut sub, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_subscribers_share_one_listen_connection() {
    let f = fixture().await;
    let mut subs = Vec::new();
    for i in 0..50 {
        let filter =
            if i % 2 == 0 { ScannerFilter::new() } else { ScannerFilter::new().with_namespace(Namespace::new("x")) };
        subs.push(f.tree.subscribe(Completions::tail().with_filter(filter)).await.expect("sub"));
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
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
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
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    sqlx::query("INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES (gen_random_uuid(), 'timed_out', 1, 7)")
        .execute(&mut conn)
        .await
        .expect("insert");
    let events = take_events(&mut sub, 1, WAIT).await;
    assert_eq!(events[0].outcome, CompletionOutcome::Other("timed_out".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_only_mode_delivers_without_any_listen_connection() {
    init_tracing();
    let url = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let backend = BackendConfig::from_url(&format!("{url}?ff_poll_ms=50")).expect("poll-only url");
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend)).await.expect("spawn");
    let mut sub = tree.subscribe(Completions::tail()).await.expect("sub");
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

/// No listener or filter of the tree was ever restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_the_earliest_and_latest_commit_times_are_delivered_without_any_restart() {
    // A subscriber that reads nothing until the end fills its buffer of 2 and falls behind at
    // one of the earliest rows: its lag is then measured from that row's commit time.
    let f = fixture_with(|c| c.with_subscriber_buffer(2)).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let before = complete_n(&*f.engine, 2).await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let mut odd = Vec::new();
    for at in contract::EXTREME_TIMES {
        odd.push(insert_row(&mut conn, at).await);
    }
    let after = complete_n(&*f.engine, 2).await;
    contract::assert_extreme_times_arrive(&f.tree, &mut sub, [before, odd, after], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_megabyte_namespace_tags_and_outcome_are_delivered_whole_and_the_events_around_them_arrive() {
    const MIB: i32 = 1 << 20;
    let f = fixture().await;
    let mut all = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let huge_ns = Namespace::new("n".repeat(MIB as usize));
    let mut only_huge_ns = f
        .tree
        .subscribe(Completions::tail().with_filter(ScannerFilter::new().with_namespace(huge_ns)))
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

//! Metrics recorded through the `metrics` facade, read back with a debugging recorder: each
//! test causes what a metric measures and checks its value (each on a backend name of its own,
//! since the recorder is global).

use std::sync::OnceLock;
use std::time::Duration;

use ff_completions::{
    BackendConfig, CompletionSupervisorHandle, Completions, FlowId, ListenerState, SubscriberStats, SupervisorConfig,
};
use ff_completions_lab::{Engine, ExecutionSpec, PostgresEngine};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::contract::complete_n;
use ff_completions_lab::faults::ConnectionKiller;

use crate::support::{assert_exactly_once, init_tracing, postgres::fresh_database, take_events, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// Keeps every counter and gauge, cumulative, readable at any time.
#[derive(Default)]
struct TestRecorder {
    values: Mutex<HashMap<Key, (bool, Arc<AtomicU64>)>>,
}

impl TestRecorder {
    fn slot(&self, key: &Key, is_gauge: bool) -> Arc<AtomicU64> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.entry(key.clone()).or_insert_with(|| (is_gauge, Arc::new(AtomicU64::new(0)))).1.clone()
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key, false))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key, true))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn recorder() -> &'static TestRecorder {
    static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(recorder).expect("install the test recorder once");
        recorder
    })
}

/// The value of a metric whose labels include all of `labels`.
fn value(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values = recorder().values.lock().unwrap_or_else(|p| p.into_inner());
    values.iter().find_map(|(key, (is_gauge, v))| {
        let matches = key.name() == name
            && labels.iter().all(|(k, want)| key.labels().any(|l| l.key() == *k && l.value() == *want));
        let raw = v.load(Ordering::Relaxed);
        matches.then(|| if *is_gauge { f64::from_bits(raw) } else { raw as f64 })
    })
}

/// Waits until `name{labels}` satisfies `ok`, failing with its last value.
async fn wait_for(name: &str, labels: &[(&str, &str)], what: &str, ok: impl Fn(f64) -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = value(name, labels);
        if v.is_some_and(&ok) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{name}{labels:?}: {what}, got {v:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn postgres_tree(
    backend: &str,
    tune: impl FnOnce(SupervisorConfig) -> SupervisorConfig,
) -> (String, PostgresEngine, CompletionSupervisorHandle) {
    init_tracing();
    recorder();
    let url = fresh_database().await;
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let config = SupervisorConfig::new()
        .with_named_backend(backend, BackendConfig::postgres(&url))
        .with_gauge_interval(Duration::from_millis(50))
        .with_tick(Duration::from_millis(100));
    let (tree, _) = CompletionSupervisorHandle::spawn(tune(config)).await.expect("spawn");
    // The tree connects in the background: wait until its listener has read its tail, so what
    // a test commits next is after it.
    wait_until(WAIT, "the listener live", || async {
        tree.stats().await.is_ok_and(|s| s.listeners.iter().all(|l| l.state == ListenerState::Live))
    })
    .await;
    (url, engine, tree)
}

async fn subscriber_stats(tree: &CompletionSupervisorHandle, id: ff_completions::SubscriberId) -> SubscriberStats {
    let stats = tree.stats().await.expect("stats");
    stats.subscribers.into_iter().find(|s| s.id == id).unwrap_or_else(|| panic!("no stats for {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_lag_and_catch_up_metrics_follow_a_fast_and_a_stalled_subscriber() {
    let backend = "pg-metrics-lag";
    let (_url, engine, tree) = postgres_tree(backend, |c| c.with_subscriber_buffer(4)).await;
    let mut fast = tree.subscribe(Completions::tail().with_name("fast")).await.expect("fast");
    let mut slow = tree.subscribe(Completions::tail().with_name("slow")).await.expect("slow");
    // Unnamed subscribers record no per-subscriber series: ids are never reused.
    let mut unnamed = tree.subscribe(Completions::tail()).await.expect("unnamed");
    let fast_labels = [("backend", backend), ("subscriber", "fast")];
    let slow_labels = [("backend", backend), ("subscriber", "slow")];

    let ids = complete_n(&engine, 50).await;
    assert_exactly_once(&take_events(&mut fast, 50, WAIT).await, &ids, true);
    // Events of every family: the 50 completions and their claims' lease `acquired` events.
    wait_for("ff_completions_events_read_total", &[("backend", backend)], "100 events read", |v| v == 100.0).await;
    wait_for("ff_completions_events_delivered_total", &fast_labels, "all 50 delivered", |v| v == 50.0).await;
    wait_for("ff_completions_subscriber_lag_events", &fast_labels, "no lag", |v| v == 0.0).await;
    wait_for("ff_completions_subscriber_lag_ms", &fast_labels, "no lag", |v| v == 0.0).await;

    // The slow subscriber reads nothing: 4 events fill its buffer, 46 wait, and time passes.
    wait_for("ff_completions_events_delivered_total", &slow_labels, "4 in its buffer", |v| v == 4.0).await;
    wait_for("ff_completions_subscriber_lag_events", &slow_labels, "46 events behind", |v| v == 46.0).await;
    wait_for("ff_completions_subscriber_lag_ms", &slow_labels, "behind in time", |v| v > 0.0).await;
    let stalled = value("ff_completions_subscriber_lag_ms", &slow_labels).unwrap_or(0.0);
    wait_for("ff_completions_subscriber_lag_ms", &slow_labels, "growing while stalled", |v| v >= stalled + 100.0).await;
    // What the listener reads now, the blocked filter drops (and reads back later).
    let dropped = value("ff_completions_live_batches_dropped_total", &slow_labels).unwrap_or(0.0);
    let more = complete_n(&engine, 5).await;
    assert_exactly_once(&take_events(&mut fast, 5, WAIT).await, &more, true);
    wait_for("ff_completions_live_batches_dropped_total", &slow_labels, "one more dropped", |v| v > dropped).await;
    // The lag counts the listener's events of every family past the subscriber: the 5 more
    // completions and their claims' 5 lease events (the first 50 claims came before its cursor).
    wait_for("ff_completions_subscriber_lag_events", &slow_labels, "56 events behind", |v| v == 56.0).await;

    // Once it reads, its filter catches up from the backend and both lags return to 0.
    let all = [ids, more].concat();
    assert_exactly_once(&take_events(&mut slow, 55, WAIT).await, &all, true);
    wait_for("ff_completions_subscriber_lag_events", &slow_labels, "caught up", |v| v == 0.0).await;
    wait_for("ff_completions_subscriber_lag_ms", &slow_labels, "caught up", |v| v == 0.0).await;
    wait_for("ff_completions_events_delivered_total", &slow_labels, "all 55 delivered", |v| v == 55.0).await;
    let stats = subscriber_stats(&tree, slow.id()).await;
    assert!(stats.catch_up_reads >= 2, "a start-up read and at least one after the stall: {stats}");
    assert_eq!(value("ff_completions_catch_up_reads_total", &slow_labels), Some(stats.catch_up_reads as f64));
    assert_eq!(
        value("ff_completions_live_batches_dropped_total", &slow_labels),
        Some(stats.live_batches_dropped as f64)
    );
    assert_exactly_once(&take_events(&mut unnamed, 55, WAIT).await, &all, true);
    let unnamed_id = unnamed.id().to_string();
    for metric in ["ff_completions_events_delivered_total", "ff_completions_subscriber_lag_ms"] {
        let by_id = value(metric, &[("backend", backend), ("subscriber", unnamed_id.as_str())]);
        assert_eq!(by_id, None, "{metric} has a series for the unnamed subscriber {unnamed_id}");
    }
}

/// An open transaction holds nothing back: a completion committed after it is delivered while
/// it stays open, the held-back gauges stay at 0, and the newest tick counts it in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_holds_nothing_back_and_is_counted_in_progress() {
    let backend = "pg-metrics-in-progress";
    let (_url, engine, tree) = postgres_tree(backend, |c| c).await;
    let mut sub = tree.subscribe(Completions::tail()).await.expect("sub");
    let labels = [("backend", backend)];
    let flow = FlowId::new();
    engine.create_flow(&flow, None).await.expect("flow");
    let (open, more) = (ExecutionSpec::new(&flow), ExecutionSpec::new(&flow));
    engine.create_execution(&open).await.expect("create");
    engine.create_execution(&more).await.expect("create");
    assert_eq!(engine.claim("w", 2).await.expect("claim").len(), 2);

    // A completes in a transaction left open; B commits after it and arrives at once.
    let mut tx = engine.pool().begin().await.expect("begin");
    crate::support::postgres::complete_by_sql(&mut tx, open.id).await;
    engine.complete(&more.id).await.expect("complete B");
    assert_exactly_once(&take_events(&mut sub, 1, WAIT).await, &[more.id], true);
    let in_progress = [("backend", backend), ("name", "transactions_in_progress")];
    wait_for("ff_completions_backend_gauge", &in_progress, "A counted in progress", |v| v >= 1.0).await;
    assert_eq!(value("ff_completions_held_back", &labels).unwrap_or(0.0), 0.0, "nothing is held back");

    tx.commit().await.expect("commit");
    assert_exactly_once(&take_events(&mut sub, 1, WAIT).await, &[open.id], true);
    assert_eq!(value("ff_completions_held_back_seconds", &labels).unwrap_or(0.0), 0.0, "never held back");
}

/// Sends `n` notifications of nearly the largest payload, each filling most of a queue page.
async fn fill_notification_queue(conn: &mut PgConnection, n: usize) {
    for _ in 0..n {
        sqlx::query("SELECT pg_notify('ff_completion_metrics_hold', repeat('x', 7900))")
            .execute(&mut *conn)
            .await
            .expect("notify");
    }
}

async fn server_queue_usage(conn: &mut PgConnection) -> f64 {
    sqlx::query_scalar("SELECT pg_notification_queue_usage()").fetch_one(conn).await.expect("queue usage")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notification_queue_gauge_follows_what_a_listener_in_a_transaction_holds() {
    let backend = "pg-metrics-queue";
    let (url, _engine, _tree) = postgres_tree(backend, |c| c).await;
    let usage = [("backend", backend), ("name", "notification_queue_usage")];
    wait_for("ff_completions_backend_gauge", &usage, "recorded, within 0..=1", |v| (0.0..=1.0).contains(&v)).await;

    // A session that listens inside an open transaction receives nothing until it ends, so
    // the server keeps every notification sent meanwhile in its queue.
    let mut holder = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("LISTEN ff_completion_metrics_hold").execute(&mut holder).await.expect("listen");
    sqlx::query("BEGIN").execute(&mut holder).await.expect("begin");
    sqlx::query("SELECT 1").execute(&mut holder).await.expect("in a transaction");
    let mut sender = PgConnection::connect(&url).await.expect("connect");
    fill_notification_queue(&mut sender, 12).await;
    let deadline = std::time::Instant::now() + WAIT;
    let held = loop {
        let server = server_queue_usage(&mut sender).await;
        let gauge = value("ff_completions_backend_gauge", &usage);
        if server > 0.0 && gauge == Some(server) {
            break server;
        }
        assert!(std::time::Instant::now() < deadline, "gauge {gauge:?}, server {server}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Once it is gone, the queue is released (more traffic makes the server advance its tail).
    drop(holder);
    fill_notification_queue(&mut sender, 6).await;
    wait_for("ff_completions_backend_gauge", &usage, "below what was held", |v| v < held).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_rows_reconnects_and_restarts_are_counted_as_the_stats_count_them() {
    let backend = "pg-metrics-faults";
    let (url, engine, tree) = postgres_tree(backend, |c| c).await;
    let mut sub = tree.subscribe(Completions::tail()).await.expect("sub");
    let labels = [("backend", backend)];
    let listener_stats = || async { tree.stats().await.expect("stats").listeners.remove(0) };

    let mut conn = PgConnection::connect(&url).await.expect("connect");
    for sql in [
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES (NULL, 'success', 1, 1)",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES (gen_random_uuid(), 'success', 1, 999)",
    ] {
        sqlx::query(sql).execute(&mut conn).await.expect("insert a bad row");
    }
    let ids = complete_n(&engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &ids, true);
    wait_for("ff_completions_rows_skipped_total", &labels, "both bad rows", |v| v == 2.0).await;
    assert_eq!(listener_stats().await.rows_skipped, 2);

    // The LISTEN connection is terminated: the listener re-makes it in place and catches up.
    wait_until(WAIT, "the listener live", || async { listener_stats().await.state == ListenerState::Live }).await;
    let terminated = ConnectionKiller::new(&BackendConfig::postgres(&url)).kill().await.expect("terminate");
    assert_eq!(terminated, 1);
    wait_for("ff_completions_listener_reconnects_total", &labels, "one reconnect", |v| v >= 1.0).await;
    let stats = listener_stats().await;
    assert_eq!(value("ff_completions_listener_reconnects_total", &labels), Some(stats.reconnects as f64));
    let ids = complete_n(&engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &ids, true);

    let restarts_before = value("ff_completions_listener_restarts_total", &labels).unwrap_or(0.0);
    tree.listener_cell(backend).await.expect("listener").kill();
    wait_for("ff_completions_listener_restarts_total", &labels, "one more restart", |v| v == restarts_before + 1.0)
        .await;
    assert_eq!(value("ff_completions_listener_restarts_total", &labels), Some(listener_stats().await.restarts as f64));
}

#[cfg(feature = "valkey")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_valkey_stream_length_gauge_counts_the_completion_stream() {
    init_tracing();
    recorder();
    let server = crate::support::valkey::ValkeyServer::start().await;
    let backend = "valkey-metrics";
    let engine = ff_completions_lab::connect_engine(&server.config()).await.expect("engine");
    let config = SupervisorConfig::new()
        .with_named_backend(backend, server.config())
        .with_gauge_interval(Duration::from_millis(50));
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn");
    let mut sub = tree.subscribe(Completions::tail()).await.expect("sub");
    let length = [("backend", backend), ("name", "stream_length")];
    wait_for("ff_completions_backend_gauge", &length, "an empty stream", |v| v == 0.0).await;
    let ids = complete_n(&*engine, 7).await;
    assert_exactly_once(&take_events(&mut sub, 7, WAIT).await, &ids, true);
    // Entries of every family: each claim's `acquired` is in the stream beside the completion.
    wait_for("ff_completions_backend_gauge", &length, "14 entries", |v| v == 14.0).await;
    wait_for("ff_completions_events_read_total", &[("backend", backend)], "14 events read", |v| v == 14.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_metrics_count_held_partitions_unacknowledged_events_acks_fences_repeats_and_rebalances() {
    use ff_completions::{DurableRequest, Error};

    let (url, engine, tree) = postgres_tree("pg-metrics-groups", |c| c).await;
    let group = "metrics-group";
    let labels = [("group", group)];
    let request = || DurableRequest::group(group).with_member("a").with_lease_ttl(Duration::from_millis(900));
    let mut member = tree.subscribe(request()).await.expect("join");
    wait_for("ff_completions_group_partitions_held", &labels, "every partition held", |v| v == 256.0).await;
    wait_for("ff_completions_group_rebalances_total", &labels, "the join", |v| v >= 1.0).await;

    let ids = complete_n(&engine, 3).await;
    let got = take_events(&mut member, 3, WAIT).await;
    assert_exactly_once(&got, &ids, true);
    wait_for("ff_completions_group_unacked", &labels, "three delivered, none acknowledged", |v| v == 3.0).await;
    member.ack(&got[1].cursor).await.expect("ack");
    assert_eq!(value("ff_completions_group_acks_total", &labels), Some(1.0));
    wait_for("ff_completions_group_unacked", &labels, "one left after the ack", |v| v == 1.0).await;

    // Another incarnation of member "a" rejoins: a ticket taken before is fenced.
    let ticket = member.ticket(&got[2].cursor).expect("ticket");
    let second = tree.subscribe(request()).await.expect("rejoin");
    wait_until(WAIT, "the rejoin", || async { second.partitions().len() == 256 }).await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let mut tx = conn.begin().await.expect("begin");
    assert!(matches!(ticket.commit_in(&mut tx).await, Err(Error::Fenced { .. })));
    assert_eq!(value("ff_completions_group_fenced_total", &labels), Some(1.0));
    drop(tx);

    // The same event's ticket committed twice: the second is refused and counted.
    let mut second = second;
    let more = complete_n(&engine, 1).await;
    // The rejoined member delivers again what "a" left unacknowledged, then the new one.
    let got = take_events(&mut second, 2, WAIT).await;
    assert_exactly_once(&got, &[ids[2], more[0]], true);
    let ticket = second.ticket(&got[1].cursor).expect("ticket");
    let mut tx = conn.begin().await.expect("begin");
    ticket.commit_in(&mut tx).await.expect("the first commit of the ticket");
    tx.commit().await.expect("commit");
    let mut tx = conn.begin().await.expect("begin");
    assert!(matches!(ticket.commit_in(&mut tx).await, Err(Error::AlreadyAcknowledged { .. })));
    assert_eq!(value("ff_completions_group_already_acknowledged_total", &labels), Some(1.0));
    assert_eq!(value("ff_completions_group_fenced_total", &labels), Some(1.0), "not counted as fenced");
}

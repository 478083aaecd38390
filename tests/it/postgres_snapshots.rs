//! Postgres batches between recorded snapshots: no transaction it does not read waits anyone,
//! a late commit is delivered once in commit order, a rollback never appears, every cursor
//! handed out resumes exactly the rest, and a flow's completions keep their commit order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ff_completions::{
    BackendConfig, CompletionEvent, CompletionSupervisorHandle, Completions, ExecutionId, LeaseHistory,
    SupervisorConfig,
};
use ff_completions_lab::{Engine, ExecutionSpec, PostgresEngine};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::contract::{QUIET, WAIT, complete_n, running};
use crate::families::take;

use crate::support::postgres::{complete_by_sql, fresh_database, reader_order};
use crate::support::{assert_exactly_once, assert_no_more, init_tracing, take_events};

/// Arrival well before this means no open transaction held anything back (it stays open far
/// longer); it is no latency target.
const NOT_HELD_BACK: Duration = Duration::from_secs(10);

struct Fixture {
    url: String,
    tree: CompletionSupervisorHandle,
    engine: Arc<PostgresEngine>,
}

async fn fixture() -> Fixture {
    init_tracing();
    let url = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)))
            .await
            .expect("spawn tree");
    Fixture { url, tree, engine }
}

/// Begins a transaction on its own connection that has written (so it holds a transaction id)
/// and is left idle in transaction; returns it with its server process id.
async fn open_writer(url: &str, write: &'static str) -> (PgConnection, i32) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut conn).await.expect("begin");
    sqlx::query(write).execute(&mut conn).await.expect("write");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut conn).await.expect("pid");
    (conn, pid)
}

/// Whether the server process `pid` is idle in a transaction that holds a transaction id.
async fn idle_in_transaction(url: &str, pid: i32) -> bool {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar(
        "SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'idle in transaction' \
           AND backend_xid IS NOT NULL",
    )
    .bind(pid)
    .fetch_one(&mut conn)
    .await
    .expect("pg_stat_activity")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_arrive_while_unrelated_transactions_stay_open_here_and_in_another_database() {
    let f = fixture().await;
    let other_db = fresh_database().await;
    let mut setup = PgConnection::connect(&other_db).await.expect("connect");
    sqlx::query("CREATE TABLE busy (x integer)").execute(&mut setup).await.expect("table");
    let (mut elsewhere, elsewhere_pid) = open_writer(&other_db, "INSERT INTO busy VALUES (1)").await;
    let (mut here, here_pid) = open_writer(&f.url, "SELECT pg_current_xact_id()").await;

    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let ids = running(&*f.engine, ExecutionSpec::new, 20).await;
    let mut waits = Vec::new();
    let mut events = Vec::new();
    for id in &ids {
        assert!(f.engine.complete(id).await.expect("complete"));
        let committed = Instant::now();
        events.extend(take_events(&mut sub, 1, NOT_HELD_BACK).await);
        waits.push(committed.elapsed());
    }
    assert_exactly_once(&events, &ids, true);
    waits.sort();
    eprintln!("delivery with two unrelated transactions open: p50 {:?}, max {:?}", waits[10], waits[19]);
    // Both transactions were open the whole time.
    assert!(idle_in_transaction(&f.url, elsewhere_pid).await, "the other database's writer is still open");
    assert!(idle_in_transaction(&f.url, here_pid).await, "this database's idle transaction is still open");
    sqlx::query("ROLLBACK").execute(&mut elsewhere).await.expect("end");
    sqlx::query("ROLLBACK").execute(&mut here).await.expect("end");
    assert_no_more(&mut sub, QUIET).await;
}

/// Runs `ff_complete_execution` for `id` inside a transaction left open on its own connection.
async fn complete_in_open_transaction(url: &str, id: ExecutionId) -> PgConnection {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut conn).await.expect("begin");
    complete_by_sql(&mut conn, id).await;
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_across_reads_arrives_once_a_rollback_never_and_every_cursor_resumes_the_rest() {
    let f = fixture().await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let mut leases = f.tree.subscribe(LeaseHistory::tail()).await.expect("leases");
    let pending = running(&*f.engine, ExecutionSpec::new, 2).await;
    // The listener has read the two claims' `acquired` events before the count is taken.
    take(&mut leases, 2, WAIT).await;
    let mut late = complete_in_open_transaction(&f.url, pending[0]).await;
    let mut rolled_back = complete_in_open_transaction(&f.url, pending[1]).await;
    let reads_before = f.tree.stats().await.expect("stats").listeners[0].events_read;
    let mut events = Vec::new();
    // Three completions, each read and delivered while both transactions stay open.
    for _ in 0..3 {
        let id = complete_n(&*f.engine, 1).await;
        let got = take_events(&mut sub, 1, WAIT).await;
        assert_exactly_once(&got, &id, true);
        events.extend(got);
    }
    // Read once each: the three completions and their claims' lease `acquired` events.
    assert_eq!(f.tree.stats().await.expect("stats").listeners[0].events_read, reads_before + 3 * 2);
    sqlx::query("ROLLBACK").execute(&mut rolled_back).await.expect("roll back");
    sqlx::query("COMMIT").execute(&mut late).await.expect("commit late");
    events.extend(take_events(&mut sub, 1, WAIT).await);
    assert_eq!(events[3].execution_id, pending[0], "the late commit arrives after what committed before it");
    let more = complete_n(&*f.engine, 2).await;
    events.extend(take_events(&mut sub, 2, WAIT).await);
    assert_no_more(&mut sub, QUIET).await;
    let order = reader_order(&f.url).await;
    assert!(!order.contains(&pending[1]), "the rolled-back completion is nowhere");
    assert_exactly_once(&events, &order, true);
    assert_eq!(events[4..].iter().map(|e| e.execution_id).collect::<Vec<_>>(), more);

    // Every cursor handed out resumes exactly the rest, in the same order.
    for (i, event) in events.iter().enumerate() {
        let mut resumed = f.tree.subscribe(Completions::from_cursor(event.cursor.clone())).await.expect("resume");
        let rest = take_events(&mut resumed, events.len() - i - 1, WAIT).await;
        let want: Vec<ExecutionId> = events[i + 1..].iter().map(|e| e.execution_id).collect();
        assert_exactly_once(&rest, &want, true);
        assert_no_more(&mut resumed, QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_flow_is_delivered_in_its_commit_order_under_concurrent_producers() {
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: usize = 40;
    let f = fixture().await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    // All executions are claimed first; then each producer completes its own flow's executions
    // one after the other, all producers at once.
    let mut flows = Vec::new();
    for _ in 0..PRODUCERS {
        flows.push(running(&*f.engine, ExecutionSpec::new, PER_PRODUCER).await);
    }
    let producers: Vec<_> = flows
        .iter()
        .cloned()
        .map(|ids| {
            let engine = f.engine.clone();
            tokio::spawn(async move {
                for id in &ids {
                    assert!(engine.complete(id).await.expect("complete"));
                }
                ids
            })
        })
        .collect();
    let mut committed = Vec::new();
    for p in producers {
        committed.push(p.await.expect("producer"));
    }
    let events: Vec<CompletionEvent> = take_events(&mut sub, PRODUCERS * PER_PRODUCER, WAIT).await;
    assert_exactly_once(&events, &reader_order(&f.url).await, true);
    let mut by_flow: HashMap<_, Vec<ExecutionId>> = HashMap::new();
    for e in &events {
        by_flow.entry(e.flow_id).or_default().push(e.execution_id);
    }
    for flow in committed {
        let delivered = by_flow.get(&Some(flow_of(&events, flow[0]))).cloned().unwrap_or_default();
        assert_eq!(delivered, flow, "a flow's completions arrive in the order they committed");
    }
    assert_no_more(&mut sub, QUIET).await;
}

fn flow_of(events: &[CompletionEvent], id: ExecutionId) -> ff_completions::FlowId {
    events.iter().find(|e| e.execution_id == id).and_then(|e| e.flow_id).expect("flow of a delivered execution")
}

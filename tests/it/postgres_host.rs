//! Postgres in a database the subsystem does not own: a host application with its own sqlx
//! ledger, its own `ff_`-named tables and its own trigger on an existing outbox; concurrent
//! first starts; a database of the previous version of this project.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ff_completions::cursor::{encode_postgres_cursor, encode_postgres_event_cursor};
use ff_completions::postgres::{MIGRATION_LEDGER, MIGRATOR};
use ff_completions::{
    BackendConfig, CompletionSupervisorHandle, Completions, ExecutionId, StreamCursor, SupervisorConfig,
};
use ff_completions_lab::PostgresEngine;
use ff_completions_lab::engine::postgres::{DEMO_MIGRATION_LEDGER, DEMO_MIGRATOR};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgListener};

use crate::contract::{QUIET, WAIT, complete_n};
use crate::support::{assert_exactly_once, assert_no_more, init_tracing, postgres::fresh_database, take_events};

/// Rows in the host's outbox before the subsystem is installed.
const HOST_ROWS: i64 = 1_000_000;

/// The host's own migrations, in sqlx's layout: its own `ff_flow` (another shape than the demo
/// engine's), an outbox of the seed's shape, and a per-row trigger of the same name as the one
/// earlier versions of this project installed, whose payload its consumers parse.
const HOST_MIGRATIONS: [(&str, &str); 4] = [
    ("0001_host_tables.sql", "CREATE TABLE ff_flow (id integer PRIMARY KEY, note text NOT NULL);"),
    (
        "0002_host_outbox.sql",
        "CREATE TABLE ff_completion_event (event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         execution_id uuid, flow_id uuid, outcome text, namespace text, instance_tag text, \
         occurred_at_ms bigint, partition_key smallint);",
    ),
    (
        "0003_host_history.sql",
        "INSERT INTO ff_completion_event (execution_id, outcome, namespace, occurred_at_ms, partition_key) \
         SELECT gen_random_uuid(), 'success', 'host', 1, 0 FROM generate_series(1, 1000000);",
    ),
    (
        "0004_host_trigger.sql",
        "CREATE FUNCTION ff_notify_completion_event() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_notify('host_completions', json_build_object('event_id', NEW.event_id, \
         'outcome', NEW.outcome)::text); RETURN NEW; END $$; \
         CREATE TRIGGER ff_completion_event_notify_trg AFTER INSERT ON ff_completion_event \
         FOR EACH ROW EXECUTE FUNCTION ff_notify_completion_event();",
    ),
];

/// Writes the host's migrations (and `extra`) into a fresh directory and runs them with sqlx's
/// default ledger, `_sqlx_migrations`, as the host application does.
async fn run_host_migrations(url: &str, dir: &std::path::Path, extra: &[(&str, &str)]) {
    for (name, sql) in HOST_MIGRATIONS.iter().chain(extra) {
        std::fs::write(dir.join(name), sql).expect("write host migration");
    }
    let migrator = sqlx::migrate::Migrator::new(dir).await.expect("host migrator");
    let mut conn = PgConnection::connect(url).await.expect("connect");
    migrator.run(&mut conn).await.expect("the host's migrations run");
}

async fn scalar_i64(conn: &mut PgConnection, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(conn).await.expect(sql)
}

/// Inserts `n` completions as the host's own producer does: plain SQL, no wake-up.
async fn host_completes(conn: &mut PgConnection, n: usize) -> Vec<ExecutionId> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let id = ExecutionId::from_parts(3, uuid::Uuid::new_v4());
        sqlx::query(
            "INSERT INTO ff_completion_event (execution_id, outcome, namespace, occurred_at_ms, partition_key) \
             VALUES ($1, 'success', 'host', 2, 3)",
        )
        .bind(id.uuid())
        .execute(&mut *conn)
        .await
        .expect("host insert");
        ids.push(id);
    }
    ids
}

/// Probes the outbox with plain reads until `stop`, recording the longest a read waited: a
/// read waits only while someone holds ACCESS EXCLUSIVE on the table.
fn probe_reads(url: String, stop: Arc<AtomicBool>, longest_us: Arc<AtomicU64>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        let mut probes = 0;
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            sqlx::query("SELECT event_id FROM ff_completion_event LIMIT 1")
                .execute(&mut conn)
                .await
                .expect("probe read");
            longest_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            probes += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        probes
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_beside_a_host_schema_and_adopts_its_million_row_outbox_without_a_rewrite() {
    init_tracing();
    let url = fresh_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    run_host_migrations(&url, dir.path(), &[]).await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    assert_eq!(scalar_i64(&mut conn, "SELECT count(*) FROM ff_completion_event").await, HOST_ROWS);
    let file_before = scalar_i64(&mut conn, "SELECT pg_relation_filenode('ff_completion_event')::int8").await;

    // The host's consumers listen for its per-row payloads.
    let mut host_listener = PgListener::connect(&url).await.expect("host listener");
    host_listener.listen("host_completions").await.expect("LISTEN host_completions");

    // Install while plain reads of the outbox go on.
    let (stop, longest_us) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let probe = probe_reads(url.clone(), stop.clone(), longest_us.clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let config = SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)).with_connect_at_start(true);
    let (tree, _) =
        CompletionSupervisorHandle::spawn(config).await.expect("the tree installs beside the host's schema");
    let install = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let probes = probe.await.expect("probe");
    let blocked = Duration::from_micros(longest_us.load(Ordering::Relaxed));
    eprintln!("adoption of {HOST_ROWS} rows: install {install:?}, longest blocked read {blocked:?} of {probes} probes");
    assert!(probes > 0);
    assert!(blocked < Duration::from_secs(1), "ACCESS EXCLUSIVE held for {blocked:?}");
    let file_after = scalar_i64(&mut conn, "SELECT pg_relation_filenode('ff_completion_event')::int8").await;
    assert_eq!(file_before, file_after, "adopting the outbox never rewrites it");

    // Our ledger is our own; the host's is untouched, and no demo-engine table was created.
    assert_eq!(scalar_i64(&mut conn, "SELECT count(*) FROM _sqlx_migrations").await, 4);
    let ours: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {MIGRATION_LEDGER}")))
        .fetch_one(&mut conn)
        .await
        .expect("our ledger");
    assert!(ours >= 3, "our migrations are in our ledger ({ours})");
    for demo in ["ff_execution", "ff_dependency", DEMO_MIGRATION_LEDGER] {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(demo)
            .fetch_one(&mut conn)
            .await
            .expect("to_regclass");
        assert!(!exists, "{demo} must not be created in the host's schema");
    }
    let host_flow_columns =
        scalar_i64(&mut conn, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'ff_flow'").await;
    assert_eq!(host_flow_columns, 2, "the host's ff_flow keeps its shape");

    // New completions from the host's plain SQL arrive, and its trigger still fires with its payload.
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    let new = host_completes(&mut conn, 20).await;
    assert_exactly_once(&take_events(&mut live, 20, WAIT).await, &new, true);
    assert_no_more(&mut live, QUIET).await;
    for _ in 0..20 {
        let note = tokio::time::timeout(WAIT, host_listener.recv()).await.expect("host payload").expect("recv");
        let payload: serde_json::Value = serde_json::from_str(note.payload()).expect("the host's JSON payload");
        assert_eq!(payload["outcome"], "success");
    }
    let host_triggers = scalar_i64(
        &mut conn,
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'ff_completion_event'::regclass AND NOT tgisinternal \
           AND tgname NOT LIKE 'ff\\_completions\\_%'",
    )
    .await;
    assert_eq!(host_triggers, 1, "only the host's trigger is on the outbox beside the subsystem's own");

    // The seed's cursor over the adopted history: the last 10 rows from before adoption, then
    // the new ones.
    let mut resumed = tree
        .subscribe(Completions::from_cursor(encode_postgres_event_cursor(HOST_ROWS - 10)))
        .await
        .expect("resume in the adopted history");
    let events = take_events(&mut resumed, 30, WAIT).await;
    assert!(events[..10].iter().all(|e| e.namespace.as_ref().is_some_and(|n| n.as_str() == "host")));
    assert_exactly_once(&events[10..], &new, true);

    // The host's migrations still run after ours.
    tree.shutdown().await;
    run_host_migrations(&url, dir.path(), &[("0005_host_more.sql", "ALTER TABLE ff_flow ADD COLUMN extra text;")])
        .await;
    assert_eq!(scalar_i64(&mut conn, "SELECT count(*) FROM _sqlx_migrations").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_then_eight_concurrent_first_starts_migrate_once_without_error() {
    init_tracing();
    for starters in [2usize, 8] {
        let url = fresh_database().await;
        let config = BackendConfig::postgres(&url);
        let starts: Vec<_> = (0..starters)
            .map(|i| {
                let config = config.clone();
                tokio::spawn(async move {
                    // Half start the tree alone, half the demo engine (both schemas).
                    if i % 2 == 0 {
                        let config = SupervisorConfig::new().with_backend(config).with_connect_at_start(true);
                        let (tree, _) = CompletionSupervisorHandle::spawn(config).await?;
                        tree.shutdown().await;
                        Ok(())
                    } else {
                        PostgresEngine::connect(&config).await.map(drop)
                    }
                })
            })
            .collect();
        for start in starts {
            start.await.expect("join").unwrap_or_else(|e| panic!("a concurrent start failed: {e}"));
        }
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        let applied: Vec<(i64, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT version, success FROM {MIGRATION_LEDGER} ORDER BY version"
        )))
        .fetch_all(&mut conn)
        .await
        .expect("ledger");
        let expected: Vec<(i64, bool)> = MIGRATOR.iter().map(|m| (m.version, true)).collect();
        assert_eq!(applied, expected, "{starters} starters: each migration once");
        let demo: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {DEMO_MIGRATION_LEDGER}")))
                .fetch_one(&mut conn)
                .await
                .expect("demo ledger");
        assert_eq!(demo as usize, DEMO_MIGRATOR.iter().count(), "{starters} starters: each demo migration once");
        let sqlx_ledger: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut conn)
            .await
            .expect("");
        assert!(!sqlx_ledger, "sqlx's default ledger is never created");
    }
}

/// The previous version's outbox, index and in-commit trigger, as its migrations left them.
const PREVIOUS_VERSION: &str = "\
CREATE TABLE ff_completion_event (event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, execution_id uuid, \
  flow_id uuid, outcome text, namespace text, instance_tag text, occurred_at_ms bigint, partition_key smallint, \
  txid xid8 NOT NULL DEFAULT pg_current_xact_id(), tags jsonb);
CREATE INDEX ff_completion_event_txid_idx ON ff_completion_event (txid, event_id);
CREATE OR REPLACE FUNCTION ff_notify_completion_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ff_completion', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER ff_completion_event_notify_trg AFTER INSERT ON ff_completion_event
    FOR EACH STATEMENT EXECUTE FUNCTION ff_notify_completion_event();";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_previous_version_loses_its_in_commit_trigger_and_keeps_its_cursors() {
    init_tracing();
    let url = fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql(PREVIOUS_VERSION).execute(&mut conn).await.expect("previous version's schema");
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.extend(host_completes(&mut conn, 1).await);
    }
    let (txid, event_id): (i64, i64) =
        sqlx::query_as("SELECT txid::text::int8, event_id FROM ff_completion_event WHERE execution_id = $1")
            .bind(ids[2].uuid())
            .fetch_one(&mut conn)
            .await
            .expect("position");
    let saved: StreamCursor = encode_postgres_cursor(txid as u64, event_id);

    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("upgrade");
    let trigger_left = scalar_i64(
        &mut conn,
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'ff_completion_event'::regclass AND NOT tgisinternal \
           AND tgname NOT LIKE 'ff\\_completions\\_%'",
    )
    .await;
    assert_eq!(trigger_left, 0, "the previous version's in-commit trigger is dropped");
    let function_left =
        scalar_i64(&mut conn, "SELECT count(*) FROM pg_proc WHERE proname = 'ff_notify_completion_event'").await;
    assert_eq!(function_left, 0, "and its function");

    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)))
            .await
            .expect("spawn");
    let mut resumed = tree.subscribe(Completions::from_cursor(saved)).await.expect("a saved cursor resumes");
    assert_exactly_once(&take_events(&mut resumed, 3, WAIT).await, &ids[3..], true);
    let more = complete_n(&engine, 2).await;
    assert_exactly_once(&take_events(&mut resumed, 2, WAIT).await, &more, true);
    assert_no_more(&mut resumed, QUIET).await;
}

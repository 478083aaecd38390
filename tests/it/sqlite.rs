//! Embedded SQLite end to end: engine operation -> trigger -> outbox -> listener -> filter ->
//! subscriber, on temp-file and in-memory databases.

use std::time::Duration;

use ff_completions::cursor::{encode_postgres_cursor, encode_valkey_cursor};
use ff_completions::{BackendConfig, CompletionSupervisorHandle, Completions, SupervisorConfig};
use ff_completions_lab::SqliteEngine;
use sqlx::Connection;

use crate::contract::{self, QUIET, WAIT, complete_n, fixture};
use crate::support::{assert_exactly_once, assert_no_more, init_tracing, take_events};

/// A fresh database file in a temp dir that lives as long as the returned guard.
fn backend_file() -> (tempfile::TempDir, BackendConfig) {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = BackendConfig::sqlite(dir.path().join("completions.db"));
    (dir, config)
}

async fn contract_backend() -> (tempfile::TempDir, BackendConfig) {
    backend_file()
}

contract::contract_tests!(foreign cursors: vec![encode_valkey_cursor(1, 2), encode_postgres_cursor(3, 4)]);

crate::families::family_tests!();
crate::tail_await::tail_await_tests!();

/// The durable-group store's promises ([`crate::groups::group_store_tests`]).
mod groups {
    use super::contract_backend;

    crate::groups::group_store_tests!();
    crate::durable::durable_tests!();

    crate::groups::group_store_tests! { @each a_position_above_i64_max_is_a_validation_error_and_changes_nothing; }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_in_the_callers_transaction_commits_with_its_effect_and_a_fenced_or_repeated_one_rolls_it_back() {
        use ff_completions::__store::ack_in;
        use sqlx::Connection;
        use sqlx::sqlite::SqliteConnection;

        use crate::groups::{InTransaction, assert_ack_in_transaction_commits_or_rolls_back_with_the_effect, open};

        let (dir, backend) = contract_backend().await;
        let store = open(&backend).await;
        let url = format!("sqlite:{}", dir.path().join("completions.db").display());
        let mut conn = SqliteConnection::connect(&url).await.expect("connect");
        sqlx::query("CREATE TABLE scratch_effect (id INTEGER PRIMARY KEY)").execute(&mut conn).await.expect("scratch");
        let conn = tokio::sync::Mutex::new(conn);
        assert_ack_in_transaction_commits_or_rolls_back_with_the_effect(&store, |group, acks, id| {
            let conn = &conn;
            async move {
                let mut conn = conn.lock().await;
                let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.expect("begin");
                sqlx::query("INSERT INTO scratch_effect (id) VALUES (?)")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .expect("effect");
                let acked = ack_in(&mut tx, &group, "a", &acks).await;
                if acked.is_ok() {
                    tx.commit().await.expect("commit");
                } else {
                    tx.rollback().await.expect("rollback");
                }
                let effect_kept: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM scratch_effect WHERE id = ?)")
                    .bind(id)
                    .fetch_one(&mut *conn)
                    .await
                    .expect("effect");
                InTransaction { acked, effect_kept }
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_memory_database_round_trips() {
    init_tracing();
    contract::every_outcome_round_trips_with_all_fields(BackendConfig::sqlite_in_memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_from_another_connection_wake_the_listener() {
    let (_dir, backend) = backend_file();
    let (tree, _) = CompletionSupervisorHandle::spawn(
        SupervisorConfig::new().with_backend(backend.clone()).with_tick(Duration::from_secs(3600)),
    )
    .await
    .expect("spawn");
    let mut sub = tree.subscribe(Completions::tail()).await.expect("sub");
    // A second engine in this process shares the database's in-process commit signal (keyed by
    // the file's path), so its commits wake the listener directly.
    let other = SqliteEngine::connect(&backend).await.expect("other engine");
    let ids = complete_n(&other, 3).await;
    assert_exactly_once(&take_events(&mut sub, 3, WAIT).await, &ids, true);
    let BackendConfig {
        connection: ff_completions::BackendConnection::Sqlite(ff_completions::SqliteConnection::File(path)),
        ..
    } = &backend
    else {
        panic!("file backend")
    };
    // A plain connection raises no signal: with the hour-long tick, only the listener's
    // `PRAGMA data_version` polling can see this commit. (Another process is the test below.)
    let mut plain =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.expect("plain connection");
    let fresh = contract::running(&other, ff_completions_lab::ExecutionSpec::new, 1).await;
    sqlx::query("UPDATE ff_execution SET state = 'success' WHERE execution_id = ?")
        .bind(fresh[0].uuid().to_string())
        .execute(&mut plain)
        .await
        .expect("plain write");
    assert_exactly_once(&take_events(&mut sub, 1, WAIT).await, &fresh, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_skipped_once_and_the_events_around_them_arrive() {
    let (_dir, backend) = backend_file();
    let f = fixture(backend.clone(), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let before = complete_n(&*f.engine, 3).await;
    let engine = SqliteEngine::connect(&backend).await.expect("engine");
    let bad_rows = [
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES (NULL, 'success', 1, 1)",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES ('not-a-uuid', 'success', 1, 1)",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES ('6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b', 'success', 1, 999)",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES ('6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b', NULL, 1, 1)",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key, tags) VALUES ('6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b', 'success', 1, 1, 'not json')",
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES ('6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b', 'success', 'yesterday', 1)",
    ];
    for sql in bad_rows {
        sqlx::query(sql).execute(engine.pool()).await.expect("insert bad row");
    }
    let after = complete_n(&*f.engine, 3).await;
    assert_exactly_once(&take_events(&mut sub, 6, WAIT).await, &[before, after].concat(), true);
    assert_no_more(&mut sub, QUIET).await;
    let stats = f.tree.stats().await.expect("stats");
    assert_eq!(stats.listeners[0].rows_skipped, 6, "each bad row is reported once");
    assert_eq!(stats.listeners[0].restarts, 0, "the listener never died");
}

/// Updates executions to terminal states from a separate `python3` process, one transaction
/// each, in argument order (`<uuid>=<state>`); the producer trigger writes the completions.
const WRITE_FROM_PYTHON: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
for arg in sys.argv[2:]:
    execution_id, state = arg.split("=")
    db.execute("BEGIN IMMEDIATE")
    cur = db.execute("UPDATE ff_execution SET state = ? WHERE execution_id = ?", (state, execution_id))
    if cur.rowcount != 1:
        sys.exit(f"{execution_id}: {cur.rowcount} rows updated")
    db.execute("COMMIT")
db.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_committed_by_another_process_reach_the_subscriber_in_order_through_data_version() {
    let (_dir, backend) = backend_file();
    let BackendConfig {
        connection: ff_completions::BackendConnection::Sqlite(ff_completions::SqliteConnection::File(path)),
        ..
    } = &backend
    else {
        panic!("file backend")
    };
    // A tick far longer than the wait below: only the `PRAGMA data_version` wake explains a
    // timely delivery, since the other process cannot raise this process's commit signal.
    let (tree, _) = CompletionSupervisorHandle::spawn(
        SupervisorConfig::new().with_backend(backend.clone()).with_tick(Duration::from_secs(60)),
    )
    .await
    .expect("spawn");
    let engine = SqliteEngine::connect(&backend).await.expect("engine");
    let ids = contract::running(&engine, ff_completions_lab::ExecutionSpec::new, 3).await;
    let mut sub = tree.subscribe(Completions::tail()).await.expect("sub");

    let outcomes = ["success", "failed", "cancelled"];
    let args: Vec<String> = ids.iter().zip(outcomes).map(|(id, state)| format!("{}={state}", id.uuid())).collect();
    let writer = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(WRITE_FROM_PYTHON)
        .arg(path)
        .args(&args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the python writer finishes in time")
        .expect("python3 runs");
    assert!(out.status.success(), "python writer failed: {}", String::from_utf8_lossy(&out.stderr));

    let events = take_events(&mut sub, 3, Duration::from_secs(10)).await;
    assert_exactly_once(&events, &ids, true);
    let got: Vec<&str> = events.iter().map(|e| e.outcome.as_wire()).collect();
    assert_eq!(got, outcomes, "each completion carries the state the other process wrote");
    assert_no_more(&mut sub, QUIET).await;
    let stats = tree.stats().await.expect("stats");
    assert_eq!(stats.listeners[0].restarts, 0, "no restart's catch-up delivered them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_of_each_family_are_skipped_once_and_the_events_around_them_arrive() {
    let (_dir, backend) = backend_file();
    let engine = SqliteEngine::connect(&backend).await.expect("engine");
    crate::families::malformed_rows_are_skipped_once(backend, || async move {
        let uuid = "6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b";
        let bad_rows = [
            // An unknown lease kind, a lease row without an execution, a signal without its id,
            // an unknown family.
            format!("INSERT INTO ff_completion_event (family, execution_id, outcome, occurred_at_ms, partition_key) VALUES ('lease_history', '{uuid}', 'stolen', 1, 1)"),
            "INSERT INTO ff_completion_event (family, execution_id, outcome, occurred_at_ms, partition_key) VALUES ('lease_history', NULL, 'acquired', 1, 1)".to_owned(),
            format!("INSERT INTO ff_completion_event (family, execution_id, outcome, occurred_at_ms, partition_key, signal_id) VALUES ('signal_delivery', '{uuid}', 'satisfied', 1, 1, NULL)"),
            format!("INSERT INTO ff_completion_event (family, execution_id, outcome, occurred_at_ms, partition_key) VALUES ('instance_tags', '{uuid}', 'attached', 1, 1)"),
            // An effect this version does not know: delivered as `Other`, not skipped.
            format!("INSERT INTO ff_completion_event (family, execution_id, outcome, occurred_at_ms, partition_key, signal_id) VALUES ('signal_delivery', '{uuid}', 'throttled', 1, 1, 'sig-x')"),
        ];
        for sql in &bad_rows {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone())).execute(engine.pool()).await.expect("insert row");
        }
        bad_rows.len() as u64 - 1
    })
    .await;
}

/// A database migrated by the earlier version (its migrations, demo tables included, recorded
/// in sqlx's default ledger `_sqlx_migrations`) starts as it is: the subsystem records them in
/// its own ledger without running them again, the demo engine takes its tables as they are, the
/// completions written before resume from their cursor, and new ones arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_migrated_by_the_earlier_version_starts_and_keeps_its_completions() {
    use ff_completions::cursor::encode_sqlite_cursor;

    let (dir, backend) = backend_file();
    let url = format!("sqlite:{}?mode=rwc", dir.path().join("completions.db").display());
    let earlier = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sqlite_earlier");
    {
        let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("connect");
        sqlx::migrate::Migrator::new(earlier).await.expect("the earlier migrations").run(&mut conn).await.expect("run");
        sqlx::query(
            "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) \
             VALUES ('6f9619ff-8b86-4011-b42d-00c04fc964ff', 'success', 1, 5)",
        )
        .execute(&mut conn)
        .await
        .expect("a completion of the earlier version");
    }
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend.clone())).await.expect("spawn");
    let mut sub = tree.subscribe(Completions::from_cursor(encode_sqlite_cursor(0))).await.expect("subscribe");
    let old = take_events(&mut sub, 1, WAIT).await;
    assert_eq!(old[0].execution_id.to_string(), "{fp:5}:6f9619ff-8b86-4011-b42d-00c04fc964ff");
    let engine = SqliteEngine::connect(&backend).await.expect("the demo engine on the earlier schema");
    let new = complete_n(&engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &new, true);
    let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("connect");
    let ours: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM ff_completions_migrations WHERE success ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .expect("our ledger");
    // The earlier three recorded as applied, then the ones that came after them.
    assert_eq!(ours, [1, 2, 3, 4, 5]);
    let before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&mut conn).await.expect("their ledger");
    assert_eq!(before, 3, "the earlier ledger is left as it was");
    tree.shutdown().await;
}

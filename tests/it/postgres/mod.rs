//! Postgres end to end: producer SQL functions -> outbox -> listener -> filter -> subscriber,
//! against a real server the harness starts.

use std::sync::Arc;
use std::time::Duration;

use ff_completions::cursor::{
    encode_postgres_batch_cursor, encode_postgres_cursor, encode_postgres_event_cursor, encode_sqlite_cursor,
    encode_valkey_cursor,
};
use ff_completions::postgres::LISTENER_APPLICATION_NAME;
use ff_completions::{
    BackendConfig, CompletionOutcome, CompletionSupervisorHandle, ExecutionId, Namespace, Retention, ScannerFilter,
    StreamCursor, SupervisorConfig, TimestampMs,
};
use ff_completions_lab::{ExecutionSpec, PostgresEngine};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::contract::{self, QUIET, WAIT, assert_nothing_restarted, complete_n, running};
use ff_completions_lab::faults::ConnectionKiller;

use crate::support::{
    assert_exactly_once, assert_no_more, init_tracing,
    postgres::{complete_by_sql, fresh_database, reader_order},
    take_events, wait_until,
};

mod cursors;
mod delivery;
mod families;
mod groups;
mod operations;
mod outages;
mod paging;
mod partitioned;
mod producers;
mod reads;
mod retention;

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

/// A fresh database on the shared test server (nothing to keep alive).
async fn contract_backend() -> ((), BackendConfig) {
    init_tracing();
    ((), BackendConfig::postgres(fresh_database().await))
}

contract::contract_tests!(foreign cursors: vec![encode_valkey_cursor(1, 2), encode_sqlite_cursor(3)]);
crate::tail_await::tail_await_tests!();

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

/// Transaction A takes a lower event_id and stays open while B commits a higher one.
async fn open_transaction_with_a_completion(f: &Fixture) -> (sqlx::Transaction<'static, sqlx::Postgres>, ExecutionId) {
    let ids = running(&*f.engine, ExecutionSpec::new, 1).await;
    let mut tx = f.engine.pool().begin().await.expect("begin");
    complete_by_sql(&mut tx, ids[0]).await;
    (tx, ids[0])
}

/// Inserts one valid outbox row by hand, as a foreign producer might; returns its execution.
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

//! The promises again on an outbox of the shape FlowFabric deploys (`tests/fixtures/
//! partitioned_outbox.sql`: 256 hash partitions on `partition_key`, primary key
//! `(partition_key, event_id)`, a per-row trigger notifying `ff_completion`), and what the
//! reader costs there: nothing per partition for what did not change.

use super::*;
use ff_completions::Completions;
use ff_completions_lab::harness::postgres::{outbox_pages, read_at_head};

const FIXTURE: &str = include_str!("../../fixtures/partitioned_outbox.sql");

/// A fresh database whose outbox has FlowFabric's shape, before the subsystem is installed.
async fn partitioned_database() -> String {
    init_tracing();
    let url = fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql(FIXTURE).execute(&mut conn).await.expect("the partitioned outbox");
    url
}

async fn contract_backend() -> ((), BackendConfig) {
    ((), BackendConfig::postgres(partitioned_database().await))
}

contract::contract_tests!(foreign cursors: vec![encode_valkey_cursor(1, 2), encode_sqlite_cursor(3)]);
crate::families::family_tests!();
crate::tail_await::tail_await_tests!();
crate::durable::durable_tests!();

async fn insert_one(conn: &mut PgConnection, partition: i16) {
    sqlx::query(
        "INSERT INTO ff_completion_event (partition_key, execution_id, outcome, occurred_at_ms) \
         VALUES ($1, gen_random_uuid(), 'success', 1)",
    )
    .bind(partition)
    .execute(conn)
    .await
    .expect("a row");
}

/// What the reader reads of a 256-partition outbox of 100,000 rows: nothing when nothing
/// committed (transactions still in progress, a 100,000-row one among them, cost nothing
/// either), a few pages for a one-row batch. A reader that probed every partition read
/// 1,100 pages idle and 2,000 per one-row batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_touch_nothing_per_partition_for_what_did_not_change() {
    let url = partitioned_database().await;
    drop(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("install"));
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "INSERT INTO ff_completion_event (partition_key, execution_id, outcome, occurred_at_ms) \
         SELECT (g % 256)::int2, gen_random_uuid(), 'success', 1 FROM generate_series(1, 100000) g",
    )
    .execute(&mut conn)
    .await
    .expect("history");
    sqlx::query("ANALYZE ff_completion_event").execute(&mut conn).await.expect("analyze");
    // Transactions left open: one that wrote 100,000 rows, and others elsewhere in the cluster.
    let mut big = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut big).await.expect("begin");
    sqlx::query(
        "INSERT INTO ff_completion_event (partition_key, execution_id, outcome, occurred_at_ms) \
         SELECT (g % 256)::int2, gen_random_uuid(), 'success', 1 FROM generate_series(1, 100000) g",
    )
    .execute(&mut big)
    .await
    .expect("an open transaction's rows");
    let elsewhere = fresh_database().await;
    let mut bystanders = Vec::new();
    for _ in 0..5 {
        let mut bystander = PgConnection::connect(&elsewhere).await.expect("connect");
        sqlx::query("BEGIN").execute(&mut bystander).await.expect("begin");
        sqlx::query("SELECT pg_current_xact_id()").execute(&mut bystander).await.expect("a transaction id");
        bystanders.push(bystander);
    }
    let read = read_at_head(&mut conn).await;
    // A first read plans the reader's statements and records a tick; the next one is idle.
    outbox_pages(&mut conn, &read).await;
    let read = read_at_head(&mut conn).await;
    let idle = outbox_pages(&mut conn, &read).await;
    insert_one(&mut conn, 17).await;
    let one_row = outbox_pages(&mut conn, &read).await;
    insert_one(&mut conn, 18).await;
    insert_one(&mut conn, 200).await;
    let read = read_at_head(&mut conn).await;
    let two_rows = outbox_pages(&mut conn, &read).await;
    eprintln!("pages of a 256-partition outbox: idle {idle}, a one-row batch {one_row}, a batch of two {two_rows}");
    assert_eq!(idle, 0, "an idle read touched the outbox");
    assert!(one_row <= 8, "a one-row batch read {one_row} pages");
    assert!(two_rows <= 16, "a batch of two rows in two partitions read {two_rows} pages");
    drop(bystanders);
    drop(big);
}

/// The same cost on an outbox of one table: an idle read touches nothing while a 100,000-row
/// transaction stays open (it made every idle read walk its rows: 3,000-8,000 pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_of_many_rows_costs_an_idle_read_nothing() {
    init_tracing();
    let url = fresh_database().await;
    drop(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("install"));
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let mut big = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut big).await.expect("begin");
    sqlx::query(
        "INSERT INTO ff_completion_event (partition_key, execution_id, outcome, occurred_at_ms) \
         SELECT 3, gen_random_uuid(), 'success', 1 FROM generate_series(1, 100000) g",
    )
    .execute(&mut big)
    .await
    .expect("an open transaction's rows");
    let read = read_at_head(&mut conn).await;
    // A first read plans the reader's statements and records a tick; the next one is idle.
    outbox_pages(&mut conn, &read).await;
    let read = read_at_head(&mut conn).await;
    let idle = outbox_pages(&mut conn, &read).await;
    insert_one(&mut conn, 4).await;
    let one_row = outbox_pages(&mut conn, &read).await;
    eprintln!(
        "pages of a one-table outbox beside an open 100,000-row transaction: idle {idle}, a one-row batch {one_row}"
    );
    assert_eq!(idle, 0, "an idle read touched the outbox");
    assert!(one_row <= 8, "a one-row batch read {one_row} pages");
    drop(big);
}

/// Explicit ids in a transaction a tick saw in progress (negative, zero, the largest) and one
/// id twice in one transaction (in two partitions, as the partitioned primary key allows): each
/// row is delivered once, in `(event_id, partition)` order within the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_event_ids_are_each_delivered_once() {
    let url = partitioned_database().await;
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("install");
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)))
            .await
            .expect("spawn");
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    let mut producer = PgConnection::connect(&url).await.expect("connect");
    let mut tx = producer.begin().await.expect("begin");
    let mut ids = Vec::new();
    for (event_id, partition) in [(-7i64, 1i16), (0, 2), (i64::MAX, 3), (5, 4), (5, 9)] {
        let id = ExecutionId::from_parts(partition as u16, uuid::Uuid::new_v4());
        sqlx::query(
            "INSERT INTO ff_completion_event (partition_key, event_id, execution_id, outcome, occurred_at_ms) \
             OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, 'success', 1)",
        )
        .bind(partition)
        .bind(event_id)
        .bind(id.uuid())
        .execute(&mut *tx)
        .await
        .expect("an explicit id");
        ids.push(id);
    }
    // A tick sees the transaction in progress, and a later one commits first.
    let other = complete_n(&engine, 1).await;
    assert_exactly_once(&take_events(&mut live, 1, WAIT).await, &other, true);
    tx.commit().await.expect("commit");
    let arrived = take_events(&mut live, 5, WAIT).await;
    let expected = [ids[0], ids[1], ids[3], ids[4], ids[2]];
    assert_exactly_once(&arrived, &expected, true);
    assert_no_more(&mut live, QUIET).await;
}

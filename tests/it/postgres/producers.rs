//! Producers of every kind a host runs, each recorded by the outbox's capture trigger and
//! delivered exactly once: savepoints rolled back and released, REPEATABLE READ and
//! SERIALIZABLE transactions side by side, `COPY`, and a prepared transaction committed after
//! the server restarted.

use super::*;
use crate::support::postgres::{PrivatePg, connect_when_up};
use ff_completions::Completions;

/// Each row's execution, inserted in whatever transaction `conn` holds.
async fn insert_at(conn: &mut PgConnection, partition: i16) -> ExecutionId {
    let id = ExecutionId::from_parts(partition as u16, uuid::Uuid::new_v4());
    sqlx::query(
        "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) \
         VALUES ($1, 'success', 1, $2)",
    )
    .bind(id.uuid())
    .bind(partition)
    .execute(conn)
    .await
    .expect("insert");
    id
}

/// 70 savepoints, every third rolled back (the first one among them, before any row was kept):
/// the rows of the released ones arrive, once each, in order; the others never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_released_savepoints_arrive_and_those_of_rolled_back_ones_never() {
    let f = fixture().await;
    let mut live = f.tree.subscribe(Completions::tail()).await.expect("tail");
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut conn).await.expect("begin");
    let mut kept = Vec::new();
    for i in 0..70 {
        sqlx::query("SAVEPOINT s").execute(&mut conn).await.expect("savepoint");
        let id = insert_at(&mut conn, (i % 5) as i16).await;
        if i % 3 == 0 {
            sqlx::query("ROLLBACK TO SAVEPOINT s").execute(&mut conn).await.expect("rollback to");
        } else {
            sqlx::query("RELEASE SAVEPOINT s").execute(&mut conn).await.expect("release");
            kept.push(id);
        }
    }
    sqlx::query("COMMIT").execute(&mut conn).await.expect("commit");
    assert_exactly_once(&take_events(&mut live, kept.len(), WAIT).await, &kept, true);
    assert_no_more(&mut live, QUIET).await;
}

/// REPEATABLE READ and SERIALIZABLE producers committing side by side: every row arrives, and
/// the capture trigger makes none of them fail to serialize.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeatable_read_and_serializable_producers_are_delivered_without_serialization_failures() {
    let f = fixture().await;
    let mut live = f.tree.subscribe(Completions::tail()).await.expect("tail");
    let mut producers = Vec::new();
    for level in ["REPEATABLE READ", "SERIALIZABLE", "SERIALIZABLE"] {
        let url = f.url.clone();
        producers.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let mut ids = Vec::new();
            for _ in 0..40 {
                sqlx::query(sqlx::AssertSqlSafe(format!("BEGIN ISOLATION LEVEL {level}")))
                    .execute(&mut conn)
                    .await
                    .expect("begin");
                ids.push(insert_at(&mut conn, 9).await);
                ids.push(insert_at(&mut conn, 10).await);
                sqlx::query("COMMIT").execute(&mut conn).await.expect("commit without a serialization failure");
            }
            ids
        }));
    }
    let mut committed = Vec::new();
    for producer in producers {
        committed.extend(producer.await.expect("producer"));
    }
    let arrived = take_events(&mut live, committed.len(), WAIT).await;
    assert_exactly_once(&arrived, &committed, false);
    assert_no_more(&mut live, QUIET).await;
}

/// `COPY` into the outbox, in one statement of 500 rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_copied_into_the_outbox_are_delivered() {
    let f = fixture().await;
    let mut live = f.tree.subscribe(Completions::tail()).await.expect("tail");
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let ids: Vec<ExecutionId> = (0..500).map(|i| ExecutionId::from_parts(i % 256, uuid::Uuid::new_v4())).collect();
    let data: String = ids.iter().map(|id| format!("{}\tsuccess\t1\t{}\n", id.uuid(), id.partition())).collect();
    let mut copy = conn
        .copy_in_raw("COPY ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) FROM STDIN")
        .await
        .expect("copy");
    copy.send(data.as_bytes()).await.expect("copy data");
    assert_eq!(copy.finish().await.expect("copy finish"), 500);
    assert_exactly_once(&take_events(&mut live, 500, WAIT).await, &ids, true);
    assert_no_more(&mut live, QUIET).await;
}

/// A prepared transaction (two-phase commit) outlives a server restart and is committed after
/// it: the tree that lived through the restart delivers its rows once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_transaction_committed_after_a_restart_is_delivered_once() {
    init_tracing();
    let pg = PrivatePg::start_with(&[("synchronous_commit", "on"), ("max_prepared_transactions", "10")]).await;
    let url = pg.url();
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)))
            .await
            .expect("spawn");
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut conn).await.expect("begin");
    let prepared = vec![insert_at(&mut conn, 1).await, insert_at(&mut conn, 2).await];
    sqlx::query("PREPARE TRANSACTION 'ff-two-phase'").execute(&mut conn).await.expect("prepare");
    drop(conn);
    let before = complete_n(&*engine, 2).await;
    assert_exactly_once(&take_events(&mut live, 2, WAIT).await, &before, true);

    pg.kill9().await;
    pg.restart().await;
    let mut conn = connect_when_up(&url).await;
    sqlx::query("COMMIT PREPARED 'ff-two-phase'").execute(&mut conn).await.expect("commit prepared");
    assert_exactly_once(&take_events(&mut live, 2, WAIT).await, &prepared, true);
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let after = complete_n(&*engine, 2).await;
    assert_exactly_once(&take_events(&mut live, 2, WAIT).await, &after, true);
    assert_no_more(&mut live, QUIET).await;
}

/// A host's producer role that may only insert into (and delete from) the outbox: the capture
/// and delete triggers run as the subsystem's owner, so its inserts and deletes work, and its
/// rows are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_role_with_privileges_on_the_outbox_alone_still_inserts_and_deletes() {
    let f = fixture().await;
    let mut live = f.tree.subscribe(Completions::tail()).await.expect("tail");
    let mut admin = PgConnection::connect(&f.url).await.expect("connect");
    let role = format!("producer_{}", uuid::Uuid::new_v4().simple());
    for statement in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT INSERT, SELECT, DELETE ON ff_completion_event TO {role}"),
        format!("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await.expect("role");
    }
    let producer_url = f.url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let mut producer = PgConnection::connect(&producer_url).await.expect("connect as the producer");
    let mut tx = producer.begin().await.expect("begin");
    let rows = vec![insert_at(&mut tx, 3).await, insert_at(&mut tx, 4).await];
    tx.commit().await.expect("the producer commits without privileges on the subsystem's tables");
    assert_exactly_once(&take_events(&mut live, 2, WAIT).await, &rows, true);
    sqlx::query("DELETE FROM ff_completion_event WHERE execution_id = $1")
        .bind(rows[0].uuid())
        .execute(&mut producer)
        .await
        .expect("the producer deletes");
    let more = complete_n(&*f.engine, 1).await;
    assert_exactly_once(&take_events(&mut live, 1, WAIT).await, &more, true);
}

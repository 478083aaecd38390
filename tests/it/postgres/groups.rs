//! The durable-group store on Postgres: the promises every backend's store keeps
//! ([`crate::groups::group_store_tests`]).

use super::contract_backend;

crate::groups::group_store_tests!();
crate::durable::durable_tests!();

crate::groups::group_store_tests! { @each a_position_above_i64_max_is_a_validation_error_and_changes_nothing; }

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_in_the_callers_transaction_commits_with_its_effect_and_a_fenced_one_rolls_it_back() {
    use ff_completions::testing::postgres::ack_in;
    use sqlx::Connection;
    use sqlx::postgres::PgConnection;

    use crate::groups::{InTransaction, assert_ack_in_transaction_commits_or_rolls_back_with_the_effect, open};

    crate::support::init_tracing();
    let url = crate::support::postgres::fresh_database().await;
    let store = open(&ff_completions::BackendConfig::postgres(&url)).await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("CREATE TABLE scratch_effect (id bigint PRIMARY KEY)").execute(&mut conn).await.expect("scratch");
    let conn = tokio::sync::Mutex::new(conn);
    assert_ack_in_transaction_commits_or_rolls_back_with_the_effect(&store, |group, acks, id| {
        let conn = &conn;
        async move {
            let mut conn = conn.lock().await;
            let mut tx = conn.begin().await.expect("begin");
            sqlx::query("INSERT INTO scratch_effect (id) VALUES ($1)")
                .bind(id)
                .execute(&mut *tx)
                .await
                .expect("effect");
            let acked = ack_in(&mut tx, &group, "a", &acks).await;
            if acked.is_ok() {
                tx.commit().await.expect("commit");
            } else {
                // The server aborted the transaction: nothing more runs in it.
                assert!(sqlx::query("SELECT 1").execute(&mut *tx).await.is_err(), "the transaction is aborted");
                tx.rollback().await.expect("rollback");
            }
            let effect_kept: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM scratch_effect WHERE id = $1)")
                .bind(id)
                .fetch_one(&mut *conn)
                .await
                .expect("effect");
            InTransaction { acked, effect_kept }
        }
    })
    .await;
}

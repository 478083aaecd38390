//! The durable-group store on Postgres: the promises every backend's store keeps
//! ([`crate::groups::group_store_tests`]).

use super::contract_backend;

crate::groups::group_store_tests!();
crate::durable::durable_tests!();

crate::groups::group_store_tests! { @each a_position_above_i64_max_is_a_validation_error_and_changes_nothing; }

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_in_the_callers_transaction_commits_with_its_effect_and_a_fenced_or_repeated_one_rolls_it_back() {
    use ff_completions::__store::ack_in;
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

/// The heartbeat's statements run many times on one connection (as a pooled connection runs
/// them): a member below its share still takes exactly its share of free and lapsed partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_connection_a_heartbeat_takes_exactly_its_share_of_free_and_lapsed_partitions() {
    use sqlx::Connection;
    use sqlx::postgres::PgConnection;

    crate::support::init_tracing();
    let url = crate::support::postgres::fresh_database().await;
    let _store = crate::groups::open(&ff_completions::BackendConfig::postgres(&url)).await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    // Other groups' rows, analyzed: the planner then picks the plans of a database in use.
    for i in 0..40 {
        sqlx::query("SELECT count(*) FROM ff_completion_group_heartbeat($1, 'x', 1000, false, true, 0, 0, 0)")
            .bind(format!("other-{i}"))
            .execute(&mut conn)
            .await
            .expect("another group");
    }
    sqlx::query("ANALYZE ff_completion_group_partition").execute(&mut conn).await.expect("analyze");
    let mut beat = async |member: &str, ttl_ms: i64, rejoin: bool| -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM ff_completion_group_heartbeat('g', $1, $2, false, $3, 0, 0, 0)")
            .bind(member)
            .bind(ttl_ms)
            .bind(rejoin)
            .fetch_one(&mut conn)
            .await
            .expect("heartbeat")
    };
    assert_eq!(beat("a", 30_000, true).await, 256);
    assert_eq!(beat("b", 1_000, true).await, 0);
    assert_eq!(beat("c", 30_000, true).await, 0);
    assert_eq!(beat("a", 30_000, false).await, 86);
    assert_eq!(beat("b", 1_000, false).await, 86, "b took more than its share of the free partitions");
    assert_eq!(beat("c", 30_000, false).await, 84);
    assert_eq!(beat("e", 30_000, true).await, 0);
    assert_eq!(beat("a", 30_000, false).await, 64);
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    assert_eq!(beat("a", 30_000, false).await, 86, "a took more than its share of the free and lapsed partitions");
}

/// A partition whose row an engine's open transaction holds (an ack inside it, the engine then
/// paused) is skipped by a takeover rather than waited for with the group's lock held: the
/// other members' heartbeats go on, and the partition is taken once the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_skips_a_partition_an_open_transaction_holds_and_takes_it_once_released() {
    use std::time::Duration;

    use ff_completions::__store::ack_in;
    use ff_completions::__store::{Ack, Sharing};
    use sqlx::Connection;
    use sqlx::postgres::PgConnection;

    crate::support::init_tracing();
    let url = crate::support::postgres::fresh_database().await;
    let store = crate::groups::open(&ff_completions::BackendConfig::postgres(&url)).await;
    let (group, short, long) = ("held", Duration::from_millis(300), Duration::from_secs(30));
    let leases = store.heartbeat(group, "a", short, Sharing::Shared, true).await.expect("a joins");
    assert_eq!(leases.len(), 256);
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let mut tx = conn.begin().await.expect("begin");
    let ack = Ack { partition: 0, token: leases[0].token, position: crate::groups::above(leases[0].acked, 1) };
    ack_in(&mut tx, group, "a", &[ack]).await.expect("a acks partition 0 and leaves its transaction open");
    tokio::time::sleep(short * 2).await;

    // a's leases lapsed; b takes every partition but the one the open transaction holds.
    let taken =
        tokio::time::timeout(Duration::from_secs(10), store.heartbeat(group, "b", long, Sharing::Shared, false))
            .await
            .expect("the takeover waited for the open transaction")
            .expect("b's heartbeat");
    assert_eq!(taken.len(), 255);
    assert!(taken.iter().all(|l| l.partition != 0));
    tx.rollback().await.expect("rollback");
    let taken = store.heartbeat(group, "b", long, Sharing::Shared, false).await.expect("b's heartbeat");
    assert_eq!(taken.len(), 256, "partition 0 is taken once the transaction ended");
}

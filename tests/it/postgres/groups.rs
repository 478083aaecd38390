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
        sqlx::query("SELECT count(*) FROM ff_completion_group_heartbeat($1, 'x', 'x', 1000, false, true, 0, 0, 0)")
            .bind(format!("other-{i}"))
            .execute(&mut conn)
            .await
            .expect("another group");
    }
    sqlx::query("ANALYZE ff_completion_group_partition").execute(&mut conn).await.expect("analyze");
    let mut beat = async |member: &str, ttl_ms: i64, rejoin: bool| -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM ff_completion_group_heartbeat('g', $1, $1, $2, false, $3, 0, 0, 0)")
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

/// An engine's transaction holds a partition row of the member (an ack inside it, the
/// transaction then left open past the lease): the member's heartbeats go on without waiting
/// for it and renew every lease to a time ahead, the held one's too (it lives by the member
/// row). A new process under an exclusive name likewise takes every other partition over at
/// once, and the held one once the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_never_wait_behind_a_consumers_open_transaction_and_renew_their_leases_ahead() {
    use std::time::Duration;

    use ff_completions::__store::{Ack, Sharing, ack_in};
    use ff_completions::TimestampMs;
    use sqlx::Connection;
    use sqlx::postgres::PgConnection;

    crate::support::init_tracing();
    let url = crate::support::postgres::fresh_database().await;
    let backend = ff_completions::BackendConfig::postgres(&url);
    let store = crate::groups::open(&backend).await;
    let (group, ttl) = ("open-tx", Duration::from_millis(600));
    let leases = store.heartbeat(group, "a", ttl, Sharing::Shared, true).await.expect("a joins");
    assert_eq!(leases.len(), 256);
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let mut tx = conn.begin().await.expect("begin");
    let ack = Ack { partition: 0, token: leases[0].token, position: crate::groups::above(leases[0].acked, 1) };
    ack_in(&mut tx, group, "a", &[ack]).await.expect("the consumer acks partition 0 and keeps its transaction open");

    // Past the lease, heartbeat after heartbeat.
    for _ in 0..4 {
        let renewed =
            tokio::time::timeout(Duration::from_secs(10), store.heartbeat(group, "a", ttl, Sharing::Shared, false))
                .await
                .expect("the heartbeat waited for the consumer's transaction")
                .expect("heartbeat");
        assert_eq!(renewed.len(), 256, "the member still holds the partition the transaction holds");
        let view = crate::groups::view(&store, group).await;
        let now = TimestampMs::now();
        for p in &view.partitions {
            let (_, expires) = p.owner.clone().expect("held");
            assert!(expires > now, "partition {} renewed to {expires:?}, not ahead of {now:?}", p.partition);
        }
        tokio::time::sleep(ttl / 3).await;
    }

    // A new process under an exclusive name: every partition but the held one at once.
    let (solo, newer) = ("solo-open-tx", crate::groups::open(&backend).await);
    let first = store.heartbeat(solo, "exclusive", ttl * 50, Sharing::Exclusive, true).await.expect("first process");
    let mut other = PgConnection::connect(&url).await.expect("connect");
    let mut held = other.begin().await.expect("begin");
    let ack = Ack { partition: 3, token: first[3].token, position: crate::groups::above(first[3].acked, 1) };
    ack_in(&mut held, solo, "exclusive", &[ack]).await.expect("its consumer's open transaction");
    let taken = tokio::time::timeout(
        Duration::from_secs(10),
        newer.heartbeat(solo, "exclusive", ttl * 50, Sharing::Exclusive, true),
    )
    .await
    .expect("the new process waited for the old one's open transaction")
    .expect("heartbeat");
    assert_eq!(taken.len(), 255, "every partition but the held one");
    assert!(taken.iter().all(|l| l.partition != 3 && l.token == first[usize::from(l.partition)].token + 1));
    held.commit().await.expect("the old process's transaction commits its ack (its token was still current)");
    let all = newer.heartbeat(solo, "exclusive", ttl * 50, Sharing::Exclusive, false).await.expect("heartbeat");
    assert_eq!(all.len(), 256, "the held partition once the transaction ended");
    assert_eq!(all[3].token, first[3].token + 1);
    assert_eq!(all[3].acked, ack.position, "from the position the old process's transaction acknowledged");

    tx.commit().await.expect("commit");
    store.heartbeat(group, "a", ttl, Sharing::Shared, false).await.expect("heartbeat");
    let view = crate::groups::view(&store, group).await;
    let (owner, expires) = view.partitions[0].owner.clone().expect("held");
    assert!(owner == "a" && expires > TimestampMs::now(), "renewed ahead once the transaction ended");
    assert_eq!(view.partitions[0].acked, crate::groups::above(leases[0].acked, 1));
}

/// Each partition row's version: the transaction that wrote it (`xmin`) and the last one that
/// locked it (`xmax`).
async fn partition_row_versions(conn: &mut sqlx::postgres::PgConnection, group: &str) -> Vec<(i16, String, String)> {
    sqlx::query_as(
        "SELECT partition, xmin::text, xmax::text FROM ff_completion_group_partition \
          WHERE group_name = $1 ORDER BY partition",
    )
    .bind(group)
    .fetch_all(conn)
    .await
    .expect("partition row versions")
}

/// The partitions whose rows were written or locked between two [`partition_row_versions`].
fn rewritten(before: &[(i16, String, String)], after: &[(i16, String, String)]) -> Vec<i16> {
    assert_eq!(before.len(), after.len());
    before.iter().zip(after).filter(|(b, a)| b != a).map(|(b, _)| b.0).collect()
}

/// A member holding every partition heartbeats: its lease lives in its member row, which each
/// heartbeat renews; a partition row is written (and locked) only when one of its values
/// changes (its unacknowledged count, or a newer incarnation's token), so that a heartbeat
/// leaves no dead row versions for an open transaction to keep from being pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_writes_only_its_member_row_and_the_partition_rows_whose_values_change() {
    use std::time::Duration;

    use ff_completions::__store::Sharing;
    use ff_completions::TimestampMs;
    use sqlx::Connection;
    use sqlx::postgres::PgConnection;

    crate::support::init_tracing();
    let url = crate::support::postgres::fresh_database().await;
    let backend = ff_completions::BackendConfig::postgres(&url);
    let store = crate::groups::open(&backend).await;
    let (group, ttl) = ("quiet", Duration::from_secs(30));
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let member_version = async |conn: &mut PgConnection| -> String {
        sqlx::query_scalar("SELECT xmin::text FROM ff_completion_group_member WHERE group_name = $1 AND member = 'a'")
            .bind(group)
            .fetch_one(conn)
            .await
            .expect("member row")
    };
    let joined = store.heartbeat(group, "a", ttl, Sharing::Shared, true).await.expect("a joins");
    assert_eq!(joined.len(), 256);
    let (before, member_before) = (partition_row_versions(&mut conn, group).await, member_version(&mut conn).await);

    for _ in 0..3 {
        let renewed = store.heartbeat(group, "a", ttl, Sharing::Shared, false).await.expect("heartbeat");
        assert_eq!(renewed, joined, "the same leases, tokens and positions");
    }
    let after = partition_row_versions(&mut conn, group).await;
    assert_eq!(rewritten(&before, &after), Vec::<i16>::new(), "heartbeats that change nothing wrote or locked them");
    assert_ne!(member_version(&mut conn).await, member_before, "the member row is renewed");
    let view = crate::groups::view(&store, group).await;
    let (_, member_expires) = view.members.iter().find(|(m, _)| m == "a").cloned().expect("a is a member");
    assert!(member_expires > TimestampMs::now());
    for p in &view.partitions {
        assert_eq!(
            p.owner,
            Some(("a".to_owned(), member_expires)),
            "partition {}: a's lease, as its member row",
            p.partition
        );
    }

    // A changed unacknowledged count writes that partition's row alone, once.
    store.heartbeat_with(group, "a", ttl, Sharing::Shared, false, &[(5, 3)]).await.expect("heartbeat");
    let counted = partition_row_versions(&mut conn, group).await;
    assert_eq!(rewritten(&after, &counted), [5]);
    assert_eq!(crate::groups::view(&store, group).await.partitions[5].unacked, 3);
    store.heartbeat_with(group, "a", ttl, Sharing::Shared, false, &[(5, 3)]).await.expect("heartbeat");
    assert_eq!(rewritten(&counted, &partition_row_versions(&mut conn, group).await), Vec::<i16>::new());

    // A newer incarnation of the member id (another process) raises every token: every row.
    let newer = crate::groups::open(&backend).await;
    let claimed = newer.heartbeat(group, "a", ttl, Sharing::Shared, true).await.expect("the newer process");
    assert!(claimed.iter().zip(&joined).all(|(c, j)| c.partition == j.partition && c.token == j.token + 1));
    assert_eq!(rewritten(&counted, &partition_row_versions(&mut conn, group).await).len(), 256);
}

/// A partition's lease lives by its holder's member row: once that row lapses (the process
/// stopped heartbeating), every partition it held is lapsed whatever its own row says. The view
/// reports it so, an operator moves it without force, and another member's heartbeat takes it
/// over with the next token; the earlier holder's ack is then fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_lapses_with_its_holders_member_row_and_is_then_movable_and_taken_over() {
    use std::time::Duration;

    use ff_completions::__store::{Ack, Sharing};
    use ff_completions::TimestampMs;
    use sqlx::Connection;
    use sqlx::postgres::PgConnection;

    use crate::groups::{above, assert_fenced, assert_validation};

    crate::support::init_tracing();
    let url = crate::support::postgres::fresh_database().await;
    let store = crate::groups::open(&ff_completions::BackendConfig::postgres(&url)).await;
    let (group, ttl) = ("lapse", Duration::from_secs(60));
    let leases = store.heartbeat(group, "a", ttl, Sharing::Shared, true).await.expect("a joins");
    assert_eq!(leases.len(), 256);
    let moved = (7u16, above(leases[7].acked, 2));
    assert_validation(store.move_positions(group, &[moved], false).await, "a move of a held partition");

    // a's process stopped heartbeating: its membership ran out (here set in the past at once).
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "UPDATE ff_completion_group_member SET expires_at = clock_timestamp() - interval '1 second' \
          WHERE group_name = $1 AND member = 'a'",
    )
    .bind(group)
    .execute(&mut conn)
    .await
    .expect("a's membership runs out");
    let lapsed = crate::groups::view(&store, group).await;
    assert!(lapsed.members.is_empty());
    let now = TimestampMs::now();
    assert!(lapsed.partitions.iter().all(|p| p.owner.as_ref().is_some_and(|(o, at)| o == "a" && *at <= now)));
    store.move_positions(group, &[moved], false).await.expect("a lapsed partition moves without force");

    let taken = store.heartbeat(group, "b", ttl, Sharing::Shared, true).await.expect("b joins");
    assert_eq!(taken.len(), 256, "b takes every lapsed partition");
    for (t, l) in taken.iter().zip(&leases) {
        let raised = if t.partition == moved.0 { 2 } else { 1 };
        assert_eq!((t.partition, t.token), (l.partition, l.token + raised));
    }
    assert_eq!(taken[7].acked, moved.1, "from the moved position");
    let late = Ack { partition: 0, token: leases[0].token, position: above(leases[0].acked, 1) };
    assert_fenced(store.ack(group, "a", &[late]).await, "the earlier holder's ack");
    let view = crate::groups::view(&store, group).await;
    assert_eq!(view.members.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(), ["b"]);
}

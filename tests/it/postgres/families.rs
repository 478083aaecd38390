//! Lease history and signal delivery on Postgres: the shared family promises
//! ([`crate::families::family_tests`]), bad rows of each family, and the separate table that
//! keeps the adopted outbox's own readers to completions.

use ff_completions::{Completions, LeaseHistory, SignalId, WaitpointId};
use ff_completions_lab::PostgresEngine;

use super::contract_backend;
use crate::contract::{QUIET, WAIT, fixture};
use crate::families::{claim, create, lease_kinds, no_more, take};
use crate::support::{assert_exactly_once, take_events};

crate::families::family_tests!();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_of_each_family_are_skipped_once_and_the_events_around_them_arrive() {
    let ((), backend) = contract_backend().await;
    let engine = PostgresEngine::connect(&backend).await.expect("engine");
    crate::families::malformed_rows_are_skipped_once(backend, || async move {
        let uuid = "6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b";
        let bad_rows = [
            // An unknown lease kind, a lease row without an execution, a partition out of range,
            // a signal without its id, an unknown family.
            format!("INSERT INTO ff_completion_family_event (family, execution_id, kind, occurred_at_ms, partition_key) VALUES ('lease_history', '{uuid}', 'stolen', 1, 1)"),
            "INSERT INTO ff_completion_family_event (family, execution_id, kind, occurred_at_ms, partition_key) VALUES ('lease_history', NULL, 'acquired', 1, 1)".to_owned(),
            format!("INSERT INTO ff_completion_family_event (family, execution_id, kind, occurred_at_ms, partition_key) VALUES ('lease_history', '{uuid}', 'renewed', 1, 999)"),
            format!("INSERT INTO ff_completion_family_event (family, execution_id, kind, occurred_at_ms, partition_key, signal_id) VALUES ('signal_delivery', '{uuid}', 'satisfied', 1, 1, NULL)"),
            format!("INSERT INTO ff_completion_family_event (family, execution_id, kind, occurred_at_ms, partition_key) VALUES ('instance_tags', '{uuid}', 'attached', 1, 1)"),
            // An effect this version does not know: delivered as `Other`, not skipped.
            format!("INSERT INTO ff_completion_family_event (family, execution_id, kind, occurred_at_ms, partition_key, signal_id) VALUES ('signal_delivery', '{uuid}', 'throttled', 1, 1, 'sig-x')"),
        ];
        for sql in &bad_rows {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone())).execute(engine.pool()).await.expect("insert row");
        }
        bad_rows.len() as u64 - 1
    })
    .await;
}

/// A host that owns `ff_completion_event` and reads it itself (here: every row, as a plain
/// `SELECT`) sees the completions only, however much lease and signal activity there was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_reader_of_the_outbox_sees_only_completions_after_lease_and_signal_activity() {
    let ((), backend) = contract_backend().await;
    let f = fixture(backend.clone(), |c| c).await;
    let mut leases = f.tree.subscribe(LeaseHistory::tail()).await.expect("l");
    let ids = create(&*f.engine, None, 4).await;
    let claimed = claim(&*f.engine, "w", 4).await;
    for id in &claimed {
        assert!(f.engine.renew_lease(id, "w").await.expect("renew"));
    }
    let wp = WaitpointId::new("wp");
    f.engine.deliver_signal(&claimed[0], &wp, &SignalId::new("s"), Some("k"), None).await.expect("signal");
    f.engine.deliver_signal(&claimed[0], &wp, &SignalId::new("s"), Some("k"), None).await.expect("signal again");
    assert!(f.engine.revoke_lease(&claimed[1], "ops").await.expect("revoke"));
    assert!(f.engine.complete(&claimed[2]).await.expect("complete"));
    assert!(f.engine.complete(&claimed[3]).await.expect("complete"));
    // Every lease event reached the tree: the activity happened and was read.
    take(&mut leases, 4 + 4 + 1, WAIT).await;

    let engine = PostgresEngine::connect(&backend).await.expect("engine");
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT execution_id, outcome FROM ff_completion_event ORDER BY event_id")
            .fetch_all(engine.pool())
            .await
            .expect("host read");
    let completed = [claimed[2].uuid(), claimed[3].uuid()];
    assert_eq!(rows, completed.iter().map(|u| (*u, "success".to_owned())).collect::<Vec<_>>());
    let family_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ff_completion_family_event")
        .fetch_one(engine.pool())
        .await
        .expect("family rows");
    assert_eq!(family_rows, 4 + 4 + 1 + 2, "leases and signals went to the subsystem's own table");
    assert!(claimed.iter().all(|id| ids.contains(id)));
}

/// A lease event written by a transaction left open while completions commit and are delivered
/// (so ticks see it in progress, and batches without family rows are read from the outbox
/// alone) arrives once it commits, after what committed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_event_of_a_transaction_open_across_batches_arrives_once_it_commits() {
    let ((), backend) = contract_backend().await;
    let f = fixture(backend.clone(), |c| c).await;
    let mut leases = f.tree.subscribe(LeaseHistory::tail()).await.expect("l");
    let mut completions = f.tree.subscribe(Completions::tail()).await.expect("c");
    let engine = PostgresEngine::connect(&backend).await.expect("engine");
    create(&*f.engine, None, 3).await;
    let [early] = claim(&*f.engine, "w", 1).await[..] else { panic!() };
    let mut tx = engine.pool().begin().await.expect("begin");
    let renewed: bool = sqlx::query_scalar("SELECT ff_renew_lease($1, 'w', 30000)")
        .bind(early.uuid())
        .fetch_one(&mut *tx)
        .await
        .expect("renew in an open transaction");
    assert!(renewed);
    let mut done = Vec::new();
    for _ in 0..2 {
        let [other] = claim(&*f.engine, "w", 1).await[..] else { panic!() };
        assert!(f.engine.complete(&other).await.expect("complete"));
        assert_exactly_once(&take_events(&mut completions, 1, WAIT).await, &[other], true);
        done.push(other);
    }
    tx.commit().await.expect("commit");
    engine.wake_listeners();
    let got = take(&mut leases, 4, WAIT).await;
    assert_eq!(
        lease_kinds(&got),
        [("acquired", early), ("acquired", done[0]), ("acquired", done[1]), ("renewed", early)]
    );
    no_more(&mut leases, QUIET).await;
}

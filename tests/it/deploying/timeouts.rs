//! Every statement bounded: a consumer's transaction holds a durable group's partition row
//! (as an ack inside a paused engine's transaction would) for 30 seconds. A heartbeat that
//! waits for that row gives up after the lock timeout (a transient [`Error::Timeout`], tried
//! again), so it never holds the group's row for long: the other member's heartbeats, and
//! delivery to the tree's subscribers and the group, carry on while the lock is held.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ff_completions::{
    BackendConfig, CompletionSupervisorHandle, Completions, DurableRequest, DurableSubscription, ExecutionId,
    SupervisorConfig, TimestampMs,
};
use ff_completions_lab::PostgresEngine;
use futures::StreamExt;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::contract::WAIT;
use crate::durable::{complete_spread, unique};
use crate::support::postgres::fresh_database;
use crate::support::{assert_exactly_once, init_tracing, take_events, wait_until};

/// How long the conflicting lock is held.
const HOLD: Duration = Duration::from_secs(30);

/// Reads both members until every one of `ids` has reached one of them (`received` keeps
/// what arrived, of any round), within [`WAIT`].
async fn from_either(
    a: &mut DurableSubscription,
    b: &mut DurableSubscription,
    ids: &[ExecutionId],
    received: &mut HashSet<ExecutionId>,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ids.iter().all(|id| received.contains(id)) {
        let next = tokio::select! {
            event = a.next() => event,
            event = b.next() => event,
            () = tokio::time::sleep_until(deadline) => panic!("some of {ids:?} never reached the group"),
        };
        match next {
            Some(Ok(event)) => {
                received.insert(event.execution_id);
            }
            other => panic!("a member's stream gave {other:?}"),
        }
    }
}

/// When `member`'s lease runs out, as the group stores it.
async fn lease_of(sub: &DurableSubscription, member: &str) -> TimestampMs {
    let stats = sub.stats().await.expect("group stats");
    stats.members.iter().find(|m| m.member == member).map(|m| m.lease_expires_at).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_for_30_seconds_stops_neither_delivery_nor_heartbeats() {
    init_tracing();
    let url = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)))
            .await
            .expect("spawn tree");
    let mut tail = tree.subscribe(Completions::tail()).await.expect("tail");
    let group = unique("locked");
    let request = |member: &str| DurableRequest::group(&group).with_member(member).with_ack_after_delivery();
    let mut a = tree.subscribe(request("a")).await.expect("a");
    let mut b = tree.subscribe(request("b")).await.expect("b");
    wait_until(WAIT, "a and b hold 128 each", || async { a.partitions().len() == 128 && b.partitions().len() == 128 })
        .await;
    let locked_partition = a.partitions()[0];

    // A consumer's transaction locks one of a's partition rows and stays open.
    let held = Arc::new(AtomicBool::new(true));
    let (locked_tx, locked) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn({
        let (url, group, held) = (url.clone(), group.clone(), held.clone());
        async move {
            let mut conn = PgConnection::connect(&url).await.expect("holder");
            sqlx::query("BEGIN").execute(&mut conn).await.expect("begin");
            sqlx::query(
                "SELECT 1 FROM ff_completion_group_partition WHERE group_name = $1 AND partition = $2 FOR UPDATE",
            )
            .bind(&group)
            .bind(locked_partition as i16)
            .execute(&mut conn)
            .await
            .expect("lock the partition's row");
            let _ = locked_tx.send(());
            tokio::time::sleep(HOLD).await;
            held.store(false, Ordering::SeqCst);
            sqlx::query("ROLLBACK").execute(&mut conn).await.expect("rollback");
        }
    });
    locked.await.expect("the lock is held");

    let first_lease = lease_of(&b, "b").await;
    let mut all = Vec::new();
    let mut received = HashSet::new();
    for round in 0..3 {
        if round > 0 {
            // Producers at work through the whole hold: a round every 9 s.
            tokio::time::sleep(Duration::from_secs(9)).await;
        }
        let ids = complete_spread(engine.as_ref(), 6).await;
        assert_exactly_once(&take_events(&mut tail, 6, WAIT).await, &ids, true);
        let elsewhere: Vec<ExecutionId> = ids.iter().copied().filter(|id| id.partition() != locked_partition).collect();
        from_either(&mut a, &mut b, &elsewhere, &mut received).await;
        assert!(held.load(Ordering::SeqCst), "round {round} was delivered only after the lock was released");
        all.extend(ids);
    }
    let last_lease = lease_of(&b, "b").await;
    assert!(held.load(Ordering::SeqCst), "the heartbeats were read only after the lock was released");
    assert!(
        last_lease.0 >= first_lease.0 + 10_000,
        "b's heartbeats stopped while the lock was held: its lease ran to {first_lease:?}, then {last_lease:?}"
    );
    holder.await.expect("holder");
    // Whatever waited for the locked partition is delivered once the lock is gone.
    let behind: Vec<ExecutionId> = all.iter().copied().filter(|id| id.partition() == locked_partition).collect();
    from_either(&mut a, &mut b, &behind, &mut received).await;
    drop((a, b));
    tree.shutdown().await;
}

//! A tail that misses nothing committed after `subscribe` returned, and awaiting one
//! execution's completion, written once and run against each real backend by its own module
//! (`tail_await_tests!()`), under the same test names.

use std::time::Duration;

use ff_completions::{
    BackendConfig, CompletionBackend, CompletionOutcome, CompletionSupervisorHandle, Completions, ExecutionId,
    StreamCursor, SupervisorConfig, TraceParent,
};
use ff_completions_lab::{ExecutionSpec, FailOutcome, connect_engine};

use crate::contract::{WAIT, fixture, running};
use crate::support::{take_events, wait_until};

/// Declares, in the calling module, one test per promise of this file (see
/// [`crate::contract::backend_tests`]).
macro_rules! tail_await_tests {
    () => {
        $crate::contract::backend_tests! { tail_await:
            a_tail_subscription_gets_the_completion_committed_right_after_it_returned_a_thousand_times_over;
            an_awaited_completion_is_found_whether_it_landed_before_or_after_the_await_began;
            an_await_pending_across_a_listener_restart_gets_its_completion;
            a_completion_carries_its_producers_trace_context_and_one_recorded_without_decodes_as_before;
        }
    };
}
pub(crate) use tail_await_tests;

/// Trees spawned per run, each taking [`SUBSCRIPTIONS_PER_TREE`] tail subscriptions from its
/// first instant (its listener has read nothing yet when the first ones subscribe).
const TREES: usize = 10;
const SUBSCRIPTIONS_PER_TREE: usize = 100;

/// 1,000 times: subscribe at the tail, then commit a completion as soon as the call returned;
/// the subscription's first event is that completion. Ten fresh trees, each taking a hundred
/// subscriptions one after the other from its first instant, when its listener has not read
/// anything yet.
pub async fn a_tail_subscription_gets_the_completion_committed_right_after_it_returned_a_thousand_times_over(
    backend: BackendConfig,
) {
    let engine = connect_engine(&backend).await.expect("engine");
    let all = running(&*engine, ExecutionSpec::new, TREES * SUBSCRIPTIONS_PER_TREE).await;
    for ids in all.chunks(SUBSCRIPTIONS_PER_TREE) {
        let config = SupervisorConfig::new().with_backend(backend.clone());
        let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn a fresh tree");
        for (i, id) in ids.iter().enumerate() {
            let mut sub = tree.subscribe(Completions::tail()).await.expect("subscribe");
            assert!(engine.complete(id).await.expect("complete"), "{id} was running");
            let first = take_events(&mut sub, 1, WAIT).await;
            assert_eq!(first[0].execution_id, *id, "subscription {i}'s first event is the completion after it");
        }
        tree.shutdown().await;
    }
}

/// The four ways in: a watch created before the work (the completion lands before it is
/// awaited); a position read before the work and an await begun after the completion passed
/// the shared subscription (read back from the backend); an await begun before the
/// completion; the seed trait's call. Any number of awaits share one subscription.
pub async fn an_awaited_completion_is_found_whether_it_landed_before_or_after_the_await_began(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let ids = running(&*f.engine, ExecutionSpec::new, 6).await;

    let watch = f.tree.watch_completion(ids[0]).await.expect("watch");
    assert!(f.engine.complete(&ids[0]).await.expect("complete"));
    // The completion has landed (another watch, created after it, resolves only after it).
    let later = f.tree.watch_completion(ids[1]).await.expect("watch");
    assert!(f.engine.complete(&ids[1]).await.expect("complete"));
    assert_eq!(tokio::time::timeout(WAIT, later).await.expect("in time").expect("event").execution_id, ids[1]);
    let event = tokio::time::timeout(WAIT, watch).await.expect("in time").expect("the completion");
    assert_eq!((event.execution_id, event.outcome), (ids[0], CompletionOutcome::Success));

    // A position read before the work; the completion passes the shared subscription before
    // the await begins: it is read back.
    let before = f.tree.completion_position().await.expect("position");
    assert_eq!(f.engine.fail(&ids[2], false).await.expect("fail"), FailOutcome::TerminalFailed);
    let passed = f.tree.watch_completion(ids[3]).await.expect("watch");
    assert!(f.engine.complete(&ids[3]).await.expect("complete"));
    tokio::time::timeout(WAIT, passed).await.expect("in time").expect("event");
    let event = tokio::time::timeout(WAIT, f.tree.await_completion(ids[2], &before)).await.expect("in time");
    let event = event.expect("read back");
    assert_eq!((event.execution_id, event.outcome.clone()), (ids[2], CompletionOutcome::Failed));
    // Its cursor resumes after it: a subscription from there gets ids[3] first.
    let mut resumed = f.tree.subscribe(Completions::from_cursor(event.cursor.clone())).await.expect("resume");
    assert_eq!(take_events(&mut resumed, 1, WAIT).await[0].execution_id, ids[3]);

    // Awaits begun before their completions, many at once, and one through the seed trait.
    let before = f.tree.completion_position().await.expect("position");
    // Watches are made here, before the completion: a watch made after it never resolves (an
    // await from `before` does, wherever its task starts).
    let mut waiting = Vec::with_capacity(200);
    for i in 0..200 {
        let (tree, id, before) = (f.tree.clone(), ids[4], before.clone());
        waiting.push(if i % 2 == 0 {
            tokio::spawn(async move { tree.await_completion(id, &before).await })
        } else {
            let watch = tree.watch_completion(id).await.expect("watch");
            tokio::spawn(watch)
        });
    }
    let seed: std::sync::Arc<dyn CompletionBackend> = std::sync::Arc::new(f.tree.clone());
    let seeded = tokio::spawn({
        let (id, before) = (ids[5], before.clone());
        async move { seed.await_completion(&id, &before).await }
    });
    assert!(f.engine.cancel(&ids[4]).await.expect("cancel"));
    assert!(f.engine.complete(&ids[5]).await.expect("complete"));
    for task in waiting {
        let event = tokio::time::timeout(WAIT, task).await.expect("in time").expect("task").expect("event");
        assert_eq!((event.execution_id, event.outcome), (ids[4], CompletionOutcome::Cancelled));
    }
    let payload = tokio::time::timeout(WAIT, seeded).await.expect("in time").expect("task").expect("payload");
    assert_eq!((payload.execution_id, payload.outcome.as_str()), (ids[5], "success"));
    let stats = f.tree.stats().await.expect("stats");
    let subscribers: Vec<_> = stats.subscribers.iter().filter(|s| s.id != resumed.id()).collect();
    assert_eq!(subscribers.len(), 1, "one shared subscription for every await: {stats}");
    assert_eq!(subscribers[0].name.as_deref(), Some("awaits"));

    // A cursor of another family is refused.
    let foreign = StreamCursor::new(vec![0x03, 0xF1, 0, 0, 0, 0, 0, 0, 0, 1]);
    assert!(matches!(f.tree.await_completion(ids[0], &foreign).await, Err(ff_completions::Error::Validation { .. })));
}

/// An await begun before its completion, across a kill of the listener actor; and a
/// completion committed while the listener is down, awaited once it is back, from a position
/// read before.
pub async fn an_await_pending_across_a_listener_restart_gets_its_completion(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let ids = running(&*f.engine, ExecutionSpec::new, 3).await;
    let before = f.tree.completion_position().await.expect("position");
    let pending = tokio::spawn({
        let (tree, id, before) = (f.tree.clone(), ids[0], before.clone());
        async move { tree.await_completion(id, &before).await }
    });
    let stats = f.tree.stats().await.expect("stats");
    let name = stats.listeners[0].backend.clone();
    let restarts = stats.listeners[0].restarts;
    f.tree.listener_cell(name.as_str()).await.expect("a listener").kill();
    assert!(f.engine.complete(&ids[0]).await.expect("complete"));
    assert!(f.engine.complete(&ids[1]).await.expect("complete"));
    let event = tokio::time::timeout(WAIT, pending).await.expect("in time").expect("task").expect("event");
    assert_eq!(event.execution_id, ids[0]);
    wait_until(WAIT, "the listener's restart", || async {
        f.tree.stats().await.map(|s| s.listeners[0].restarts > restarts).unwrap_or(false)
    })
    .await;
    let event = tokio::time::timeout(WAIT, f.tree.await_completion(ids[1], &before)).await.expect("in time");
    assert_eq!(event.expect("event").execution_id, ids[1]);
    // And a watch made after the restart.
    let watch: ExecutionId = ids[2];
    let watch = f.tree.watch_completion(watch).await.expect("watch");
    assert!(f.engine.complete(&ids[2]).await.expect("complete"));
    let event = tokio::time::timeout(Duration::from_secs(30), watch).await.expect("in time").expect("event");
    assert_eq!(event.execution_id, ids[2]);
}

/// A producer that records its span's `traceparent` with the completion hands it to every
/// subscriber as a typed field; a completion recorded without one (as every row or entry from
/// before the column or field) decodes as it did, with none.
pub async fn a_completion_carries_its_producers_trace_context_and_one_recorded_without_decodes_as_before(
    backend: BackendConfig,
) {
    let f = fixture(backend, |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("subscribe");
    let ids = running(&*f.engine, ExecutionSpec::new, 2).await;
    let traceparent = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
    let watch = f.tree.watch_completion(ids[0]).await.expect("watch");
    assert!(f.engine.complete_traced(&ids[0], &traceparent).await.expect("complete traced"));
    assert!(f.engine.complete(&ids[1]).await.expect("complete"));
    let events = take_events(&mut sub, 2, WAIT).await;
    assert_eq!((events[0].execution_id, events[0].traceparent), (ids[0], Some(traceparent)));
    assert_eq!((events[1].execution_id, events[1].traceparent), (ids[1], None));
    let awaited = tokio::time::timeout(WAIT, watch).await.expect("in time").expect("event");
    assert_eq!(awaited.traceparent, Some(traceparent), "an await gets it too");
}

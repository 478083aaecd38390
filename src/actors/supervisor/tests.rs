//! The whole tree against the in-memory backend: restarts after a healthy life, backoff while a
//! backend stays down, a tree started while its backend is down. No server, milliseconds.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::actors::handle::{CompletionSupervisorHandle, Subscription};
use crate::actors::request::Completions;
use crate::actors::shared::FilterMode;
use crate::actors::stats::{ListenerState, SupervisorStats};
use crate::actors::supervisor_config::{SupervisorConfig, TestSources};
use crate::backends::memory::MemorySource;
use crate::config::{BackendConfig, BackendRetry};
use crate::error::Error;
use crate::types::ExecutionId;

const WAIT: Duration = Duration::from_secs(10);

/// A tree over one in-memory backend named `memory`, with a 10 ms doubling backoff capped
/// at 80 ms and no jitter.
async fn tree(source: &Arc<MemorySource>) -> CompletionSupervisorHandle {
    let backend = BackendConfig::sqlite_in_memory().with_retry(BackendRetry::new(2, 10, 3, 0));
    let mut config = SupervisorConfig::new().with_named_backend("memory", backend);
    config.test_sources = TestSources(vec![("memory".into(), source.clone())]);
    CompletionSupervisorHandle::spawn(config).await.expect("spawn").0
}

async fn wait_for<F: Fn(&SupervisorStats) -> bool>(tree: &CompletionSupervisorHandle, what: &str, check: F) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = tree.stats().await.expect("stats");
        if check(&stats) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {stats}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn take(sub: &mut Subscription, n: usize) -> Vec<ExecutionId> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WAIT, sub.next()).await {
            Ok(Some(Ok(event))) => out.push(event.execution_id),
            other => panic!("after {} of {n} events: {other:?}", out.len()),
        }
    }
    out
}

fn live(stats: &SupervisorStats) -> bool {
    stats.listeners[0].state == ListenerState::Live
}

#[tokio::test]
async fn a_listener_killed_after_a_healthy_life_restarts_at_once_and_loses_nothing() {
    let source = MemorySource::new();
    let tree = tree(&source).await;
    let mut sub = tree.subscribe(Completions::tail()).await.expect("subscribe");
    let mut expected = Vec::new();
    for kill in 1..=5u64 {
        wait_for(&tree, "the listener to be live", live).await;
        expected.extend(source.commit(2));
        tree.listener_cell("memory").await.expect("a listener").kill();
        wait_for(&tree, "the restart", |s| s.listeners[0].restarts >= kill).await;
        let listener = tree.stats().await.expect("stats").listeners[0].clone();
        assert_eq!(listener.restart_delay, Some(Duration::ZERO), "kill {kill}: {listener:?}");
    }
    expected.extend(source.commit(2));
    assert_eq!(take(&mut sub, expected.len()).await, expected);
    tree.shutdown().await;
}

#[tokio::test]
async fn a_listener_that_cannot_become_live_backs_off_up_to_the_cap_and_resets_once_live() {
    let source = MemorySource::new();
    let tree = tree(&source).await;
    wait_for(&tree, "the listener to be live", live).await;
    source.set_down(true);
    source.drop_connections();
    // 0 ms (it had been live), then 10, 20, 40, 80, 80 ... while the backend stays down. The
    // stats show the latest delay; a poll may miss a short one, never see one out of order.
    let mut delays: Vec<u64> = Vec::new();
    while delays.iter().filter(|d| **d == 80).count() < 3 {
        let before = tree.stats().await.expect("stats").listeners[0].restarts;
        wait_for(&tree, "another restart", |s| s.listeners[0].restarts > before).await;
        let delay = tree.stats().await.expect("stats").listeners[0].restart_delay.expect("a delay");
        delays.push(delay.as_millis() as u64);
        assert!(delays.len() < 50, "{delays:?}");
    }
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "growing, then capped: {delays:?}");
    assert!(delays.iter().all(|d| [0, 10, 20, 40, 80].contains(d)), "the policy's steps only: {delays:?}");
    assert!(delays.contains(&40), "it grew step by step: {delays:?}");
    source.set_down(false);
    wait_for(&tree, "the listener to be live again", live).await;
    let restarts = tree.stats().await.expect("stats").listeners[0].restarts;
    tree.listener_cell("memory").await.expect("a listener").kill();
    wait_for(&tree, "the restart", |s| s.listeners[0].restarts > restarts).await;
    let delay = tree.stats().await.expect("stats").listeners[0].restart_delay;
    assert_eq!(delay, Some(Duration::ZERO), "live again: the backoff was reset");
    tree.shutdown().await;
}

#[tokio::test]
async fn a_tree_started_while_its_backend_is_down_answers_a_tail_subscription_once_it_can_tell_the_tail() {
    let source = MemorySource::new();
    source.commit(3);
    source.set_down(true);
    let tree = tree(&source).await;
    let stats = tree.stats().await.expect("stats while down");
    assert!(!live(&stats), "{stats}");
    // Asked not to wait, the call fails at once; by default it waits.
    match tree.subscribe(Completions::tail().without_waiting()).await {
        Err(err @ Error::Unavailable { .. }) => assert!(err.is_transient(), "{err:?}"),
        other => panic!("expected Unavailable, got {:?}", other.map(|s| s.id())),
    }
    let waiting = tokio::spawn({
        let tree = tree.clone();
        async move { tree.subscribe(Completions::tail()).await }
    });
    wait_for(&tree, "the waiting subscriber", |s| s.subscribers.iter().any(|s| s.mode == FilterMode::Starting)).await;
    assert!(!waiting.is_finished(), "no answer while nobody can tell the tail");
    source.set_down(false);
    let mut sub = waiting.await.expect("the task").expect("subscribed once the backend answers");
    let ids = source.commit(4);
    assert_eq!(take(&mut sub, 4).await, ids, "everything committed after the call returned, nothing before");
    tree.shutdown().await;
}

#[tokio::test]
async fn a_listener_that_connects_but_cannot_read_backs_off_instead_of_looping_hot() {
    let source = MemorySource::new();
    source.break_reads();
    let tree = tree(&source).await;
    wait_for(&tree, "four restarts", |s| s.listeners[0].restarts >= 4).await;
    let delay = tree.stats().await.expect("stats").listeners[0].restart_delay.expect("a delay");
    assert!(delay >= Duration::from_millis(20), "connecting is not a healthy life: {delay:?}");
    tree.shutdown().await;
}

#[tokio::test]
async fn a_tree_with_two_backends_refuses_a_request_that_names_none() {
    use crate::completion_backend::CompletionBackend;

    let (first, second) = (MemorySource::new(), MemorySource::new());
    let backend = || BackendConfig::sqlite_in_memory().with_retry(BackendRetry::new(2, 10, 3, 0));
    let mut config = SupervisorConfig::new().with_named_backend("one", backend()).with_named_backend("two", backend());
    config.test_sources = TestSources(vec![("one".into(), first.clone()), ("two".into(), second.clone())]);
    let tree = CompletionSupervisorHandle::spawn(config).await.expect("spawn").0;

    let refused = tree.subscribe(Completions::tail()).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refused.contains("this tree has 2 backends (one, two); name one"), "{refused}");
    let seed = tree.subscribe_completions().await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(seed.contains("on_backend"), "{seed}");

    let mut on_two = tree.subscribe(Completions::tail().on_backend("two")).await.expect("a named backend");
    let id = second.commit(1)[0];
    assert_eq!(take(&mut on_two, 1).await, vec![id]);
    tree.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_name_that_cannot_be_a_metrics_label_is_refused() {
    let source = MemorySource::new();
    let tree = tree(&source).await;
    for bad in [String::new(), "x".repeat(65), "with\0nul".to_owned(), "line\nbreak".to_owned()] {
        let refused = tree.subscribe(Completions::tail().with_name(bad.clone())).await;
        assert!(
            matches!(&refused, Err(crate::Error::Validation { detail }) if detail.contains("subscriber name")),
            "{bad:?}: {:?}",
            refused.err()
        );
    }
    let sub = tree.subscribe(Completions::tail().with_name("promoter-0")).await.expect("a good name");
    let stats = tree.stats().await.expect("stats");
    assert_eq!(stats.subscribers.iter().find(|s| s.id == sub.id()).and_then(|s| s.name.as_deref()), Some("promoter-0"));
    assert_eq!(stats.subscribers.len(), 1, "refused requests leave no subscriber behind");
    tree.shutdown().await;
}

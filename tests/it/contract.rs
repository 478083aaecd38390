//! The promises every backend keeps, written once and run against each real backend by its
//! own module under the same test names.

use std::sync::Arc;
use std::time::Duration;

use ff_completions::{
    BackendConfig, CompletionOutcome, CompletionSupervisorHandle, Completions, Error, ExecutionId, FilterMode, FlowId,
    Namespace, Retention, ScannerFilter, StreamCursor, SupervisorConfig, SupervisorStats, TimestampMs,
};
use ff_completions_lab::Error as DemoError;
use ff_completions_lab::{DependencyResolution, Engine, ExecutionSpec, FailOutcome, connect_engine};

use crate::support::{assert_exactly_once, assert_no_more, take_events, wait_until};

/// Declares, in the calling module, one test per promise above under the promise's own name,
/// each run against what the module's `async fn contract_backend() -> (impl Sized, BackendConfig)`
/// returns (a guard kept alive for the test, such as a server or a temp dir, and the backend).
/// `$foreign` is a list of well-formed cursors of the other backend families.
macro_rules! contract_tests {
    (foreign cursors: $foreign:expr) => {
        $crate::contract::contract_tests! { @each
            every_outcome_round_trips_with_all_fields;
            filters_by_namespace_tag_and_both_on_one_listener;
            hostile_filter_values_round_trip_and_match_exactly;
            resume_from_a_mid_stream_cursor_gets_exactly_the_rest_in_order;
            tail_gets_only_new_events;
            malformed_and_foreign_cursors_are_validation_errors, $foreign;
            slow_subscriber_does_not_delay_a_fast_one_and_later_gets_everything;
            trimmed_cursors_expire_with_the_oldest_cursor_and_slow_subscribers_are_told;
        }
    };
    (@each $($name:ident $(, $extra:expr)?;)*) => {
        $crate::contract::backend_tests! { contract: $($name $(, $extra)?;)* }
    };
}
pub(crate) use contract_tests;

/// One `#[tokio::test]` per name, in the calling module: each runs `$crate::<module>::<name>`
/// (with any extra arguments) against what the calling module's
/// `async fn contract_backend() -> (impl Sized, BackendConfig)` returns. The test families of
/// this crate (contract, families, group store, durable) declare theirs through it.
macro_rules! backend_tests {
    ($module:ident: $($name:ident $(, $extra:expr)?;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_guard, backend) = contract_backend().await;
            $crate::$module::$name(backend $(, $extra)?).await;
        }
    )*};
}
pub(crate) use backend_tests;

pub const WAIT: Duration = Duration::from_secs(30);
pub const QUIET: Duration = Duration::from_millis(300);

/// A tree and an engine on one backend.
pub struct Fixture {
    pub tree: CompletionSupervisorHandle,
    pub engine: Arc<dyn Engine>,
}

pub async fn fixture(backend: BackendConfig, tune: impl FnOnce(SupervisorConfig) -> SupervisorConfig) -> Fixture {
    let engine = connect_engine(&backend).await.expect("engine");
    let (tree, _) = CompletionSupervisorHandle::spawn(tune(SupervisorConfig::new().with_backend(backend)))
        .await
        .expect("spawn tree");
    Fixture { tree, engine }
}

/// Creates and claims `n` executions of one flow, returning them in creation order.
pub async fn running(engine: &dyn Engine, spec: impl Fn(&FlowId) -> ExecutionSpec, n: usize) -> Vec<ExecutionId> {
    let flow = FlowId::new();
    engine.create_flow(&flow, None).await.expect("flow");
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let s = spec(&flow);
        engine.create_execution(&s).await.expect("create");
        ids.push(s.id);
    }
    let mut claimed = 0;
    while claimed < n {
        claimed += engine.claim("test-worker", n).await.expect("claim").len();
    }
    ids
}

/// Completes `n` fresh executions one after the other; returns them in commit order.
pub async fn complete_n(engine: &dyn Engine, n: usize) -> Vec<ExecutionId> {
    let ids = running(engine, ExecutionSpec::new, n).await;
    for id in &ids {
        assert!(engine.complete(id).await.expect("complete"));
    }
    ids
}

/// For concurrent producers: creates `n` executions, then claims and completes whatever it
/// claims (any producer's) until it has completed `n`; returns what it completed.
pub async fn complete_claimed(engine: &dyn Engine, n: usize) -> Vec<ExecutionId> {
    let flow = FlowId::new();
    engine.create_flow(&flow, None).await.expect("flow");
    for _ in 0..n {
        engine.create_execution(&ExecutionSpec::new(&flow)).await.expect("create");
    }
    let mut done = Vec::with_capacity(n);
    while done.len() < n {
        let claimed = engine.claim("producer", n - done.len()).await.expect("claim");
        if claimed.is_empty() {
            break;
        }
        for id in claimed {
            if engine.complete(&id).await.expect("complete") {
                done.push(id);
            }
        }
    }
    done
}

pub async fn every_outcome_round_trips_with_all_fields(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("subscribe");
    let flow = FlowId::new();
    f.engine.create_flow(&flow, Some(&Namespace::new("tenant-a"))).await.expect("flow");
    let spec = |f: &FlowId| ExecutionSpec::new(f).with_namespace("tenant-a").with_tag("inst", "i-1").with_tag("k", "v");
    let (ok, bad, cancelled, expired) = (spec(&flow), spec(&flow), spec(&flow), spec(&flow));
    let child = spec(&flow).with_parents(vec![bad.id]);
    for s in [&ok, &bad, &cancelled, &expired, &child] {
        f.engine.create_execution(s).await.expect("create");
    }
    let before = TimestampMs::now();
    let claimed = f.engine.claim("w", 10).await.expect("claim");
    assert_eq!(claimed.len(), 4, "the child is blocked on its parent");
    assert!(f.engine.complete(&ok.id).await.expect("complete"));
    assert_eq!(f.engine.fail(&bad.id, false).await.expect("fail"), FailOutcome::TerminalFailed);
    assert!(f.engine.cancel(&cancelled.id).await.expect("cancel"));
    assert!(f.engine.expire(&expired.id).await.expect("expire"));
    let resolved = f.engine.resolve_dependency(&bad.id, &child.id).await.expect("resolve");
    assert_eq!(resolved, DependencyResolution::Skipped);

    let events = take_events(&mut sub, 5, WAIT).await;
    let expected = [
        (ok.id, CompletionOutcome::Success),
        (bad.id, CompletionOutcome::Failed),
        (cancelled.id, CompletionOutcome::Cancelled),
        (expired.id, CompletionOutcome::Expired),
        (child.id, CompletionOutcome::Skipped),
    ];
    for (event, (id, outcome)) in events.iter().zip(expected) {
        assert_eq!(event.execution_id, id);
        assert_eq!(event.outcome, outcome);
        assert_eq!(event.flow_id, Some(flow));
        assert_eq!(event.namespace, Some(Namespace::new("tenant-a")));
        assert_eq!(event.tags.get("inst").map(String::as_str), Some("i-1"));
        assert_eq!(event.tags.get("k").map(String::as_str), Some("v"));
        assert!(event.at.0 >= before.0 - 5_000 && event.at.0 <= before.0 + 60_000, "{:?} vs {before:?}", event.at);
        assert!(!event.cursor.is_empty());
    }
    assert_no_more(&mut sub, QUIET).await;
}

pub async fn filters_by_namespace_tag_and_both_on_one_listener(backend: BackendConfig) {
    let kind = backend.kind();
    let f = fixture(backend, |c| c).await;
    let ns = |n: &str| ScannerFilter::new().with_namespace(Namespace::new(n));
    let tail = Completions::tail;
    let mut by_ns = f.tree.subscribe(tail().with_filter(ns("a"))).await.expect("sub");
    let mut by_tag =
        f.tree.subscribe(tail().with_filter(ScannerFilter::new().with_instance_tag("inst", "1"))).await.expect("sub");
    let mut by_both = f.tree.subscribe(tail().with_filter(ns("a").with_instance_tag("inst", "1"))).await.expect("sub");
    let mut everything = f.tree.subscribe(tail()).await.expect("sub");

    let mut made = Vec::new();
    for (n, t) in [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")] {
        let ids = running(&*f.engine, |fl| ExecutionSpec::new(fl).with_namespace(n).with_tag("inst", t), 2).await;
        for id in &ids {
            f.engine.complete(id).await.expect("complete");
        }
        made.push((n, t, ids));
    }
    let pick = |keep: &dyn Fn(&str, &str) -> bool| -> Vec<ExecutionId> {
        made.iter().filter(|(n, t, _)| keep(n, t)).flat_map(|(_, _, ids)| ids.clone()).collect()
    };
    let wanted =
        [pick(&|n, _| n == "a"), pick(&|_, t| t == "1"), pick(&|n, t| n == "a" && t == "1"), pick(&|_, _| true)];
    for (sub, want) in [&mut by_ns, &mut by_tag, &mut by_both, &mut everything].into_iter().zip(wanted) {
        assert_in_promised_order(kind, &take_events(sub, want.len(), WAIT).await, &want);
        assert_no_more(sub, QUIET).await;
    }
    assert_eq!(f.tree.stats().await.expect("stats").listeners.len(), 1, "four subscribers share one listener");
}

/// Namespaces and tags with quotes, SQL and Lua syntax, JSON delimiters, unicode and 8 KiB of
/// text are stored as given, come back byte for byte, and filters match them exactly.
pub async fn hostile_filter_values_round_trip_and_match_exactly(backend: BackendConfig) {
    let kind = backend.kind();
    let f = fixture(backend, |c| c).await;
    let long = "x".repeat(8 * 1024);
    let hostile: Vec<String> = [
        "a",
        "a'",
        "a'; DROP TABLE ff_completion_event; --",
        "\"}], \"outcome\": \"success",
        "]] .. redis.call('FLUSHALL') .. [[",
        "名前空間 🚀 ñ\u{200b}",
        "tab\tnew\nline",
        long.as_str(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut subs = Vec::new();
    for value in &hostile {
        let filter = ScannerFilter::new().with_namespace(Namespace::new(value.clone())).with_instance_tag(value, value);
        subs.push(f.tree.subscribe(Completions::tail().with_filter(filter)).await.expect("sub"));
    }
    let mut everything = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let mut made = Vec::new();
    for value in &hostile {
        let ids =
            running(&*f.engine, |fl| ExecutionSpec::new(fl).with_namespace(value.clone()).with_tag(value, value), 1)
                .await;
        f.engine.complete(&ids[0]).await.expect("complete");
        made.push(ids[0]);
    }
    for ((sub, value), id) in subs.iter_mut().zip(&hostile).zip(&made) {
        let got = take_events(sub, 1, WAIT).await;
        assert_eq!(got[0].execution_id, *id);
        assert_eq!(got[0].namespace.as_ref().map(|n| n.as_str()), Some(value.as_str()));
        assert_eq!(got[0].tags.get(value), Some(value));
        assert_no_more(sub, QUIET).await;
    }
    assert_in_promised_order(kind, &take_events(&mut everything, made.len(), WAIT).await, &made);

    // NUL is refused alike everywhere (Postgres text cannot hold it), before anything is written.
    let flow = FlowId::new();
    for spec in [
        ExecutionSpec::new(&flow).with_namespace("nul\0"),
        ExecutionSpec::new(&flow).with_tag("k\0", "v"),
        ExecutionSpec::new(&flow).with_tag("k", "\0"),
    ] {
        assert!(
            matches!(f.engine.create_execution(&spec).await, Err(DemoError::Subsystem(Error::Validation { .. }))),
            "{spec:?}"
        );
    }
    assert!(matches!(
        f.engine.create_flow(&flow, Some(&Namespace::new("\0"))).await,
        Err(DemoError::Subsystem(Error::Validation { .. }))
    ));
    assert_no_more(&mut everything, QUIET).await;
}

pub async fn resume_from_a_mid_stream_cursor_gets_exactly_the_rest_in_order(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let mut first = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let ids = complete_n(&*f.engine, 40).await;
    let seen = take_events(&mut first, 40, WAIT).await;
    let cursor = seen[14].cursor.clone();
    drop(first);

    let mut resumed = f.tree.subscribe(Completions::from_cursor(cursor)).await.expect("resume");
    assert_exactly_once(&take_events(&mut resumed, 25, WAIT).await, &ids[15..], true);
    // Live events continue after the replay with no gap and no duplicate.
    let more = complete_n(&*f.engine, 10).await;
    assert_exactly_once(&take_events(&mut resumed, 10, WAIT).await, &more, true);
    assert_no_more(&mut resumed, QUIET).await;
}

pub async fn tail_gets_only_new_events(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    complete_n(&*f.engine, 10).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let fresh = complete_n(&*f.engine, 5).await;
    assert_exactly_once(&take_events(&mut sub, 5, WAIT).await, &fresh, true);
    assert_no_more(&mut sub, QUIET).await;
}

/// `foreign` are well-formed cursors of other backend families.
pub async fn malformed_and_foreign_cursors_are_validation_errors(backend: BackendConfig, foreign: Vec<StreamCursor>) {
    let f = fixture(backend, |c| c).await;
    let mut bad =
        vec![StreamCursor::new(vec![0x02, 1, 2]), StreamCursor::new(vec![0x7f; 17]), StreamCursor::new(vec![0x03])];
    bad.extend(foreign);
    for cursor in bad {
        match f.tree.subscribe(Completions::from_cursor(cursor.clone())).await {
            Err(Error::Validation { .. }) => {}
            other => panic!("{cursor:?} gave {:?}", other.map(|s| s.id())),
        }
    }
    match f.tree.subscribe(Completions::tail().on_backend("nope")).await {
        Err(Error::Validation { .. }) => {}
        other => panic!("unknown backend gave {:?}", other.map(|s| s.id())),
    }
}

pub async fn slow_subscriber_does_not_delay_a_fast_one_and_later_gets_everything(backend: BackendConfig) {
    let f = fixture(backend, |c| c.with_subscriber_buffer(16).with_batch_size(64)).await;
    let mut slow = f.tree.subscribe(Completions::tail()).await.expect("slow");
    let mut fast = f.tree.subscribe(Completions::tail()).await.expect("fast");
    let (slow_id, fast_id) = (slow.id(), fast.id());
    let ids = complete_n(&*f.engine, 1500).await;
    // The fast one gets everything while the slow one has not read a single event.
    assert_exactly_once(&take_events(&mut fast, ids.len(), WAIT).await, &ids, true);
    // Each filter works through the live batches at its own pace: the slow one's may still be
    // on its way to its full buffer.
    let slow_stats = || async {
        let stats = f.tree.stats().await.expect("stats");
        stats.subscribers.into_iter().find(|s| s.id == slow_id).expect("slow stats")
    };
    wait_until(WAIT, "the slow filter to block and drop live batches", || async {
        let stats = slow_stats().await;
        stats.mode == FilterMode::Blocked && stats.live_batches_dropped > 0
    })
    .await;
    assert_eq!(slow_stats().await.delivered, 16, "only its buffer is filled");
    let stats = f.tree.stats().await.expect("stats");
    let fast_stats = stats.subscribers.iter().find(|s| s.id == fast_id).expect("fast stats");
    assert_eq!(fast_stats.delivered, ids.len() as u64);
    // Now the slow one reads: everything, once, in order, caught up from the backend.
    assert_exactly_once(&take_events(&mut slow, ids.len(), WAIT).await, &ids, true);
    assert_no_more(&mut slow, QUIET).await;
    let after = slow_stats().await;
    assert!(after.catch_up_reads > 1, "{after:?}");
}

/// The trimming is done by a second tree on the same backend, spawned once all 20 events are
/// committed and read by the fast subscriber: its first trim run is its last (it keeps exactly
/// the newest 5), and no subscriber of the first tree races it. Each completion is read before
/// the next commits, so on Postgres (which cuts only between the batches its reader read) each
/// is a batch of its own.
pub async fn trimmed_cursors_expire_with_the_oldest_cursor_and_slow_subscribers_are_told(backend: BackendConfig) {
    let f = fixture(backend.clone(), |c| c.with_subscriber_buffer(4)).await;
    let mut fast = f.tree.subscribe(Completions::tail()).await.expect("fast");
    let mut slow = f.tree.subscribe(Completions::tail()).await.expect("slow");
    // Each completion is read before the next commits: on Postgres each is a batch of its own.
    let ids = running(&*f.engine, ExecutionSpec::new, 20).await;
    let mut seen = Vec::with_capacity(20);
    for id in &ids {
        assert!(f.engine.complete(id).await.expect("complete"));
        seen.extend(take_events(&mut fast, 1, WAIT).await);
    }
    assert_exactly_once(&seen, &ids, true);
    let retention = Retention::max_events(5).every(Duration::from_millis(50));
    let (_trimmer, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend.with_retention(retention)))
            .await
            .expect("spawn the trimming tree");
    let expired = |r: &Result<ff_completions::Subscription, Error>| matches!(r, Err(Error::CursorExpired { .. }));
    wait_until(WAIT, "the trim job", || async {
        expired(&f.tree.subscribe(Completions::from_cursor(seen[12].cursor.clone())).await)
    })
    .await;

    let oldest = match f.tree.subscribe(Completions::from_cursor(seen[2].cursor.clone())).await {
        Err(Error::CursorExpired { oldest: Some(oldest) }) => oldest,
        other => panic!("expected CursorExpired, got {:?}", other.map(|s| s.id())),
    };
    let mut resumed = f.tree.subscribe(Completions::from_cursor(oldest)).await.expect("resume at oldest");
    assert_exactly_once(&take_events(&mut resumed, 5, WAIT).await, &ids[15..], true);

    // The slow subscriber read nothing; its buffer holds 4 events, the rest was trimmed away.
    assert_exactly_once(&take_events(&mut slow, 4, WAIT).await, &ids[..4], true);
    match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut slow)).await {
        Ok(Some(Err(Error::CursorExpired { oldest: Some(_) }))) => {}
        other => panic!("expected CursorExpired on the stream, got {other:?}"),
    }
    assert!(tokio::time::timeout(WAIT, futures::StreamExt::next(&mut slow)).await.expect("ends").is_none());
    // The tree carries on for everyone else.
    let more = complete_n(&*f.engine, 3).await;
    assert_exactly_once(&take_events(&mut fast, 3, WAIT).await, &more, true);
}

/// The commit times the extreme-times tests write by hand, in order.
pub const EXTREME_TIMES: [i64; 6] = [i64::MIN, i64::MIN + 1, i64::MIN, i64::MIN, i64::MAX, -1];

/// Every expected completion once, in the order the backend promises for completions of
/// several flows: one order on Postgres and SQLite, one per partition on Valkey.
#[track_caller]
pub fn assert_in_promised_order(kind: &str, events: &[ff_completions::CompletionEvent], expected: &[ExecutionId]) {
    if kind == "valkey" {
        crate::support::assert_exactly_once_per_partition(events, expected);
    } else {
        assert_exactly_once(events, expected, true);
    }
}

/// Checks that no listener and no filter restarted.
#[track_caller]
pub fn assert_nothing_restarted(stats: &SupervisorStats) {
    assert!(stats.listeners.iter().all(|l| l.restarts == 0), "a listener restarted: {:?}", stats.listeners);
    assert!(stats.subscribers.iter().all(|s| s.restarts == 0), "a filter restarted: {:?}", stats.subscribers);
}

/// Checks the end of an extreme-times test: `before`, the rows or entries written with
/// [`EXTREME_TIMES`], then `after`, each once, in order (in a single order, or per partition),
/// the times as written, nothing skipped and nothing restarted.
pub async fn assert_extreme_times_arrive<S>(
    tree: &CompletionSupervisorHandle,
    sub: &mut S,
    [before, odd, after]: [Vec<ExecutionId>; 3],
    single_order: bool,
) where
    S: futures::Stream<Item = Result<ff_completions::CompletionEvent, Error>> + Unpin,
{
    let expected = [before, odd.clone(), after].concat();
    let events = take_events(sub, expected.len(), WAIT).await;
    if single_order {
        assert_exactly_once(&events, &expected, true);
    } else {
        crate::support::assert_exactly_once_per_partition(&events, &expected);
    }
    let at = |id: &ExecutionId| events.iter().find(|e| e.execution_id == *id).map(|e| e.at.0);
    let times: Vec<i64> = odd.iter().filter_map(at).collect();
    assert_eq!(times, EXTREME_TIMES, "the commit times arrive as written");
    assert_no_more(sub, QUIET).await;
    let stats = tree.stats().await.expect("stats");
    assert_eq!(stats.listeners[0].rows_skipped, 0, "valid rows and entries are not skipped");
    assert_nothing_restarted(&stats);
}

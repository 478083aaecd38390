//! The lease-history and signal-delivery families: the promises every backend keeps for them,
//! written once and run by each backend's module under the same test names (see
//! [`family_tests`]). They come through the tree that carries completions: one listener per
//! backend, a filter per subscriber that selects its family.

use std::fmt::Debug;
use std::time::Duration;

use ff_completions::cursor::{LEASE_HISTORY_CURSOR_TAG, SIGNAL_DELIVERY_CURSOR_TAG};
use ff_completions::{
    BackendConfig, CompletionSupervisorHandle, Completions, Error, ExecutionId, FilterMode, FlowId, InstanceTags,
    LeaseHistory, LeaseHistoryEvent, LeaseHistoryFilter, LeaseId, Namespace, Retention, SignalDelivery,
    SignalDeliveryEffect, SignalDeliveryEvent, SignalDeliveryFilter, SignalId, StreamCursor, SupervisorConfig,
    TimestampMs, WaitpointId, WorkerInstanceId,
};
use ff_completions_lab::{Engine, ExecutionSpec};
use futures::{Stream, StreamExt};

use crate::contract::{QUIET, WAIT, fixture};
use crate::support::{assert_exactly_once, take_events, wait_until};

/// Declares, in the calling module, one test per family promise under its own name, each run
/// against what the module's `async fn contract_backend() -> (impl Sized, BackendConfig)`
/// returns (as [`crate::contract::contract_tests`] does).
macro_rules! family_tests {
    () => {
        $crate::families::family_tests! { @each
            lease_lifecycle_arrives_as_acquired_renewed_expired_reclaimed_in_order;
            a_revoke_arrives_with_who_revoked_and_a_later_claim_is_acquired;
            signals_are_satisfied_buffered_then_consumed_and_deduped;
            concurrent_deliveries_of_one_key_give_one_effect_and_the_rest_deduped;
            resume_from_a_mid_stream_cursor_of_each_family_gets_exactly_the_rest;
            a_cursor_of_one_family_is_refused_by_the_others;
            a_family_tail_gets_only_new_events;
            family_filters_select_execution_namespace_worker_and_waitpoint;
            fifty_subscribers_of_three_families_share_one_listener_and_a_slow_lease_subscriber_delays_no_completion;
            instance_tags_are_unavailable;
            trimmed_family_cursors_expire_with_an_oldest_cursor_of_their_own_family;
        }
    };
    (@each $($name:ident;)*) => {
        $crate::contract::backend_tests! { families: $($name;)* }
    };
}
pub(crate) use family_tests;

/// Takes `n` events of any family, failing the test on an error, an end, or `timeout`.
pub async fn take<E: Debug, S>(stream: &mut S, n: usize, timeout: Duration) -> Vec<E>
where
    S: Stream<Item = Result<E, Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(event))) => out.push(event),
            Ok(Some(Err(err))) => panic!("stream error after {} of {n} events: {err}", out.len()),
            Ok(None) => panic!("stream ended after {} of {n} events", out.len()),
            Err(_) => panic!("timed out after {} of {n} events", out.len()),
        }
    }
    out
}

/// Nothing more arrives within `quiet`.
pub async fn no_more<E: Debug, S>(stream: &mut S, quiet: Duration)
where
    S: Stream<Item = Result<E, Error>> + Unpin,
{
    if let Ok(Some(item)) = tokio::time::timeout(quiet, stream.next()).await {
        panic!("expected no more events, got {item:?}");
    }
}

/// `(kind, execution)` of each lease event.
pub fn lease_kinds(events: &[LeaseHistoryEvent]) -> Vec<(&'static str, ExecutionId)> {
    events.iter().map(|e| (e.wire_kind(), *e.execution_id())).collect()
}

/// `(effect, execution, signal)` of each signal event.
pub fn signal_effects(events: &[SignalDeliveryEvent]) -> Vec<(SignalDeliveryEffect, ExecutionId, String)> {
    events.iter().map(|e| (e.effect.clone(), e.execution_id, e.signal_id.as_str().to_owned())).collect()
}

/// Creates `n` eligible executions of one flow (in `namespace`, if any).
pub async fn create(engine: &dyn Engine, namespace: Option<&str>, n: usize) -> Vec<ExecutionId> {
    let flow = FlowId::new();
    engine.create_flow(&flow, namespace.map(Namespace::new).as_ref()).await.expect("flow");
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let mut spec = ExecutionSpec::new(&flow);
        if let Some(ns) = namespace {
            spec = spec.with_namespace(ns);
        }
        engine.create_execution(&spec).await.expect("create");
        ids.push(spec.id);
    }
    ids
}

/// Claims exactly `n` executions for `worker`.
pub async fn claim(engine: &dyn Engine, worker: &str, n: usize) -> Vec<ExecutionId> {
    let mut claimed = Vec::with_capacity(n);
    while claimed.len() < n {
        let got = engine.claim(worker, n - claimed.len()).await.expect("claim");
        assert!(!got.is_empty(), "{} of {n} claimable", claimed.len());
        claimed.extend(got);
    }
    claimed
}

fn tail() -> Completions {
    Completions::tail()
}

pub async fn lease_lifecycle_arrives_as_acquired_renewed_expired_reclaimed_in_order(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let mut sub = f.tree.subscribe(LeaseHistory::tail()).await.expect("subscribe");
    let [id] = create(&*f.engine, None, 1).await[..] else { panic!("one execution") };
    assert_eq!(claim(&*f.engine, "worker-a", 1).await, [id]);
    for _ in 0..3 {
        assert!(f.engine.renew_lease(&id, "worker-a").await.expect("renew"));
    }
    assert!(!f.engine.renew_lease(&id, "worker-b").await.expect("renew"), "only the holder renews");
    // worker-a stops heartbeating; the sweep runs with a clock past every lease.
    assert_eq!(f.engine.expire_leases(TimestampMs(i64::MAX)).await.expect("sweep"), [id]);
    assert!(!f.engine.renew_lease(&id, "worker-a").await.expect("renew"), "an expired lease is not renewed");
    assert_eq!(claim(&*f.engine, "worker-b", 1).await, [id]);

    let events = take(&mut sub, 6, WAIT).await;
    let kinds: Vec<&str> = events.iter().map(LeaseHistoryEvent::wire_kind).collect();
    assert_eq!(kinds, ["acquired", "renewed", "renewed", "renewed", "expired", "reclaimed"]);
    assert!(events.iter().all(|e| *e.execution_id() == id));
    let first_lease = events[0].lease_id().cloned().expect("acquired names its lease");
    let (a, b) = (WorkerInstanceId::new("worker-a"), WorkerInstanceId::new("worker-b"));
    for event in &events[..4] {
        match event {
            LeaseHistoryEvent::Acquired { lease_id, worker_instance_id, .. }
            | LeaseHistoryEvent::Renewed { lease_id, worker_instance_id, .. } => {
                assert_eq!((lease_id.as_ref(), worker_instance_id.as_ref()), (Some(&first_lease), Some(&a)));
            }
            other => panic!("{other:?}"),
        }
    }
    match (&events[4], &events[5]) {
        (
            LeaseHistoryEvent::Expired { lease_id, prev_owner, .. },
            LeaseHistoryEvent::Reclaimed { new_lease_id, new_owner, .. },
        ) => {
            assert_eq!((lease_id.as_ref(), prev_owner.as_ref()), (Some(&first_lease), Some(&a)));
            assert_eq!(new_owner.as_ref(), Some(&b));
            assert!(new_lease_id.as_ref().is_some_and(|l| *l != first_lease), "a new lease: {new_lease_id:?}");
        }
        other => panic!("{other:?}"),
    }
    for event in &events {
        assert_eq!(event.cursor().as_bytes().get(1), Some(&LEASE_HISTORY_CURSOR_TAG), "a lease-history cursor");
    }
    no_more(&mut sub, QUIET).await;
}

pub async fn a_revoke_arrives_with_who_revoked_and_a_later_claim_is_acquired(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let mut sub = f.tree.subscribe(LeaseHistory::tail()).await.expect("subscribe");
    let [id] = create(&*f.engine, None, 1).await[..] else { panic!("one execution") };
    claim(&*f.engine, "worker-a", 1).await;
    assert!(f.engine.revoke_lease(&id, "operator").await.expect("revoke"));
    assert!(!f.engine.revoke_lease(&id, "operator").await.expect("revoke"), "no active lease left");
    claim(&*f.engine, "worker-b", 1).await;
    let events = take(&mut sub, 3, WAIT).await;
    assert_eq!(lease_kinds(&events), [("acquired", id), ("revoked", id), ("acquired", id)]);
    let lease: Option<LeaseId> = events[0].lease_id().cloned();
    match &events[1] {
        LeaseHistoryEvent::Revoked { lease_id, revoked_by, .. } => {
            assert_eq!((lease_id, revoked_by.as_str()), (&lease, "operator"))
        }
        other => panic!("{other:?}"),
    }
    no_more(&mut sub, QUIET).await;
}

pub async fn signals_are_satisfied_buffered_then_consumed_and_deduped(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let mut sub = f.tree.subscribe(SignalDelivery::tail()).await.expect("subscribe");
    let (wp1, wp2) = (WaitpointId::new("approval"), WaitpointId::new("payment"));
    let e = &*f.engine;
    let [a] = create(e, None, 1).await[..] else { panic!() };
    claim(e, "w", 1).await;
    assert!(!e.suspend(&a, &wp1).await.expect("suspend"), "no signal waits yet: the waitpoint opens");
    assert_eq!(e.execution(&a).await.expect("state").map(|i| i.state).as_deref(), Some("suspended"));
    let effect = e.deliver_signal(&a, &wp1, &SignalId::new("s1"), Some("k1"), Some("billing")).await.expect("deliver");
    assert_eq!(effect, SignalDeliveryEffect::Satisfied);
    assert_eq!(e.execution(&a).await.expect("state").map(|i| i.state).as_deref(), Some("eligible"));

    let [b] = create(e, None, 1).await[..] else { panic!() };
    claim(e, "w", 2).await;
    let effect = e.deliver_signal(&b, &wp2, &SignalId::new("s2"), Some("k2"), None).await.expect("deliver");
    assert_eq!(effect, SignalDeliveryEffect::Buffered);
    assert_eq!(e.execution(&b).await.expect("state").map(|i| i.state).as_deref(), Some("running"));
    assert!(e.suspend(&b, &wp2).await.expect("suspend"), "the buffered signal is consumed as the waitpoint opens");
    assert_eq!(e.execution(&b).await.expect("state").map(|i| i.state).as_deref(), Some("eligible"));

    let effect = e.deliver_signal(&a, &wp1, &SignalId::new("s3"), Some("k1"), None).await.expect("deliver");
    assert_eq!(effect, SignalDeliveryEffect::Deduped);

    // `a` and `b` are of two flows (two partitions): in order per execution, as a Valkey
    // backend orders them (per partition); `b`'s event may come first there.
    let mut events = take(&mut sub, 3, WAIT).await;
    events.sort_by_key(|e| e.execution_id != a);
    assert_eq!(
        signal_effects(&events),
        [
            (SignalDeliveryEffect::Satisfied, a, "s1".into()),
            (SignalDeliveryEffect::Deduped, a, "s3".into()),
            (SignalDeliveryEffect::Buffered, b, "s2".into()),
        ]
    );
    assert_eq!((events[0].waitpoint_id.as_ref(), events[0].source_identity.as_deref()), (Some(&wp1), Some("billing")));
    assert_eq!((events[2].waitpoint_id.as_ref(), events[2].source_identity.as_deref()), (Some(&wp2), None));
    for event in &events {
        assert_eq!(event.cursor.as_bytes().get(1), Some(&SIGNAL_DELIVERY_CURSOR_TAG), "a signal-delivery cursor");
    }
    no_more(&mut sub, QUIET).await;
}

pub async fn concurrent_deliveries_of_one_key_give_one_effect_and_the_rest_deduped(backend: BackendConfig) {
    const SENDERS: usize = 8;
    let f = fixture(backend, |c| c).await;
    let mut sub = f.tree.subscribe(SignalDelivery::tail()).await.expect("subscribe");
    let ids = create(&*f.engine, None, 2).await;
    claim(&*f.engine, "w", 2).await;
    let wp = WaitpointId::new("wp");
    // The first execution waits on the waitpoint (its signal satisfies it), the second does not
    // (its signal is buffered).
    assert!(!f.engine.suspend(&ids[0], &wp).await.expect("suspend"));
    for (id, first) in [(ids[0], SignalDeliveryEffect::Satisfied), (ids[1], SignalDeliveryEffect::Buffered)] {
        let deliveries = (0..SENDERS).map(|n| {
            let (engine, wp) = (f.engine.clone(), wp.clone());
            tokio::spawn(async move {
                engine.deliver_signal(&id, &wp, &SignalId::new(format!("s{n}")), Some("same-key"), None).await
            })
        });
        let mut effects = Vec::new();
        for d in futures::future::join_all(deliveries).await {
            effects.push(d.expect("task").expect("deliver"));
        }
        assert_eq!(effects.iter().filter(|e| **e == first).count(), 1, "{effects:?}");
        assert_eq!(effects.iter().filter(|e| **e == SignalDeliveryEffect::Deduped).count(), SENDERS - 1, "{effects:?}");
        let events = take(&mut sub, SENDERS, WAIT).await;
        assert!(events.iter().all(|e| e.execution_id == id));
        assert_eq!(events[0].effect, first, "the one that counted committed first");
        assert!(events[1..].iter().all(|e| e.effect == SignalDeliveryEffect::Deduped), "{events:?}");
    }
    no_more(&mut sub, QUIET).await;
}

/// Lease, signal and completion events interleaved: 4 claims, 4 buffered signals, 4
/// completions, 4 more signals. Returns the executions.
async fn interleaved(engine: &dyn Engine) -> Vec<ExecutionId> {
    let ids = create(engine, None, 4).await;
    claim(engine, "w", 4).await;
    let wp = WaitpointId::new("wp");
    for (n, id) in ids.iter().enumerate() {
        engine.deliver_signal(id, &wp, &SignalId::new(format!("a{n}")), None, None).await.expect("signal");
        assert!(engine.complete(id).await.expect("complete"));
        engine.deliver_signal(id, &wp, &SignalId::new(format!("b{n}")), None, None).await.expect("signal");
    }
    ids
}

pub async fn resume_from_a_mid_stream_cursor_of_each_family_gets_exactly_the_rest(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let mut leases = f.tree.subscribe(LeaseHistory::tail()).await.expect("leases");
    let mut signals = f.tree.subscribe(SignalDelivery::tail()).await.expect("signals");
    let mut completions = f.tree.subscribe(tail()).await.expect("completions");
    let ids = interleaved(&*f.engine).await;
    let lease_events = take(&mut leases, 4, WAIT).await;
    let signal_events = take(&mut signals, 8, WAIT).await;
    let completion_events = take_events(&mut completions, 4, WAIT).await;
    assert_exactly_once(&completion_events, &ids, true);

    let mut lease_rest =
        f.tree.subscribe(LeaseHistory::from_cursor(lease_events[1].cursor().clone())).await.expect("resume leases");
    let mut signal_rest =
        f.tree.subscribe(SignalDelivery::from_cursor(signal_events[4].cursor.clone())).await.expect("resume signals");
    let mut completion_rest = f
        .tree
        .subscribe(Completions::from_cursor(completion_events[2].cursor.clone()))
        .await
        .expect("resume completions");
    assert_eq!(lease_kinds(&take(&mut lease_rest, 2, WAIT).await), lease_kinds(&lease_events[2..]));
    assert_eq!(signal_effects(&take(&mut signal_rest, 3, WAIT).await), signal_effects(&signal_events[5..]));
    assert_exactly_once(&take_events(&mut completion_rest, 1, WAIT).await, &ids[3..], true);

    // Then live, with no gap or duplicate.
    let [next] = create(&*f.engine, None, 1).await[..] else { panic!() };
    claim(&*f.engine, "w", 1).await;
    f.engine.deliver_signal(&next, &WaitpointId::new("wp"), &SignalId::new("c"), None, None).await.expect("signal");
    assert_eq!(lease_kinds(&take(&mut lease_rest, 1, WAIT).await), [("acquired", next)]);
    assert_eq!(signal_effects(&take(&mut signal_rest, 1, WAIT).await)[0].1, next);
    no_more(&mut lease_rest, QUIET).await;
    no_more(&mut signal_rest, QUIET).await;
    no_more(&mut completion_rest, QUIET).await;
}

pub async fn a_cursor_of_one_family_is_refused_by_the_others(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let mut leases = f.tree.subscribe(LeaseHistory::tail()).await.expect("leases");
    let mut signals = f.tree.subscribe(SignalDelivery::tail()).await.expect("signals");
    let mut completions = f.tree.subscribe(tail()).await.expect("completions");
    interleaved(&*f.engine).await;
    let lease = take(&mut leases, 1, WAIT).await[0].cursor().clone();
    let signal = take(&mut signals, 1, WAIT).await[0].cursor.clone();
    let completion = take_events(&mut completions, 1, WAIT).await[0].cursor.clone();
    let refused = |what: &str, r: Result<(), Error>| match r {
        Err(Error::Validation { .. }) => {}
        other => panic!("{what}: expected a validation error, got {other:?}"),
    };
    let t = &f.tree;
    let lease_sub = |c: &StreamCursor| t.subscribe(LeaseHistory::from_cursor(c.clone()));
    let signal_sub = |c: &StreamCursor| t.subscribe(SignalDelivery::from_cursor(c.clone()));
    let completion_sub = |c: &StreamCursor| t.subscribe(Completions::from_cursor(c.clone()));
    refused("lease cursor, completion subscription", completion_sub(&lease).await.map(drop));
    refused("lease cursor, signal subscription", signal_sub(&lease).await.map(drop));
    refused("signal cursor, completion subscription", completion_sub(&signal).await.map(drop));
    refused("signal cursor, lease subscription", lease_sub(&signal).await.map(drop));
    refused("completion cursor, lease subscription", lease_sub(&completion).await.map(drop));
    refused("completion cursor, signal subscription", signal_sub(&completion).await.map(drop));
    let unknown_tag = StreamCursor::new([&lease.as_bytes()[..1], &[0xf7], &lease.as_bytes()[2..]].concat());
    refused("an unknown family tag", lease_sub(&unknown_tag).await.map(drop));
    // Each family's own cursor is accepted.
    lease_sub(&lease).await.expect("lease cursor");
    signal_sub(&signal).await.expect("signal cursor");
    completion_sub(&completion).await.expect("completion cursor");
}

pub async fn a_family_tail_gets_only_new_events(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let old = create(&*f.engine, None, 3).await;
    claim(&*f.engine, "w", 3).await;
    for id in &old {
        f.engine.deliver_signal(id, &WaitpointId::new("wp"), &SignalId::new("old"), None, None).await.expect("signal");
    }
    // Subscribed from the empty cursor, which means the tail.
    let mut leases = f.tree.subscribe(LeaseHistory::from_cursor(StreamCursor::empty())).await.expect("l");
    let mut signals = f.tree.subscribe(SignalDelivery::from_cursor(StreamCursor::empty())).await.expect("s");
    for id in &old {
        assert!(f.engine.renew_lease(id, "w").await.expect("renew"));
        f.engine.deliver_signal(id, &WaitpointId::new("wp"), &SignalId::new("new"), None, None).await.expect("signal");
    }
    let kinds = lease_kinds(&take(&mut leases, 3, WAIT).await);
    assert_eq!(kinds, old.iter().map(|id| ("renewed", *id)).collect::<Vec<_>>());
    let got = take(&mut signals, 3, WAIT).await;
    assert!(got.iter().all(|e| e.signal_id.as_str() == "new"), "{got:?}");
    no_more(&mut leases, QUIET).await;
    no_more(&mut signals, QUIET).await;
}

pub async fn family_filters_select_execution_namespace_worker_and_waitpoint(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let t = &f.tree;
    let a = create(&*f.engine, Some("tenant-a"), 2).await;
    let by_exec = LeaseHistoryFilter::new().with_execution(a[1]);
    let by_ns = LeaseHistoryFilter::new().with_namespace(Namespace::new("tenant-a"));
    let by_worker = LeaseHistoryFilter::new().with_worker(WorkerInstanceId::new("w2"));
    let mut subs = Vec::new();
    for filter in [by_exec, by_ns, by_worker] {
        subs.push(t.subscribe(LeaseHistory::tail().with_filter(filter)).await.expect("lease sub"));
    }
    let mut by_wp = t
        .subscribe(
            SignalDelivery::tail().with_filter(SignalDeliveryFilter::new().with_waitpoint(WaitpointId::new("x"))),
        )
        .await
        .expect("wp");
    let mut by_signal_ns = t
        .subscribe(
            SignalDelivery::tail().with_filter(SignalDeliveryFilter::new().with_namespace(Namespace::new("tenant-b"))),
        )
        .await
        .expect("ns");
    let mut first = claim(&*f.engine, "w1", 2).await;
    let b = create(&*f.engine, Some("tenant-b"), 1).await;
    assert_eq!(claim(&*f.engine, "w2", 1).await, b);
    first.sort();
    for (id, wp) in [(a[0], "x"), (a[1], "y"), (b[0], "x"), (b[0], "y")] {
        f.engine.deliver_signal(&id, &WaitpointId::new(wp), &SignalId::new(wp), None, None).await.expect("signal");
    }
    assert_eq!(lease_kinds(&take(&mut subs[0], 1, WAIT).await), [("acquired", a[1])]);
    let mut tenant_a: Vec<_> = take(&mut subs[1], 2, WAIT).await.iter().map(|e| *e.execution_id()).collect();
    tenant_a.sort();
    assert_eq!(tenant_a, first, "both of tenant-a, in the order claimed");
    assert_eq!(lease_kinds(&take(&mut subs[2], 1, WAIT).await), [("acquired", b[0])]);
    // Two flows, so two partitions: on Valkey their order is per partition, so as a set.
    let mut wp: Vec<_> = take(&mut by_wp, 2, WAIT).await.iter().map(|e| e.execution_id).collect();
    wp.sort();
    let mut expected = [a[0], b[0]];
    expected.sort();
    assert_eq!(wp, expected);
    let ns: Vec<_> = take(&mut by_signal_ns, 2, WAIT).await.iter().map(|e| e.signal_id.as_str().to_owned()).collect();
    assert_eq!(ns, ["x", "y"]);
    for sub in &mut subs {
        no_more(sub, QUIET).await;
    }
    no_more(&mut by_wp, QUIET).await;
    no_more(&mut by_signal_ns, QUIET).await;
}

/// 20 completion, 15 lease (one of them never reading until the end) and 15 signal
/// subscribers on one tree: one listener serves them all; every completion subscriber gets
/// every completion while the slow lease subscriber sits blocked with a full buffer, and the
/// slow one later gets every lease event, once, in order.
pub async fn fifty_subscribers_of_three_families_share_one_listener_and_a_slow_lease_subscriber_delays_no_completion(
    backend: BackendConfig,
) {
    const N: usize = 100;
    let f = fixture(backend, |c| c.with_subscriber_buffer(16).with_batch_size(32)).await;
    let t = &f.tree;
    let mut slow = t.subscribe(LeaseHistory::tail()).await.expect("slow");
    let slow_id = slow.id();
    let mut completion_subs = Vec::new();
    for _ in 0..20 {
        completion_subs.push(t.subscribe(tail()).await.expect("completion sub"));
    }
    let mut lease_subs = Vec::new();
    for _ in 0..14 {
        lease_subs.push(t.subscribe(LeaseHistory::tail()).await.expect("lease sub"));
    }
    let mut signal_subs = Vec::new();
    for _ in 0..15 {
        signal_subs.push(t.subscribe(SignalDelivery::tail()).await.expect("signal sub"));
    }
    let ids = create(&*f.engine, None, N).await;
    claim(&*f.engine, "w", N).await;
    for (n, id) in ids.iter().enumerate() {
        f.engine
            .deliver_signal(id, &WaitpointId::new("wp"), &SignalId::new(format!("s{n}")), None, None)
            .await
            .expect("s");
        assert!(f.engine.complete(id).await.expect("complete"));
    }
    // Every completion subscriber gets every completion while the slow one has read nothing.
    for sub in &mut completion_subs {
        assert_exactly_once(&take_events(sub, N, WAIT).await, &ids, true);
    }
    let slow_stats = || async {
        let stats = t.stats().await.expect("stats");
        assert_eq!(stats.listeners.len(), 1, "one listener for every family");
        assert_eq!(stats.subscribers.len(), 50);
        stats.subscribers.into_iter().find(|s| s.id == slow_id).expect("slow stats")
    };
    wait_until(WAIT, "the slow lease subscriber to block", || async {
        let s = slow_stats().await;
        s.mode == FilterMode::Blocked && s.delivered == 16
    })
    .await;
    // One claim took them all: the order of its rows is the backend's.
    let acquired = lease_kinds(&take(&mut lease_subs[0], N, WAIT).await);
    let mut claimed: Vec<_> = acquired.iter().map(|(k, id)| (*k, *id)).collect();
    claimed.sort();
    let mut expected: Vec<_> = ids.iter().map(|id| ("acquired", *id)).collect();
    expected.sort();
    assert_eq!(claimed, expected);
    for sub in &mut lease_subs[1..] {
        assert_eq!(lease_kinds(&take(sub, N, WAIT).await), acquired);
    }
    for sub in &mut signal_subs {
        let got: Vec<_> = take(sub, N, WAIT).await.iter().map(|e| e.execution_id).collect();
        assert_eq!(got, ids);
    }
    assert_eq!(slow_stats().await.delivered, 16, "still blocked after everyone else read everything");
    // Now the slow one reads: every lease event, once, in order, caught up from the backend.
    assert_eq!(lease_kinds(&take(&mut slow, N, WAIT).await), acquired);
    no_more(&mut slow, QUIET).await;
    assert!(slow_stats().await.catch_up_reads > 1);
}

pub async fn instance_tags_are_unavailable(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    assert!(matches!(f.tree.subscribe(InstanceTags::tail()).await, Err(Error::Unavailable { .. })));
}

/// As the completion contract's trim test: a second tree keeps the newest 3 rows of every
/// family (on Valkey: of the one partition stream every event here is in, `MAXLEN 3`); a cursor of each family below them expires with an oldest cursor of that family,
/// which resumes.
pub async fn trimmed_family_cursors_expire_with_an_oldest_cursor_of_their_own_family(backend: BackendConfig) {
    let f = fixture(backend.clone(), |c| c).await;
    let mut leases = f.tree.subscribe(LeaseHistory::tail()).await.expect("leases");
    let mut signals = f.tree.subscribe(SignalDelivery::tail()).await.expect("signals");
    let ids = create(&*f.engine, None, 6).await;
    claim(&*f.engine, "w", 6).await;
    let mut lease_events = take(&mut leases, 6, WAIT).await;
    // Each event is read before the next commits: on Postgres each is a batch of its own.
    let mut signal_events = Vec::new();
    for id in &ids {
        f.engine.deliver_signal(id, &WaitpointId::new("wp"), &SignalId::new("s"), None, None).await.expect("signal");
        signal_events.extend(take(&mut signals, 1, WAIT).await);
    }
    for id in &ids {
        assert!(f.engine.renew_lease(id, "w").await.expect("renew"));
        lease_events.extend(take(&mut leases, 1, WAIT).await);
    }
    let retention = Retention::max_events(3).every(Duration::from_millis(50));
    let (_trimmer, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend.with_retention(retention)))
            .await
            .expect("spawn the trimming tree");
    let resume_leases = |c: &StreamCursor| f.tree.subscribe(LeaseHistory::from_cursor(c.clone()));
    wait_until(WAIT, "the trim job", || async {
        matches!(resume_leases(lease_events[7].cursor()).await, Err(Error::CursorExpired { .. }))
    })
    .await;
    let oldest = match resume_leases(lease_events[0].cursor()).await {
        Err(Error::CursorExpired { oldest: Some(oldest) }) => oldest,
        other => panic!("expected CursorExpired, got {:?}", other.map(|s| s.id())),
    };
    assert_eq!(oldest.as_bytes().get(1), Some(&LEASE_HISTORY_CURSOR_TAG), "{oldest}");
    let mut rest = resume_leases(&oldest).await.expect("resume at the oldest");
    assert_eq!(lease_kinds(&take(&mut rest, 3, WAIT).await), lease_kinds(&lease_events[9..]));
    let signal_oldest = match f.tree.subscribe(SignalDelivery::from_cursor(signal_events[0].cursor.clone())).await {
        Err(Error::CursorExpired { oldest: Some(oldest) }) => oldest,
        other => panic!("expected CursorExpired, got {:?}", other.map(|s| s.id())),
    };
    assert_eq!(signal_oldest.as_bytes().get(1), Some(&SIGNAL_DELIVERY_CURSOR_TAG), "{signal_oldest}");
    let mut none_left =
        f.tree.subscribe(SignalDelivery::from_cursor(signal_oldest)).await.expect("resume signals at the oldest");
    no_more(&mut none_left, QUIET).await;
}

/// Rows of each family that cannot be decoded are skipped and reported once, the listener never
/// dies, and the events around them arrive; a signal row of an effect this version does not
/// know arrives as `Other`. Between two claims, `write_rows` writes the backend's bad rows and
/// then one signal row of effect `throttled`; it returns how many rows are bad.
pub async fn malformed_rows_are_skipped_once<W, Fut>(backend: BackendConfig, write_rows: W)
where
    W: FnOnce() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let f = fixture(backend, |c| c).await;
    let mut leases = f.tree.subscribe(LeaseHistory::tail()).await.expect("l");
    let mut signals = f.tree.subscribe(SignalDelivery::tail()).await.expect("s");
    let mut completions = f.tree.subscribe(Completions::tail()).await.expect("c");
    let ids = create(&*f.engine, None, 2).await;
    let [before] = claim(&*f.engine, "w", 1).await[..] else { panic!("one claim") };
    let bad_rows = write_rows().await;
    let [after] = claim(&*f.engine, "w", 1).await[..] else { panic!("one claim") };
    f.engine.deliver_signal(&after, &WaitpointId::new("wp"), &SignalId::new("s"), None, None).await.expect("signal");
    assert!(f.engine.complete(&after).await.expect("complete"));

    assert_eq!(lease_kinds(&take(&mut leases, 2, WAIT).await), [("acquired", before), ("acquired", after)]);
    let got = take(&mut signals, 2, WAIT).await;
    assert_eq!(got[0].effect, SignalDeliveryEffect::Other("throttled".into()));
    assert_eq!((got[1].execution_id, &got[1].effect), (after, &SignalDeliveryEffect::Buffered));
    assert_exactly_once(&take_events(&mut completions, 1, WAIT).await, &[after], true);
    no_more(&mut leases, QUIET).await;
    no_more(&mut signals, QUIET).await;
    crate::support::assert_no_more(&mut completions, QUIET).await;
    let stats = f.tree.stats().await.expect("stats");
    assert_eq!(stats.listeners[0].rows_skipped, bad_rows, "each bad row is reported once");
    assert_eq!(stats.listeners[0].restarts, 0, "the listener never died");
    assert!(ids.contains(&before) && ids.contains(&after));
}

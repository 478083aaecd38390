//! Valkey's lease-history and signal-delivery entries beside the completions: malformed entries
//! of each family, and the plain pub/sub channel that keeps carrying completions only.

use ff_completions::valkey::FAMILY_CHANNEL;
use ff_completions::{Completions, LeaseHistory, SignalDelivery, SignalDeliveryEffect, SignalId, WaitpointId};

use super::*;
use crate::families::{claim, create, lease_kinds, no_more, take};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_of_each_family_are_skipped_once_and_the_events_around_them_arrive() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut leases = f.tree.subscribe(LeaseHistory::tail()).await.expect("l");
    let mut signals = f.tree.subscribe(SignalDelivery::tail()).await.expect("s");
    let mut completions = f.tree.subscribe(Completions::tail()).await.expect("c");
    // One flow: every entry below is in its partition's stream, in this order.
    let ids = create(&*f.engine, None, 2).await;
    let [before] = claim(&*f.engine, "w", 1).await[..] else { panic!("one claim") };
    let (id_text, partition_text) = (before.to_string(), before.partition().to_string());
    let (id, partition) = (id_text.as_str(), partition_text.as_str());
    let common = |family: &'static str, kind: &'static str| {
        vec!["family", family, "execution_id", id, "outcome", kind, "occurred_at_ms", "1", "partition", partition]
    };
    let bad: [Vec<&str>; 5] = [
        // An unknown lease kind, a lease entry without an execution, a signal without its id,
        // an unknown family, a family entry of another partition.
        [common("lease_history", "stolen"), vec!["lease_id", "l", "worker", "w"]].concat(),
        vec!["family", "lease_history", "outcome", "acquired", "occurred_at_ms", "1", "partition", partition],
        common("signal_delivery", "satisfied"),
        common("instance_tags", "attached"),
        [&common("lease_history", "renewed")[..8], &["partition", "300", "lease_id", "l"]].concat(),
    ];
    for fields in &bad {
        xadd(&server, "*", fields).await;
    }
    // An effect this version does not know is delivered as `Other`, not skipped.
    xadd(&server, "*", &[common("signal_delivery", "throttled"), vec!["signal_id", "sig-x"]].concat()).await;
    let [after] = claim(&*f.engine, "w", 1).await[..] else { panic!("one claim") };
    f.engine.deliver_signal(&after, &WaitpointId::new("wp"), &SignalId::new("s"), None, None).await.expect("signal");
    assert!(f.engine.complete(&after).await.expect("complete"));

    assert_eq!(lease_kinds(&take(&mut leases, 2, WAIT).await), [("acquired", before), ("acquired", after)]);
    let got = take(&mut signals, 2, WAIT).await;
    assert_eq!((got[0].execution_id, &got[0].effect), (before, &SignalDeliveryEffect::Other("throttled".into())));
    assert_eq!((got[1].execution_id, &got[1].effect), (after, &SignalDeliveryEffect::Buffered));
    assert_exactly_once(&take_events(&mut completions, 1, WAIT).await, &[after], true);
    // The entry without an execution id is in partition 0's stream, which nothing woke: the
    // safety tick reads it.
    wait_until(WAIT, "every bad entry read", || async {
        f.tree.stats().await.is_ok_and(|s| s.listeners[0].rows_skipped >= bad.len() as u64)
    })
    .await;
    no_more(&mut leases, QUIET).await;
    no_more(&mut signals, QUIET).await;
    assert_no_more(&mut completions, QUIET).await;
    let stats = f.tree.stats().await.expect("stats");
    assert_eq!(stats.listeners[0].rows_skipped, bad.len() as u64, "each bad entry is reported once");
    assert_eq!(stats.listeners[0].restarts, 0, "the listener never died");
    assert!(ids.contains(&before) && ids.contains(&after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_completion_channel_carries_completions_only_and_the_families_wake_on_their_own() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut raw = server.subscribe_raw(PUBSUB_CHANNEL).await;
    let mut family_raw = server.subscribe_raw(FAMILY_CHANNEL).await;
    let e = &*f.engine;
    let ids = create(e, None, 2).await;
    claim(e, "w", 2).await;
    assert!(e.renew_lease(&ids[0], "w").await.expect("renew"));
    assert!(e.revoke_lease(&ids[1], "operator").await.expect("revoke"));
    e.deliver_signal(&ids[0], &WaitpointId::new("wp"), &SignalId::new("s"), Some("k"), None).await.expect("signal");
    e.deliver_signal(&ids[0], &WaitpointId::new("wp"), &SignalId::new("t"), Some("k"), None).await.expect("signal");
    assert!(e.complete(&ids[0]).await.expect("complete"));
    claim(e, "w", 1).await;
    assert_eq!(e.expire_leases(TimestampMs(i64::MAX)).await.expect("sweep"), [ids[1]]);
    claim(e, "w", 1).await;
    assert!(e.complete(&ids[1]).await.expect("complete"));
    // Exactly the two completions, in order, with the payload plain subscribers always got:
    // the eight lease and signal events between and around them published nothing here.
    for id in &ids {
        let payload: serde_json::Value = serde_json::from_str(&raw.next_payload().await).expect("JSON payload");
        assert_eq!(payload["execution_id"], id.to_string());
        assert_eq!(payload["outcome"], "success");
        assert_eq!(payload.as_object().map(|o| o.len()), Some(3), "{payload}");
    }
    // The other families' wake-ups: the acquired pair, renewed, revoked, two signals,
    // acquired, expired, reclaimed, each naming its execution and family.
    let expected = [
        (ids[0], "lease_history"),
        (ids[1], "lease_history"),
        (ids[0], "lease_history"),
        (ids[1], "lease_history"),
        (ids[0], "signal_delivery"),
        (ids[0], "signal_delivery"),
        (ids[1], "lease_history"),
        (ids[1], "lease_history"),
        (ids[1], "lease_history"),
    ];
    let mut woke = Vec::new();
    for _ in 0..expected.len() {
        let payload: serde_json::Value = serde_json::from_str(&family_raw.next_payload().await).expect("JSON");
        let id = ExecutionId::parse(payload["execution_id"].as_str().expect("execution_id")).expect("id");
        woke.push((id, payload["family"].as_str().expect("family").to_owned()));
    }
    let mut want: Vec<_> = expected.iter().map(|(id, family)| (*id, (*family).to_owned())).collect();
    // The first claim takes both in the eligible index's order (creation time, then id).
    woke[..2].sort();
    want[..2].sort();
    assert_eq!(woke, want);
}

//! Valkey delivery: the plain pub/sub copy, many subscribers on one subscriber connection,
//! malformed and odd entries, extreme times, very large fields, the configured database.

use super::*;
use ff_completions::Completions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_also_reaches_a_plain_pubsub_subscriber_as_json() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut raw = server.subscribe_raw(PUBSUB_CHANNEL).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let flow = FlowId::new();
    f.engine.create_flow(&flow, None).await.expect("flow");
    let ids = running(&*f.engine, |_| ExecutionSpec::new(&flow), 4).await;
    let child = ExecutionSpec::new(&flow).with_parents(vec![ids[1]]);
    f.engine.create_execution(&child).await.expect("child");
    assert!(f.engine.complete(&ids[0]).await.expect("complete"));
    assert_eq!(f.engine.fail(&ids[1], true).await.expect("fail"), FailOutcome::TerminalFailed, "one attempt only");
    assert!(f.engine.cancel(&ids[2]).await.expect("cancel"));
    assert!(f.engine.expire(&ids[3]).await.expect("expire"));
    assert_eq!(f.engine.resolve_dependency(&ids[1], &child.id).await.expect("resolve"), DependencyResolution::Skipped);

    let events = take_events(&mut sub, 5, WAIT).await;
    let outcomes = ["success", "failed", "cancelled", "expired", "skipped"];
    for (event, outcome) in events.iter().zip(outcomes) {
        let payload: serde_json::Value = serde_json::from_str(&raw.next_payload().await).expect("JSON payload");
        assert_eq!(payload["execution_id"], event.execution_id.to_string());
        assert_eq!(payload["flow_id"], flow.to_string());
        assert_eq!(payload["outcome"], outcome);
        assert_eq!(event.outcome.as_wire(), outcome);
    }
    assert_exactly_once(&events, &[&ids[..], &[child.id]].concat(), true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_subscribers_share_one_subscriber_connection() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut subs = Vec::new();
    for _ in 0..20 {
        subs.push(f.tree.subscribe(Completions::tail()).await.expect("sub"));
    }
    let ids = complete_n(&*f.engine, 5).await;
    for sub in &mut subs {
        assert_exactly_once(&take_events(sub, 5, WAIT).await, &ids, true);
    }
    let list = server.client_list().await;
    let blocking = list.lines().filter(|l| l.contains(&format!("name={LISTENER_CLIENT_NAME} "))).count();
    assert_eq!(blocking, 1, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stream_entries_are_skipped_once_and_the_events_around_them_arrive() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let before = complete_n(&*f.engine, 2).await;
    let id = ExecutionId::new_in(&FlowId::new()).to_string();
    let partition = id.trim_start_matches("{fp:").split('}').next().expect("partition").to_owned();
    let bad: [Vec<&str>; 6] = [
        vec!["garbage", "1"],
        vec!["execution_id", "not-an-id", "outcome", "success", "occurred_at_ms", "1", "partition", "1"],
        vec!["execution_id", &id, "outcome", "success", "occurred_at_ms", "later", "partition", &partition],
        vec!["execution_id", &id, "occurred_at_ms", "1", "partition", &partition],
        vec!["execution_id", &id, "outcome", "success", "occurred_at_ms", "1", "partition", "300"],
        vec!["execution_id", &id, "outcome", "success", "occurred_at_ms", "1", "partition", &partition, "tags", "[]"],
    ];
    for fields in &bad {
        xadd(&server, "*", fields).await;
    }
    let after = complete_n(&*f.engine, 2).await;
    assert_exactly_once_per_partition(&take_events(&mut sub, 4, WAIT).await, &[before, after].concat());
    // Entries written without a PUBLISH wake nobody: the safety tick reads them.
    wait_until(WAIT, "every bad entry read", || async {
        f.tree.stats().await.is_ok_and(|s| s.listeners[0].rows_skipped >= bad.len() as u64)
    })
    .await;
    assert_no_more(&mut sub, QUIET).await;
    let stats = f.tree.stats().await.expect("stats");
    assert_eq!(stats.listeners[0].rows_skipped, bad.len() as u64, "each bad entry is reported once");
    assert_eq!(stats.listeners[0].restarts, 0, "the listener never died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcome_strings_arrive_as_other() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let id = ExecutionId::new_in(&FlowId::new());
    let (text, partition) = (id.to_string(), id.partition().to_string());
    let fields = ["execution_id", &text, "outcome", "timed_out", "occurred_at_ms", "7", "partition", &partition];
    xadd(&server, "*", &fields).await;
    let events = take_events(&mut sub, 1, WAIT).await;
    assert_eq!((events[0].execution_id, events[0].outcome.clone()), (id, CompletionOutcome::Other("timed_out".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_database_holds_the_stream() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(BackendConfig::valkey_with(server.connection().with_database(3)), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let ids = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &ids, true);
    assert_eq!(stream_len(&server).await, 0, "database 0 holds nothing");
    let in_db3: Value = server
        .admin_in(3)
        .await
        .cmd("XRANGE")
        .arg(stream_key(ids[0].partition()))
        .arg("-")
        .arg("+")
        .execute()
        .await
        .expect("XRANGE");
    assert_eq!(completion_entries(in_db3).len(), 2);
}

/// No listener or filter of the tree was ever restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_with_the_earliest_and_latest_commit_times_are_delivered_without_any_restart() {
    init_tracing();
    let server = ValkeyServer::start().await;
    // A subscriber that reads nothing until the end fills its buffer of 2 and falls behind at
    // one of the earliest entries: its lag is then measured from that entry's commit time.
    let f = fixture(server.config(), |c| c.with_subscriber_buffer(2)).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let before = complete_n(&*f.engine, 2).await;
    let mut odd = Vec::new();
    for at in contract::EXTREME_TIMES {
        let id = ExecutionId::new_in(&FlowId::new());
        let fields = entry_fields(&id, &at.to_string());
        xadd(&server, "*", &fields.iter().map(String::as_str).collect::<Vec<_>>()).await;
        odd.push(id);
    }
    let after = complete_n(&*f.engine, 2).await;
    contract::assert_extreme_times_arrive(&f.tree, &mut sub, [before, odd, after], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabyte_stream_fields_are_delivered_whole_or_skipped_and_the_events_around_them_arrive() {
    const MIB: usize = 1 << 20;
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut all = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let huge_ns = "n".repeat(MIB);
    let filter = ScannerFilter::new().with_namespace(Namespace::new(huge_ns.clone()));
    let mut only_huge_ns = f.tree.subscribe(Completions::tail().with_filter(filter)).await.expect("sub");
    let before = complete_n(&*f.engine, 2).await;
    let huge_tags = serde_json::json!({ "big": "t".repeat(MIB) }).to_string();
    let (huge_outcome, huge_name, huge_junk) = ("o".repeat(MIB), "f".repeat(MIB), "9".repeat(MIB));
    let mut delivered = Vec::new();
    let extras = [
        ["namespace", huge_ns.as_str()],
        ["tags", huge_tags.as_str()],
        ["outcome", huge_outcome.as_str()],
        [huge_name.as_str(), "x"],
    ];
    for extra in extras {
        let id = ExecutionId::new_in(&FlowId::new());
        let mut fields = entry_fields(&id, "1");
        fields.extend(extra.map(str::to_owned));
        xadd(&server, "*", &fields.iter().map(String::as_str).collect::<Vec<_>>()).await;
        delivered.push(id);
    }
    // Bad in a huge way: skipped, each with a reason.
    let id = ExecutionId::new_in(&FlowId::new());
    let partition = id.partition().to_string();
    xadd(&server, "*", &["execution_id", &huge_junk, "outcome", "success", "occurred_at_ms", "1", "partition", "1"])
        .await;
    let id_text = id.to_string();
    xadd(
        &server,
        "*",
        &["execution_id", &id_text, "outcome", "success", "occurred_at_ms", &huge_junk, "partition", &partition],
    )
    .await;
    let after = complete_n(&*f.engine, 2).await;

    let events = take_events(&mut all, 8, WAIT).await;
    assert_exactly_once_per_partition(&events, &[before, delivered.clone(), after].concat());
    let of = |i: usize| events.iter().find(|e| e.execution_id == delivered[i]).expect("delivered");
    assert_eq!(of(0).namespace.as_ref().map(|n| n.as_str().len()), Some(MIB));
    assert_eq!(of(1).tags.get("big").map(String::len), Some(MIB));
    assert_eq!(of(2).outcome, CompletionOutcome::Other(huge_outcome));
    assert_exactly_once(&take_events(&mut only_huge_ns, 1, WAIT).await, &delivered[..1], true);
    assert_no_more(&mut all, QUIET).await;
    assert_no_more(&mut only_huge_ns, QUIET).await;
    let stats = f.tree.stats().await.expect("stats");
    assert_eq!(stats.listeners[0].rows_skipped, 2, "each huge bad entry is skipped once");
    assert_nothing_restarted(&stats);
}

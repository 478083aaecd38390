//! Durable groups on Valkey beyond the store contract every backend keeps: the library's group
//! functions after a restart without persistence, their argument checks, and a group whose
//! name holds braces on the cluster (its keys still share one slot).

use ff_completions::__store::{Ack, Position, Sharing, Store};
use ff_completions::Error;
use ff_completions::valkey::group_keys;

use super::*;
use crate::support::valkey::ValkeyCluster;

const TTL: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_heartbeat_after_a_restart_without_persistence_reloads_the_library_and_recreates_the_group() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let store = Store::open(&impatient(server.config())).await.expect("store");
    let first = store.heartbeat("restarted", "a", TTL, Sharing::Shared, true).await.expect("heartbeat");
    let acked = Position { lane: 0, major: 0, hi: 42, lo: 1, minor: 0, check: 0 };
    store.ack("restarted", "a", &[Ack { partition: 7, token: first[7].token, position: acked }]).await.expect("ack");
    server.kill9_and_restart().await;
    let libraries = |v: Value| format!("{v:?}").contains("ff_completions");
    assert!(!libraries(server.command(&["FUNCTION", "LIST"]).await), "a fresh server has no functions");
    // The same client: once reconnected, its FCALL finds no function, reloads and calls again;
    // the group is gone with the data and the heartbeat creates it afresh.
    let deadline = Instant::now() + WAIT;
    let leases = loop {
        match store.heartbeat("restarted", "a", TTL, Sharing::Shared, true).await {
            Ok(leases) => break leases,
            Err(e) => assert!(Instant::now() < deadline, "no heartbeat after the restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(libraries(server.command(&["FUNCTION", "LIST"]).await));
    assert_eq!(leases.len(), 256);
    assert!(leases.iter().all(|l| l.token == 1), "a new group: every token 1");
    assert_eq!(leases[7].acked, Position::default(), "the acknowledged position went with the data");
    let view = store.view("restarted").await.expect("view").expect("recreated");
    assert_eq!(view.members.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(), ["a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_functions_refuse_bad_arguments_before_writing_anything() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let store = Store::open(&server.config()).await.expect("store");
    let admin = server.admin().await;
    let keys = group_keys("raw").to_vec();
    let starts: Vec<String> = (0..256).map(|_| "0-0".to_owned()).collect();
    let beat = |member: &str, ttl: &str, sharing: &str, rejoin: &str, last_start: &str| {
        let mut args: Vec<String> = [member, ttl, sharing, rejoin].map(str::to_owned).into();
        args.extend(starts[..255].iter().cloned());
        args.push(last_start.to_owned());
        args
    };
    let above_exact = format!("0-{}", (1u64 << 53) + 1);
    let calls: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        ("ff_group_heartbeat", keys[..4].to_vec(), beat("a", "1000", "shared", "0", "0-0")),
        ("ff_group_heartbeat", keys.clone(), beat("", "1000", "shared", "0", "0-0")),
        ("ff_group_heartbeat", keys.clone(), beat("a\0", "1000", "shared", "0", "0-0")),
        ("ff_group_heartbeat", keys.clone(), beat("a", "0", "shared", "0", "0-0")),
        ("ff_group_heartbeat", keys.clone(), beat("a", "1000", "both", "0", "0-0")),
        ("ff_group_heartbeat", keys.clone(), beat("a", "1000", "shared", "yes", "0-0")),
        ("ff_group_heartbeat", keys.clone(), beat("a", "1000", "shared", "0", "1.5-0")),
        ("ff_group_heartbeat", keys.clone(), beat("a", "1000", "shared", "0", &above_exact)),
        ("ff_group_heartbeat", keys.clone(), beat("a", "1000", "shared", "0", "0-0")[..200].to_vec()),
        ("ff_group_ack", keys.clone(), ["a", "256", "1", "1-1"].map(str::to_owned).into()),
        ("ff_group_ack", keys.clone(), ["a", "0", "-1", "1-1"].map(str::to_owned).into()),
        ("ff_group_ack", keys.clone(), ["a", "0", "1", "1-"].map(str::to_owned).into()),
        ("ff_group_ack", keys.clone(), ["a", "0", "1"].map(str::to_owned).into()),
        ("ff_group_ack", keys.clone(), ["a", "0", "1", "1-1"].map(str::to_owned).into()),
        ("ff_group_leave", keys.clone(), vec![String::new()]),
    ];
    for (function, keys, args) in calls {
        let err = admin.fcall::<Value>(function, &keys, &args).await.expect_err("bad arguments");
        assert!(err.to_string().contains("ff_completions invalid:"), "{function}: {err}");
    }
    assert_eq!(server.command(&["KEYS", "ff:group:*"]).await, Value::Array(Vec::new()), "nothing was written");
    // Through the store: bad names, a position the library cannot compare exactly.
    let far = Position { lane: 0, major: 0, hi: (1 << 53) + 1, lo: 0, minor: 0, check: 0 };
    let leases = store.heartbeat("raw", "a", TTL, Sharing::Shared, true).await.expect("heartbeat");
    let ack = Ack { partition: 0, token: leases[0].token, position: far };
    assert!(matches!(store.ack("raw", "a", &[ack]).await, Err(Error::Validation { .. })));
    let view = store.view("raw").await.expect("view").expect("exists");
    assert_eq!(view.partitions[0].acked, Position::default(), "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_name_holds_braces_keeps_all_its_keys_in_one_slot_of_the_cluster() {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    let store = Store::open(&cluster.config()).await.expect("store");
    for name in ["}{", "{orders}", "a}b{c", "}", "{}"] {
        let keys = group_keys(name);
        let slot = cluster.slot_of(&keys[0]).await;
        for key in &keys {
            assert_eq!(cluster.slot_of(key).await, slot, "{name:?}: {key}");
        }
        let a = store.heartbeat(name, "a", TTL, Sharing::Shared, true).await.expect("heartbeat a");
        store.heartbeat(name, "b", TTL, Sharing::Shared, true).await.expect("heartbeat b");
        let a = store.heartbeat(name, "a", TTL, Sharing::Shared, false).await.map(|again| (a, again)).expect("again");
        assert_eq!((a.0.len(), a.1.len()), (256, 128), "{name:?}");
        let position = Position { lane: 0, major: 0, hi: 9, lo: 3, minor: 0, check: 0 };
        store.ack(name, "a", &[Ack { partition: 1, token: a.1[1].token, position }]).await.expect("ack");
        let view = store.view(name).await.expect("view").expect("exists");
        assert_eq!(view.partitions[1].acked, position, "{name:?}");
        assert_eq!(view.members.len(), 2, "{name:?}");
        // Every key of the group lives on the primary that owns the slot (those of
        // unacknowledged counts, refusals and parked events once there are some).
        let owner = cluster.owner_of(&keys[0]).await;
        let later = [":pending", ":retry", ":parked"];
        for key in keys.iter().filter(|k| !later.iter().any(|part| k.ends_with(part))) {
            assert_eq!(owner.command(&["EXISTS", key]).await, Value::Int(1), "{name:?}: {key}");
        }
    }
}

/// One command through a client of `backend` (routed by its key on a cluster).
async fn run(backend: &BackendConfig, args: &[&str]) -> Value {
    let client = ff_completions::valkey::connect_client(backend, "ff-completions-test").await.expect("client");
    let mut cmd = client.cmd(args[0]);
    for arg in &args[1..] {
        cmd = cmd.arg(*arg);
    }
    cmd.execute().await.unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// A deployment upgraded from the single stream of library versions 1 and 2, whose old stream
/// was trimmed (here trimmed empty): a durable subscription reads its partitions from their
/// streams and never the old one (its group starts after it), rather than ending expired.
async fn a_durable_subscription_reads_its_partitions_when_the_old_single_stream_was_trimmed(backend: BackendConfig) {
    let old = ExecutionId::new_in(&ff_completions::FlowId::new());
    let fields = super::entry_fields(&old, &TimestampMs::now().0.to_string());
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    run(&backend, &[&["XADD", LEGACY_STREAM_KEY, "*"][..], &fields].concat()).await;
    run(&backend, &["XTRIM", LEGACY_STREAM_KEY, "MAXLEN", "0"]).await;
    let f = fixture(backend, |c| c).await;
    let name = format!("upgraded-{}", uuid::Uuid::new_v4().simple());
    let mut sub = f.tree.subscribe(ff_completions::DurableRequest::exclusive(&name)).await.expect("subscribe");
    wait_until(WAIT, "the subscription holds every partition", || async { sub.partitions().len() == 256 }).await;
    let ids = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &ids, true);
    assert_no_more(&mut sub, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_reads_its_partitions_when_the_old_single_stream_was_trimmed_on_one_node() {
    init_tracing();
    let server = ValkeyServer::start().await;
    a_durable_subscription_reads_its_partitions_when_the_old_single_stream_was_trimmed(server.config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_reads_its_partitions_when_the_old_single_stream_was_trimmed_on_the_cluster() {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    a_durable_subscription_reads_its_partitions_when_the_old_single_stream_was_trimmed(cluster.config()).await;
}

/// Entries a producer wrote without announcing them (more than a waker reads at once) are read
/// by the listener itself (here the catch-up of a restarted listener, whose waker opened at the
/// position before them); the next announced completion of that partition is delivered on its
/// wake-up, not after old entries read again nor at the next safety tick (an hour away here).
async fn after_a_full_read_a_wake_up_reads_on_from_the_listeners_position(backend: BackendConfig) {
    let f = fixture(backend.clone(), |c| c.with_tick(Duration::from_secs(3600))).await;
    let mut sub = f.tree.subscribe(ff_completions::Completions::tail()).await.expect("subscribe");
    let first = complete_n(&*f.engine, 1).await;
    assert_exactly_once(&take_events(&mut sub, 1, WAIT).await, &first, true);
    let partition = first[0].partition();
    let key = stream_key(partition);
    let quiet: Vec<ExecutionId> = (0..600).map(|_| ExecutionId::new_in(&flow_in(partition))).collect();
    for id in &quiet {
        let fields = super::entry_fields(id, &TimestampMs::now().0.to_string());
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        run(&backend, &[&["XADD", key.as_str(), "*"][..], &fields].concat()).await;
    }
    f.tree.listener_cell("valkey").await.expect("a running listener").kill();
    assert_exactly_once(&take_events(&mut sub, quiet.len(), WAIT).await, &quiet, true);
    // One more, announced as a producer announces it: one wake-up (the demo engine's own calls
    // would announce more, lease entries of the claim among them).
    let last = ExecutionId::new_in(&flow_in(partition));
    let fields = super::entry_fields(&last, &TimestampMs::now().0.to_string());
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    run(&backend, &[&["XADD", key.as_str(), "*"][..], &fields].concat()).await;
    let message = format!(r#"{{"execution_id":"{last}","flow_id":null,"outcome":"success"}}"#);
    run(&backend, &["PUBLISH", PUBSUB_CHANNEL, &message]).await;
    assert_exactly_once(&take_events(&mut sub, 1, WAIT).await, &[last], true);
}

/// A fresh flow in `partition`.
fn flow_in(partition: u16) -> ff_completions::FlowId {
    loop {
        let flow = ff_completions::FlowId::new();
        if ExecutionId::new_in(&flow).partition() == partition {
            return flow;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_full_read_a_wake_up_reads_on_from_the_listeners_position_on_one_node() {
    init_tracing();
    let server = ValkeyServer::start().await;
    after_a_full_read_a_wake_up_reads_on_from_the_listeners_position(server.config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_full_read_a_wake_up_reads_on_from_the_listeners_position_on_the_cluster() {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    after_a_full_read_a_wake_up_reads_on_from_the_listeners_position(cluster.config()).await;
}

/// Retention by age empties no stream (each keeps its newest entry older than the cutoff): a
/// durable group created after everything older than a millisecond was trimmed starts at each
/// stream's newest entry,
/// and completions written then are delivered, rather than their partitions stalled as if the
/// entries before them had been lost (a stream keeps no record of what was trimmed: a reader
/// at the last id of an emptied stream reads as expired once a newer entry comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_keeps_each_streams_newest_entry_so_a_group_started_after_it_reads_on() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let store = ff_completions::__store::Store::open(&server.config()).await.expect("store");
    let first = complete_n(&*f.engine, 5).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.trim(&ff_completions::Retention::max_age(Duration::from_millis(1))).await.expect("trim");
    let name = format!("aged-{}", uuid::Uuid::new_v4().simple());
    let mut sub = f.tree.subscribe(ff_completions::DurableRequest::exclusive(&name)).await.expect("subscribe");
    wait_until(WAIT, "the subscription holds every partition", || async { sub.partitions().len() == 256 }).await;
    // In the partitions of the first ones, whose streams were trimmed.
    let mut ids = Vec::new();
    for partition in first.iter().map(ExecutionId::partition).collect::<std::collections::BTreeSet<_>>() {
        let flow = flow_in(partition);
        f.engine.create_flow(&flow, None).await.expect("flow");
        let spec = ff_completions_lab::ExecutionSpec::new(&flow);
        f.engine.create_execution(&spec).await.expect("create");
        assert_eq!(f.engine.claim("test-worker", 1).await.expect("claim"), [spec.id]);
        assert!(f.engine.complete(&spec.id).await.expect("complete"));
        ids.push(spec.id);
    }
    assert_exactly_once(&take_events(&mut sub, ids.len(), WAIT).await, &ids, true);
    assert_no_more(&mut sub, QUIET).await;
}

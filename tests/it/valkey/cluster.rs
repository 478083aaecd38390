//! Valkey Cluster: three primaries the harness starts and joins itself; the same layout, library
//! and listener as on one node, through ferriskey's cluster client.

use super::*;
use crate::support::valkey::ValkeyCluster;
use ff_completions::Completions;

async fn contract_backend() -> (ValkeyCluster, BackendConfig) {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    let config = cluster.config();
    (cluster, config)
}

contract::contract_tests!(
    foreign cursors: vec![encode_postgres_cursor(1, 2), encode_postgres_event_cursor(3), encode_sqlite_cursor(4)]
);

crate::families::family_tests!();
crate::tail_await::tail_await_tests!();

crate::groups::group_store_tests!();
crate::durable::durable_tests!();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_land_in_their_flow_s_slot_on_its_primary_and_arrive_in_order_per_partition() {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    let f = fixture(cluster.config(), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let mut raw = cluster.nodes[2].subscribe_raw(PUBSUB_CHANNEL).await;
    let ids = interleaved(&*f.engine, 9, 4).await;
    assert_exactly_once_per_partition(&take_events(&mut sub, ids.len(), WAIT).await, &ids);
    let mut owners = std::collections::HashSet::new();
    for id in &ids {
        let key = stream_key(id.partition());
        let owner = cluster.owner_of(&key).await;
        owners.insert(owner.port);
        let same = ids.iter().filter(|other| other.partition() == id.partition()).count() as i64;
        assert_eq!(completions_in(owner, &key).await as i64, same, "{key} on its primary");
    }
    assert!(owners.len() >= 2, "nine flows spread over the primaries");
    // The raw channel reaches a plain subscriber on any node, whichever primary published.
    for id in &ids {
        let payload: serde_json::Value = serde_json::from_str(&raw.next_payload().await).expect("JSON payload");
        let named = payload["execution_id"].as_str().expect("execution_id");
        assert!(ids.iter().any(|i| i.to_string() == named), "{payload}");
        assert_eq!(payload["outcome"], "success", "{id}");
    }
    assert_nothing_restarted(&f.tree.stats().await.expect("stats"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscriber_connection_serves_the_whole_cluster() {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    let f = fixture(cluster.config(), |c| c).await;
    let mut subs = Vec::new();
    for _ in 0..8 {
        subs.push(f.tree.subscribe(Completions::tail()).await.expect("sub"));
    }
    let ids = interleaved(&*f.engine, 6, 2).await;
    for sub in &mut subs {
        assert_exactly_once_per_partition(&take_events(sub, ids.len(), WAIT).await, &ids);
    }
    // ferriskey's cluster client keeps one connection to each primary; one of them carries the
    // subscription (a PUBLISH reaches every node of a cluster): it routes SUBSCRIBE by channel
    // slot, and the family channel's hash tag gives it the completion channel's.
    let (mut per_node, mut subscribed) = (Vec::new(), 0);
    for node in &cluster.nodes {
        let list = node.client_list().await;
        let ours: Vec<&str> = list.lines().filter(|l| l.contains(&format!("name={LISTENER_CLIENT_NAME} "))).collect();
        per_node.push(ours.len());
        // Both channels (completions, the other families' wake-ups) on that one connection.
        subscribed += ours.iter().filter(|l| l.split_whitespace().any(|kv| kv == "sub=2")).count();
    }
    assert!(per_node.iter().all(|n| *n <= 1), "at most one wake-up connection per primary: {per_node:?}");
    assert_eq!(subscribed, 1, "one subscription for the whole cluster");
}

/// Every execution id in every partition stream of the cluster, partition by partition, each
/// in its stream's order: what producers committed.
async fn cluster_streams(cluster: &ValkeyCluster) -> Vec<ExecutionId> {
    let admin = cluster.admin().await;
    let mut all = Vec::new();
    for p in 0..256u16 {
        let reply: Value = admin.cmd("XRANGE").arg(stream_key(p)).arg("-").arg("+").execute().await.expect("XRANGE");
        all.extend(completion_entries(reply).into_iter().map(|(_, id)| id));
    }
    all
}

/// Producers that complete executions of fresh flows until told to stop, and the count of the
/// completions the engine acknowledged; a call that failed (its primary was down or moving) may
/// or may not have written, and is left out of nothing: the streams are the ledger.
fn producers(
    engine: &Arc<dyn Engine>,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> (Vec<tokio::task::JoinHandle<()>>, Arc<AtomicUsize>) {
    let committed = Arc::new(AtomicUsize::new(0));
    let workers = (0..n)
        .map(|_| {
            let (engine, stop, committed) = (engine.clone(), stop.clone(), committed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let flow = FlowId::new();
                    if engine.create_flow(&flow, None).await.is_err() {
                        continue;
                    }
                    for _ in 0..5 {
                        let spec = ExecutionSpec::new(&flow);
                        if engine.create_execution(&spec).await.is_err() {
                            continue;
                        }
                        if let Ok(claimed) = engine.claim("producer", 5).await {
                            for id in claimed {
                                if let Ok(true) = engine.complete(&id).await {
                                    committed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    (workers, committed)
}

/// Waits until every subscriber received what the streams hold, then checks each one got it
/// exactly once, in order per partition.
async fn assert_everything_delivered(
    cluster: &ValkeyCluster,
    subs: &mut [ff_completions::Subscription],
) -> Vec<ExecutionId> {
    let expected = cluster_streams(cluster).await;
    for sub in subs.iter_mut() {
        assert_exactly_once_per_partition(&take_events(sub, expected.len(), WAIT).await, &expected);
        assert_no_more(sub, QUIET).await;
    }
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kills_on_each_primary_and_listener_kills_lose_nothing_under_concurrent_producers() {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    let f = fixture(impatient(cluster.config()), |c| c).await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(f.tree.subscribe(Completions::tail()).await.expect("sub"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (workers, committed) = producers(&f.engine, 3, &stop);
    let (mut kills, mut client_kills) = (0, 0);
    for round in 0..6 {
        until_delivery_moves_on(&f, &committed, "delivery to move on").await;
        if round % 2 == 0 {
            // Each primary in turn loses every connection of the tree.
            let node = &cluster.nodes[(round / 2) % cluster.nodes.len()];
            client_kills += node.kill_clients_named("ff-completions-reader").await;
            client_kills += node.kill_clients_named(LISTENER_CLIENT_NAME).await;
        } else {
            f.tree.listener_cell("valkey").await.expect("listener").kill();
            kills += 1;
        }
    }
    until_delivery_moves_on(&f, &committed, "delivery after the last fault").await;
    stop.store(true, Ordering::Relaxed);
    for p in workers {
        p.await.expect("producer");
    }
    let expected = assert_everything_delivered(&cluster, &mut subs).await;
    assert!(expected.len() >= 100, "producers committed {}", expected.len());
    assert!(kills == 3 && client_kills >= 3, "faults: {kills} kills, {client_kills} CLIENT KILLs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_sigkilled_and_restarted_from_its_append_only_file_loses_nothing() {
    init_tracing();
    let cluster = ValkeyCluster::start_persistent(3).await;
    let f = fixture(impatient(cluster.config()), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let before = interleaved(&*f.engine, 9, 3).await;
    let cursor = take_events(&mut sub, before.len(), WAIT).await.pop().expect("events").cursor;
    // Kill the primary of the first flow's partition, and bring it back on its data dir.
    let victim = cluster.owner_of(&stream_key(before[0].partition())).await;
    victim.kill9_and_restart().await;
    cluster.wait_until_ok().await;
    let after = interleaved(&*f.engine, 9, 3).await;
    let all = [&before[..], &after[..]].concat();
    assert_eq!(cluster_streams(&cluster).await.len(), all.len(), "the append-only files kept every completion");
    assert_exactly_once_per_partition(&take_events(&mut sub, after.len(), WAIT).await, &after);
    assert_no_more(&mut sub, QUIET).await;
    let mut resumed = f.tree.subscribe(Completions::from_cursor(cursor)).await.expect("resume");
    assert_exactly_once_per_partition(&take_events(&mut resumed, after.len(), WAIT).await, &after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_to_another_primary_under_producers_loses_nothing_and_cursors_resume_across_it() {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    let f = fixture(impatient(cluster.config()), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    // A partition with history, on node 0, moves to node 1 while producers write everywhere.
    let flow = FlowId::new();
    f.engine.create_flow(&flow, None).await.expect("flow");
    let key = stream_key(flow.partition());
    let slot = cluster.slot_of(&key).await;
    let from = (0..3).find(|i| cluster.owner_at_start(slot).port == cluster.nodes[*i].port).expect("owner");
    let history = running(&*f.engine, |_| ExecutionSpec::new(&flow), 6).await;
    for id in &history[..3] {
        assert!(f.engine.complete(id).await.expect("complete"));
    }
    let early = take_events(&mut sub, 3, WAIT).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (workers, _) = producers(&f.engine, 2, &stop);
    let moved = cluster.migrate_slot(slot, from, (from + 1) % 3).await;
    assert!(moved >= 3, "the partition's keys moved ({moved})");
    for id in &history[3..] {
        assert!(f.engine.complete(id).await.expect("complete after the move"));
    }
    stop.store(true, Ordering::Relaxed);
    for p in workers {
        p.await.expect("producer");
    }
    let target = &cluster.nodes[(from + 1) % 3];
    assert_eq!(completions_in(target, &key).await, 6, "the stream lives on its new primary");
    let expected = cluster_streams(&cluster).await;
    let received = take_events(&mut sub, expected.len() - 3, WAIT).await;
    let all: Vec<ff_completions::CompletionEvent> = early.iter().cloned().chain(received).collect();
    assert_exactly_once_per_partition(&all, &expected);
    assert_no_more(&mut sub, QUIET).await;
    // A cursor from before the move resumes on the new primary.
    let mut resumed = f.tree.subscribe(Completions::from_cursor(early[0].cursor.clone())).await.expect("resume");
    let rest: Vec<ExecutionId> = all[1..].iter().map(|e| e.execution_id).collect();
    assert_exactly_once_per_partition(&take_events(&mut resumed, rest.len(), WAIT).await, &rest);
}

/// A producer that records each completion the engine acknowledged.
fn acknowledging_producer(engine: Arc<dyn Engine>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<ExecutionId>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let flow = FlowId::new();
            if engine.create_flow(&flow, None).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let spec = ExecutionSpec::new(&flow);
            if engine.create_execution(&spec).await.is_err() {
                continue;
            }
            for id in engine.claim("producer", 4).await.unwrap_or_default() {
                if let Ok(true) = engine.complete(&id).await {
                    acked.push(id);
                }
            }
        }
        acked
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_followed_and_producers_that_wait_for_a_replica_lose_nothing() {
    init_tracing();
    let mut cluster = ValkeyCluster::start_with_replicas(3).await;
    // Seeded with a primary that stays up: a client made after the failover must find the cluster.
    let f = fixture(impatient(cluster.config_via(1)), |c| c).await;
    let waiting = BackendConfig::valkey_with(cluster.nodes[1].connection().with_cluster(true).with_wait_replicas(1));
    let durable: Arc<dyn Engine> = Arc::new(ValkeyEngine::connect(&impatient(waiting)).await.expect("engine"));
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let stop = Arc::new(AtomicBool::new(false));
    let fast = [
        acknowledging_producer(f.engine.clone(), stop.clone()),
        acknowledging_producer(f.engine.clone(), stop.clone()),
    ];
    let safe = [acknowledging_producer(durable.clone(), stop.clone()), acknowledging_producer(durable, stop.clone())];
    let seen = listener_events_read(&f).await;
    wait_until(WAIT, "delivery before the failover", || async { listener_events_read(&f).await > seen + 50 }).await;
    cluster.fail_over(0).await;
    let seen = listener_events_read(&f).await;
    wait_until(WAIT, "delivery after the failover", || async { listener_events_read(&f).await > seen + 50 }).await;
    stop.store(true, Ordering::Relaxed);
    let (mut fast_acked, mut safe_acked) = (Vec::new(), Vec::new());
    for p in fast {
        fast_acked.extend(p.await.expect("producer"));
    }
    for p in safe {
        safe_acked.extend(p.await.expect("producer"));
    }
    let kept = cluster_streams(&cluster).await;
    let in_streams: std::collections::HashSet<_> = kept.iter().copied().collect();
    let lost = |acked: &[ExecutionId]| acked.iter().filter(|id| !in_streams.contains(id)).count();
    assert_eq!(lost(&safe_acked), 0, "a completion acknowledged after WAIT 1 survives the failover");
    eprintln!(
        "failover: {} of {} completions acknowledged without WAIT were lost; 0 of {} with WAIT 1",
        lost(&fast_acked),
        fast_acked.len(),
        safe_acked.len()
    );
    // The subscriber gets every completion the new primaries hold, once, in order per partition;
    // it may also have received, before the failover, ones the replica never got.
    let mut received = Vec::new();
    while received.iter().filter(|e: &&ff_completions::CompletionEvent| in_streams.contains(&e.execution_id)).count()
        < kept.len()
    {
        received.extend(take_events(&mut sub, 1, WAIT).await);
    }
    let delivered: Vec<_> = received.iter().filter(|e| in_streams.contains(&e.execution_id)).cloned().collect();
    assert_exactly_once_per_partition(&delivered, &kept);
    let extra: Vec<_> = received.iter().filter(|e| !in_streams.contains(&e.execution_id)).collect();
    assert!(extra.iter().all(|e| !safe_acked.contains(&e.execution_id)), "nothing durable went missing");
    assert!(!safe_acked.is_empty() && fast_acked.len() >= 10, "{} / {}", safe_acked.len(), fast_acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_seeded_with_several_nodes_starts_while_the_first_is_down_and_delivers() {
    init_tracing();
    let cluster = ValkeyCluster::start_with_replicas(3).await;
    // The first seed node is a replica of the cluster, SIGKILLed before anything connects.
    let first = &cluster.replicas[0];
    first.kill9().await;
    let seeds = [("127.0.0.1", first.port), ("127.0.0.1", cluster.nodes[1].port)];
    let connection = cluster.nodes[1].connection().with_seed_nodes(seeds).expect("seed nodes");
    assert_eq!(connection.nodes().count(), 2);
    let f = fixture(BackendConfig::valkey_with(connection), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let ids = interleaved(&*f.engine, 6, 3).await;
    assert_exactly_once_per_partition(&take_events(&mut sub, ids.len(), WAIT).await, &ids);
    // A subscriber from the start reads every partition stream through the same clients.
    let mut replay = f.tree.subscribe(Completions::from_cursor(encode_valkey_frontier(&[]))).await.expect("replay");
    assert_exactly_once_per_partition(&take_events(&mut replay, ids.len(), WAIT).await, &ids);
    assert_nothing_restarted(&f.tree.stats().await.expect("stats"));
}

/// `FCALL`s each primary has run.
async fn fcalls(cluster: &ValkeyCluster) -> Vec<u64> {
    let mut calls = Vec::new();
    for node in &cluster.nodes {
        calls.push(command_calls(node, "fcall").await);
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_catching_up_reads_every_partition_with_a_few_calls_per_primary() {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    // No safety tick during the test: every read counted is the new subscriber's.
    let f = fixture(cluster.config(), |c| c.with_tick(Duration::from_secs(3600))).await;
    let ids = interleaved(&*f.engine, 9, 3).await;
    let before = fcalls(&cluster).await;
    let mut sub = f.tree.subscribe(Completions::from_cursor(encode_valkey_frontier(&[]))).await.expect("sub");
    assert_exactly_once_per_partition(&take_events(&mut sub, ids.len(), WAIT).await, &ids);
    let after = fcalls(&cluster).await;
    let spent: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    // Checking the cursor and reading everything after it look at all 257 streams, twice at
    // least; one call per primary each time, where one call per stream would be 514 or more.
    assert!(spent.iter().all(|n| (1..=8).contains(n)), "FCALLs per primary: {spent:?}");
    assert_nothing_restarted(&f.tree.stats().await.expect("stats"));
}

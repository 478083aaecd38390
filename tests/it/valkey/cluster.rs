//! Valkey Cluster: three primaries the harness starts and joins itself; the same layout, library
//! and listener as on one node, through ferriskey's cluster client.

use super::*;
use crate::support::valkey::ValkeyCluster;

async fn contract_backend() -> (ValkeyCluster, BackendConfig) {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    let config = cluster.config();
    (cluster, config)
}

contract::contract_tests!(
    foreign cursors: vec![encode_postgres_cursor(1, 2), encode_postgres_event_cursor(3), encode_sqlite_cursor(4)]
);

/// Completes `per_flow` executions of each of `flows` fresh flows, round robin.
async fn interleaved(engine: &dyn Engine, flows: usize, per_flow: usize) -> Vec<ExecutionId> {
    let mut by_flow = Vec::new();
    for _ in 0..flows {
        by_flow.push(running(engine, ExecutionSpec::new, per_flow).await);
    }
    let mut done = Vec::new();
    for i in 0..per_flow {
        for ids in &by_flow {
            assert!(engine.complete(&ids[i]).await.expect("complete"));
            done.push(ids[i]);
        }
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_land_in_their_flow_s_slot_on_its_primary_and_arrive_in_order_per_partition() {
    init_tracing();
    let cluster = ValkeyCluster::start(3).await;
    let f = fixture(cluster.config(), |c| c).await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let mut raw = cluster.nodes[2].subscribe_raw(PUBSUB_CHANNEL).await;
    let ids = interleaved(&*f.engine, 9, 4).await;
    assert_exactly_once_per_partition(&take_events(&mut sub, ids.len(), WAIT).await, &ids);
    let mut owners = std::collections::HashSet::new();
    for id in &ids {
        let key = stream_key(id.partition());
        let owner = cluster.owner_of(&key).await;
        owners.insert(owner.port);
        let same = ids.iter().filter(|other| other.partition() == id.partition()).count() as i64;
        assert_eq!(owner.command(&["XLEN", &key]).await, Value::Int(same), "{key} on its primary");
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
        subs.push(f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub"));
    }
    let ids = interleaved(&*f.engine, 6, 2).await;
    for sub in &mut subs {
        assert_exactly_once_per_partition(&take_events(sub, ids.len(), WAIT).await, &ids);
    }
    // ferriskey's cluster client keeps one connection to each primary; one of them carries the
    // subscription (a PUBLISH reaches every node of a cluster).
    let (mut per_node, mut subscribed) = (Vec::new(), 0);
    for node in &cluster.nodes {
        let list = node.client_list().await;
        let ours: Vec<&str> = list.lines().filter(|l| l.contains(&format!("name={LISTENER_CLIENT_NAME} "))).collect();
        per_node.push(ours.len());
        subscribed += ours.iter().filter(|l| l.split_whitespace().any(|kv| kv == "sub=1")).count();
    }
    assert!(per_node.iter().all(|n| *n <= 1), "at most one wake-up connection per primary: {per_node:?}");
    assert_eq!(subscribed, 1, "one subscription for the whole cluster");
}

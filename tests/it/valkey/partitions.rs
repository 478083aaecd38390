//! Valkey partitions: one completion stream per partition, order per partition, cursors that
//! name a position in every partition, and the single stream of earlier versions still read.

use super::*;
use ff_completions::Completions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_flows_arrive_in_order_per_partition_and_every_cursor_resumes_exactly_the_rest() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let ids = interleaved(&*f.engine, 6, 8).await;
    let events = take_events(&mut sub, ids.len(), WAIT).await;
    assert_exactly_once_per_partition(&events, &ids);
    for k in [0, 9, 30, ids.len() - 2] {
        let cursor = events[k].cursor.clone();
        assert!(cursor.as_bytes().len() <= 2 + 6 + 6 * 7, "{} bytes name 6 partitions", cursor.as_bytes().len());
        let mut resumed = f.tree.subscribe(Completions::from_cursor(cursor)).await.expect("resume");
        let rest: Vec<ExecutionId> = events[k + 1..].iter().map(|e| e.execution_id).collect();
        assert_exactly_once_per_partition(&take_events(&mut resumed, rest.len(), WAIT).await, &rest);
        assert_no_more(&mut resumed, QUIET).await;
    }
    let mut at_end = f.tree.subscribe(Completions::from_cursor(events[ids.len() - 1].cursor.clone())).await;
    let more = complete_n(&*f.engine, 3).await;
    let at_end = at_end.as_mut().expect("resume at the last event");
    assert_exactly_once(&take_events(at_end, 3, WAIT).await, &more, true);
    assert_no_more(at_end, QUIET).await;
    let stats = f.tree.stats().await.expect("stats");
    assert_nothing_restarted(&stats);
    assert_eq!(stats.listeners[0].reconnects, 0, "every wake-up named its partition: no full reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_has_its_own_stream_in_the_flow_s_slot() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let ids = interleaved(&*f.engine, 3, 2).await;
    for id in &ids {
        let key = stream_key(id.partition());
        assert!(key.contains(&id.hash_tag()), "{key} carries {}", id.hash_tag());
        let same = ids.iter().filter(|other| other.partition() == id.partition()).count();
        assert_eq!(completions_in(&server, &key).await, same, "{key}");
    }
    assert_eq!(server.command(&["EXISTS", LEGACY_STREAM_KEY]).await, Value::Int(0), "nothing writes the old stream");
}

/// `XADD`s a valid entry for a fresh execution to the single stream of earlier versions; returns
/// the execution and the entry's id.
async fn legacy_entry(server: &ValkeyServer) -> (ExecutionId, (u64, u64)) {
    let id = ExecutionId::new_in(&FlowId::new());
    let fields = entry_fields(&id, &TimestampMs::now().0.to_string());
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    let reply = server.command(&[&["XADD", LEGACY_STREAM_KEY, "*"][..], &fields].concat()).await;
    let Value::BulkString(entry) = reply else { panic!("XADD answered {reply:?}") };
    let entry = String::from_utf8_lossy(&entry).into_owned();
    let (ms, seq) = entry.split_once('-').expect("ms-seq");
    (id, (ms.parse().expect("ms"), seq.parse().expect("seq")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_stream_deployment_is_still_read_first_and_its_cursors_resume() {
    init_tracing();
    let server = ValkeyServer::start().await;
    // What a deployment of library version 2 left behind, and a cursor it handed out.
    let mut old = Vec::new();
    for _ in 0..4 {
        old.push(legacy_entry(&server).await);
    }
    let old_cursor = encode_valkey_cursor(old[0].1.0, old[0].1.1);
    let f = fixture(server.config(), |c| c).await;
    let mut tail = f.tree.subscribe(Completions::tail()).await.expect("tail");
    let mut resumed = f.tree.subscribe(Completions::from_cursor(old_cursor)).await.expect("an old cursor resumes");
    let new = complete_n(&*f.engine, 3).await;
    let old_rest: Vec<ExecutionId> = old[1..].iter().map(|(id, _)| *id).collect();
    let events = take_events(&mut resumed, old_rest.len() + new.len(), WAIT).await;
    assert_exactly_once(&events, &[&old_rest[..], &new[..]].concat(), true);
    assert_no_more(&mut resumed, QUIET).await;
    assert_exactly_once(&take_events(&mut tail, new.len(), WAIT).await, &new, true);
    assert_no_more(&mut tail, QUIET).await;

    // A cursor handed out now names the old stream too: resuming from one inside it still works.
    let mut again = f.tree.subscribe(Completions::from_cursor(events[0].cursor.clone())).await.expect("resume");
    let rest: Vec<ExecutionId> = events[1..].iter().map(|e| e.execution_id).collect();
    assert_exactly_once(&take_events(&mut again, rest.len(), WAIT).await, &rest, true);
    assert_eq!(&events[0].cursor.as_bytes()[..2], [0x01, 0x01], "the new form, Valkey family first");
}

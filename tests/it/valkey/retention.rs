//! Valkey retention: producers trim the stream (`MAXLEN ~`), trimming by age, and cursors
//! behind what was trimmed expire instead of skipping.

use super::*;
use ff_completions::{Completions, Error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_trim_the_stream_and_a_cursor_behind_it_expires_instead_of_skipping() {
    init_tracing();
    let server = ValkeyServer::start_with_small_stream_nodes().await;
    let config = BackendConfig::valkey_with(server.connection().with_stream_maxlen(10));
    let f = fixture(config, |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let first = complete_n(&*f.engine, 3).await;
    let early = take_events(&mut sub, 3, WAIT).await;
    assert_exactly_once(&early, &first, true);
    // A live reader could fall more than 10 entries behind on a busy machine and be expired
    // itself (rightly): this test is about the saved cursor, so nobody reads while producers trim.
    drop(sub);
    let rest = complete_n(&*f.engine, 60).await;
    // Entries of every family count: the claims' lease entries are in the same stream.
    let kept = stream_len(&server).await;
    assert!((10..30).contains(&kept), "MAXLEN ~ 10 keeps about 10 entries, kept {kept}");

    let oldest = match f.tree.subscribe(Completions::from_cursor(early[0].cursor.clone())).await {
        Err(Error::CursorExpired { oldest: Some(oldest) }) => oldest,
        other => panic!("expected CursorExpired, got {:?}", other.map(|s| s.id())),
    };
    let mut resumed = f.tree.subscribe(Completions::from_cursor(oldest)).await.expect("resume at the oldest");
    // Each partition's stream is trimmed on its own: `rest` is one flow's, one partition's.
    let retained: Vec<_> =
        stream_order(&server).await.into_iter().filter(|id| id.partition() == rest[0].partition()).collect();
    assert_eq!(retained[..], rest[rest.len() - retained.len()..], "trimming removes the oldest");
    // The oldest cursor moves only the trimmed partition: the first flow's partition resumes
    // after `early[0]`, as the saved cursor said.
    let want = [&first[1..], &retained[..]].concat();
    assert_exactly_once_per_partition(&take_events(&mut resumed, want.len(), WAIT).await, &want);
    assert_no_more(&mut resumed, QUIET).await;
}

/// A stream with entries added long ago (by their ids), new ones from the engine, and a tree
/// trimming it by age every 50 ms.
async fn aged_stream(
    server: &ValkeyServer,
    max_age: Duration,
    old_ms: &[u64],
) -> (Fixture, Vec<ExecutionId>, Vec<ExecutionId>) {
    let engine = connect_engine(&server.config()).await.expect("engine");
    let mut old = Vec::new();
    for ms in old_ms {
        let id = ExecutionId::new_in(&FlowId::new());
        old.push(id);
        let fields = entry_fields(&id, &ms.to_string());
        xadd_legacy(server, &format!("{ms}-0"), &fields.iter().map(String::as_str).collect::<Vec<_>>()).await;
    }
    let new = complete_n(&*engine, 3).await;
    let backend = server.config().with_retention(Retention::max_age(max_age).every(Duration::from_millis(50)));
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend)).await.expect("spawn");
    (Fixture { tree, engine }, old, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_trims_old_stream_entries_keeps_new_ones_and_expires_cursors_below_them() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let two_hours_ago = (TimestampMs::now().0 - 2 * 3_600_000) as u64;
    let (f, _, new) = aged_stream(&server, Duration::from_secs(3_600), &[1, 1_000, two_hours_ago]).await;
    wait_until(WAIT, "the trim job to remove the old entries", || async { completion_len(&server).await == 3 }).await;
    assert_eq!(stream_order(&server).await, new, "exactly the entries older than an hour are gone");

    // The old entries are in the single stream of earlier versions: cursors of that form below
    // its last entry lost entries; one at its last entry lost none (the rest is in partitions).
    for (ms, seq) in [(0, 0), (1, 0), (1_000, 0)] {
        match f.tree.subscribe(Completions::from_cursor(encode_valkey_cursor(ms, seq))).await {
            Err(Error::CursorExpired { oldest: Some(_) }) => {}
            other => panic!("cursor {ms}-{seq} is below the trimmed entries, got {:?}", other.map(|s| s.id())),
        }
    }
    let mut at_last = f
        .tree
        .subscribe(Completions::from_cursor(encode_valkey_cursor(two_hours_ago, 0)))
        .await
        .expect("nothing after the last old entry was lost");
    assert_exactly_once(&take_events(&mut at_last, new.len(), WAIT).await, &new, true);
    let oldest = match f.tree.subscribe(Completions::from_cursor(encode_valkey_cursor(1, 0))).await {
        Err(Error::CursorExpired { oldest: Some(oldest) }) => oldest,
        other => panic!("expected CursorExpired, got {:?}", other.map(|s| s.id())),
    };
    let mut resumed = f.tree.subscribe(Completions::from_cursor(oldest)).await.expect("resume at the oldest");
    assert_exactly_once(&take_events(&mut resumed, new.len(), WAIT).await, &new, true);
    let more = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut resumed, 2, WAIT).await, &more, true);
    assert_no_more(&mut resumed, QUIET).await;
    assert_nothing_restarted(&f.tree.stats().await.expect("stats"));
}

/// How many `XTRIM` calls the server has run.
async fn xtrim_calls(server: &ValkeyServer) -> u64 {
    command_calls(server, "xtrim").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_age_beyond_the_representable_past_trims_nothing_from_the_stream() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let (f, old, new) = aged_stream(&server, Duration::from_secs(u64::MAX / 2), &[1, 1_000]).await;
    wait_until(WAIT, "three trim runs", || async { xtrim_calls(&server).await >= 3 }).await;
    assert_eq!(completion_len(&server).await, 5, "nothing was trimmed");
    let mut sub = f.tree.subscribe(Completions::from_cursor(encode_valkey_cursor(1, 0))).await.expect("retained");
    assert_exactly_once(&take_events(&mut sub, 4, WAIT).await, &[&old[1..], &new[..]].concat(), true);
    assert_no_more(&mut sub, QUIET).await;
}

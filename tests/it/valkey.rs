//! Valkey end to end: Lua function -> stream (and pub/sub) -> listener -> filter -> subscriber,
//! against real `valkey-server`s the harness starts, including ones it SIGKILLs and restarts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferriskey::Value;
use ff_completions::backends::valkey::{LISTENER_CLIENT_NAME, PUBSUB_CHANNEL, STREAM_KEY, ValkeyEngine};
use ff_completions::{
    BackendConfig, BackendRetry, BackendTimeouts, CancelFlowPolicy, CompletionOutcome, CompletionSupervisorHandle,
    DependencyResolution, Engine, EngineError, ExecutionId, ExecutionSpec, FailOutcome, FlowId, Namespace, Retention,
    ScannerFilter, SubscribeRequest, SupervisorConfig, TimestampMs, ValkeyConnection, connect_engine,
    encode_postgres_cursor, encode_postgres_event_cursor, encode_sqlite_cursor, encode_valkey_cursor,
};

use crate::contract::{self, Fixture, QUIET, WAIT, assert_nothing_restarted, complete_n, fixture, running};
use crate::support::valkey::ValkeyServer;
use crate::support::{assert_exactly_once, assert_no_more, init_tracing, take_events, wait_until};

async fn contract_backend() -> (ValkeyServer, BackendConfig) {
    init_tracing();
    let server = ValkeyServer::start().await;
    let config = server.config();
    (server, config)
}

contract::contract_tests!(
    foreign cursors: vec![encode_postgres_cursor(1, 2), encode_postgres_event_cursor(3), encode_sqlite_cursor(4)]
);

/// Quick restarts for tests that break connections on purpose.
fn impatient(config: BackendConfig) -> BackendConfig {
    config
        .with_retry(BackendRetry::new(2, 20, 4, 0))
        .with_timeouts(BackendTimeouts::default().with_connect(Duration::from_millis(500)))
}

/// Every execution id in the completion stream, in stream order: what producers committed.
async fn stream_order(server: &ValkeyServer) -> Vec<ExecutionId> {
    let reply = server.command(&["XRANGE", STREAM_KEY, "-", "+"]).await;
    let Value::Map(entries) = reply else { panic!("XRANGE answered {reply:?}") };
    entries
        .iter()
        .map(|(_, fields)| {
            let Value::Array(pairs) = fields else { panic!("fields {fields:?}") };
            let id = pairs.iter().find_map(|pair| match pair {
                Ok(Value::Array(kv)) => match (&kv[0], &kv[1]) {
                    (Ok(Value::BulkString(k)), Ok(Value::BulkString(v))) if &k[..] == b"execution_id" => {
                        Some(String::from_utf8_lossy(v).into_owned())
                    }
                    _ => None,
                },
                _ => None,
            });
            ExecutionId::parse(&id.expect("execution_id field")).expect("execution id")
        })
        .collect()
}

async fn stream_len(server: &ValkeyServer) -> i64 {
    match server.command(&["XLEN", STREAM_KEY]).await {
        Value::Int(n) => n,
        other => panic!("XLEN answered {other:?}"),
    }
}

async fn listener_events_read(f: &Fixture) -> u64 {
    f.tree.stats().await.map(|s| s.listeners[0].events_read).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_also_reaches_a_plain_pubsub_subscriber_as_json() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut raw = server.subscribe_raw(PUBSUB_CHANNEL).await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
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
async fn engine_semantics_match_the_sql_producers() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let engine = ValkeyEngine::connect(&server.config()).await.expect("engine");
    let flow = FlowId::new();
    engine.create_flow(&flow, None).await.expect("flow");
    engine.create_flow(&flow, None).await.expect("creating a flow twice is fine");
    let (a, b) = (ExecutionSpec::new(&flow).with_max_attempts(2), ExecutionSpec::new(&flow));
    let child = ExecutionSpec::new(&flow).with_parents(vec![a.id, b.id]);
    for spec in [&a, &b, &child] {
        engine.create_execution(spec).await.expect("create");
    }
    let state = |id: ExecutionId| {
        let engine = engine.clone();
        async move { engine.execution(&id).await.expect("execution").map(|i| (i.state, i.attempt)) }
    };
    assert_eq!(state(child.id).await, Some(("blocked".into(), 0)));
    assert_eq!(engine.children(&a.id).await.expect("children"), vec![child.id]);
    assert_eq!(engine.resolve_dependency(&a.id, &child.id).await.expect("r"), DependencyResolution::ParentNotTerminal);

    // A retryable failure goes back to eligible while attempts remain, then is terminal.
    assert_eq!(engine.claim("w", 10).await.expect("claim").len(), 2);
    assert!(matches!(engine.fail(&a.id, true).await.expect("fail"), FailOutcome::RetryScheduled { .. }));
    assert_eq!(state(a.id).await, Some(("eligible".into(), 1)));
    assert_eq!(engine.claim("w", 10).await.expect("claim"), vec![a.id]);
    assert!(matches!(engine.fail(&b.id, true).await, Ok(FailOutcome::TerminalFailed)), "b has one attempt");
    assert!(engine.complete(&a.id).await.expect("complete"));
    assert!(!engine.complete(&a.id).await.expect("complete twice"), "only a running execution completes");
    assert!(matches!(engine.fail(&a.id, true).await, Err(EngineError::State { .. })));

    // Both edges now wait for the reconciler; the first success only decrements.
    let mut unresolved = engine.unresolved_dependencies(10).await.expect("unresolved");
    unresolved.sort();
    let mut want = vec![(a.id, child.id), (b.id, child.id)];
    want.sort();
    assert_eq!(unresolved, want);
    assert_eq!(engine.resolve_dependency(&a.id, &child.id).await.expect("r"), DependencyResolution::Waiting);
    assert_eq!(engine.resolve_dependency(&a.id, &child.id).await.expect("r"), DependencyResolution::AlreadyResolved);
    assert_eq!(engine.resolve_dependency(&b.id, &child.id).await.expect("r"), DependencyResolution::Skipped);
    assert_eq!(state(child.id).await, Some(("skipped".into(), 0)));
    assert!(engine.unresolved_dependencies(10).await.expect("unresolved").is_empty());

    // A child of succeeded parents is promoted; cancel_pending leaves running members alone.
    let flow2 = FlowId::new();
    engine.create_flow(&flow2, None).await.expect("flow");
    let ids = running(&engine, |_| ExecutionSpec::new(&flow2), 2).await;
    let (x, y) = (ExecutionSpec::new(&flow2).with_parents(vec![ids[0]]), ExecutionSpec::new(&flow2));
    engine.create_execution(&x).await.expect("x");
    engine.create_execution(&y).await.expect("y");
    assert!(engine.complete(&ids[0]).await.expect("complete"));
    assert_eq!(engine.resolve_dependency(&ids[0], &x.id).await.expect("r"), DependencyResolution::Promoted);
    assert_eq!(state(x.id).await, Some(("eligible".into(), 0)));
    assert_eq!(engine.cancel_flow(&flow2, CancelFlowPolicy::FlowOnly).await.expect("flow only"), 0);
    assert_eq!(engine.cancel_flow(&flow2, CancelFlowPolicy::CancelPending).await.expect("pending"), 2);
    assert_eq!(state(ids[1]).await, Some(("running".into(), 1)));
    assert_eq!(engine.cancel_flow(&flow2, CancelFlowPolicy::CancelAll).await.expect("all"), 1);
    assert!(!engine.cancel(&ids[1]).await.expect("cancel"), "already terminal");
    assert_eq!(engine.execution(&ExecutionId::new_in(&flow2)).await.expect("missing"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_refused_before_anything_is_written() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let engine = ValkeyEngine::connect(&server.config()).await.expect("engine");
    let flow = FlowId::new();
    let orphan = ExecutionSpec::new(&flow);
    assert!(matches!(engine.create_execution(&orphan).await, Err(EngineError::State { .. })), "no such flow");
    engine.create_flow(&flow, None).await.expect("flow");
    let with_ghost_parent = ExecutionSpec::new(&flow).with_parents(vec![ExecutionId::new_in(&flow)]);
    assert!(matches!(engine.create_execution(&with_ghost_parent).await, Err(EngineError::State { .. })));
    assert_eq!(engine.execution(&with_ghost_parent.id).await.expect("lookup"), None, "nothing was written");
    engine.create_execution(&orphan).await.expect("create");
    assert!(matches!(engine.create_execution(&orphan).await, Err(EngineError::State { .. })), "exists");

    // Raw calls with bad arguments: a clear error, and no completion was written.
    let admin = server.admin().await;
    let before = stream_len(&server).await;
    let core = format!("ff:exec:{}:core", orphan.id);
    let calls: [(&str, Vec<String>, Vec<&str>); 3] = [
        (
            "ff_complete",
            vec![core.clone(), "c".into(), STREAM_KEY.into(), "e".into(), "p".into()],
            vec!["not-an-id", "10"],
        ),
        ("ff_cancel", vec![core.clone(), "c".into(), STREAM_KEY.into(), "e".into(), "p".into()], vec!["x", "0"]),
        ("ff_cancel", vec![core], vec!["x", "10"]),
    ];
    for (function, keys, args) in calls {
        let err = admin.fcall::<Value>(function, &keys, &args).await.expect_err("bad arguments");
        assert!(err.to_string().contains("ff_completions invalid:"), "{function}: {err}");
    }
    assert_eq!(stream_len(&server).await, before);
    assert_eq!(engine.execution(&orphan.id).await.expect("lookup").map(|i| i.state), Some("eligible".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listeners_and_client_killed_connections_lose_nothing_under_concurrent_producers() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(impatient(server.config()), |c| c).await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let (engine, stop) = (f.engine.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    contract::complete_claimed(&*engine, 10).await;
                }
            })
        })
        .collect();
    let (mut kills, mut client_kills) = (0, 0);
    for round in 0..5 {
        // Each fault lands only once delivery has moved on since the previous one.
        let seen = listener_events_read(&f).await;
        wait_until(WAIT, "delivery to move on", || async { listener_events_read(&f).await > seen + 20 }).await;
        if round % 2 == 0 {
            wait_until(WAIT, "the listener's blocking connection", || async {
                server.kill_listener_connections().await > 0
            })
            .await;
            client_kills += 1;
        } else {
            wait_until(WAIT, "a listener", || async { f.tree.listener_cell("valkey").await.is_some() }).await;
            f.tree.listener_cell("valkey").await.expect("listener").kill();
            kills += 1;
        }
    }
    let seen = listener_events_read(&f).await;
    wait_until(WAIT, "delivery after the last fault", || async { listener_events_read(&f).await > seen + 20 }).await;
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer");
    }
    let expected = stream_order(&server).await;
    assert!(expected.len() >= 120, "producers committed {}", expected.len());
    for sub in &mut subs {
        assert_exactly_once(&take_events(sub, expected.len(), WAIT).await, &expected, true);
        assert_no_more(sub, QUIET).await;
    }
    let stats = f.tree.stats().await.expect("stats");
    // A CLIENT KILL between two reads is healed by ferriskey without an error; one during the
    // blocking read restarts the listener. Either way nothing was lost (checked above).
    assert!(kills >= 2 && client_kills >= 3, "faults: {kills} kills, {client_kills} CLIENT KILLs");
    assert!(stats.listeners[0].restarts >= kills as u64, "{:?}", stats.listeners[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_subscribers_share_one_blocking_connection() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut subs = Vec::new();
    for _ in 0..20 {
        subs.push(f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub"));
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
async fn a_sigkilled_server_with_an_append_only_file_comes_back_and_delivery_resumes_without_loss() {
    init_tracing();
    let server = ValkeyServer::start_persistent().await;
    let f = fixture(impatient(server.config()), |c| c).await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let before = complete_n(&*f.engine, 10).await;
    assert_exactly_once(&take_events(&mut sub, 10, WAIT).await, &before, true);
    server.kill9().await;
    wait_until(WAIT, "the listener to notice the outage", || async {
        f.tree.stats().await.map(|s| s.listeners[0].restarts >= 1).unwrap_or(false)
    })
    .await;
    server.restart().await;
    assert_eq!(stream_order(&server).await, before, "the append-only file kept every completion");
    // The same engine reconnects by itself; its first calls may still see the broken socket.
    let flow = FlowId::new();
    wait_until(WAIT, "the engine to reconnect", || async { f.engine.create_flow(&flow, None).await.is_ok() }).await;
    let after = complete_n(&*f.engine, 10).await;
    assert_exactly_once(&take_events(&mut sub, 10, WAIT).await, &after, true);
    assert_no_more(&mut sub, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_without_persistence_gets_the_library_back_on_the_next_call() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let engine = ValkeyEngine::connect(&impatient(server.config())).await.expect("engine");
    complete_n(&engine, 1).await;
    server.kill9_and_restart().await;
    let libraries = |v: Value| format!("{v:?}").contains("ff_completions");
    assert!(!libraries(server.command(&["FUNCTION", "LIST"]).await), "a fresh server has no functions");
    // The same client: once reconnected, its FCALL finds no function, reloads and retries.
    let flow = FlowId::new();
    wait_until(WAIT, "the engine to work again", || async { engine.create_flow(&flow, None).await.is_ok() }).await;
    assert!(libraries(server.command(&["FUNCTION", "LIST"]).await));
    let spec = ExecutionSpec::new(&flow);
    engine.create_execution(&spec).await.expect("create");
    assert_eq!(engine.claim("w", 1).await.expect("claim"), vec![spec.id]);
    assert!(engine.complete(&spec.id).await.expect("complete"));
    assert_eq!(stream_order(&server).await, vec![spec.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_trim_the_stream_and_a_cursor_behind_it_expires_instead_of_skipping() {
    init_tracing();
    let server = ValkeyServer::start_with_small_stream_nodes().await;
    let config = BackendConfig::valkey_with(server.connection().with_stream_maxlen(10));
    let f = fixture(config, |c| c).await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let first = complete_n(&*f.engine, 3).await;
    let early = take_events(&mut sub, 3, WAIT).await;
    assert_exactly_once(&early, &first, true);
    // A live reader could fall more than 10 entries behind on a busy machine and be expired
    // itself (rightly): this test is about the saved cursor, so nobody reads while producers trim.
    drop(sub);
    let rest = complete_n(&*f.engine, 60).await;
    let kept = stream_len(&server).await;
    assert!((10..30).contains(&kept), "MAXLEN ~ 10 keeps about 10 entries, kept {kept}");

    let oldest = match f.tree.subscribe(SubscribeRequest::from_cursor(early[0].cursor.clone())).await {
        Err(EngineError::CursorExpired { oldest: Some(oldest) }) => oldest,
        other => panic!("expected CursorExpired, got {:?}", other.map(|s| s.id())),
    };
    let mut resumed = f.tree.subscribe(SubscribeRequest::from_cursor(oldest)).await.expect("resume at the oldest");
    let retained = stream_order(&server).await;
    assert_eq!(retained[..], rest[rest.len() - retained.len()..], "trimming removes the oldest");
    assert_exactly_once(&take_events(&mut resumed, retained.len(), WAIT).await, &retained, true);
    assert_no_more(&mut resumed, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stream_entries_are_skipped_once_and_the_events_around_them_arrive() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
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
        server.command(&[&["XADD", STREAM_KEY, "*"][..], fields].concat()).await;
    }
    let after = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 4, WAIT).await, &[before, after].concat(), true);
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
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let id = ExecutionId::new_in(&FlowId::new());
    let (text, partition) = (id.to_string(), id.partition().to_string());
    let fields = ["execution_id", &text, "outcome", "timed_out", "occurred_at_ms", "7", "partition", &partition];
    server.command(&[&["XADD", STREAM_KEY, "*"][..], &fields[..]].concat()).await;
    let events = take_events(&mut sub, 1, WAIT).await;
    assert_eq!((events[0].execution_id, events[0].outcome.clone()), (id, CompletionOutcome::Other("timed_out".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_and_password_are_used_and_a_wrong_password_is_a_typed_error_that_never_shows_it() {
    init_tracing();
    let server = ValkeyServer::start_with_user("s3cret-pass").await;
    let f = fixture(server.config(), |c| c).await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let ids = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &ids, true);

    let user = Some(crate::support::valkey::USER.to_owned());
    let wrong = BackendConfig::valkey_with(
        ValkeyConnection::new("127.0.0.1", server.port).with_credentials(user, Some("wrong-pass".into())),
    );
    match connect_engine(&wrong).await {
        Err(err @ EngineError::Unavailable { .. }) => assert!(!err.to_string().contains("wrong-pass"), "{err}"),
        other => panic!("a wrong password must be Unavailable, got {:?}", other.err()),
    }
    let config = SupervisorConfig::new().with_backend(wrong.clone()).with_connect_at_start(true);
    let spawned = CompletionSupervisorHandle::spawn(config).await;
    let err = spawned.expect_err("a tree asked to connect at start with a wrong password does not start");
    assert!(matches!(err, EngineError::Unavailable { .. }), "the backend's own error type: {err:?}");
    assert!(!err.to_string().contains("wrong-pass") && !format!("{err:?}").contains("wrong-pass"), "{err:?}");
    assert!(!format!("{wrong:?} {wrong}").contains("wrong-pass"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_database_holds_the_stream() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(BackendConfig::valkey_with(server.connection().with_database(3)), |c| c).await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let ids = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &ids, true);
    assert_eq!(stream_len(&server).await, 0, "database 0 holds nothing");
    let in_db3: i64 = server.admin_in(3).await.cmd("XLEN").arg(STREAM_KEY).execute().await.expect("XLEN");
    assert_eq!(in_db3, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_the_connection_is_a_prompt_typed_error() {
    init_tracing();
    let port = crate::support::free_port();
    let backend = BackendConfig::valkey_with(
        ValkeyConnection::new("127.0.0.1", port).with_credentials(None, Some("secret-pw".into())),
    )
    .with_timeouts(BackendTimeouts::default().with_connect(Duration::from_secs(1)));
    let started = Instant::now();
    let config = SupervisorConfig::new().with_backend(backend.clone());
    let err = CompletionSupervisorHandle::spawn(config.clone().with_connect_at_start(true)).await.expect_err("refused");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(!err.to_string().contains("secret-pw"), "{err}");
    assert!(err.is_transient(), "a refused connection is worth retrying: {err:?}");
    // Without `connect_at_start` the tree starts anyway and reports the outage in its stats.
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("starts while the server is down");
    wait_until(Duration::from_secs(30), "the refusal in the stats", || async {
        tree.stats().await.is_ok_and(|s| s.listeners[0].last_error.is_some())
    })
    .await;
    let stats = tree.stats().await.expect("stats");
    assert!(!stats.to_string().contains("secret-pw"), "{stats}");
    tree.shutdown().await;
    match connect_engine(&backend).await {
        Err(e @ (EngineError::Unavailable { .. } | EngineError::Transport { .. } | EngineError::Timeout { .. })) => {
            assert!(!e.to_string().contains("secret-pw"), "{e}")
        }
        other => panic!("expected a connection error, got {:?}", other.err()),
    }
}

/// One supervisor, a Postgres and a Valkey listener: each backend's subscribers get that
/// backend's events only, and killing one listener again and again leaves the other untouched.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heterogeneous_tree_keeps_each_backend_to_itself_through_the_other_listeners_deaths() {
    init_tracing();
    let pg_config = BackendConfig::postgres(&crate::support::postgres::fresh_database().await);
    let server = ValkeyServer::start().await;
    let config =
        SupervisorConfig::new().with_named_backend("pg", pg_config.clone()).with_named_backend("vk", server.config());
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn");
    let engines = [
        ("pg", connect_engine(&pg_config).await.expect("postgres engine")),
        ("vk", connect_engine(&server.config()).await.expect("valkey engine")),
    ];
    let restarts = |stats: &ff_completions::SupervisorStats, backend: &str| {
        stats.listeners.iter().find(|l| l.backend == backend).map(|l| l.restarts).expect("listener")
    };

    for (victim, bystander) in [("pg", "vk"), ("vk", "pg")] {
        let mut subs = Vec::new();
        for (name, _) in &engines {
            subs.push(tree.subscribe(SubscribeRequest::tail().on_backend(*name)).await.expect("sub"));
        }
        let before = tree.stats().await.expect("stats");
        let producers: Vec<_> = engines
            .iter()
            .map(|(_, engine)| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    for _ in 0..10 {
                        all.extend(complete_n(&*engine, 10).await);
                    }
                    all
                })
            })
            .collect();
        let mut kills = 0;
        while producers.iter().any(|p| !p.is_finished()) {
            if let Some(cell) = tree.listener_cell(victim).await {
                cell.kill();
                kills += 1;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert!(kills > 0);
        for (sub, producer) in subs.iter_mut().zip(producers) {
            let ids = producer.await.expect("producer");
            assert_exactly_once(&take_events(sub, ids.len(), WAIT).await, &ids, true);
            assert_no_more(sub, QUIET).await;
        }
        let after = tree.stats().await.expect("stats");
        assert!(restarts(&after, victim) > restarts(&before, victim), "the {victim} listener was restarted");
        assert_eq!(restarts(&after, bystander), restarts(&before, bystander), "the {bystander} listener never died");
    }
}

/// A library of another version already on the server (an older deployment) is replaced on
/// connect, and the functions it lacked work at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_of_another_version_is_replaced_on_connect() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let old = "#!lua name=ff_completions\nserver.register_function('ff_version', function() return '0' end)";
    server.command(&["FUNCTION", "LOAD", old]).await;
    let version = || async {
        match server.command(&["FCALL", "ff_version", "0"]).await {
            Value::BulkString(v) => String::from_utf8_lossy(&v).into_owned(),
            other => panic!("ff_version answered {other:?}"),
        }
    };
    assert_eq!(version().await, "0");
    let engine = ValkeyEngine::connect(&server.config()).await.expect("engine replaces the old library");
    assert_eq!(version().await, ff_completions::backends::valkey::LIBRARY_VERSION);
    let ids = complete_n(&engine, 2).await;
    assert_eq!(stream_order(&server).await, ids);
}

/// `XADD`s one entry with the given id (`*` for the next) and fields, as a foreign producer might.
async fn xadd(server: &ValkeyServer, id: &str, fields: &[&str]) {
    server.command(&[&["XADD", STREAM_KEY, id][..], fields].concat()).await;
}

/// A valid entry's fields for `id`, committed at `at` (text, so anything can be written).
fn entry_fields(id: &ExecutionId, at: &str) -> Vec<String> {
    [
        "execution_id",
        &id.to_string(),
        "outcome",
        "success",
        "occurred_at_ms",
        at,
        "partition",
        &id.partition().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// No listener or filter of the tree was ever restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_with_the_earliest_and_latest_commit_times_are_delivered_without_any_restart() {
    init_tracing();
    let server = ValkeyServer::start().await;
    // A subscriber that reads nothing until the end fills its buffer of 2 and falls behind at
    // one of the earliest entries: its lag is then measured from that entry's commit time.
    let f = fixture(server.config(), |c| c.with_subscriber_buffer(2)).await;
    let mut sub = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let before = complete_n(&*f.engine, 2).await;
    let mut odd = Vec::new();
    for at in contract::EXTREME_TIMES {
        let id = ExecutionId::new_in(&FlowId::new());
        let fields = entry_fields(&id, &at.to_string());
        xadd(&server, "*", &fields.iter().map(String::as_str).collect::<Vec<_>>()).await;
        odd.push(id);
    }
    let after = complete_n(&*f.engine, 2).await;
    contract::assert_extreme_times_arrive(&f.tree, &mut sub, [before, odd, after]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabyte_stream_fields_are_delivered_whole_or_skipped_and_the_events_around_them_arrive() {
    const MIB: usize = 1 << 20;
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(server.config(), |c| c).await;
    let mut all = f.tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let huge_ns = "n".repeat(MIB);
    let filter = ScannerFilter::new().with_namespace(Namespace::new(huge_ns.clone()));
    let mut only_huge_ns = f.tree.subscribe(SubscribeRequest::tail().with_filter(filter)).await.expect("sub");
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
    assert_exactly_once(&events, &[before, delivered.clone(), after].concat(), true);
    assert_eq!(events[2].namespace.as_ref().map(|n| n.as_str().len()), Some(MIB));
    assert_eq!(events[3].tags.get("big").map(String::len), Some(MIB));
    assert_eq!(events[4].outcome, CompletionOutcome::Other(huge_outcome));
    assert_exactly_once(&take_events(&mut only_huge_ns, 1, WAIT).await, &delivered[..1], true);
    assert_no_more(&mut all, QUIET).await;
    assert_no_more(&mut only_huge_ns, QUIET).await;
    let stats = f.tree.stats().await.expect("stats");
    assert_eq!(stats.listeners[0].rows_skipped, 2, "each huge bad entry is skipped once");
    assert_nothing_restarted(&stats);
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
        xadd(server, &format!("{ms}-0"), &fields.iter().map(String::as_str).collect::<Vec<_>>()).await;
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
    wait_until(WAIT, "the trim job to remove the old entries", || async { stream_len(&server).await == 3 }).await;
    assert_eq!(stream_order(&server).await, new, "exactly the entries older than an hour are gone");

    for (ms, seq) in [(0, 0), (1, 0), (1_000, 0), (two_hours_ago, 0)] {
        match f.tree.subscribe(SubscribeRequest::from_cursor(encode_valkey_cursor(ms, seq))).await {
            Err(EngineError::CursorExpired { oldest: Some(_) }) => {}
            other => panic!("cursor {ms}-{seq} is below the trimmed entries, got {:?}", other.map(|s| s.id())),
        }
    }
    let oldest = match f.tree.subscribe(SubscribeRequest::from_cursor(encode_valkey_cursor(1, 0))).await {
        Err(EngineError::CursorExpired { oldest: Some(oldest) }) => oldest,
        other => panic!("expected CursorExpired, got {:?}", other.map(|s| s.id())),
    };
    let mut resumed = f.tree.subscribe(SubscribeRequest::from_cursor(oldest)).await.expect("resume at the oldest");
    assert_exactly_once(&take_events(&mut resumed, new.len(), WAIT).await, &new, true);
    let more = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut resumed, 2, WAIT).await, &more, true);
    assert_no_more(&mut resumed, QUIET).await;
    assert_nothing_restarted(&f.tree.stats().await.expect("stats"));
}

/// How many `XTRIM` calls the server has run.
async fn xtrim_calls(server: &ValkeyServer) -> u64 {
    let info = match server.command(&["INFO", "commandstats"]).await {
        Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        Value::VerbatimString { text, .. } => text,
        other => panic!("INFO answered {other:?}"),
    };
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_xtrim:calls="))
        .map(|rest| rest.split(',').next().and_then(|n| n.parse().ok()).expect("calls=N"))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_age_beyond_the_representable_past_trims_nothing_from_the_stream() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let (f, old, new) = aged_stream(&server, Duration::from_secs(u64::MAX / 2), &[1, 1_000]).await;
    wait_until(WAIT, "three trim runs", || async { xtrim_calls(&server).await >= 3 }).await;
    assert_eq!(stream_len(&server).await, 5, "nothing was trimmed");
    let mut sub = f.tree.subscribe(SubscribeRequest::from_cursor(encode_valkey_cursor(1, 0))).await.expect("retained");
    assert_exactly_once(&take_events(&mut sub, 4, WAIT).await, &[&old[1..], &new[..]].concat(), true);
    assert_no_more(&mut sub, QUIET).await;
}

//! The Valkey Lua library: the producers' semantics match the SQL ones, bad arguments are
//! refused, the library is replaced or reloaded when it is of another version or missing.

use super::*;
use ff_completions_lab::Error as DemoError;

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
    assert!(matches!(engine.fail(&a.id, true).await, Err(DemoError::State { .. })));

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
    assert!(matches!(engine.create_execution(&orphan).await, Err(DemoError::State { .. })), "no such flow");
    engine.create_flow(&flow, None).await.expect("flow");
    let with_ghost_parent = ExecutionSpec::new(&flow).with_parents(vec![ExecutionId::new_in(&flow)]);
    assert!(matches!(engine.create_execution(&with_ghost_parent).await, Err(DemoError::State { .. })));
    assert_eq!(engine.execution(&with_ghost_parent.id).await.expect("lookup"), None, "nothing was written");
    engine.create_execution(&orphan).await.expect("create");
    assert!(matches!(engine.create_execution(&orphan).await, Err(DemoError::State { .. })), "exists");

    // Raw calls with bad arguments: a clear error, and nothing was written (no entry of any
    // family, no claim).
    let admin = server.admin().await;
    let before = stream_len(&server).await;
    let core = format!("ff:exec:{}:core", orphan.id);
    let id = orphan.id.to_string();
    let p = orphan.id.partition();
    let (eligible, expiry) = (format!("ff:eligible:{{fp:{p}}}"), format!("ff:lease_expiry:{{fp:{p}}}"));
    let signal_keys: Vec<String> =
        [core.clone(), stream_key(p), eligible.clone(), "w".into(), "b".into(), "k".into()].into();
    let calls: [(&str, Vec<String>, Vec<&str>); 10] = [
        ("ff_complete", vec![core.clone(), "c".into(), stream_key(0), "e".into(), "p".into()], vec!["not-an-id", "10"]),
        ("ff_cancel", vec![core.clone(), "c".into(), stream_key(0), "e".into(), "p".into()], vec!["x", "0"]),
        ("ff_cancel", vec![core.clone()], vec!["x", "10"]),
        // The lease and signal producers: the keys of version 4's claim, no lease length, a bad
        // id, no revoker, a maxlen of 0, a missing argument.
        ("ff_claim", vec![eligible.clone()], vec!["w", "10"]),
        ("ff_claim", vec![eligible.clone(), stream_key(p), expiry.clone()], vec!["w", "10", "0", "10"]),
        ("ff_renew_lease", vec![core.clone(), stream_key(p), expiry.clone()], vec!["x", "w", "1000", "10"]),
        ("ff_revoke_lease", vec![core.clone(), stream_key(p), eligible.clone(), expiry.clone()], vec![&id, "", "10"]),
        ("ff_expire_leases", vec![expiry.clone(), stream_key(p), eligible.clone()], vec!["1", "0"]),
        ("ff_suspend", vec![core.clone(), eligible, expiry, "w".into(), "b".into()], vec!["x", "wp"]),
        ("ff_deliver_signal", signal_keys, vec![&id, "wp", "s", "", "10"]),
    ];
    for (function, keys, args) in calls {
        let err = admin.fcall::<Value>(function, &keys, &args).await.expect_err("bad arguments");
        assert!(err.to_string().contains("ff_demo invalid:"), "{function}: {err}");
    }
    assert_eq!(stream_len(&server).await, before);
    assert_eq!(engine.execution(&orphan.id).await.expect("lookup").map(|i| i.state), Some("eligible".into()));
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

/// A library of another version already on the server (an older deployment) is replaced on
/// connect, and the functions it lacked work at once. Like version 6, it holds a function of
/// the demo's producers: replaced first, it leaves the name free for the demo's own library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_of_another_version_is_replaced_on_connect() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let old = "#!lua name=ff_completions\nserver.register_function('ff_version', function() return '0' end)\n\
               server.register_function('ff_complete', function() return 0 end)";
    server.command(&["FUNCTION", "LOAD", old]).await;
    let version = || async {
        match server.command(&["FCALL", "ff_version", "0"]).await {
            Value::BulkString(v) => String::from_utf8_lossy(&v).into_owned(),
            other => panic!("ff_version answered {other:?}"),
        }
    };
    assert_eq!(version().await, "0");
    let engine = ValkeyEngine::connect(&server.config()).await.expect("engine replaces the old library");
    assert_eq!(version().await, ff_completions::valkey::LIBRARY_VERSION);
    let ids = complete_n(&engine, 2).await;
    assert_eq!(stream_order(&server).await, ids);
}

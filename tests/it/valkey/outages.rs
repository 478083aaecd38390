//! Valkey outages: killed listeners and connections, a SIGKILLed server, a refusing server,
//! credentials, and a tree of several backends whose listeners die.

use super::*;
use ff_completions::{Completions, Error};
use ff_completions_lab::Error as DemoError;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listeners_and_client_killed_connections_lose_nothing_under_concurrent_producers() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(impatient(server.config()), |c| c).await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(f.tree.subscribe(Completions::tail()).await.expect("sub"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let (engine, stop, committed) = (f.engine.clone(), stop.clone(), committed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    committed.fetch_add(contract::complete_claimed(&*engine, 10).await.len(), Ordering::Relaxed);
                }
            })
        })
        .collect();
    let (mut kills, mut client_kills) = (0, 0);
    for round in 0..5 {
        // Each fault lands only once delivery has moved on since the previous one.
        until_delivery_moves_on(&f, &committed, "delivery to move on").await;
        if round % 2 == 0 {
            wait_until(WAIT, "the listener's subscriber connection", || async {
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
    until_delivery_moves_on(&f, &committed, "delivery after the last fault").await;
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer");
    }
    let expected = stream_order(&server).await;
    assert!(expected.len() >= 120, "producers committed {}", expected.len());
    for sub in &mut subs {
        assert_exactly_once_per_partition(&take_events(sub, expected.len(), WAIT).await, &expected);
        assert_no_more(sub, QUIET).await;
    }
    let stats = f.tree.stats().await.expect("stats");
    // A CLIENT KILL of the subscriber connection is healed by ferriskey, which re-subscribes;
    // the listener then reads every partition. Either way nothing was lost (checked above).
    assert!(kills >= 2 && client_kills >= 3, "faults: {kills} kills, {client_kills} CLIENT KILLs");
    assert!(stats.listeners[0].restarts >= kills as u64, "{:?}", stats.listeners[0]);
    assert!(stats.listeners[0].reconnects >= 1, "a re-subscription was noticed: {:?}", stats.listeners[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_server_with_an_append_only_file_comes_back_and_delivery_resumes_without_loss() {
    init_tracing();
    let server = ValkeyServer::start_persistent().await;
    let f = fixture(impatient(server.config()), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
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
async fn a_user_and_password_are_used_and_a_wrong_password_is_a_typed_error_that_never_shows_it() {
    init_tracing();
    let server = ValkeyServer::start_with_user("s3cret-pass").await;
    let f = fixture(server.config(), |c| c).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let ids = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &ids, true);

    let user = Some(crate::support::valkey::USER.to_owned());
    let wrong = BackendConfig::valkey_with(
        ValkeyConnection::new("127.0.0.1", server.port).with_credentials(user, Some("wrong-pass".into())),
    );
    match connect_engine(&wrong).await {
        Err(DemoError::Subsystem(err @ Error::Unavailable { .. })) => {
            assert!(!err.to_string().contains("wrong-pass"), "{err}")
        }
        other => panic!("a wrong password must be Unavailable, got {:?}", other.err()),
    }
    let config = SupervisorConfig::new().with_backend(wrong.clone()).with_connect_at_start(true);
    let spawned = CompletionSupervisorHandle::spawn(config).await;
    let err = spawned.expect_err("a tree asked to connect at start with a wrong password does not start");
    assert!(matches!(err, Error::Unavailable { .. }), "the backend's own error type: {err:?}");
    assert!(!err.to_string().contains("wrong-pass") && !format!("{err:?}").contains("wrong-pass"), "{err:?}");
    assert!(!format!("{wrong:?} {wrong}").contains("wrong-pass"));
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
        Err(DemoError::Subsystem(
            e @ (Error::Unavailable { .. } | Error::Transport { .. } | Error::Timeout { .. }),
        )) => {
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
            subs.push(tree.subscribe(Completions::tail().on_backend(*name)).await.expect("sub"));
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
        for ((sub, producer), (name, _)) in subs.iter_mut().zip(producers).zip(&engines) {
            let ids = producer.await.expect("producer");
            let events = take_events(sub, ids.len(), WAIT).await;
            // Postgres keeps one order; Valkey one per partition (ten flows here).
            if *name == "pg" {
                assert_exactly_once(&events, &ids, true);
            } else {
                assert_exactly_once_per_partition(&events, &ids);
            }
            assert_no_more(sub, QUIET).await;
        }
        let after = tree.stats().await.expect("stats");
        assert!(restarts(&after, victim) > restarts(&before, victim), "the {victim} listener was restarted");
        assert_eq!(restarts(&after, bystander), restarts(&before, bystander), "the {bystander} listener never died");
    }
}

/// After a `CLIENT KILL` of the listener's subscriber connection, completions are delivered by
/// their pub/sub wake-ups again, not by the safety tick (an hour here): the subscription is
/// back, whoever re-made the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_subscriber_connection_is_killed_wake_ups_deliver_again() {
    init_tracing();
    let server = ValkeyServer::start().await;
    let f = fixture(impatient(server.config()), |c| c.with_tick(Duration::from_secs(3600))).await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let first = complete_n(&*f.engine, 1).await;
    assert_exactly_once(&take_events(&mut sub, 1, WAIT).await, &first, true);
    for kill in 0..3 {
        wait_until(WAIT, "the listener's subscriber connection", || async {
            server.kill_listener_connections().await > 0
        })
        .await;
        // Completions right after the kill and a while later: each one needs a wake-up.
        for pause in [Duration::ZERO, Duration::from_millis(300)] {
            tokio::time::sleep(pause).await;
            let ids = complete_n(&*f.engine, 1).await;
            let got = take_events(&mut sub, 1, Duration::from_secs(20)).await;
            assert_eq!(got[0].execution_id, ids[0], "kill {kill}, {pause:?} after it");
        }
    }
    assert_no_more(&mut sub, QUIET).await;
}

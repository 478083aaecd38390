//! Postgres outages: killed listeners, terminated LISTEN connections, a refusing server.

use super::*;
use ff_completions::{Completions, Error};
use ff_completions_lab::Error as DemoError;

async fn terminate_listen_connections(url: &str) -> u64 {
    ConnectionKiller::new(&BackendConfig::postgres(url)).kill().await.expect("terminate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_is_delivered_even_when_the_listener_dies_meanwhile() {
    let f = fixture().await;
    let mut sub = f.tree.subscribe(Completions::tail()).await.expect("sub");
    let (tx_a, a) = open_transaction_with_a_completion(&f).await;
    let b = complete_n(&*f.engine, 3).await;
    for _ in 0..3 {
        let cell = f.tree.listener_cell("postgres").await.expect("listener");
        cell.kill();
        wait_until(WAIT, "listener restart", || async {
            f.tree.listener_cell("postgres").await.is_some_and(|c| c.get_id() != cell.get_id())
        })
        .await;
    }
    tx_a.commit().await.expect("commit A");
    let events = take_events(&mut sub, 4, WAIT).await;
    assert!(events.iter().any(|e| e.execution_id == a));
    assert!(b.iter().all(|id| events.iter().any(|e| e.execution_id == *id)));
    assert_exactly_once(&events, &reader_order(&f.url).await, true);
    assert_no_more(&mut sub, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listener_and_terminated_connection_lose_nothing_under_concurrent_producers() {
    let f = fixture().await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(f.tree.subscribe(Completions::tail()).await.expect("sub"));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let (engine, stop) = (f.engine.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    contract::complete_claimed(&*engine, 10).await;
                }
            })
        })
        .collect();
    let (mut kills, mut terminations) = (0, 0);
    for _ in 0..6 {
        wait_until(WAIT, "listener back", || async { f.tree.listener_cell("postgres").await.is_some() }).await;
        if let Some(cell) = f.tree.listener_cell("postgres").await {
            cell.kill();
            kills += 1;
        }
        tokio::time::sleep(Duration::from_millis(80)).await;
        terminations += terminate_listen_connections(&f.url).await;
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer");
    }
    assert!(kills >= 5 && terminations >= 1, "faults injected: {kills} kills, {terminations} terminations");
    let expected = reader_order(&f.url).await;
    assert!(expected.len() >= 40, "producers committed {}", expected.len());
    for sub in &mut subs {
        let events = take_events(sub, expected.len(), WAIT).await;
        assert_exactly_once(&events, &expected, true);
        assert_no_more(sub, QUIET).await;
    }
    let stats = f.tree.stats().await.expect("stats");
    assert!(stats.listeners[0].restarts >= 5, "{:?}", stats.listeners[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_the_connection_is_a_prompt_typed_error() {
    init_tracing();
    let port = crate::support::free_port();
    let backend = BackendConfig::postgres(format!("postgres://app:secret-pw@127.0.0.1:{port}/db"))
        .with_timeouts(ff_completions::BackendTimeouts::default().with_connect(Duration::from_secs(2)));
    let started = std::time::Instant::now();
    let err = CompletionSupervisorHandle::spawn(
        SupervisorConfig::new().with_backend(backend.clone()).with_connect_at_start(true),
    )
    .await
    .expect_err("refused");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(err.is_transient(), "a refused connection is worth retrying: {err}");
    assert!(!err.to_string().contains("secret-pw"), "{err}");
    match ff_completions_lab::connect_engine(&backend).await {
        Err(DemoError::Subsystem(e @ (Error::Transport { .. } | Error::Unavailable { .. }))) => {
            assert!(!e.to_string().contains("secret-pw"))
        }
        other => panic!("expected a transport error, got {:?}", other.err()),
    }
}

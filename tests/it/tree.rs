//! The actor tree's own promises, on a real Postgres: embedding under an engine actor,
//! escalation of crash loops, filter restarts, actor sinks, the seed trait, unsubscribe.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ff_completions::{
    BackendConfig, CompletionBackend, CompletionEvent, CompletionSupervisorHandle, Engine, ExecutionId, ExecutionSpec,
    FlowId, ScannerFilter, SubscribeRequest, SupervisorConfig, backends::postgres::PostgresEngine,
};
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::mpsc;

use crate::support::{
    assert_exactly_once, assert_no_more, init_tracing, postgres::fresh_database, take_events, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);

async fn complete_n(engine: &PostgresEngine, n: usize) -> Vec<ExecutionId> {
    let flow = FlowId::new();
    engine.create_flow(&flow, None).await.expect("flow");
    let mut ids = Vec::new();
    for _ in 0..n {
        let spec = ExecutionSpec::new(&flow);
        engine.create_execution(&spec).await.expect("create");
        ids.push(spec.id);
    }
    let mut claimed = 0;
    while claimed < n {
        claimed += engine.claim("w", n).await.expect("claim").len();
    }
    for id in &ids {
        engine.complete(id).await.expect("complete");
    }
    ids
}

/// An engine's own actor: it spawns the completion tree linked under itself and reports the
/// supervision events it receives.
struct EngineActor;

enum EngineMsg {}

impl Actor for EngineActor {
    type Msg = EngineMsg;
    type State = mpsc::UnboundedSender<String>;
    type Arguments = mpsc::UnboundedSender<String>;

    async fn pre_start(
        &self,
        _me: ActorRef<EngineMsg>,
        events: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(events)
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<EngineMsg>,
        event: SupervisionEvent,
        events: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, err) = event {
            let _ = events.send(err.to_string());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_linked_under_an_engine_actor_delivers_and_escalates_a_crash_loop() {
    init_tracing();
    let url = fresh_database().await;
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let (events_tx, mut escalations) = mpsc::unbounded_channel();
    let (parent, _) = Actor::spawn(None, EngineActor, events_tx).await.expect("engine actor");
    let config = SupervisorConfig::new()
        .with_backend(BackendConfig::postgres(&url).with_retry(ff_completions::BackendRetry::new(2, 10, 2, 0)))
        .with_restart_intensity(3, Duration::from_secs(30));
    let (tree, _) = CompletionSupervisorHandle::spawn_linked(parent.get_cell(), config).await.expect("spawn linked");
    assert!(parent.get_children().iter().any(|c| c.get_id() == tree.actor().get_id()));

    let mut sub = tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let ids = complete_n(&engine, 5).await;
    assert_exactly_once(&take_events(&mut sub, 5, WAIT).await, &ids, true);

    // A missing outbox is not an outage: the listener crashes in a loop, and past the
    // intensity the supervisor fails, which the engine actor sees.
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("DROP TABLE ff_completion_event").execute(&mut conn).await.expect("drop");
    let escalation = tokio::time::timeout(WAIT, escalations.recv()).await.expect("escalated in time").expect("event");
    assert!(escalation.contains("crashed"), "{escalation}");
    parent.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_filters_resume_from_their_cursor_and_never_escalate() {
    init_tracing();
    let url = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine"));
    let config = SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)).with_restart_intensity(1, WAIT);
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn");
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(tree.subscribe(SubscribeRequest::tail()).await.expect("sub"));
    }
    let producer = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut all = Vec::new();
            for _ in 0..20 {
                all.extend(complete_n(&engine, 10).await);
            }
            all
        })
    };
    let mut kills = 0;
    while !producer.is_finished() {
        for sub in &subs {
            if let Some(cell) = tree.filter_cell(sub.id()).await {
                cell.kill();
                kills += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let ids = producer.await.expect("producer");
    assert!(kills > 0);
    for sub in &mut subs {
        assert_exactly_once(&take_events(sub, ids.len(), WAIT).await, &ids, true);
        assert_no_more(sub, Duration::from_millis(300)).await;
    }
    let stats = tree.stats().await.expect("stats");
    assert!(stats.subscribers.iter().map(|s| s.restarts).sum::<u64>() > 0, "{:?}", stats.subscribers);
    assert!(tree.actor().get_status() == ractor::ActorStatus::Running, "filter kills never escalate");
}

/// A consumer that is itself an actor.
struct Collector;

struct Collected(CompletionEvent);

impl From<CompletionEvent> for Collected {
    fn from(event: CompletionEvent) -> Self {
        Self(event)
    }
}

impl Actor for Collector {
    type Msg = Collected;
    type State = mpsc::UnboundedSender<CompletionEvent>;
    type Arguments = mpsc::UnboundedSender<CompletionEvent>;

    async fn pre_start(
        &self,
        _me: ActorRef<Collected>,
        out: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(out)
    }

    async fn handle(
        &self,
        _me: ActorRef<Collected>,
        msg: Collected,
        out: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = out.send(msg.0);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_sinks_receive_every_event_in_order() {
    init_tracing();
    let url = fresh_database().await;
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)))
            .await
            .expect("spawn");
    let (tx, rx) = mpsc::unbounded_channel();
    let (collector, _) = Actor::spawn(None, Collector, tx).await.expect("collector");
    tree.subscribe_actor(SubscribeRequest::tail(), collector.clone()).await.expect("subscribe actor");
    let ids = complete_n(&engine, 30).await;
    let mut stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok);
    assert_exactly_once(&take_events(&mut stream, 30, WAIT).await, &ids, true);
    // A consumer that goes away ends its subscription.
    collector.stop(None);
    complete_n(&engine, 1).await;
    wait_until(WAIT, "the subscription to end", || async {
        tree.stats().await.map(|s| s.subscribers.is_empty()).unwrap_or(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_trait_works_through_the_handle_and_dropped_streams_unsubscribe() {
    init_tracing();
    let url = fresh_database().await;
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)))
            .await
            .expect("spawn");
    let backend: Arc<dyn CompletionBackend> = Arc::new(tree.clone());
    let mut all = backend.subscribe_completions().await.expect("subscribe");
    let mut none = backend
        .subscribe_completions_filtered(&ScannerFilter::new().with_namespace(ff_completions::Namespace::new("other")))
        .await
        .expect("subscribe filtered");
    let ids = complete_n(&engine, 4).await;
    let received = AtomicUsize::new(0);
    for id in &ids {
        let payload = tokio::time::timeout(WAIT, all.next()).await.expect("in time").expect("payload");
        assert_eq!(payload.execution_id, *id);
        assert_eq!(payload.outcome, "success");
        assert!(payload.flow_id.is_some());
        received.fetch_add(1, Ordering::Relaxed);
    }
    assert!(tokio::time::timeout(Duration::from_millis(300), none.next()).await.is_err());
    assert_eq!(tree.stats().await.expect("stats").subscribers.len(), 2);
    drop(all);
    drop(none);
    wait_until(WAIT, "dropped streams to unsubscribe", || async {
        tree.stats().await.map(|s| s.subscribers.is_empty()).unwrap_or(false)
    })
    .await;
    tree.shutdown().await;
    assert!(tree.stats().await.is_err(), "a stopped tree answers no more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_outage_keeps_the_tree_alive_with_capped_backoff_and_resumes_without_loss() {
    init_tracing();
    let pg = crate::support::postgres::PrivatePg::start().await;
    let url = pg.url();
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let backend = BackendConfig::postgres(&url)
        .with_retry(ff_completions::BackendRetry::new(2, 20, 4, 0))
        .with_timeouts(ff_completions::BackendTimeouts::default().with_connect(Duration::from_millis(500)));
    // Outages are not crash loops: even a strict intensity never escalates them.
    let config = SupervisorConfig::new().with_backend(backend).with_restart_intensity(1, Duration::from_secs(60));
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn");
    let mut sub = tree.subscribe(SubscribeRequest::tail()).await.expect("sub");
    let before = complete_n(&engine, 10).await;
    assert_exactly_once(&take_events(&mut sub, 10, WAIT).await, &before, true);

    pg.kill9().await;
    wait_until(WAIT, "several restarts during the outage", || async {
        tree.stats().await.map(|s| s.listeners[0].restarts >= 6).unwrap_or(false)
    })
    .await;
    let stats = tree.stats().await.expect("the tree is alive during the outage");
    assert!(stats.listeners[0].last_error.is_some(), "{:?}", stats.listeners[0]);
    assert_eq!(tree.actor().get_status(), ractor::ActorStatus::Running);

    pg.restart().await;
    let after = complete_n(&engine, 10).await;
    assert_exactly_once(&take_events(&mut sub, 10, WAIT).await, &after, true);
    assert_no_more(&mut sub, Duration::from_millis(300)).await;
    wait_until(WAIT, "the listener to be live again", || async {
        tree.stats().await.map(|s| s.listeners[0].state == ff_completions::ListenerState::Live).unwrap_or(false)
    })
    .await;
}

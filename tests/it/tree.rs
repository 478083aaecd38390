//! The actor tree's own promises, on a real Postgres: embedding under an engine actor,
//! escalation of crash loops, filter restarts, actor sinks, the seed trait, unsubscribe, lag in
//! the stats, clamped knobs, and what an outage logs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ff_completions::{
    BackendConfig, BackendRetry, BackendTimeouts, CompletionBackend, CompletionEvent, CompletionSupervisorHandle,
    Completions, ExecutionId, ListenerState, ScannerFilter, SubscriberStats, SupervisorConfig,
};
use ff_completions_lab::{ExecutionSpec, PostgresEngine};
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::mpsc;

use crate::contract::complete_n;
use crate::support::{
    assert_exactly_once, assert_no_more, init_tracing, postgres::fresh_database, take_events, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);

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

/// A tree on a fresh database (its URL and an engine on it), linked under an [`EngineActor`] that reports escalations, with a
/// 10 ms backoff and at most 3 crashes within `within`.
async fn linked_tree(
    within: Duration,
) -> (String, PostgresEngine, CompletionSupervisorHandle, ActorRef<EngineMsg>, mpsc::UnboundedReceiver<String>) {
    init_tracing();
    let url = fresh_database().await;
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let (events_tx, escalations) = mpsc::unbounded_channel();
    let (parent, _) = Actor::spawn(None, EngineActor, events_tx).await.expect("engine actor");
    let backend = BackendConfig::postgres(&url).with_retry(BackendRetry::new(2, 10, 2, 0));
    let config = SupervisorConfig::new().with_backend(backend).with_restart_intensity(3, within);
    let (tree, _) = CompletionSupervisorHandle::spawn_linked(parent.get_cell(), config).await.expect("spawn linked");
    (url, engine, tree, parent, escalations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_linked_under_an_engine_actor_delivers_and_escalates_a_crash_loop() {
    let (url, engine, tree, parent, mut escalations) = linked_tree(Duration::from_secs(30)).await;
    assert!(parent.get_children().iter().any(|c| c.get_id() == tree.actor().get_id()));

    let mut sub = tree.subscribe(Completions::tail()).await.expect("sub");
    let ids = complete_n(&engine, 5).await;
    assert_exactly_once(&take_events(&mut sub, 5, WAIT).await, &ids, true);

    // A missing outbox is not an outage: the listener crashes in a loop, and past the
    // intensity the supervisor fails, which the engine actor sees.
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    // CASCADE: the lease and signal table's event_id default uses the outbox's sequence.
    sqlx::query("DROP TABLE ff_completion_event CASCADE").execute(&mut conn).await.expect("drop");
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
        subs.push(tree.subscribe(Completions::tail()).await.expect("sub"));
    }
    let producer = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut all = Vec::new();
            for _ in 0..20 {
                all.extend(complete_n(&*engine, 10).await);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_killed_after_a_healthy_life_restarts_at_once_every_time() {
    init_tracing();
    let url = fresh_database().await;
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    // A backoff that would reach seconds within a few kills if it grew across healthy lives.
    let backend = BackendConfig::postgres(&url).with_retry(BackendRetry::new(4, 200, 6, 0));
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend)).await.expect("spawn");
    let mut sub = tree.subscribe(Completions::tail()).await.expect("sub");
    let mut expected = Vec::new();
    for kill in 1..=6u64 {
        wait_until(WAIT, "the listener to be live", || async {
            tree.stats().await.map(|s| s.listeners[0].state == ListenerState::Live).unwrap_or(false)
        })
        .await;
        expected.extend(complete_n(&engine, 3).await);
        tree.listener_cell("postgres").await.expect("a running listener").kill();
        wait_until(WAIT, "the restart", || async {
            tree.stats().await.map(|s| s.listeners[0].restarts >= kill).unwrap_or(false)
        })
        .await;
        let listener = tree.stats().await.expect("stats").listeners[0].clone();
        assert_eq!(listener.restart_delay, Some(Duration::ZERO), "kill {kill}: {listener:?}");
    }
    expected.extend(complete_n(&engine, 3).await);
    assert_exactly_once(&take_events(&mut sub, expected.len(), WAIT).await, &expected, true);
    assert_no_more(&mut sub, Duration::from_millis(300)).await;
}

/// A consumer whose conversion panics: the filter that delivers to it panics on every event.
struct Explosive;

impl From<CompletionEvent> for Explosive {
    fn from(event: CompletionEvent) -> Self {
        panic!("this consumer cannot take {}", event.execution_id)
    }
}

struct ExplosiveSink;

impl Actor for ExplosiveSink {
    type Msg = Explosive;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _me: ActorRef<Explosive>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_panics_on_every_start_escalates_instead_of_looping() {
    let (_url, engine, tree, parent, mut escalations) = linked_tree(Duration::from_secs(60)).await;
    let (sink, _) = Actor::spawn(None, ExplosiveSink, ()).await.expect("sink");
    let id = tree.subscribe_actor(Completions::tail(), sink.clone()).await.expect("subscribe actor");
    complete_n(&engine, 1).await;
    let escalation = tokio::time::timeout(WAIT, escalations.recv()).await.expect("escalated in time").expect("event");
    assert!(escalation.contains(&format!("filter of {id}")) && escalation.contains("crashed"), "{escalation}");
    sink.stop(None);
    parent.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_started_while_its_server_is_down_takes_cursor_subscribers_at_once_and_tail_ones_once_it_can_tell_the_tail()
 {
    init_tracing();
    let pg = crate::support::postgres::PrivatePg::start().await;
    let url = pg.url();
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let backend = BackendConfig::postgres(&url)
        .with_retry(BackendRetry::new(2, 20, 3, 0))
        .with_timeouts(BackendTimeouts::default().with_connect(Duration::from_millis(500)));
    let config = SupervisorConfig::new().with_backend(backend);

    // A cursor from a first tree, to resume from while the server is down.
    let (first, _) = CompletionSupervisorHandle::spawn(config.clone()).await.expect("spawn while up");
    let mut sub = first.subscribe(Completions::tail()).await.expect("sub");
    let history = complete_n(&engine, 3).await;
    let seen = take_events(&mut sub, 3, WAIT).await;
    first.shutdown().await;

    pg.kill9().await;
    // Asked to, the spawn fails fast with the backend's own typed, transient error.
    let err = CompletionSupervisorHandle::spawn(config.clone().with_connect_at_start(true))
        .await
        .expect_err("the server is down");
    assert!(
        matches!(err, ff_completions::Error::Transport { .. } | ff_completions::Error::Unavailable { .. }),
        "{err:?}"
    );
    assert!(err.is_transient(), "{err:?}");
    // By default the tree starts, answers, and takes subscribers.
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn while down");
    let stats = tree.stats().await.expect("stats during the outage");
    assert_ne!(stats.listeners[0].state, ListenerState::Live, "{stats}");
    let mut from_cursor =
        tree.subscribe(Completions::from_cursor(seen[0].cursor.clone())).await.expect("cursor sub while down");
    // Nobody can tell the tail: asked not to wait, a tail subscription is refused at once (a
    // transient error); by default the call waits until the backend or the listener tells it.
    let refused = tree.subscribe(Completions::tail().without_waiting()).await.map(|s| s.id());
    assert!(matches!(&refused, Err(e @ ff_completions::Error::Unavailable { .. }) if e.is_transient()), "{refused:?}");
    let waiting = tokio::spawn({
        let tree = tree.clone();
        async move { tree.subscribe(Completions::tail()).await }
    });
    wait_until(WAIT, "both subscribers to wait for the backend", || async {
        tree.stats().await.map(|s| s.subscribers.len() == 2).unwrap_or(false)
    })
    .await;
    let stats = tree.stats().await.expect("stats during the outage");
    assert!(stats.subscribers.iter().all(|s| s.mode == ff_completions::FilterMode::Starting), "{stats}");
    assert!(!waiting.is_finished(), "a tail subscription is not answered while nobody can tell the tail");

    pg.restart().await;
    let mut tail = waiting.await.expect("the task").expect("tail sub answered once the server is up");
    let after = complete_n(&engine, 3).await;
    assert_exactly_once(&take_events(&mut tail, 3, WAIT).await, &after, true);
    let rest: Vec<_> = history[1..].iter().chain(&after).copied().collect();
    assert_exactly_once(&take_events(&mut from_cursor, rest.len(), WAIT).await, &rest, true);

    // Down again: a tail subscription starts at the tree's last read, so whatever is committed
    // once the server is back reaches it, without waiting for the listener first.
    pg.kill9().await;
    let mut during = tree.subscribe(Completions::tail()).await.expect("tail sub during an outage");
    pg.restart().await;
    let later = complete_n(&engine, 3).await;
    assert_exactly_once(&take_events(&mut during, 3, WAIT).await, &later, true);
    assert_exactly_once(&take_events(&mut tail, 3, WAIT).await, &later, true);
    assert_no_more(&mut during, Duration::from_millis(300)).await;
    tree.shutdown().await;
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
    tree.subscribe_actor(Completions::tail(), collector.clone()).await.expect("subscribe actor");
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

/// Completes `n` executions through plain SQL, as a producer that sends no wake-up would: only
/// the listener's own reads (its polls and safety tick) find them.
async fn complete_without_wake_ups(url: &str, engine: &PostgresEngine, n: usize) -> Vec<ExecutionId> {
    let ids = crate::contract::running(engine, ExecutionSpec::new, n).await;
    let mut conn = PgConnection::connect(url).await.expect("connect");
    for id in &ids {
        crate::support::postgres::complete_by_sql(&mut conn, *id).await;
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_safety_tick_is_clamped_and_still_finds_what_no_notification_announced() {
    init_tracing();
    let url = fresh_database().await;
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let built = SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)).with_tick(Duration::ZERO);
    assert_eq!(built.tick, Duration::from_millis(1));
    // Fields are public: the tree clamps what was set directly as well.
    let mut direct = SupervisorConfig::new().with_backend(BackendConfig::postgres(&url));
    (direct.tick, direct.held_back_repoll, direct.batch_size, direct.subscriber_buffer) =
        (Duration::ZERO, Duration::ZERO, 0, 0);
    let (built, _) = CompletionSupervisorHandle::spawn(built).await.expect("spawn with a zero tick");
    let (direct, _) = CompletionSupervisorHandle::spawn(direct).await.expect("spawn with zero fields");
    let mut subs = [
        built.subscribe(Completions::tail()).await.expect("sub"),
        direct.subscribe(Completions::tail()).await.expect("sub"),
    ];
    let ids = complete_without_wake_ups(&url, &engine, 5).await;
    for sub in &mut subs {
        assert_exactly_once(&take_events(sub, 5, WAIT).await, &ids, true);
    }
    for tree in [&built, &direct] {
        let stats = tree.stats().await.expect("stats");
        assert_eq!(stats.listeners[0].restarts, 0, "{:?}", stats.listeners[0]);
    }
}

fn subscriber(stats: &[SubscriberStats], id: ff_completions::SubscriberId) -> SubscriberStats {
    stats.iter().find(|s| s.id == id).cloned().unwrap_or_else(|| panic!("no stats for {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_shows_lag_in_events_and_time_until_it_reads_everything() {
    init_tracing();
    let url = fresh_database().await;
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let config = SupervisorConfig::new()
        .with_backend(BackendConfig::postgres(&url))
        .with_subscriber_buffer(4)
        .with_tick(Duration::from_millis(100));
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn");
    let mut fast = tree.subscribe(Completions::tail()).await.expect("fast");
    let mut slow = tree.subscribe(Completions::tail()).await.expect("slow");
    let (fast_id, slow_id) = (fast.id(), slow.id());

    let ids = complete_n(&engine, 30).await;
    assert_exactly_once(&take_events(&mut fast, 30, WAIT).await, &ids, true);
    // The slow one took nothing: 4 events sit in its buffer, the other 26 wait.
    wait_until(WAIT, "the fast subscriber at 0 lag and the slow one 26 events behind", || async {
        let Ok(stats) = tree.stats().await else { return false };
        let (f, s) = (subscriber(&stats.subscribers, fast_id), subscriber(&stats.subscribers, slow_id));
        f.lag_events == Some(0) && f.lag_ms == 0 && s.lag_events == Some(26) && s.lag_ms > 0
    })
    .await;
    let before = subscriber(&tree.stats().await.expect("stats").subscribers, slow_id).lag_ms;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let later = subscriber(&tree.stats().await.expect("stats").subscribers, slow_id);
    assert!(later.lag_ms >= before + 50, "the time lag of a stalled subscriber grows: {before} then {later:?}");
    assert!(later.to_string().contains("lag 26 events"), "{later}");

    assert_exactly_once(&take_events(&mut slow, 30, WAIT).await, &ids, true);
    wait_until(WAIT, "the slow subscriber's lag back to 0", || async {
        let Ok(stats) = tree.stats().await else { return false };
        let s = subscriber(&stats.subscribers, slow_id);
        s.lag_events == Some(0) && s.lag_ms == 0
    })
    .await;
}

/// Every formatted log line of the current thread, kept for the test to read.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&bytes).lines().map(str::to_owned).collect()
    }

    fn matching(&self, level: &str, text: &str) -> Vec<String> {
        self.lines().into_iter().filter(|l| l.trim_start().starts_with(level) && l.contains(text)).collect()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Polls the stats until the listener has restarted `n` times, collecting the restart delays
/// seen (each change once); returns the restart count.
async fn wait_for_restarts(
    tree: &CompletionSupervisorHandle,
    n: u64,
    within: Duration,
    delays: &mut Vec<Duration>,
) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let stats = tree.stats().await.expect("the tree is alive during the outage");
        let listener = &stats.listeners[0];
        if let Some(delay) = listener.restart_delay.filter(|d| delays.last() != Some(d)) {
            delays.push(delay);
        }
        if listener.restarts >= n {
            return listener.restarts;
        }
        assert!(
            Instant::now() < deadline,
            "{} restarts, not {n}, within {within:?}; delays {delays:?}",
            listener.restarts
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const OUTAGE_PASSWORD: &str = "outage-pw-7f3a9c";

// One thread: the test's log capture (a thread-local default subscriber) sees every actor.
#[tokio::test(flavor = "current_thread")]
async fn a_server_outage_keeps_the_tree_alive_with_capped_backoff_logs_once_and_resumes_without_loss() {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,ff_completions=debug"))
        .with_writer(logs.clone())
        .with_ansi(false)
        .without_time()
        .finish();
    let _capture = tracing::subscriber::set_default(subscriber);

    let pg = crate::support::postgres::PrivatePg::start().await;
    // The server trusts every local connection; the password is there to be kept out of logs.
    let url = format!("postgres://postgres:{OUTAGE_PASSWORD}@127.0.0.1:{}/postgres", pg.port);
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let retry = BackendRetry::new(2, 20, 4, 0);
    let cap = retry.max_delay();
    assert_eq!(cap, Duration::from_millis(320));
    let backend = BackendConfig::postgres(&url)
        .with_retry(retry)
        .with_timeouts(BackendTimeouts::default().with_connect(Duration::from_millis(500)));
    // Outages are not crash loops: even a strict intensity never escalates them.
    let config = SupervisorConfig::new().with_backend(backend).with_restart_intensity(1, Duration::from_secs(60));
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn");
    let mut sub = tree.subscribe(Completions::tail()).await.expect("sub");
    let before = complete_n(&engine, 10).await;
    assert_exactly_once(&take_events(&mut sub, 10, WAIT).await, &before, true);

    pg.kill9().await;
    // 20, 40, 80, 160, then 320 ms forever: after 6 restarts the delay is at its cap.
    let mut delays = Vec::new();
    let restarts = wait_for_restarts(&tree, 6, WAIT, &mut delays).await;
    // A capped backoff restarts at least every cap (plus a refused connect attempt); an
    // uncapped one would need 640 + 1280 + 2560 + 5120 + 10240 ms for the next five.
    let restarts = wait_for_restarts(&tree, restarts + 5, Duration::from_secs(12), &mut delays).await;
    assert!(delays.iter().all(|d| *d <= cap), "a restart delay above the cap: {delays:?}");
    assert!(delays.contains(&cap), "the delay reached its cap: {delays:?}");
    let stats = tree.stats().await.expect("stats");
    let last_error = stats.listeners[0].last_error.clone().expect("the outage's error is reported");
    assert!(!last_error.contains(OUTAGE_PASSWORD), "{last_error}");
    assert_eq!(tree.actor().get_status(), ractor::ActorStatus::Running);

    pg.restart().await;
    let after = complete_n(&engine, 10).await;
    assert_exactly_once(&take_events(&mut sub, 10, WAIT).await, &after, true);
    assert_no_more(&mut sub, Duration::from_millis(300)).await;
    wait_until(WAIT, "the listener to be live again", || async {
        tree.stats().await.map(|s| s.listeners[0].state == ListenerState::Live).unwrap_or(false)
    })
    .await;

    // Logged once: one warning for the whole outage, repeats at debug, one `reconnected`.
    let lines = logs.lines();
    let warnings: Vec<_> = logs.matching("WARN", "ff_completions");
    assert_eq!(warnings.len(), 1, "one warning for the whole outage: {warnings:#?}");
    assert!(warnings[0].contains("listener exited"), "{}", warnings[0]);
    assert!(warnings[0].contains("ff_supervisor{"), "the supervisor logs in its span: {}", warnings[0]);
    let repeats = logs.matching("DEBUG", "listener exited again");
    assert!(repeats.len() as u64 + 1 >= restarts, "{} debug repeats for {restarts} restarts", repeats.len());
    let reconnected = logs.matching("INFO", "reconnected");
    assert_eq!(reconnected.len(), 1, "{reconnected:#?}");
    let line = &reconnected[0];
    assert!(line.contains("ff_listener{") && line.contains("backend=postgres"), "in the listener's span: {line}");
    let attempts: u64 = line
        .split("attempts=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no attempt count in {line}"));
    assert!(
        attempts >= restarts - 1 && attempts <= restarts + 1,
        "{attempts} attempts for {restarts} restarts: {line}"
    );
    assert!(line.contains("outage="), "{line}");
    let caught_up = logs.matching("INFO", "caught up");
    assert!(
        caught_up.iter().any(|l| l.contains("ff_filter{") && l.contains(&format!("subscriber={}", sub.id()))),
        "the filter logs in its span: {caught_up:#?}"
    );
    let leaked: Vec<_> = lines.iter().filter(|l| l.contains(OUTAGE_PASSWORD)).collect();
    assert!(leaked.is_empty(), "the password is in the logs: {leaked:#?}");
}

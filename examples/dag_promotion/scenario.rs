//! The DAG promotion scenario, shared by the example and its test: build flows (fan-out, fan-in,
//! a chain, a diamond), run workers that claim and finish executions, and promote or skip
//! children from completion events in an actor spawned beside the completion tree under one
//! engine actor. A reconciler scans for edges the promoter missed; it should find none. With the
//! promoter disabled the subscriber only counts completions, and the reconciler alone drives
//! every flow to its final state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ff_completions::{
    BackendConfig, CompletionEvent, CompletionSupervisorHandle, DependencyResolution, Engine, ExecutionId,
    ExecutionSpec, FlowId, SubscribeRequest, SupervisorConfig, TimestampMs, connect_engine,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Mutex, Notify};

/// What a worker does with an execution, fixed up front from the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Succeed,
    Fail,
    /// Fails retryably on the first attempt, succeeds on the second.
    RetryThenSucceed,
    Cancel,
}

/// Size and behaviour of a run.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub backend: BackendConfig,
    pub flows: usize,
    pub fan_out: usize,
    pub chain_len: usize,
    pub workers: usize,
    pub fail_percent: u32,
    pub retry_percent: u32,
    pub cancel_percent: u32,
    pub seed: u64,
    /// At random intervals, kill the listener actor and (on servers, taking turns with it) its
    /// connection: the LISTEN connection on Postgres (`pg_terminate_backend`), the blocking
    /// `XREAD` connection on Valkey (`CLIENT KILL`).
    pub chaos: bool,
    /// Resolve children from completion events. When false the subscriber only counts
    /// completions and the reconciler alone resolves every edge.
    pub promoter: bool,
    /// How often the reconciler scans for unresolved edges (it resolves an edge seen in two
    /// scans in a row).
    pub reconcile_every: Duration,
    pub progress: bool,
    pub timeout: Duration,
}

/// What a run measured and whether the final states were right.
#[derive(Debug, Default)]
pub struct Report {
    pub executions: usize,
    pub by_outcome: BTreeMap<String, u64>,
    pub promotions: u64,
    pub skips: u64,
    pub hop_ms: Vec<f64>,
    pub events: u64,
    pub elapsed: Duration,
    pub listener_restarts: u64,
    /// Every fault the chaos task injected: listener kills plus connection kills.
    pub chaos_faults: u64,
    /// Notification connections killed from outside (`pg_terminate_backend`, `CLIENT KILL`).
    pub connection_kills: u64,
    pub reconciler_fixed: u64,
    pub mismatches: Vec<String>,
}

impl Report {
    pub fn percentile(&self, p: f64) -> f64 {
        let mut v = self.hop_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return 0.0;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

/// One flow's executions with their parents, in an order where parents come first.
struct Dag {
    nodes: Vec<(ExecutionSpec, Decision)>,
}

fn decide(rng: &mut StdRng, s: &Scenario) -> Decision {
    let roll = rng.random_range(0..100);
    if roll < s.fail_percent {
        Decision::Fail
    } else if roll < s.fail_percent + s.retry_percent {
        Decision::RetryThenSucceed
    } else if roll < s.fail_percent + s.retry_percent + s.cancel_percent {
        Decision::Cancel
    } else {
        Decision::Succeed
    }
}

/// root -> fan-out -> fan-in -> chain -> diamond.
fn build_flow(flow: &FlowId, s: &Scenario, rng: &mut StdRng) -> Dag {
    let mut nodes: Vec<(ExecutionSpec, Decision)> = Vec::new();
    let mut add = |parents: Vec<ExecutionId>, rng: &mut StdRng| {
        let spec = ExecutionSpec::new(flow).with_namespace("dag").with_parents(parents).with_max_attempts(2);
        let id = spec.id;
        nodes.push((spec, decide(rng, s)));
        id
    };
    let root = add(vec![], rng);
    let fanned: Vec<_> = (0..s.fan_out.max(1)).map(|_| add(vec![root], rng)).collect();
    let mut last = add(fanned, rng);
    for _ in 0..s.chain_len {
        last = add(vec![last], rng);
    }
    let (left, right) = (add(vec![last], rng), add(vec![last], rng));
    add(vec![left, right], rng);
    Dag { nodes }
}

/// The state the DAG implies: skipped under any parent that did not succeed, else the decision.
fn expected_states(dags: &[Dag]) -> HashMap<ExecutionId, &'static str> {
    let mut states = HashMap::new();
    for dag in dags {
        for (spec, decision) in &dag.nodes {
            let blocked = spec.parents.iter().any(|p| states.get(p) != Some(&"success"));
            let state = match (blocked, decision) {
                (true, _) => "skipped",
                (false, Decision::Succeed | Decision::RetryThenSucceed) => "success",
                (false, Decision::Fail) => "failed",
                (false, Decision::Cancel) => "cancelled",
            };
            states.insert(spec.id, state);
        }
    }
    states
}

/// Shared counters of the run.
#[derive(Default)]
struct Progress {
    terminal: AtomicU64,
    promotions: AtomicU64,
    skips: AtomicU64,
    hop_ms: Mutex<Vec<f64>>,
    by_outcome: Mutex<BTreeMap<String, u64>>,
    done: Notify,
    total: AtomicU64,
    bar: Option<indicatif::ProgressBar>,
}

/// The DAG promotion actor: on each completion, resolves the edges to its children.
struct Promoter;

pub struct Completed(CompletionEvent);

impl From<CompletionEvent> for Completed {
    fn from(event: CompletionEvent) -> Self {
        Self(event)
    }
}

struct PromoterState {
    engine: Arc<dyn Engine>,
    progress: Arc<Progress>,
    /// False: count completions only, resolve nothing (the reconciler's job then).
    resolve: bool,
}

impl Actor for Promoter {
    type Msg = Completed;
    type State = PromoterState;
    type Arguments = PromoterState;

    async fn pre_start(
        &self,
        _me: ActorRef<Completed>,
        args: PromoterState,
    ) -> Result<PromoterState, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _me: ActorRef<Completed>,
        msg: Completed,
        state: &mut PromoterState,
    ) -> Result<(), ActorProcessingErr> {
        let event = msg.0;
        let children = if state.resolve { state.engine.children(&event.execution_id).await? } else { Vec::new() };
        for child in children {
            match state.engine.resolve_dependency(&event.execution_id, &child).await? {
                DependencyResolution::Promoted => {
                    state.progress.promotions.fetch_add(1, Ordering::Relaxed);
                    let hop = TimestampMs::now().millis_since(event.at) as f64;
                    state.progress.hop_ms.lock().await.push(hop);
                }
                DependencyResolution::Skipped => {
                    state.progress.skips.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        let outcome = event.outcome.as_wire().to_owned();
        *state.progress.by_outcome.lock().await.entry(outcome).or_default() += 1;
        let p = &state.progress;
        let n = p.terminal.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(bar) = &p.bar {
            bar.set_position(n);
        }
        if n >= p.total.load(Ordering::Relaxed) {
            p.done.notify_one();
        }
        Ok(())
    }
}

/// The engine's own actor: parent of the completion tree and of the promoter.
struct EngineActor;

impl Actor for EngineActor {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _me: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<()>,
        event: SupervisionEvent,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(who, err) = event {
            tracing::error!(actor = ?who.get_id(), error = %err, "child of the engine failed");
        }
        Ok(())
    }
}

async fn work(
    engine: Arc<dyn Engine>,
    decisions: Arc<HashMap<ExecutionId, Decision>>,
    name: String,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let claimed = match engine.claim(&name, 16).await {
            Ok(ids) => ids,
            Err(err) => {
                tracing::warn!(error = %err, "claim failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if claimed.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for id in claimed {
            let result = match decisions.get(&id).copied().unwrap_or(Decision::Succeed) {
                Decision::Succeed => engine.complete(&id).await.map(|_| ()),
                Decision::Fail => engine.fail(&id, false).await.map(|_| ()),
                Decision::Cancel => engine.cancel(&id).await.map(|_| ()),
                Decision::RetryThenSucceed => match engine.execution(&id).await {
                    Ok(Some(info)) if info.attempt <= 1 => engine.fail(&id, true).await.map(|_| ()),
                    _ => engine.complete(&id).await.map(|_| ()),
                },
            };
            if let Err(err) = result {
                tracing::warn!(%id, error = %err, "worker operation failed");
            }
        }
    }
}

/// Resolves edges whose parent has been terminal for two scans in a row; returns how many.
/// Promotions and skips it causes are counted with the promoter's.
async fn reconcile(
    engine: &dyn Engine,
    previously: &mut std::collections::HashSet<(ExecutionId, ExecutionId)>,
    progress: &Progress,
    promoter: bool,
) -> u64 {
    let Ok(now) = engine.unresolved_dependencies(10_000).await else { return 0 };
    let now: std::collections::HashSet<_> = now.into_iter().collect();
    let mut fixed = 0;
    for (parent, child) in now.intersection(previously) {
        let resolution = engine.resolve_dependency(parent, child).await;
        match resolution {
            Ok(DependencyResolution::Promoted) => {
                progress.promotions.fetch_add(1, Ordering::Relaxed);
            }
            Ok(DependencyResolution::Skipped) => {
                progress.skips.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if let Ok(DependencyResolution::Promoted | DependencyResolution::Skipped | DependencyResolution::Waiting) =
            resolution
        {
            if promoter {
                tracing::warn!(%parent, %child, "reconciler resolved an edge the promoter missed");
            } else {
                tracing::debug!(%parent, %child, "reconciler resolved an edge");
            }
            fixed += 1;
        }
    }
    *previously = now;
    fixed
}

/// What the chaos task did.
#[derive(Debug, Default)]
struct ChaosCount {
    listener_kills: u64,
    connection_kills: u64,
}

/// Kills the listener's notification connection from outside the tree, the way an operator or
/// a network fault would: `pg_terminate_backend` on Postgres, `CLIENT KILL` on Valkey. SQLite
/// has no such connection. Its own admin connection is made on first use and again after an
/// error.
enum ConnectionKiller {
    Nothing,
    #[cfg(feature = "postgres")]
    Postgres {
        url: String,
        pool: Option<sqlx::PgPool>,
    },
    #[cfg(feature = "valkey")]
    Valkey {
        backend: BackendConfig,
        client: Option<ferriskey::Client>,
    },
}

impl ConnectionKiller {
    fn new(backend: &BackendConfig) -> Self {
        match &backend.connection {
            #[cfg(feature = "postgres")]
            ff_completions::BackendConnection::Postgres(pg) => Self::Postgres { url: pg.url.clone(), pool: None },
            #[cfg(feature = "valkey")]
            ff_completions::BackendConnection::Valkey(_) => Self::Valkey { backend: backend.clone(), client: None },
            _ => Self::Nothing,
        }
    }

    /// Kills every listener connection it finds; returns how many. On error the admin
    /// connection is dropped, to be made again next time.
    async fn kill(&mut self) -> Result<u64, String> {
        match self {
            Self::Nothing => Ok(0),
            #[cfg(feature = "postgres")]
            Self::Postgres { url, pool } => {
                let result = terminate_postgres_listeners(url, pool).await;
                if result.is_err() {
                    *pool = None;
                }
                result
            }
            #[cfg(feature = "valkey")]
            Self::Valkey { backend, client } => {
                let result = kill_valkey_listeners(backend, client).await;
                if result.is_err() {
                    *client = None;
                }
                result
            }
        }
    }
}

/// `pg_terminate_backend` of every session named like the listener's LISTEN connection.
#[cfg(feature = "postgres")]
async fn terminate_postgres_listeners(url: &str, pool: &mut Option<sqlx::PgPool>) -> Result<u64, String> {
    let pool = match pool {
        Some(pool) => pool,
        None => pool.insert(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await
                .map_err(|e| format!("chaos connect to postgres: {e}"))?,
        ),
    };
    // Materialized first, so the filter on the name runs before any backend is terminated.
    let killed: i64 = sqlx::query_scalar(
        "WITH listeners AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE application_name = $1) \
         SELECT count(*) FROM listeners WHERE pg_terminate_backend(pid)",
    )
    .bind(ff_completions::backends::postgres::LISTENER_APPLICATION_NAME)
    .fetch_one(&*pool)
    .await
    .map_err(|e| format!("pg_terminate_backend: {e}"))?;
    Ok(killed.max(0) as u64)
}

/// `CLIENT KILL ID` of every connection named like the listener's blocking one
/// ([`LISTENER_CLIENT_NAME`](ff_completions::backends::valkey::LISTENER_CLIENT_NAME)), found
/// with `CLIENT LIST` on an admin client of the scenario's own connection settings.
#[cfg(feature = "valkey")]
async fn kill_valkey_listeners(backend: &BackendConfig, client: &mut Option<ferriskey::Client>) -> Result<u64, String> {
    let client = match client {
        Some(client) => client,
        None => client.insert(
            ff_completions::backends::valkey::connect_client(backend, "ff-completions-dag-chaos")
                .await
                .map_err(|e| format!("chaos connect to valkey: {e}"))?,
        ),
    };
    let list: String = client.cmd("CLIENT").arg("LIST").execute().await.map_err(|e| format!("CLIENT LIST: {e}"))?;
    let name = format!("name={}", ff_completions::backends::valkey::LISTENER_CLIENT_NAME);
    let ids: Vec<&str> = list
        .lines()
        .filter(|line| line.split_whitespace().any(|kv| kv == name))
        .filter_map(|line| line.split_whitespace().find_map(|kv| kv.strip_prefix("id=")))
        .collect();
    let mut killed = 0;
    for id in ids {
        // The reply counts the clients killed: 0 when the connection closed meanwhile.
        let n: i64 = client
            .cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .execute()
            .await
            .map_err(|e| format!("CLIENT KILL ID {id}: {e}"))?;
        killed += n.max(0) as u64;
    }
    Ok(killed)
}

/// Until `stop`, one fault after a random 50 to 300 ms or a random 20 to 80 completions,
/// whichever comes first (both from the seed), so even a run that ends in half a second takes
/// several faults. On servers the faults take turns, the listener's connection first, then the
/// listener actor; on SQLite, which has no such connection, every fault kills the actor.
async fn chaos(
    tree: CompletionSupervisorHandle,
    backend: BackendConfig,
    seed: u64,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
) -> ChaosCount {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc4a05);
    let mut count = ChaosCount::default();
    let mut killer = ConnectionKiller::new(&backend);
    let has_connection = !matches!(killer, ConnectionKiller::Nothing);
    let mut connection_next = has_connection;
    loop {
        let due = Instant::now() + Duration::from_millis(rng.random_range(50..300));
        let due_at_completion = progress.terminal.load(Ordering::Relaxed) + rng.random_range(20..80);
        while Instant::now() < due
            && progress.terminal.load(Ordering::Relaxed) < due_at_completion
            && !stop.load(Ordering::Relaxed)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if connection_next {
            match killer.kill().await {
                Ok(n) => count.connection_kills += n,
                Err(err) => tracing::warn!(error = %err, "chaos could not kill the listener's connection"),
            }
        } else if let Some(cell) = tree.listener_cell(backend.kind()).await {
            cell.kill();
            count.listener_kills += 1;
        }
        connection_next = has_connection && !connection_next;
    }
    count
}

/// Runs the scenario to the end and checks every final state.
///
/// # Errors
/// Setup failures (backend unreachable); wrong final states are reported in `mismatches`.
pub async fn run(s: &Scenario) -> Result<Report, ff_completions::EngineError> {
    let engine = connect_engine(&s.backend).await?;
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut dags = Vec::with_capacity(s.flows);
    for _ in 0..s.flows {
        let flow = FlowId::new();
        engine.create_flow(&flow, None).await?;
        dags.push(build_flow(&flow, s, &mut rng));
    }
    let total: usize = dags.iter().map(|d| d.nodes.len()).sum();
    let bar = s.progress.then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} completions {per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let progress = Arc::new(Progress { total: AtomicU64::new(total as u64), bar, ..Progress::default() });

    // The engine actor parents both the completion tree and the promoter.
    let (engine_actor, _) = Actor::spawn(None, EngineActor, ()).await.map_err(actor_err)?;
    let config = SupervisorConfig::new().with_backend(s.backend.clone()).with_tick(Duration::from_millis(500));
    let (tree, _) = CompletionSupervisorHandle::spawn_linked(engine_actor.get_cell(), config).await?;
    let promoter_state = PromoterState { engine: engine.clone(), progress: progress.clone(), resolve: s.promoter };
    let (promoter, _) =
        Actor::spawn_linked(None, Promoter, promoter_state, engine_actor.get_cell()).await.map_err(actor_err)?;
    tree.subscribe_actor(SubscribeRequest::tail(), promoter.clone()).await?;

    // Create executions after subscribing, so every completion is seen.
    let started = Instant::now();
    let mut decisions = HashMap::with_capacity(total);
    for dag in &dags {
        for (spec, decision) in &dag.nodes {
            engine.create_execution(spec).await?;
            decisions.insert(spec.id, *decision);
        }
    }
    let decisions = Arc::new(decisions);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..s.workers.max(1))
        .map(|i| tokio::spawn(work(engine.clone(), decisions.clone(), format!("worker-{i}"), stop.clone())))
        .collect();
    let chaos_task =
        s.chaos.then(|| tokio::spawn(chaos(tree.clone(), s.backend.clone(), s.seed, progress.clone(), stop.clone())));

    let mut reconciler_fixed = 0;
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + s.timeout;
    while progress.terminal.load(Ordering::Relaxed) < total as u64 && Instant::now() < deadline {
        let _ = tokio::time::timeout(s.reconcile_every, progress.done.notified()).await;
        reconciler_fixed += reconcile(&*engine, &mut seen, &progress, s.promoter).await;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let chaos_count = match chaos_task {
        Some(t) => t.await.unwrap_or_default(),
        None => ChaosCount::default(),
    };
    if let Some(bar) = &progress.bar {
        bar.finish_and_clear();
    }
    // Once more at the end: anything still unresolved was missed.
    reconciler_fixed += reconcile(&*engine, &mut seen, &progress, s.promoter).await;
    let stats = tree.stats().await?;

    let mut mismatches = Vec::new();
    for (id, want) in expected_states(&dags) {
        match engine.execution(&id).await? {
            Some(info) if info.state == want => {}
            other => mismatches.push(format!("{id}: expected {want}, found {:?}", other.map(|i| i.state))),
        }
    }
    engine_actor.stop(None);
    let report = Report {
        executions: total,
        by_outcome: progress.by_outcome.lock().await.clone(),
        promotions: progress.promotions.load(Ordering::Relaxed),
        skips: progress.skips.load(Ordering::Relaxed),
        hop_ms: progress.hop_ms.lock().await.clone(),
        events: progress.terminal.load(Ordering::Relaxed),
        elapsed,
        listener_restarts: stats.listeners.iter().map(|l| l.restarts).sum(),
        chaos_faults: chaos_count.listener_kills + chaos_count.connection_kills,
        connection_kills: chaos_count.connection_kills,
        reconciler_fixed,
        mismatches,
    };
    Ok(report)
}

fn actor_err(e: ractor::SpawnErr) -> ff_completions::EngineError {
    ff_completions::EngineError::Actor { detail: e.to_string() }
}

/// Prints the summary table.
pub fn print_summary(r: &Report) {
    println!("executions        {}", r.executions);
    for (outcome, n) in &r.by_outcome {
        println!("  {outcome:<15} {n}");
    }
    println!("promotions        {}", r.promotions);
    println!("skips             {}", r.skips);
    println!(
        "hop latency       p50 {:.1} ms, p99 {:.1} ms (completion committed -> child eligible)",
        r.percentile(0.5),
        r.percentile(0.99)
    );
    println!("events/s          {:.0}", r.events as f64 / r.elapsed.as_secs_f64().max(1e-9));
    println!("elapsed           {:.2?}", r.elapsed);
    println!("listener restarts {}", r.listener_restarts);
    println!("chaos faults      {} ({} connection kills)", r.chaos_faults, r.connection_kills);
    let why = if r.chaos_faults > 0 {
        "under chaos it also resolves edges whose events a restarting listener has not delivered yet"
    } else {
        "with the promoter on, 0 means it missed nothing"
    };
    println!("reconciler fixes  {} ({why})", r.reconciler_fixed);
    if r.mismatches.is_empty() {
        println!("verified          every execution reached the state the DAG implies");
    } else {
        println!("verification FAILED for {} executions, e.g.:", r.mismatches.len());
        for m in r.mismatches.iter().take(10) {
            println!("  {m}");
        }
    }
}

//! The DAG promotion scenario, shared by the example and its test: build flows (fan-out, fan-in,
//! a chain, a diamond), run workers that claim and finish executions, and promote or skip
//! children from completion events in an actor spawned beside the completion tree under one
//! engine actor. The promoter resolves each delivered batch of completions in one engine call
//! (one transaction on SQLite, one function call on Postgres), so it keeps up with the workers.
//! It also keeps a ledger of completions by execution id: the run fails on a duplicate or a
//! missing one, whatever the reconciler did. A reconciler scans for edges the promoter missed;
//! it should find none. With the promoter disabled the subscriber only counts completions, and
//! the reconciler alone drives every flow to its final state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex as SyncMutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ff_completions::{
    BackendConfig, CompletionEvent, CompletionSupervisorHandle, DependencyResolution, Engine, ExecutionId,
    ExecutionSpec, FlowId, PARTITION_COUNT, ScannerFilter, SubscribeRequest, SupervisorConfig, TimestampMs,
    connect_engine,
};
use hdrhistogram::Histogram;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Mutex, Notify};

use super::faults::{ChaosCount, chaos};

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
    /// Promoter actors; each completion goes to the one of its flow's partition, so each
    /// flow's completions stay in order and the promoters never touch the same children.
    pub promoters: usize,
    pub fail_percent: u32,
    pub retry_percent: u32,
    pub cancel_percent: u32,
    pub seed: u64,
    /// At random intervals, kill the listener actor and (on servers, taking turns with it) its
    /// connection: the LISTEN connection on Postgres (`pg_terminate_backend`), the subscriber
    /// connection on Valkey (`CLIENT KILL`).
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
#[derive(Debug)]
pub struct Report {
    pub executions: usize,
    pub by_outcome: BTreeMap<String, u64>,
    /// Dependency edges in the DAGs.
    pub edges: u64,
    pub promotions: u64,
    pub skips: u64,
    /// Completion committed -> the promoter has the event, in microseconds.
    pub delivery_us: Histogram<u64>,
    /// Completion committed -> the child it promoted is eligible, in microseconds (promotions
    /// by the promoter only).
    pub promotion_us: Histogram<u64>,
    /// How long the promoters' engine calls took, in microseconds.
    pub call_us: Histogram<u64>,
    /// Engine calls the promoter made to resolve its batches, and the events in them.
    pub batches: u64,
    pub batched_events: u64,
    /// Distinct executions whose completion the promoter received.
    pub events: u64,
    /// Executions whose completion arrived more than once (the count), and executions whose
    /// completion never arrived.
    pub duplicates: Vec<(ExecutionId, u32)>,
    pub missing: Vec<ExecutionId>,
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
    /// Every execution's completion arrived exactly once.
    pub fn exactly_once(&self) -> bool {
        self.duplicates.is_empty() && self.missing.is_empty() && self.events == self.executions as u64
    }
}

/// A histogram of microseconds from 1 µs to an hour, 3 significant figures.
fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

impl Default for Report {
    fn default() -> Self {
        Self {
            executions: 0,
            by_outcome: BTreeMap::new(),
            edges: 0,
            promotions: 0,
            skips: 0,
            delivery_us: micros_histogram(),
            promotion_us: micros_histogram(),
            call_us: micros_histogram(),
            batches: 0,
            batched_events: 0,
            events: 0,
            duplicates: Vec::new(),
            missing: Vec::new(),
            elapsed: Duration::ZERO,
            listener_restarts: 0,
            chaos_faults: 0,
            connection_kills: 0,
            reconciler_fixed: 0,
            mismatches: Vec::new(),
        }
    }
}

/// Microseconds from a completion's commit time (whole milliseconds, taken inside the
/// committing transaction or function) to now: errs high by up to a millisecond.
fn micros_since(at: TimestampMs) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (now.as_micros() as u64).saturating_sub((at.0.max(0) as u64).saturating_mul(1000)).max(1)
}

/// The `i`th of `n` contiguous shares of the flow partitions.
fn partition_share(i: usize, n: usize) -> std::ops::RangeInclusive<u16> {
    let count = usize::from(PARTITION_COUNT);
    let start = i * count / n;
    let end = (i + 1) * count / n - 1;
    start as u16..=end as u16
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
    /// Distinct executions whose completion arrived.
    terminal: Arc<AtomicU64>,
    promotions: AtomicU64,
    skips: AtomicU64,
    latencies: SyncMutex<Latencies>,
    /// Completions received per execution: the exactly-once ledger.
    ledger: SyncMutex<HashMap<ExecutionId, u32>>,
    by_outcome: Mutex<BTreeMap<String, u64>>,
    done: Notify,
    total: AtomicU64,
    bar: Option<indicatif::ProgressBar>,
}

/// Latency histograms and batch counts of the promoter.
struct Latencies {
    delivery_us: Histogram<u64>,
    promotion_us: Histogram<u64>,
    call_us: Histogram<u64>,
    batches: u64,
    batched_events: u64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            delivery_us: micros_histogram(),
            promotion_us: micros_histogram(),
            call_us: micros_histogram(),
            batches: 0,
            batched_events: 0,
        }
    }
}

impl Progress {
    fn latencies(&self) -> std::sync::MutexGuard<'_, Latencies> {
        self.latencies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a completion in the ledger; true the first time its execution is seen.
    fn first_sight(&self, id: ExecutionId) -> bool {
        let mut ledger = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let count = ledger.entry(id).or_default();
        *count += 1;
        *count == 1
    }
}

/// The DAG promotion actor. Completions queue up in its mailbox while it works; behind each
/// run of them it queues one `Flush`, which resolves the children of the whole run in one
/// engine call.
struct Promoter;

pub enum PromoterMsg {
    /// A completion, cast by the completion tree's filter, with its delivery latency (measured
    /// as the filter hands it over).
    Completed(CompletionEvent, u64),
    /// Resolve what arrived since the last flush. Sent by the promoter itself.
    Flush,
}

impl From<CompletionEvent> for PromoterMsg {
    fn from(event: CompletionEvent) -> Self {
        let delivery_us = micros_since(event.at);
        Self::Completed(event, delivery_us)
    }
}

struct PromoterState {
    engine: Arc<dyn Engine>,
    progress: Arc<Progress>,
    /// False: count completions only, resolve nothing (the reconciler's job then).
    resolve: bool,
    /// Completions received since the last flush.
    pending: Vec<CompletionEvent>,
    flush_queued: bool,
}

impl PromoterState {
    fn new(engine: Arc<dyn Engine>, progress: Arc<Progress>, resolve: bool) -> Self {
        Self { engine, progress, resolve, pending: Vec::new(), flush_queued: false }
    }

    fn on_completed(&mut self, me: &ActorRef<PromoterMsg>, event: CompletionEvent, delivery_us: u64) {
        self.progress.latencies().delivery_us.saturating_record(delivery_us);
        if !self.progress.first_sight(event.execution_id) {
            tracing::error!(execution = %event.execution_id, "a completion arrived twice");
            return;
        }
        self.pending.push(event);
        if !self.flush_queued {
            self.flush_queued = me.cast(PromoterMsg::Flush).is_ok();
        }
    }

    async fn flush(&mut self, me: &ActorRef<PromoterMsg>) {
        self.flush_queued = false;
        if self.pending.is_empty() {
            return;
        }
        if self.resolve {
            let parents: Vec<ExecutionId> = self.pending.iter().map(|e| e.execution_id).collect();
            let called = Instant::now();
            match self.engine.resolve_children(&parents).await {
                Ok(edges) => {
                    self.progress.latencies().call_us.saturating_record(called.elapsed().as_micros() as u64);
                    self.count_resolved(&edges);
                }
                Err(err) => {
                    // Keep the batch and try again shortly (the engine's connection may be back).
                    tracing::warn!(error = %err, events = parents.len(), "resolving a batch failed; retrying");
                    self.flush_queued = true;
                    me.send_after(Duration::from_millis(20), || PromoterMsg::Flush);
                    return;
                }
            }
        }
        let batch = std::mem::take(&mut self.pending);
        {
            let mut latencies = self.progress.latencies();
            latencies.batches += 1;
            latencies.batched_events += batch.len() as u64;
        }
        let p = &self.progress;
        {
            let mut by_outcome = p.by_outcome.lock().await;
            for event in &batch {
                *by_outcome.entry(event.outcome.as_wire().to_owned()).or_default() += 1;
            }
        }
        let n = p.terminal.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64;
        if let Some(bar) = &p.bar {
            bar.set_position(n);
        }
        if n >= p.total.load(Ordering::Relaxed) {
            p.done.notify_one();
        }
    }

    /// Counts promotions (with their latency from the parent's commit) and skips.
    fn count_resolved(&self, edges: &[ff_completions::ResolvedEdge]) {
        let committed: HashMap<ExecutionId, TimestampMs> =
            self.pending.iter().map(|e| (e.execution_id, e.at)).collect();
        let mut latencies = self.progress.latencies();
        for (parent, _child, resolution) in edges {
            match resolution {
                DependencyResolution::Promoted => {
                    self.progress.promotions.fetch_add(1, Ordering::Relaxed);
                    if let Some(at) = committed.get(parent) {
                        latencies.promotion_us.saturating_record(micros_since(*at));
                    }
                }
                DependencyResolution::Skipped => {
                    self.progress.skips.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }
}

impl Actor for Promoter {
    type Msg = PromoterMsg;
    type State = PromoterState;
    type Arguments = PromoterState;

    async fn pre_start(
        &self,
        _me: ActorRef<PromoterMsg>,
        args: PromoterState,
    ) -> Result<PromoterState, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        me: ActorRef<PromoterMsg>,
        msg: PromoterMsg,
        state: &mut PromoterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PromoterMsg::Completed(event, delivery_us) => state.on_completed(&me, event, delivery_us),
            PromoterMsg::Flush => state.flush(&me).await,
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
    let edges: u64 = dags.iter().flat_map(|d| &d.nodes).map(|(spec, _)| spec.parents.len() as u64).sum();
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
    // Each promoter subscribes to its own range of flow partitions: a flow's completions all
    // go to one promoter, in order.
    let promoters = s.promoters.clamp(1, usize::from(PARTITION_COUNT));
    for i in 0..promoters {
        let state = PromoterState::new(engine.clone(), progress.clone(), s.promoter);
        let (promoter, _) =
            Actor::spawn_linked(None, Promoter, state, engine_actor.get_cell()).await.map_err(actor_err)?;
        let partitions = partition_share(i, promoters);
        let filter = ScannerFilter::new().with_partitions(partitions);
        let request = SubscribeRequest::tail().with_filter(filter).with_name(format!("promoter-{i}"));
        tree.subscribe_actor(request, promoter).await?;
    }

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
    let chaos_task = s
        .chaos
        .then(|| tokio::spawn(chaos(tree.clone(), s.backend.clone(), s.seed, progress.terminal.clone(), stop.clone())));

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
    let (duplicates, missing) = {
        let ledger = progress.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let duplicates: Vec<_> = ledger.iter().filter(|(_, n)| **n > 1).map(|(id, n)| (*id, *n)).collect();
        let missing: Vec<_> = decisions.keys().filter(|id| !ledger.contains_key(*id)).copied().collect();
        (duplicates, missing)
    };
    let latencies = std::mem::take(&mut *progress.latencies());
    let report = Report {
        executions: total,
        by_outcome: progress.by_outcome.lock().await.clone(),
        edges,
        promotions: progress.promotions.load(Ordering::Relaxed),
        skips: progress.skips.load(Ordering::Relaxed),
        delivery_us: latencies.delivery_us,
        promotion_us: latencies.promotion_us,
        call_us: latencies.call_us,
        batches: latencies.batches,
        batched_events: latencies.batched_events,
        events: progress.terminal.load(Ordering::Relaxed),
        duplicates,
        missing,
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

/// `p50 / p99 / max` of a microsecond histogram, in milliseconds.
fn spread(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "none".to_owned();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

/// Prints the summary table.
pub fn print_summary(r: &Report, reconcile_every: Duration) {
    println!("executions        {}", r.executions);
    for (outcome, n) in &r.by_outcome {
        println!("  {outcome:<15} {n}");
    }
    println!("dependency edges  {}", r.edges);
    println!("promotions        {}", r.promotions);
    println!("skips             {}", r.skips);
    println!(
        "delivery latency  {} ({} events; completion committed -> promoter has the event)",
        spread(&r.delivery_us),
        r.delivery_us.len()
    );
    println!(
        "promotion latency {} ({} promotions by the promoter; completion committed -> child eligible)",
        spread(&r.promotion_us),
        r.promotion_us.len()
    );
    println!(
        "                  (from the completion's own commit time, whole milliseconds: figures err high by up to 1 ms)"
    );
    println!(
        "promoter batches  {} ({:.1} completions per engine call; each call {})",
        r.batches,
        r.batched_events as f64 / r.batches.max(1) as f64,
        spread(&r.call_us)
    );
    println!("events/s          {:.0}", r.events as f64 / r.elapsed.as_secs_f64().max(1e-9));
    println!("elapsed           {:.2?}", r.elapsed);
    println!("listener restarts {}", r.listener_restarts);
    println!("chaos faults      {} ({} connection kills)", r.chaos_faults, r.connection_kills);
    println!(
        "reconciler fixes  {} of {} edges ({:.2} %): edges still unresolved in two reconciler scans {:?} apart after their parent was terminal, which the reconciler then resolved; 0 means the promoter missed none and was never that late",
        r.reconciler_fixed,
        r.edges,
        100.0 * r.reconciler_fixed as f64 / r.edges.max(1) as f64,
        reconcile_every
    );
    if r.exactly_once() {
        println!("exactly once      every execution's completion arrived once ({} of {})", r.events, r.executions);
    } else {
        println!(
            "exactly once      FAILED: {} duplicated, {} missing, {} of {} completions handled by the promoters",
            r.duplicates.len(),
            r.missing.len(),
            r.events,
            r.executions,
        );
        if let Some((id, times)) = r.duplicates.first() {
            println!("                  e.g. {id} arrived {times} times");
        }
        if let Some(id) = r.missing.first() {
            println!("                  e.g. missing: {id}");
        }
    }
    if r.mismatches.is_empty() {
        println!("verified          every execution reached the state the DAG implies");
    } else {
        println!("verification FAILED for {} executions, e.g.:", r.mismatches.len());
        for m in r.mismatches.iter().take(10) {
            println!("  {m}");
        }
    }
}

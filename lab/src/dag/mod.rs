//! The DAG promotion scenario, shared by the example and its test: build flows (fan-out, fan-in,
//! a chain, a diamond), run workers that claim and finish executions, and promote or skip
//! children from completion events in an actor spawned beside the completion tree under one
//! engine actor. The promoter resolves each delivered batch of completions in one engine call
//! (one transaction on SQLite, one function call on Postgres), so it keeps up with the workers.
//! It also keeps a ledger of completions by execution id: the run fails on a duplicate or a
//! missing one, whatever the reconciler did. A reconciler scans for edges the promoter missed;
//! it should find none. With the promoter disabled the subscriber only counts completions, and
//! the reconciler alone drives every flow to its final state.
//! Where the engine produces them, lease history and signal delivery are driven and checked
//! beside completions by a lease and a signal subscriber on the same tree (`families.rs`).
//!
//! This file holds what a reader of the example wants: the promoters subscribed to the tree and
//! the run's wiring. The workload (flows, decisions) is in `flows.rs`, the workers in `workers.rs`, the measures and
//! the summary in `report.rs`, the faults of `--chaos` in `faults.rs` (which the tests reach too),
//! heartbeats, the expiry sweep, signals and their ledger in `families.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex as SyncMutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{DependencyResolution, Engine, connect_engine};
use ff_completions::{
    BackendConfig, CompletionEvent, CompletionSupervisorHandle, Completions, ExecutionId, FlowId, LeaseHistory,
    PARTITION_COUNT, ScannerFilter, SignalDelivery, SupervisorConfig, TimestampMs,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{Mutex, Notify};

use crate::faults::{ChaosCount, chaos};

pub mod families;
mod flows;
pub mod report;
pub mod trace;
mod workers;

use families::FamilyRun;
use flows::{build_flow, expected_states};
pub use report::Report;
use report::{Latencies, micros_since};

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
    /// Trace the first flow: its completions carry their producer's trace context and its
    /// promotions continue that trace (`trace.rs`; export the spans with [`trace::layer`]).
    pub trace: bool,
    /// How long a worker spends on each execution it finishes (zero: no time at all); a live
    /// view shows a paced run unfold.
    pub pace: Duration,
    /// Told the flows' shape once they are built, before any execution exists.
    pub on_planned: Option<OnPlanned>,
}

/// One flow's shape: its executions, each with its parents, parents first.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FlowShape {
    /// The flow.
    pub flow_id: FlowId,
    /// Its executions, parents first.
    pub nodes: Vec<NodeShape>,
}

/// One execution of a flow and its parents.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeShape {
    /// The execution.
    pub id: ExecutionId,
    /// Executions that must succeed before it is eligible.
    pub parents: Vec<ExecutionId>,
}

/// What a run tells the flows' shape to (see [`Scenario::on_planned`]).
#[derive(Clone)]
pub struct OnPlanned(pub Arc<dyn Fn(Vec<FlowShape>) + Send + Sync>);

impl std::fmt::Debug for OnPlanned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnPlanned")
    }
}

/// The `i`th of `n` contiguous shares of the flow partitions.
fn partition_share(i: usize, n: usize) -> std::ops::RangeInclusive<u16> {
    let count = usize::from(PARTITION_COUNT);
    let start = i * count / n;
    let end = (i + 1) * count / n - 1;
    start as u16..=end as u16
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
            match self.resolve_pending().await {
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

    /// Resolves the children of every pending completion: in one engine call, except those
    /// that carry their producer's trace context, each resolved in a `promote` span of that
    /// trace.
    async fn resolve_pending(&self) -> Result<Vec<crate::ResolvedEdge>, crate::Error> {
        use tracing::Instrument;
        use tracing_opentelemetry::OpenTelemetrySpanExt;

        let (traced, plain): (Vec<&CompletionEvent>, Vec<&CompletionEvent>) =
            self.pending.iter().partition(|e| e.traceparent.is_some());
        let parents: Vec<ExecutionId> = plain.iter().map(|e| e.execution_id).collect();
        let mut edges = if parents.is_empty() { Vec::new() } else { self.engine.resolve_children(&parents).await? };
        for event in traced {
            let span = tracing::info_span!(target: trace::TARGET, "promote", parent_execution = %event.execution_id);
            let _ = span.set_parent(event.trace_context());
            edges.extend(self.engine.resolve_children(&[event.execution_id]).instrument(span).await?);
        }
        Ok(edges)
    }

    /// Counts promotions (with their latency from the parent's commit) and skips.
    fn count_resolved(&self, edges: &[crate::ResolvedEdge]) {
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
pub async fn run(s: &Scenario) -> Result<Report, crate::Error> {
    let engine = connect_engine(&s.backend).await?;
    // Asked once: an engine without lease history and signal delivery runs the completions only.
    let families_on = families::available(&*engine).await?;
    if !families_on && s.progress {
        println!("lease history and signal delivery skipped on {}: its engine does not produce them yet", s.backend);
    }
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut dags = Vec::with_capacity(s.flows);
    for _ in 0..s.flows {
        let flow = FlowId::new();
        engine.create_flow(&flow, None).await?;
        dags.push(build_flow(&flow, s, &mut rng));
    }
    if let Some(OnPlanned(tell)) = &s.on_planned {
        tell(dags.iter().map(flows::shape).collect());
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
        let request = Completions::tail().with_filter(filter).with_name(format!("promoter-{i}"));
        tree.subscribe_actor(request, promoter).await?;
    }
    // The families' subscribers, on the same tree: one lease-history and one signal-delivery
    // reader, each with the ledger of what the run caused.
    let ids: Vec<ExecutionId> = dags.iter().flat_map(|d| &d.nodes).map(|(spec, _)| spec.id).collect();
    let families = families_on.then(|| FamilyRun::new(&ids, s.seed));
    let reading = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    if let Some((run, _)) = &families {
        let leases = tree.subscribe(LeaseHistory::tail().with_name("lease-ledger")).await?;
        let signals = tree.subscribe(SignalDelivery::tail().with_name("signal-ledger")).await?;
        readers.push(tokio::spawn(run.clone().read_leases(leases, reading.clone())));
        readers.push(tokio::spawn(run.clone().read_signals(signals, reading.clone())));
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
    let traced: Arc<std::collections::HashSet<ExecutionId>> = Arc::new(match dags.first() {
        Some(dag) if s.trace => dag.nodes.iter().map(|(spec, _)| spec.id).collect(),
        _ => std::collections::HashSet::new(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (family_run, waiting) = families.map_or((None, None), |(run, inbox)| (Some(run), Some(inbox)));
    let mut family_tasks = Vec::new();
    if let (Some(run), Some(waiting)) = (&family_run, waiting) {
        run.signal_early(&*engine).await;
        family_tasks.push(tokio::spawn(run.clone().signal(engine.clone(), waiting, stop.clone())));
        family_tasks.push(tokio::spawn(run.clone().sweep(engine.clone(), stop.clone())));
        if s.chaos {
            family_tasks.push(tokio::spawn(run.clone().stall(engine.clone(), decisions.clone(), stop.clone())));
        }
    }
    let workers: Vec<_> = (0..s.workers.max(1))
        .map(|i| {
            let name = format!("worker-{i}");
            let work = workers::Work {
                engine: engine.clone(),
                decisions: decisions.clone(),
                traced: traced.clone(),
                pace: s.pace,
            };
            tokio::spawn(workers::work(work, name, family_run.clone(), stop.clone()))
        })
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
    for w in workers.into_iter().chain(family_tasks) {
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
    let families = match &family_run {
        Some(run) => {
            run.settle(Duration::from_secs(30)).await;
            Some(run.report())
        }
        None => None,
    };
    reading.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.await;
    }

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
        families,
    };
    Ok(report)
}

fn actor_err(e: ractor::SpawnErr) -> crate::Error {
    ff_completions::Error::Actor { detail: e.to_string() }.into()
}

//! Chaos runner: concurrent producers, several kinds of subscribers and a seeded schedule of
//! real faults, then a ledger of what producers committed against what every subscriber
//! received. Any loss, duplicate or reordering fails the run; the seed replays it. Where the
//! backend produces lease history and signal delivery, producers also heartbeat, abandon leases
//! to an expiry sweep and wait on signals, and a lease and a signal subscriber are judged the
//! same way; elsewhere a line says they are skipped.
//!
//! ```text
//! cargo test --test chaos                                   # CI: 30 s per backend
//! cargo test --release --test chaos -- --backend postgres --duration 30m --seed 42
//! ```

mod ledger;
mod targets;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Engine, ExecutionSpec, LEASE_DURATION};
use clap::Parser;
use ff_completions::{
    CompletionSupervisorHandle, Completions, ExecutionId, FlowId, LeaseHistory, Namespace, ScannerFilter,
    SignalDelivery, SignalId, StreamCursor, SupervisorConfig, TimestampMs, WaitpointId,
};

use crate::Error;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

use ledger::{Committed, FamilyCommitted, FamilyReceived, Received, Verdict, delay_after_faults, judge, judge_family};
use targets::Target;

#[derive(Parser, Debug, Clone)]
#[command(about = "Chaos runner: prove zero loss, duplication and reordering under faults")]
struct Args {
    /// postgres, valkey, sqlite, or all.
    #[arg(long, default_value = "all")]
    backend: String,
    /// How long producers run under faults, per backend (e.g. 60s, 30m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Seed of the fault schedule and workload; random when absent (printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    producers: usize,
}

/// Counts of what the run did.
#[derive(Default, Debug)]
struct Tally {
    faults: HashMap<&'static str, u32>,
    /// Each fault with when it was injected (milliseconds since the epoch).
    at: Vec<(&'static str, i64)>,
}

/// The runner's entry point: the `chaos` test binary's `main`. Parses its flags (`cargo test`'s
/// own are ignored), runs every asked-for target and exits non-zero when one fails.
pub fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    match runtime {
        Ok(runtime) => runtime.block_on(run_all()),
        Err(err) => {
            eprintln!("no tokio runtime: {err}");
            std::process::exit(2);
        }
    }
}

async fn run_all() {
    // `cargo test` passes harness flags such as `--nocapture`; keep only ours.
    let raw: Vec<String> = std::env::args().collect();
    let ours: Vec<String> = raw
        .iter()
        .take(1)
        .cloned()
        .chain(crate::harness::known_args(&raw[1..], &["--backend", "--duration", "--seed", "--producers"], &[]))
        .collect();
    let args = Args::parse_from(ours);
    crate::harness::init_tracing();
    let seed = args.seed.unwrap_or_else(rand::random);
    let backends: Vec<&str> = match args.backend.as_str() {
        "all" => targets::ALL.to_vec(),
        one => vec![one],
    };
    let (mut passed, mut failed) = (0, 0);
    for backend in backends {
        println!("== chaos on {backend}: seed {seed}, {:?}, {} producers", args.duration, args.producers);
        let verdicts = run(backend, &args, seed).await;
        for v in &verdicts {
            println!(
                "   {:<10} expected {:>6} received {:>6} lost {} duplicated {} out-of-order {} unexpected {} worst delay {:?} -> {}",
                v.name,
                v.expected,
                v.received,
                v.lost,
                v.duplicated,
                v.out_of_order,
                v.unexpected,
                v.worst_delay,
                if v.ok() { "ok" } else { "FAILED" }
            );
        }
        if verdicts.iter().all(Verdict::ok) && !verdicts.is_empty() {
            passed += 1;
        } else {
            failed += 1;
            println!("   replay with: cargo test --test chaos -- --backend {backend} --seed {seed}");
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

type Inbox = Arc<Mutex<Vec<Received>>>;
/// Which executions a subscriber's filter admits.
type WantsEvent = Box<dyn Fn(&ExecutionId) -> bool>;

fn delay_since(at: TimestampMs) -> Duration {
    Duration::from_millis(TimestampMs::now().millis_since(at))
}

/// Until when a paused subscriber stops reading (`None`: it reads).
type Pause = Arc<std::sync::Mutex<Option<Instant>>>;

/// Reads a subscription into `inbox`; while `pause` says so, reads nothing (its buffer fills,
/// its filter drops live batches and must catch up on its own).
async fn read_into(mut sub: ff_completions::Subscription, inbox: Inbox, pause: Option<Pause>, until: Arc<AtomicBool>) {
    while !until.load(Ordering::Relaxed) {
        let paused = pause.as_ref().and_then(|p| *p.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(left) = paused.and_then(|end| end.checked_duration_since(Instant::now())) {
            tokio::time::sleep(left.min(Duration::from_millis(200))).await;
            continue;
        }
        match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(Ok(event))) => {
                let delay = delay_since(event.at);
                inbox.lock().await.push(Received { event, delay });
            }
            Ok(Some(Err(err))) => panic!("subscriber got an error: {err}"),
            Ok(None) => return,
            Err(_) => {}
        }
    }
}

/// Drops its subscription now and then and resubscribes from the last cursor it received.
async fn resubscribing_reader(tree: CompletionSupervisorHandle, inbox: Inbox, seed: u64, until: Arc<AtomicBool>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cursor = StreamCursor::empty();
    let mut first = true;
    while !until.load(Ordering::Relaxed) {
        let request = if first { Completions::tail() } else { Completions::from_cursor(cursor.clone()) };
        first = false;
        let mut sub = match tree.subscribe(request).await {
            Ok(sub) => sub,
            // The backend is down (a fault): a subscriber retries, as any caller would.
            Err(err) if err.is_transient() => {
                tracing::info!(error = %err, "resubscribe failed for now; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(err) => panic!("resubscribe from {cursor:?} failed: {err}"),
        };
        let stay = Instant::now() + Duration::from_millis(rng.random_range(300..3000));
        // It only lets go once it holds a cursor: an empty one would mean "from the tail".
        while (Instant::now() < stay || cursor.is_empty()) && !until.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
                Ok(Some(Ok(event))) => {
                    cursor = event.cursor.clone();
                    let delay = delay_since(event.at);
                    inbox.lock().await.push(Received { event, delay });
                }
                Ok(Some(Err(err))) => panic!("resumed subscriber got an error: {err}"),
                Ok(None) => break,
                Err(_) => {}
            }
        }
    }
}

/// Executions one claim takes.
const CLAIM_LIMIT: usize = 5;
/// A lease not renewed for this long is swept (the engine's leases last [`LEASE_DURATION`]; the
/// sweep asks about a `now` that far ahead, less this).
const LEASE_WINDOW: Duration = Duration::from_secs(2);

/// The lease-history and signal-delivery ledger, when the backend produces them.
type Families = Option<Arc<Mutex<FamilyCommitted>>>;

/// Whether the backend's engine produces lease history and signal delivery: `false` when it
/// answers `Unavailable` for them (a heartbeat of an execution that does not exist is the probe).
async fn produces_families(engine: &dyn Engine) -> bool {
    match engine.renew_lease(&ExecutionId::new_in(&FlowId::new()), "probe").await {
        Ok(_) => true,
        Err(Error::Subsystem(ff_completions::Error::Unavailable { .. })) => false,
        Err(err) => panic!("probing lease history: {err}"),
    }
}

/// Delivers one signal to `id`, recording its effect (any effect, maybe, when cut by a fault).
async fn deliver(engine: &dyn Engine, id: ExecutionId, key: &str, ledger: &Mutex<FamilyCommitted>) {
    let waitpoint = WaitpointId::new("chaos");
    let signal = SignalId::new(format!("signal-{key}"));
    match engine.deliver_signal(&id, &waitpoint, &signal, Some(key), Some("chaos")).await {
        Ok(effect) => ledger.lock().await.caused(id, effect.as_wire()),
        Err(_) => ledger.lock().await.maybe(id, "*"),
    }
}

/// What a producer does with a claimed execution's lease and signals before completing it;
/// `true` when it leaves the execution to a later claim (abandoned to lapse, or suspended).
async fn lease_and_signal_step(
    engine: &dyn Engine,
    id: ExecutionId,
    worker: &str,
    rng: &mut StdRng,
    ledger: &Mutex<FamilyCommitted>,
) -> bool {
    let waitpoint = WaitpointId::new("chaos");
    let key = format!("{id}-{}", rng.random::<u32>());
    match rng.random_range(0..10) {
        // A heartbeat, then the completion.
        0 | 1 => {
            match engine.renew_lease(&id, worker).await {
                Ok(true) => ledger.lock().await.caused(id, "renewed"),
                Ok(false) => {}
                Err(_) => ledger.lock().await.maybe(id, "renewed"),
            }
            false
        }
        // Abandoned: its lease lapses, the sweep expires it, a later claim reclaims it.
        2 => true,
        // It waits; a signal satisfies it, the same signal again is deduped.
        3 => {
            if let Ok(false) = engine.suspend(&id, &waitpoint).await {
                deliver(engine, id, &key, ledger).await;
                deliver(engine, id, &key, ledger).await;
            }
            true
        }
        // A signal comes first (buffered); the suspend consumes it.
        4 => {
            deliver(engine, id, &key, ledger).await;
            let _ = engine.suspend(&id, &waitpoint).await;
            true
        }
        _ => false,
    }
}

/// The engine's expiry sweep, every 250 ms until `stop`, recording what it expired.
async fn sweep(engine: Arc<dyn Engine>, ledger: Arc<Mutex<FamilyCommitted>>, stop: Arc<AtomicBool>) {
    let ahead = LEASE_DURATION.saturating_sub(LEASE_WINDOW).as_millis() as i64;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        // A sweep cut by a fault may have expired leases nobody knows (their next claims
        // return them: those are known).
        match engine.expire_leases(TimestampMs(TimestampMs::now().0 + ahead)).await {
            Ok(swept) => {
                let mut ledger = ledger.lock().await;
                for id in swept {
                    ledger.caused(id, "expired");
                }
            }
            Err(_) => ledger.lock().await.sweep_cut(),
        }
    }
}

/// Reads a lease-history or signal-delivery subscription into `inbox` until `until`, keyed as
/// the family ledger counts.
async fn read_family<E, S>(
    mut sub: S,
    inbox: Arc<Mutex<Vec<FamilyReceived>>>,
    target: Arc<Target>,
    describe: impl Fn(&E) -> (ExecutionId, String, StreamCursor, TimestampMs),
    until: Arc<AtomicBool>,
) where
    S: futures::Stream<Item = Result<E, ff_completions::Error>> + Unpin,
{
    while !until.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(Ok(event))) => {
                let (execution, key, cursor, at) = describe(&event);
                let position = target.family_position(&execution, &cursor);
                let received = FamilyReceived {
                    execution,
                    key,
                    position,
                    cursor: cursor.as_bytes().to_vec(),
                    delay: delay_since(at),
                };
                inbox.lock().await.push(received);
            }
            Ok(Some(Err(err))) => panic!("family subscriber got an error: {err}"),
            Ok(None) => return,
            Err(_) => {}
        }
    }
}

/// Creates, claims and completes executions until told to stop, recording what is committed;
/// with `families`, also heartbeats, abandons leases and waits on signals, recording the
/// lease and signal events it causes.
async fn produce(
    target: Arc<Target>,
    engine: Arc<dyn Engine>,
    committed: Arc<Mutex<Committed>>,
    families: Families,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let worker = format!("producer-{seed}");
    while !stop.load(Ordering::Relaxed) {
        let flow = FlowId::new();
        let ns = if rng.random_bool(0.5) { "ns-a" } else { "ns-b" };
        if engine.create_flow(&flow, Some(&Namespace::new(ns))).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for _ in 0..5 {
            let spec = ExecutionSpec::new(&flow).with_namespace(ns);
            // Recorded first: a create cut by a fault may still have committed.
            committed.lock().await.namespace.insert(spec.id, ns.to_owned());
            let _ = engine.create_execution(&spec).await;
        }
        let claimed = match engine.claim(&worker, CLAIM_LIMIT).await {
            Ok(ids) => ids,
            Err(_) => {
                if let Some(f) = &families {
                    f.lock().await.uncertain_claims += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some(f) = &families {
            let mut ledger = f.lock().await;
            for id in &claimed {
                ledger.caused(*id, "claimed");
            }
        }
        for id in claimed {
            if let Some(f) = &families
                && lease_and_signal_step(&*engine, id, &worker, &mut rng, f).await
            {
                continue;
            }
            let outcome = match rng.random_range(0..10) {
                0 => target.complete_held_open(&engine, &id, Duration::from_millis(rng.random_range(200..2000))).await,
                1 => target.complete_rolled_back_then_again(&engine, &id).await,
                _ => engine.complete(&id).await,
            };
            let mut ledger = committed.lock().await;
            match outcome {
                Ok(true) => {
                    ledger.sure.insert(id);
                }
                Ok(false) => {}
                Err(_) => {
                    ledger.uncertain.insert(id);
                }
            }
        }
    }
}

async fn run(backend: &str, args: &Args, seed: u64) -> Vec<Verdict> {
    let target = Arc::new(Target::start(backend).await);
    let config = SupervisorConfig::new().with_backend(target.config()).with_subscriber_buffer(64).with_batch_size(128);
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn tree");
    let until = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(Mutex::new(Committed::default()));

    let names = ["fast", "filtered", "slow", "resumed"];
    let inboxes: Vec<Inbox> = names.iter().map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
    let mut readers = Vec::new();
    let mut subscriber_ids = Vec::new();
    let slow_pause: Pause = Arc::default();
    for (i, filter) in
        [ScannerFilter::new(), ScannerFilter::new().with_namespace(Namespace::new("ns-a")), ScannerFilter::new()]
            .into_iter()
            .enumerate()
    {
        let sub = tree.subscribe(Completions::tail().with_filter(filter)).await.expect("subscribe");
        subscriber_ids.push(sub.id());
        let pause = (i == 2).then(|| slow_pause.clone());
        readers.push(tokio::spawn(read_into(sub, inboxes[i].clone(), pause, until.clone())));
    }
    readers.push(tokio::spawn(resubscribing_reader(tree.clone(), inboxes[3].clone(), seed ^ 0x7e5, until.clone())));

    // Lease history and signal delivery through the same tree, where the backend produces them.
    let families: Families = if produces_families(&*target.engine().await).await {
        Some(Arc::new(Mutex::new(FamilyCommitted { claim_limit: CLAIM_LIMIT as u32, ..FamilyCommitted::default() })))
    } else {
        println!("   lease history and signal delivery: skipped, this backend's engine does not produce them yet");
        None
    };
    let family_inboxes: [Arc<Mutex<Vec<FamilyReceived>>>; 2] = Default::default();
    if families.is_some() {
        let leases = tree.subscribe(LeaseHistory::tail()).await;
        let describe_lease = |e: &ff_completions::LeaseHistoryEvent| {
            let key = if matches!(e.wire_kind(), "acquired" | "reclaimed") { "claimed" } else { e.wire_kind() };
            (*e.execution_id(), key.to_owned(), e.cursor().clone(), e.at())
        };
        let inbox = family_inboxes[0].clone();
        let leases = leases.expect("subscribe to lease history");
        readers.push(tokio::spawn(read_family(leases, inbox, target.clone(), describe_lease, until.clone())));
        let signals = tree.subscribe(SignalDelivery::tail()).await;
        let describe_signal = |e: &ff_completions::SignalDeliveryEvent| {
            (e.execution_id, e.effect.as_wire().to_owned(), e.cursor.clone(), e.at)
        };
        let inbox = family_inboxes[1].clone();
        let signals = signals.expect("subscribe to signal delivery");
        readers.push(tokio::spawn(read_family(signals, inbox, target.clone(), describe_signal, until.clone())));
    }

    let mut producers = Vec::new();
    for p in 0..args.producers {
        let engine = target.engine().await;
        producers.push(tokio::spawn(produce(
            target.clone(),
            engine,
            committed.clone(),
            families.clone(),
            seed.wrapping_add(p as u64),
            stop.clone(),
        )));
    }
    if let Some(f) = &families {
        producers.push(tokio::spawn(sweep(target.engine().await, f.clone(), stop.clone())));
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    let started = Instant::now();
    while started.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        let fault = if rng.random_ratio(1, 8) {
            // Past its buffer of 64 at any producer rate here: its filter must catch up.
            *slow_pause.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + Duration::from_secs(3));
            "pause slow subscriber 3 s"
        } else {
            target.inject(&tree, &subscriber_ids, &mut rng).await
        };
        *tally.faults.entry(fault).or_default() += 1;
        tally.at.push((fault, TimestampMs::now().0));
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        let _ = p.await;
    }
    let committed = Arc::try_unwrap(committed).ok().expect("producers done").into_inner();

    // Give every subscriber time to receive everything, then judge.
    let settle = Instant::now() + Duration::from_secs(120);
    let namespaces = committed.namespace.clone();
    let wants: Vec<WantsEvent> = vec![
        Box::new(|_| true),
        Box::new(move |id| namespaces.get(id).is_some_and(|ns| ns == "ns-a")),
        Box::new(|_| true),
        Box::new(|_| true),
    ];
    loop {
        let mut complete = true;
        for (inbox, want) in inboxes.iter().zip(&wants) {
            let got: std::collections::HashSet<_> = inbox.lock().await.iter().map(|r| r.event.execution_id).collect();
            complete &= committed.sure.iter().filter(|id| want(id)).all(|id| got.contains(id));
        }
        if let Some(f) = &families {
            let f = f.lock().await;
            let mut got: HashMap<(ExecutionId, String), u32> = HashMap::new();
            for inbox in &family_inboxes {
                for r in inbox.lock().await.iter() {
                    *got.entry((r.execution, r.key.clone())).or_default() += 1;
                }
            }
            complete &= f.sure.iter().all(|(k, n)| got.get(k).is_some_and(|g| g >= n));
        }
        if complete || Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Before the readers stop: a dropped stream ends its subscription and its counters.
    let stats = tree.stats().await.expect("stats");
    until.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.await;
    }
    println!(
        "   committed {} (+{} uncertain), faults {:?}, listener restarts {}, filter restarts {}",
        committed.sure.len(),
        committed.uncertain.len(),
        tally.faults,
        stats.listeners.iter().map(|l| l.restarts).sum::<u64>(),
        stats.subscribers.iter().map(|s| s.restarts).sum::<u64>(),
    );
    if let Some(f) = &families {
        let ledger = f.lock().await;
        let mut by_kind: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
        for ((_, kind), n) in &ledger.sure {
            *by_kind.entry(kind.as_str()).or_default() += n;
        }
        println!("   lease and signal events caused: {by_kind:?}");
    }
    {
        // The fast subscriber reads everything at once: its delays are the tree's.
        let (base, delays) = delay_after_faults(&inboxes[0].lock().await, &tally.at, 250, 10_000);
        let shown: Vec<String> =
            delays.iter().map(|d| format!("{} +{} ms ({} events)", d.fault, d.extra_p99_ms, d.events)).collect();
        println!(
            "   p99 extra delivery delay of events committed within 250 ms after a fault (fast subscriber; p99 away from faults {base} ms): {}",
            shown.join(", ")
        );
    }
    let mut verdicts = Vec::new();
    for ((name, inbox), want) in names.iter().zip(&inboxes).zip(&wants) {
        let received = inbox.lock().await;
        verdicts.push(judge(name, &received, &committed, want, |e| target.position(e)));
    }
    if let Some(f) = &families {
        let f = f.lock().await;
        // Each subscriber is judged on its own family's part of the ledger.
        let signal_effects = ["satisfied", "buffered", "deduped"];
        for (name, inbox, signals) in [("leases", &family_inboxes[0], false), ("signals", &family_inboxes[1], true)] {
            let part = |map: &HashMap<(ExecutionId, String), u32>| {
                let keep = |k: &str| (k == "*" || signal_effects.contains(&k)) == signals;
                map.iter().filter(|(k, _)| keep(&k.1)).map(|(k, n)| (k.clone(), *n)).collect()
            };
            let own = FamilyCommitted {
                sure: part(&f.sure),
                uncertain: part(&f.uncertain),
                uncertain_claims: if signals { 0 } else { f.uncertain_claims },
                claim_limit: f.claim_limit,
            };
            verdicts.push(judge_family(name, &inbox.lock().await, &own));
        }
    }
    tree.shutdown().await;
    verdicts
}

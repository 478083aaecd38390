//! Lease history and signal delivery in the DAG run: what the workload does with leases and
//! signals, the ledger of the events those engine calls caused (taken from what each call
//! returned), the two subscribers that read the families from the tree the promoters use, and
//! the verdict: every caused event delivered exactly once, in a valid order per execution.
//!
//! - Some executions are long: their worker heartbeats (`renew_lease`) while it works.
//! - An expiry sweep runs every [`SWEEP_EVERY`], as an engine would, treating a lease not
//!   renewed for [`LEASE_WINDOW`] as lapsed (the demo engine's leases last
//!   [`LEASE_DURATION`]; the sweep asks about a `now` that far ahead, less the window).
//! - Under `--chaos` a stalled worker claims an execution and stops heartbeating: the sweep
//!   writes `expired`, another worker's claim `reclaimed`. When it wakes it heartbeats first;
//!   the engine refuses (the lease is gone) and it drops the work. The engine's `complete`
//!   takes no lease or worker, so it would not refuse a late completion itself: the
//!   heartbeat is the fence.
//! - Some executions wait on a signal: they suspend on [`WAITPOINT`]; a signaller delivers to
//!   some before they suspend (buffered, consumed by the suspend), to the others once they
//!   wait (satisfied), and to some twice with one idempotency key (the second deduped).
//!
//! Backends whose engine answers `Unavailable` for these operations skip all of it
//! ([`available`] is asked once at start).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex as SyncMutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{Engine, LEASE_DURATION};
use ff_completions::{
    ExecutionId, FlowId, LeaseHistoryEvent, SignalDeliveryEffect, SignalDeliveryEvent, SignalId, TimestampMs,
    WaitpointId,
};

use crate::Error;
use futures::{Stream, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use super::flows::{Decision, finish};

/// How long a lease lasts without a heartbeat, as the example's sweep counts it.
pub const LEASE_WINDOW: Duration = Duration::from_secs(1);
/// How often the expiry sweep runs.
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// How often a long execution's worker heartbeats, and how many times.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(40);
const HEARTBEATS: u32 = 2;
/// Executions the stalled worker takes (under `--chaos`).
const STALLS: u32 = 3;
/// The waitpoint signal waiters suspend on.
pub const WAITPOINT: &str = "approval";
/// The stalled worker's name.
const STALLED: &str = "worker-stalled";

/// How a signal waiter gets its signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiter {
    /// Delivered before it suspends (buffered), consumed by its suspend.
    Early,
    /// Delivered once it waits (satisfied).
    Late,
    /// Delivered once it waits, then again with the same idempotency key (deduped).
    LateTwice,
}

/// Whether `engine` produces lease history and signal delivery: `false` when it answers
/// `Unavailable` for them (a heartbeat of an execution that does not exist is the probe).
///
/// # Errors
/// Any other error of the probe.
pub async fn available(engine: &dyn Engine) -> Result<bool, Error> {
    match engine.renew_lease(&ExecutionId::new_in(&FlowId::new()), "probe").await {
        Ok(_) => Ok(true),
        Err(Error::Subsystem(ff_completions::Error::Unavailable { .. })) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Per execution, the lease kinds (a claim as `claimed`: `acquired` or `reclaimed`) or signal
/// effects, with their counts.
type Tally = HashMap<(ExecutionId, String), u32>;

/// What the run's engine calls returned, and what the subscribers received.
#[derive(Default)]
struct Ledger {
    caused_lease: Tally,
    caused_signal: Tally,
    received_lease: Vec<LeaseHistoryEvent>,
    received_signal: Vec<SignalDeliveryEvent>,
}

/// The families' part of a run, shared by its workers, sweep, signaller and readers.
pub struct FamilyRun {
    /// Executions that heartbeat while they work.
    long: HashSet<ExecutionId>,
    waiters: HashMap<ExecutionId, Waiter>,
    /// Waiters that suspended once (they do not again).
    suspended: SyncMutex<HashSet<ExecutionId>>,
    /// Waiters waiting for the signaller.
    waiting: mpsc::UnboundedSender<ExecutionId>,
    ledger: SyncMutex<Ledger>,
    stalls: AtomicU64,
    stale_refused: AtomicU64,
}

impl FamilyRun {
    /// Picks, from `seed` (apart from the DAG's own decisions), about one execution in 25 to
    /// be long and one in 25 to wait on a signal. Returns the run and the signaller's
    /// inbox.
    pub fn new(ids: &[ExecutionId], seed: u64) -> (Arc<Self>, mpsc::UnboundedReceiver<ExecutionId>) {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x1ea5e);
        let (mut long, mut waiters) = (HashSet::new(), HashMap::new());
        let kinds = [Waiter::Early, Waiter::Late, Waiter::LateTwice];
        for id in ids {
            match rng.random_range(0..100) {
                0..4 => {
                    long.insert(*id);
                }
                4..8 => {
                    waiters.insert(*id, kinds[waiters.len() % kinds.len()]);
                }
                _ => {}
            }
        }
        let (waiting, inbox) = mpsc::unbounded_channel();
        let run = Self {
            long,
            waiters,
            suspended: SyncMutex::default(),
            waiting,
            ledger: SyncMutex::default(),
            stalls: AtomicU64::new(0),
            stale_refused: AtomicU64::new(0),
        };
        (Arc::new(run), inbox)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn caused_lease(&self, id: ExecutionId, kind: &str) {
        *self.ledger().caused_lease.entry((id, kind.to_owned())).or_default() += 1;
    }

    fn caused_signal(&self, id: ExecutionId, effect: &SignalDeliveryEffect) {
        *self.ledger().caused_signal.entry((id, effect.as_wire().to_owned())).or_default() += 1;
    }

    /// A worker claimed `ids`: each claim writes `acquired` or `reclaimed`.
    pub fn claimed(&self, ids: &[ExecutionId]) {
        for id in ids {
            self.caused_lease(*id, "claimed");
        }
    }

    /// What a worker does with a claimed execution before its decision: a waiter suspends on
    /// its first claim (true: the worker is done with it for now); a long one is worked on
    /// with heartbeats in `tasks` (true). False: the worker finishes it now.
    pub async fn take_over(
        self: &Arc<Self>,
        engine: &Arc<dyn Engine>,
        decisions: &Arc<HashMap<ExecutionId, Decision>>,
        worker: &str,
        id: ExecutionId,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> bool {
        if self.waiters.contains_key(&id) && self.suspended.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
            match engine.suspend(&id, &WaitpointId::new(WAITPOINT)).await {
                // A buffered signal was consumed: eligible again already.
                Ok(true) => {}
                Ok(false) => {
                    let _ = self.waiting.send(id);
                }
                Err(err) => {
                    tracing::warn!(%id, error = %err, "suspend failed; finishing instead");
                    return false;
                }
            }
            return true;
        }
        if !self.long.contains(&id) {
            return false;
        }
        let (run, engine, decisions, worker) = (self.clone(), engine.clone(), decisions.clone(), worker.to_owned());
        tasks.spawn(async move {
            for _ in 0..HEARTBEATS {
                tokio::time::sleep(HEARTBEAT_EVERY).await;
                match engine.renew_lease(&id, &worker).await {
                    Ok(true) => run.caused_lease(id, "renewed"),
                    // The lease lapsed (a slow machine): whoever claims it next does the work.
                    Ok(false) => return,
                    Err(err) => tracing::warn!(%id, error = %err, "heartbeat failed"),
                }
            }
            finish(&*engine, &decisions, id, false).await;
        });
        true
    }

    /// Delivers the early waiters' signals (before any worker runs: buffered), then each
    /// waiter's signal once it waits, until `stop`.
    pub async fn signal(
        self: Arc<Self>,
        engine: Arc<dyn Engine>,
        mut waiting: mpsc::UnboundedReceiver<ExecutionId>,
        stop: Arc<AtomicBool>,
    ) {
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(50), waiting.recv()).await {
                Ok(Some(id)) => {
                    self.deliver(&*engine, id).await;
                    if self.waiters.get(&id) == Some(&Waiter::LateTwice) {
                        self.deliver(&*engine, id).await;
                    }
                }
                Ok(None) => return,
                Err(_) => {}
            }
        }
    }

    /// The early waiters' signals, delivered before the workers start.
    pub async fn signal_early(&self, engine: &dyn Engine) {
        for (id, _) in self.waiters.iter().filter(|(_, w)| **w == Waiter::Early) {
            self.deliver(engine, *id).await;
        }
    }

    /// One delivery to `id`'s waitpoint, keyed by the execution (so a second is deduped).
    async fn deliver(&self, engine: &dyn Engine, id: ExecutionId) {
        let key = format!("approve-{id}");
        let signal = SignalId::new(format!("signal-{id}"));
        let result =
            engine.deliver_signal(&id, &WaitpointId::new(WAITPOINT), &signal, Some(&key), Some("signaller")).await;
        match result {
            Ok(effect) => self.caused_signal(id, &effect),
            Err(err) => tracing::warn!(%id, error = %err, "signal delivery failed"),
        }
    }

    /// The engine's expiry sweep, every [`SWEEP_EVERY`] until `stop`.
    pub async fn sweep(self: Arc<Self>, engine: Arc<dyn Engine>, stop: Arc<AtomicBool>) {
        let ahead = LEASE_DURATION.saturating_sub(LEASE_WINDOW).as_millis() as i64;
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(SWEEP_EVERY).await;
            match engine.expire_leases(TimestampMs(TimestampMs::now().0 + ahead)).await {
                Ok(swept) => {
                    for id in swept {
                        self.caused_lease(id, "expired");
                    }
                }
                Err(err) => tracing::warn!(error = %err, "expiry sweep failed"),
            }
        }
    }

    /// The stalled worker (under `--chaos`): claims one execution at a time and stops
    /// heartbeating until its lease has lapsed well past the sweep; then heartbeats, is
    /// refused, and drops the work. `STALLS` times, or until `stop`.
    pub async fn stall(
        self: Arc<Self>,
        engine: Arc<dyn Engine>,
        decisions: Arc<HashMap<ExecutionId, Decision>>,
        stop: Arc<AtomicBool>,
    ) {
        let mut stalls = 0;
        while stalls < STALLS && !stop.load(Ordering::Relaxed) {
            // Asks often (the other workers take whatever is eligible at once), and from the
            // start: a short run must still see a stall.
            let claimed = match engine.claim(STALLED, 1).await {
                Ok(claimed) if !claimed.is_empty() => claimed,
                _ => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            self.claimed(&claimed);
            for id in claimed {
                stalls += 1;
                self.stalls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(LEASE_WINDOW * 3).await;
                match engine.renew_lease(&id, STALLED).await {
                    Ok(false) => {
                        self.stale_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(true) => {
                        self.caused_lease(id, "renewed");
                        finish(&*engine, &decisions, id, false).await;
                    }
                    Err(err) => tracing::warn!(%id, error = %err, "stalled worker's heartbeat failed"),
                }
            }
        }
    }

    /// Reads lease history into the ledger until `until`.
    pub async fn read_leases<S>(self: Arc<Self>, sub: S, until: Arc<AtomicBool>)
    where
        S: Stream<Item = Result<LeaseHistoryEvent, ff_completions::Error>> + Unpin,
    {
        read(sub, until, |event| self.ledger().received_lease.push(event)).await;
    }

    /// Reads signal deliveries into the ledger until `until`.
    pub async fn read_signals<S>(self: Arc<Self>, sub: S, until: Arc<AtomicBool>)
    where
        S: Stream<Item = Result<SignalDeliveryEvent, ff_completions::Error>> + Unpin,
    {
        read(sub, until, |event| self.ledger().received_signal.push(event)).await;
    }

    /// Waits until the subscribers received as many events as the run caused (or `timeout`),
    /// then a little longer for any duplicate.
    pub async fn settle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && !self.all_received() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// The subscribers received as many events as the run caused.
    fn all_received(&self) -> bool {
        let ledger = self.ledger();
        let caused = ledger.caused_lease.values().chain(ledger.caused_signal.values()).sum::<u32>() as usize;
        ledger.received_lease.len() + ledger.received_signal.len() >= caused
    }

    /// The verdict.
    pub fn report(&self) -> FamilyReport {
        let ledger = self.ledger();
        let mut r = FamilyReport {
            stalls: self.stalls.load(Ordering::Relaxed),
            stale_refused: self.stale_refused.load(Ordering::Relaxed),
            ..FamilyReport::default()
        };
        let mut received_lease = Tally::new();
        let mut last_lease: HashMap<ExecutionId, (&'static str, TimestampMs)> = HashMap::new();
        for event in &ledger.received_lease {
            let (id, kind) = (*event.execution_id(), event.wire_kind());
            *r.lease_received.entry(kind).or_default() += 1;
            let key = if matches!(kind, "acquired" | "reclaimed") { "claimed" } else { kind };
            *received_lease.entry((id, key.to_owned())).or_default() += 1;
            let previous = last_lease.insert(id, (kind, event.at()));
            if !lease_follows(previous.map(|p| p.0), kind) || previous.is_some_and(|p| p.1 > event.at()) {
                r.out_of_order += 1;
            }
        }
        let mut received_signal = Tally::new();
        let mut last_signal: HashMap<ExecutionId, (SignalDeliveryEffect, TimestampMs)> = HashMap::new();
        for event in &ledger.received_signal {
            *r.signal_received.entry(event.effect.as_wire().to_owned()).or_default() += 1;
            *received_signal.entry((event.execution_id, event.effect.as_wire().to_owned())).or_default() += 1;
            let previous = last_signal.insert(event.execution_id, (event.effect.clone(), event.at));
            // A deduped delivery repeats one seen before it; nothing comes before it otherwise.
            let first_deduped = previous.is_none() && event.effect == SignalDeliveryEffect::Deduped;
            if first_deduped || previous.is_some_and(|p| p.1 > event.at) {
                r.out_of_order += 1;
            }
        }
        for (key, n) in &ledger.caused_lease {
            *r.lease_caused.entry(key.1.clone()).or_default() += u64::from(*n);
        }
        (r.lease_lost, r.lease_duplicated) = compare(&ledger.caused_lease, &received_lease);
        (r.signal_lost, r.signal_duplicated) = compare(&ledger.caused_signal, &received_signal);
        r.signals_caused = ledger.caused_signal.values().map(|n| u64::from(*n)).sum();
        r
    }
}

/// Reads `sub` into `push` until `until` (or its end, logged when an error ends it).
async fn read<E, S>(mut sub: S, until: Arc<AtomicBool>, mut push: impl FnMut(E))
where
    S: Stream<Item = Result<E, ff_completions::Error>> + Unpin,
{
    while !until.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
            Ok(Some(Ok(event))) => push(event),
            Ok(Some(Err(err))) => {
                tracing::error!(error = %err, "a family subscription ended");
                return;
            }
            Ok(None) => return,
            Err(_) => {}
        }
    }
}

/// A lease event of `kind` may follow `previous` of the same execution: a claim comes first
/// and after an end of lease; `reclaimed` right after `expired`, and only then.
fn lease_follows(previous: Option<&str>, kind: &str) -> bool {
    match (previous, kind) {
        (None, "acquired") => true,
        (None, _) => false,
        (Some("expired"), k) => k == "reclaimed",
        (Some(_), "reclaimed") => false,
        (Some(_), _) => true,
    }
}

/// Events caused but not received (lost) and received more often than caused (duplicated).
fn compare(caused: &Tally, received: &Tally) -> (u64, u64) {
    let lost = caused.iter().map(|(k, n)| u64::from(n.saturating_sub(*received.get(k).unwrap_or(&0)))).sum();
    let extra = received.iter().map(|(k, n)| u64::from(n.saturating_sub(*caused.get(k).unwrap_or(&0)))).sum();
    (lost, extra)
}

/// What the families' part of a run caused, received and concluded.
#[derive(Debug, Default)]
pub struct FamilyReport {
    /// Lease events caused, by kind (`claimed` for `acquired` or `reclaimed`).
    pub lease_caused: std::collections::BTreeMap<String, u64>,
    /// Lease events received, by kind.
    pub lease_received: std::collections::BTreeMap<&'static str, u64>,
    /// Signal deliveries made, and the events received by effect.
    pub signals_caused: u64,
    pub signal_received: std::collections::BTreeMap<String, u64>,
    pub lease_lost: u64,
    pub lease_duplicated: u64,
    pub signal_lost: u64,
    pub signal_duplicated: u64,
    /// Events out of a valid order for their execution.
    pub out_of_order: u64,
    /// Executions the stalled worker took, and its late heartbeats the engine refused.
    pub stalls: u64,
    pub stale_refused: u64,
}

impl FamilyReport {
    /// Every caused event arrived once, in a valid order per execution.
    pub fn exactly_once(&self) -> bool {
        self.lease_lost == 0
            && self.lease_duplicated == 0
            && self.signal_lost == 0
            && self.signal_duplicated == 0
            && self.out_of_order == 0
    }

    /// Lease events received of `kind`.
    pub fn leases(&self, kind: &str) -> u64 {
        self.lease_received.get(kind).copied().unwrap_or(0)
    }

    /// Signal events received with effect `effect`.
    pub fn signals(&self, effect: &str) -> u64 {
        self.signal_received.get(effect).copied().unwrap_or(0)
    }
}

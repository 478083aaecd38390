//! What a run measured: latencies from the completion's commit (HDR histograms), the
//! promoters' batches, the exactly-once ledger's verdict, and the summary the example prints.

use std::collections::BTreeMap;
use std::time::Duration;

use ff_completions::{ExecutionId, TimestampMs};
use hdrhistogram::Histogram;

use super::families::FamilyReport;

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
    /// Lease history and signal delivery, when the backend's engine produces them.
    pub families: Option<FamilyReport>,
}

impl Report {
    /// Every execution's completion arrived exactly once.
    pub fn exactly_once(&self) -> bool {
        self.duplicates.is_empty() && self.missing.is_empty() && self.events == self.executions as u64
    }

    /// Every lease event and signal effect the run caused arrived once, in order (true when
    /// the backend does not produce them).
    pub fn families_exactly_once(&self) -> bool {
        self.families.as_ref().is_none_or(FamilyReport::exactly_once)
    }
}

/// A histogram of microseconds from 1 µs to an hour, 3 significant figures. (`Histogram::new`
/// tracks values up to 2 only, and `saturating_record` clamps everything above to 2.)
pub fn micros_histogram() -> Histogram<u64> {
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
            families: None,
        }
    }
}

/// Microseconds from a completion's commit time (whole milliseconds, taken inside the
/// committing transaction or function) to now: errs high by up to a millisecond.
pub(super) fn micros_since(at: TimestampMs) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (now.as_micros() as u64).saturating_sub((at.0.max(0) as u64).saturating_mul(1000)).max(1)
}

/// Latency histograms and batch counts of the promoter.
pub(super) struct Latencies {
    pub(super) delivery_us: Histogram<u64>,
    pub(super) promotion_us: Histogram<u64>,
    pub(super) call_us: Histogram<u64>,
    pub(super) batches: u64,
    pub(super) batched_events: u64,
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
    print_families(r.families.as_ref());
    if r.mismatches.is_empty() {
        println!("verified          every execution reached the state the DAG implies");
    } else {
        println!("verification FAILED for {} executions, e.g.:", r.mismatches.len());
        for m in r.mismatches.iter().take(10) {
            println!("  {m}");
        }
    }
}

/// The lease history and signal delivery lines of the summary.
fn print_families(f: Option<&FamilyReport>) {
    let Some(f) = f else {
        println!("lease history     skipped: this backend's engine does not produce lease or signal events yet");
        println!("signal delivery   skipped: as above");
        return;
    };
    let caused = |kind: &str| f.lease_caused.get(kind).copied().unwrap_or(0);
    println!(
        "lease history     {} acquired, {} renewed, {} expired, {} reclaimed (caused: {} claims, {} heartbeats, {} swept)",
        f.leases("acquired"),
        f.leases("renewed"),
        f.leases("expired"),
        f.leases("reclaimed"),
        caused("claimed"),
        caused("renewed"),
        caused("expired"),
    );
    println!(
        "stalled worker    {} executions taken, {} late heartbeats refused by the engine (its work dropped)",
        f.stalls, f.stale_refused
    );
    println!(
        "signal delivery   {} satisfied, {} buffered, {} deduped (caused: {} deliveries)",
        f.signals("satisfied"),
        f.signals("buffered"),
        f.signals("deduped"),
        f.signals_caused,
    );
    let received = f.lease_received.values().sum::<u64>() + f.signal_received.values().sum::<u64>();
    if f.exactly_once() {
        println!(
            "families once     every lease event and signal effect the run caused arrived once, in order ({received} events)"
        );
    } else {
        println!(
            "families once     FAILED: leases {} lost, {} duplicated; signals {} lost, {} duplicated; {} out of order",
            f.lease_lost, f.lease_duplicated, f.signal_lost, f.signal_duplicated, f.out_of_order
        );
    }
}

//! The chaos ledger: what producers committed against what each subscriber received.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ff_completions::{CompletionEvent, ExecutionId};

/// One delivery as a subscriber saw it.
pub struct Received {
    pub event: CompletionEvent,
    /// Commit (backend clock) to receipt.
    pub delay: Duration,
}

/// What the producers know: committed for sure, and cut by a fault (may or may not be in).
#[derive(Default)]
pub struct Committed {
    pub sure: HashSet<ExecutionId>,
    pub uncertain: HashSet<ExecutionId>,
    pub namespace: HashMap<ExecutionId, String>,
}

/// The verdict for one subscriber.
pub struct Verdict {
    pub name: String,
    pub expected: usize,
    pub received: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
    pub unexpected: usize,
    pub worst_delay: Duration,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.unexpected == 0
    }
}

/// Compares a subscriber's deliveries (in arrival order) with what it should have seen.
/// `position` decodes an event's cursor into its lane (one per Valkey partition, one for the
/// other backends) and its place in that lane's order: order is judged within each lane.
pub fn judge(
    name: &str,
    received: &[Received],
    committed: &Committed,
    wants: impl Fn(&ExecutionId) -> bool,
    position: impl Fn(&CompletionEvent) -> (u16, (u64, u64, u64)),
) -> Verdict {
    let expected: HashSet<_> = committed.sure.iter().filter(|id| wants(id)).copied().collect();
    let mut seen = HashSet::new();
    let (mut duplicated, mut out_of_order, mut unexpected) = (0, 0, 0);
    let mut last: std::collections::HashMap<u16, (u64, u64, u64)> = std::collections::HashMap::new();
    for r in received {
        let id = r.event.execution_id;
        if !seen.insert(id) {
            duplicated += 1;
        }
        if !expected.contains(&id) && !committed.uncertain.contains(&id) {
            unexpected += 1;
        }
        let (lane, pos) = position(&r.event);
        if last.get(&lane).is_some_and(|l| pos <= *l) {
            out_of_order += 1;
        }
        last.insert(lane, pos);
    }
    Verdict {
        name: name.to_owned(),
        expected: expected.len(),
        received: received.len(),
        lost: expected.iter().filter(|id| !seen.contains(id)).count(),
        duplicated,
        out_of_order,
        unexpected,
        worst_delay: received.iter().map(|r| r.delay).max().unwrap_or_default(),
    }
}

/// How much later than usual events arrive after each kind of fault.
pub struct FaultDelay {
    pub fault: &'static str,
    /// Events committed within the window after a fault of this kind.
    pub events: u64,
    /// Their p99 delay minus the baseline p99, in milliseconds (0 when not above it).
    pub extra_p99_ms: u64,
}

/// The p99 delay of events committed away from faults (the baseline, in milliseconds), and per
/// kind of fault the p99 extra delay of the events committed within `window_ms` after one (each
/// event counts for the latest fault before its commit; within `settle_ms` after a server
/// crash (a fault named `SIGKILL …`), for the crash, whose outage outlasts any other fault). Events committed more than a
/// second after the latest fault are the baseline.
/// Times are milliseconds since the epoch, the faults' taken on this host as they were injected.
pub fn delay_after_faults(
    received: &[Received],
    faults: &[(&'static str, i64)],
    window_ms: i64,
    settle_ms: i64,
) -> (u64, Vec<FaultDelay>) {
    let histogram = || hdrhistogram::Histogram::<u64>::new(3).expect("3 significant figures is valid");
    let mut baseline = histogram();
    let mut by_fault: Vec<(&'static str, hdrhistogram::Histogram<u64>)> = Vec::new();
    for r in received {
        let at = r.event.at.0;
        let delay = r.delay.as_millis() as u64;
        let before = |(_, t): &&(&'static str, i64)| *t <= at;
        let crash = faults
            .iter()
            .filter(before)
            .filter(|(f, t)| f.starts_with("SIGKILL") && at - t <= settle_ms)
            .max_by_key(|(_, t)| *t);
        let latest = faults.iter().filter(before).max_by_key(|(_, t)| *t);
        match crash.or(latest) {
            Some((fault, _)) if crash.is_some() || latest.is_some_and(|(_, t)| at - t <= window_ms) => {
                let slot = match by_fault.iter().position(|(f, _)| f == fault) {
                    Some(i) => i,
                    None => {
                        by_fault.push((fault, histogram()));
                        by_fault.len() - 1
                    }
                };
                by_fault[slot].1.saturating_record(delay);
            }
            Some((_, t)) if at - t > 1000 => baseline.saturating_record(delay),
            None => baseline.saturating_record(delay),
            _ => {}
        }
    }
    let base = baseline.value_at_quantile(0.99);
    let delays = by_fault
        .into_iter()
        .map(|(fault, h)| FaultDelay {
            fault,
            events: h.len(),
            extra_p99_ms: h.value_at_quantile(0.99).saturating_sub(base),
        })
        .collect();
    (base, delays)
}

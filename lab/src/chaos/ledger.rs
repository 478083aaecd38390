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
    // Milliseconds, in a histogram that tracks up to an hour of microseconds.
    let histogram = crate::micros_histogram;
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

/// One lease-history or signal-delivery event as a subscriber saw it.
pub struct FamilyReceived {
    pub execution: ExecutionId,
    /// Its kind in the ledger: `claimed` (acquired or reclaimed), `renewed`, `expired`, or the
    /// signal's effect.
    pub key: String,
    /// Its lane and place in that lane's order (as [`judge`]'s `position`).
    pub position: (u16, (u64, u64, u64)),
    /// Its cursor: the same cursor twice is one event delivered twice.
    pub cursor: Vec<u8>,
    pub delay: Duration,
}

/// What producers know of the family events they caused, per execution and kind: caused for
/// sure (the call returned), and maybe (the call was cut by a fault). A claim cut by a fault
/// may have claimed executions nobody knows: `uncertain_claims` counts such calls, each worth
/// up to `claim_limit` unknown claims (and as many unknown expiries of them later).
#[derive(Default)]
pub struct FamilyCommitted {
    pub sure: HashMap<(ExecutionId, String), u32>,
    pub uncertain: HashMap<(ExecutionId, String), u32>,
    pub uncertain_claims: u32,
    pub claim_limit: u32,
}

impl FamilyCommitted {
    pub fn caused(&mut self, id: ExecutionId, key: &str) {
        *self.sure.entry((id, key.to_owned())).or_default() += 1;
    }

    pub fn maybe(&mut self, id: ExecutionId, key: &str) {
        *self.uncertain.entry((id, key.to_owned())).or_default() += 1;
    }

    /// An expiry sweep cut by a fault may have expired any lease held at the time (on Valkey
    /// the sweep is one call per partition: some ran, and what they expired is unknown): every
    /// execution claimed so far may have one more `expired`.
    pub fn sweep_cut(&mut self) {
        let claimed: Vec<ExecutionId> = self.sure.keys().filter(|k| k.1 == "claimed").map(|k| k.0).collect();
        for id in claimed {
            self.maybe(id, "expired");
        }
    }
}

/// Compares a family subscriber's deliveries (in arrival order) with what producers caused:
/// `lost` counts events caused for sure and never received, `duplicated` a cursor received
/// again, `out_of_order` a place not after the lane's previous one, `unexpected` events
/// beyond what was caused for sure or maybe (a signal cut by a fault may have had any
/// effect: key `*`).
pub fn judge_family(name: &str, received: &[FamilyReceived], committed: &FamilyCommitted) -> Verdict {
    let mut cursors = HashSet::new();
    let mut got: HashMap<(ExecutionId, String), u32> = HashMap::new();
    let mut last: HashMap<u16, (u64, u64, u64)> = HashMap::new();
    let (mut duplicated, mut out_of_order) = (0, 0);
    for r in received {
        if !cursors.insert(r.cursor.clone()) {
            duplicated += 1;
            continue;
        }
        *got.entry((r.execution, r.key.clone())).or_default() += 1;
        let (lane, pos) = r.position;
        if last.get(&lane).is_some_and(|l| pos <= *l) {
            out_of_order += 1;
        }
        last.insert(lane, pos);
    }
    let count = |map: &HashMap<(ExecutionId, String), u32>, id: ExecutionId, key: &str| {
        map.get(&(id, key.to_owned())).copied().unwrap_or(0)
    };
    let lost = committed.sure.iter().map(|(k, n)| n.saturating_sub(count(&got, k.0, &k.1)) as usize).sum();
    let mut claims_left = committed.uncertain_claims * committed.claim_limit;
    let mut unknown_expiries_left = claims_left;
    let mut any_left: HashMap<ExecutionId, u32> =
        committed.uncertain.iter().filter(|(k, _)| k.1 == "*").map(|(k, n)| (k.0, *n)).collect();
    let mut unexpected = 0;
    for ((id, key), n) in &got {
        let mut extra = n.saturating_sub(count(&committed.sure, *id, key) + count(&committed.uncertain, *id, key));
        let allowance = match key.as_str() {
            "claimed" => &mut claims_left,
            "expired" => &mut unknown_expiries_left,
            _ => any_left.entry(*id).or_default(),
        };
        let covered = extra.min(*allowance);
        (extra, *allowance) = (extra - covered, *allowance - covered);
        unexpected += extra as usize;
    }
    Verdict {
        name: name.to_owned(),
        expected: committed.sure.values().map(|n| *n as usize).sum(),
        received: received.len(),
        lost,
        duplicated,
        out_of_order,
        unexpected,
        worst_delay: received.iter().map(|r| r.delay).max().unwrap_or_default(),
    }
}

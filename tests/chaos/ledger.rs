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
/// `position` decodes a cursor into the backend's total order.
pub fn judge(
    name: &str,
    received: &[Received],
    committed: &Committed,
    wants: impl Fn(&ExecutionId) -> bool,
    position: impl Fn(&CompletionEvent) -> (u64, u64, u64),
) -> Verdict {
    let expected: HashSet<_> = committed.sure.iter().filter(|id| wants(id)).copied().collect();
    let mut seen = HashSet::new();
    let (mut duplicated, mut out_of_order, mut unexpected) = (0, 0, 0);
    let mut last: Option<(u64, u64, u64)> = None;
    for r in received {
        let id = r.event.execution_id;
        if !seen.insert(id) {
            duplicated += 1;
        }
        if !expected.contains(&id) && !committed.uncertain.contains(&id) {
            unexpected += 1;
        }
        let pos = position(&r.event);
        if last.is_some_and(|l| pos <= l) {
            out_of_order += 1;
        }
        last = Some(pos);
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

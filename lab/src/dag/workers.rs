//! The workers: claim executions and do with each what its decision says, handing waiters and
//! long executions to the lease and signal families when they run.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ff_completions::ExecutionId;

use super::families::FamilyRun;
use super::flows::{Decision, finish};
use crate::Engine;

/// What the workers share: the engine, each execution's decision, and the executions whose
/// completions are traced.
pub(super) struct Work {
    pub(super) engine: Arc<dyn Engine>,
    pub(super) decisions: Arc<HashMap<ExecutionId, Decision>>,
    pub(super) traced: Arc<HashSet<ExecutionId>>,
    /// Time spent on each execution before finishing it.
    pub(super) pace: Duration,
}

/// Claims executions and does with each what its decision says, until `stop`. With the
/// families on, the claims go to their ledger, and waiters and long executions are handed to
/// them first.
pub(super) async fn work(work: Work, name: String, families: Option<Arc<FamilyRun>>, stop: Arc<AtomicBool>) {
    let Work { engine, decisions, traced, pace } = work;
    let mut long_running = tokio::task::JoinSet::new();
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
        if let Some(families) = &families {
            families.claimed(&claimed);
        }
        for id in claimed {
            if let Some(families) = &families
                && families.take_over(&engine, &decisions, &name, id, &mut long_running).await
            {
                continue;
            }
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            finish(&*engine, &decisions, id, traced.contains(&id)).await;
        }
        while long_running.try_join_next().is_some() {}
    }
    long_running.join_all().await;
}

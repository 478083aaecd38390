//! The workload: the flows' shape (fan-out, fan-in, a chain, a diamond), what each execution's
//! worker does with it, and the final states the DAG implies.

use std::collections::HashMap;

use crate::{Engine, ExecutionSpec};
use ff_completions::{ExecutionId, FlowId};
use rand::Rng;
use rand::rngs::StdRng;

use super::Scenario;

/// What a worker does with an execution, fixed up front from the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Succeed,
    Fail,
    /// Fails retryably on the first attempt, succeeds on the second.
    RetryThenSucceed,
    Cancel,
}

/// One flow's executions with their parents, in an order where parents come first.
pub(super) struct Dag {
    pub(super) nodes: Vec<(ExecutionSpec, Decision)>,
}

pub(super) fn decide(rng: &mut StdRng, s: &Scenario) -> Decision {
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
pub(super) fn build_flow(flow: &FlowId, s: &Scenario, rng: &mut StdRng) -> Dag {
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

/// The shape of a flow, as a live view draws it.
pub(super) fn shape(dag: &Dag) -> super::FlowShape {
    let flow_id = dag.nodes.first().and_then(|(spec, _)| spec.flow_id).unwrap_or_default();
    let nodes =
        dag.nodes.iter().map(|(spec, _)| super::NodeShape { id: spec.id, parents: spec.parents.clone() }).collect();
    super::FlowShape { flow_id, nodes }
}

/// The state the DAG implies: skipped under any parent that did not succeed, else the decision.
pub(super) fn expected_states(dags: &[Dag]) -> HashMap<ExecutionId, &'static str> {
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

/// Does with a running execution what its decision says; a `traced` one completes inside an
/// `execute` span whose trace context it records with its completion.
pub(super) async fn finish(
    engine: &dyn Engine,
    decisions: &HashMap<ExecutionId, Decision>,
    id: ExecutionId,
    traced: bool,
) {
    let result = match decisions.get(&id).copied().unwrap_or(Decision::Succeed) {
        Decision::Succeed => complete(engine, id, traced).await,
        Decision::Fail => engine.fail(&id, false).await.map(|_| ()),
        Decision::Cancel => engine.cancel(&id).await.map(|_| ()),
        Decision::RetryThenSucceed => match engine.execution(&id).await {
            Ok(Some(info)) if info.attempt <= 1 => engine.fail(&id, true).await.map(|_| ()),
            _ => complete(engine, id, traced).await,
        },
    };
    if let Err(err) = result {
        tracing::warn!(%id, error = %err, "worker operation failed");
    }
}

/// Completes `id`; traced, inside an `execute` span whose trace context goes with the
/// completion (when the span is exported: otherwise there is none to record).
async fn complete(engine: &dyn Engine, id: ExecutionId, traced: bool) -> Result<(), crate::Error> {
    use tracing::Instrument;

    if !traced {
        return engine.complete(&id).await.map(|_| ());
    }
    let span = tracing::info_span!(target: super::trace::TARGET, "execute", execution_id = %id);
    async {
        match ff_completions::TraceParent::current() {
            Some(traceparent) => engine.complete_traced(&id, &traceparent).await.map(|_| ()),
            None => engine.complete(&id).await.map(|_| ()),
        }
    }
    .instrument(span)
    .await
}

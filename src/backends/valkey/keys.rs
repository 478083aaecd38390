//! Key names of the Valkey backend, as documented at the top of `lua/ff_completions.lua`.
//! Execution and flow keys carry their `{fp:N}` hash tag; the shared indexes and the stream
//! are single keys.
#![cfg_attr(not(feature = "demo-engine"), allow(dead_code))]

use super::STREAM_KEY;
use crate::types::{ExecutionId, FlowId};

/// Eligible executions, scored by creation time.
pub(super) const ELIGIBLE: &str = "ff:eligible";

/// `parent|child` edges whose parent is terminal and which are not resolved yet.
pub(super) const PENDING_EDGES: &str = "ff:pending_edges";

/// `ff:exec:{fp:N}:<uuid>:<part>`.
pub(super) fn exec(id: &ExecutionId, part: &str) -> String {
    format!("ff:exec:{}:{}:{part}", id.hash_tag(), id.uuid())
}

/// `ff:flow:{fp:N}:<uuid>:<part>`, N being the flow's partition.
pub(super) fn flow(flow: &FlowId, part: &str) -> String {
    format!("ff:flow:{{fp:{}}}:{}:{part}", flow.partition(), flow.uuid())
}

/// The shared keys every terminal call writes: stream, eligible index, pending edges.
pub(super) fn terminal_shared() -> [String; 3] {
    [STREAM_KEY.to_owned(), ELIGIBLE.to_owned(), PENDING_EDGES.to_owned()]
}

/// The keys of a terminal call on one execution: its core and children, then the shared ones.
pub(super) fn terminal(id: &ExecutionId) -> Vec<String> {
    let mut keys = vec![exec(id, "core"), exec(id, "children")];
    keys.extend(terminal_shared());
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execution_keys_carry_the_hash_tag_and_match_the_library() {
        let flow = FlowId::new();
        let id = ExecutionId::new_in(&flow);
        // The library derives related keys as 'ff:exec:' .. id .. ':' .. part.
        assert_eq!(exec(&id, "core"), format!("ff:exec:{id}:core"));
        assert!(flow_key_has_tag(&flow, &id));
    }

    fn flow_key_has_tag(flow: &FlowId, id: &ExecutionId) -> bool {
        self::flow(flow, "members").starts_with(&format!("ff:flow:{}:", id.hash_tag()))
    }
}

//! Key names of the Valkey backend, as documented at the top of `lua/ff_completions.lua`.
//! Every key carries the `{fp:N}` hash tag of the partition it belongs to, so a terminal call's
//! keys (its completion stream included) share one cluster slot.
#![cfg_attr(not(feature = "demo-engine"), allow(dead_code))]

use crate::types::{ExecutionId, FlowId, PARTITION_COUNT};

/// `ff:exec:{fp:N}:<uuid>:<part>`.
pub(super) fn exec(id: &ExecutionId, part: &str) -> String {
    format!("ff:exec:{}:{}:{part}", id.hash_tag(), id.uuid())
}

/// `ff:flow:{fp:N}:<uuid>:<part>`, N being the flow's partition.
pub(super) fn flow(flow: &FlowId, part: &str) -> String {
    format!("ff:flow:{{fp:{}}}:{}:{part}", flow.partition(), flow.uuid())
}

/// `ff:completions:{fp:N}`: partition N's completion stream.
pub(super) fn stream(partition: u16) -> String {
    format!("ff:completions:{{fp:{partition}}}")
}

/// `ff:eligible:{fp:N}`: partition N's eligible executions, scored by creation time.
pub(super) fn eligible(partition: u16) -> String {
    format!("ff:eligible:{{fp:{partition}}}")
}

/// `ff:pending_edges:{fp:N}`: `parent|child` edges whose parent (in partition N) is terminal
/// and which are not resolved yet.
pub(super) fn pending_edges(partition: u16) -> String {
    format!("ff:pending_edges:{{fp:{partition}}}")
}

/// `ff:lease_expiry:{fp:N}`: partition N's leased executions, scored by lease end (ms).
pub(super) fn lease_expiry(partition: u16) -> String {
    format!("ff:lease_expiry:{{fp:{partition}}}")
}

/// The parts of a durable group's keys, in the order the library's `ff_group_*` functions take
/// them: members (zset), then per partition owner, expiry, token, acknowledged id (hashes).
const GROUP_PARTS: [&str; 5] = ["members", "owner", "expiry", "token", "acked"];

/// `ff:group:{g:<name>}:<part>` for each of [`GROUP_PARTS`]: one group's keys. The hash tag
/// starts with `g:`, so it is never empty: a name holding `}` cuts the tag short, but at the
/// same place in every key of the group (their slot is still one), and no part's name ends
/// another's, so two groups never share a key.
pub(super) fn group(name: &str) -> [String; 5] {
    GROUP_PARTS.map(|part| format!("ff:group:{{g:{name}}}:{part}"))
}

/// Every partition.
pub(super) fn partitions() -> impl Iterator<Item = u16> {
    0..PARTITION_COUNT
}

/// The partition keys every terminal call in partition N writes: stream, eligible index,
/// pending edges.
pub(super) fn terminal_shared(partition: u16) -> [String; 3] {
    [stream(partition), eligible(partition), pending_edges(partition)]
}

/// The keys of a terminal call on one execution: its core and children, then its partition's.
pub(super) fn terminal(id: &ExecutionId) -> Vec<String> {
    let mut keys = vec![exec(id, "core"), exec(id, "children")];
    keys.extend(terminal_shared(id.partition()));
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

    #[test]
    fn every_key_of_a_terminal_call_shares_the_execution_s_hash_tag() {
        let id = ExecutionId::new_in(&FlowId::new());
        for key in terminal(&id) {
            assert!(key.contains(&id.hash_tag()), "{key}");
        }
        assert_eq!(stream(5), "ff:completions:{fp:5}");
        assert_eq!(partitions().count(), 256);
    }

    /// The hash tag as the cluster computes it: the text between the first `{` and the next
    /// `}`, when not empty; else the whole key.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').map_or(key.len(), |i| i + 1);
        match key[open..].find('}') {
            Some(len) if len > 0 => &key[open..open + len],
            _ => key,
        }
    }

    #[test]
    fn a_group_s_keys_share_one_hash_tag_whatever_braces_its_name_holds() {
        for name in ["orders", "}", "{", "{}", "}x{", "a}b", "{a}", "x}:members", "g:1}"] {
            let keys = group(name);
            let tags: std::collections::BTreeSet<&str> = keys.iter().map(|k| hash_tag(k)).collect();
            assert_eq!(tags.len(), 1, "{name:?}: {keys:?}");
            assert!(tags.iter().all(|t| t.starts_with("g:")), "{name:?}: {tags:?}");
            assert!(keys.iter().all(|k| k.starts_with("ff:group:")), "{keys:?}");
        }
        assert_eq!(group("orders")[0], "ff:group:{g:orders}:members");
        // No part's name ends another's: two groups' keys never meet.
        let all: std::collections::BTreeSet<String> =
            ["a", "a}:members", "a}:owner", "a}:token}:acked"].iter().flat_map(|n| group(n)).collect();
        assert_eq!(all.len(), 4 * 5);
    }

    fn flow_key_has_tag(flow: &FlowId, id: &ExecutionId) -> bool {
        self::flow(flow, "members").starts_with(&format!("ff:flow:{}:", id.hash_tag()))
    }
}

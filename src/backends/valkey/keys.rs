//! Key names of the Valkey backend, as documented at the top of `lua/ff_completions.lua`: the
//! partition streams, each with the `{fp:N}` hash tag of its partition (a producer writes a
//! flow's completions in the flow's slot), and the durable groups' keys.

use crate::types::PARTITION_COUNT;

/// `ff:completions:{fp:N}`: partition N's completion stream.
pub(super) fn stream(partition: u16) -> String {
    format!("ff:completions:{{fp:{partition}}}")
}

/// How many keys a durable group has.
pub(super) const GROUP_KEYS: usize = 10;

/// The parts of a durable group's keys, in the order the library's `ff_group_*` functions take
/// them: members (zset); per partition owner, expiry, token, acknowledged id (hashes); per
/// member its incarnation; per partition its holder's incarnation, its unacknowledged count,
/// its refused event; the parked events (hashes).
const GROUP_PARTS: [&str; GROUP_KEYS] =
    ["members", "owner", "expiry", "token", "acked", "incarnation", "holder", "pending", "retry", "parked"];

/// `ff:group:{g:<name>}:<part>` for each of [`GROUP_PARTS`]: one group's keys. The hash tag
/// starts with `g:`, so it is never empty: a name holding `}` cuts the tag short, but at the
/// same place in every key of the group (their slot is still one), and no part's name ends
/// another's, so two groups never share a key.
pub(super) fn group(name: &str) -> [String; GROUP_KEYS] {
    GROUP_PARTS.map(|part| format!("ff:group:{{g:{name}}}:{part}"))
}

/// Every partition.
pub(super) fn partitions() -> impl Iterator<Item = u16> {
    0..PARTITION_COUNT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_streams_carry_their_partition_s_hash_tag() {
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
        assert_eq!(all.len(), 4 * GROUP_KEYS);
        for (i, part) in GROUP_PARTS.iter().enumerate() {
            assert!(GROUP_PARTS.iter().enumerate().all(|(j, other)| i == j || !part.ends_with(other)), "{part}");
        }
    }
}

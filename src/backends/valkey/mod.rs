//! Valkey backend. Producers (the host's Lua functions; the lab's demo library) write each
//! terminal transition's state, `XADD` its completion to its partition's stream
//! (`ff:completions:{fp:N}`, in the flow's slot) and `PUBLISH` it, in one atomic call. The
//! subsystem's own function library, `lua/ff_completions.lua`, embedded here and loaded on
//! connect (and again when a restarted server lost it), holds the readers and the durable
//! groups' store. Readers take content from the streams only: `XRANGE`-style reads from a frontier (one stream
//! id per partition) through the read-only library function `ff_read_after`. Pub/sub on
//! [`PUBSUB_CHANNEL`] only wakes the listener: it names the partition to read, and a lost
//! subscription (ferriskey re-subscribes silently) makes the listener read every stream.
//! Lease-history and signal-delivery entries go to the same partition streams (a `family`
//! field; absent on a completion), written by the library atomically with their state change,
//! and wake the listener on [`FAMILY_CHANNEL`], which its one subscriber connection also
//! subscribes to: plain subscribers of [`PUBSUB_CHANNEL`] see completions only.
//!
//! - `library`: client construction, error mapping, loading the library, `FCALL`.
//! - `keys`: the stream and group key names, each with its slot's hash tag.
//! - `lanes`: reading the streams, one lane per call or one call per primary for many.
//! - `stream`: parsing stream replies and decoding entries (bad ones are skipped, not fatal).
//! - `source`: the listener's reads (a completion source) and its pub/sub waker.
//! - `groups`: durable groups' store (heartbeat, fenced ack, leave, view) over the library's
//!   `ff_group_*` functions, one slot per group.
//!
//! The same layout and code serve a cluster: each call names keys of one slot, so ferriskey's
//! cluster client (`ValkeyConnection::cluster`) routes it to the primary that owns it.

mod groups;
mod keys;
mod lanes;
mod library;
mod source;
mod stream;

pub use library::{connect_client, load_library};
pub(crate) use source::ValkeySource;

/// The single completion stream of library versions 1 and 2, still read (never written) after
/// an upgrade until it holds nothing newer than a reader's position.
pub const LEGACY_STREAM_KEY: &str = "ff:completions";

/// Partition `partition`'s completion stream, `ff:completions:{fp:N}`: a producer `XADD`s a
/// completion of a flow of that partition here.
pub fn stream_key(partition: u16) -> String {
    keys::stream(partition)
}

/// A durable group's keys, `ff:group:{g:<name>}:<part>` (members, owner, expiry, token,
/// acked, incarnation, holder, pending, retry, parked): one hash tag, so one cluster slot,
/// whatever braces the name holds.
pub fn group_keys(name: &str) -> [String; 10] {
    keys::group(name)
}

/// The pub/sub channel every terminal transition is also published on, with the JSON payload
/// `{"execution_id", "flow_id", "outcome"}`.
pub const PUBSUB_CHANNEL: &str = "ff:dag:completions";

/// The pub/sub channel lease-history and signal-delivery entries wake listeners on, with the
/// JSON payload `{"execution_id", "family"}`; [`PUBSUB_CHANNEL`] carries completions only. Its
/// hash tag gives it the cluster slot of [`PUBSUB_CHANNEL`], so a cluster client, which routes
/// `SUBSCRIBE` by channel slot, subscribes both on one connection.
pub const FAMILY_CHANNEL: &str = "{ff:dag:completions}:families";

/// The function library's source (`lua/ff_completions.lua`).
pub(crate) const LIBRARY: &str = include_str!("../../../lua/ff_completions.lua");

/// The library version this crate expects `FCALL ff_version 0` to answer; bumped together with
/// `VERSION` in the Lua source. Version 7 no longer holds the demo engine's producers; version
/// 8 fences a member's earlier incarnations, parks refused events and lets operators move
/// positions; 9 documents the completion's `traceparent` field.
pub const LIBRARY_VERSION: &str = "9";

/// Client name of the listener's dedicated subscriber connection (find it in `CLIENT LIST`).
pub const LISTENER_CLIENT_NAME: &str = "ff-completions-listener";

/// Default `MAXLEN ~` producers trim the completion stream to (the default of
/// [`ValkeyConnection::stream_maxlen`](crate::ValkeyConnection)).
pub const DEFAULT_STREAM_MAXLEN: u64 = 1_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lua_version_matches_the_rust_constant() {
        let line = format!("local VERSION = '{LIBRARY_VERSION}'");
        assert!(LIBRARY.contains(&line), "lua/ff_completions.lua must declare {line}");
        assert!(LIBRARY.starts_with("#!lua name=ff_completions\n"));
    }

    #[test]
    fn the_default_maxlen_is_the_connection_default() {
        assert_eq!(crate::ValkeyConnection::new("h", 1).stream_maxlen, DEFAULT_STREAM_MAXLEN);
    }
}

//! Valkey backend. The producers are the Lua function library `lua/ff_completions.lua`,
//! embedded here and loaded on connect (and again when a restarted server lost it); every
//! terminal transition writes state, `XADD`s its completion to one stream and `PUBLISH`es it, in
//! one atomic call. Readers use the stream only: `XRANGE`-style reads from a cursor through the
//! read-only library function `ff_read_after`, and `XREAD BLOCK` on a dedicated connection as
//! the listener's waker. Pub/sub on [`PUBSUB_CHANNEL`] is published for existing consumers and
//! never read here: ferriskey re-subscribes silently and drops what was published meanwhile.
//!
//! - `library`: client construction, error mapping, loading the library, `FCALL`.
//! - `keys`: the key names, with their `{fp:N}` hash tags.
//! - `stream`: parsing stream replies and decoding entries (bad ones are skipped, not fatal).
//! - `source`: the listener's reads (a completion source) and its `XREAD BLOCK` waker.
//! - `engine`: [`ValkeyEngine`], the engine surface over the library.
//!
//! Cluster mode is not supported (the library derives related executions' keys itself), but
//! every execution and flow key carries its hash tag.

#[cfg(feature = "demo-engine")]
mod engine;
mod keys;
mod library;
mod source;
mod stream;

#[cfg(feature = "demo-engine")]
pub use engine::ValkeyEngine;
#[cfg(feature = "testing")]
pub use library::connect_client;
pub(crate) use source::ValkeySource;

/// The completion stream every terminal transition is `XADD`ed to.
pub const STREAM_KEY: &str = "ff:completions";

/// The pub/sub channel every terminal transition is also published on, with the JSON payload
/// `{"execution_id", "flow_id", "outcome"}`.
#[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
pub const PUBSUB_CHANNEL: &str = "ff:dag:completions";

/// The function library's source (`lua/ff_completions.lua`).
pub const LIBRARY: &str = include_str!("../../../lua/ff_completions.lua");

/// The library version this crate expects `FCALL ff_version 0` to answer; bumped together with
/// `VERSION` in the Lua source.
pub const LIBRARY_VERSION: &str = "2";

/// Client name of the listener's dedicated blocking connection (find it in `CLIENT LIST`).
pub const LISTENER_CLIENT_NAME: &str = "ff-completions-listener";

/// Default `MAXLEN ~` producers trim the completion stream to (the default of
/// [`ValkeyConnection::stream_maxlen`](crate::ValkeyConnection)).
#[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
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

    #[test]
    fn the_lua_names_the_same_channel() {
        assert!(LIBRARY.contains(&format!("local CHANNEL = '{PUBSUB_CHANNEL}'")));
    }
}

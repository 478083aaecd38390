//! Valkey end to end: Lua function -> stream (and pub/sub) -> listener -> filter -> subscriber,
//! against real `valkey-server`s the harness starts, including ones it SIGKILLs and restarts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferriskey::Value;
use ff_completions::ValkeyEngine;
use ff_completions::testing::valkey::{LISTENER_CLIENT_NAME, PUBSUB_CHANNEL, STREAM_KEY};
use ff_completions::testing::{
    encode_postgres_cursor, encode_postgres_event_cursor, encode_sqlite_cursor, encode_valkey_cursor,
};
use ff_completions::{
    BackendConfig, BackendRetry, BackendTimeouts, CancelFlowPolicy, CompletionOutcome, CompletionSupervisorHandle,
    DependencyResolution, Engine, EngineError, ExecutionId, ExecutionSpec, FailOutcome, FlowId, Namespace, Retention,
    ScannerFilter, SubscribeRequest, SupervisorConfig, TimestampMs, ValkeyConnection, connect_engine,
};

use crate::contract::{self, Fixture, QUIET, WAIT, assert_nothing_restarted, complete_n, fixture, running};
use crate::support::valkey::ValkeyServer;
use crate::support::{assert_exactly_once, assert_no_more, init_tracing, take_events, wait_until};

mod delivery;
mod library;
mod outages;
mod retention;

async fn contract_backend() -> (ValkeyServer, BackendConfig) {
    init_tracing();
    let server = ValkeyServer::start().await;
    let config = server.config();
    (server, config)
}

contract::contract_tests!(
    foreign cursors: vec![encode_postgres_cursor(1, 2), encode_postgres_event_cursor(3), encode_sqlite_cursor(4)]
);

/// Quick restarts for tests that break connections on purpose.
fn impatient(config: BackendConfig) -> BackendConfig {
    config
        .with_retry(BackendRetry::new(2, 20, 4, 0))
        .with_timeouts(BackendTimeouts::default().with_connect(Duration::from_millis(500)))
}

/// Every execution id in the completion stream, in stream order: what producers committed.
async fn stream_order(server: &ValkeyServer) -> Vec<ExecutionId> {
    let reply = server.command(&["XRANGE", STREAM_KEY, "-", "+"]).await;
    let Value::Map(entries) = reply else { panic!("XRANGE answered {reply:?}") };
    entries
        .iter()
        .map(|(_, fields)| {
            let Value::Array(pairs) = fields else { panic!("fields {fields:?}") };
            let id = pairs.iter().find_map(|pair| match pair {
                Ok(Value::Array(kv)) => match (&kv[0], &kv[1]) {
                    (Ok(Value::BulkString(k)), Ok(Value::BulkString(v))) if &k[..] == b"execution_id" => {
                        Some(String::from_utf8_lossy(v).into_owned())
                    }
                    _ => None,
                },
                _ => None,
            });
            ExecutionId::parse(&id.expect("execution_id field")).expect("execution id")
        })
        .collect()
}

async fn stream_len(server: &ValkeyServer) -> i64 {
    match server.command(&["XLEN", STREAM_KEY]).await {
        Value::Int(n) => n,
        other => panic!("XLEN answered {other:?}"),
    }
}

async fn listener_events_read(f: &Fixture) -> u64 {
    f.tree.stats().await.map(|s| s.listeners[0].events_read).unwrap_or(0)
}

/// `XADD`s one entry with the given id (`*` for the next) and fields, as a foreign producer might.
async fn xadd(server: &ValkeyServer, id: &str, fields: &[&str]) {
    server.command(&[&["XADD", STREAM_KEY, id][..], fields].concat()).await;
}

/// A valid entry's fields for `id`, committed at `at` (text, so anything can be written).
fn entry_fields(id: &ExecutionId, at: &str) -> Vec<String> {
    [
        "execution_id",
        &id.to_string(),
        "outcome",
        "success",
        "occurred_at_ms",
        at,
        "partition",
        &id.partition().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

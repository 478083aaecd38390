//! Valkey end to end: Lua function -> stream (and pub/sub) -> listener -> filter -> subscriber,
//! against real `valkey-server`s the harness starts, including ones it SIGKILLs and restarts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferriskey::Value;
use ff_completions::cursor::{
    encode_postgres_cursor, encode_postgres_event_cursor, encode_sqlite_cursor, encode_valkey_cursor,
    encode_valkey_frontier,
};
use ff_completions::valkey::{LEGACY_STREAM_KEY, LISTENER_CLIENT_NAME, PUBSUB_CHANNEL, stream_key};
use ff_completions::{
    BackendConfig, BackendRetry, BackendTimeouts, CompletionOutcome, CompletionSupervisorHandle, ExecutionId, FlowId,
    Namespace, Retention, ScannerFilter, SupervisorConfig, TimestampMs, ValkeyConnection,
};
use ff_completions_lab::ValkeyEngine;
use ff_completions_lab::{CancelFlowPolicy, DependencyResolution, Engine, ExecutionSpec, FailOutcome, connect_engine};

use crate::contract::{self, Fixture, QUIET, WAIT, assert_nothing_restarted, complete_n, fixture, running};
use crate::support::valkey::ValkeyServer;
use crate::support::{
    assert_exactly_once, assert_exactly_once_per_partition, assert_no_more, init_tracing, take_events, wait_until,
};

mod cluster;
mod delivery;
mod families;
mod groups;
mod library;
mod outages;
mod partitions;
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

crate::families::family_tests!();
crate::tail_await::tail_await_tests!();

crate::groups::group_store_tests!();
crate::durable::durable_tests!();

/// Quick restarts for tests that break connections on purpose.
fn impatient(config: BackendConfig) -> BackendConfig {
    config
        .with_retry(BackendRetry::new(2, 20, 4, 0))
        .with_timeouts(BackendTimeouts::default().with_connect(Duration::from_millis(500)))
}

/// Every stream the backend reads: the partitions', then the single stream of earlier versions.
fn all_streams() -> Vec<String> {
    (0..256).map(stream_key).chain([LEGACY_STREAM_KEY.to_owned()]).collect()
}

/// The partition stream an entry with these fields belongs to (partition 0's without a valid
/// execution id).
fn stream_for(fields: &[&str]) -> String {
    let id = fields.iter().position(|f| *f == "execution_id").and_then(|i| fields.get(i + 1));
    stream_key(id.and_then(|id| ExecutionId::parse(id).ok()).map_or(0, |id| id.partition()))
}

/// Every completion's execution id in the completion streams, by stream id (on one server, with
/// one clock: commit order, except for entries of different partitions committed in the same
/// millisecond). Entries of the other families in the same streams are left out.
async fn stream_order(server: &ValkeyServer) -> Vec<ExecutionId> {
    let mut all = Vec::new();
    for key in all_streams() {
        let reply = server.command(&["XRANGE", &key, "-", "+"]).await;
        all.extend(completion_entries(reply).into_iter().map(|(id, execution)| {
            let (ms, seq) = id.split_once('-').expect("ms-seq");
            ((ms.parse::<u64>().expect("ms"), seq.parse::<u64>().expect("seq")), execution)
        }));
    }
    all.sort_by_key(|(id, _)| *id);
    all.into_iter().map(|(_, id)| id).collect()
}

/// The `(stream id, execution id)` of each completion in an `XRANGE` reply, in its order;
/// lease-history and signal-delivery entries (with a `family` field) are left out.
fn completion_entries(reply: Value) -> Vec<(String, ExecutionId)> {
    let entries = match reply {
        Value::Map(entries) => entries,
        Value::Array(a) if a.is_empty() => Vec::new(),
        Value::Nil => Vec::new(),
        other => panic!("XRANGE answered {other:?}"),
    };
    entries
        .into_iter()
        .filter(|(_, fields)| field_of(fields, "family").is_none())
        .map(|(id, fields)| {
            let Value::BulkString(id) = id else { panic!("id {id:?}") };
            (String::from_utf8_lossy(&id).into_owned(), execution_of(&fields))
        })
        .collect()
}

/// Completions in `key` on `server` (entries of the other families left out).
async fn completions_in(server: &ValkeyServer, key: &str) -> usize {
    completion_entries(server.command(&["XRANGE", key, "-", "+"]).await).len()
}

/// The value of field `name` of a stream entry.
fn field_of(fields: &Value, name: &str) -> Option<String> {
    let Value::Array(pairs) = fields else { panic!("fields {fields:?}") };
    pairs.iter().find_map(|pair| match pair {
        Ok(Value::Array(kv)) => match (&kv[0], &kv[1]) {
            (Ok(Value::BulkString(k)), Ok(Value::BulkString(v))) if k[..] == *name.as_bytes() => {
                Some(String::from_utf8_lossy(v).into_owned())
            }
            _ => None,
        },
        _ => None,
    })
}

fn execution_of(fields: &Value) -> ExecutionId {
    ExecutionId::parse(&field_of(fields, "execution_id").expect("execution_id field")).expect("execution id")
}

/// Completions in every completion stream.
async fn completion_len(server: &ValkeyServer) -> usize {
    stream_order(server).await.len()
}

/// Entries of every family in every completion stream.
async fn stream_len(server: &ValkeyServer) -> i64 {
    let mut total = 0;
    for key in all_streams() {
        match server.command(&["XLEN", &key]).await {
            Value::Int(n) => total += n,
            other => panic!("XLEN answered {other:?}"),
        }
    }
    total
}

async fn listener_events_read(f: &Fixture) -> u64 {
    f.tree.stats().await.map(|s| s.listeners[0].events_read).unwrap_or(0)
}

/// Waits until, since the call, the listener read more than 20 events and producers counted
/// more than 20 completions in `committed`: a fault injected next lands in live delivery, with
/// new completions on both sides of it. (Events read include the claims' lease entries, so
/// they alone say little of how many completions were made.)
async fn until_delivery_moves_on(f: &Fixture, committed: &AtomicUsize, what: &str) {
    let (read, made) = (listener_events_read(f).await, committed.load(Ordering::Relaxed));
    wait_until(WAIT, what, || async {
        listener_events_read(f).await > read + 20 && committed.load(Ordering::Relaxed) > made + 20
    })
    .await;
}

/// `XADD`s one entry with the given id (`*` for the next) and fields to the stream of its
/// partition, as a foreign producer might.
/// How many calls of `command` (lower case, as `INFO commandstats` names it) the server has run.
async fn command_calls(server: &ValkeyServer, command: &str) -> u64 {
    let info = match server.command(&["INFO", "commandstats"]).await {
        Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        Value::VerbatimString { text, .. } => text,
        other => panic!("INFO answered {other:?}"),
    };
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|rest| rest.split(',').next().and_then(|n| n.parse().ok()).expect("calls=N"))
        .unwrap_or(0)
}

async fn xadd(server: &ValkeyServer, id: &str, fields: &[&str]) {
    server.command(&[&["XADD", &stream_for(fields), id][..], fields].concat()).await;
}

/// `XADD`s one entry to the single stream of earlier versions, as a producer of version 2 did.
async fn xadd_legacy(server: &ValkeyServer, id: &str, fields: &[&str]) {
    server.command(&[&["XADD", LEGACY_STREAM_KEY, id][..], fields].concat()).await;
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

/// Completes `per_flow` executions of each of `flows` fresh flows, round robin (flow 1's first,
/// flow 2's first, ..); returns them in commit order.
pub(crate) async fn interleaved(engine: &dyn Engine, flows: usize, per_flow: usize) -> Vec<ExecutionId> {
    let mut by_flow = Vec::new();
    for _ in 0..flows {
        by_flow.push(running(engine, ExecutionSpec::new, per_flow).await);
    }
    let mut done = Vec::new();
    for i in 0..per_flow {
        for ids in &by_flow {
            assert!(engine.complete(&ids[i]).await.expect("complete"));
            done.push(ids[i]);
        }
    }
    done
}

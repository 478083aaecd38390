//! # ff-completions
//!
//! Exactly-once, in-order, resumable completion streams for durable execution engines.
//! When an execution reaches a terminal state (success, failed, cancelled, expired, skipped),
//! its producer (a SQL function, a Lua function, a trigger) writes the completion atomically
//! with the state change; this crate turns those durable records into live, filtered streams,
//! one per subscriber, each event with a cursor to persist and resume from. Lease history and
//! signal delivery come through the same tree, with the same guarantees; durable
//! subscriptions keep their position in the backend and share the work among an engine's
//! instances.
//!
//! ```text
//! engine actor (optional parent: spawn_linked)
//! └── CompletionSupervisor      restarts children, keeps their cursors across restarts
//!     ├── Listener(postgres)    one per backend: one notification connection, one live reader
//!     ├── Listener(valkey)
//!     ├── Filter(subscriber 1)  one per subscriber: filter, dedupe by cursor, deliver, catch up
//!     └── Filter(subscriber n)
//! ```
//!
//! Spawn the tree with [`CompletionSupervisorHandle::spawn`] (or `spawn_linked` under your
//! engine's actor) and subscribe with [`CompletionSupervisorHandle::subscribe`], naming the
//! family: [`Completions`], [`LeaseHistory`], [`SignalDelivery`], or a [`DurableRequest`]. The
//! guide is the README and the pages of `docs/` in the repository: guarantees and the tests
//! that prove them, backends and installing into an existing database, durable groups,
//! operating the tree, benchmarks.
//!
//! Backends (cargo features): `postgres`, `valkey`, `sqlite`, all on by default; `serde`
//! (off by default) derives `Serialize`/`Deserialize` for events, cursors and ids;
//! `opentelemetry` (off by default) makes the delivery of an event that carries a producer's
//! [`TraceParent`] a span of the producer's trace, linked to the producer's span. Each
//! backend has a module of what a host's producers and operators need beside the tree:
//! [`postgres`], [`sqlite`], [`valkey`]; cursors' wire forms are in [`cursor`].
#![deny(missing_docs)]

mod actors;
mod backends;
mod backoff;
mod completion_backend;
mod config;
pub mod cursor;
mod durable;
pub mod env_config;
mod error;
mod event;
mod family;
mod instance_tags;
mod lease_history;
pub mod metrics;
mod scanner_filter;
mod signal_delivery;
mod stream_cursor;
mod trace_context;
mod types;

pub use actors::awaits::CompletionWatch;
pub use actors::handle::{CompletionSubscription, CompletionSupervisorHandle, Subscribe, Subscription};
pub use actors::ids::{BackendId, SubscriberId};
pub use actors::request::{Completions, Event, InstanceTags, LeaseHistory, SignalDelivery, SubscribeRequest, TailWait};
pub use actors::shared::FilterMode;
pub use actors::stats::{ListenerState, ListenerStats, SubscriberStats, SupervisorStats};
pub use actors::supervisor::{CompletionSupervisor, SupervisorMsg};
pub use actors::supervisor_config::{RestartIntensity, SupervisorConfig};
pub use backends::groups::AckConnection;
pub use completion_backend::CompletionBackend;
pub use config::{
    BackendConfig, BackendConnection, BackendRetry, BackendTimeouts, PostgresConnection, Retention, SqliteConnection,
    ValkeyConnection,
};
pub use cursor::StreamCursor;
pub use durable::{
    AckTicket, Backlog, DurableRequest, DurableSubscription, GroupAdmin, GroupMemberStats, GroupPartitionStats,
    GroupReport, GroupStats, MoveTo, Nacked, ParkedEvent, ParkedId, PartitionReport, Stalled,
};
pub use error::{EngineError, Error, ErrorSource};
pub use event::{CompletionEvent, CompletionOutcome, CompletionPayload, CompletionStream};
pub use instance_tags::InstanceTagEvent;
pub use lease_history::{LeaseHistoryEvent, LeaseHistoryFilter};
pub use scanner_filter::ScannerFilter;
pub use signal_delivery::{SignalDeliveryEffect, SignalDeliveryEvent, SignalDeliveryFilter};
pub use trace_context::TraceParent;
pub use types::{
    ExecutionId, FlowId, LeaseId, Namespace, PARTITION_COUNT, SignalId, TimestampMs, WaitpointId, WorkerInstanceId,
};

/// Postgres: what a host's producers and operators need beside the tree. Producers insert into
/// the outbox `ff_completion_event` (and lease and signal events into
/// `ff_completion_family_event`) in their own transaction and may wake the listeners after the
/// commit ([`postgres::CommitWake`]); [`postgres::MIGRATOR`] installs the schema (the tree
/// does on connect).
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use crate::backends::postgres::{
        COMPLETION_CHANNEL, CommitWake, LISTENER_APPLICATION_NAME, MIGRATION_LEDGER, MIGRATOR, MIN_WAKE_INTERVAL,
        connect_pool,
    };
}

/// SQLite: the database as a process shares it between its trees and its own producers
/// ([`sqlite::Database`]: one pool, this process's writer queue, the wake-up after a commit).
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use crate::backends::sqlite::{Database, MIGRATION_LEDGER, WriteTransaction};
}

/// Valkey: what a host's producers (Lua functions of their own) and operators need: the
/// streams, channels and names the tree reads, clients with the tree's settings, and the
/// subsystem's function library.
#[cfg(feature = "valkey")]
pub mod valkey {
    pub use crate::backends::valkey::{
        DEFAULT_STREAM_MAXLEN, FAMILY_CHANNEL, LEGACY_STREAM_KEY, LIBRARY_VERSION, LISTENER_CLIENT_NAME,
        PUBSUB_CHANNEL, connect_client, group_keys, load_library, stream_key,
    };
}

/// Not public API: the durable-group store of a backend, driven directly by the crate's own
/// contract tests (in the lab), which check each backend's store against the rules of the
/// group store seam with tokens and positions no member would send. Hidden from the docs; no
/// semver promise.
#[doc(hidden)]
pub mod __store;

// Every Rust block of the README and of the guide's pages is compiled as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}

#[cfg(doctest)]
mod guide {
    #[doc = include_str!("../docs/backends.md")]
    mod backends {}
    #[doc = include_str!("../docs/benchmarks.md")]
    mod benchmarks {}
    #[doc = include_str!("../docs/deploying.md")]
    mod deploying {}
    #[doc = include_str!("../docs/durable-groups.md")]
    mod durable_groups {}
    #[doc = include_str!("../docs/guarantees.md")]
    mod guarantees {}
    #[doc = include_str!("../docs/operating.md")]
    mod operating {}
    #[doc = include_str!("../docs/watching-a-run.md")]
    mod watching_a_run {}
}

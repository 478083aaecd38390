//! # ff-completions
//!
//! Exactly-once, in-order, resumable completion streams for durable execution engines.
//! When an execution reaches a terminal state (success, failed, cancelled, expired, skipped),
//! its producer (a SQL function, a Lua function) writes the completion atomically with the
//! state change; this crate turns those durable records into live, filtered streams, one per
//! subscriber, each event with a cursor to persist and resume from.
//!
//! Two more event families come through the same tree, with the same guarantees: lease
//! history ([`LeaseHistoryEvent`], [`CompletionSupervisorHandle::subscribe_lease_history`])
//! and signal delivery ([`SignalDeliveryEvent`],
//! [`CompletionSupervisorHandle::subscribe_signal_delivery`]); one listener per backend reads
//! them all, and each subscriber's filter selects its family. Their cursors carry a family tag
//! (a cursor of one family is refused by another); completion cursors are unchanged.
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
//! Backends (cargo features): `postgres`, `valkey`, `sqlite` (all on by default). Other
//! features, off by default: `serde` (`Serialize`/`Deserialize` for events, cursors and ids),
//! `demo-engine` (a small execution engine on each backend whose producers write completions,
//! used by the examples and below) and `testing` (hooks for fault injection and the wire
//! names, used by the crate's own tests and benches).
//!
//! A producer completes an execution; a subscriber learns it, with its cursor (this runs as is,
//! on an in-memory SQLite database, with the `demo-engine` feature):
//!
//! ```
//! # #[cfg(not(all(feature = "demo-engine", feature = "sqlite")))] fn main() {}
//! # #[cfg(all(feature = "demo-engine", feature = "sqlite"))]
//! # #[tokio::main] async fn main() -> Result<(), ff_completions::Error> {
//! use futures::StreamExt;
//! use ff_completions::{
//!     BackendConfig, CompletionOutcome, CompletionSupervisorHandle, ExecutionSpec, FlowId, ScannerFilter,
//!     SubscribeRequest, SupervisorConfig, connect_engine,
//! };
//!
//! let backend = BackendConfig::sqlite_in_memory(); // or BackendConfig::from_url("postgres://…")?
//! let engine = connect_engine(&backend).await?;
//! let (tree, _join) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend)).await?;
//! let filter = ScannerFilter::new().with_instance_tag("tenant", "a");
//! let mut events = tree.subscribe(SubscribeRequest::tail().with_filter(filter)).await?;
//!
//! let flow = FlowId::new();
//! engine.create_flow(&flow, None).await?;
//! let spec = ExecutionSpec::new(&flow).with_tag("tenant", "a");
//! engine.create_execution(&spec).await?;
//! engine.claim("worker-1", 1).await?;
//! engine.complete(&spec.id).await?;
//!
//! let event = events.next().await.expect("the tree is running")?;
//! assert_eq!((event.execution_id, event.outcome), (spec.id, CompletionOutcome::Success));
//! // Persist `event.cursor`; `SubscribeRequest::from_cursor(cursor)` resumes right after it.
//! tree.shutdown().await;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod actors;
mod backends;
mod backoff;
mod completion_backend;
mod config;
pub mod cursor;
mod durable;
#[cfg(feature = "demo-engine")]
mod engine;
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
#[cfg(feature = "testing")]
pub mod testing;
mod types;

pub use actors::handle::{CompletionSubscription, CompletionSupervisorHandle, Subscribe, Subscription};
pub use actors::ids::{BackendId, SubscriberId};
pub use actors::request::{Completions, Event, InstanceTags, LeaseHistory, SignalDelivery, SubscribeRequest};
pub use actors::shared::FilterMode;
pub use actors::stats::{ListenerState, ListenerStats, SubscriberStats, SupervisorStats};
pub use actors::supervisor::{CompletionSupervisor, SupervisorMsg};
pub use actors::supervisor_config::{RestartIntensity, SupervisorConfig};
pub use backends::groups::AckConnection;
#[cfg(feature = "postgres")]
pub use backends::postgres::CommitWake;
#[cfg(all(feature = "demo-engine", feature = "postgres"))]
pub use backends::postgres::PostgresEngine;
#[cfg(all(feature = "demo-engine", feature = "sqlite"))]
pub use backends::sqlite::SqliteEngine;
#[cfg(all(feature = "demo-engine", feature = "valkey"))]
pub use backends::valkey::ValkeyEngine;
pub use completion_backend::CompletionBackend;
pub use config::{
    BackendConfig, BackendConnection, BackendRetry, BackendTimeouts, PostgresConnection, Retention, SqliteConnection,
    ValkeyConnection,
};
pub use cursor::StreamCursor;
pub use durable::{
    ACK_FLUSH_INTERVAL, AckTicket, DEFAULT_LEASE_TTL, DurableRequest, DurableSubscription, GroupMemberStats,
    GroupPartitionStats, GroupStats, MIN_LEASE_TTL,
};
#[cfg(feature = "demo-engine")]
pub use engine::{
    CancelFlowPolicy, DependencyResolution, Engine, ExecutionInfo, ExecutionSpec, FailOutcome, LEASE_DURATION,
    ResolvedEdge, connect_engine,
};
pub use error::{EngineError, Error, ErrorSource};
pub use event::{CompletionEvent, CompletionOutcome, CompletionPayload, CompletionStream};
pub use instance_tags::InstanceTagEvent;
pub use lease_history::{LeaseHistoryEvent, LeaseHistoryFilter};
pub use scanner_filter::ScannerFilter;
pub use signal_delivery::{SignalDeliveryEffect, SignalDeliveryEvent, SignalDeliveryFilter};
pub use types::{
    ExecutionId, FlowId, LeaseId, Namespace, PARTITION_COUNT, SignalId, TimestampMs, WaitpointId, WorkerInstanceId,
};

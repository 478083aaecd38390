//! # ff-completions-lab
//!
//! The lab of [`ff_completions`]: everything the crate's examples, tests and benches share, and
//! nothing the library needs. Not published.
//!
//! - [`engine`]: the demo execution engine on each backend ([`Engine`], [`connect_engine`]),
//!   with its own schema (`migrations/`) and Lua library (`lua/ff_demo.lua`), and its
//!   [`Error`].
//! - [`harness`]: throwaway servers (Postgres clusters, `valkey-server` processes, a Valkey
//!   Cluster) started on free loopback ports, and the checks every test makes of a stream.
//! - [`faults`]: faults injected from outside the tree (killed connections, killed actors).
//! - [`dag`]: the DAG promotion scenario of the `dag_promotion` example and its tests.
//! - [`instances`]: one durable promoter group across OS processes (the `instances` example
//!   and the `groups` test).
//! - [`chaos`]: the chaos runner (the `chaos` test).
//! - [`live_view`]: a subscription as Server-Sent Events and the page that draws a DAG run from
//!   it (the `live_view` example and its browser test), and headless Chromium to drive it.

pub mod chaos;
pub mod dag;
pub mod engine;
mod error;
pub mod faults;
pub mod harness;
pub mod instances;
pub mod live_view;

pub use dag::report::micros_histogram;
pub use engine::{
    CancelFlowPolicy, DependencyResolution, Engine, ExecutionInfo, ExecutionSpec, FailOutcome, LEASE_DURATION,
    PostgresEngine, ResolvedEdge, SqliteEngine, ValkeyEngine, connect_engine,
};
pub use error::Error;

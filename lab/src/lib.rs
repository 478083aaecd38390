//! # ff-completions-lab
//!
//! The lab of [`ff_completions`]: everything the crate's examples, tests and benches share, and
//! nothing the library needs. Not published.
//!
//! - [`harness`]: throwaway servers (Postgres clusters, `valkey-server` processes, a Valkey
//!   Cluster) started on free loopback ports, and the checks every test makes of a stream.
//! - [`faults`]: faults injected from outside the tree (killed connections, killed actors).
//! - [`dag`]: the DAG promotion scenario of the `dag_promotion` example and its tests.
//! - [`instances`]: one durable promoter group across OS processes (the `instances` example
//!   and the `groups` test).
//! - [`chaos`]: the chaos runner (the `chaos` test).

pub mod chaos;
pub mod dag;
pub mod faults;
pub mod harness;
pub mod instances;

//! Integration tests against real servers the harness starts itself.

use ff_completions_lab::harness as support;

#[allow(dead_code)]
mod contract;

#[allow(dead_code)]
mod families;

#[allow(dead_code)]
mod groups;

#[allow(dead_code)]
mod durable;

#[cfg(all(feature = "postgres", feature = "valkey"))]
mod deploying;
#[allow(dead_code)]
mod tail_await;

#[cfg(feature = "postgres")]
mod postgres;

#[cfg(feature = "postgres")]
mod postgres_host;

#[cfg(feature = "postgres")]
mod postgres_snapshots;

#[cfg(feature = "postgres")]
mod tree;

#[cfg(feature = "postgres")]
mod metrics;

#[cfg(feature = "sqlite")]
mod sqlite;

mod dag;

#[cfg(feature = "sqlite")]
mod live_view;

#[cfg(feature = "valkey")]
mod valkey;

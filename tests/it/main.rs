//! Integration tests against real servers the harness starts itself.

mod support;

#[cfg(feature = "postgres")]
mod postgres;

#[cfg(feature = "postgres")]
mod tree;

#[cfg(feature = "postgres")]
mod metrics;

//! The backends behind one narrow seam. A listener or filter only knows [`CompletionSource`]
//! (read a batch after a position, find the tail, open a waker) and [`Waker`] (wait for the
//! next reason to read); a durable member only knows [`groups::GroupStore`]. None of them
//! names a database: only `open` matches on the backend kind.
//!
//! - `seam`: the traits and what crosses them; `groups`: the group store's seam and rules.
//! - `open` connects the configured backend; `lazy` connects it on first use.
//! - `outbox`: row decoding shared by the SQL backends; `postgres`, `sqlite`, `valkey`.

pub(crate) mod groups;
pub(crate) mod lazy;
#[cfg(test)]
pub(crate) mod memory;
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "valkey"))]
mod outbox;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "valkey")]
pub mod valkey;

mod open;
pub(crate) mod seam;

pub(crate) use lazy::Connected;
pub(crate) use open::{lazy_source, open_source};
pub(crate) use seam::{Batch, CompletionSource, FamilyEvent, Positioned, ReadPosition, StartAt, Wake, Waker};

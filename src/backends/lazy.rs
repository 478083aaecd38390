//! A backend that connects on first use: the tree starts while its backend is down, and every
//! caller (listener, filters, maintenance jobs) shares the one connection once it is made.
//!
//! A failed connection attempt is not remembered: the next call tries again. Calls made while
//! an attempt is under way wait for it rather than starting their own.

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::OnceCell;

use super::{Batch, CompletionSource, StartAt, Waker};
use crate::config::Retention;
use crate::cursor::{Family, Frontier, StreamCursor};
use crate::durable::store::{Ack, GroupView, Heartbeat, Lease};
use crate::error::EngineError;

/// Makes the connected backend.
pub(crate) type Connector =
    Box<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn CompletionSource>, EngineError>> + Send + Sync>;

/// A [`CompletionSource`] that connects on first use and after every failed attempt.
pub(crate) struct LazySource {
    kind: &'static str,
    connector: Connector,
    connected: OnceCell<Arc<dyn CompletionSource>>,
}

impl LazySource {
    pub(crate) fn new(kind: &'static str, connector: Connector) -> Self {
        Self { kind, connector, connected: OnceCell::new() }
    }

    /// The backend, connecting now unless connected.
    ///
    /// # Errors
    /// Whatever connecting fails with, typed as the backend reports it.
    pub(crate) async fn connect(&self) -> Result<&Arc<dyn CompletionSource>, EngineError> {
        self.connected.get_or_try_init(|| (self.connector)()).await
    }
}

#[async_trait]
impl CompletionSource for LazySource {
    fn kind(&self) -> &'static str {
        self.kind
    }

    /// Positions come from a connected backend only: before the first connection there are
    /// none to encode, and the empty (tail) cursor stands for "nothing read yet".
    fn cursor_of(&self, at: &Frontier) -> StreamCursor {
        self.connected.get().map_or_else(StreamCursor::empty, |s| s.cursor_of(at))
    }

    /// Known from a connected backend only (completions always).
    fn produces(&self, family: Family) -> bool {
        family == Family::Completion || self.connected.get().is_some_and(|s| s.produces(family))
    }

    /// Known from a connected backend only.
    fn lanes_are_partitions(&self) -> bool {
        self.connected.get().is_some_and(|s| s.lanes_are_partitions())
    }

    async fn resolve_start(&self, cursor: &StreamCursor) -> Result<StartAt, EngineError> {
        self.connect().await?.resolve_start(cursor).await
    }

    async fn group_heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Vec<Lease>, EngineError> {
        self.connect().await?.group_heartbeat(beat).await
    }

    async fn group_ack(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), EngineError> {
        self.connect().await?.group_ack(group, member, acks).await
    }

    async fn group_leave(&self, group: &str, member: &str) -> Result<(), EngineError> {
        self.connect().await?.group_leave(group, member).await
    }

    async fn group_view(&self, group: &str) -> Result<Option<GroupView>, EngineError> {
        self.connect().await?.group_view(group).await
    }

    async fn tail(&self) -> Result<Frontier, EngineError> {
        self.connect().await?.tail().await
    }

    async fn read_after(&self, after: &Frontier, limit: usize) -> Result<Batch, EngineError> {
        self.connect().await?.read_after(after, limit).await
    }

    async fn trim(&self, retention: &Retention) -> Result<u64, EngineError> {
        self.connect().await?.trim(retention).await
    }

    async fn gauges(&self) -> Result<Vec<(&'static str, f64)>, EngineError> {
        self.connect().await?.gauges().await
    }

    async fn open_waker(&self, from: &Frontier) -> Result<Box<dyn Waker>, EngineError> {
        self.connect().await?.open_waker(from).await
    }
}

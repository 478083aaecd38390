//! A backend that connects on first use: the tree starts while its backend is down, and every
//! caller (listener, filters, maintenance jobs, durable members) shares the one connection once
//! it is made.
//!
//! A failed connection attempt is not remembered: the next call tries again. Calls made while
//! an attempt is under way wait for it rather than starting their own.

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::OnceCell;

use super::groups::{Ack, GroupStore, GroupView, Heartbeat, Lease, Nack, Nacked, Parked, ParkedMark};
use super::seam::{Batch, CompletionSource, ReadPosition, StartAt, Waker};
use crate::config::Retention;
use crate::cursor::{Frontier, Position, StreamCursor};
use crate::error::Error;
use crate::family::Family;

/// A connected backend: its source, and its group store when it has one.
#[derive(Clone)]
pub(crate) struct Connected {
    pub source: Arc<dyn CompletionSource>,
    pub groups: Option<Arc<dyn GroupStore>>,
}

/// Makes the connected backend.
pub(crate) type Connector = Box<dyn Fn() -> BoxFuture<'static, Result<Connected, Error>> + Send + Sync>;

/// A [`CompletionSource`] and [`GroupStore`] that connects on first use and after every failed
/// attempt.
pub(crate) struct LazySource {
    kind: &'static str,
    connector: Connector,
    connected: OnceCell<Connected>,
}

impl LazySource {
    pub(crate) fn new(kind: &'static str, connector: Connector) -> Self {
        Self { kind, connector, connected: OnceCell::new() }
    }

    /// The backend, connecting now unless connected.
    ///
    /// # Errors
    /// Whatever connecting fails with, typed as the backend reports it.
    pub(crate) async fn connect(&self) -> Result<&Connected, Error> {
        self.connected.get_or_try_init(|| (self.connector)()).await
    }

    async fn source(&self) -> Result<&Arc<dyn CompletionSource>, Error> {
        Ok(&self.connect().await?.source)
    }

    async fn groups(&self) -> Result<&Arc<dyn GroupStore>, Error> {
        self.connect().await?.groups.as_ref().ok_or_else(|| {
            Error::unavailable("durable group", format!("durable subscriptions are not available on {}", self.kind))
        })
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
        self.connected.get().map_or_else(StreamCursor::empty, |c| c.source.cursor_of(at))
    }

    /// Known from a connected backend only (completions always).
    fn produces(&self, family: Family) -> bool {
        family == Family::Completion || self.connected.get().is_some_and(|c| c.source.produces(family))
    }

    /// Known from a connected backend only.
    fn lanes_are_partitions(&self) -> bool {
        self.connected.get().is_some_and(|c| c.source.lanes_are_partitions())
    }

    async fn resolve_start(&self, cursor: &StreamCursor) -> Result<StartAt, Error> {
        self.source().await?.resolve_start(cursor).await
    }

    async fn tail(&self) -> Result<Frontier, Error> {
        self.source().await?.tail().await
    }

    async fn read_after(&self, after: &Frontier, limit: usize) -> Result<Batch, Error> {
        self.source().await?.read_after(after, limit).await
    }

    async fn trim(&self, retention: &Retention) -> Result<u64, Error> {
        self.source().await?.trim(retention).await
    }

    async fn gauges(&self) -> Result<Vec<(&'static str, f64)>, Error> {
        self.source().await?.gauges().await
    }

    async fn open_waker(&self, read: ReadPosition) -> Result<Box<dyn Waker>, Error> {
        self.source().await?.open_waker(read).await
    }
}

#[async_trait]
impl GroupStore for LazySource {
    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Vec<Lease>, Error> {
        self.groups().await?.heartbeat(beat).await
    }

    async fn ack(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        self.groups().await?.ack(group, member, acks).await
    }

    async fn leave(&self, group: &str, member: &str, incarnation: &str) -> Result<(), Error> {
        self.groups().await?.leave(group, member, incarnation).await
    }

    async fn view(&self, group: &str) -> Result<Option<GroupView>, Error> {
        self.groups().await?.view(group).await
    }

    async fn nack(&self, group: &str, member: &str, nack: &Nack<'_>) -> Result<Nacked, Error> {
        self.groups().await?.nack(group, member, nack).await
    }

    async fn settle(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        self.groups().await?.settle(group, member, acks).await
    }

    async fn move_positions(&self, group: &str, moves: &[(u16, Position)], force: bool) -> Result<(), Error> {
        self.groups().await?.move_positions(group, moves, force).await
    }

    async fn parked(&self, group: &str) -> Result<Vec<Parked>, Error> {
        self.groups().await?.parked(group).await
    }

    async fn mark_parked(
        &self,
        group: &str,
        which: Option<&[(u16, Position)]>,
        mark: ParkedMark,
    ) -> Result<u64, Error> {
        self.groups().await?.mark_parked(group, which, mark).await
    }
}

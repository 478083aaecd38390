//! The durable-group store of a backend, driven directly (see the module's entry in the crate
//! root). Every operation goes through the backend's group store, as a durable member's does.

use std::time::Duration;

pub use crate::backends::groups::{Ack, GroupView, Lease, PartitionView, Sharing};
pub use crate::cursor::Position;

use crate::backends::groups::{AckConnection, GroupStore, Heartbeat};
use crate::backends::{Connected, open_source};
use crate::config::BackendConfig;
use crate::error::Error;

/// A backend's group store.
pub struct Store {
    backend: Connected,
}

impl Store {
    /// Connects to `config`'s backend (installing its schema or library).
    ///
    /// # Errors
    /// As the tree's connect.
    pub async fn open(config: &BackendConfig) -> Result<Self, Error> {
        Ok(Self { backend: open_source(config).await? })
    }

    fn groups(&self) -> Result<&dyn GroupStore, Error> {
        self.backend.groups.as_deref().ok_or_else(|| Error::validation("this backend keeps no groups"))
    }

    /// The backend's tail, where a new group starts: one position per lane it names (Postgres
    /// and SQLite name lane 0 only; on Valkey a lane is a partition's stream).
    ///
    /// # Errors
    /// As the backend's tail.
    pub async fn tail(&self) -> Result<Vec<Position>, Error> {
        Ok(self.backend.source.tail().await?.positions().to_vec())
    }

    /// One heartbeat of `member` (a new group starts at the backend's tail).
    ///
    /// # Errors
    /// As the store's heartbeat.
    pub async fn heartbeat(
        &self,
        group: &str,
        member: &str,
        ttl: Duration,
        sharing: Sharing,
        rejoin: bool,
    ) -> Result<Vec<Lease>, Error> {
        let start = self.backend.source.tail().await?;
        self.groups()?.heartbeat(&Heartbeat { group, member, ttl, sharing, rejoin, start: &start }).await
    }

    /// Applies acks as one step.
    ///
    /// # Errors
    /// As the store's ack.
    pub async fn ack(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        self.groups()?.ack(group, member, acks).await
    }

    /// Removes a member.
    ///
    /// # Errors
    /// As the store's leave.
    pub async fn leave(&self, group: &str, member: &str) -> Result<(), Error> {
        self.groups()?.leave(group, member).await
    }

    /// The stored group.
    ///
    /// # Errors
    /// As the store's view.
    pub async fn view(&self, group: &str) -> Result<Option<GroupView>, Error> {
        self.groups()?.view(group).await
    }
}

/// Applies acks inside the caller's transaction on `conn`, as an [`crate::AckTicket`] does:
/// all, or none and [`Error::Fenced`] or [`Error::AlreadyAcknowledged`] (roll it back).
///
/// # Errors
/// As the store's ack in a transaction.
pub async fn ack_in<C: AckConnection + ?Sized>(
    conn: &mut C,
    group: &str,
    member: &str,
    acks: &[Ack],
) -> Result<(), Error> {
    conn.ack_in(group, member, acks, true).await
}

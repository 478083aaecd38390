//! The durable-group store of a backend, driven directly (see the module's entry in the crate
//! root). Every operation goes through the backend's group store, as a durable member's does.

use std::time::Duration;

pub use crate::backends::groups::{Ack, GroupView, Lease, Nacked, Parked, ParkedMark, PartitionView, Sharing};
pub use crate::cursor::Position;

use crate::backends::groups::{AckConnection, GroupStore, Heartbeat, Nack};
use crate::backends::{Connected, open_source};
use crate::config::{BackendConfig, Retention};
use crate::error::Error;

/// A backend's group store, driven as one process: its heartbeats and leaves are those of one
/// incarnation of each member id (another `Store` is another process).
pub struct Store {
    backend: Connected,
    incarnation: String,
}

impl Store {
    /// Connects to `config`'s backend (installing its schema or library).
    ///
    /// # Errors
    /// As the tree's connect.
    pub async fn open(config: &BackendConfig) -> Result<Self, Error> {
        Ok(Self { backend: open_source(config).await?, incarnation: uuid::Uuid::new_v4().simple().to_string() })
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

    /// Removes history as `retention` says, as the tree's trim job does; returns what it removed.
    ///
    /// # Errors
    /// As the backend's trim.
    pub async fn trim(&self, retention: &Retention) -> Result<u64, Error> {
        self.backend.source.trim(retention).await
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
        self.heartbeat_with(group, member, ttl, sharing, rejoin, &[]).await
    }

    /// One heartbeat that also records `unacked` events per partition.
    ///
    /// # Errors
    /// As the store's heartbeat.
    pub async fn heartbeat_with(
        &self,
        group: &str,
        member: &str,
        ttl: Duration,
        sharing: Sharing,
        rejoin: bool,
        unacked: &[(u16, u32)],
    ) -> Result<Vec<Lease>, Error> {
        let start = self.backend.source.tail().await?;
        let incarnation = &self.incarnation;
        let beat = Heartbeat { group, member, incarnation, ttl, sharing, rejoin, start: &start, unacked };
        self.groups()?.heartbeat(&beat).await
    }

    /// Refuses the event at `position` of `partition` (an event of `event`'s fields), parking
    /// it after `park_after` refusals.
    ///
    /// # Errors
    /// As the store's nack.
    #[allow(clippy::too_many_arguments)]
    pub async fn nack(
        &self,
        group: &str,
        member: &str,
        ack: Ack,
        reason: &str,
        park_after: u32,
        event: &crate::CompletionEvent,
        replayed: bool,
    ) -> Result<Nacked, Error> {
        let event = crate::backends::groups::stored_event(event);
        let nack = Nack {
            partition: ack.partition,
            token: ack.token,
            position: ack.position,
            reason,
            park_after,
            event: &event,
            replayed,
        };
        self.groups()?.nack(group, member, &nack).await
    }

    /// Acknowledges replayed parked events.
    ///
    /// # Errors
    /// As the store's settle.
    pub async fn settle(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        self.groups()?.settle(group, member, acks).await
    }

    /// Sets positions (an operator's move).
    ///
    /// # Errors
    /// As the store's move.
    pub async fn move_positions(&self, group: &str, moves: &[(u16, Position)], force: bool) -> Result<(), Error> {
        self.groups()?.move_positions(group, moves, force).await
    }

    /// The group's parked events.
    ///
    /// # Errors
    /// As the store's.
    pub async fn parked(&self, group: &str) -> Result<Vec<Parked>, Error> {
        self.groups()?.parked(group).await
    }

    /// Marks parked events for replay, or removes them.
    ///
    /// # Errors
    /// As the store's.
    pub async fn mark_parked(
        &self,
        group: &str,
        which: Option<&[(u16, Position)]>,
        mark: ParkedMark,
    ) -> Result<u64, Error> {
        self.groups()?.mark_parked(group, which, mark).await
    }

    /// Applies acks as one step.
    ///
    /// # Errors
    /// As the store's ack.
    pub async fn ack(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        self.groups()?.ack(group, member, acks).await
    }

    /// Removes this process's incarnation of a member.
    ///
    /// # Errors
    /// As the store's leave.
    pub async fn leave(&self, group: &str, member: &str) -> Result<(), Error> {
        self.groups()?.leave(group, member, &self.incarnation).await
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

/// Acknowledges replayed parked events inside the caller's transaction on `conn`, as an
/// [`crate::AckTicket`] of a replayed event does.
///
/// # Errors
/// As the store's settle in a transaction.
pub async fn settle_in<C: AckConnection + ?Sized>(
    conn: &mut C,
    group: &str,
    member: &str,
    acks: &[Ack],
) -> Result<(), Error> {
    conn.settle_in(group, member, acks, true).await
}

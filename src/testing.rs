//! Hooks for the crate's own tests, benches and examples (feature `testing`, off by default):
//! fault injection (the cells of the tree's children), the wire names and cursor encodings of
//! each backend, the embedded migrations and the raw client constructors. Nothing here is
//! needed to run the tree; none of it is covered by semver.

pub use crate::backends::groups::{Ack, GroupView, Lease, PartitionView, Sharing};
pub use crate::backoff::Backoff;
pub use crate::cursor::Position;
pub use crate::cursor::{
    LEASE_HISTORY_CURSOR_TAG, POSTGRES_CURSOR_PREFIX, PostgresCursor, SIGNAL_DELIVERY_CURSOR_TAG, SQLITE_CURSOR_PREFIX,
    VALKEY_CURSOR_PREFIX, VALKEY_LEGACY_LANE, decode_postgres_cursor, decode_sqlite_cursor, decode_valkey_cursor,
    decode_valkey_frontier, encode_postgres_batch_cursor, encode_postgres_cursor, encode_postgres_event_cursor,
    encode_sqlite_cursor, encode_valkey_cursor, encode_valkey_frontier,
};

/// A backend's durable-group store, driven directly: the operations the member task uses,
/// for contract tests of each backend.
pub struct GroupStore {
    backend: crate::backends::Connected,
}

impl GroupStore {
    fn groups(&self) -> Result<&dyn crate::backends::groups::GroupStore, crate::Error> {
        self.backend.groups.as_deref().ok_or_else(|| crate::Error::validation("no group store"))
    }

    /// Connects to `config`'s backend (installing its schema or library).
    ///
    /// # Errors
    /// As connecting the tree's listener.
    pub async fn open(config: &crate::BackendConfig) -> Result<Self, crate::Error> {
        Ok(Self { backend: crate::backends::open_source(config).await? })
    }

    /// The backend's tail, where a new group starts: one position per lane it names (Postgres
    /// and SQLite name lane 0 only; on Valkey a lane is a partition's stream).
    ///
    /// # Errors
    /// As the backend's `tail`.
    pub async fn tail(&self) -> Result<Vec<Position>, crate::Error> {
        Ok(self.backend.source.tail().await?.positions().to_vec())
    }

    /// One heartbeat of `member` (a new group starts at the backend's tail).
    ///
    /// # Errors
    /// As the backend's `group_heartbeat`.
    pub async fn heartbeat(
        &self,
        group: &str,
        member: &str,
        ttl: std::time::Duration,
        sharing: Sharing,
        rejoin: bool,
    ) -> Result<Vec<Lease>, crate::Error> {
        let start = self.backend.source.tail().await?;
        let beat = crate::backends::groups::Heartbeat { group, member, ttl, sharing, rejoin, start: &start };
        self.groups()?.heartbeat(&beat).await
    }

    /// Applies acks as one step.
    ///
    /// # Errors
    /// As the backend's `group_ack`.
    pub async fn ack(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), crate::Error> {
        self.groups()?.ack(group, member, acks).await
    }

    /// Removes a member.
    ///
    /// # Errors
    /// As the backend's `group_leave`.
    pub async fn leave(&self, group: &str, member: &str) -> Result<(), crate::Error> {
        self.groups()?.leave(group, member).await
    }

    /// The stored group.
    ///
    /// # Errors
    /// As the backend's `group_view`.
    pub async fn view(&self, group: &str) -> Result<Option<GroupView>, crate::Error> {
        self.groups()?.view(group).await
    }
}

/// Postgres: the channel, the migrations and their ledgers, the listener's application name.
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use crate::backends::postgres::{
        COMPLETION_CHANNEL, DEMO_MIGRATION_LEDGER, DEMO_MIGRATOR, LISTENER_APPLICATION_NAME, MIGRATION_LEDGER,
        MIGRATOR, MIN_WAKE_INTERVAL,
    };

    /// Applies durable-group acks inside the caller's transaction on `conn`, as an
    /// [`crate::AckTicket`] does: all, or none and [`crate::Error::Fenced`] or
    /// [`crate::Error::AlreadyAcknowledged`] with the transaction aborted.
    ///
    /// # Errors
    /// As the backend's group ack.
    pub async fn ack_in(
        conn: &mut sqlx::PgConnection,
        group: &str,
        member: &str,
        acks: &[super::Ack],
    ) -> Result<(), crate::Error> {
        crate::backends::postgres::groups::ack_in(conn, group, member, acks, true).await
    }
}

/// SQLite: the embedded migrations.
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use crate::backends::sqlite::MIGRATOR;

    /// Applies durable-group acks inside the caller's write transaction on `conn`, as an
    /// [`crate::AckTicket`] does: all, or none and [`crate::Error::Fenced`] or
    /// [`crate::Error::AlreadyAcknowledged`] (the caller rolls back).
    ///
    /// # Errors
    /// As the backend's group ack.
    pub async fn ack_in(
        conn: &mut sqlx::SqliteConnection,
        group: &str,
        member: &str,
        acks: &[super::Ack],
    ) -> Result<(), crate::Error> {
        crate::backends::sqlite::groups::ack_in(conn, group, member, acks, true).await
    }
}

/// Valkey: the streams, the channel, the function library and a raw client.
#[cfg(feature = "valkey")]
pub mod valkey {
    pub use crate::backends::valkey::{
        DEFAULT_STREAM_MAXLEN, FAMILY_CHANNEL, LEGACY_STREAM_KEY, LIBRARY, LIBRARY_VERSION, LISTENER_CLIENT_NAME,
        PUBSUB_CHANNEL, connect_client, group_keys, stream_key,
    };
}

//! An SQLite database as one process shares it between the tree and the host's own producers:
//! one pool (one connection for an in-memory database), the in-process wake-up the listeners
//! wait on, and the queue of this process's writers.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::sqlite::SqlitePool;
use sqlx::{Sqlite, SqliteConnection, Transaction};
use tokio::sync::{OwnedMutexGuard, watch};

use super::{WriteQueue, commit_signal, connect_pool, database_key, write_queue};
use crate::config::BackendConfig;
use crate::error::Error;

/// An SQLite database with the subsystem's schema, shared with this process's trees: write
/// your completions into `ff_completion_event` (and lease or signal events with their
/// `family`) in your own transactions, through [`Database::begin_write`], and the tree's
/// listeners of this database wake as soon as the transaction commits. Writers in other
/// processes are seen too (the listener polls `PRAGMA data_version`), a little later.
///
/// ```no_run
/// # async fn demo() -> Result<(), ff_completions::Error> {
/// use ff_completions::BackendConfig;
/// use ff_completions::sqlite::Database;
///
/// let db = Database::open(&BackendConfig::sqlite("engine.db")).await?;
/// let mut tx = db.begin_write(false).await?;
/// sqlx::query("INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) VALUES (?, 'success', 0, 7)")
///     .bind("6f9619ff-8b86-4011-b42d-00c04fc964ff")
///     .execute(&mut *tx)
///     .await
///     .map_err(|e| ff_completions::Error::from_sqlx("insert a completion", e))?;
/// tx.commit().await?; // the listeners of this process wake now
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Database {
    pool: SqlitePool,
    signal: watch::Sender<u64>,
    writers: Arc<WriteQueue>,
}

impl Database {
    /// Opens the database (creating a file that does not exist), installs or upgrades the
    /// subsystem's schema (ledger `ff_completions_migrations`), and joins this process's
    /// wake-up and writer queue of it.
    ///
    /// # Errors
    /// [`Error::Validation`] for a config of another backend or a path in a directory that
    /// does not exist; [`Error::Unavailable`] for a file SQLite cannot open; migration errors.
    pub async fn open(config: &BackendConfig) -> Result<Self, Error> {
        let key = database_key(config)?;
        Ok(Self { pool: connect_pool(config, 4).await?, signal: commit_signal(&key), writers: write_queue(&key) })
    }

    /// The pool, for reads and for writes that need no wake-up.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Begins a write transaction (`BEGIN IMMEDIATE`) once this process's earlier writers are
    /// done: they queue here, in order, rather than in SQLite's busy handler. An `urgent` writer
    /// (one on a flow's critical path) passes the ordinary writers queued before it.
    ///
    /// # Errors
    /// The database's, as [`Error::from_sqlx`] maps them.
    pub async fn begin_write(&self, urgent: bool) -> Result<WriteTransaction, Error> {
        let turn = self.writers.turn(urgent).await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(|e| Error::from_sqlx("sqlite begin", e))?;
        Ok(WriteTransaction { tx, _turn: turn, signal: self.signal.clone() })
    }

    /// Wakes this process's listeners of the database: after a commit made without
    /// [`WriteTransaction::commit`].
    pub fn wake(&self) {
        self.signal.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// A write transaction holding this process's turn to write; it derefs to the connection.
/// Dropped without [`Self::commit`], it rolls back.
#[derive(Debug)]
pub struct WriteTransaction {
    tx: Transaction<'static, Sqlite>,
    _turn: OwnedMutexGuard<()>,
    signal: watch::Sender<u64>,
}

impl WriteTransaction {
    /// Commits, then wakes this process's listeners of the database.
    ///
    /// # Errors
    /// The database's, as [`Error::from_sqlx`] maps them.
    pub async fn commit(self) -> Result<(), Error> {
        self.tx.commit().await.map_err(|e| Error::from_sqlx("sqlite commit", e))?;
        self.signal.send_modify(|v| *v = v.wrapping_add(1));
        Ok(())
    }
}

impl Deref for WriteTransaction {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl DerefMut for WriteTransaction {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

//! Embedded SQLite backend: the same outbox as Postgres (`migrations/sqlite/`, with its own
//! ledger: see `migrate`). Producers write it in their own transactions; listeners wake on an
//! in-process signal raised after each commit made through a [`Database`], and on
//! `PRAGMA data_version` changes made by other processes. Durable groups are kept by [`groups`].

mod database;
pub(crate) mod groups;
mod migrate;
mod source;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{OwnedMutexGuard, watch};

pub use database::{Database, WriteTransaction};
pub use migrate::MIGRATION_LEDGER;
pub(crate) use source::SqliteSource;

use crate::config::{BackendConfig, BackendConnection, SqliteConnection};
use crate::error::Error;

/// A database's identity inside this process: its canonical path, or its memory name.
pub(crate) fn database_key(config: &BackendConfig) -> Result<String, Error> {
    match &config.connection {
        BackendConnection::Sqlite(SqliteConnection::File(path)) => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let dir = std::fs::canonicalize(parent)
                .map_err(|e| Error::validation(format!("sqlite directory {}: {e}", parent.display())))?;
            let name = path.file_name().ok_or_else(|| Error::validation("sqlite path names no file"))?;
            Ok(dir.join(name).display().to_string())
        }
        BackendConnection::Sqlite(SqliteConnection::Memory(name)) => Ok(format!("memory:{name}")),
        _ => Err(Error::validation("not a sqlite config")),
    }
}

/// One value per database, shared by every engine and source of this process.
fn per_database<T: Clone>(registry: &'static OnceLock<Mutex<HashMap<String, T>>>, key: &str, make: fn() -> T) -> T {
    let mut values = registry.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    values.entry(key.to_owned()).or_insert_with(make).clone()
}

/// The in-process commit signal of one database: a counter every producer bumps after commit.
pub(crate) fn commit_signal(key: &str) -> watch::Sender<u64> {
    static SIGNALS: OnceLock<Mutex<HashMap<String, watch::Sender<u64>>>> = OnceLock::new();
    per_database(&SIGNALS, key, || watch::channel(0).0)
}

/// The in-process write queue of one database (see [`WriteQueue`]).
pub(crate) fn write_queue(key: &str) -> Arc<WriteQueue> {
    static QUEUES: OnceLock<Mutex<HashMap<String, Arc<WriteQueue>>>> = OnceLock::new();
    per_database(&QUEUES, key, Default::default)
}

/// This process's writers of one database. SQLite has one writer at a time; writers of this
/// process queue for it here, in order, rather than in SQLite's busy handler, which sleeps in
/// growing steps (up to 100 ms) and lets a waiting writer starve behind the others. Writers on
/// a flow's critical path (dependency resolution, which makes children eligible) go first:
/// the others queued behind the current writer let them pass.
#[derive(Debug, Default)]
pub(crate) struct WriteQueue {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Critical-path writers waiting for the lock.
    urgent: AtomicUsize,
}

impl WriteQueue {
    /// Waits for this process's turn to write; `urgent` writers pass the others.
    pub(crate) async fn turn(&self, urgent: bool) -> OwnedMutexGuard<()> {
        if urgent {
            self.urgent.fetch_add(1, Ordering::SeqCst);
            let turn = self.lock.clone().lock_owned().await;
            self.urgent.fetch_sub(1, Ordering::SeqCst);
            return turn;
        }
        loop {
            let turn = self.lock.clone().lock_owned().await;
            if self.urgent.load(Ordering::SeqCst) == 0 {
                return turn;
            }
            // Hand the lock on (the queue is first come, first served) and queue again.
            drop(turn);
            tokio::task::yield_now().await;
        }
    }
}

fn options(config: &BackendConfig) -> Result<SqliteConnectOptions, Error> {
    let options = match &config.connection {
        BackendConnection::Sqlite(SqliteConnection::File(path)) => SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal),
        BackendConnection::Sqlite(SqliteConnection::Memory(name)) => {
            SqliteConnectOptions::from_str(&format!("sqlite:file:{name}?mode=memory&cache=shared"))
                .map_err(|e| Error::validation(format!("sqlite memory database {name:?}: {e}")))?
        }
        _ => return Err(Error::validation("not a sqlite config")),
    };
    Ok(options.busy_timeout(Duration::from_secs(10)).foreign_keys(true))
}

/// Why the database `key` could not be opened. A file SQLite cannot open (a directory, a path
/// under a plain file, no permission) is [`Error::Unavailable`] naming the file: retrying
/// will not help until an operator acts, and the path is what they need to know.
fn open_error(key: &str, err: sqlx::Error) -> Error {
    match err {
        sqlx::Error::Database(_) | sqlx::Error::Io(_) => {
            Error::unavailable("sqlite open", crate::error::redact(&format!("{key}: {err}"))).with_source(err)
        }
        other => Error::from_sqlx("sqlite open", other),
    }
}

/// A pool on the database with the schema migrated. An in-memory database gets one shared
/// single-connection pool per process, so its connections never fight over shared-cache locks
/// and the database lives as long as the process uses it.
pub(crate) async fn connect_pool(config: &BackendConfig, max: u32) -> Result<SqlitePool, Error> {
    static MEMORY_POOLS: OnceLock<tokio::sync::Mutex<HashMap<String, SqlitePool>>> = OnceLock::new();
    let key = database_key(config)?;
    let is_memory = key.starts_with("memory:");
    let mut memory_pools = MEMORY_POOLS.get_or_init(Default::default).lock().await;
    if let Some(pool) = memory_pools.get(&key).filter(|_| is_memory) {
        return Ok(pool.clone());
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(if is_memory { 1 } else { max })
        .min_connections(if is_memory { 1 } else { 0 })
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(config.timeouts.connect_or_default().max(Duration::from_secs(10)))
        .connect_with(options(config)?)
        .await
        .map_err(|e| open_error(&key, e))?;
    migrate::migrate(&pool).await?;
    if is_memory {
        memory_pools.insert(key, pool.clone());
    }
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Opens `config` as the tree and the engine do, failing the test if it takes more than a
    /// few seconds.
    async fn open(config: &BackendConfig) -> Result<SqlitePool, Error> {
        let started = Instant::now();
        let opened = tokio::time::timeout(Duration::from_secs(20), connect_pool(config, 2))
            .await
            .expect("opening a database must not hang");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        opened
    }

    #[tokio::test]
    async fn a_database_in_a_directory_that_does_not_exist_is_a_prompt_validation_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("no-such-dir");
        match open(&BackendConfig::sqlite(missing.join("completions.db"))).await {
            Err(Error::Validation { detail }) => assert!(detail.contains("no-such-dir"), "{detail}"),
            other => panic!("expected a validation error, got {:?}", other.map(|_| "a pool")),
        }
        assert!(!missing.exists(), "nothing was created");
    }

    #[tokio::test]
    async fn a_database_path_that_is_a_directory_is_a_prompt_unavailable_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("a-directory");
        std::fs::create_dir(&path).expect("create dir");
        match open(&BackendConfig::sqlite(&path)).await {
            Err(err @ Error::Unavailable { .. }) => {
                assert!(err.to_string().contains("sqlite open") && err.to_string().contains("a-directory"), "{err}")
            }
            other => panic!("expected an unavailable error, got {:?}", other.map(|_| "a pool")),
        }
    }

    #[tokio::test]
    async fn a_database_path_under_a_plain_file_is_a_prompt_unavailable_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"not a directory").expect("write file");
        match open(&BackendConfig::sqlite(file.join("completions.db"))).await {
            Err(Error::Unavailable { .. } | Error::Validation { .. }) => {}
            other => panic!("expected a typed open error, got {:?}", other.map(|_| "a pool")),
        }
        assert_eq!(std::fs::read(&file).ok().as_deref(), Some(&b"not a directory"[..]), "the file is untouched");
    }

    #[tokio::test]
    async fn the_source_and_a_database_handle_report_an_unopenable_database_as_a_typed_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = BackendConfig::sqlite(dir.path().to_path_buf());
        let started = Instant::now();
        assert!(matches!(SqliteSource::connect(&config).await, Err(Error::Unavailable { .. })));
        assert!(matches!(Database::open(&config).await, Err(Error::Unavailable { .. })));
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    /// Lets every other task of this (single-threaded) runtime run until it waits.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_urgent_writer_passes_the_ordinary_writers_queued_before_it() {
        let queue = Arc::new(WriteQueue::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let current = queue.turn(false).await;
        let mut waiting = Vec::new();
        for (name, urgent) in [("ordinary 1", false), ("ordinary 2", false), ("urgent", true)] {
            let (queue, order) = (queue.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let _turn = queue.turn(urgent).await;
                order.lock().unwrap_or_else(|p| p.into_inner()).push(name);
            }));
            settle().await;
        }
        drop(current);
        for w in waiting {
            w.await.expect("writer");
        }
        let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(order.len(), 3, "every writer had its turn: {order:?}");
        assert_eq!(order[0], "urgent", "{order:?}");
    }
}

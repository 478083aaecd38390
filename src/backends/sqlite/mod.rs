//! Embedded SQLite backend: the same outbox and engine surface as Postgres, with the producer
//! as a trigger in `migrations/sqlite/` (SQLite has no stored functions). Listeners wake on an
//! in-process signal raised by [`SqliteEngine`] after each commit, and on `PRAGMA data_version`
//! changes made by other processes.

mod engine;
mod source;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::watch;

pub use engine::SqliteEngine;
pub(crate) use source::SqliteSource;

use crate::config::{BackendConfig, BackendConnection, SqliteConnection};
use crate::error::EngineError;

/// The embedded migrations (`migrations/sqlite/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// A database's identity inside this process: its canonical path, or its memory name.
pub(crate) fn database_key(config: &BackendConfig) -> Result<String, EngineError> {
    match &config.connection {
        BackendConnection::Sqlite(SqliteConnection::File(path)) => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let dir = std::fs::canonicalize(parent)
                .map_err(|e| EngineError::validation(format!("sqlite directory {}: {e}", parent.display())))?;
            let name = path.file_name().ok_or_else(|| EngineError::validation("sqlite path names no file"))?;
            Ok(dir.join(name).display().to_string())
        }
        BackendConnection::Sqlite(SqliteConnection::Memory(name)) => Ok(format!("memory:{name}")),
        _ => Err(EngineError::validation("not a sqlite config")),
    }
}

/// The in-process commit signal of one database: a counter every producer bumps after commit.
pub(crate) fn commit_signal(key: &str) -> watch::Sender<u64> {
    static SIGNALS: OnceLock<Mutex<HashMap<String, watch::Sender<u64>>>> = OnceLock::new();
    let mut signals = SIGNALS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    signals.entry(key.to_owned()).or_insert_with(|| watch::channel(0).0).clone()
}

fn options(config: &BackendConfig) -> Result<SqliteConnectOptions, EngineError> {
    let options = match &config.connection {
        BackendConnection::Sqlite(SqliteConnection::File(path)) => SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal),
        BackendConnection::Sqlite(SqliteConnection::Memory(name)) => {
            SqliteConnectOptions::from_str(&format!("sqlite:file:{name}?mode=memory&cache=shared"))
                .map_err(|e| EngineError::validation(format!("sqlite memory database {name:?}: {e}")))?
        }
        _ => return Err(EngineError::validation("not a sqlite config")),
    };
    Ok(options.busy_timeout(Duration::from_secs(10)).foreign_keys(true))
}

/// A pool on the database with the schema migrated. An in-memory database gets one shared
/// single-connection pool per process, so its connections never fight over shared-cache locks
/// and the database lives as long as the process uses it.
pub(crate) async fn connect_pool(config: &BackendConfig, max: u32) -> Result<SqlitePool, EngineError> {
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
        .map_err(|e| EngineError::from_sqlx("sqlite open", e))?;
    MIGRATOR.run(&pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => EngineError::from_sqlx("sqlite migrate", e),
        other => EngineError::Schema { op: "sqlite migrate", detail: other.to_string() },
    })?;
    if is_memory {
        memory_pools.insert(key, pool.clone());
    }
    Ok(pool)
}

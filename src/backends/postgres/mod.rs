//! Postgres backend. The subsystem's objects (the `ff_completion_event` outbox, created or
//! adopted; `ff_completion_family_event`, its own table of lease-history and signal-delivery
//! events, kept out of an outbox a host may read; the snapshot ticks, the reader of both tables,
//! retention and wake-up functions) live in
//! `migrations/postgres/`, applied on connect with the ledger `ff_completions_migrations`. The
//! durable groups' tables and functions (`0006_durable_groups.sql`) serve [`groups`]. The
//! demo engine's tables and functions live in `migrations/postgres_demo/`, applied only by
//! [`PostgresEngine::connect`] with the ledger `ff_completions_demo_migrations`.
//!
//! Reads are gap-safe and wait for no unrelated transaction: identity values are taken before
//! commit, so a reader that trusts `event_id > last_seen` skips a lower id whose transaction
//! commits late. This reader reads batches between successive recorded snapshots (PgQ's ticks):
//! batch k is the rows visible in tick k's snapshot and not in tick k-1's, in `(txid, event_id)`
//! order. A transaction open anywhere in the cluster only delays its own rows.

#[cfg(feature = "demo-engine")]
mod engine;
pub(crate) mod groups;
mod source;
mod wake;

use std::str::FromStr;
use std::sync::LazyLock;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

#[cfg(feature = "demo-engine")]
pub use engine::PostgresEngine;
pub(crate) use source::PostgresSource;
pub use wake::CommitWake;
#[cfg(feature = "testing")]
pub use wake::MIN_WAKE_INTERVAL;

use crate::config::{BackendConfig, BackendConnection};
use crate::error::{EngineError, redact};

/// The NOTIFY channel the outbox trigger wakes listeners on.
pub const COMPLETION_CHANNEL: &str = "ff_completion";

/// `application_name` of the listener's dedicated LISTEN connection (find it in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "ff-completions-listener";

/// The ledger of the subsystem's migrations (never the host's `_sqlx_migrations`).
pub const MIGRATION_LEDGER: &str = "ff_completions_migrations";

/// The ledger of the demo engine's migrations.
#[cfg(feature = "demo-engine")]
pub const DEMO_MIGRATION_LEDGER: &str = "ff_completions_demo_migrations";

/// The subsystem's embedded migrations (`migrations/postgres/`), with their own ledger.
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("migrations/postgres");
    migrator.dangerous_set_table_name(MIGRATION_LEDGER);
    migrator
});

/// The demo engine's embedded migrations (`migrations/postgres_demo/`), with their own ledger.
#[cfg(feature = "demo-engine")]
pub static DEMO_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("migrations/postgres_demo");
    migrator.dangerous_set_table_name(DEMO_MIGRATION_LEDGER);
    migrator
});

pub(crate) fn connect_options(config: &BackendConfig) -> Result<PgConnectOptions, EngineError> {
    let BackendConnection::Postgres(pg) = &config.connection else {
        return Err(EngineError::validation("not a postgres config"));
    };
    PgConnectOptions::from_str(&pg.url).map_err(|e| {
        EngineError::validation(format!("bad postgres URL {:?}: {}", redact(&pg.url), redact(&e.to_string())))
    })
}

/// A pool of `max` connections, with the subsystem's schema migrated.
pub(crate) async fn connect_pool(config: &BackendConfig, max: u32) -> Result<PgPool, EngineError> {
    // Ticks rely on each statement taking its own snapshot, whatever the database's default.
    // No JIT: a misestimated plan over a large outbox would compile for tens of milliseconds
    // to answer a read of a few rows.
    let mut options = connect_options(config)?
        .application_name("ff-completions")
        .options([("default_transaction_isolation", "read committed"), ("jit", "off")]);
    if let Some(request) = config.timeouts.request {
        // Engine calls and catch-up reads run under it; the LISTEN connection does not.
        options = options.options([("statement_timeout", request.as_millis().to_string())]);
    }
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(config.timeouts.connect_or_default())
        .connect_with(options)
        .await
        .map_err(|e| EngineError::from_sqlx("postgres connect", e))?;
    migrate(&MIGRATOR, &pool).await?;
    sqlx::query("SELECT ff_completions_verify()")
        .execute(&pool)
        .await
        .map_err(|e| EngineError::from_sqlx("postgres verify", e))?;
    Ok(pool)
}

/// Applies one set of migrations; concurrent callers wait on sqlx's advisory lock.
pub(crate) async fn migrate(migrator: &Migrator, pool: &PgPool) -> Result<(), EngineError> {
    migrator.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => EngineError::from_sqlx("postgres migrate", e),
        other => EngineError::schema("postgres migrate", redact(&other.to_string())).with_source(other),
    })
}

//! Postgres backend. The subsystem's objects (the `ff_completion_event` outbox, created or
//! adopted; `ff_completion_family_event`, its own table of lease-history and signal-delivery
//! events, kept out of an outbox a host may read; the snapshot ticks, the reader of both tables,
//! retention and wake-up functions) live in
//! `migrations/postgres/`, applied on connect with the ledger `ff_completions_migrations`. The
//! durable groups' tables and functions (`0006_durable_groups.sql`) serve [`groups`]. Nothing
//! else is created: an engine's own tables and producers are its own (the lab's demo engine
//! keeps its migrations, with a ledger of their own).
//!
//! Reads are gap-safe and wait for no unrelated transaction: identity values are taken before
//! commit, so a reader that trusts `event_id > last_seen` skips a lower id whose transaction
//! commits late. This reader reads batches between successive recorded snapshots (PgQ's ticks):
//! batch k is the rows visible in tick k's snapshot and not in tick k-1's, in `(txid, event_id)`
//! order. A transaction open anywhere in the cluster only delays its own rows.

pub(crate) mod groups;
mod source;
mod wake;

use std::str::FromStr;
use std::sync::LazyLock;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub(crate) use source::PostgresSource;
pub use wake::{CommitWake, MIN_WAKE_INTERVAL};

use crate::config::{BackendConfig, BackendConnection};
use crate::error::{Error, redact};

/// The NOTIFY channel the outbox trigger wakes listeners on.
pub const COMPLETION_CHANNEL: &str = "ff_completion";

/// `application_name` of the listener's dedicated LISTEN connection (find it in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "ff-completions-listener";

/// The ledger of the subsystem's migrations (never the host's `_sqlx_migrations`).
pub const MIGRATION_LEDGER: &str = "ff_completions_migrations";

/// The subsystem's embedded migrations (`migrations/postgres/`), with their own ledger.
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("migrations/postgres");
    migrator.dangerous_set_table_name(MIGRATION_LEDGER);
    migrator
});

pub(crate) fn connect_options(config: &BackendConfig) -> Result<PgConnectOptions, Error> {
    let BackendConnection::Postgres(pg) = &config.connection else {
        return Err(Error::validation("not a postgres config"));
    };
    PgConnectOptions::from_str(&pg.url)
        .map_err(|e| Error::validation(format!("bad postgres URL {:?}: {}", redact(&pg.url), redact(&e.to_string()))))
}

/// A pool of up to `max` connections to the configured database, with the settings the tree's
/// own pools have (application name `ff-completions`, read committed, the request timeout as
/// `statement_timeout`) and the subsystem's schema installed or upgraded ([`MIGRATOR`]).
///
/// # Errors
/// [`Error::Validation`] for a config of another backend or a malformed URL; connection and
/// migration errors as [`Error::from_sqlx`] maps them.
pub async fn connect_pool(config: &BackendConfig, max: u32) -> Result<PgPool, Error> {
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
        .map_err(|e| Error::from_sqlx("postgres connect", e))?;
    migrate(&MIGRATOR, &pool).await?;
    sqlx::query("SELECT ff_completions_verify()")
        .execute(&pool)
        .await
        .map_err(|e| Error::from_sqlx("postgres verify", e))?;
    Ok(pool)
}

/// Applies one set of migrations; concurrent callers wait on sqlx's advisory lock.
async fn migrate(migrator: &Migrator, pool: &PgPool) -> Result<(), Error> {
    migrator.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => Error::from_sqlx("postgres migrate", e),
        other => Error::schema("postgres migrate", redact(&other.to_string())).with_source(other),
    })
}

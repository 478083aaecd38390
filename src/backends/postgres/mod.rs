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
mod install;
mod source;
mod statements;
mod wake;

use std::str::FromStr;
use std::sync::LazyLock;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool};

pub(crate) use source::PostgresSource;
pub(crate) use statements::Db;
use statements::{Purpose, session_options};
pub use wake::{CommitWake, MIN_WAKE_INTERVAL};

use crate::config::{BackendConfig, BackendConnection, PostgresConnection};
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

/// The Postgres part of a config.
pub(crate) fn postgres_connection(config: &BackendConfig) -> Result<&PostgresConnection, Error> {
    match &config.connection {
        BackendConnection::Postgres(pg) => Ok(pg),
        _ => Err(Error::validation("not a postgres config")),
    }
}

fn parse_options(url: &str) -> Result<PgConnectOptions, Error> {
    PgConnectOptions::from_str(url)
        .map_err(|e| Error::validation(format!("bad postgres URL {:?}: {}", redact(url), redact(&e.to_string()))))
}

/// The driver's options of the connection's URL (statements; through the pooler in the pooled
/// modes).
pub(crate) fn connect_options(config: &BackendConfig) -> Result<PgConnectOptions, Error> {
    parse_options(&postgres_connection(config)?.url)
}

/// The driver's options of a direct session: the split mode's `listen_url`, else the URL.
pub(crate) fn direct_options(config: &BackendConfig) -> Result<PgConnectOptions, Error> {
    let pg = postgres_connection(config)?;
    parse_options(pg.listen_url.as_deref().unwrap_or(&pg.url))
}

/// A pool of up to `max` connections to the configured database, with the settings the tree's
/// own pools have (application name `ff-completions`, read committed, no JIT) and the timeouts
/// the config sets (`request` as `statement_timeout`, `lock` as `lock_timeout`), and the
/// subsystem's schema installed or upgraded ([`MIGRATOR`]) or, with `ff_migrate=false`,
/// checked. Through a transaction pooler (`ff_poll_ms` or `ff_listen`) the sessions carry no
/// startup settings: the pooler would refuse them, and the caller's statements must be
/// unnamed (`.persistent(false)`) and set what they need in their own transaction.
///
/// # Errors
/// [`Error::Validation`] for a config of another backend or a malformed URL; connection and
/// migration errors as [`Error::from_sqlx`] maps them; [`Error::SchemaVersion`],
/// [`Error::Permission`] and [`Error::Pooler`] as installing or checking finds them.
pub async fn connect_pool(config: &BackendConfig, max: u32) -> Result<PgPool, Error> {
    Ok(open(config, max, Purpose::Host).await?.pool().clone())
}

/// The tree's connections: every statement bounded by the timeouts (defaults included),
/// the schema installed or checked.
pub(crate) async fn connect_db(config: &BackendConfig, max: u32) -> Result<Db, Error> {
    open(config, max, Purpose::Tree).await
}

async fn open(config: &BackendConfig, max: u32, purpose: Purpose) -> Result<Db, Error> {
    let pg = postgres_connection(config)?;
    let pooled = pg.through_pooler();
    let options = session_options(connect_options(config)?.application_name("ff-completions"), config, pooled, purpose);
    let db = Db::connect(config, options, max, pooled, purpose).await?;
    install::install_or_check(config, pg, &db).await?;
    db.run("postgres verify", |conn| {
        Box::pin(async move { sqlx::query("SELECT ff_completions_verify()").execute(conn).await.map(drop) })
    })
    .await?;
    if purpose == Purpose::Tree && !pooled {
        // Sessions made before the schema was installed were not warmed.
        db.warm_every_session().await?;
    }
    Ok(db)
}

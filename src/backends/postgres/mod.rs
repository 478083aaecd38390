//! Postgres backend: the `ff_completion_event` outbox, its `ff_completion` NOTIFY trigger and
//! the producer functions live in `migrations/postgres/`, embedded and applied on connect.
//!
//! Reads are gap-safe: identity values are taken before commit, so a reader that trusts
//! `event_id > last_seen` skips a lower id whose transaction commits late. This reader orders
//! by `(txid, event_id)` and reads only below the snapshot horizon
//! (`pg_snapshot_xmin(pg_current_snapshot())`), where no row can appear later.

mod engine;
mod source;

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use engine::PostgresEngine;
pub(crate) use source::PostgresSource;

use crate::config::{BackendConfig, BackendConnection};
use crate::error::{EngineError, redact};

/// The NOTIFY channel the outbox trigger wakes listeners on.
pub const COMPLETION_CHANNEL: &str = "ff_completion";

/// `application_name` of the listener's dedicated LISTEN connection (find it in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "ff-completions-listener";

/// The embedded migrations (`migrations/postgres/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

pub(crate) fn connect_options(config: &BackendConfig) -> Result<PgConnectOptions, EngineError> {
    let BackendConnection::Postgres(pg) = &config.connection else {
        return Err(EngineError::validation("not a postgres config"));
    };
    PgConnectOptions::from_str(&pg.url).map_err(|e| {
        EngineError::validation(format!("bad postgres URL {:?}: {}", redact(&pg.url), redact(&e.to_string())))
    })
}

/// A pool of `max` connections, with the schema migrated.
pub(crate) async fn connect_pool(config: &BackendConfig, max: u32) -> Result<PgPool, EngineError> {
    let mut options = connect_options(config)?.application_name("ff-completions");
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
    MIGRATOR.run(&pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => EngineError::from_sqlx("postgres migrate", e),
        other => EngineError::Schema { op: "postgres migrate", detail: redact(&other.to_string()) },
    })?;
    Ok(pool)
}

//! The subsystem's SQLite migrations (`migrations/sqlite/`), recorded in their own ledger,
//! `ff_completions_migrations`, never in sqlx's default `_sqlx_migrations` (which a host's own
//! sqlx migrations of the same database use).
//!
//! Earlier versions kept them in `_sqlx_migrations`, and their first two migrations also
//! created the demo engine's tables (now the lab's own migrations). A database migrated by
//! them holds everything the same-numbered migrations here create, so those are recorded as
//! applied without running: the ones the earlier ledger shows as applied, under the names
//! they had, version by version from the first.

use std::sync::LazyLock;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::SqlitePool;

use crate::error::Error;

/// The ledger of the subsystem's SQLite migrations.
pub const MIGRATION_LEDGER: &str = "ff_completions_migrations";

/// Where earlier versions recorded the same migrations.
const EARLIER_LEDGER: &str = "_sqlx_migrations";

/// The migrations earlier versions applied, as their ledger names them.
const EARLIER_MIGRATIONS: [(i64, &str); 3] =
    [(1, "completions"), (2, "lease and signal families"), (3, "durable groups")];

/// The subsystem's embedded migrations, with their own ledger.
pub(crate) static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("migrations/sqlite");
    migrator.dangerous_set_table_name(MIGRATION_LEDGER);
    migrator
});

fn migrate_error(err: MigrateError) -> Error {
    match err {
        MigrateError::Execute(e) => Error::from_sqlx("sqlite migrate", e),
        other => Error::schema("sqlite migrate", other.to_string()).with_source(other),
    }
}

/// How many of [`EARLIER_MIGRATIONS`], from the first, the earlier ledger shows as applied.
async fn applied_earlier(pool: &SqlitePool) -> Result<i64, Error> {
    let err = |e| Error::from_sqlx("sqlite migrate", e);
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?)")
            .bind(EARLIER_LEDGER)
            .fetch_one(pool)
            .await
            .map_err(err)?;
    if !exists {
        return Ok(0);
    }
    let applied: Vec<(i64, String)> =
        sqlx::query_as("SELECT version, description FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .map_err(err)?;
    let mut count = 0;
    for (version, description) in EARLIER_MIGRATIONS {
        if !applied.iter().any(|(v, d)| *v == version && d == description) {
            break;
        }
        count = version;
    }
    Ok(count)
}

/// Applies the subsystem's migrations to `pool`'s database, taking over the ones an earlier
/// version applied (see the module docs).
pub(crate) async fn migrate(pool: &SqlitePool) -> Result<(), Error> {
    let earlier = applied_earlier(pool).await?;
    if earlier > 0 {
        MIGRATOR.skip(pool, Some(earlier)).await.map_err(migrate_error)?;
    }
    MIGRATOR.run(pool).await.map_err(migrate_error)
}

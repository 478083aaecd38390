//! Installing the schema on connect, or checking it.
//!
//! Directly, the schema's owner installs or upgrades it with [`super::MIGRATOR`] on a session
//! of its own, without the timeouts of the tree's statements (a migration may wait for its
//! locks and build indexes on a large outbox). sqlx's migrator holds a session advisory lock
//! across its transactions, which a transaction pooler cannot keep: in split mode the schema is
//! installed through the direct session, in poll-only mode it is only checked, and a missing
//! or older schema stops the tree with an [`Error::Pooler`] that says to install directly.
//!
//! With `ff_migrate=false` (a runtime role without `CREATE`) the tree checks that the ledger
//! holds exactly this crate's migrations ([`Error::SchemaVersion`] names the missing or unknown
//! one) and that the role holds every privilege the tree needs
//! (`ff_completions_missing_privileges()`, [`Error::Permission`] names them).

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};

use super::statements::{Db, Purpose, session_options};
use super::{MIGRATION_LEDGER, MIGRATOR, direct_options};
use crate::config::{BackendConfig, PostgresConnection};
use crate::error::{Error, redact};

/// The ledger's rows: the versions and checksums of the migrations applied.
const LEDGER: &str = "SELECT version, checksum FROM ff_completions_migrations WHERE success ORDER BY version";

/// Whether the ledger exists (in the connection's search path).
const LEDGER_EXISTS: &str = "SELECT to_regclass('ff_completions_migrations') IS NOT NULL";

/// Privileges the connecting role lacks, at most 20 (see `0008_deploying.sql`).
const MISSING_PRIVILEGES: &str = "\
SELECT privilege || ' on ' || object_type || ' ' || object_name FROM ff_completions_missing_privileges() LIMIT 20";

/// Installs, or checks, as the config says (see the module's docs).
///
/// # Errors
/// Migration errors; [`Error::Schema`] when nothing is installed and the tree may not install;
/// [`Error::SchemaVersion`]; [`Error::Permission`]; [`Error::Pooler`] when the schema must be
/// installed through a pooler in poll-only mode.
pub(super) async fn install_or_check(config: &BackendConfig, pg: &PostgresConnection, db: &Db) -> Result<(), Error> {
    match (pg.migrate, db.pooled(), pg.listen_url.is_some()) {
        (true, false, _) | (true, true, true) => install(config).await,
        (true, true, false) => check_version(db).await.map_err(|err| match err {
            Error::Schema { detail, .. } | Error::SchemaVersion { detail, .. } => Error::pooler(
                "postgres install",
                format!(
                    "{detail}; it cannot be installed through a transaction pooler, which does not keep the session \
                     lock the installer holds across its transactions: install it once through a direct connection \
                     to the server (this URL without ff_poll_ms, to the server's own address), or run in split mode \
                     (ff_listen=<host:port of the server>), which installs through its direct session"
                ),
            ),
            other => other,
        }),
        (false, ..) => {
            if let Err(err) = check_version(db).await {
                // A role that may not read the ledger: name every privilege it lacks, if the
                // schema can still tell.
                if matches!(err, Error::Permission { .. }) {
                    check_privileges(db).await?;
                }
                return Err(err);
            }
            check_privileges(db).await
        }
    }
}

/// Applies [`MIGRATOR`] on a direct session of its own (the split mode's `listen_url` when
/// set), without statement or lock timeouts.
async fn install(config: &BackendConfig) -> Result<(), Error> {
    let options = session_options(
        direct_options(config)?.application_name("ff-completions-install"),
        config,
        false,
        Purpose::Install,
    );
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(config.timeouts.connect_or_default())
        .connect_with(options)
        .await
        .map_err(|e| Error::from_sqlx("postgres install connect", e))?;
    let migrated = migrate(&MIGRATOR, &pool).await;
    pool.close().await;
    migrated
}

/// Applies one set of migrations; concurrent callers wait on sqlx's advisory lock.
pub(super) async fn migrate(migrator: &Migrator, pool: &PgPool) -> Result<(), Error> {
    migrator.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => Error::from_sqlx("postgres migrate", e),
        other @ (sqlx::migrate::MigrateError::VersionMissing(_)
        | sqlx::migrate::MigrateError::VersionMismatch(_)
        | sqlx::migrate::MigrateError::VersionTooOld(..)
        | sqlx::migrate::MigrateError::VersionTooNew(..)) => Error::SchemaVersion {
            op: "postgres migrate",
            detail: format!(
                "{}: the database was installed by another version of ff-completions",
                redact(&other.to_string())
            ),
        },
        other => Error::schema("postgres migrate", redact(&other.to_string())).with_source(other),
    })
}

/// Checks that the ledger holds exactly this crate's migrations, with their checksums.
async fn check_version(db: &Db) -> Result<(), Error> {
    let (exists, ledger) = (db.query_scalar::<bool>(LEDGER_EXISTS), db.query_as::<(i64, Vec<u8>)>(LEDGER));
    let installed: Option<Vec<(i64, Vec<u8>)>> = db
        .run("postgres check schema", |conn| {
            Box::pin(async move {
                if !exists.fetch_one(&mut *conn).await? {
                    return Ok(None);
                }
                ledger.fetch_all(conn).await.map(Some)
            })
        })
        .await?;
    let Some(installed) = installed else {
        return Err(Error::schema(
            "postgres check schema",
            format!(
                "the subsystem's schema is not installed in this database (no {MIGRATION_LEDGER} in the search path): \
                 install it once as the schema's owner (start the tree with ff_migrate=true, the default)"
            ),
        ));
    };
    match missing_migrations(&installed) {
        None => Ok(()),
        Some(detail) => Err(Error::SchemaVersion { op: "postgres check schema", detail }),
    }
}

/// What is wrong with a ledger of `(version, checksum)` rows against this crate's migrations,
/// for the operator; `None` when it holds exactly them.
pub(super) fn missing_migrations(installed: &[(i64, Vec<u8>)]) -> Option<String> {
    let name = |version: i64| {
        MIGRATOR
            .iter()
            .find(|m| m.version == version)
            .map_or_else(|| format!("{version:04}"), |m| format!("{version:04}_{}", m.description.replace(' ', "_")))
    };
    let newest = installed.iter().map(|(v, _)| *v).max();
    let at = newest.map_or_else(|| "nothing".to_owned(), |v| format!("migration {}", name(v)));
    for migration in MIGRATOR.iter().filter(|m| !m.migration_type.is_down_migration()) {
        match installed.iter().find(|(v, _)| *v == migration.version) {
            None => {
                return Some(format!(
                    "migration {} is not installed (the database holds up to {at}): install it as the schema's owner \
                     (start the tree once with ff_migrate=true, the default)",
                    name(migration.version)
                ));
            }
            Some((_, checksum)) if checksum.as_slice() != &*migration.checksum => {
                return Some(format!(
                    "migration {} in the database differs from this crate's: it was installed by another version \
                     of ff-completions",
                    name(migration.version)
                ));
            }
            Some(_) => {}
        }
    }
    installed.iter().map(|(v, _)| *v).find(|v| MIGRATOR.iter().all(|m| m.version != *v)).map(|unknown| {
        format!(
            "the database holds migration {unknown:04}, which this crate does not know: it was installed by a newer \
             version of ff-completions"
        )
    })
}

/// Checks that the connecting role holds every privilege the tree needs.
async fn check_privileges(db: &Db) -> Result<(), Error> {
    let missing = db.query_scalar::<String>(MISSING_PRIVILEGES);
    let missing: Vec<String> = db.run("postgres check privileges", |conn| Box::pin(missing.fetch_all(conn))).await?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::permission(
        "postgres check privileges",
        format!(
            "the role lacks privileges the tree needs: {}; as the schema's owner, run SELECT \
             ff_completions_grant_runtime('<role>')",
            missing.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(upto: i64) -> Vec<(i64, Vec<u8>)> {
        MIGRATOR.iter().filter(|m| m.version <= upto).map(|m| (m.version, m.checksum.to_vec())).collect()
    }

    #[test]
    fn a_ledger_with_every_migration_passes_and_a_short_one_names_the_first_missing() {
        let newest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or_default();
        assert_eq!(missing_migrations(&ledger(newest)), None);
        let short = missing_migrations(&ledger(newest - 1)).unwrap_or_default();
        assert!(short.contains(&format!("migration {newest:04}_")) && short.contains("not installed"), "{short}");
        let empty = missing_migrations(&[]).unwrap_or_default();
        assert!(
            empty.contains("migration 0001_outbox is not installed") && empty.contains("holds up to nothing"),
            "{empty}"
        );
    }

    #[test]
    fn a_ledger_with_an_unknown_or_changed_migration_names_it() {
        let newest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or_default();
        let mut newer = ledger(newest);
        newer.push((newest + 1, vec![0]));
        let text = missing_migrations(&newer).unwrap_or_default();
        assert!(text.contains(&format!("{:04}", newest + 1)) && text.contains("newer"), "{text}");
        let mut changed = ledger(newest);
        changed[0].1 = vec![1, 2, 3];
        let text = missing_migrations(&changed).unwrap_or_default();
        assert!(text.contains("0001_outbox") && text.contains("differs"), "{text}");
    }
}

//! How the tree's statements reach Postgres, and what bounds each one.
//!
//! Directly (the default), a session of the pool is set up once by its startup options: read
//! committed, no JIT, `statement_timeout` and `lock_timeout`; statements are prepared once per
//! session and kept.
//!
//! Through a transaction pooler (poll-only or split mode: PgBouncer in `pool_mode =
//! transaction`, which hands each transaction a server session of its choosing and refuses
//! unknown startup parameters), nothing may rely on a session: every statement is unnamed
//! (parsed, bound and run inside one transaction) and runs in a transaction of its own whose
//! `BEGIN` sets the isolation level, `statement_timeout`, `lock_timeout` and `jit` with
//! `SET LOCAL`. The reader's SQL keeps one value per session on purpose, the cluster's system
//! identifier (`ff_completions.system_identifier`): a server session that lacks it computes it
//! again.
//!
//! Either way a statement that waits longer than the lock timeout for a lock, or runs longer
//! than the statement timeout, fails with [`Error::Timeout`], which the tree retries.

use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres};

use crate::config::BackendConfig;
use crate::error::Error;

/// The tree's connections to one database, and how each statement is sent and bounded.
#[derive(Clone, Debug)]
pub(crate) struct Db {
    pool: PgPool,
    /// Through a transaction pooler: unnamed statements, each in a transaction of its own.
    pooled: bool,
    /// The `SET LOCAL`s of a pooled transaction (empty when direct).
    bounds: String,
}

/// A statement run on one connection (inside the transaction [`Db`] opened for it, if any).
pub(crate) type Statement<'c, T> = BoxFuture<'c, Result<T, sqlx::Error>>;

impl Db {
    /// A pool of up to `max` connections with `options` (made by [`session_options`]).
    ///
    /// # Errors
    /// Connection errors as [`Error::from_sqlx`] maps them.
    pub(crate) async fn connect(
        config: &BackendConfig,
        options: PgConnectOptions,
        max: u32,
        pooled: bool,
        purpose: Purpose,
    ) -> Result<Self, Error> {
        let mut pool = PgPoolOptions::new().max_connections(max).acquire_timeout(config.timeouts.connect_or_default());
        if purpose == Purpose::Tree && !pooled {
            // Every session made ahead and kept: one made while delivering would hold a read up
            // while it warms.
            pool = pool.min_connections(max).after_connect(|conn, _| Box::pin(async move { warm(conn).await }));
        }
        let pool = pool.connect_with(options).await.map_err(|e| Error::from_sqlx("postgres connect", e))?;
        let bounds = if pooled { set_local(config) } else { String::new() };
        Ok(Self { pool, pooled, bounds })
    }

    /// Opens every session of the pool now and warms each ([`warm`]).
    ///
    /// # Errors
    /// Connection errors, and the warm-up's, as [`Error::from_sqlx`] maps them.
    pub(crate) async fn warm_every_session(&self) -> Result<(), Error> {
        let mut sessions =
            futures::future::try_join_all((0..self.pool.options().get_max_connections()).map(|_| self.pool.acquire()))
                .await
                .map_err(|e| Error::from_sqlx("postgres connect", e))?;
        for session in &mut sessions {
            warm(session).await.map_err(|e| Error::from_sqlx("postgres warm-up", e))?;
        }
        Ok(())
    }

    /// The pool (for the public `connect_pool`, whose caller sends statements of its own).
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether statements go through a transaction pooler.
    pub(crate) fn pooled(&self) -> bool {
        self.pooled
    }

    /// `sql` as a query of this connection's kind: prepared once per session directly,
    /// unnamed through a pooler.
    pub(crate) fn query(&self, sql: &'static str) -> sqlx::query::Query<'static, Postgres, PgArguments> {
        sqlx::query(sql).persistent(!self.pooled)
    }

    /// [`Self::query`] returning rows of `O`.
    pub(crate) fn query_as<O>(&self, sql: &'static str) -> sqlx::query::QueryAs<'static, Postgres, O, PgArguments>
    where
        O: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        sqlx::query_as(sql).persistent(!self.pooled)
    }

    /// [`Self::query`] returning one column of `O`.
    pub(crate) fn query_scalar<O>(
        &self,
        sql: &'static str,
    ) -> sqlx::query::QueryScalar<'static, Postgres, O, PgArguments>
    where
        (O,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        sqlx::query_scalar(sql).persistent(!self.pooled)
    }

    /// Runs one statement (`run` sends it on the connection it is given): as it is on a direct
    /// session, in a transaction of its own through a pooler.
    ///
    /// # Errors
    /// The statement's error, or the connection's, as [`Error::from_sqlx`] maps them.
    pub(crate) async fn run<T: Send>(
        &self,
        op: &'static str,
        run: impl for<'c> FnOnce(&'c mut PgConnection) -> Statement<'c, T> + Send,
    ) -> Result<T, Error> {
        self.run_raw(run).await.map_err(|e| Error::from_sqlx(op, e))
    }

    /// [`Self::run`] with the driver's error, for callers that map the errors of their own SQL.
    ///
    /// # Errors
    /// The statement's error, or the connection's.
    pub(crate) async fn run_raw<T: Send>(
        &self,
        run: impl for<'c> FnOnce(&'c mut PgConnection) -> Statement<'c, T> + Send,
    ) -> Result<T, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        if !self.pooled {
            return run(&mut conn).await;
        }
        let begin = format!("BEGIN ISOLATION LEVEL READ COMMITTED; {}", self.bounds);
        let mut tx = conn.begin_with(sqlx::AssertSqlSafe(begin)).await?;
        let out = run(&mut tx).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Runs statements in one transaction begun with `begin` (`BEGIN ISOLATION LEVEL …`),
    /// bounded as every statement is.
    ///
    /// # Errors
    /// As [`Self::run`].
    pub(crate) async fn transaction<T: Send>(
        &self,
        op: &'static str,
        begin: &'static str,
        run: impl for<'c> FnOnce(&'c mut PgConnection) -> Statement<'c, T> + Send,
    ) -> Result<T, Error> {
        let err = |e| Error::from_sqlx(op, e);
        let mut conn = self.pool.acquire().await.map_err(err)?;
        let mut tx = if self.pooled {
            conn.begin_with(sqlx::AssertSqlSafe(format!("{begin}; {}", self.bounds))).await
        } else {
            conn.begin_with(begin).await
        }
        .map_err(err)?;
        let out = run(&mut tx).await.map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(out)
    }
}

/// What a pooled transaction sets for itself. The values are the config's durations, in
/// milliseconds: numbers, never text from outside the process.
fn set_local(config: &BackendConfig) -> String {
    format!(
        "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}; SET LOCAL jit = off",
        millis(config.timeouts.postgres_statement_or_default()),
        millis(config.timeouts.lock_or_default())
    )
}

fn millis(d: Duration) -> u128 {
    // 0 would turn the timeout off.
    d.as_millis().max(1)
}

/// Loads what reading every partition of a partitioned outbox needs into a new session's caches
/// (`ff_completions_warm()`), so that its first read of each partition is not paid for while
/// delivering; nothing before the schema is installed.
const WARM: &str = "\
DO $$ BEGIN IF to_regprocedure('ff_completions_warm()') IS NOT NULL THEN PERFORM ff_completions_warm(); END IF; END $$";

/// Runs [`WARM`] on a session of the tree.
///
/// # Errors
/// The statement's error (the connection is then not used).
pub(crate) async fn warm(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(WARM).execute(conn).await.map(drop)
}

/// Who a session is for: the tree's own (every statement bounded by the timeouts, defaults
/// included), a host's producers (`connect_pool`: only the timeouts the config sets), or the
/// installer (no timeout: a migration waits for its locks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    Tree,
    Host,
    Install,
}

/// The startup settings of a direct session (`options`), or none through a pooler (which
/// refuses them): read committed, no JIT, and the timeouts `purpose` asks for.
pub(crate) fn session_options(
    options: PgConnectOptions,
    config: &BackendConfig,
    pooled: bool,
    purpose: Purpose,
) -> PgConnectOptions {
    if pooled {
        // PgBouncer forwards only the parameters it tracks; sqlx's extra_float_digits is not one.
        return options.extra_float_digits(None);
    }
    // Ticks rely on each statement taking its own snapshot, whatever the database's default.
    // No JIT: a misestimated plan over a large outbox would compile for tens of milliseconds
    // to answer a read of a few rows.
    let mut options = options.options([("default_transaction_isolation", "read committed"), ("jit", "off")]);
    let (statement, lock) = match purpose {
        Purpose::Tree => {
            (Some(config.timeouts.postgres_statement_or_default()), Some(config.timeouts.lock_or_default()))
        }
        Purpose::Host => (config.timeouts.request, config.timeouts.lock),
        Purpose::Install => (None, None),
    };
    if let Some(statement) = statement {
        options = options.options([("statement_timeout", millis(statement).to_string())]);
    }
    if let Some(lock) = lock {
        options = options.options([("lock_timeout", millis(lock).to_string())]);
    }
    options
}

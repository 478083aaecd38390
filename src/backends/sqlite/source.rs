//! The SQLite [`CompletionSource`]: batched reads of the outbox in `event_id` order, and a waker
//! on the in-process commit signal plus `PRAGMA data_version` for other processes.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::SqlitePool;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::watch;

use super::{commit_signal, connect_pool, database_key, options};
use crate::backends::outbox::{FamilyColumns, OutboxRow, age_cutoff_ms};
use crate::backends::seam::{Batch, CompletionSource, FamilyEvent, Positioned, ReadPosition, StartAt, Wake, Waker};
use crate::config::{BackendConfig, Retention};
use crate::cursor::{Frontier, Position, StreamCursor, decode_sqlite_cursor, encode_sqlite_cursor};
use crate::error::Error;
use crate::family::Family;
use crate::types::TimestampMs;

/// How often the waker looks at `PRAGMA data_version` for commits from other processes.
const DATA_VERSION_POLL: Duration = Duration::from_millis(50);

/// Columns are read as loosely as SQLite stores them (any value in any column), so one row of
/// the wrong type is skipped alone instead of failing the whole read. The other families'
/// columns come as one JSON array, `NULL` for a completion: a completion row costs one more
/// (`NULL`) column than before the families, not seven.
const READ_AFTER: &str = "\
SELECT event_id, CAST(execution_id AS TEXT) AS execution_id, CAST(flow_id AS TEXT) AS flow_id, \
       CAST(outcome AS TEXT) AS outcome, CAST(namespace AS TEXT) AS namespace, \
       CAST(instance_tag AS TEXT) AS instance_tag, CAST(tags AS TEXT) AS tags, \
       CASE WHEN typeof(occurred_at_ms) = 'integer' THEN occurred_at_ms END AS occurred_at_ms, \
       CASE WHEN typeof(partition_key) = 'integer' THEN partition_key END AS partition_key, \
       CAST(family AS TEXT) AS family, \
       CASE WHEN family IS NOT NULL THEN json_array(CAST(lease_id AS TEXT), CAST(worker AS TEXT), \
            CAST(revoked_by AS TEXT), CAST(signal_id AS TEXT), CAST(waitpoint_id AS TEXT), \
            CAST(source_identity AS TEXT)) END AS family_fields, \
       CAST(traceparent AS TEXT) AS traceparent \
  FROM ff_completion_event WHERE event_id > ? ORDER BY event_id LIMIT ?";

/// One row of [`READ_AFTER`].
#[derive(sqlx::FromRow)]
struct Row {
    event_id: i64,
    #[sqlx(flatten)]
    outbox: OutboxRow,
    family: Option<String>,
    /// `[lease_id, worker, revoked_by, signal_id, waitpoint_id, source_identity]`, as text or
    /// `null`; `NULL` for a completion.
    family_fields: Option<String>,
}

/// Reads the outbox of one SQLite database.
pub(crate) struct SqliteSource {
    pub(super) pool: SqlitePool,
    config: BackendConfig,
    pub(super) key: String,
}

impl SqliteSource {
    pub(crate) async fn connect(config: &BackendConfig) -> Result<Self, Error> {
        Ok(Self { pool: connect_pool(config, 2).await?, config: config.clone(), key: database_key(config)? })
    }

    async fn trimmed(&self) -> Result<Option<i64>, Error> {
        sqlx::query_scalar("SELECT trimmed_event_id FROM ff_completion_retention WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| Error::from_sqlx("sqlite retention", e))
    }
}

fn pos(event_id: i64) -> Position {
    Position::new(0, event_id.max(0) as u64)
}

/// Decodes one outbox row of any family; the error names what is wrong with it.
fn decode_row(row: &Row) -> Result<FamilyEvent, String> {
    let cursor = encode_sqlite_cursor(row.event_id);
    let Some(family) = &row.family else { return row.outbox.decode(cursor).map(FamilyEvent::Completion) };
    let columns = FamilyColumns::from_json_fields(family, row.family_fields.as_deref())?;
    columns.decode(&row.outbox, cursor)
}

#[async_trait]
impl CompletionSource for SqliteSource {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn cursor_of(&self, at: &Frontier) -> StreamCursor {
        encode_sqlite_cursor(at.single().lo as i64)
    }

    /// Every family: the triggers of `migrations/sqlite/` write lease history and signal
    /// delivery beside the completions.
    fn produces(&self, _family: Family) -> bool {
        true
    }

    async fn resolve_start(&self, cursor: &StreamCursor) -> Result<StartAt, Error> {
        match decode_sqlite_cursor(cursor)? {
            None => Ok(StartAt::after(self.tail().await?)),
            Some(event_id) => match self.trimmed().await? {
                Some(trimmed) if event_id < trimmed => {
                    Err(Error::CursorExpired { oldest: Some(encode_sqlite_cursor(trimmed)) })
                }
                _ => Ok(StartAt::after(Frontier::at(pos(event_id)))),
            },
        }
    }

    async fn tail(&self) -> Result<Frontier, Error> {
        let max: Option<i64> = sqlx::query_scalar("SELECT max(event_id) FROM ff_completion_event")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| Error::from_sqlx("sqlite tail", e))?;
        Ok(Frontier::at(pos(max.unwrap_or(0))))
    }

    async fn read_after(&self, after: &Frontier, limit: usize) -> Result<Batch, Error> {
        let after = after.single();
        let mut batch = Batch { start: Frontier::at(after), end: Frontier::at(after), ..Batch::default() };
        if let Some(trimmed) = self.trimmed().await?
            && pos(trimmed) > after
        {
            batch.expired = Some(Frontier::at(pos(trimmed)));
            return Ok(batch);
        }
        let rows: Vec<Row> = sqlx::query_as(READ_AFTER)
            .bind(after.lo as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| Error::from_sqlx("sqlite read", e))?;
        batch.full = rows.len() == limit;
        for row in &rows {
            let p = pos(row.event_id);
            batch.end.advance(p);
            match decode_row(row) {
                Ok(event) => batch.events.push(Positioned { pos: p, event }),
                Err(reason) => batch.skipped.push((p, reason)),
            }
        }
        Ok(batch)
    }

    async fn trim(&self, retention: &Retention) -> Result<u64, Error> {
        let before_ms = retention.max_age.map(|age| age_cutoff_ms(TimestampMs::now(), age));
        let keep = retention.max_events.map(|n| n.min(i64::MAX as u64) as i64);
        let mut tx = self.pool.begin().await.map_err(|e| Error::from_sqlx("sqlite trim", e))?;
        let by_age: Option<i64> = match before_ms {
            Some(ms) => sqlx::query_scalar("SELECT max(event_id) FROM ff_completion_event WHERE occurred_at_ms < ?")
                .bind(ms)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| Error::from_sqlx("sqlite trim", e))?,
            None => None,
        };
        let by_count: Option<i64> = match keep {
            Some(n) => {
                sqlx::query_scalar("SELECT event_id FROM ff_completion_event ORDER BY event_id DESC LIMIT 1 OFFSET ?")
                    .bind(n)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| Error::from_sqlx("sqlite trim", e))?
            }
            None => None,
        };
        let Some(cut) = by_age.max(by_count) else { return Ok(0) };
        let removed = sqlx::query("DELETE FROM ff_completion_event WHERE event_id <= ?")
            .bind(cut)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::from_sqlx("sqlite trim", e))?
            .rows_affected();
        sqlx::query(
            "INSERT INTO ff_completion_retention (id, trimmed_event_id) VALUES (1, ?) \
             ON CONFLICT (id) DO UPDATE SET trimmed_event_id = max(trimmed_event_id, excluded.trimmed_event_id)",
        )
        .bind(cut)
        .execute(&mut *tx)
        .await
        .map_err(|e| Error::from_sqlx("sqlite trim", e))?;
        tx.commit().await.map_err(|e| Error::from_sqlx("sqlite trim", e))?;
        Ok(removed)
    }

    async fn open_waker(&self, _read: ReadPosition) -> Result<Box<dyn Waker>, Error> {
        let signal = commit_signal(&self.key).subscribe();
        // Other processes only reach a file; an in-memory database is this process's alone.
        let watcher = if self.key.starts_with("memory:") {
            None
        } else {
            let mut conn = SqliteConnection::connect_with(&options(&self.config)?)
                .await
                .map_err(|e| Error::from_sqlx("sqlite watch connect", e))?;
            let version = data_version(&mut conn).await?;
            Some((conn, version))
        };
        Ok(Box::new(SqliteWaker { signal, watcher }))
    }
}

async fn data_version(conn: &mut SqliteConnection) -> Result<i64, Error> {
    sqlx::query_scalar("PRAGMA data_version")
        .fetch_one(conn)
        .await
        .map_err(|e| Error::from_sqlx("sqlite data_version", e))
}

/// Wakes on this process's commit signal, or when another connection changed the file.
struct SqliteWaker {
    signal: watch::Receiver<u64>,
    watcher: Option<(SqliteConnection, i64)>,
}

#[async_trait]
impl Waker for SqliteWaker {
    async fn wait(&mut self) -> Result<Wake, Error> {
        loop {
            tokio::select! {
                changed = self.signal.changed() => {
                    return match changed {
                        Ok(()) => Ok(Wake::Notified),
                        Err(_) => Err(Error::Actor { detail: "sqlite commit signal closed".into() }),
                    };
                }
                _ = tokio::time::sleep(DATA_VERSION_POLL) => {
                    if let Some((conn, seen)) = &mut self.watcher {
                        let now = data_version(conn).await?;
                        if now != *seen {
                            *seen = now;
                            return Ok(Wake::Notified);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory outbox holding one valid row per commit time, in that order.
    async fn outbox(times: &[i64]) -> SqliteSource {
        let source = SqliteSource::connect(&BackendConfig::sqlite_in_memory()).await.expect("in-memory database");
        for at in times {
            sqlx::query(
                "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) \
                 VALUES ('6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b', 'success', ?, 1)",
            )
            .bind(at)
            .execute(&source.pool)
            .await
            .expect("insert row");
        }
        source
    }

    async fn kept(source: &SqliteSource) -> Vec<i64> {
        sqlx::query_scalar("SELECT occurred_at_ms FROM ff_completion_event ORDER BY event_id")
            .fetch_all(&source.pool)
            .await
            .expect("read outbox")
    }

    #[tokio::test]
    async fn retention_by_age_removes_old_rows_keeps_new_ones_and_expires_cursors_below_them() {
        let now = TimestampMs::now().0;
        let source = outbox(&[i64::MIN, 1_000, now - 7_200_000, now, i64::MAX]).await;
        let removed = source.trim(&Retention::max_age(Duration::from_secs(3_600))).await.expect("trim");
        assert_eq!(removed, 3);
        assert_eq!(kept(&source).await, [now, i64::MAX]);
        for below in [1, 2] {
            match source.resolve_start(&encode_sqlite_cursor(below)).await {
                Err(Error::CursorExpired { oldest }) => assert_eq!(oldest, Some(encode_sqlite_cursor(3))),
                other => panic!("cursor {below} is below the trimmed rows, got {other:?}"),
            }
        }
        assert_eq!(
            source.resolve_start(&encode_sqlite_cursor(3)).await.ok(),
            Some(StartAt::after(Frontier::at(pos(3))))
        );
        let batch = source.read_after(&Frontier::at(pos(3)), 10).await.expect("read");
        assert_eq!(batch.events.iter().map(|e| e.event.at().0).collect::<Vec<_>>(), [now, i64::MAX]);
    }

    #[tokio::test]
    async fn a_retention_age_beyond_the_representable_past_removes_nothing() {
        let source = outbox(&[i64::MIN, i64::MIN + 1, 0, i64::MAX]).await;
        for age in [Duration::from_secs(u64::MAX / 2), Duration::MAX] {
            assert_eq!(source.trim(&Retention::max_age(age)).await.expect("trim"), 0, "{age:?}");
        }
        assert_eq!(kept(&source).await, [i64::MIN, i64::MIN + 1, 0, i64::MAX]);
        assert!(source.trimmed().await.expect("retention").is_none(), "no trim boundary was recorded");
        // The largest age that still fits: only rows from before `now - i64::MAX` are older.
        let widest = Duration::from_millis(i64::MAX as u64);
        assert_eq!(source.trim(&Retention::max_age(widest)).await.expect("trim"), 2);
        assert_eq!(kept(&source).await, [0, i64::MAX]);
    }
}

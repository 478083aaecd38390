//! The Postgres [`CompletionSource`]: gap-safe batched reads of the outbox and a LISTEN waker.

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::{COMPLETION_CHANNEL, LISTENER_APPLICATION_NAME, connect_options, connect_pool};
use crate::backends::outbox::OutboxRow;
use crate::backends::{Batch, CompletionSource, Positioned, StartAt, Wake, Waker};
use crate::config::{BackendConfig, BackendConnection, PostgresConnection, Retention};
use crate::cursor::{Position, StreamCursor, decode_postgres_cursor, encode_postgres_cursor};
use crate::error::EngineError;
use crate::event::CompletionEvent;
use crate::types::TimestampMs;

/// Rows after `($1, $2)` in `(txid, event_id)` order, each flagged with whether it is below the
/// horizon (readable now) or held back by a transaction still in progress; plus, when history
/// after `($1, $2)` was trimmed, one marker row (kind 1) at the trimmed boundary.
const READ_AFTER: &str = "\
(SELECT 0, txid::text::int8, event_id, execution_id::text, flow_id::text, outcome, namespace, instance_tag, \
        tags::text, occurred_at_ms, partition_key::int4, txid < pg_snapshot_xmin(pg_current_snapshot()) \
   FROM ff_completion_event \
  WHERE (txid, event_id) > ($1::int8::text::xid8, $2::int8) \
  ORDER BY txid, event_id \
  LIMIT $3) \
UNION ALL \
(SELECT 1, trimmed_txid::text::int8, trimmed_event_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL::int8, NULL::int4, true \
   FROM ff_completion_retention \
  WHERE (trimmed_txid, trimmed_event_id) > ($1::int8::text::xid8, $2::int8))";

/// The trimmed boundary, if anything was ever trimmed.
const TRIMMED: &str = "SELECT trimmed_txid::text::int8, trimmed_event_id FROM ff_completion_retention";

/// The newest readable row.
const TAIL: &str = "\
SELECT txid::text::int8, event_id FROM ff_completion_event \
 WHERE txid < pg_snapshot_xmin(pg_current_snapshot()) \
 ORDER BY txid DESC, event_id DESC LIMIT 1";

/// Where an `event_id`-only cursor resumes: below every row after it and below the horizon.
const LEGACY_START: &str = "\
SELECT LEAST((SELECT min(txid) FROM ff_completion_event WHERE event_id > $1), \
             pg_snapshot_xmin(pg_current_snapshot()))::text::int8";

type Row = (
    i32,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i32>,
    bool,
);

/// Reads the outbox; opens LISTEN connections.
pub(crate) struct PostgresSource {
    pool: PgPool,
    config: BackendConfig,
}

impl PostgresSource {
    pub(crate) async fn connect(config: &BackendConfig) -> Result<Self, EngineError> {
        Ok(Self { pool: connect_pool(config, 4).await?, config: config.clone() })
    }

    async fn trimmed(&self) -> Result<Option<Position>, EngineError> {
        let row: Option<(i64, i64)> = sqlx::query_as(TRIMMED)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| EngineError::from_sqlx("postgres retention", e))?;
        Ok(row.map(|(t, e)| pos(t, e)))
    }
}

fn pos(txid: i64, event_id: i64) -> Position {
    Position::new(txid as u64, event_id as u64)
}

/// Decodes one outbox row; the error names what is wrong with it.
fn decode_row(row: &Row) -> Result<CompletionEvent, String> {
    let (_, txid, event_id, execution_id, flow_id, outcome, namespace, instance_tag, tags, at, partition, _) = row;
    OutboxRow {
        execution_id: execution_id.clone(),
        flow_id: flow_id.clone(),
        outcome: outcome.clone(),
        namespace: namespace.clone(),
        instance_tag: instance_tag.clone(),
        tags: tags.clone(),
        occurred_at_ms: *at,
        partition_key: partition.map(i64::from),
    }
    .decode(encode_postgres_cursor(*txid as u64, *event_id))
}

#[async_trait]
impl CompletionSource for PostgresSource {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn cursor_of(&self, pos: Position) -> StreamCursor {
        encode_postgres_cursor(pos.hi, pos.lo as i64)
    }

    async fn resolve_start(&self, cursor: &StreamCursor) -> Result<StartAt, EngineError> {
        match decode_postgres_cursor(cursor)? {
            None => Ok(StartAt::after(self.tail().await?)),
            Some(c) => match c.txid {
                Some(txid) => {
                    let after = Position::new(txid, c.event_id as u64);
                    match self.trimmed().await? {
                        Some(trimmed) if after < trimmed => {
                            Err(EngineError::CursorExpired { oldest: Some(self.cursor_of(trimmed)) })
                        }
                        _ => Ok(StartAt::after(after)),
                    }
                }
                None => {
                    let start: i64 = sqlx::query_scalar(LEGACY_START)
                        .bind(c.event_id)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(|e| EngineError::from_sqlx("postgres resolve cursor", e))?;
                    Ok(StartAt {
                        after: Position::new((start as u64).saturating_sub(1), i64::MAX as u64),
                        lo_floor: Some(c.event_id as u64),
                    })
                }
            },
        }
    }

    async fn tail(&self) -> Result<Position, EngineError> {
        let row: Option<(i64, i64)> = sqlx::query_as(TAIL)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| EngineError::from_sqlx("postgres tail", e))?;
        Ok(row.map(|(t, e)| pos(t, e)).unwrap_or(Position::ZERO))
    }

    async fn read_after(&self, after: Position, limit: usize) -> Result<Batch, EngineError> {
        let rows: Vec<Row> = sqlx::query_as(READ_AFTER)
            .bind(after.hi as i64)
            .bind(after.lo as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| EngineError::from_sqlx("postgres read", e))?;
        let mut batch = Batch { start: after, end: after, ..Batch::default() };
        if let Some(marker) = rows.iter().find(|row| row.0 == 1) {
            batch.expired = Some(pos(marker.1, marker.2));
            return Ok(batch);
        }
        let mut readable = 0;
        for row in &rows {
            if !row.11 {
                batch.held_back = true;
                break;
            }
            readable += 1;
            let p = pos(row.1, row.2);
            batch.end = p;
            match decode_row(row) {
                Ok(event) => batch.events.push(Positioned { pos: p, event }),
                Err(reason) => batch.skipped.push((p, reason)),
            }
        }
        batch.full = readable == limit;
        Ok(batch)
    }

    async fn gauges(&self) -> Result<Vec<(&'static str, f64)>, EngineError> {
        let (queue, held_back): (f64, i64) = sqlx::query_as(
            "SELECT pg_notification_queue_usage(), \
                    (SELECT count(*) FROM ff_completion_event WHERE txid >= pg_snapshot_xmin(pg_current_snapshot()))",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| EngineError::from_sqlx("postgres gauges", e))?;
        Ok(vec![("notification_queue_usage", queue), ("held_back_rows", held_back as f64)])
    }

    async fn trim(&self, retention: &Retention) -> Result<u64, EngineError> {
        let before_ms = retention.max_age.map(|age| TimestampMs::now().0 - age.as_millis() as i64);
        let keep = retention.max_events.map(|n| n.min(i64::MAX as u64) as i64);
        let removed: i64 = sqlx::query_scalar("SELECT ff_trim_completions($1, $2)")
            .bind(before_ms)
            .bind(keep)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| EngineError::from_sqlx("postgres trim", e))?;
        Ok(removed.max(0) as u64)
    }

    async fn open_waker(&self, _from: Position) -> Result<Box<dyn Waker>, EngineError> {
        if let BackendConnection::Postgres(PostgresConnection { poll_interval: Some(every), .. }) =
            &self.config.connection
        {
            tracing::info!(?every, "postgres listener in poll-only mode (no LISTEN)");
            return Ok(Box::new(PollWaker { every: *every }));
        }
        let options = connect_options(&self.config)?.application_name(LISTENER_APPLICATION_NAME);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(self.config.timeouts.connect_or_default())
            .connect_with(options)
            .await
            .map_err(|e| EngineError::from_sqlx("postgres listen connect", e))?;
        let mut listener =
            PgListener::connect_with(&pool).await.map_err(|e| EngineError::from_sqlx("postgres listen connect", e))?;
        listener.listen(COMPLETION_CHANNEL).await.map_err(|e| EngineError::from_sqlx("postgres LISTEN", e))?;
        Ok(Box::new(PostgresWaker { listener, _pool: pool }))
    }
}

/// LISTEN on a dedicated connection. `try_recv()` returns `Ok(None)` once after it re-made a
/// lost connection (notifications sent meanwhile are gone): that is a wake to catch up.
struct PostgresWaker {
    listener: PgListener,
    _pool: PgPool,
}

#[async_trait]
impl Waker for PostgresWaker {
    async fn wait(&mut self) -> Result<Wake, EngineError> {
        match self.listener.try_recv().await {
            Ok(Some(_)) => {
                while self.listener.next_buffered().is_some() {}
                Ok(Wake::Notified)
            }
            Ok(None) => Ok(Wake::Reconnected),
            Err(e) => Err(EngineError::from_sqlx("postgres LISTEN", e)),
        }
    }
}

/// Poll-only mode: wakes the listener every `every`, with no LISTEN connection at all.
struct PollWaker {
    every: std::time::Duration,
}

#[async_trait]
impl Waker for PollWaker {
    async fn wait(&mut self) -> Result<Wake, EngineError> {
        tokio::time::sleep(self.every).await;
        Ok(Wake::Notified)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn good_row() -> Row {
        (
            0,
            900,
            7,
            Some("6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b".into()),
            None,
            Some("success".into()),
            Some("ns".into()),
            Some("inst=1".into()),
            Some(r#"{"k":"v","n":3}"#.into()),
            Some(1),
            Some(5),
            true,
        )
    }

    #[test]
    fn a_good_row_decodes_with_tags_from_both_columns() {
        let event = decode_row(&good_row()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.execution_id.partition(), 5);
        assert_eq!(event.tags.get("inst").map(String::as_str), Some("1"));
        assert_eq!(event.tags.get("n").map(String::as_str), Some("3"));
        assert_eq!(
            decode_postgres_cursor(&event.cursor).ok().flatten().map(|c| (c.txid, c.event_id)),
            Some((Some(900), 7))
        );
    }

    #[test]
    fn each_kind_of_bad_row_names_what_is_wrong() {
        type Damage = Box<dyn Fn(&mut Row)>;
        let cases: Vec<(Damage, &str)> = vec![
            (Box::new(|r| r.3 = None), "execution_id is NULL"),
            (Box::new(|r| r.3 = Some("nope".into())), "execution_id"),
            (Box::new(|r| r.10 = Some(256)), "out of range"),
            (Box::new(|r| r.10 = Some(-1)), "out of range"),
            (Box::new(|r| r.5 = Some(String::new())), "outcome"),
            (Box::new(|r| r.9 = None), "occurred_at_ms"),
            (Box::new(|r| r.8 = Some("[1]".into())), "not a JSON object"),
            (Box::new(|r| r.8 = Some("{".into())), "tags"),
            (Box::new(|r| r.4 = Some("x".into())), "flow_id"),
        ];
        for (spoil, says) in cases {
            let mut row = good_row();
            spoil(&mut row);
            match decode_row(&row) {
                Err(reason) => assert!(reason.contains(says), "{reason} should mention {says}"),
                Ok(_) => panic!("a row that should mention {says} decoded"),
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_rows_decode_or_fail_cleanly(
            id in proptest::option::of(".{0,40}"),
            flow in proptest::option::of(".{0,40}"),
            outcome in proptest::option::of(".{0,20}"),
            ns in proptest::option::of(".{0,20}"),
            tag in proptest::option::of(".{0,20}"),
            tags in proptest::option::of(".{0,40}"),
            at in proptest::option::of(proptest::num::i64::ANY),
            partition in proptest::option::of(proptest::num::i32::ANY),
        ) {
            let row: Row = (0, 1, 1, id, flow, outcome, ns, tag, tags, at, partition, true);
            let _ = decode_row(&row);
        }
    }
}

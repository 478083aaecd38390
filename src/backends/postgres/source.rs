//! The Postgres [`CompletionSource`]: gap-safe batched reads of the outbox and a LISTEN waker.

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::{COMPLETION_CHANNEL, LISTENER_APPLICATION_NAME, connect_options, connect_pool};
use crate::backends::outbox::{OutboxRow, age_cutoff_ms};
use crate::backends::{Batch, CompletionSource, Positioned, StartAt, Wake, Waker};
use crate::config::{BackendConfig, BackendConnection, PostgresConnection, Retention};
use crate::cursor::{Position, PostgresCursor, StreamCursor, decode_postgres_cursor, encode_postgres_cursor};
use crate::error::EngineError;
use crate::event::CompletionEvent;
use crate::types::TimestampMs;

/// Rows after `($1, $2)` in `(txid, event_id)` order, each flagged with whether it is below the
/// horizon (readable now) or held back by a transaction still in progress; plus, when history
/// after `($1, $2)` was trimmed, one marker row (kind 1) at the trimmed boundary. Columns are
/// qualified: an unqualified `ORDER BY txid` would sort by the `txid::text::int8` output column,
/// which no index serves (a full scan and sort of the outbox on every read).
const READ_AFTER: &str = "\
(SELECT 0, e.txid::text::int8, e.event_id, e.execution_id::text, e.flow_id::text, e.outcome, e.namespace, \
        e.instance_tag, e.tags::text, e.occurred_at_ms, e.partition_key::int4, \
        e.txid < pg_snapshot_xmin(pg_current_snapshot()) \
   FROM ff_completion_event e \
  WHERE (e.txid, e.event_id) > ($1::int8::text::xid8, $2::int8) \
  ORDER BY e.txid, e.event_id \
  LIMIT $3) \
UNION ALL \
(SELECT 1, trimmed_txid::text::int8, trimmed_event_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL::int8, NULL::int4, true \
   FROM ff_completion_retention \
  WHERE (trimmed_txid, trimmed_event_id) > ($1::int8::text::xid8, $2::int8))";

/// The trimmed boundary and the highest event_id trimmed (NULL: unknown), if anything was ever
/// trimmed.
const TRIMMED: &str =
    "SELECT trimmed_txid::text::int8, trimmed_event_id, trimmed_max_event_id FROM ff_completion_retention";

/// The newest readable row.
const TAIL: &str = "\
SELECT e.txid::text::int8, e.event_id FROM ff_completion_event e \
 WHERE e.txid < pg_snapshot_xmin(pg_current_snapshot()) \
 ORDER BY e.txid DESC, e.event_id DESC LIMIT 1";

/// Notification queue usage, and the rows held back by an open transaction, counted along the
/// `(txid, event_id)` index up to 100,000 (so the gauge never scans a large outbox).
const HELD_BACK_GAUGES: &str = "\
SELECT pg_notification_queue_usage(), \
       (SELECT count(*) FROM (SELECT 1 FROM ff_completion_event e \
                               WHERE e.txid >= pg_snapshot_xmin(pg_current_snapshot()) \
                               ORDER BY e.txid LIMIT 100000) held)";

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

    async fn trimmed(&self) -> Result<Option<Trimmed>, EngineError> {
        let row: Option<(i64, i64, Option<i64>)> = sqlx::query_as(TRIMMED)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| EngineError::from_sqlx("postgres retention", e))?;
        Ok(row.map(|(t, e, max_event_id)| Trimmed { boundary: pos(t, e), max_event_id }))
    }
}

/// What the trim job removed: every row up to `boundary` in reader order.
struct Trimmed {
    boundary: Position,
    /// The highest event_id removed; `None` when trimming ran before it was recorded.
    max_event_id: Option<i64>,
}

impl Trimmed {
    /// Whether a subscriber at `cursor` may have missed a trimmed row. A `(txid, event_id)`
    /// cursor compares with the boundary; an event_id-only one (which knows no transaction)
    /// with the highest event_id removed.
    fn expires(&self, cursor: &PostgresCursor) -> bool {
        match cursor.txid {
            Some(txid) => Position::new(txid, cursor.event_id as u64) < self.boundary,
            None => self.max_event_id.is_none_or(|max| max > cursor.event_id),
        }
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
        let Some(c) = decode_postgres_cursor(cursor)? else {
            return Ok(StartAt::after(self.tail().await?));
        };
        let trimmed = self.trimmed().await?;
        if let Some(trimmed) = trimmed.as_ref().filter(|t| t.expires(&c)) {
            return Err(EngineError::CursorExpired { oldest: Some(self.cursor_of(trimmed.boundary)) });
        }
        match c.txid {
            Some(txid) => Ok(StartAt::after(Position::new(txid, c.event_id as u64))),
            None => {
                let start: i64 = sqlx::query_scalar(LEGACY_START)
                    .bind(c.event_id)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| EngineError::from_sqlx("postgres resolve cursor", e))?;
                let after = Position::new((start as u64).saturating_sub(1), i64::MAX as u64);
                // Every trimmed row was seen (checked above): start after them.
                let after = trimmed.map_or(after, |t| after.max(t.boundary));
                Ok(StartAt { after, lo_floor: Some(c.event_id as u64) })
            }
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
        let (queue, held_back): (f64, i64) = sqlx::query_as(HELD_BACK_GAUGES)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| EngineError::from_sqlx("postgres gauges", e))?;
        Ok(vec![("notification_queue_usage", queue), ("held_back_rows", held_back as f64)])
    }

    async fn trim(&self, retention: &Retention) -> Result<u64, EngineError> {
        let before_ms = retention.max_age.map(|age| age_cutoff_ms(TimestampMs::now(), age));
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
    use crate::backends::outbox::wild;
    use crate::event::CompletionOutcome;
    use crate::types::ExecutionId;

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

    /// One change to a valid row: a text column, the time, the partition or the position.
    #[derive(Clone, Debug)]
    enum Change {
        Text(usize, Option<String>),
        At(Option<i64>),
        Partition(Option<i32>),
        Position(i64, i64),
    }

    fn change() -> impl Strategy<Value = Change> {
        let at = prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), Just(0), Just(-1)];
        let partition = prop_oneof![any::<i32>(), 0i32..256, Just(i32::MIN), Just(i32::MAX), Just(256), Just(-1)];
        prop_oneof![
            (3usize..=8, proptest::option::of(wild::text())).prop_map(|(i, v)| Change::Text(i, v)),
            proptest::option::of(at).prop_map(Change::At),
            proptest::option::of(partition).prop_map(Change::Partition),
            (any::<i64>(), any::<i64>()).prop_map(|(t, e)| Change::Position(t, e)),
        ]
    }

    fn apply(row: &mut Row, change: Change) {
        match change {
            Change::Text(3, v) => row.3 = v,
            Change::Text(4, v) => row.4 = v,
            Change::Text(5, v) => row.5 = v,
            Change::Text(6, v) => row.6 = v,
            Change::Text(7, v) => row.7 = v,
            Change::Text(_, v) => row.8 = v,
            Change::At(v) => row.9 = v,
            Change::Partition(v) => row.10 = v,
            Change::Position(t, e) => (row.1, row.2) = (t, e),
        }
    }

    /// The columns the decoder must refuse the row for, by its documented rules.
    fn wrong_columns(row: &Row) -> Vec<&'static str> {
        let uuid = |s: &Option<String>| s.as_deref().and_then(|s| uuid::Uuid::parse_str(s).ok());
        let tags_ok = match row.8.as_deref() {
            None | Some("") => true,
            Some(t) => matches!(
                serde_json::from_str::<serde_json::Value>(t),
                Ok(serde_json::Value::Object(_) | serde_json::Value::Null)
            ),
        };
        let checks = [
            ("execution_id", uuid(&row.3).is_some()),
            ("flow_id", row.4.is_none() || uuid(&row.4).is_some()),
            ("outcome", row.5.as_deref().is_some_and(|o| !o.is_empty())),
            ("tags", tags_ok),
            ("occurred_at_ms", row.9.is_some()),
            ("partition_key", row.10.is_some_and(|p| (0..256).contains(&p))),
        ];
        checks.into_iter().filter(|(_, ok)| !ok).map(|(name, _)| name).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// A valid row with one or more columns dropped or replaced by wild values (extreme
        /// numbers, huge or unicode text, empty): it decodes to exactly its columns when they are
        /// still valid, and otherwise the error starts with the name of a column that is wrong.
        #[test]
        fn a_valid_row_with_wild_columns_decodes_to_them_or_names_a_wrong_one(
            changes in proptest::collection::vec(change(), 1..5),
        ) {
            let mut row = good_row();
            for c in changes {
                apply(&mut row, c);
            }
            let wrong = wrong_columns(&row);
            match decode_row(&row) {
                Ok(event) => {
                    prop_assert!(wrong.is_empty(), "decoded although {wrong:?} are wrong");
                    let uuid = row.3.as_deref().and_then(|s| uuid::Uuid::parse_str(s).ok());
                    let partition = row.10.and_then(|p| u16::try_from(p).ok());
                    prop_assert_eq!(Some(event.execution_id), uuid.zip(partition).map(|(u, p)| ExecutionId::from_parts(p, u)));
                    prop_assert_eq!(event.flow_id.map(|f| f.to_string()), row.4.as_deref().and_then(|f| uuid::Uuid::parse_str(f).ok()).map(|u| u.to_string()));
                    prop_assert_eq!(Some(event.outcome.clone()), row.5.as_deref().map(CompletionOutcome::from_wire));
                    prop_assert_eq!(event.namespace.as_ref().map(|n| n.as_str()), row.6.as_deref());
                    prop_assert_eq!(Some(event.at), row.9.map(TimestampMs));
                    if let Some((key, _)) = row.7.as_deref().and_then(|t| t.split_once('=')) {
                        prop_assert!(event.tags.contains_key(key), "instance tag {key:?} missing");
                    }
                    if let Some(Ok(serde_json::Value::Object(map))) = row.8.as_deref().map(serde_json::from_str::<serde_json::Value>) {
                        prop_assert!(map.keys().all(|k| event.tags.contains_key(k)), "a JSON tag is missing");
                    }
                    if row.1 >= 0 && row.2 >= 0 {
                        let cursor = decode_postgres_cursor(&event.cursor).ok().flatten().map(|c| (c.txid, c.event_id));
                        prop_assert_eq!(cursor, Some((Some(row.1 as u64), row.2)));
                    }
                }
                Err(reason) => {
                    prop_assert!(!wrong.is_empty(), "a valid row was refused: {reason}");
                    prop_assert!(wrong.iter().any(|c| reason.starts_with(c)), "{reason:?} names none of {wrong:?}");
                    prop_assert!(reason.len() < 1000, "a reason of {} bytes", reason.len());
                }
            }
        }
    }
}

//! The Postgres [`CompletionSource`]: batches between recorded snapshots (completions from the
//! outbox, lease history and signal delivery from `ff_completion_family_event`, in one order),
//! and a LISTEN waker that also polls adaptively.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::statements::{Purpose, session_options};
use super::{Db, connect_db, direct_options};
use tokio::sync::{mpsc, watch};

use super::{COMPLETION_CHANNEL, LISTENER_APPLICATION_NAME};
use crate::backends::outbox::{FamilyColumns, OutboxRow};
use crate::backends::seam::{Batch, CompletionSource, FamilyEvent, Positioned, ReadPosition, StartAt, Wake, Waker};
use crate::config::{BackendConfig, BackendConnection, PostgresConnection, Retention};
use crate::cursor::{
    Frontier, Position, PostgresCursor, StreamCursor, decode_postgres_cursor, encode_postgres_tick_cursor,
};
use crate::error::Error;
use crate::family::Family;
use tokio_util::task::AbortOnDropHandle;

/// Up to `$6` rows after position `($1, $2, $3, $4)` (batch, txid, event_id, partition key word)
/// in reader order, crossing into later batches; `$5`, when not NULL, is the fingerprint of the
/// position's tick (`ff_completions_read` in
/// `migrations/postgres/0007_operations.sql`). Kinds: 0 a row; 1 history after the position was
/// trimmed, up to the marker's position; 2 the end of a batch; 3 more is waiting; 4 the
/// position's tick is not this database's (the marker: where its history goes on).
const READ_AFTER: &str = "\
SELECT o_kind AS kind, o_txid AS txid, o_event_id AS event_id, o_fingerprint AS fingerprint, \
       o_execution_id AS execution_id, o_flow_id AS flow_id, o_outcome AS outcome, o_namespace AS namespace, \
       o_instance_tag AS instance_tag, o_tags AS tags, o_occurred_at_ms AS occurred_at_ms, \
       o_partition_key AS partition_key, o_major AS major, o_family AS family, o_fields AS fields, \
       o_traceparent AS traceparent \
  FROM ff_completions_read($1, $2, $3, $4, $5, $6)";

/// The newest tick, recording one when a transaction committed since the previous, and its
/// fingerprint.
const HEAD: &str = "SELECT o_tick, o_fingerprint FROM ff_completions_head()";

/// Whether a position in the batch of tick `$1`, read under fingerprint `$2`, can be read here:
/// `ok`, `retired`, `missing`, `gone` (removed by retention) or `different`, and why.
const CHECK_TICK: &str = "SELECT o_verdict, o_reason FROM ff_completions_check_tick($1, $2)";

/// The retention cut in reader order (NULL: nothing cut since positions had batches), the
/// highest `(txid, event_id)` and `event_id` removed (for cursors of the earlier forms; NULL:
/// unknown).
const TRIMMED: &str = "\
SELECT cut_major, cut_txid, cut_event_id, cut_key, trimmed_txid::text::int8, trimmed_event_id, trimmed_max_event_id \
  FROM ff_completion_retention";

/// Where a cursor of an earlier form resumes.
const RESUME_EARLIER_FORM: &str =
    "SELECT o_major, o_txid, o_event_id, o_fingerprint FROM ff_completions_resume_earlier_form($1, $2)";

/// Plans retention: records the cut first (`ff_completions_trim_plan`).
const TRIM_PLAN: &str = "SELECT ff_completions_trim_plan($1, $2)";

/// Deletes one small transaction's worth of rows below the cut; 0 when nothing is left.
const TRIM_STEP: &str = "SELECT o_rows, o_done FROM ff_completions_trim_step($1)";

/// Rows per retention step: each is its own short transaction, so readers and producers never
/// wait long behind it.
const TRIM_STEP_ROWS: i32 = 5_000;

/// Notification queue usage, and how many transactions the newest tick saw in progress.
const GAUGES: &str = "\
SELECT pg_notification_queue_usage(), \
       coalesce((SELECT count(*) FROM (SELECT pg_snapshot_xip(t.snapshot) FROM ff_completion_tick t \
                                        ORDER BY t.tick_id DESC LIMIT 1) xip), 0)";

/// Batch positions: `3k` is batch k, `3k + 1` batch k read whole, `3k + 2` the end of batch k.
const BATCH_END_PHASE: u64 = 2;

/// One row of [`READ_AFTER`]: an outbox row with its reader position, or a marker.
#[derive(Clone, Debug, sqlx::FromRow)]
struct Row {
    /// 0: an outbox row; 1: the trimmed marker; 3: more to read; 4: history lost; 2 only moves
    /// the position.
    kind: i32,
    txid: i64,
    event_id: i64,
    /// The fingerprint of the tick of the row's batch (NULL: the tick is gone).
    fingerprint: Option<i64>,
    execution_id: Option<String>,
    flow_id: Option<String>,
    /// A row's outcome or kind; a lost-history marker's reason (`missing` or `different`).
    outcome: Option<String>,
    namespace: Option<String>,
    instance_tag: Option<String>,
    tags: Option<String>,
    occurred_at_ms: Option<i64>,
    partition_key: Option<i32>,
    major: i64,
    /// `NULL` for a completion (a row of the outbox); else a row of `ff_completion_family_event`.
    family: Option<String>,
    /// That row's other columns as one JSON array (see [`FamilyColumns::from_json_fields`]).
    fields: Option<String>,
    /// The producer's W3C trace context (`NULL` when it recorded none).
    traceparent: Option<String>,
}

impl Row {
    fn position(&self) -> Position {
        pos(self.major, self.txid, self.event_id, self.partition_key, self.fingerprint)
    }
}

/// Reads the outbox; opens LISTEN connections.
pub(crate) struct PostgresSource {
    pub(super) db: Db,
    config: BackendConfig,
    /// Counts reads that found rows: the listening waker polls sooner while it moves.
    activity: Arc<AtomicU64>,
    /// Counts reads started: the listening waker hands out a new wake-up only once a read has
    /// started since its last one, so wake-ups never pile up behind a slow read.
    reads_started: watch::Sender<u64>,
}

impl PostgresSource {
    pub(crate) async fn connect(config: &BackendConfig) -> Result<Self, Error> {
        Ok(Self {
            db: connect_db(config, 4).await?,
            config: config.clone(),
            activity: Arc::default(),
            reads_started: watch::Sender::new(0),
        })
    }

    async fn trimmed(&self) -> Result<Option<Trimmed>, Error> {
        type Words = (Option<i64>, Option<i64>, Option<i64>, Option<i32>, i64, i64, Option<i64>);
        let query = self.db.query_as::<Words>(TRIMMED);
        let row = self.db.run("postgres retention", |conn| Box::pin(query.fetch_optional(conn))).await?;
        Ok(row.map(|(major, txid, event_id, cut_key, earlier_txid, earlier_event_id, max_event_id)| Trimmed {
            cut: major.map(|m| pos(m, txid.unwrap_or(0), event_id.unwrap_or(0), cut_key, None)),
            earlier_form: (earlier_txid.max(0) as u64, earlier_event_id),
            max_event_id,
        }))
    }

    /// The head of the history: the newest tick (recorded now if anything committed since).
    async fn head(&self) -> Result<Position, Error> {
        let query = self.db.query_as::<(i64, Option<i64>)>(HEAD);
        let (tick, fingerprint) = self.db.run("postgres tail", |conn| Box::pin(query.fetch_one(conn))).await?;
        Ok(batch_end(tick.max(0) as u64, fingerprint))
    }

    /// Whether `position`'s tick is this database's: `Ok(None)` when it is, `Ok(Some(err))`
    /// (a [`Error::CursorHistoryLost`]) when the history it was read in is not (missing,
    /// another tick, or a retired lineage's), `Ok(Some(verdict))` left to the retention check
    /// when retention removed the tick.
    async fn check_tick(&self, position: Position) -> Result<TickCheck, Error> {
        let tick = position.major / 3;
        let query = self
            .db
            .query_as::<(String, Option<String>)>(CHECK_TICK)
            .bind(as_i64(tick))
            .bind((position.check != 0).then_some(position.check as i64));
        let (verdict, reason) = self.db.run("postgres resolve cursor", |conn| Box::pin(query.fetch_one(conn))).await?;
        Ok(match verdict.as_str() {
            "ok" => TickCheck::Readable,
            "gone" => TickCheck::Trimmed,
            _ => TickCheck::Lost(Error::CursorHistoryLost {
                reason: reason.unwrap_or_else(|| format!("tick {tick} is not this database's")),
                tail: Some(cursor_at(self.head().await?)),
            }),
        })
    }
}

/// What a cursor's tick is in this database.
enum TickCheck {
    /// Its tick is here: the position reads as it did.
    Readable,
    /// Retention removed its tick: the cut says whether the position expired.
    Trimmed,
    /// The history it was read in is not this database's.
    Lost(Error),
}

/// What the trim job removed.
struct Trimmed {
    /// Positions below it may have lost rows (`None`: nothing cut since positions had batches).
    cut: Option<Position>,
    /// The highest `(txid, event_id)` removed (txid 1: history from before adoption): 17-byte
    /// cursors and positions in a batch read whole below it may have lost rows.
    earlier_form: (u64, i64),
    /// The highest event_id removed; `None` when trimming ran before it was recorded.
    max_event_id: Option<i64>,
}

impl Trimmed {
    /// Whether a subscriber at `cursor` may have missed a removed row: a batch cursor below the
    /// cut (or, reading a batch whole, below the highest `(txid, event_id)` removed); a
    /// `(txid, event_id)` cursor below the highest such pair removed; an event_id-only one
    /// (which knows no transaction) below the highest event_id removed.
    fn expires(&self, cursor: &PostgresCursor) -> bool {
        match (cursor.position(), cursor.txid) {
            (Some(position), _) => {
                self.cut.is_some_and(|cut| position < cut)
                    || (position.major % 3 == 1
                        && self.cut.is_some()
                        && (position.hi, position.postgres_event_id()) < self.earlier_form)
            }
            (None, Some(txid)) => (txid, cursor.event_id) < self.earlier_form,
            (None, None) => self.max_event_id.is_none_or(|max| max > cursor.event_id),
        }
    }

    /// The oldest position still held, for `CursorExpired`.
    fn oldest(&self) -> Position {
        self.cut.unwrap_or(Position::ZERO)
    }
}

/// The position after every row of batch `tick`.
fn batch_end(tick: u64, fingerprint: Option<i64>) -> Position {
    Position::postgres(
        tick.saturating_mul(3).saturating_add(BATCH_END_PHASE),
        0,
        0,
        Position::postgres_key_word(None),
        fingerprint.map_or(0, |f| f as u64),
    )
}

/// The position of SQL words `(major, txid, event_id, partition_key)` in a batch whose tick has
/// `fingerprint`.
fn pos(major: i64, txid: i64, event_id: i64, key: Option<i32>, fingerprint: Option<i64>) -> Position {
    let key = match key {
        Some(k) => i64::from(k),
        None => Position::postgres_key_word(None),
    };
    Position::postgres(major.max(0) as u64, txid.max(0) as u64, event_id, key, fingerprint.map_or(0, |f| f as u64))
}

fn as_i64(word: u64) -> i64 {
    word.min(i64::MAX as u64) as i64
}

/// Decodes one row of any family; the error names what is wrong with it.
fn decode_row(row: &Row) -> Result<FamilyEvent, String> {
    let outbox = OutboxRow {
        execution_id: row.execution_id.clone(),
        flow_id: row.flow_id.clone(),
        outcome: row.outcome.clone(),
        namespace: row.namespace.clone(),
        instance_tag: row.instance_tag.clone(),
        tags: row.tags.clone(),
        occurred_at_ms: row.occurred_at_ms,
        partition_key: row.partition_key.map(i64::from),
        traceparent: row.traceparent.clone(),
    };
    let cursor = cursor_at(row.position());
    match &row.family {
        None => outbox.decode(cursor).map(FamilyEvent::Completion),
        Some(family) => FamilyColumns::from_json_fields(family, row.fields.as_deref())?.decode(&outbox, cursor),
    }
}

/// The public cursor of a reader position.
fn cursor_at(p: Position) -> StreamCursor {
    encode_postgres_tick_cursor(p.major, p.hi, p.postgres_event_id(), p.postgres_key(), p.check)
}

/// What a lost-history marker's reason code means, for the operator.
fn lost_reason(code: Option<&str>, at: Position) -> String {
    let tick = at.major / 3;
    match code {
        Some("different") => format!(
            "tick {tick} is another tick in this database (restored from a backup older than the position, or failed over to a replica that missed it)"
        ),
        Some("retired") => format!(
            "tick {tick} belongs to a history of this database retired when it was found to be a copy (a restored dump or a logical copy)"
        ),
        _ => format!(
            "this database has no tick {tick} (restored from a backup or a dump older than the position, failed over to a replica that missed it, or another database)"
        ),
    }
}

#[async_trait]
impl CompletionSource for PostgresSource {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn cursor_of(&self, at: &Frontier) -> StreamCursor {
        cursor_at(at.single())
    }

    /// Every family: the outbox holds completions, `ff_completion_family_event` lease history
    /// and signal delivery, read in the same batches.
    fn produces(&self, _family: Family) -> bool {
        true
    }

    async fn resolve_start(&self, cursor: &StreamCursor) -> Result<StartAt, Error> {
        let Some(c) = decode_postgres_cursor(cursor)? else {
            return Ok(StartAt::after(self.tail().await?));
        };
        let checked = match c.position() {
            Some(position) => Some((position, self.check_tick(position).await?)),
            None => None,
        };
        if let Some((_, TickCheck::Lost(err))) = checked {
            return Err(err);
        }
        let trimmed = self.trimmed().await?;
        if let Some(trimmed) = trimmed.as_ref().filter(|t| t.expires(&c)) {
            return Err(Error::CursorExpired { oldest: Some(cursor_at(trimmed.oldest())) });
        }
        if let Some((position, check)) = checked {
            if matches!(check, TickCheck::Trimmed) {
                // Retention removed the tick without moving the cut past the position: only a
                // tick older than every kept batch, which no reader can still be in.
                return Err(Error::CursorExpired { oldest: trimmed.map(|t| cursor_at(t.oldest())) });
            }
            return Ok(StartAt::after(Frontier::at(position)));
        }
        // An earlier form: the whole batch of the newest tick, from the first row it had not seen.
        let query = self
            .db
            .query_as::<(i64, i64, i64, Option<i64>)>(RESUME_EARLIER_FORM)
            .bind(c.txid.map(as_i64))
            .bind(c.event_id);
        let (major, txid, event_id, fingerprint) =
            self.db.run("postgres resolve cursor", |conn| Box::pin(query.fetch_one(conn))).await?;
        let lo_floor = c.txid.is_none().then(|| Position::postgres(0, 0, c.event_id, 0, 0).lo);
        // Past every row of its event id (the earlier forms name no partition key).
        let after = Position {
            check: fingerprint.map_or(0, |f| f as u64),
            ..Position::postgres_without_key(major.max(0) as u64, txid.max(0) as u64, event_id)
        };
        let read_alone_until = Some(Frontier::at(batch_end(after.major / 3, fingerprint)));
        Ok(StartAt { after: Frontier::at(after), lo_floor, read_alone_until })
    }

    async fn tail(&self) -> Result<Frontier, Error> {
        Ok(Frontier::at(self.head().await?))
    }

    async fn read_after(&self, after: &Frontier, limit: usize) -> Result<Batch, Error> {
        let after = after.single();
        let limit = limit.clamp(1, i32::MAX as usize);
        self.reads_started.send_modify(|n| *n = n.wrapping_add(1));
        let query = self
            .db
            .query_as::<Row>(READ_AFTER)
            .bind(as_i64(after.major))
            .bind(as_i64(after.hi))
            .bind(after.postgres_event_id())
            .bind(after.postgres_key() as i32)
            .bind((after.check != 0).then_some(after.check as i64))
            .bind(limit as i32);
        let rows = self.db.run("postgres read", |conn| Box::pin(query.fetch_all(conn))).await?;
        let mut batch = Batch { start: Frontier::at(after), end: Frontier::at(after), ..Batch::default() };
        if let Some(marker) = rows.iter().find(|row| row.kind == 4) {
            batch.lost = Some((Frontier::at(marker.position()), lost_reason(marker.outcome.as_deref(), after)));
            return Ok(batch);
        }
        if let Some(marker) = rows.iter().find(|row| row.kind == 1) {
            batch.expired = Some(Frontier::at(marker.position()));
            return Ok(batch);
        }
        let mut read = 0;
        for row in &rows {
            let p = row.position();
            batch.end.advance(p);
            match row.kind {
                0 => {}
                3 => batch.full = true,
                _ => continue,
            }
            if row.kind != 0 {
                continue;
            }
            read += 1;
            match decode_row(row) {
                Ok(event) => batch.events.push(Positioned { pos: p, event }),
                Err(reason) => batch.skipped.push((p, reason)),
            }
        }
        if read > 0 {
            self.activity.fetch_add(1, Ordering::Relaxed);
        }
        batch.full |= read == limit;
        Ok(batch)
    }

    async fn gauges(&self) -> Result<Vec<(&'static str, f64)>, Error> {
        let query = self.db.query_as::<(f64, i64)>(GAUGES);
        let (queue, in_progress) = self.db.run("postgres gauges", |conn| Box::pin(query.fetch_one(conn))).await?;
        Ok(vec![("notification_queue_usage", queue), ("transactions_in_progress", in_progress as f64)])
    }

    /// Records the cut first (readers below it expire from then on), then deletes in small
    /// transactions of [`TRIM_STEP_ROWS`] rows, none under the tick lock: delivery goes on.
    async fn trim(&self, retention: &Retention) -> Result<u64, Error> {
        let max_age_ms = retention.max_age.map(|age| age.as_millis().min(i64::MAX as u128) as i64);
        let keep = retention.max_events.map(|n| n.min(i64::MAX as u64) as i64);
        let query = self.db.query_scalar::<Option<i64>>(TRIM_PLAN).bind(max_age_ms).bind(keep);
        let cut = self.db.run("postgres trim", |conn| Box::pin(query.fetch_one(conn))).await?;
        if cut.is_none() {
            return Ok(0);
        }
        let mut removed = 0u64;
        loop {
            let query = self.db.query_as::<(i64, bool)>(TRIM_STEP).bind(TRIM_STEP_ROWS);
            let (rows, done) = self.db.run("postgres trim", |conn| Box::pin(query.fetch_one(conn))).await?;
            removed += rows.max(0) as u64;
            if done {
                return Ok(removed);
            }
        }
    }

    async fn open_waker(&self, _read: ReadPosition) -> Result<Box<dyn Waker>, Error> {
        let poll = AdaptivePoll::new(self.activity.clone(), self.reads_started.subscribe());
        if let BackendConnection::Postgres(PostgresConnection { poll_interval: Some(every), .. }) =
            &self.config.connection
        {
            tracing::info!(?every, "postgres listener in poll-only mode (no LISTEN)");
            return Ok(Box::new(PollWaker { every: *every }));
        }
        // On the server itself: the split mode's direct URL, or the URL (never a pooler here).
        let options = session_options(
            direct_options(&self.config)?.application_name(LISTENER_APPLICATION_NAME),
            &self.config,
            false,
            Purpose::Tree,
        );
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(self.config.timeouts.connect_or_default())
            .connect_with(options)
            .await
            .map_err(|e| Error::from_sqlx("postgres listen connect", e))?;
        let mut listener =
            PgListener::connect_with(&pool).await.map_err(|e| Error::from_sqlx("postgres listen connect", e))?;
        listener.listen(COMPLETION_CHANNEL).await.map_err(|e| Error::from_sqlx("postgres LISTEN", e))?;
        Ok(Box::new(PostgresWaker::spawn(listener, pool, poll)))
    }
}

/// The shortest and longest pause between two polls of a listening waker.
pub(crate) const POLL_MIN: Duration = Duration::from_millis(2);
/// See [`POLL_MIN`]: a producer that sends no wake-up is read at most this long after it commits.
pub(crate) const POLL_MAX: Duration = Duration::from_millis(100);

/// Polling that follows the flow of completions: a few milliseconds while reads find rows,
/// doubling up to [`POLL_MAX`] while they find none. Producers that never send a wake-up are
/// still read promptly, and an idle listener costs ten cheap reads a second. At most one
/// wake-up is outstanding: the next waits until a read has started since the last.
struct AdaptivePoll {
    activity: Arc<AtomicU64>,
    seen: u64,
    pause: Duration,
    reads_started: watch::Receiver<u64>,
}

impl AdaptivePoll {
    fn new(activity: Arc<AtomicU64>, mut reads_started: watch::Receiver<u64>) -> Self {
        let seen = activity.load(Ordering::Relaxed);
        // The first wake-up needs no read before it.
        reads_started.mark_changed();
        Self { activity, seen, pause: POLL_MIN, reads_started }
    }

    /// Waits until a read has started since the previous wake-up (at once the first time). A
    /// source that is gone (the tree is stopping) never reads again: wait forever.
    async fn read_since_last_wake(&mut self) {
        if self.reads_started.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.reads_started.mark_unchanged();
    }

    /// The pause before the next poll, given whether reads found rows since the last one.
    fn next_pause(&mut self) -> Duration {
        let now = self.activity.load(Ordering::Relaxed);
        self.pause = if now != self.seen { POLL_MIN } else { (self.pause * 2).min(POLL_MAX) };
        self.seen = now;
        self.pause
    }
}

/// LISTEN on a dedicated connection, and adaptive polls between notifications. A task owns
/// the connection (a wait cut short by a poll never cuts a read short). `try_recv()` returns
/// `Ok(None)` once after it re-made a lost connection (notifications sent meanwhile are gone):
/// that is a wake to catch up.
struct PostgresWaker {
    notifications: mpsc::Receiver<Result<Wake, Error>>,
    poll: AdaptivePoll,
    _receiver: AbortOnDropHandle<()>,
}

impl PostgresWaker {
    fn spawn(mut listener: PgListener, pool: PgPool, poll: AdaptivePoll) -> Self {
        let (tx, notifications) = mpsc::channel(1);
        let receiver = tokio::spawn(async move {
            let _pool = pool;
            loop {
                let wake = match listener.try_recv().await {
                    Ok(Some(_)) => {
                        while listener.next_buffered().is_some() {}
                        Ok(Wake::Notified)
                    }
                    Ok(None) => Ok(Wake::Reconnected),
                    Err(e) => Err(Error::from_sqlx("postgres LISTEN", e)),
                };
                let failed = wake.is_err();
                if tx.send(wake).await.is_err() || failed {
                    return;
                }
            }
        });
        Self { notifications, poll, _receiver: AbortOnDropHandle::new(receiver) }
    }
}

#[async_trait]
impl Waker for PostgresWaker {
    async fn wait(&mut self) -> Result<Wake, Error> {
        self.poll.read_since_last_wake().await;
        let pause = self.poll.next_pause();
        tokio::select! {
            wake = self.notifications.recv() => {
                wake.unwrap_or_else(|| Err(Error::Actor { detail: "postgres LISTEN task ended".into() }))
            }
            () = tokio::time::sleep(pause) => Ok(Wake::Notified),
        }
    }
}

/// Poll-only mode: wakes the listener every `every`, with no LISTEN connection at all.
struct PollWaker {
    every: Duration,
}

#[async_trait]
impl Waker for PollWaker {
    async fn wait(&mut self) -> Result<Wake, Error> {
        tokio::time::sleep(self.every).await;
        Ok(Wake::Notified)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::backends::outbox::wild;
    use crate::event::{CompletionEvent, CompletionOutcome};
    use crate::types::ExecutionId;
    use crate::types::TimestampMs;

    fn good_row() -> Row {
        Row {
            kind: 0,
            txid: 900,
            event_id: 7,
            fingerprint: Some(77),
            execution_id: Some("6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b".into()),
            flow_id: None,
            outcome: Some("success".into()),
            namespace: Some("ns".into()),
            instance_tag: Some("inst=1".into()),
            tags: Some(r#"{"k":"v","n":3}"#.into()),
            occurred_at_ms: Some(1),
            partition_key: Some(5),
            major: 30,
            family: None,
            fields: None,
            traceparent: None,
        }
    }

    /// The completion a row of the outbox decodes to.
    fn decode_completion(row: &Row) -> Result<CompletionEvent, String> {
        match decode_row(row)? {
            FamilyEvent::Completion(event) => Ok(event),
            other => Err(format!("not a completion: {other:?}")),
        }
    }

    #[test]
    fn family_rows_decode_with_their_family_tagged_cursor_and_bad_ones_name_what_is_wrong() {
        let lease = Row {
            family: Some("lease_history".into()),
            outcome: Some("revoked".into()),
            fields: Some(r#"["l-1","w-1","ops",null,null,null]"#.into()),
            ..good_row()
        };
        let Ok(FamilyEvent::LeaseHistory(entry)) = decode_row(&lease) else { panic!("{:?}", decode_row(&lease)) };
        assert_eq!(entry.event.wire_kind(), "revoked");
        assert_eq!(entry.worker.as_ref().map(|w| w.as_str()), Some("w-1"));
        let signal = Row {
            family: Some("signal_delivery".into()),
            outcome: Some("buffered".into()),
            fields: Some(r#"[null,null,null,"s-1","wp",null]"#.into()),
            ..good_row()
        };
        let Ok(FamilyEvent::SignalDelivery(entry)) = decode_row(&signal) else { panic!("{:?}", decode_row(&signal)) };
        assert_eq!(entry.event.effect, crate::signal_delivery::SignalDeliveryEffect::Buffered);
        for (row, says) in [
            (Row { outcome: Some("stolen".into()), ..lease.clone() }, "lease history kind"),
            (Row { fields: Some("{".into()), ..lease.clone() }, "family columns"),
            (Row { fields: None, ..signal.clone() }, "signal_id"),
            (Row { family: Some("instance_tags".into()), ..signal }, "family"),
        ] {
            match decode_row(&row) {
                Err(reason) => assert!(reason.contains(says), "{reason} should mention {says}"),
                Ok(event) => panic!("a row that should mention {says} decoded: {event:?}"),
            }
        }
    }

    #[test]
    fn a_good_row_decodes_with_tags_from_both_columns() {
        let event = decode_completion(&good_row()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.execution_id.partition(), 5);
        assert_eq!(event.tags.get("inst").map(String::as_str), Some("1"));
        assert_eq!(event.tags.get("n").map(String::as_str), Some("3"));
        assert_eq!(
            decode_postgres_cursor(&event.cursor).ok().flatten().map(|c| (c.batch, c.txid, c.event_id)),
            Some((Some(30), Some(900), 7))
        );
    }

    #[test]
    fn each_kind_of_bad_row_names_what_is_wrong() {
        type Damage = Box<dyn Fn(&mut Row)>;
        let cases: Vec<(Damage, &str)> = vec![
            (Box::new(|r| r.execution_id = None), "execution_id is NULL"),
            (Box::new(|r| r.execution_id = Some("nope".into())), "execution_id"),
            (Box::new(|r| r.partition_key = Some(256)), "out of range"),
            (Box::new(|r| r.partition_key = Some(-1)), "out of range"),
            (Box::new(|r| r.outcome = Some(String::new())), "outcome"),
            (Box::new(|r| r.occurred_at_ms = None), "occurred_at_ms"),
            (Box::new(|r| r.tags = Some("[1]".into())), "not a JSON object"),
            (Box::new(|r| r.tags = Some("{".into())), "tags"),
            (Box::new(|r| r.flow_id = Some("x".into())), "flow_id"),
        ];
        for (spoil, says) in cases {
            let mut row = good_row();
            spoil(&mut row);
            match decode_completion(&row) {
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
            Change::Text(3, v) => row.execution_id = v,
            Change::Text(4, v) => row.flow_id = v,
            Change::Text(5, v) => row.outcome = v,
            Change::Text(6, v) => row.namespace = v,
            Change::Text(7, v) => row.instance_tag = v,
            Change::Text(_, v) => row.tags = v,
            Change::At(v) => row.occurred_at_ms = v,
            Change::Partition(v) => row.partition_key = v,
            Change::Position(t, e) => (row.txid, row.event_id) = (t, e),
        }
    }

    /// The columns the decoder must refuse the row for, by its documented rules.
    fn wrong_columns(row: &Row) -> Vec<&'static str> {
        let uuid = |s: &Option<String>| s.as_deref().and_then(|s| uuid::Uuid::parse_str(s).ok());
        let tags_ok = match row.tags.as_deref() {
            None | Some("") => true,
            Some(t) => matches!(
                serde_json::from_str::<serde_json::Value>(t),
                Ok(serde_json::Value::Object(_) | serde_json::Value::Null)
            ),
        };
        let checks = [
            ("execution_id", uuid(&row.execution_id).is_some()),
            ("flow_id", row.flow_id.is_none() || uuid(&row.flow_id).is_some()),
            ("outcome", row.outcome.as_deref().is_some_and(|o| !o.is_empty())),
            ("tags", tags_ok),
            ("occurred_at_ms", row.occurred_at_ms.is_some()),
            ("partition_key", row.partition_key.is_some_and(|p| (0..256).contains(&p))),
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
            match decode_completion(&row) {
                Ok(event) => {
                    prop_assert!(wrong.is_empty(), "decoded although {wrong:?} are wrong");
                    let uuid = row.execution_id.as_deref().and_then(|s| uuid::Uuid::parse_str(s).ok());
                    let partition = row.partition_key.and_then(|p| u16::try_from(p).ok());
                    prop_assert_eq!(Some(event.execution_id), uuid.zip(partition).map(|(u, p)| ExecutionId::from_parts(p, u)));
                    prop_assert_eq!(event.flow_id.map(|f| f.to_string()), row.flow_id.as_deref().and_then(|f| uuid::Uuid::parse_str(f).ok()).map(|u| u.to_string()));
                    prop_assert_eq!(Some(event.outcome.clone()), row.outcome.as_deref().map(CompletionOutcome::from_wire));
                    prop_assert_eq!(event.namespace.as_ref().map(|n| n.as_str()), row.namespace.as_deref());
                    prop_assert_eq!(Some(event.at), row.occurred_at_ms.map(TimestampMs));
                    if let Some((key, _)) = row.instance_tag.as_deref().and_then(|t| t.split_once('=')) {
                        prop_assert!(event.tags.contains_key(key), "instance tag {key:?} missing");
                    }
                    if let Some(Ok(serde_json::Value::Object(map))) = row.tags.as_deref().map(serde_json::from_str::<serde_json::Value>) {
                        prop_assert!(map.keys().all(|k| event.tags.contains_key(k)), "a JSON tag is missing");
                    }
                    if row.txid >= 0 && row.event_id >= 0 {
                        let cursor = decode_postgres_cursor(&event.cursor).ok().flatten().map(|c| (c.batch, c.txid, c.event_id));
                        prop_assert_eq!(cursor, Some((Some(row.major as u64), Some(row.txid as u64), row.event_id)));
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

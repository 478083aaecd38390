//! The Valkey [`CompletionSource`]: reads after a cursor through the library's read-only
//! `ff_read_after` (the entries and what was trimmed, in one atomic look), and a waker that runs
//! `XREAD BLOCK` on its own connection and hands the listener what it read.
//!
//! Trimming (`MAXLEN ~` in the producers, `XTRIM` by the retention job) removes entries from the
//! head, so a reader whose cursor is below the first kept entry, once anything was removed, may
//! have lost entries: it gets [`EngineError::CursorExpired`] (on subscribe) or an `expired`
//! batch (while reading), never a silent skip. Two consequences: a cursor at exactly the last
//! trimmed entry is reported expired too (the stream keeps no record that nothing after it was
//! lost), and entries removed on purpose with `XDEL` are not reported.

use std::time::Duration;

use async_trait::async_trait;
use ferriskey::{Client, Value};

use super::library::{connect_client, ensure_library, fcall, map_err};
use super::stream::{RawEntry, ReadView, decode_entry, format_id, parse_id, read_entries, read_view};
use super::{LISTENER_CLIENT_NAME, STREAM_KEY};
use crate::backends::outbox::{age_cutoff_ms, shown};
use crate::backends::{Batch, CompletionSource, Positioned, StartAt, Wake, Waker};
use crate::config::{BackendConfig, Retention};
use crate::cursor::{Position, StreamCursor, decode_valkey_cursor, encode_valkey_cursor};
use crate::error::EngineError;
use crate::types::TimestampMs;

/// How long one blocking read waits before it asks again.
const BLOCK: Duration = Duration::from_millis(1000);

/// Entries one blocking read returns at most.
const WAKE_COUNT: usize = 512;

/// Reads the completion stream of one server.
pub(crate) struct ValkeySource {
    client: Client,
    config: BackendConfig,
}

impl ValkeySource {
    /// Connects the shared reader client and loads the function library if needed.
    pub(crate) async fn connect(config: &BackendConfig) -> Result<Self, EngineError> {
        let client = connect_client(config, "ff-completions-reader").await?;
        ensure_library(&client).await?;
        Ok(Self { client, config: config.clone() })
    }
}

/// One atomic look at the stream: up to `count` entries after `after`, and what was trimmed.
async fn look(client: &Client, after: Position, count: usize) -> Result<ReadView, EngineError> {
    let args = [format_id(after), count.to_string()];
    let reply: Value = fcall(client, "ff_read_after", &[STREAM_KEY], &args).await?;
    read_view(&reply).map_err(|detail| EngineError::schema("ff_read_after", detail))
}

/// An empty batch telling a reader at `start` that entries after it were trimmed up to `floor`.
fn expired(start: Position, floor: Position) -> Batch {
    Batch { start, end: start, expired: Some(floor), ..Batch::default() }
}

/// The events of `entries` after `start`, bad ones skipped with a reason.
fn batch_of(start: Position, entries: Vec<RawEntry>, limit: usize) -> Batch {
    let mut batch = Batch { start, end: start, full: entries.len() >= limit, ..Batch::default() };
    for entry in entries {
        let Some(pos) = parse_id(&entry.id) else {
            tracing::error!(id = %shown(&entry.id), "stream entry with a malformed id, ignored");
            continue;
        };
        if pos <= start {
            continue;
        }
        batch.end = pos;
        match entry.fields.and_then(|fields| decode_entry(pos, &fields)) {
            Ok(event) => batch.events.push(Positioned { pos, event }),
            Err(reason) => batch.skipped.push((pos, reason)),
        }
    }
    batch
}

#[async_trait]
impl CompletionSource for ValkeySource {
    fn kind(&self) -> &'static str {
        "valkey"
    }

    fn cursor_of(&self, pos: Position) -> StreamCursor {
        encode_valkey_cursor(pos.hi, pos.lo)
    }

    async fn resolve_start(&self, cursor: &StreamCursor) -> Result<StartAt, EngineError> {
        let Some((ms, seq)) = decode_valkey_cursor(cursor)? else {
            return Ok(StartAt::after(self.tail().await?));
        };
        let after = Position::new(ms, seq);
        match look(&self.client, after, 0).await?.floor() {
            Some(floor) if after < floor => Err(EngineError::CursorExpired { oldest: Some(self.cursor_of(floor)) }),
            _ => Ok(StartAt::after(after)),
        }
    }

    async fn tail(&self) -> Result<Position, EngineError> {
        Ok(look(&self.client, Position::ZERO, 0).await?.last_generated.unwrap_or(Position::ZERO))
    }

    async fn read_after(&self, after: Position, limit: usize) -> Result<Batch, EngineError> {
        let view = look(&self.client, after, limit.max(1)).await?;
        match view.floor() {
            Some(floor) if after < floor => Ok(expired(after, floor)),
            _ => Ok(batch_of(after, view.entries, limit.max(1))),
        }
    }

    async fn trim(&self, retention: &Retention) -> Result<u64, EngineError> {
        let mut removed = 0u64;
        if let Some(n) = retention.max_events {
            let xtrim = self.client.cmd("XTRIM").arg(STREAM_KEY).arg("MAXLEN").arg(n);
            removed =
                removed.saturating_add(xtrim.execute::<i64>().await.map_err(map_err("valkey XTRIM"))?.max(0) as u64);
        }
        if let Some(age) = retention.max_age {
            let min_ms = age_cutoff_ms(TimestampMs::now(), age).max(0);
            let xtrim = self.client.cmd("XTRIM").arg(STREAM_KEY).arg("MINID").arg(format!("{min_ms}-0"));
            removed =
                removed.saturating_add(xtrim.execute::<i64>().await.map_err(map_err("valkey XTRIM"))?.max(0) as u64);
        }
        Ok(removed)
    }

    async fn gauges(&self) -> Result<Vec<(&'static str, f64)>, EngineError> {
        let len: i64 = self.client.cmd("XLEN").arg(STREAM_KEY).execute().await.map_err(map_err("valkey XLEN"))?;
        Ok(vec![("stream_length", len as f64)])
    }

    async fn open_waker(&self, from: Position) -> Result<Box<dyn Waker>, EngineError> {
        let blocking = connect_client(&self.config, LISTENER_CLIENT_NAME).await?;
        Ok(Box::new(ValkeyWaker { blocking, reader: self.client.clone(), position: from }))
    }
}

/// `XREAD BLOCK` on its own connection (a blocking read on the shared client would stall every
/// other command on it), from its own position: the wake-up and the read at once. A dropped
/// connection is an error: the listener fails and is restarted from its cursor.
struct ValkeyWaker {
    blocking: Client,
    reader: Client,
    position: Position,
}

impl ValkeyWaker {
    async fn block(&self) -> Result<Vec<RawEntry>, EngineError> {
        let reply: Value = self
            .blocking
            .cmd("XREAD")
            .arg("COUNT")
            .arg(WAKE_COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(STREAM_KEY)
            .arg(format_id(self.position))
            .execute()
            .await
            .map_err(map_err("valkey XREAD"))?;
        Ok(read_entries(&reply))
    }

    /// The batch of what `XREAD` returned, unless entries after the position were trimmed
    /// before it read them (then an expired batch, and the position moves to the boundary).
    async fn batch(&mut self, entries: Vec<RawEntry>) -> Result<Batch, EngineError> {
        let start = self.position;
        if let Some(floor) = look(&self.reader, start, 0).await?.floor().filter(|f| start < *f) {
            self.position = floor;
            return Ok(expired(start, floor));
        }
        let batch = batch_of(start, entries, WAKE_COUNT);
        self.position = batch.end;
        Ok(batch)
    }
}

#[async_trait]
impl Waker for ValkeyWaker {
    async fn wait(&mut self) -> Result<Wake, EngineError> {
        loop {
            let entries = self.block().await?;
            if !entries.is_empty() {
                return Ok(Wake::Fetched(self.batch(entries).await?));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, outcome: &str) -> RawEntry {
        let fields = [
            ("execution_id", "{fp:3}:6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b"),
            ("outcome", outcome),
            ("occurred_at_ms", "5"),
            ("partition", "3"),
        ];
        RawEntry { id: id.into(), fields: Ok(fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()) }
    }

    #[test]
    fn a_batch_skips_bad_entries_with_their_position_and_ends_at_the_last_one() {
        let entries = vec![
            entry("1-0", "success"),
            RawEntry { id: "2-0".into(), fields: Err("odd".into()) },
            entry("3-0", ""),
            entry("4-0", "failed"),
        ];
        let batch = batch_of(Position::new(0, 5), entries, 10);
        assert_eq!(batch.events.iter().map(|e| e.pos).collect::<Vec<_>>(), [Position::new(1, 0), Position::new(4, 0)]);
        assert_eq!(batch.skipped.iter().map(|s| s.0).collect::<Vec<_>>(), [Position::new(2, 0), Position::new(3, 0)]);
        assert_eq!(batch.end, Position::new(4, 0));
        assert!(!batch.full);
    }

    #[test]
    fn entries_at_or_below_the_start_are_left_out() {
        let batch = batch_of(Position::new(2, 0), vec![entry("1-0", "success"), entry("2-0", "success")], 2);
        assert!(batch.events.is_empty() && batch.skipped.is_empty());
        assert_eq!(batch.end, Position::new(2, 0));
        assert!(batch.full, "a read that hit its limit says so");
    }
}

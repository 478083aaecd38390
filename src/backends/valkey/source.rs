//! The Valkey [`CompletionSource`]: one lane per partition stream (`ff:completions:{fp:N}`)
//! plus the single stream of earlier versions (`ff:completions`, lane
//! [`VALKEY_LEGACY_LANE`]), read while it holds anything. Reads go through the library's
//! read-only `ff_read_after` (the entries and what was trimmed, in one atomic look per stream,
//! one slot per call, so the client routes each to the primary that owns it); the waker is
//! subscribed to [`PUBSUB_CHANNEL`] and [`FAMILY_CHANNEL`] (lease and signal entries), whose
//! messages name the execution, hence the partition to read (pub/sub only wakes: the streams are the truth, and a re-subscription after a lost
//! connection makes the listener read every stream).
//!
//! Order: within a partition (so within a flow), the stream's. Partitions are independent:
//! a frontier (one stream id per lane) says where a reader stands, and a cursor encodes it.
//! The single stream of earlier versions is read before any partition stream while it has
//! entries after the reader's position: everything in it was written before the first entry
//! of any partition stream.
//!
//! Trimming (`MAXLEN ~` in the producers, `XTRIM` by the retention job) removes entries from the
//! head, so a reader whose position in a lane is below that stream's first kept entry, once
//! anything was removed, may have lost entries: it gets [`Error::CursorExpired`] (on
//! subscribe) or an `expired` batch (while reading), never a silent skip. Two consequences: a
//! position at exactly the last trimmed entry is reported expired too (the stream keeps no
//! record that nothing after it was lost), and entries removed on purpose with `XDEL` are not
//! reported.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferriskey::{Client, PushInfo, PushKind, Value};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedReceiver;

use super::lanes::{Looked, Shards, all_lanes, lane_key, look_each, look_many};
use super::library::{connect_client, connect_subscriber, load_library, map_err, valkey_connection};
use super::stream::{RawEntry, ReadView, decode_entry, parse_id, range_entries, text};
use super::{FAMILY_CHANNEL, LISTENER_CLIENT_NAME, PUBSUB_CHANNEL};
use crate::backends::outbox::{age_cutoff_ms, shown};
use crate::backends::seam::{Batch, CompletionSource, Positioned, ReadPosition, StartAt, Wake, Waker};
use crate::config::{BackendConfig, Retention};
use crate::cursor::{
    Frontier, Position, StreamCursor, VALKEY_LEGACY_LANE, decode_valkey_frontier, encode_valkey_frontier,
};
use crate::error::Error;
use crate::family::Family;
use crate::types::{ExecutionId, TimestampMs};

/// Entries one wake-up reads at most per partition.
const WAKE_COUNT: usize = 512;

/// Stream reads one source (its readers, filters and waker together) has in flight at most:
/// ferriskey refuses requests beyond 1,000 in flight on one client, and a full read is one
/// call per lane, so many subscribers catching up at once would pass that.
const READS_IN_FLIGHT: usize = 256;

/// How long opening the waker waits for the server to confirm the subscription.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// Reads the completion streams of one server or cluster.
pub(crate) struct ValkeySource {
    pub(super) client: Client,
    config: BackendConfig,
    reads: Arc<Semaphore>,
    shards: Shards,
}

impl ValkeySource {
    /// The lanes with entries after `after`, read with `budget` when it is not 0.
    async fn look(&self, after: &Frontier, budget: usize) -> Result<Vec<Looked>, Error> {
        look_many(&self.client, &self.reads, &self.shards, after, all_lanes(), budget).await
    }

    /// Connects the shared reader client and loads the function library if needed.
    pub(crate) async fn connect(config: &BackendConfig) -> Result<Self, Error> {
        let client = connect_client(config, "ff-completions-reader").await?;
        load_library(&client).await?;
        let cluster = valkey_connection(config)?.cluster;
        let reads = Arc::new(Semaphore::new(READS_IN_FLIGHT));
        Ok(Self { client, config: config.clone(), reads, shards: Shards::new(cluster) })
    }
}

/// The floors of the lanes where entries above `after` were trimmed, if any.
fn expired_lanes<'a>(after: &Frontier, views: impl IntoIterator<Item = (u16, &'a ReadView)>) -> Option<Frontier> {
    let floors: Vec<Position> = views
        .into_iter()
        .filter_map(|(lane, view)| view.floor().map(|f| f.in_lane(lane)))
        .filter(|floor| !after.covers(*floor))
        .collect();
    (!floors.is_empty()).then(|| Frontier::from_positions(floors))
}

/// An empty batch telling a reader at `start` that entries after it were trimmed up to `floors`.
fn expired(start: &Frontier, floors: Frontier) -> Batch {
    Batch { start: start.clone(), end: start.clone(), expired: Some(floors), ..Batch::default() }
}

/// The events of each lane's `entries` after `start`, bad ones skipped with a reason; full when
/// a lane returned as many entries as its read asked for (the `usize`).
fn batch_of(start: &Frontier, lanes: Vec<(u16, Vec<RawEntry>, usize)>) -> Batch {
    let mut batch = Batch { start: start.clone(), end: start.clone(), ..Batch::default() };
    for (lane, entries, asked) in lanes {
        batch.full |= asked > 0 && entries.len() >= asked;
        for entry in entries {
            let Some(pos) = parse_id(&entry.id).map(|p| p.in_lane(lane)) else {
                tracing::error!(id = %shown(&entry.id), lane, "stream entry with a malformed id, ignored");
                continue;
            };
            if start.covers(pos) {
                continue;
            }
            batch.end.advance(pos);
            match entry.fields.and_then(|fields| decode_entry(pos, &fields)) {
                Ok(event) => batch.events.push(Positioned { pos, event }),
                Err(reason) => batch.skipped.push((pos, reason)),
            }
        }
    }
    batch
}

/// The frontier a decoded cursor names.
fn frontier_of(lanes: &[(u16, u64, u64)]) -> Frontier {
    Frontier::from_positions(lanes.iter().map(|(lane, ms, seq)| Position::new(*ms, *seq).in_lane(*lane)))
}

#[async_trait]
impl CompletionSource for ValkeySource {
    fn kind(&self) -> &'static str {
        "valkey"
    }

    fn lanes_are_partitions(&self) -> bool {
        true
    }

    /// Every family: the library writes lease history and signal delivery beside the
    /// completions, in the same partition streams.
    fn produces(&self, _family: Family) -> bool {
        true
    }

    fn cursor_of(&self, at: &Frontier) -> StreamCursor {
        let lanes: Vec<(u16, u64, u64)> =
            at.positions().iter().filter(|p| p.hi != 0 || p.lo != 0).map(|p| (p.lane, p.hi, p.lo)).collect();
        encode_valkey_frontier(&lanes)
    }

    async fn resolve_start(&self, cursor: &StreamCursor) -> Result<StartAt, Error> {
        let Some(lanes) = decode_valkey_frontier(cursor)? else {
            return Ok(StartAt::after(self.tail().await?));
        };
        let after = frontier_of(&lanes);
        let looked = self.look(&after, 0).await?;
        match expired_lanes(&after, looked.iter().map(|l| (l.lane, &l.view))) {
            Some(floors) => Err(Error::CursorExpired { oldest: Some(self.cursor_of(&after.joined(&floors))) }),
            None => Ok(StartAt::after(after)),
        }
    }

    async fn tail(&self) -> Result<Frontier, Error> {
        let looked = self.look(&Frontier::default(), 0).await?;
        Ok(Frontier::from_positions(looked.into_iter().filter_map(|l| l.view.last_generated)))
    }

    /// One look at every lane that also reads the lanes with entries after `after` (one call
    /// per primary, each splitting `limit` over its lanes with news); the single stream of
    /// earlier versions alone while it has entries after `after`.
    async fn read_after(&self, after: &Frontier, limit: usize) -> Result<Batch, Error> {
        let looked = self.look(after, limit.max(1)).await?;
        if let Some(floors) = expired_lanes(after, looked.iter().map(|l| (l.lane, &l.view))) {
            return Ok(expired(after, floors));
        }
        let legacy = looked.iter().any(|l| l.lane == VALKEY_LEGACY_LANE);
        let lanes = looked
            .into_iter()
            .filter(|l| !legacy || l.lane == VALKEY_LEGACY_LANE)
            .map(|l| (l.lane, l.view.entries, l.asked))
            .collect();
        Ok(batch_of(after, lanes))
    }

    /// By age, the newest entry older than the cutoff is kept (but for the single stream of
    /// earlier versions, which gets no new entries): an entry goes only once the entry
    /// after it is older than the cutoff too. A stream keeps no record of what was trimmed, only
    /// its first entry, so a reader at a trimmed entry (or at the last id of an emptied stream)
    /// is told it may have lost entries as soon as a newer one is kept, and a durable group
    /// stalls the partition: with this rule, only a reader that stayed at an entry for longer
    /// than the retention after the next one came.
    async fn trim(&self, retention: &Retention) -> Result<u64, Error> {
        let cutoff =
            retention.max_age.map(|age| Position::new(age_cutoff_ms(TimestampMs::now(), age).max(0) as u64, 0));
        let removed = futures::future::try_join_all(all_lanes().map(|lane| async move {
            let min_id = match cutoff {
                // Nothing is written to the single stream of earlier versions any more: it may
                // be emptied (a reader at its last id stays right).
                Some(cutoff) if lane == VALKEY_LEGACY_LANE => Some(format!("{}-{}", cutoff.hi, cutoff.lo)),
                Some(cutoff) => {
                    let key = lane_key(lane);
                    let below = format!("({}-{}", cutoff.hi, cutoff.lo);
                    let newest_old = self.client.cmd("XREVRANGE").arg(&key).arg(below).arg("-").arg("COUNT").arg(1);
                    let newest_old = newest_old.execute::<Value>().await.map_err(map_err("valkey XREVRANGE"))?;
                    // Nothing older than the cutoff: the cutoff itself, which removes nothing.
                    let keep = range_entries(&newest_old).last().and_then(|e| parse_id(&e.id)).unwrap_or(cutoff);
                    Some(format!("{}-{}", keep.hi, keep.lo))
                }
                None => None,
            };
            let key = lane_key(lane);
            let mut removed = 0u64;
            if let Some(n) = retention.max_events {
                let xtrim = self.client.cmd("XTRIM").arg(&key).arg("MAXLEN").arg(n);
                removed += xtrim.execute::<i64>().await.map_err(map_err("valkey XTRIM"))?.max(0) as u64;
            }
            if let Some(min_id) = min_id {
                let xtrim = self.client.cmd("XTRIM").arg(&key).arg("MINID").arg(min_id);
                removed += xtrim.execute::<i64>().await.map_err(map_err("valkey XTRIM"))?.max(0) as u64;
            }
            Ok::<u64, Error>(removed)
        }))
        .await?;
        Ok(removed.into_iter().fold(0u64, u64::saturating_add))
    }

    async fn gauges(&self) -> Result<Vec<(&'static str, f64)>, Error> {
        let lengths = futures::future::try_join_all(all_lanes().map(|lane| async move {
            self.client.cmd("XLEN").arg(lane_key(lane)).execute::<i64>().await.map_err(map_err("valkey XLEN"))
        }))
        .await?;
        Ok(vec![("stream_length", lengths.into_iter().map(|n| n.max(0) as f64).sum())])
    }

    async fn open_waker(&self, read: ReadPosition) -> Result<Box<dyn Waker>, Error> {
        let subscription = Subscription::open(&self.config).await?;
        Ok(Box::new(ValkeyWaker {
            subscription,
            config: self.config.clone(),
            reader: self.client.clone(),
            reads: self.reads.clone(),
            position: read.now(),
            listener: read,
        }))
    }
}

fn subscriber_lost() -> Error {
    Error::transport("valkey SUBSCRIBE", "the subscriber connection closed")
}

/// A connection of its own subscribed to [`PUBSUB_CHANNEL`] and [`FAMILY_CHANNEL`], and the
/// push frames it receives.
struct Subscription {
    _client: Client,
    pushes: UnboundedReceiver<PushInfo>,
}

impl Subscription {
    /// Connects and subscribes; returns once the server confirmed both channels, so a read
    /// after this returns misses nothing.
    async fn open(config: &BackendConfig) -> Result<Self, Error> {
        let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
        let client = connect_subscriber(config, LISTENER_CLIENT_NAME, tx).await?;
        let subscribe = client.cmd("SUBSCRIBE").arg(PUBSUB_CHANNEL).arg(FAMILY_CHANNEL);
        subscribe.execute::<()>().await.map_err(map_err("valkey SUBSCRIBE"))?;
        let confirmed = tokio::time::timeout(SUBSCRIBE_WAIT, async {
            let mut confirmations = 0;
            while let Some(push) = pushes.recv().await {
                if push.kind == PushKind::Subscribe {
                    confirmations += 1;
                    if confirmations == 2 {
                        return true;
                    }
                }
            }
            false
        });
        match confirmed.await {
            Ok(true) => Ok(Self { _client: client, pushes }),
            Ok(false) => Err(subscriber_lost()),
            Err(_) => Err(Error::Timeout { op: "valkey SUBSCRIBE" }),
        }
    }
}

/// Subscribed to [`PUBSUB_CHANNEL`] and [`FAMILY_CHANNEL`] on its own connection (RESP3 push
/// frames); each message names a partition, which it reads from its own position or the
/// listener's, whichever is further: the wake-up and the read at once (what the listener read
/// by itself, on a catch-up, a tick or after a reconnect, is never read again here). When that connection drops, ferriskey re-makes it, but its own
/// re-subscription can fail while the connection is still being re-made, and then no message
/// arrives any more: the waker subscribes again on a new connection of its own and reports
/// [`Wake::Reconnected`] (the listener then reads every lane). A re-subscription ferriskey
/// reports is a [`Wake::Reconnected`] too.
struct ValkeyWaker {
    subscription: Subscription,
    config: BackendConfig,
    reader: Client,
    reads: Arc<Semaphore>,
    /// What it read itself.
    position: Frontier,
    /// What the listener has read.
    listener: ReadPosition,
}

/// What a run of push frames asks for.
#[derive(Default)]
struct Pending {
    partitions: BTreeSet<u16>,
    reconnected: bool,
    /// The subscriber connection dropped: subscribe again.
    disconnected: bool,
}

impl Pending {
    fn note(&mut self, push: PushInfo) {
        match push.kind {
            PushKind::Message => match push.data.get(1).and_then(text).as_deref().and_then(partition_of_message) {
                Some(p) => {
                    self.partitions.insert(p);
                }
                // Someone else's message on our channel: read everything rather than guess.
                None => self.reconnected = true,
            },
            PushKind::Disconnection => self.disconnected = true,
            PushKind::Subscribe => self.reconnected = true,
            _ => {}
        }
    }
}

/// The partition of the execution a `ff:dag:completions` message names.
fn partition_of_message(payload: &str) -> Option<u16> {
    let json: serde_json::Value = serde_json::from_str(payload).ok()?;
    ExecutionId::parse(json.get("execution_id")?.as_str()?).ok().map(|id| id.partition())
}

impl ValkeyWaker {
    /// The batch of `partitions` after the position (its own or the listener's, whichever is
    /// further), unless entries after it were trimmed before it read them (then an expired
    /// batch, and the position moves to the boundary).
    async fn read(&mut self, partitions: BTreeSet<u16>) -> Result<Batch, Error> {
        self.position.join(&self.listener.now());
        let start = self.position.clone();
        let views = look_each(&self.reader, &self.reads, &start, partitions, WAKE_COUNT).await?;
        if let Some(floors) = expired_lanes(&start, views.iter().map(|(lane, view)| (*lane, view))) {
            self.position.join(&floors);
            return Ok(expired(&start, floors));
        }
        let lanes = views.into_iter().map(|(lane, view)| (lane, view.entries, WAKE_COUNT)).collect();
        let batch = batch_of(&start, lanes);
        self.position.join(&batch.end);
        Ok(batch)
    }
}

#[async_trait]
impl Waker for ValkeyWaker {
    async fn wait(&mut self) -> Result<Wake, Error> {
        loop {
            let mut pending = Pending::default();
            pending.note(self.subscription.pushes.recv().await.ok_or_else(subscriber_lost)?);
            while let Ok(push) = self.subscription.pushes.try_recv() {
                pending.note(push);
            }
            if pending.disconnected {
                // Confirmed before the listener reads every lane: nothing falls in between.
                self.subscription = Subscription::open(&self.config).await?;
                return Ok(Wake::Reconnected);
            }
            if pending.reconnected {
                return Ok(Wake::Reconnected);
            }
            if !pending.partitions.is_empty() {
                return Ok(Wake::Fetched(self.read(pending.partitions).await?));
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
        let batch = batch_of(&Frontier::at(Position::new(0, 5).in_lane(3)), vec![(3, entries, 10)]);
        let at = |ms| Position::new(ms, 0).in_lane(3);
        assert_eq!(batch.events.iter().map(|e| e.pos).collect::<Vec<_>>(), [at(1), at(4)]);
        assert_eq!(batch.skipped.iter().map(|s| s.0).collect::<Vec<_>>(), [at(2), at(3)]);
        assert_eq!(batch.end, Frontier::at(at(4)));
        assert!(!batch.full);
    }

    #[test]
    fn each_lane_is_read_from_its_own_position() {
        let start = Frontier::from_positions([Position::new(5, 0).in_lane(1), Position::new(1, 0).in_lane(2)]);
        let lanes = vec![
            (1, vec![entry("4-0", "success"), entry("6-0", "success")], 10),
            (2, vec![entry("4-0", "failed")], 10),
        ];
        let batch = batch_of(&start, lanes);
        let read: Vec<_> = batch.events.iter().map(|e| (e.pos.lane, e.pos.hi)).collect();
        assert_eq!(read, [(1, 6), (2, 4)]);
        assert_eq!(batch.end.get(1), Position::new(6, 0).in_lane(1));
        assert_eq!(batch.end.get(2), Position::new(4, 0).in_lane(2));
        assert!(batch.end.covers_all(&start));
    }

    #[test]
    fn a_message_names_its_partition_and_anything_else_asks_for_a_full_read() {
        let json =
            r#"{"execution_id":"{fp:191}:6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b","flow_id":null,"outcome":"success"}"#;
        assert_eq!(partition_of_message(json), Some(191));
        for bad in ["", "{}", "[1]", r#"{"execution_id":"fp:1"}"#, r#"{"execution_id":7}"#] {
            assert_eq!(partition_of_message(bad), None, "{bad}");
        }
    }

    #[test]
    fn entries_at_or_below_the_start_are_left_out() {
        let start = Frontier::at(Position::new(2, 0).in_lane(3));
        let batch = batch_of(&start, vec![(3, vec![entry("1-0", "success"), entry("2-0", "success")], 2)]);
        assert!(batch.events.is_empty() && batch.skipped.is_empty());
        assert_eq!(batch.end, start);
        assert!(batch.full, "a read that hit its limit says so");
    }
}

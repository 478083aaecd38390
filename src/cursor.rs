//! Resumable stream cursors: opaque bytes whose first byte names the backend family and
//! version, and the per-family codecs. An empty cursor means "from the tail".
//!
//! | family   | prefix | body                                   | length |
//! |----------|--------|----------------------------------------|--------|
//! | Valkey   | `0x01` | `0x01`, then per partition stream: see [`encode_valkey_frontier`] | varies |
//! | Valkey   | `0x01` | stream id `ms`, `seq` (u64 BE each) of the single stream, an earlier form | 17 |
//! | Postgres | `0x02` | `batch`, `txid` (u64 BE), `event_id` (i64 BE), `key` (u32 BE), the tick's `fingerprint` (u64 BE) | 37 |
//! | Postgres | `0x02` | `batch`, `txid`, `event_id` (u64 BE), an earlier form | 25 |
//! | Postgres | `0x02` | `txid`, `event_id`, an earlier form    | 17     |
//! | Postgres | `0x02` | `event_id` (i64 BE), the original form | 9      |
//!
//! A Postgres cursor names its tick's fingerprint, so a database that lost the tick (a crash
//! before it was durable, a restored backup, a lossy failover) or another database refuses it
//! by name rather than reading it against another snapshot. Cursors of the earlier forms still
//! resume (they carry no fingerprint, so nothing checks them): a 25-byte one as it was, the two
//! oldest by delivering every row after them that the newest snapshot shows, then batch by batch.
//! | SQLite   | `0x03` | `event_id` (i64 BE)                    | 9      |
//!
//! Event families: a completion cursor is exactly the form above. A cursor of another family
//! is the same bytes with a family tag inserted after the backend byte: `0xF1` lease history,
//! `0xF2` signal delivery (e.g. SQLite lease history: `03 F1` + `event_id`, 10 bytes). The
//! families share each backend's order, so the body is the same position codec. No valid
//! completion cursor has a second byte above `0x7F` (it is the high byte of a non-negative
//! id, or Valkey's form byte `0x00`/`0x01`), so the tag is unambiguous; a cursor of one family
//! given to a subscription of another is a validation error.
// Each backend's encoding is used by that backend (and the tests): a build without it has none.
#![cfg_attr(not(all(feature = "postgres", feature = "sqlite", feature = "valkey")), allow(dead_code))]

use std::fmt;

use crate::error::Error;

/// Valkey family prefix byte.
pub const VALKEY_CURSOR_PREFIX: u8 = 0x01;
/// Postgres family prefix byte.
pub const POSTGRES_CURSOR_PREFIX: u8 = 0x02;
/// SQLite family prefix byte.
pub const SQLITE_CURSOR_PREFIX: u8 = 0x03;

/// The family tag byte of lease-history cursors.
pub const LEASE_HISTORY_CURSOR_TAG: u8 = 0xF1;
/// The family tag byte of signal-delivery cursors.
pub const SIGNAL_DELIVERY_CURSOR_TAG: u8 = 0xF2;
pub use crate::stream_cursor::StreamCursor;

impl StreamCursor {
    /// Parses the output of [`StreamCursor::to_hex`].
    ///
    /// # Errors
    /// [`Error::Validation`] for odd lengths or non-hex characters.
    pub fn from_hex(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        if !text.len().is_multiple_of(2) || !text.is_ascii() {
            return Err(Error::validation("cursor hex must have an even number of ASCII digits"));
        }
        hex::decode(text).map(Self::new).map_err(|_| Error::validation("cursor hex has a non-hex character"))
    }
}

#[cfg(feature = "serde")]
/// A cursor deserializes from its hex text, as [`StreamCursor::from_hex`] parses it.
impl<'de> serde::Deserialize<'de> for StreamCursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// A position in one lane of a backend's order: Valkey `(partition, 0, ms, seq, 0)`, Postgres
/// `(0, batch, txid, event_id, partition_key)` (see `Position::postgres`), SQLite
/// `(0, 0, 0, event_id, 0)`.
/// Positions of one lane are ordered lexicographically; positions of different lanes are not
/// comparable in a meaningful way (a backend with several lanes promises order within each lane
/// only). `check` travels with the position and takes no part in its order or equality.
/// Crate-internal; the tests reach it through `ff_completions::testing`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Position {
    /// The lane (Valkey: the partition stream; 0 elsewhere).
    pub lane: u16,
    /// Postgres: the reader's batch; 0 elsewhere.
    pub major: u64,
    /// Postgres: the txid; Valkey: the stream id's milliseconds; 0 on SQLite.
    pub hi: u64,
    /// Postgres: the `event_id` with its sign bit flipped (so negative ids order first);
    /// SQLite: the `event_id`; Valkey: the stream id's sequence.
    pub lo: u64,
    /// Postgres: the row's `partition_key`, which orders rows of one transaction that share an
    /// `event_id` (an outbox keyed on `(partition_key, event_id)` allows them); 0 elsewhere.
    pub minor: u32,
    /// Postgres: the fingerprint of the batch's tick (0: unknown, nothing to check); 0 elsewhere.
    pub check: u64,
}

impl PartialEq for Position {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Position {}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl std::hash::Hash for Position {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

/// The sign bit of a Postgres `event_id` in [`Position::lo`].
const EVENT_ID_SIGN: u64 = 1 << 63;

/// A Postgres `partition_key` in [`Position::minor`]: `NULL` is 0, below every key, and keys
/// keep their order above it.
const PARTITION_KEY_OFFSET: i64 = i16::MIN as i64 - 1;

impl Position {
    pub(crate) const ZERO: Position = Position { lane: 0, major: 0, hi: 0, lo: 0, minor: 0, check: 0 };

    /// What orders positions: everything but `check`.
    fn key(&self) -> (u16, u64, u64, u64, u32) {
        (self.lane, self.major, self.hi, self.lo, self.minor)
    }

    /// A position of a backend whose order has two words.
    pub(crate) const fn new(hi: u64, lo: u64) -> Self {
        Self { lane: 0, major: 0, hi, lo, minor: 0, check: 0 }
    }

    /// A position of a backend whose order has three words (Postgres: batch first).
    pub(crate) const fn with_major(major: u64, hi: u64, lo: u64) -> Self {
        Self { lane: 0, major, hi, lo, minor: 0, check: 0 }
    }

    /// The Postgres reader's position `(batch, txid, event_id, partition key)` in a batch whose
    /// tick has `fingerprint` (0: unknown). Any `event_id`, negative included, keeps its order;
    /// `key` is the SQL word of the partition key ([`Position::postgres_key_word`]).
    pub(crate) const fn postgres(batch: u64, txid: u64, event_id: i64, key: i64, fingerprint: u64) -> Self {
        let minor = key - PARTITION_KEY_OFFSET;
        let minor = if minor < 0 {
            0
        } else if minor > u32::MAX as i64 {
            u32::MAX
        } else {
            minor as u32
        };
        Self { lane: 0, major: batch, hi: txid, lo: (event_id as u64) ^ EVENT_ID_SIGN, minor, check: fingerprint }
    }

    /// The SQL word the reader orders a row's partition key by: the key, or, for `NULL`, one
    /// below every key.
    pub(crate) const fn postgres_key_word(key: Option<i16>) -> i64 {
        match key {
            Some(k) => k as i64,
            None => PARTITION_KEY_OFFSET,
        }
    }

    /// The partition-key word after every row: a position of a form that names no partition
    /// key (stored group positions, the 25-byte cursor) is past every row of its event id.
    pub(crate) const AFTER_EVERY_KEY: i64 = i16::MAX as i64 + 1;

    /// The Postgres position of words that name no partition key: a row's (txid 1 or more) is
    /// past every row of its event id; a batch's start or end (txid 0) stays where it is.
    pub(crate) const fn postgres_without_key(batch: u64, txid: u64, event_id: i64) -> Self {
        let key = if txid == 0 { Self::postgres_key_word(None) } else { Self::AFTER_EVERY_KEY };
        Self::postgres(batch, txid, event_id, key, 0)
    }

    /// The `event_id` of a position made by [`Position::postgres`].
    pub(crate) const fn postgres_event_id(&self) -> i64 {
        (self.lo ^ EVENT_ID_SIGN) as i64
    }

    /// The partition-key word of a position made by [`Position::postgres`].
    pub(crate) const fn postgres_key(&self) -> i64 {
        self.minor as i64 + PARTITION_KEY_OFFSET
    }

    /// The same position in `lane`.
    pub(crate) const fn in_lane(self, lane: u16) -> Self {
        Self { lane, ..self }
    }

    /// The start of `lane`: below every position in it.
    pub(crate) const fn lane_start(lane: u16) -> Self {
        Self { lane, major: 0, hi: 0, lo: 0, minor: 0, check: 0 }
    }
}

/// Where a reader stands in every lane of a backend: one position per lane (a lane it names
/// not is at its start). Postgres and SQLite have one lane; Valkey one per partition stream.
/// A frontier `covers` a position at or below its own in that lane; it covers another frontier
/// when it covers each of its positions.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Frontier(Vec<Position>);

/// One lane shows its position; more show how many (a log line stays short).
impl fmt::Debug for Frontier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [] => f.write_str("Frontier(start)"),
            [one] => write!(f, "Frontier({one:?})"),
            many => write!(f, "Frontier({} lanes)", many.len()),
        }
    }
}

impl Frontier {
    /// The frontier at `pos` (in its lane; every other lane at its start).
    pub(crate) fn at(pos: Position) -> Self {
        Self(vec![pos])
    }

    /// The frontier at the highest of `positions` in each lane.
    pub(crate) fn from_positions(positions: impl IntoIterator<Item = Position>) -> Self {
        let mut f = Self::default();
        for pos in positions {
            f.advance(pos);
        }
        f
    }

    /// Its position in `lane`.
    pub(crate) fn get(&self, lane: u16) -> Position {
        match self.0.binary_search_by_key(&lane, |p| p.lane) {
            Ok(i) => self.0[i],
            Err(_) => Position::lane_start(lane),
        }
    }

    /// Its position in lane 0: the whole frontier of a backend with one lane.
    pub(crate) fn single(&self) -> Position {
        self.get(0)
    }

    /// The positions it names, by lane.
    pub(crate) fn positions(&self) -> &[Position] {
        &self.0
    }

    /// `pos` is at or below it in `pos`'s lane.
    pub(crate) fn covers(&self, pos: Position) -> bool {
        pos <= self.get(pos.lane)
    }

    /// Every position of `other` is covered.
    pub(crate) fn covers_all(&self, other: &Frontier) -> bool {
        other.0.iter().all(|p| self.covers(*p))
    }

    /// Moves its lane up to `pos` (never down).
    pub(crate) fn advance(&mut self, pos: Position) {
        match self.0.binary_search_by_key(&pos.lane, |p| p.lane) {
            Ok(i) => self.0[i] = self.0[i].max(pos),
            Err(i) => self.0.insert(i, pos),
        }
    }

    /// Moves every lane up to `other`'s position in it.
    pub(crate) fn join(&mut self, other: &Frontier) {
        for pos in &other.0 {
            self.advance(*pos);
        }
    }

    /// This frontier moved up to `other`.
    pub(crate) fn joined(&self, other: &Frontier) -> Frontier {
        let mut f = self.clone();
        f.join(other);
        f
    }
}

/// A decoded Postgres cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostgresCursor {
    /// The reader's batch position (3 × tick, plus the phase within it); `None` for the two
    /// earlier forms.
    pub batch: Option<u64>,
    /// Inserting transaction id (0 before every row of the batch, 1 for rows from before the
    /// outbox was adopted; 0 for those in the 25-byte form); `None` for the original 9-byte form.
    pub txid: Option<u64>,
    /// Outbox `event_id`.
    pub event_id: i64,
    /// The row's partition key word (see `Position::postgres_key_word`); `None` for the
    /// earlier forms (a position past every row of its event id).
    pub key: Option<i64>,
    /// The fingerprint of the batch's tick; `None` for the earlier forms.
    pub fingerprint: Option<u64>,
}

impl PostgresCursor {
    /// The reader position it names: a cursor of the current form or the 25-byte one (`None`
    /// for the two oldest forms, which name no batch).
    pub(crate) fn position(&self) -> Option<Position> {
        let (batch, txid) = (self.batch?, self.txid?);
        Some(match (self.fingerprint, self.key) {
            (Some(fingerprint), Some(key)) => Position::postgres(batch, txid, self.event_id, key, fingerprint),
            // The 25-byte form put rows from before adoption at txid 0 (the start, now).
            _ if txid == 0 && self.event_id > 0 => Position::postgres_without_key(batch, 1, self.event_id),
            _ => Position::postgres_without_key(batch, txid, self.event_id),
        })
    }
}

fn body<const N: usize>(cursor: &StreamCursor, prefix: u8, family: &str) -> Result<Option<[u8; N]>, Error> {
    let bytes = cursor.as_bytes();
    match bytes.split_first() {
        None => Ok(None),
        Some((&p, rest)) if p == prefix => rest
            .try_into()
            .map(Some)
            .map_err(|_| Error::validation(format!("{family} cursor must be {} bytes, got {}", N + 1, bytes.len()))),
        Some((&p, _)) => {
            Err(Error::validation(format!("cursor prefix 0x{p:02x} is not the {family} family (0x{prefix:02x})")))
        }
    }
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(word)
}

fn two_words(prefix: u8, hi: u64, lo: u64) -> StreamCursor {
    let mut bytes = Vec::with_capacity(17);
    bytes.push(prefix);
    bytes.extend_from_slice(&hi.to_be_bytes());
    bytes.extend_from_slice(&lo.to_be_bytes());
    StreamCursor::new(bytes)
}

/// Encodes a Valkey stream id `(ms, seq)`.
pub fn encode_valkey_cursor(ms: u64, seq: u64) -> StreamCursor {
    two_words(VALKEY_CURSOR_PREFIX, ms, seq)
}

/// Decodes a Valkey cursor; `Ok(None)` for the empty (tail) cursor.
///
/// # Errors
/// [`Error::Validation`] for a wrong prefix or length.
pub fn decode_valkey_cursor(cursor: &StreamCursor) -> Result<Option<(u64, u64)>, Error> {
    Ok(body::<16>(cursor, VALKEY_CURSOR_PREFIX, "Valkey")?.map(|b| (be_u64(&b[..8]), be_u64(&b[8..]))))
}

/// The lane of the single completion stream of earlier versions (`ff:completions`) in a Valkey
/// frontier; lanes 0..=255 are the partition streams.
pub const VALKEY_LEGACY_LANE: u16 = 256;

/// One lane of a Valkey frontier: `(lane, ms, seq)`.
pub type ValkeyLane = (u16, u64, u64);

/// The form byte after the Valkey family byte that marks a frontier over partition streams.
const VALKEY_FRONTIER_FORM: u8 = 0x01;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        let part = u64::from(b & 0x7f);
        if shift == 63 && part > 1 {
            return None;
        }
        v |= part << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Encodes a Valkey frontier: one stream id `(lane, ms, seq)` per lane (partition 0..=255, or
/// [`VALKEY_LEGACY_LANE`]); a lane not named is at its stream's start. Bytes: `0x01`, `0x01`,
/// LEB128 varints `base` (the lowest `ms`), then per lane in ascending order `lane`,
/// `ms - base`, `seq`: about 5 bytes a partition.
pub fn encode_valkey_frontier(lanes: &[ValkeyLane]) -> StreamCursor {
    let mut sorted = lanes.to_vec();
    sorted.sort_unstable();
    sorted.dedup_by_key(|l| l.0);
    let base = sorted.iter().map(|l| l.1).min().unwrap_or(0);
    let mut bytes = vec![VALKEY_CURSOR_PREFIX, VALKEY_FRONTIER_FORM];
    put_varint(&mut bytes, base);
    for (lane, ms, seq) in sorted {
        put_varint(&mut bytes, u64::from(lane));
        put_varint(&mut bytes, ms - base);
        put_varint(&mut bytes, seq);
    }
    StreamCursor::new(bytes)
}

/// Decodes either Valkey form into `(lane, ms, seq)` per lane; `Ok(None)` for the empty (tail)
/// cursor. The earlier 17-byte form (one stream id of the single stream) decodes to its id in
/// [`VALKEY_LEGACY_LANE`].
///
/// # Errors
/// [`Error::Validation`] for a wrong prefix, a truncated or overlong body, lanes out of
/// range or out of order.
pub fn decode_valkey_frontier(cursor: &StreamCursor) -> Result<Option<Vec<ValkeyLane>>, Error> {
    let bytes = cursor.as_bytes();
    match bytes {
        [] => return Ok(None),
        [VALKEY_CURSOR_PREFIX, 0, ..] if bytes.len() == 17 => {
            return Ok(decode_valkey_cursor(cursor)?.map(|(ms, seq)| vec![(VALKEY_LEGACY_LANE, ms, seq)]));
        }
        [VALKEY_CURSOR_PREFIX, VALKEY_FRONTIER_FORM, ..] => {}
        [VALKEY_CURSOR_PREFIX, ..] => return Err(Error::validation("Valkey cursor of an unknown form")),
        [p, ..] => {
            return Err(Error::validation(format!(
                "cursor prefix 0x{p:02x} is not the Valkey family (0x{VALKEY_CURSOR_PREFIX:02x})"
            )));
        }
    }
    let bad = |what: &str| Error::validation(format!("Valkey cursor: {what}"));
    let mut rest = &bytes[2..];
    let base = take_varint(&mut rest).ok_or_else(|| bad("truncated"))?;
    let mut lanes: Vec<ValkeyLane> = Vec::new();
    while !rest.is_empty() {
        let lane = take_varint(&mut rest).ok_or_else(|| bad("truncated"))?;
        let ms = take_varint(&mut rest).ok_or_else(|| bad("truncated"))?;
        let seq = take_varint(&mut rest).ok_or_else(|| bad("truncated"))?;
        let lane =
            u16::try_from(lane).ok().filter(|l| *l <= VALKEY_LEGACY_LANE).ok_or_else(|| bad("lane out of range"))?;
        if lanes.last().is_some_and(|l| l.0 >= lane) {
            return Err(bad("lanes out of order"));
        }
        let ms = base.checked_add(ms).ok_or_else(|| bad("stream id out of range"))?;
        lanes.push((lane, ms, seq));
    }
    Ok(Some(lanes))
}

/// Encodes a Postgres position `(batch, txid, event_id, partition key word)` in a batch whose
/// tick has `fingerprint`: the form the reader hands out.
pub fn encode_postgres_tick_cursor(batch: u64, txid: u64, event_id: i64, key: i64, fingerprint: u64) -> StreamCursor {
    let mut bytes = Vec::with_capacity(37);
    bytes.push(POSTGRES_CURSOR_PREFIX);
    bytes.extend_from_slice(&batch.to_be_bytes());
    bytes.extend_from_slice(&txid.to_be_bytes());
    bytes.extend_from_slice(&event_id.to_be_bytes());
    bytes.extend_from_slice(&Position::postgres(0, 0, 0, key, 0).minor.to_be_bytes());
    bytes.extend_from_slice(&fingerprint.to_be_bytes());
    StreamCursor::new(bytes)
}

/// Encodes the earlier 25-byte Postgres form `(batch, txid, event_id)`, without a fingerprint.
pub fn encode_postgres_batch_cursor(batch: u64, txid: u64, event_id: i64) -> StreamCursor {
    let mut bytes = Vec::with_capacity(25);
    bytes.push(POSTGRES_CURSOR_PREFIX);
    bytes.extend_from_slice(&batch.to_be_bytes());
    bytes.extend_from_slice(&txid.to_be_bytes());
    bytes.extend_from_slice(&event_id.to_be_bytes());
    StreamCursor::new(bytes)
}

/// Encodes the earlier 17-byte Postgres form `(txid, event_id)`: every row after it in that
/// order is unseen. `encode_postgres_cursor(0, 0)` replays the whole outbox.
pub fn encode_postgres_cursor(txid: u64, event_id: i64) -> StreamCursor {
    two_words(POSTGRES_CURSOR_PREFIX, txid, event_id as u64)
}

/// Encodes the original 9-byte Postgres form (`event_id` only).
pub fn encode_postgres_event_cursor(event_id: i64) -> StreamCursor {
    let mut bytes = vec![POSTGRES_CURSOR_PREFIX];
    bytes.extend_from_slice(&event_id.to_be_bytes());
    StreamCursor::new(bytes)
}

/// Decodes any Postgres form; `Ok(None)` for the empty (tail) cursor.
///
/// # Errors
/// [`Error::Validation`] for a wrong prefix, a wrong length, a batch or transaction
/// beyond `i64::MAX`, or a negative id in an earlier form (only the current one carries any id).
pub fn decode_postgres_cursor(cursor: &StreamCursor) -> Result<Option<PostgresCursor>, Error> {
    let decoded = match cursor.as_bytes().len() {
        9 => body::<8>(cursor, POSTGRES_CURSOR_PREFIX, "Postgres")?.map(|b| PostgresCursor {
            batch: None,
            txid: None,
            event_id: be_u64(&b) as i64,
            key: None,
            fingerprint: None,
        }),
        25 => body::<24>(cursor, POSTGRES_CURSOR_PREFIX, "Postgres")?.map(|b| PostgresCursor {
            batch: Some(be_u64(&b[..8])),
            txid: Some(be_u64(&b[8..16])),
            event_id: be_u64(&b[16..]) as i64,
            key: None,
            fingerprint: None,
        }),
        37 => body::<36>(cursor, POSTGRES_CURSOR_PREFIX, "Postgres")?.map(|b| {
            let mut minor = [0u8; 4];
            minor.copy_from_slice(&b[24..28]);
            PostgresCursor {
                batch: Some(be_u64(&b[..8])),
                txid: Some(be_u64(&b[8..16])),
                event_id: be_u64(&b[16..24]) as i64,
                key: Some(u32::from_be_bytes(minor) as i64 + PARTITION_KEY_OFFSET),
                fingerprint: Some(be_u64(&b[28..])),
            }
        }),
        _ => body::<16>(cursor, POSTGRES_CURSOR_PREFIX, "Postgres")?.map(|b| PostgresCursor {
            batch: None,
            txid: Some(be_u64(&b[..8])),
            event_id: be_u64(&b[8..]) as i64,
            key: None,
            fingerprint: None,
        }),
    };
    match decoded {
        Some(c)
            if (c.event_id < 0 && c.fingerprint.is_none())
                || c.txid.is_some_and(|t| t > i64::MAX as u64)
                || c.batch.is_some_and(|b| b > i64::MAX as u64) =>
        {
            Err(Error::validation("Postgres cursor holds a negative position"))
        }
        other => Ok(other),
    }
}

/// Encodes an SQLite `event_id`.
pub fn encode_sqlite_cursor(event_id: i64) -> StreamCursor {
    let mut bytes = vec![SQLITE_CURSOR_PREFIX];
    bytes.extend_from_slice(&event_id.to_be_bytes());
    StreamCursor::new(bytes)
}

/// Decodes an SQLite cursor; `Ok(None)` for the empty (tail) cursor.
///
/// # Errors
/// [`Error::Validation`] for a wrong prefix, a wrong length or a negative id.
pub fn decode_sqlite_cursor(cursor: &StreamCursor) -> Result<Option<i64>, Error> {
    match body::<8>(cursor, SQLITE_CURSOR_PREFIX, "SQLite")?.map(|b| be_u64(&b) as i64) {
        Some(id) if id < 0 => Err(Error::validation("SQLite cursor holds a negative event id")),
        other => Ok(other),
    }
}

/// The frontier an event's cursor names (the forms readers hand out today: a Valkey frontier,
/// a Postgres batch cursor, an SQLite cursor); `Ok(None)` for the empty cursor.
///
/// # Errors
/// [`Error::Validation`] for a malformed cursor, an unknown backend byte, a family tag
/// or an earlier Postgres form (no event carries one).
pub(crate) fn decode_event_frontier(cursor: &StreamCursor) -> Result<Option<Frontier>, Error> {
    match cursor.as_bytes().first() {
        None => Ok(None),
        Some(&VALKEY_CURSOR_PREFIX) => Ok(decode_valkey_frontier(cursor)?.map(|lanes| {
            Frontier::from_positions(lanes.into_iter().map(|(lane, ms, seq)| Position::new(ms, seq).in_lane(lane)))
        })),
        Some(&POSTGRES_CURSOR_PREFIX) => match decode_postgres_cursor(cursor)? {
            None => Ok(None),
            Some(c) => match c.position() {
                Some(pos) => Ok(Some(Frontier::at(pos))),
                None => Err(Error::validation("a Postgres cursor of an earlier form names no event")),
            },
        },
        Some(&SQLITE_CURSOR_PREFIX) => {
            Ok(decode_sqlite_cursor(cursor)?.map(|id| Frontier::at(Position::new(0, id as u64))))
        }
        Some(other) => Err(Error::validation(format!("cursor prefix 0x{other:02x} names no backend"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_round_trips() {
        assert_eq!(
            decode_valkey_cursor(&encode_valkey_cursor(1_700_000_000_000, 7)).ok(),
            Some(Some((1_700_000_000_000, 7)))
        );
        assert_eq!(
            decode_postgres_cursor(&encode_postgres_cursor(900, 42)).ok(),
            Some(Some(PostgresCursor { batch: None, txid: Some(900), event_id: 42, key: None, fingerprint: None }))
        );
        assert_eq!(
            decode_postgres_cursor(&encode_postgres_event_cursor(42)).ok(),
            Some(Some(PostgresCursor { batch: None, txid: None, event_id: 42, key: None, fingerprint: None }))
        );
        assert_eq!(
            decode_postgres_cursor(&encode_postgres_batch_cursor(31, 900, 42)).ok(),
            Some(Some(PostgresCursor { batch: Some(31), txid: Some(900), event_id: 42, key: None, fingerprint: None }))
        );
        assert_eq!(decode_sqlite_cursor(&encode_sqlite_cursor(5)).ok(), Some(Some(5)));
    }

    /// Wire formats as exact bytes: the family prefix, then big-endian words.
    #[test]
    fn cursor_encodings_are_pinned_byte_for_byte() {
        assert_eq!(encode_valkey_cursor(0x0102, 7).to_hex(), "0100000000000001020000000000000007");
        assert_eq!(encode_postgres_event_cursor(42).to_hex(), "02000000000000002a");
        assert_eq!(encode_postgres_cursor(900, 42).to_hex(), "020000000000000384000000000000002a");
        assert_eq!(
            encode_postgres_tick_cursor(31, 900, -2, 5, 0xabcd).to_hex(),
            "02000000000000001f0000000000000384fffffffffffffffe00008006000000000000abcd"
        );
        assert_eq!(
            encode_postgres_batch_cursor(31, 900, 42).to_hex(),
            "02000000000000001f0000000000000384000000000000002a"
        );
        assert_eq!(encode_sqlite_cursor(5).as_bytes(), [0x03, 0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(StreamCursor::from_hex("0300000000000000ff").ok(), Some(encode_sqlite_cursor(255)));
    }

    #[test]
    fn valkey_frontiers_round_trip_compactly_and_pin_their_bytes() {
        let lanes = vec![(0, 1_700_000_000_000, 0), (5, 1_700_000_000_123, 2), (191, 1_700_000_000_001, 0)];
        let cursor = encode_valkey_frontier(&lanes);
        assert_eq!(decode_valkey_frontier(&cursor).ok(), Some(Some(lanes)));
        assert!(cursor.as_bytes().len() < 2 + 6 + 3 * 5, "{} bytes", cursor.as_bytes().len());
        assert_eq!(encode_valkey_frontier(&[(1, 300, 2)]).to_hex(), "0101ac02010002");
        assert_eq!(encode_valkey_frontier(&[]).to_hex(), "010100");
        assert_eq!(
            decode_valkey_frontier(&StreamCursor::from_hex("010100").unwrap_or_default()).ok(),
            Some(Some(vec![]))
        );
        let all: Vec<_> = (0..=VALKEY_LEGACY_LANE).map(|l| (l, 1_700_000_000_000 + u64::from(l), 0)).collect();
        let big = encode_valkey_frontier(&all);
        assert!(big.as_bytes().len() <= 2 + 6 + 257 * 5, "{} bytes for every lane", big.as_bytes().len());
        assert_eq!(decode_valkey_frontier(&big).ok(), Some(Some(all)));
    }

    #[test]
    fn an_earlier_single_stream_valkey_cursor_decodes_to_the_legacy_lane() {
        let old = encode_valkey_cursor(1_700_000_000_000, 3);
        assert_eq!(decode_valkey_frontier(&old).ok(), Some(Some(vec![(VALKEY_LEGACY_LANE, 1_700_000_000_000, 3)])));
    }

    #[test]
    fn malformed_valkey_frontiers_are_validation_errors() {
        for hex in [
            "0101",
            "0101000500",
            "010100020000010000",
            "0101008302000000",
            "0102",
            "0101ffffffffffffffffff7f",
            "02010100",
        ] {
            let cursor = StreamCursor::from_hex(hex).unwrap_or_default();
            assert!(matches!(decode_valkey_frontier(&cursor), Err(Error::Validation { .. })), "{hex}");
        }
    }

    #[test]
    fn frontiers_cover_per_lane() {
        let mut f = Frontier::at(Position::new(5, 0).in_lane(3));
        assert!(f.covers(Position::new(4, 9).in_lane(3)));
        assert!(!f.covers(Position::new(5, 1).in_lane(3)));
        assert!(!f.covers(Position::new(0, 1).in_lane(4)), "another lane is at its start");
        assert!(f.covers(Position::lane_start(9)));
        f.advance(Position::new(1, 0).in_lane(1));
        f.advance(Position::new(2, 0).in_lane(3));
        assert_eq!(f.get(3), Position::new(5, 0).in_lane(3), "never moves down");
        assert_eq!(f.positions().iter().map(|p| p.lane).collect::<Vec<_>>(), [1, 3]);
        let other = Frontier::from_positions([Position::new(9, 0).in_lane(1), Position::new(1, 0).in_lane(7)]);
        assert!(!f.covers_all(&other));
        let joined = f.joined(&other);
        assert!(joined.covers_all(&other) && joined.covers_all(&f));
        assert_eq!(joined.get(1), Position::new(9, 0).in_lane(1));
    }

    #[test]
    fn empty_cursor_means_tail_for_every_family() {
        let tail = StreamCursor::empty();
        assert_eq!(decode_valkey_cursor(&tail).ok(), Some(None));
        assert_eq!(decode_postgres_cursor(&tail).ok(), Some(None));
        assert_eq!(decode_sqlite_cursor(&tail).ok(), Some(None));
    }

    #[test]
    fn foreign_and_truncated_cursors_are_validation_errors() {
        let valkey = encode_valkey_cursor(1, 2);
        assert!(matches!(decode_postgres_cursor(&valkey), Err(Error::Validation { .. })));
        assert!(matches!(decode_sqlite_cursor(&valkey), Err(Error::Validation { .. })));
        let truncated = StreamCursor::new(valkey.as_bytes()[..10].to_vec());
        assert!(matches!(decode_valkey_cursor(&truncated), Err(Error::Validation { .. })));
        assert!(decode_postgres_cursor(&StreamCursor::new(vec![0x02, 0xff, 0, 0, 0, 0, 0, 0, 0])).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_position_round_trips(hi in 0u64.., lo in 0i64..) {
            proptest::prop_assert_eq!(decode_valkey_cursor(&encode_valkey_cursor(hi, lo as u64)).ok(), Some(Some((hi, lo as u64))));
            proptest::prop_assert_eq!(decode_sqlite_cursor(&encode_sqlite_cursor(lo)).ok(), Some(Some(lo)));
            let txid = hi >> 1;
            proptest::prop_assert_eq!(
                decode_postgres_cursor(&encode_postgres_cursor(txid, lo)).ok(),
                Some(Some(PostgresCursor { batch: None, txid: Some(txid), event_id: lo, key: None, fingerprint: None }))
            );
            proptest::prop_assert_eq!(
                decode_postgres_cursor(&encode_postgres_batch_cursor(txid, txid, lo)).ok(),
                Some(Some(PostgresCursor { batch: Some(txid), txid: Some(txid), event_id: lo, key: None, fingerprint: None }))
            );
        }

        /// The current Postgres form keeps any event id (negative ones too), any partition key
        /// (or none) and the fingerprint, and the positions it names order as `(event_id, key)`.
        #[test]
        fn postgres_tick_cursors_round_trip_any_event_id_and_key_in_order(
            batch in 0u64..(i64::MAX as u64), txid in 0u64..(i64::MAX as u64), a in proptest::num::i64::ANY,
            b in proptest::num::i64::ANY, ka in proptest::option::of(proptest::num::i16::ANY),
            kb in proptest::option::of(proptest::num::i16::ANY), fingerprint in proptest::num::u64::ANY,
        ) {
            let (wa, wb) = (Position::postgres_key_word(ka), Position::postgres_key_word(kb));
            let decoded = decode_postgres_cursor(&encode_postgres_tick_cursor(batch, txid, a, wa, fingerprint)).ok().flatten();
            proptest::prop_assert_eq!(
                decoded,
                Some(PostgresCursor { batch: Some(batch), txid: Some(txid), event_id: a, key: Some(wa), fingerprint: Some(fingerprint) })
            );
            let pa = decoded.and_then(|c| c.position());
            proptest::prop_assert_eq!(pa.map(|p| (p.postgres_event_id(), p.postgres_key(), p.check)), Some((a, wa, fingerprint)));
            let pb = Position::postgres(batch, txid, b, wb, 0);
            proptest::prop_assert_eq!(pa.map(|p| p.cmp(&pb)), Some((a, wa).cmp(&(b, wb))), "the fingerprint takes no part in the order");
        }

        #[test]
        fn arbitrary_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let cursor = StreamCursor::new(bytes.clone());
            for ok in [decode_valkey_cursor(&cursor).is_ok(), decode_postgres_cursor(&cursor).is_ok(), decode_sqlite_cursor(&cursor).is_ok()] {
                // Only the empty cursor or a well-formed one of its family decodes.
                proptest::prop_assert!(!ok || bytes.is_empty() || [9, 17, 25, 37].contains(&bytes.len()));
            }
            let hex = cursor.to_hex();
            proptest::prop_assert_eq!(StreamCursor::from_hex(&hex).ok(), Some(cursor));
        }
    }

    #[test]
    fn fuzzed_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..64usize {
            for _ in 0..64 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        (seed & 0xff) as u8
                    })
                    .collect();
                let cursor = StreamCursor::new(bytes);
                let _ = decode_valkey_cursor(&cursor);
                let _ = decode_valkey_frontier(&cursor);
                let _ = decode_postgres_cursor(&cursor);
                let _ = decode_sqlite_cursor(&cursor);
            }
        }
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let c = encode_sqlite_cursor(77);
        assert_eq!(StreamCursor::from_hex(&c.to_hex()).ok(), Some(c));
        assert!(StreamCursor::from_hex("0").is_err());
        assert!(StreamCursor::from_hex("zz").is_err());
        assert!(StreamCursor::from_hex("é1").is_err());
    }
}

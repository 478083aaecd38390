//! Decoding of outbox rows, shared by the SQL backends: every field is checked, and a bad row is
//! an `Err` naming what is wrong (the caller skips that one row), never a panic.

use std::collections::BTreeMap;
use std::fmt::{self, Debug, Write as _};
#[cfg(any(feature = "sqlite", feature = "valkey"))]
use std::time::Duration;

use super::seam::FamilyEvent;
use crate::cursor::StreamCursor;
use crate::event::{CompletionEvent, CompletionOutcome};
use crate::family::Family;
use crate::lease_history::{LeaseEntry, LeaseHistoryEvent};
use crate::signal_delivery::{SignalDeliveryEffect, SignalDeliveryEvent, SignalEntry};
use crate::trace_context::TraceParent;
use crate::types::{
    ExecutionId, FlowId, LeaseId, Namespace, PARTITION_COUNT, SignalId, TimestampMs, WaitpointId, WorkerInstanceId,
};

/// How many characters of a bad value a reason quotes: a huge value (a 1 MiB namespace, a
/// corrupt id) never makes a huge log line.
const SHOWN_CHARS: usize = 80;

/// A writer that keeps the first `SHOWN_CHARS` characters and then refuses more, so formatting
/// a huge value stops early instead of building all of it.
struct Clipped {
    text: String,
    chars: usize,
    clipped: bool,
}

impl fmt::Write for Clipped {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.chars == SHOWN_CHARS {
                self.clipped = true;
                return Err(fmt::Error);
            }
            self.text.push(c);
            self.chars += 1;
        }
        Ok(())
    }
}

/// `value`'s `Debug` form for a reason or a log line, cut after [`SHOWN_CHARS`] characters
/// (marked with `...`).
pub(crate) fn shown(value: &dyn Debug) -> String {
    let mut out = Clipped { text: String::new(), chars: 0, clipped: false };
    let _ = write!(out, "{value:?}");
    if out.clipped {
        out.text.push_str("...");
    }
    out.text
}

/// The commit time (ms since the epoch) before which a completion is older than `age` at
/// `now`. Saturates: an age beyond the representable past gives `i64::MIN` (nothing is older).
#[cfg(any(feature = "sqlite", feature = "valkey"))]
pub(crate) fn age_cutoff_ms(now: TimestampMs, age: Duration) -> i64 {
    let age_ms = i128::try_from(age.as_millis()).unwrap_or(i128::MAX);
    i64::try_from(i128::from(now.0).saturating_sub(age_ms)).unwrap_or(i64::MIN)
}

/// The columns of one `ff_completion_event` row, as text where the schema may vary.
#[derive(Clone, Debug, Default, sqlx::FromRow)]
pub(crate) struct OutboxRow {
    pub execution_id: Option<String>,
    pub flow_id: Option<String>,
    pub outcome: Option<String>,
    pub namespace: Option<String>,
    pub instance_tag: Option<String>,
    pub tags: Option<String>,
    pub occurred_at_ms: Option<i64>,
    pub partition_key: Option<i64>,
    /// The producer's W3C `traceparent` (absent in outboxes and rows from before it).
    #[sqlx(default)]
    pub traceparent: Option<String>,
}

fn tags(text: Option<&str>, instance_tag: Option<&str>) -> Result<BTreeMap<String, String>, String> {
    let mut map: BTreeMap<String, String> = match text {
        None | Some("") => BTreeMap::new(),
        Some(t) => match serde_json::from_str::<serde_json::Value>(t).map_err(|e| format!("tags: {e}"))? {
            serde_json::Value::Object(map) => map
                .into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect(),
            serde_json::Value::Null => BTreeMap::new(),
            _ => return Err("tags is not a JSON object".into()),
        },
    };
    // The original schema stores one denormalised `key=value` pair.
    if let Some((k, v)) = instance_tag.and_then(|t| t.split_once('=')) {
        map.entry(k.to_owned()).or_insert_with(|| v.to_owned());
    }
    Ok(map)
}

/// The columns of the lease-history and signal-delivery families in an outbox row (absent
/// columns read as `NULL`: a row without them is a completion).
#[derive(Clone, Debug, Default, sqlx::FromRow)]
// Every backend's reader decodes the other families.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres", feature = "valkey")), allow(dead_code))]
pub(crate) struct FamilyColumns {
    /// `NULL` or `completion`, `lease_history`, `signal_delivery`.
    #[sqlx(default)]
    pub family: Option<String>,
    #[sqlx(default)]
    pub lease_id: Option<String>,
    #[sqlx(default)]
    pub worker: Option<String>,
    #[sqlx(default)]
    pub revoked_by: Option<String>,
    #[sqlx(default)]
    pub signal_id: Option<String>,
    #[sqlx(default)]
    pub waitpoint_id: Option<String>,
    #[sqlx(default)]
    pub source_identity: Option<String>,
}

// Every backend's reader decodes the other families.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres", feature = "valkey")), allow(dead_code))]
impl FamilyColumns {
    /// The columns of a row of `family` whose fields the SQL readers send as one JSON array
    /// `[lease_id, worker, revoked_by, signal_id, waitpoint_id, source_identity]` (`None`: all
    /// `NULL`). A value that is not such an array is an `Err` naming the columns.
    // Valkey decodes its entries' fields one by one.
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub(crate) fn from_json_fields(family: &str, fields: Option<&str>) -> Result<Self, String> {
        let fields: [Option<String>; 6] = match fields {
            Some(json) => serde_json::from_str(json).map_err(|e| format!("family columns: {e}"))?,
            None => Default::default(),
        };
        let [lease_id, worker, revoked_by, signal_id, waitpoint_id, source_identity] = fields;
        Ok(Self {
            family: Some(family.to_owned()),
            lease_id,
            worker,
            revoked_by,
            signal_id,
            waitpoint_id,
            source_identity,
        })
    }

    /// The event of any family this row records, with `cursor` (the completion-form position)
    /// tagged with its family. An unknown family, an unknown lease kind or a missing field is
    /// an `Err` naming it: the row is skipped.
    pub(crate) fn decode(&self, row: &OutboxRow, cursor: StreamCursor) -> Result<FamilyEvent, String> {
        match self.family.as_deref() {
            None | Some("completion") => row.decode(cursor).map(FamilyEvent::Completion),
            Some("lease_history") => {
                let kind = row.kind()?;
                let event = LeaseHistoryEvent::from_wire(
                    kind,
                    Family::LeaseHistory.tag_cursor(cursor),
                    row.execution()?,
                    self.lease_id.as_deref().map(LeaseId::from),
                    self.worker.as_deref().map(WorkerInstanceId::from),
                    self.revoked_by.clone(),
                    row.at()?,
                )
                .map_err(|_| format!("lease history kind {} is unknown", shown(&kind)))?;
                Ok(FamilyEvent::LeaseHistory(LeaseEntry {
                    event,
                    namespace: row.namespace.as_deref().map(Namespace::from),
                    worker: self.worker.as_deref().map(WorkerInstanceId::from),
                }))
            }
            Some("signal_delivery") => {
                let signal_id =
                    self.signal_id.as_deref().filter(|s| !s.is_empty()).ok_or("signal_id is NULL or empty")?;
                let event = SignalDeliveryEvent::new(
                    Family::SignalDelivery.tag_cursor(cursor),
                    row.execution()?,
                    SignalId::from(signal_id),
                    self.waitpoint_id.as_deref().map(WaitpointId::from),
                    self.source_identity.clone(),
                    SignalDeliveryEffect::from_wire(row.kind()?),
                    row.at()?,
                );
                Ok(FamilyEvent::SignalDelivery(SignalEntry {
                    event,
                    namespace: row.namespace.as_deref().map(Namespace::from),
                }))
            }
            Some(other) => Err(format!("family {} is unknown", shown(&other))),
        }
    }
}

impl OutboxRow {
    fn execution(&self) -> Result<ExecutionId, String> {
        let uuid = self.execution_id.as_deref().ok_or("execution_id is NULL")?;
        let uuid = uuid::Uuid::parse_str(uuid).map_err(|e| format!("execution_id {}: {e}", shown(&uuid)))?;
        let partition = self.partition_key.ok_or("partition_key is NULL")?;
        let partition = u16::try_from(partition)
            .ok()
            .filter(|p| *p < PARTITION_COUNT)
            .ok_or_else(|| format!("partition_key {partition} out of range"))?;
        Ok(ExecutionId::from_parts(partition, uuid))
    }

    /// The event's kind within its family (the `outcome` column).
    fn kind(&self) -> Result<&str, String> {
        Ok(self.outcome.as_deref().filter(|o| !o.is_empty()).ok_or("outcome is NULL or empty")?)
    }

    fn at(&self) -> Result<TimestampMs, String> {
        Ok(TimestampMs(self.occurred_at_ms.ok_or("occurred_at_ms is NULL")?))
    }

    /// The completion this row records, with `cursor` as its position.
    pub(crate) fn decode(&self, cursor: StreamCursor) -> Result<CompletionEvent, String> {
        let execution_id = self.execution()?;
        let outcome = self.kind()?;
        let at = self.at()?;
        let flow_id = match &self.flow_id {
            Some(f) => {
                Some(FlowId::from_uuid(uuid::Uuid::parse_str(f).map_err(|e| format!("flow_id {}: {e}", shown(f)))?))
            }
            None => None,
        };
        let traceparent = TraceParent::lenient(self.traceparent.as_deref(), &execution_id);
        Ok(CompletionEvent::new(cursor, execution_id, CompletionOutcome::from_wire(outcome), at)
            .with_flow_id(flow_id)
            .with_namespace(self.namespace.as_deref().map(Namespace::from))
            .with_tags(tags(self.tags.as_deref(), self.instance_tag.as_deref())?)
            .with_traceparent(traceparent))
    }
}

/// Values the decoders' property tests put into rows and entries: empty, any unicode, numbers at
/// their limits, JSON, valid uuids, and huge (up to 1 MiB).
#[cfg(test)]
pub(crate) mod wild {
    use proptest::prelude::*;

    pub(crate) fn text() -> BoxedStrategy<String> {
        let odd = [
            i64::MIN.to_string(),
            i64::MAX.to_string(),
            u64::MAX.to_string(),
            "-0".into(),
            " 1".into(),
            "1e3".into(),
            "null".into(),
            "{}".into(),
            "[]".into(),
            "\0".into(),
            "\u{0}".into(),
            "=".into(),
            "é😀\u{202e}".into(),
        ];
        prop_oneof![
            Just(String::new()),
            ".{0,40}",
            "[0-9a-fA-F{}:=-]{0,40}",
            any::<i64>().prop_map(|n| n.to_string()),
            proptest::sample::select(odd.to_vec()),
            any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
            proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..4)
                .prop_map(|m| serde_json::to_string(&m).expect("a map of strings is JSON")),
            (0usize..=(1 << 20)).prop_map(|n| "x".repeat(n)),
        ]
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(any(feature = "sqlite", feature = "valkey"))]
    fn the_age_cutoff_is_now_minus_the_age() {
        assert_eq!(age_cutoff_ms(TimestampMs(10_000), Duration::from_secs(3)), 7_000);
        assert_eq!(age_cutoff_ms(TimestampMs(10_000), Duration::ZERO), 10_000);
        assert_eq!(age_cutoff_ms(TimestampMs(0), Duration::from_millis(5)), -5);
    }

    #[test]
    #[cfg(any(feature = "sqlite", feature = "valkey"))]
    fn a_huge_age_saturates_at_the_earliest_time_instead_of_overflowing() {
        let now = TimestampMs::now();
        assert_eq!(age_cutoff_ms(now, Duration::from_secs(u64::MAX / 2)), i64::MIN);
        assert_eq!(age_cutoff_ms(now, Duration::MAX), i64::MIN);
        assert_eq!(age_cutoff_ms(TimestampMs(i64::MIN), Duration::from_millis(1)), i64::MIN);
        assert_eq!(age_cutoff_ms(TimestampMs(i64::MAX), Duration::from_millis(i64::MAX as u64)), 0);
        assert_eq!(age_cutoff_ms(TimestampMs(-1), Duration::from_millis(i64::MAX as u64)), i64::MIN);
    }

    #[test]
    fn shown_values_are_cut_short_and_marked() {
        assert_eq!(shown(&"abc"), "\"abc\"");
        let huge = "é".repeat(1 << 20);
        let text = shown(&huge);
        assert_eq!(text.chars().count(), SHOWN_CHARS + 3, "{text}");
        assert!(text.starts_with("\"éé") && text.ends_with("..."), "{text}");
    }

    #[test]
    fn a_row_with_extreme_times_and_huge_text_decodes_with_them() {
        let namespace = "n".repeat(1 << 20);
        for at in [i64::MIN, -1, 0, i64::MAX] {
            let row = OutboxRow {
                execution_id: Some("6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b".into()),
                outcome: Some("success".into()),
                namespace: Some(namespace.clone()),
                occurred_at_ms: Some(at),
                partition_key: Some(255),
                ..OutboxRow::default()
            };
            let event = row.decode(StreamCursor::empty()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(event.at, TimestampMs(at));
            assert_eq!(event.namespace.as_ref().map(|n| n.as_str().len()), Some(1 << 20));
        }
    }

    #[test]
    fn a_row_carries_its_valid_traceparent_and_drops_a_malformed_one_without_failing() {
        let row = |traceparent: Option<&str>| OutboxRow {
            execution_id: Some("6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b".into()),
            outcome: Some("success".into()),
            occurred_at_ms: Some(1),
            partition_key: Some(3),
            traceparent: traceparent.map(str::to_owned),
            ..OutboxRow::default()
        };
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let decoded = |tp| row(tp).decode(StreamCursor::empty()).unwrap_or_else(|e| panic!("{e}")).traceparent;
        assert_eq!(decoded(Some(good)).map(|t| t.to_string()).as_deref(), Some(good));
        assert_eq!(decoded(Some("00-nope")), None, "a malformed one is dropped, the event kept");
        assert_eq!(decoded(Some("")), None);
        assert_eq!(decoded(None), None, "rows from before the column decode as they did");
    }

    #[test]
    fn a_huge_bad_value_gives_a_short_reason() {
        let row = OutboxRow {
            execution_id: Some("z".repeat(1 << 20)),
            outcome: Some("success".into()),
            occurred_at_ms: Some(1),
            partition_key: Some(1),
            ..OutboxRow::default()
        };
        match row.decode(StreamCursor::empty()) {
            Err(reason) => assert!(reason.starts_with("execution_id") && reason.len() < 400, "{reason}"),
            Ok(_) => panic!("a 1 MiB execution_id decoded"),
        }
    }
}

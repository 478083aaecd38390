//! Parsing of stream replies and decoding of stream entries.
//!
//! Shapes accepted: ferriskey reshapes `XRANGE` into `{id: [[field, value], ..]}`; the library's
//! `ff_read_after` returns plain RESP arrays (`[[id, [field, value, ..]], ..]`). A malformed
//! entry becomes a reason to skip that one entry, never an error for the batch.
//!
//! Entry fields: `execution_id` (`{fp:N}:<uuid>`), `outcome`, `occurred_at_ms` and
//! `partition` (N again) are required; `flow_id`, `namespace` and `tags` (a JSON object) may be
//! empty or absent. `family` is absent on a completion; `lease_history` and `signal_delivery`
//! entries carry their kind in `outcome` and their own fields (`lease_id`, `worker`,
//! `revoked_by`; `signal_id`, `waitpoint_id`, `source_identity`), decoded as the outbox rows of
//! the SQL backends are ([`FamilyColumns`]): an unknown family or lease kind, or a signal
//! without its id, is skipped; an unknown signal effect decodes as `Other`. A completion may
//! carry `traceparent` (the producer's W3C trace context; a malformed one is dropped with a
//! logged note, the entry kept). Fields this version does not know are ignored, so a newer producer adding
//! one does not make older readers skip its entries.

use ferriskey::Value;

use crate::backends::outbox::{FamilyColumns, OutboxRow, shown};
use crate::backends::seam::FamilyEvent;
use crate::cursor::{Position, encode_valkey_frontier};
use crate::types::ExecutionId;

/// One entry as read: its id text and its fields as text, or why they are not.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RawEntry {
    pub id: String,
    pub fields: Result<Vec<(String, String)>, String>,
}

/// One atomic look at the stream (`ff_read_after`).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct ReadView {
    /// Entries were removed at some point (trimmed or deleted).
    pub trimmed: bool,
    /// The first entry kept.
    pub first: Option<Position>,
    /// The last id ever generated.
    pub last_generated: Option<Position>,
    /// The entries after the requested position.
    pub entries: Vec<RawEntry>,
}

impl ReadView {
    /// The highest position at or below which entries may have been removed: a reader whose
    /// cursor is below it may have lost entries. `None` while nothing was ever removed.
    /// Trimming removes from the head, so only ids below the first kept entry can be gone.
    pub(super) fn floor(&self) -> Option<Position> {
        if !self.trimmed {
            return None;
        }
        match self.first {
            Some(first) => Some(just_below(first)),
            None => Some(self.last_generated.unwrap_or(Position::ZERO)),
        }
    }
}

/// The greatest stream id below `pos`.
fn just_below(pos: Position) -> Position {
    match pos.lo.checked_sub(1) {
        Some(lo) => Position::new(pos.hi, lo),
        None => Position::new(pos.hi.saturating_sub(1), u64::MAX),
    }
}

/// Parses `ms-seq`.
pub(super) fn parse_id(text: &str) -> Option<Position> {
    let (ms, seq) = text.split_once('-')?;
    Some(Position::new(ms.parse().ok()?, seq.parse().ok()?))
}

/// Formats a position as a stream id.
pub(super) fn format_id(pos: Position) -> String {
    format!("{}-{}", pos.hi, pos.lo)
}

/// The text of a scalar reply.
pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.to_vec()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The elements of an array or set reply (errors inside it are dropped).
fn items(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) => items.iter().filter_map(|r| r.as_ref().ok()).collect(),
        Value::Set(items) => items.iter().collect(),
        _ => Vec::new(),
    }
}

fn pair_text(k: &Value, v: &Value) -> Result<(String, String), String> {
    let key = text(k).ok_or_else(|| format!("a field name is not a string: {}", shown(k)))?;
    let value = text(v).ok_or_else(|| format!("field {} is not a string: {}", shown(&key), shown(v)))?;
    Ok((key, value))
}

/// An entry's fields, given as `[f, v, ..]`, `[[f, v], ..]` or a map.
fn fields(v: &Value) -> Result<Vec<(String, String)>, String> {
    match v {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| pair_text(k, v)).collect(),
        Value::Array(_) => {
            let list = items(v);
            if !list.is_empty() && list.iter().all(|i| matches!(i, Value::Array(_))) {
                list.iter()
                    .map(|pair| match items(pair).as_slice() {
                        [k, v] => pair_text(k, v),
                        other => Err(format!("a field pair has {} parts", other.len())),
                    })
                    .collect()
            } else if list.len().is_multiple_of(2) {
                list.chunks(2).map(|kv| pair_text(kv[0], kv[1])).collect()
            } else {
                Err("an odd number of field names and values".into())
            }
        }
        other => Err(format!("entry fields are not a list: {}", shown(other))),
    }
}

fn entry(id: &Value, f: &Value) -> RawEntry {
    RawEntry { id: text(id).unwrap_or_else(|| shown(id)), fields: fields(f) }
}

/// The entries of a range reply (map or array shape), in id order.
pub(super) fn range_entries(reply: &Value) -> Vec<RawEntry> {
    let mut out: Vec<RawEntry> = match reply {
        Value::Map(pairs) => pairs.iter().map(|(id, f)| entry(id, f)).collect(),
        Value::Array(_) => items(reply)
            .into_iter()
            .map(|e| match items(e).as_slice() {
                [id, f] => entry(id, f),
                _ => RawEntry { id: shown(e), fields: Err("not an [id, fields] pair".into()) },
            })
            .collect(),
        _ => Vec::new(),
    };
    out.sort_by_key(|e| parse_id(&e.id));
    out
}

/// Parses the reply of `ff_read_after`: `[trimmed, first id, last generated id, entries]`.
pub(super) fn read_view(reply: &Value) -> Result<ReadView, String> {
    let parts = items(reply);
    let [trimmed, first, last, entries] = parts.as_slice() else {
        return Err(format!("ff_read_after answered {}", shown(reply)));
    };
    let id = |v: &Value| text(v).and_then(|t| parse_id(&t));
    Ok(ReadView {
        trimmed: text(trimmed).as_deref() == Some("1"),
        first: id(first),
        last_generated: id(last),
        entries: range_entries(entries),
    })
}

/// Decodes one entry at `pos` (in its lane) into an event of its family, or names what is wrong
/// with it. The event's cursor names that lane only; a reader of several lanes gives it its own.
pub(super) fn decode_entry(pos: Position, fields: &[(String, String)]) -> Result<FamilyEvent, String> {
    let get = |name: &str| fields.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let present = |name: &str| get(name).filter(|v| !v.is_empty());
    let required = |name: &str| present(name).ok_or_else(|| format!("{name} is missing"));
    let id_text = required("execution_id")?;
    let id = ExecutionId::parse(&id_text)
        .map_err(|_| format!("execution_id {}: malformed execution id, expected {{fp:N}}:<uuid>", shown(&id_text)))?;
    let partition = required("partition")?;
    if partition.parse::<u16>().ok() != Some(id.partition()) {
        return Err(format!("partition {} does not match execution_id {}", shown(&partition), shown(&id_text)));
    }
    let at = required("occurred_at_ms")?;
    let at: i64 = at.parse().map_err(|_| format!("occurred_at_ms {} is not a number", shown(&at)))?;
    let row = OutboxRow {
        execution_id: Some(id.uuid().to_string()),
        flow_id: present("flow_id"),
        outcome: Some(required("outcome")?),
        namespace: present("namespace"),
        instance_tag: None,
        tags: present("tags"),
        occurred_at_ms: Some(at),
        partition_key: Some(i64::from(id.partition())),
        traceparent: present("traceparent"),
    };
    let columns = FamilyColumns {
        family: present("family"),
        lease_id: present("lease_id"),
        worker: present("worker"),
        revoked_by: present("revoked_by"),
        signal_id: present("signal_id"),
        waitpoint_id: present("waitpoint_id"),
        source_identity: present("source_identity"),
    };
    columns.decode(&row, encode_valkey_frontier(&[(pos.lane, pos.hi, pos.lo)]))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::backends::outbox::wild;
    use crate::event::{CompletionEvent, CompletionOutcome};

    /// The completion an entry decodes to (an entry of another family is an error here).
    fn decode_completion(pos: Position, fields: &[(String, String)]) -> Result<CompletionEvent, String> {
        match decode_entry(pos, fields)? {
            FamilyEvent::Completion(event) => Ok(event),
            other => Err(format!("not a completion: {other:?}")),
        }
    }

    fn s(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec().into())
    }

    fn good() -> Vec<(String, String)> {
        [
            ("execution_id", "{fp:1}:6f1f4a52-9d8e-4c3f-a1b2-3c4d5e6f7a8b"),
            ("flow_id", "0d01cf28-f04e-4b6c-b611-533c7036ba8f"),
            ("outcome", "success"),
            ("namespace", "ns"),
            ("tags", r#"{"inst":"1"}"#),
            ("occurred_at_ms", "12"),
            ("partition", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn ids_parse_and_format() {
        assert_eq!(parse_id("1700-3"), Some(Position::new(1700, 3)));
        assert_eq!(parse_id("x-1"), None);
        assert_eq!(parse_id("17"), None);
        assert_eq!(format_id(Position::new(5, 6)), "5-6");
        assert_eq!(just_below(Position::new(5, 0)), Position::new(4, u64::MAX));
        assert_eq!(just_below(Position::new(5, 2)), Position::new(5, 1));
    }

    #[test]
    fn every_reply_shape_parses_in_id_order() {
        let flat = Value::Array(vec![Ok(s("outcome")), Ok(s("success"))]);
        let resp = Value::Array(vec![
            Ok(Value::Array(vec![Ok(s("2-0")), Ok(flat.clone())])),
            Ok(Value::Array(vec![Ok(s("1-0")), Ok(flat)])),
        ]);
        let ids: Vec<_> = range_entries(&resp).into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["1-0", "2-0"]);
        let pairs = Value::Array(vec![Ok(Value::Array(vec![Ok(s("outcome")), Ok(s("failed"))]))]);
        let entries = range_entries(&Value::Map(vec![(s("3-1"), pairs)]));
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].fields, Ok(vec![("outcome".to_owned(), "failed".to_owned())]));
        assert!(range_entries(&Value::Nil).is_empty());
    }

    #[test]
    fn the_read_view_knows_what_was_trimmed() {
        let reply = Value::Array(vec![Ok(Value::Int(1)), Ok(s("7-0")), Ok(s("9-4")), Ok(Value::Array(vec![]))]);
        let view = read_view(&reply).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(view.floor(), Some(Position::new(6, u64::MAX)));
        let emptied = ReadView { trimmed: true, last_generated: Some(Position::new(9, 4)), ..ReadView::default() };
        assert_eq!(emptied.floor(), Some(Position::new(9, 4)));
        assert_eq!(ReadView { first: Some(Position::new(7, 0)), ..ReadView::default() }.floor(), None);
        assert!(read_view(&Value::Nil).is_err());
    }

    #[test]
    fn a_good_entry_decodes_with_every_field() {
        let event = decode_completion(Position::new(12, 3), &good()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.execution_id.partition(), 1);
        assert_eq!(event.outcome, CompletionOutcome::Success);
        assert_eq!(event.namespace.as_ref().map(|n| n.as_str()), Some("ns"));
        assert_eq!(event.tags.get("inst").map(String::as_str), Some("1"));
        assert_eq!(event.at.0, 12);
        assert!(event.flow_id.is_some());
        assert_eq!(crate::cursor::decode_valkey_frontier(&event.cursor).ok(), Some(Some(vec![(0, 12, 3)])));
    }

    #[test]
    fn lease_and_signal_entries_decode_to_their_family_with_a_tagged_cursor() {
        let with = |extra: &[(&str, &str)]| {
            let mut fields = good();
            fields.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            decode_entry(Position::new(12, 3), &fields)
        };
        let lease = [("family", "lease_history"), ("outcome", "revoked"), ("lease_id", "l1"), ("worker", "w")];
        match with(&[&lease[..], &[("revoked_by", "op")]].concat()) {
            Ok(FamilyEvent::LeaseHistory(entry)) => {
                assert_eq!(entry.event.wire_kind(), "revoked");
                assert_eq!(entry.event.cursor().as_bytes()[1], crate::cursor::LEASE_HISTORY_CURSOR_TAG);
                assert_eq!(entry.worker.map(|w| w.as_str().to_owned()).as_deref(), Some("w"));
            }
            other => panic!("{other:?}"),
        }
        let signal = [("family", "signal_delivery"), ("outcome", "later"), ("signal_id", "s"), ("waitpoint_id", "wp")];
        match with(&signal) {
            Ok(FamilyEvent::SignalDelivery(entry)) => {
                assert_eq!(entry.event.effect, crate::signal_delivery::SignalDeliveryEffect::Other("later".into()));
                assert_eq!(entry.event.cursor.as_bytes()[1], crate::cursor::SIGNAL_DELIVERY_CURSOR_TAG);
            }
            other => panic!("{other:?}"),
        }
        for (bad, says) in [
            (&[("family", "lease_history"), ("outcome", "stolen")][..], "stolen"),
            (&[("family", "signal_delivery")][..], "signal_id"),
            (&[("family", "instance_tags")][..], "family"),
        ] {
            match with(bad) {
                Err(reason) => assert!(reason.contains(says), "{reason} should mention {says}"),
                Ok(event) => panic!("{bad:?} decoded: {event:?}"),
            }
        }
    }

    #[test]
    fn unknown_outcomes_and_unknown_fields_still_decode() {
        let mut fields = good();
        fields.push(("added_later".into(), "x".into()));
        fields.retain(|(k, _)| k != "outcome");
        fields.push(("outcome".into(), "paused".into()));
        let event = decode_completion(Position::new(1, 0), &fields).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.outcome, CompletionOutcome::Other("paused".into()));
    }

    #[test]
    fn each_kind_of_bad_entry_names_what_is_wrong() {
        let cases: [(&str, Option<&str>, &str); 8] = [
            ("execution_id", None, "execution_id is missing"),
            ("execution_id", Some("nope"), "malformed execution id"),
            ("outcome", None, "outcome is missing"),
            ("occurred_at_ms", Some("soon"), "not a number"),
            ("partition", Some("2"), "does not match"),
            ("partition", None, "partition is missing"),
            ("tags", Some("[1]"), "not a JSON object"),
            ("flow_id", Some("x"), "flow_id"),
        ];
        for (field, value, says) in cases {
            let mut fields = good();
            fields.retain(|(k, _)| k != field);
            if let Some(v) = value {
                fields.push((field.to_owned(), v.to_owned()));
            }
            match decode_completion(Position::new(1, 0), &fields) {
                Err(reason) => assert!(reason.contains(says), "{reason} should mention {says}"),
                Ok(_) => panic!("an entry that should mention {says} decoded"),
            }
        }
    }

    #[test]
    fn malformed_field_lists_are_reasons_not_panics() {
        assert!(fields(&Value::Array(vec![Ok(s("odd"))])).is_err());
        assert!(fields(&Value::Array(vec![Ok(Value::Array(vec![Ok(s("a"))]))])).is_err());
        assert!(fields(&Value::Array(vec![Ok(Value::Nil), Ok(s("v"))])).is_err());
        assert!(fields(&Value::Int(3)).is_err());
        let bad = range_entries(&Value::Array(vec![Ok(s("lonely"))]));
        assert!(bad[0].fields.is_err());
    }

    const FIELDS: [&str; 7] =
        ["execution_id", "flow_id", "outcome", "namespace", "tags", "occurred_at_ms", "partition"];

    /// Wild values plus the ones that get past the first checks: execution ids of any
    /// partition, partition numbers, stream ids and field names.
    fn value() -> BoxedStrategy<String> {
        prop_oneof![
            3 => wild::text(),
            1 => (0u32..300, any::<u128>()).prop_map(|(p, u)| format!("{{fp:{p}}}:{}", uuid::Uuid::from_u128(u))),
            1 => (0u32..300).prop_map(|p| p.to_string()),
            1 => (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| format!("{ms}-{seq}")),
            1 => proptest::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
        ]
        .boxed()
    }

    /// One change to a valid entry.
    #[derive(Clone, Debug)]
    enum Change {
        Drop(&'static str),
        Replace(&'static str, String),
        Repeat(&'static str, String),
        Add(String, String),
    }

    fn change() -> impl Strategy<Value = Change> {
        let field = || proptest::sample::select(FIELDS.to_vec());
        prop_oneof![
            field().prop_map(Change::Drop),
            (field(), value()).prop_map(|(f, v)| Change::Replace(f, v)),
            (field(), value()).prop_map(|(f, v)| Change::Repeat(f, v)),
            (prop_oneof!["[a-z_]{0,16}", wild::text()], value()).prop_map(|(f, v)| Change::Add(f, v)),
        ]
    }

    fn apply(fields: &mut Vec<(String, String)>, change: Change) {
        match change {
            Change::Drop(f) => fields.retain(|(k, _)| k != f),
            Change::Replace(f, v) => match fields.iter_mut().find(|(k, _)| k == f) {
                Some(slot) => slot.1 = v,
                None => fields.push((f.to_owned(), v)),
            },
            // A field given twice: the last one counts.
            Change::Repeat(f, v) => fields.push((f.to_owned(), v)),
            Change::Add(f, v) => fields.push((f, v)),
        }
    }

    /// The value of `name` as the decoder reads it: the last one, and empty counts as absent.
    fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
        fields.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
    }

    /// The fields the decoder must refuse the entry for, by the rules in the module docs.
    fn wrong_fields(fields: &[(String, String)]) -> Vec<&'static str> {
        let id = field(fields, "execution_id").and_then(|t| ExecutionId::parse(t).ok());
        let partition = field(fields, "partition").and_then(|p| p.parse::<u16>().ok());
        let tags_ok = field(fields, "tags").is_none_or(|t| {
            matches!(
                serde_json::from_str::<serde_json::Value>(t),
                Ok(serde_json::Value::Object(_) | serde_json::Value::Null)
            )
        });
        let checks = [
            ("execution_id", id.is_some()),
            ("partition", id.is_some_and(|id| partition == Some(id.partition()))),
            ("occurred_at_ms", field(fields, "occurred_at_ms").is_some_and(|t| t.parse::<i64>().is_ok())),
            ("outcome", field(fields, "outcome").is_some()),
            ("flow_id", field(fields, "flow_id").is_none_or(|f| uuid::Uuid::parse_str(f).is_ok())),
            ("tags", tags_ok),
        ];
        checks.into_iter().filter(|(_, ok)| !ok).map(|(name, _)| name).collect()
    }

    /// Any reply value: scalars of every kind (ids, field names, wild text, bytes that are not
    /// UTF-8), nested arrays (with error elements), maps and sets, a few levels deep, and the
    /// shapes the parsers look for (`[id, fields]`, four-part views).
    fn reply() -> impl Strategy<Value = Value> {
        let scalar_text = prop_oneof![
            value(),
            Just("1".to_owned()),
            Just("0".to_owned()),
            Just(format!("{}-{}", u64::MAX, u64::MAX)),
        ];
        let leaf = prop_oneof![
            Just(Value::Nil),
            Just(Value::Okay),
            any::<i64>().prop_map(Value::Int),
            scalar_text.clone().prop_map(|t| Value::BulkString(t.into_bytes().into())),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(|b| Value::BulkString(b.into())),
            scalar_text.prop_map(Value::SimpleString),
            any::<f64>().prop_map(Value::Double),
            any::<bool>().prop_map(Value::Boolean),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            let element = prop_oneof![
                6 => inner.clone().prop_map(Ok),
                1 => Just(()).prop_map(|_| Err(ferriskey::Error::from((ferriskey::ErrorKind::ResponseError, "boom")))),
            ];
            prop_oneof![
                proptest::collection::vec(element, 0..6).prop_map(Value::Array),
                proptest::collection::vec((inner.clone(), inner.clone()), 0..4).prop_map(Value::Map),
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Set),
                (inner.clone(), inner.clone()).prop_map(|(id, f)| Value::Array(vec![Ok(id), Ok(f)])),
                proptest::collection::vec(inner, 4).prop_map(|parts| Value::Array(parts.into_iter().map(Ok).collect())),
            ]
        })
    }

    /// Entries come back sorted by id, unparseable ids first.
    fn in_id_order(entries: &[RawEntry]) -> bool {
        entries.windows(2).all(|w| parse_id(&w[0].id) <= parse_id(&w[1].id))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// A valid entry with fields dropped, replaced, given twice or added, with wild values
        /// (extreme numbers, huge or unicode text, empty): it decodes to exactly its fields when
        /// they are still valid, and otherwise the error starts with the name of a wrong field.
        #[test]
        fn a_valid_entry_with_wild_fields_decodes_to_them_or_names_a_wrong_one(
            changes in proptest::collection::vec(change(), 1..5),
            hi in any::<u64>(),
            lo in any::<u64>(),
        ) {
            let mut fields = good();
            for c in changes {
                apply(&mut fields, c);
            }
            let wrong = wrong_fields(&fields);
            match decode_completion(Position::new(hi, lo), &fields) {
                Ok(event) => {
                    prop_assert!(wrong.is_empty(), "decoded although {wrong:?} are wrong");
                    let get = |name| field(&fields, name);
                    prop_assert_eq!(Some(event.execution_id), get("execution_id").and_then(|t| ExecutionId::parse(t).ok()));
                    prop_assert_eq!(Some(event.outcome.clone()), get("outcome").map(CompletionOutcome::from_wire));
                    prop_assert_eq!(Some(event.at.0), get("occurred_at_ms").and_then(|t| t.parse().ok()));
                    prop_assert_eq!(event.namespace.as_ref().map(|n| n.as_str()), get("namespace"));
                    prop_assert_eq!(event.flow_id.map(|f| f.to_string()), get("flow_id").and_then(|f| uuid::Uuid::parse_str(f).ok()).map(|u| u.to_string()));
                    if let Some(Ok(serde_json::Value::Object(map))) = get("tags").map(serde_json::from_str::<serde_json::Value>) {
                        prop_assert_eq!(event.tags.len(), map.len());
                    }
                    prop_assert_eq!(crate::cursor::decode_valkey_frontier(&event.cursor).ok(), Some(Some(vec![(0, hi, lo)])));
                }
                Err(reason) => {
                    prop_assert!(!wrong.is_empty(), "a valid entry was refused: {reason}");
                    prop_assert!(wrong.iter().any(|f| reason.starts_with(f)), "{reason:?} names none of {wrong:?}");
                    prop_assert!(reason.len() < 1000, "a reason of {} bytes", reason.len());
                }
            }
        }

        /// Whatever a server or a proxy answers, the reply parsers return entries (in id order)
        /// or reasons, never panic, and keep what they quote short.
        #[test]
        fn any_reply_value_parses_to_entries_or_reasons_without_panicking(reply in reply()) {
            for entries in [range_entries(&reply)] {
                prop_assert!(in_id_order(&entries));
                for e in &entries {
                    if let Err(reason) = &e.fields {
                        prop_assert!(reason.len() < 1000, "a reason of {} bytes", reason.len());
                    }
                }
            }
            match read_view(&reply) {
                Ok(view) => {
                    prop_assert_eq!(items(&reply).len(), 4);
                    prop_assert!(in_id_order(&view.entries));
                    let _ = view.floor();
                }
                Err(reason) => {
                    prop_assert_ne!(items(&reply).len(), 4);
                    prop_assert!(reason.len() < 1000, "a reason of {} bytes", reason.len());
                }
            }
            if let Ok(list) = fields(&reply) {
                prop_assert!(matches!(reply, Value::Map(_) | Value::Array(_)));
                let _ = decode_completion(Position::new(1, 1), &list);
            }
        }
    }
}

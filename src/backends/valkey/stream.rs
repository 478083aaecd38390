//! Parsing of stream replies and decoding of stream entries.
//!
//! Shapes accepted: ferriskey reshapes `XREAD` into `{stream: {id: [[field, value], ..]}}`
//! (`Nil` on timeout) and `XRANGE` into `{id: [[field, value], ..]}`; the library's
//! `ff_read_after` returns plain RESP arrays (`[[id, [field, value, ..]], ..]`). A malformed
//! entry becomes a reason to skip that one entry, never an error for the batch.
//!
//! Entry fields: `execution_id` (`{fp:N}:<uuid>`), `outcome`, `occurred_at_ms` and
//! `partition` (N again) are required; `flow_id`, `namespace` and `tags` (a JSON object) may be
//! empty or absent. Fields this version does not know are ignored, so a newer producer adding
//! one does not make older readers skip its entries.

use ferriskey::Value;

use crate::backends::outbox::OutboxRow;
use crate::cursor::{Position, encode_valkey_cursor};
use crate::event::CompletionEvent;
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
    let key = text(k).ok_or_else(|| format!("a field name is not a string: {k:?}"))?;
    let value = text(v).ok_or_else(|| format!("field {key} is not a string: {v:?}"))?;
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
        other => Err(format!("entry fields are not a list: {other:?}")),
    }
}

fn entry(id: &Value, f: &Value) -> RawEntry {
    RawEntry { id: text(id).unwrap_or_else(|| format!("{id:?}")), fields: fields(f) }
}

/// The entries of a range reply (map or array shape), in id order.
pub(super) fn range_entries(reply: &Value) -> Vec<RawEntry> {
    let mut out: Vec<RawEntry> = match reply {
        Value::Map(pairs) => pairs.iter().map(|(id, f)| entry(id, f)).collect(),
        Value::Array(_) => items(reply)
            .into_iter()
            .map(|e| match items(e).as_slice() {
                [id, f] => entry(id, f),
                _ => RawEntry { id: format!("{e:?}"), fields: Err("not an [id, fields] pair".into()) },
            })
            .collect(),
        _ => Vec::new(),
    };
    out.sort_by_key(|e| parse_id(&e.id));
    out
}

/// The entries of an `XREAD` reply (`Nil` on timeout gives none).
pub(super) fn read_entries(reply: &Value) -> Vec<RawEntry> {
    let mut out: Vec<RawEntry> = match reply {
        Value::Map(streams) => streams.iter().flat_map(|(_, entries)| range_entries(entries)).collect(),
        Value::Array(_) => items(reply)
            .into_iter()
            .flat_map(|s| match items(s).as_slice() {
                [_, entries] => range_entries(entries),
                _ => Vec::new(),
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
        return Err(format!("ff_read_after answered {reply:?}"));
    };
    let id = |v: &Value| text(v).and_then(|t| parse_id(&t));
    Ok(ReadView {
        trimmed: text(trimmed).as_deref() == Some("1"),
        first: id(first),
        last_generated: id(last),
        entries: range_entries(entries),
    })
}

/// Decodes one entry at `pos` into an event, or names what is wrong with it.
pub(super) fn decode_entry(pos: Position, fields: &[(String, String)]) -> Result<CompletionEvent, String> {
    let get = |name: &str| fields.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let present = |name: &str| get(name).filter(|v| !v.is_empty());
    let required = |name: &str| present(name).ok_or_else(|| format!("{name} is missing"));
    let id_text = required("execution_id")?;
    let id = ExecutionId::parse(&id_text).map_err(|e| e.to_string())?;
    let partition = required("partition")?;
    if partition.parse::<u16>().ok() != Some(id.partition()) {
        return Err(format!("partition {partition:?} does not match execution_id {id_text:?}"));
    }
    let at = required("occurred_at_ms")?;
    let at: i64 = at.parse().map_err(|_| format!("occurred_at_ms {at:?} is not a number"))?;
    let row = OutboxRow {
        execution_id: Some(id.uuid().to_string()),
        flow_id: present("flow_id"),
        outcome: Some(required("outcome")?),
        namespace: present("namespace"),
        instance_tag: None,
        tags: present("tags"),
        occurred_at_ms: Some(at),
        partition_key: Some(i64::from(id.partition())),
    };
    row.decode(encode_valkey_cursor(pos.hi, pos.lo))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::event::CompletionOutcome;

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
        let map = Value::Map(vec![(s("ff:completions"), Value::Map(vec![(s("3-1"), pairs)]))]);
        let entries = read_entries(&map);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].fields, Ok(vec![("outcome".to_owned(), "failed".to_owned())]));
        assert!(read_entries(&Value::Nil).is_empty());
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
        let event = decode_entry(Position::new(12, 3), &good()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.execution_id.partition(), 1);
        assert_eq!(event.outcome, CompletionOutcome::Success);
        assert_eq!(event.namespace.as_ref().map(|n| n.as_str()), Some("ns"));
        assert_eq!(event.tags.get("inst").map(String::as_str), Some("1"));
        assert_eq!(event.at.0, 12);
        assert!(event.flow_id.is_some());
        assert_eq!(crate::cursor::decode_valkey_cursor(&event.cursor).ok(), Some(Some((12, 3))));
    }

    #[test]
    fn unknown_outcomes_and_unknown_fields_still_decode() {
        let mut fields = good();
        fields.push(("added_later".into(), "x".into()));
        fields.retain(|(k, _)| k != "outcome");
        fields.push(("outcome".into(), "paused".into()));
        let event = decode_entry(Position::new(1, 0), &fields).unwrap_or_else(|e| panic!("{e}"));
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
            match decode_entry(Position::new(1, 0), &fields) {
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

    proptest! {
        #[test]
        fn arbitrary_entries_decode_or_fail_cleanly(
            pairs in proptest::collection::vec(("[a-z_]{0,16}", ".{0,40}"), 0..10),
        ) {
            let _ = decode_entry(Position::new(1, 1), &pairs);
        }
    }
}

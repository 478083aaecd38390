//! Decoding of outbox rows, shared by the SQL backends: every field is checked, and a bad row is
//! an `Err` naming what is wrong (the caller skips that one row), never a panic.

use std::collections::BTreeMap;

use crate::cursor::StreamCursor;
use crate::event::{CompletionEvent, CompletionOutcome};
use crate::types::{ExecutionId, FlowId, Namespace, PARTITION_COUNT, TimestampMs};

/// The columns of one `ff_completion_event` row, as text where the schema may vary.
#[derive(Clone, Debug, Default)]
pub(crate) struct OutboxRow {
    pub execution_id: Option<String>,
    pub flow_id: Option<String>,
    pub outcome: Option<String>,
    pub namespace: Option<String>,
    pub instance_tag: Option<String>,
    pub tags: Option<String>,
    pub occurred_at_ms: Option<i64>,
    pub partition_key: Option<i64>,
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

impl OutboxRow {
    /// The event this row records, with `cursor` as its position.
    pub(crate) fn decode(&self, cursor: StreamCursor) -> Result<CompletionEvent, String> {
        let uuid = self.execution_id.as_deref().ok_or("execution_id is NULL")?;
        let uuid = uuid::Uuid::parse_str(uuid).map_err(|e| format!("execution_id {uuid:?}: {e}"))?;
        let partition = self.partition_key.ok_or("partition_key is NULL")?;
        let partition = u16::try_from(partition)
            .ok()
            .filter(|p| *p < PARTITION_COUNT)
            .ok_or_else(|| format!("partition_key {partition} out of range"))?;
        let outcome = self.outcome.as_deref().filter(|o| !o.is_empty()).ok_or("outcome is NULL or empty")?;
        let at = self.occurred_at_ms.ok_or("occurred_at_ms is NULL")?;
        let flow_id = match &self.flow_id {
            Some(f) => Some(FlowId::from_uuid(uuid::Uuid::parse_str(f).map_err(|e| format!("flow_id {f:?}: {e}"))?)),
            None => None,
        };
        Ok(CompletionEvent::new(
            cursor,
            ExecutionId::from_parts(partition, uuid),
            CompletionOutcome::from_wire(outcome),
            TimestampMs(at),
        )
        .with_flow_id(flow_id)
        .with_namespace(self.namespace.as_deref().map(Namespace::from))
        .with_tags(tags(self.tags.as_deref(), self.instance_tag.as_deref())?))
    }
}

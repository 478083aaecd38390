//! The signal-delivery family: what delivering a signal to a waitpoint did (satisfied it, was
//! buffered for it, was a duplicate), the filter a subscriber gives, and the stream it reads.

use crate::cursor::StreamCursor;
use crate::types::{ExecutionId, Namespace, SignalId, TimestampMs, WaitpointId};

/// What a signal delivery did to its waitpoint.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum SignalDeliveryEffect {
    /// The waitpoint was open: it is satisfied and the execution eligible again.
    Satisfied,
    /// No waitpoint was open yet: the signal waits and is consumed when one opens.
    Buffered,
    /// A delivery with the same idempotency key was seen before: nothing changed.
    Deduped,
    /// An effect this version does not know; the raw wire string is kept.
    Other(String),
}

impl SignalDeliveryEffect {
    /// Maps a wire string; unknown strings become [`SignalDeliveryEffect::Other`], never an
    /// error.
    pub fn from_wire(s: &str) -> Self {
        match s {
            "satisfied" => Self::Satisfied,
            "buffered" => Self::Buffered,
            "deduped" => Self::Deduped,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The wire string producers write.
    pub fn as_wire(&self) -> &str {
        match self {
            Self::Satisfied => "satisfied",
            Self::Buffered => "buffered",
            Self::Deduped => "deduped",
            Self::Other(s) => s,
        }
    }
}

impl std::fmt::Display for SignalDeliveryEffect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_wire())
    }
}

/// One signal delivery, as a subscriber receives it. Built by [`SignalDeliveryEvent::new`];
/// fields may be added in later versions.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SignalDeliveryEvent {
    /// Where to resume from to receive the events after this one.
    pub cursor: StreamCursor,
    /// The execution the signal was sent to.
    pub execution_id: ExecutionId,
    /// The signal.
    pub signal_id: SignalId,
    /// The waitpoint it targets, when the sender named one.
    pub waitpoint_id: Option<WaitpointId>,
    /// Who sent it, when known.
    pub source_identity: Option<String>,
    /// What it did.
    pub effect: SignalDeliveryEffect,
    /// When the producer committed it (backend clock).
    pub at: TimestampMs,
}

impl SignalDeliveryEvent {
    /// A delivery with every field.
    pub fn new(
        cursor: StreamCursor,
        execution_id: ExecutionId,
        signal_id: SignalId,
        waitpoint_id: Option<WaitpointId>,
        source_identity: Option<String>,
        effect: SignalDeliveryEffect,
        at: TimestampMs,
    ) -> Self {
        Self { cursor, execution_id, signal_id, waitpoint_id, source_identity, effect, at }
    }
}

/// Which signal deliveries a subscriber wants: an execution, a namespace, a waitpoint, any of
/// them or none. Values match exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct SignalDeliveryFilter {
    /// Only this execution.
    pub execution_id: Option<ExecutionId>,
    /// Only executions of this namespace.
    pub namespace: Option<Namespace>,
    /// Only signals to this waitpoint.
    pub waitpoint_id: Option<WaitpointId>,
}

impl SignalDeliveryFilter {
    /// The filter that accepts everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Restricts to one execution.
    #[must_use]
    pub fn with_execution(mut self, id: ExecutionId) -> Self {
        self.execution_id = Some(id);
        self
    }

    /// Restricts to one namespace.
    #[must_use]
    pub fn with_namespace(mut self, ns: Namespace) -> Self {
        self.namespace = Some(ns);
        self
    }

    /// Restricts to one waitpoint.
    #[must_use]
    pub fn with_waitpoint(mut self, waitpoint: WaitpointId) -> Self {
        self.waitpoint_id = Some(waitpoint);
        self
    }

    /// Whether `entry` matches.
    pub(crate) fn matches(&self, entry: &SignalEntry) -> bool {
        self.execution_id.as_ref().is_none_or(|id| *id == entry.event.execution_id)
            && self.namespace.as_ref().is_none_or(|ns| entry.namespace.as_ref() == Some(ns))
            && self.waitpoint_id.as_ref().is_none_or(|w| entry.event.waitpoint_id.as_ref() == Some(w))
    }
}

/// A signal-delivery event as the tree carries it: with the row's namespace, which filters
/// match on but the event does not carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalEntry {
    pub(crate) event: SignalDeliveryEvent,
    pub(crate) namespace: Option<Namespace>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::FlowId;

    #[test]
    fn effects_round_trip_and_unknown_strings_become_other() {
        for effect in [SignalDeliveryEffect::Satisfied, SignalDeliveryEffect::Buffered, SignalDeliveryEffect::Deduped] {
            assert_eq!(SignalDeliveryEffect::from_wire(effect.as_wire()), effect);
        }
        assert_eq!(SignalDeliveryEffect::from_wire("throttled"), SignalDeliveryEffect::Other("throttled".into()));
        assert_eq!(SignalDeliveryEffect::Other("x".into()).as_wire(), "x");
    }

    #[test]
    fn an_event_keeps_every_field_and_the_filter_matches_exactly() {
        let exec = ExecutionId::new_in(&FlowId::new());
        let cursor = StreamCursor::new(vec![0x03, 0xf2, 0, 0, 0, 0, 0, 0, 0, 1]);
        let event = SignalDeliveryEvent::new(
            cursor.clone(),
            exec,
            SignalId::new("s-1"),
            Some(WaitpointId::new("wp")),
            Some("billing".into()),
            SignalDeliveryEffect::Buffered,
            TimestampMs(7),
        );
        assert_eq!(
            (&event.cursor, event.execution_id, event.signal_id.as_str(), event.at),
            (&cursor, exec, "s-1", TimestampMs(7))
        );
        assert_eq!(
            (event.waitpoint_id.as_ref().map(WaitpointId::as_str), event.source_identity.as_deref()),
            (Some("wp"), Some("billing"))
        );
        let entry = SignalEntry { event, namespace: Some(Namespace::new("a")) };
        assert!(SignalDeliveryFilter::new().matches(&entry));
        assert!(SignalDeliveryFilter::new().with_waitpoint("wp".into()).with_execution(exec).matches(&entry));
        assert!(!SignalDeliveryFilter::new().with_waitpoint("WP".into()).matches(&entry));
        assert!(!SignalDeliveryFilter::new().with_namespace(Namespace::new("b")).matches(&entry));
    }
}

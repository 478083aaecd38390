//! W3C trace context across the event: a producer may record the `traceparent` of its span
//! with the completion (a column of the outbox, a field of the stream entry); the event carries
//! it as a [`TraceParent`]. A value that is not a valid `traceparent` is dropped with a logged
//! note, never failing the event. With the cargo feature `opentelemetry`, the tree's delivery
//! span of such an event continues the producer's trace and links to its span.

use std::fmt;

use crate::error::Error;

/// A W3C trace context `traceparent` (`00-<trace id>-<parent id>-<flags>`, lowercase hex): the
/// span of the producer that committed a completion. Parsed strictly: 2-digit version (not
/// `ff`), 32-digit trace id and 16-digit parent id (neither all zeros), 2-digit flags; a
/// version above `00` may carry more fields after a `-`, which are ignored. Displayed (and
/// stored) in the version `00` form.
///
/// ```
/// use ff_completions::TraceParent;
///
/// let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")?;
/// assert!(tp.is_sampled());
/// assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert!(TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_err());
/// # Ok::<(), ff_completions::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl TraceParent {
    /// A trace context from its parts.
    ///
    /// # Errors
    /// [`Error::Validation`] when the trace id or the parent id is all zeros (invalid in W3C).
    pub fn new(trace_id: [u8; 16], parent_id: [u8; 8], flags: u8) -> Result<Self, Error> {
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return Err(Error::validation("a traceparent's trace id and parent id must not be all zeros"));
        }
        Ok(Self { trace_id, parent_id, flags })
    }

    /// Parses a `traceparent` header value.
    ///
    /// # Errors
    /// [`Error::Validation`] naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::validation(format!("traceparent {:?}: {why}", clip(text)));
        let bytes = text.as_bytes();
        if bytes.len() < 55 {
            return Err(bad("shorter than 55 characters"));
        }
        let version = hex_field::<1>(&bytes[0..2]).ok_or_else(|| bad("version is not 2 lowercase hex digits"))?;
        match (version[0], bytes.len()) {
            (0xff, _) => return Err(bad("version ff is invalid")),
            (0, 55) => {}
            (0, _) => return Err(bad("version 00 is exactly 55 characters")),
            (_, 55) => {}
            (_, _) if bytes[55] == b'-' => {}
            _ => return Err(bad("fields after the flags must follow a '-'")),
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(bad("fields must be separated by '-'"));
        }
        let trace_id = hex_field::<16>(&bytes[3..35]).ok_or_else(|| bad("trace id is not 32 lowercase hex digits"))?;
        let parent_id =
            hex_field::<8>(&bytes[36..52]).ok_or_else(|| bad("parent id is not 16 lowercase hex digits"))?;
        let flags = hex_field::<1>(&bytes[53..55]).ok_or_else(|| bad("flags are not 2 lowercase hex digits"))?;
        Self::new(trace_id, parent_id, flags[0]).map_err(|_| bad("trace id or parent id is all zeros"))
    }

    /// The trace it belongs to.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The producer's span.
    pub fn parent_id(&self) -> [u8; 8] {
        self.parent_id
    }

    /// The trace flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the producer sampled its trace (flag `01`).
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The value as a producer writes it (version `00`, 55 characters).
    pub fn to_header(&self) -> String {
        self.to_string()
    }

    /// A stored value as the readers decode it: `None` for no value, or for a value that is
    /// not a valid `traceparent` (logged, with `context`, and dropped: it never fails the
    /// event).
    pub(crate) fn lenient(text: Option<&str>, context: &dyn fmt::Display) -> Option<Self> {
        let text = text.filter(|t| !t.is_empty())?;
        match Self::parse(text) {
            Ok(tp) => Some(tp),
            Err(err) => {
                tracing::warn!(event = %context, error = %err, "dropped a malformed traceparent");
                None
            }
        }
    }
}

/// The first 80 characters of a bad value, for an error.
fn clip(text: &str) -> String {
    text.chars().take(80).collect()
}

/// `N` bytes from `2N` lowercase hex digits.
fn hex_field<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    if digits.len() != 2 * N || !digits.iter().all(|d| matches!(d, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(digits, &mut out).ok()?;
    Some(out)
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", hex::encode(self.trace_id), hex::encode(self.parent_id), self.flags)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

impl std::str::FromStr for TraceParent {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        Self::parse(text)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for TraceParent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for TraceParent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceParent;
    use crate::backends::FamilyEvent;

    impl TraceParent {
        /// The producer's span as an OpenTelemetry remote span context.
        pub fn span_context(&self) -> SpanContext {
            SpanContext::new(
                TraceId::from_bytes(self.trace_id),
                SpanId::from_bytes(self.parent_id),
                TraceFlags::new(self.flags),
                true,
                TraceState::NONE,
            )
        }

        /// An OpenTelemetry context whose parent is the producer's span: pass it to
        /// `tracing_opentelemetry::OpenTelemetrySpanExt::set_parent` to continue the
        /// producer's trace in a consumer's span.
        pub fn context(&self) -> opentelemetry::Context {
            opentelemetry::Context::new().with_remote_span_context(self.span_context())
        }

        /// The trace context of a valid span context (`None` for an invalid one).
        pub fn from_span_context(cx: &SpanContext) -> Option<Self> {
            if !cx.is_valid() {
                return None;
            }
            Self::new(cx.trace_id().to_bytes(), cx.span_id().to_bytes(), cx.trace_flags().to_u8()).ok()
        }

        /// The trace context of the current `tracing` span, as a producer records it with its
        /// completion (`None` when the span is not exported through `tracing-opentelemetry`).
        pub fn current() -> Option<Self> {
            let cx = tracing::Span::current().context();
            Self::from_span_context(&cx.span().span_context().clone())
        }
    }

    /// The tree's delivery span of an event that carries a producer's trace context: a child of
    /// the producer's span, linked to it, open while the event is handed over. It is not
    /// entered: an actor sink would carry it into the consumer's handling (ractor propagates
    /// the current span with a message) and keep it open that long.
    pub(crate) fn delivery_span(event: &FamilyEvent) -> Option<tracing::Span> {
        let FamilyEvent::Completion(event) = event else { return None };
        let tp = event.traceparent?;
        let span = tracing::info_span!(
            target: "ff_completions::delivery",
            "ff_completions.deliver",
            otel.kind = "consumer",
            execution_id = %event.execution_id,
            outcome = %event.outcome,
        );
        let _ = span.set_parent(tp.context());
        span.add_link(tp.span_context());
        Some(span)
    }
}

#[cfg(feature = "opentelemetry")]
pub(crate) use otel::delivery_span;

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips_and_exposes_its_parts() {
        let tp = TraceParent::parse(GOOD).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tp.to_string(), GOOD);
        assert_eq!(hex::encode(tp.trace_id()), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(tp.parent_id()), "00f067aa0ba902b7");
        assert!(tp.is_sampled());
        assert_eq!(GOOD.parse::<TraceParent>().ok(), Some(tp));
    }

    #[test]
    fn a_later_version_with_more_fields_parses_and_is_written_as_version_00() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes-next";
        let tp = TraceParent::parse(later).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(!tp.is_sampled());
    }

    #[test]
    fn each_kind_of_malformed_traceparent_is_refused_and_named() {
        for (bad, says) in [
            ("", "shorter"),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0", "shorter"),
            ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "version ff"),
            ("0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "version"),
            ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "trace id"),
            ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", "all zeros"),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", "all zeros"),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x", "flags"),
            ("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "separated"),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", "exactly 55"),
            ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01extra", "follow a '-'"),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é", "flags"),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é1", "exactly 55"),
        ] {
            match TraceParent::parse(bad) {
                Err(Error::Validation { detail }) => assert!(detail.contains(says), "{bad:?}: {detail}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn a_stored_value_decodes_leniently_dropping_a_malformed_one() {
        let id = "e-1";
        assert_eq!(TraceParent::lenient(None, &id), None);
        assert_eq!(TraceParent::lenient(Some(""), &id), None);
        assert_eq!(TraceParent::lenient(Some("garbage"), &id), None);
        assert_eq!(TraceParent::lenient(Some(GOOD), &id).map(|t| t.to_string()).as_deref(), Some(GOOD));
    }
}

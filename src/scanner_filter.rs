//! `ScannerFilter`: which completions a subscriber wants, matched in memory on fields the
//! event carries.

use std::ops::RangeInclusive;

use crate::event::CompletionEvent;
#[cfg(doc)]
use crate::types::ExecutionId;
use crate::types::Namespace;

/// A subscriber's predicate: a namespace, an instance tag `(key, value)`, a range of flow
/// partitions, any of them or none. Values match exactly (no patterns); the filter runs in the
/// subscriber's filter actor. Several subscribers with disjoint partition ranges split the
/// stream between them, each in order.
///
/// ```
/// use ff_completions::{Namespace, ScannerFilter};
///
/// let tenant_a_workers = ScannerFilter::new()
///     .with_namespace(Namespace::new("tenant-a"))
///     .with_instance_tag("pool", "workers");
/// assert!(!tenant_a_workers.is_noop());
/// assert!(ScannerFilter::new().is_noop()); // everything
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ScannerFilter {
    /// Only executions of this namespace.
    pub namespace: Option<Namespace>,
    /// Only executions whose tag `key` equals `value`, byte for byte.
    pub instance_tag: Option<(String, String)>,
    /// Only executions whose partition ([`ExecutionId::partition`]) is in this range.
    pub partitions: Option<RangeInclusive<u16>>,
}

impl ScannerFilter {
    /// The filter that accepts everything.
    pub const NOOP: Self = Self { namespace: None, instance_tag: None, partitions: None };

    /// An empty filter (same as [`Self::NOOP`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Restricts to one namespace.
    #[must_use]
    pub fn with_namespace(mut self, ns: Namespace) -> Self {
        self.namespace = Some(ns);
        self
    }

    /// Restricts to executions whose tag `key` equals `value`.
    #[must_use]
    pub fn with_instance_tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.instance_tag = Some((key.into(), value.into()));
        self
    }

    /// Restricts to executions whose flow partition is in `partitions` (of
    /// `0..`[`PARTITION_COUNT`](crate::PARTITION_COUNT)): one way to split the stream across
    /// several consumers, each still in order.
    ///
    /// ```
    /// use ff_completions::{PARTITION_COUNT, ScannerFilter};
    ///
    /// let quarters: Vec<ScannerFilter> = (0..4u16)
    ///     .map(|i| ScannerFilter::new().with_partitions(i * 64..=i * 64 + 63))
    ///     .collect();
    /// assert_eq!(quarters[3].partitions, Some(192..=PARTITION_COUNT - 1));
    /// ```
    #[must_use]
    pub fn with_partitions(mut self, partitions: RangeInclusive<u16>) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// True when no dimension is set.
    pub fn is_noop(&self) -> bool {
        self.namespace.is_none() && self.instance_tag.is_none() && self.partitions.is_none()
    }

    /// The seed's predicate on already-fetched values: the namespace and the value of the
    /// filter's tag key. A set dimension with a missing value does not match.
    pub fn matches(&self, namespace: Option<&Namespace>, tag_value: Option<&str>) -> bool {
        let namespace_ok = self.namespace.as_ref().is_none_or(|want| namespace == Some(want));
        let tag_ok = self.instance_tag.as_ref().is_none_or(|(_, want)| tag_value == Some(want.as_str()));
        namespace_ok && tag_ok
    }

    /// Applies the filter to an event.
    pub fn matches_event(&self, event: &CompletionEvent) -> bool {
        let tag_value = self.instance_tag.as_ref().and_then(|(key, _)| event.tags.get(key)).map(String::as_str);
        let partition_ok = self.partitions.as_ref().is_none_or(|range| range.contains(&event.execution_id.partition()));
        partition_ok && self.matches(event.namespace.as_ref(), tag_value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::StreamCursor;
    use crate::event::CompletionOutcome;
    use crate::types::{ExecutionId, FlowId, TimestampMs};

    fn event(ns: Option<&str>, tags: &[(&str, &str)]) -> CompletionEvent {
        CompletionEvent::new(
            StreamCursor::empty(),
            ExecutionId::new_in(&FlowId::new()),
            CompletionOutcome::Success,
            TimestampMs(0),
        )
        .with_namespace(ns.map(Namespace::from))
        .with_tags(tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn noop_matches_everything() {
        assert!(ScannerFilter::NOOP.is_noop());
        assert!(ScannerFilter::new().matches_event(&event(None, &[])));
    }

    #[test]
    fn namespace_and_tag_must_both_match() {
        let f = ScannerFilter::new().with_namespace(Namespace::from("a")).with_instance_tag("inst", "1");
        assert!(f.matches_event(&event(Some("a"), &[("inst", "1")])));
        assert!(!f.matches_event(&event(Some("b"), &[("inst", "1")])));
        assert!(!f.matches_event(&event(Some("a"), &[("inst", "2")])));
        assert!(!f.matches_event(&event(None, &[("inst", "1")])));
        assert!(!f.matches_event(&event(Some("a"), &[])));
    }

    #[test]
    fn partition_ranges_split_the_stream_without_overlap() {
        let halves = [ScannerFilter::new().with_partitions(0..=127), ScannerFilter::new().with_partitions(128..=255)];
        for partition in [0u16, 1, 127, 128, 200, 255] {
            let mut e = event(None, &[]);
            e.execution_id = ExecutionId::from_parts(partition, uuid::Uuid::new_v4());
            let takers: Vec<usize> = (0..2).filter(|&i| halves[i].matches_event(&e)).collect();
            assert_eq!(takers, vec![usize::from(partition >= 128)], "partition {partition}");
        }
        assert!(!halves[0].is_noop());
    }

    #[test]
    fn hostile_values_match_only_themselves() {
        let weird = "'; DROP TABLE x; -- \u{1F600} \"quoted\"".repeat(100);
        let f = ScannerFilter::new().with_namespace(Namespace::new(weird.clone()));
        assert!(f.matches_event(&event(Some(&weird), &[])));
        assert!(!f.matches_event(&event(Some("'"), &[])));
    }
}

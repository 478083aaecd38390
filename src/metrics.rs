//! Every metric the tree records, through the `metrics` facade (install any exporter). One
//! place for names and labels.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `ff_completions_events_read_total` | counter | backend | events a listener read |
//! | `ff_completions_rows_skipped_total` | counter | backend | malformed rows or entries skipped |
//! | `ff_completions_listener_restarts_total` | counter | backend | listener restarts by the supervisor |
//! | `ff_completions_listener_reconnects_total` | counter | backend | notification connections re-made in place |
//! | `ff_completions_held_back` | gauge | backend | 1 while an open transaction holds rows back (Postgres) |
//! | `ff_completions_held_back_seconds` | gauge | backend | how long rows have been held back |
//! | `ff_completions_events_delivered_total` | counter | backend, subscriber | events handed to a subscriber |
//! | `ff_completions_live_batches_dropped_total` | counter | backend, subscriber | live batches a blocked or catching-up filter dropped (it reads them back later) |
//! | `ff_completions_catch_up_reads_total` | counter | backend, subscriber | reads a filter made from its own cursor |
//! | `ff_completions_subscriber_lag_ms` | gauge | backend, subscriber | commit time of the oldest event not yet delivered to now (0 when nothing is pending) |
//! | `ff_completions_subscriber_lag_events` | gauge | backend, subscriber | events the listener has read past the subscriber's cursor (from the first live batch that spans the cursor on) |
//! | `ff_completions_backend_gauge` | gauge | backend, name | backend health: `notification_queue_usage` and `held_back_rows` (Postgres), `stream_length` (Valkey) |

use metrics::{counter, gauge};

use crate::types::TimestampMs;

pub(crate) fn events_read(backend: &str, n: u64) {
    counter!("ff_completions_events_read_total", "backend" => backend.to_owned()).increment(n);
}

pub(crate) fn rows_skipped(backend: &str, n: u64) {
    counter!("ff_completions_rows_skipped_total", "backend" => backend.to_owned()).increment(n);
}

pub(crate) fn listener_restarted(backend: &str) {
    counter!("ff_completions_listener_restarts_total", "backend" => backend.to_owned()).increment(1);
}

pub(crate) fn listener_reconnected(backend: &str) {
    counter!("ff_completions_listener_reconnects_total", "backend" => backend.to_owned()).increment(1);
}

pub(crate) fn held_back(backend: &str, seconds: Option<f64>) {
    gauge!("ff_completions_held_back", "backend" => backend.to_owned()).set(if seconds.is_some() { 1.0 } else { 0.0 });
    gauge!("ff_completions_held_back_seconds", "backend" => backend.to_owned()).set(seconds.unwrap_or(0.0));
}

pub(crate) fn backend_gauge(backend: &str, name: &'static str, value: f64) {
    gauge!("ff_completions_backend_gauge", "backend" => backend.to_owned(), "name" => name).set(value);
}

/// Milliseconds from `at` to `now`, never negative: `at` comes from a row or stream entry and may
/// be anything (far in the future, or near `i64::MIN`), so the difference saturates.
fn lag_ms(now: TimestampMs, at: TimestampMs) -> i64 {
    now.0.saturating_sub(at.0).max(0)
}

/// Labels of one subscriber, built once per filter.
#[derive(Clone, Debug)]
pub(crate) struct SubscriberLabels {
    backend: String,
    subscriber: String,
}

impl SubscriberLabels {
    pub(crate) fn new(backend: &str, subscriber: impl ToString) -> Self {
        Self { backend: backend.to_owned(), subscriber: subscriber.to_string() }
    }

    fn labels(&self) -> [(&'static str, String); 2] {
        [("backend", self.backend.clone()), ("subscriber", self.subscriber.clone())]
    }

    /// Counts `n` delivered events and sets the lag in milliseconds from `pending_since`, the
    /// commit time of the oldest event not yet delivered (now when none is pending).
    pub(crate) fn delivered(&self, n: u64, pending_since: TimestampMs) {
        counter!("ff_completions_events_delivered_total", &self.labels()).increment(n);
        gauge!("ff_completions_subscriber_lag_ms", &self.labels())
            .set(lag_ms(TimestampMs::now(), pending_since) as f64);
    }

    pub(crate) fn batch_dropped(&self) {
        counter!("ff_completions_live_batches_dropped_total", &self.labels()).increment(1);
    }

    pub(crate) fn catch_up_read(&self) {
        counter!("ff_completions_catch_up_reads_total", &self.labels()).increment(1);
    }

    pub(crate) fn lag_events(&self, n: u64) {
        gauge!("ff_completions_subscriber_lag_events", &self.labels()).set(n as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_time_since_the_event_and_never_negative() {
        assert_eq!(lag_ms(TimestampMs(1_000), TimestampMs(400)), 600);
        assert_eq!(lag_ms(TimestampMs(1_000), TimestampMs(5_000)), 0, "an event from the future has no lag");
    }

    #[test]
    fn lag_of_extreme_event_times_saturates_instead_of_overflowing() {
        let now = TimestampMs::now();
        assert_eq!(lag_ms(now, TimestampMs(i64::MIN)), i64::MAX);
        assert_eq!(lag_ms(now, TimestampMs(i64::MAX)), 0);
        assert_eq!(lag_ms(TimestampMs(i64::MIN), TimestampMs(i64::MAX)), 0);
        assert_eq!(lag_ms(TimestampMs(i64::MAX), TimestampMs(i64::MIN)), i64::MAX);
    }

    #[test]
    fn recording_a_delivery_of_an_extreme_event_time_does_not_panic() {
        let labels = SubscriberLabels::new("postgres", 1);
        labels.delivered(1, TimestampMs(i64::MIN));
        labels.delivered(1, TimestampMs(i64::MAX));
    }
}

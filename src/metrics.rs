//! Every metric the tree records, through the `metrics` facade (install any exporter). One
//! place for names and labels.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `ff_completions_events_read_total` | counter | backend | events a listener read |
//! | `ff_completions_rows_skipped_total` | counter | backend | malformed rows or entries skipped |
//! | `ff_completions_listener_restarts_total` | counter | backend | listener restarts by the supervisor |
//! | `ff_completions_listener_reconnects_total` | counter | backend | notification connections re-made in place |
//! | `ff_completions_held_back` | gauge | backend | 1 while a backend holds rows back that it cannot read yet (no backend does today: Postgres batches between snapshots wait for no transaction) |
//! | `ff_completions_held_back_seconds` | gauge | backend | how long rows have been held back |
//! | `ff_completions_events_delivered_total` | counter | backend, subscriber (named subscribers only) | events handed to a subscriber |
//! | `ff_completions_live_batches_dropped_total` | counter | backend, subscriber (named subscribers only) | live batches a blocked or catching-up filter dropped (it reads them back later) |
//! | `ff_completions_catch_up_reads_total` | counter | backend, subscriber (named subscribers only) | reads a filter made from its own cursor |
//! | `ff_completions_subscriber_lag_ms` | gauge | backend, subscriber (named subscribers only) | commit time of the oldest event not yet delivered to now (0 when nothing is pending) |
//! | `ff_completions_subscriber_lag_events` | gauge | backend, subscriber (named subscribers only) | events the listener has read past the subscriber's cursor (from the first live batch that spans the cursor on) |
//! | `ff_completions_backend_gauge` | gauge | backend, name | backend health: `notification_queue_usage` and `transactions_in_progress` (Postgres, as the newest tick saw them), `stream_length` (Valkey, entries of every family) |

//! | `ff_completions_group_partitions_held` | gauge | group | partitions this process's member holds |
//! | `ff_completions_group_unacked` | gauge | group | events this member delivered and has not acknowledged (as of its last heartbeat) |
//! | `ff_completions_group_oldest_unacked_seconds` | gauge | group | age of the oldest of them |
//! | `ff_completions_group_acks_total` | counter | group | partition acknowledgements written by `ack` or after delivery (not those committed in the engine's transaction, nor a member's moves of positions past what it did not receive) |
//! | `ff_completions_group_fenced_total` | counter | group | acknowledgements refused because the member lost the partition (`ack`, after delivery, or an `AckTicket`) |
//! | `ff_completions_group_already_acknowledged_total` | counter | group | `AckTicket`s refused because their event's position was already acknowledged (an effect attempted again) |
//! | `ff_completions_group_rebalances_total` | counter | group | heartbeats that gained or lost partitions |
//! | `ff_completions_group_partitions_stalled` | gauge | group | partitions this member holds and cannot read: their positions name events the backend no longer has (an operator moves them) |
//! | `ff_completions_group_stalls_total` | counter | group | partitions this member found it cannot read |
//! | `ff_completions_group_parked` | gauge | group | parked events of the partitions this member holds (as of its last heartbeat) |
//! | `ff_completions_group_nacks_total` | counter | group | events this member's consumer refused (`nack`) |
//! | `ff_completions_group_parked_total` | counter | group | events parked by this member's refusals |
//! | `ff_completions_group_replayed_total` | counter | group | replayed parked events acknowledged by `ack` or after delivery (not those committed in the engine's transaction) |

use metrics::{Counter, Gauge, counter, gauge};

use crate::types::TimestampMs;

/// A member's partitions after a heartbeat: how many it holds, how many events it delivered and
/// has not acknowledged, and the commit time of the oldest of them.
/// A member's partitions after a heartbeat, also how many of them it cannot read and the parked
/// events they have.
pub(crate) fn group_held(
    group: &str,
    held: usize,
    unacked: usize,
    oldest_unacked: Option<TimestampMs>,
    stalled: usize,
    parked: u64,
) {
    let oldest = oldest_unacked.map_or(0, |at| TimestampMs::now().millis_since(at));
    gauge!("ff_completions_group_partitions_held", "group" => group.to_owned()).set(held as f64);
    gauge!("ff_completions_group_unacked", "group" => group.to_owned()).set(unacked as f64);
    gauge!("ff_completions_group_oldest_unacked_seconds", "group" => group.to_owned()).set(oldest as f64 / 1000.0);
    gauge!("ff_completions_group_partitions_stalled", "group" => group.to_owned()).set(stalled as f64);
    gauge!("ff_completions_group_parked", "group" => group.to_owned()).set(parked as f64);
}

pub(crate) fn group_stalled(group: &str, partitions: usize) {
    counter!("ff_completions_group_stalls_total", "group" => group.to_owned()).increment(partitions as u64);
}

/// A refusal; `parked` when it parked the event.
pub(crate) fn group_nacked(group: &str, parked: bool) {
    counter!("ff_completions_group_nacks_total", "group" => group.to_owned()).increment(1);
    if parked {
        counter!("ff_completions_group_parked_total", "group" => group.to_owned()).increment(1);
    }
}

pub(crate) fn group_replayed(group: &str, n: u64) {
    counter!("ff_completions_group_replayed_total", "group" => group.to_owned()).increment(n);
}

pub(crate) fn group_acked(group: &str, n: u64) {
    counter!("ff_completions_group_acks_total", "group" => group.to_owned()).increment(n);
}

pub(crate) fn group_fenced(group: &str) {
    counter!("ff_completions_group_fenced_total", "group" => group.to_owned()).increment(1);
}

pub(crate) fn group_already_acknowledged(group: &str) {
    counter!("ff_completions_group_already_acknowledged_total", "group" => group.to_owned()).increment(1);
}

pub(crate) fn group_rebalanced(group: &str) {
    counter!("ff_completions_group_rebalances_total", "group" => group.to_owned()).increment(1);
}

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

/// One subscriber's metric handles, registered once per filter so that delivering a batch
/// touches no label and allocates nothing.
#[derive(Clone)]
pub(crate) struct SubscriberMetrics {
    delivered: Counter,
    lag_ms: Gauge,
    lag_events: Gauge,
    batches_dropped: Counter,
    catch_up_reads: Counter,
}

impl SubscriberMetrics {
    /// Series labelled with the subscriber's name; no series at all for an unnamed one.
    pub(crate) fn new(backend: &str, name: Option<&str>) -> Self {
        let Some(name) = name else {
            return Self {
                delivered: Counter::noop(),
                lag_ms: Gauge::noop(),
                lag_events: Gauge::noop(),
                batches_dropped: Counter::noop(),
                catch_up_reads: Counter::noop(),
            };
        };
        let labels = [("backend", backend.to_owned()), ("subscriber", name.to_owned())];
        Self {
            delivered: counter!("ff_completions_events_delivered_total", &labels),
            lag_ms: gauge!("ff_completions_subscriber_lag_ms", &labels),
            lag_events: gauge!("ff_completions_subscriber_lag_events", &labels),
            batches_dropped: counter!("ff_completions_live_batches_dropped_total", &labels),
            catch_up_reads: counter!("ff_completions_catch_up_reads_total", &labels),
        }
    }

    /// Counts `n` delivered events and sets the lag in milliseconds (from the commit time of the
    /// oldest event not yet delivered; 0 when none is pending).
    pub(crate) fn delivered(&self, n: u64, lag_ms: u64) {
        self.delivered.increment(n);
        self.lag_ms.set(lag_ms as f64);
    }

    pub(crate) fn batch_dropped(&self) {
        self.batches_dropped.increment(1);
    }

    pub(crate) fn catch_up_read(&self) {
        self.catch_up_reads.increment(1);
    }

    pub(crate) fn lag_events(&self, n: u64) {
        self.lag_events.set(n as f64);
    }
}

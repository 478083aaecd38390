//! What the supervisor reports about its children: [`SupervisorStats`].

use std::fmt;
use std::time::Duration;

use super::ids::{BackendId, SubscriberId};
use super::shared::FilterMode;
use crate::cursor::StreamCursor;

/// A listener's lifecycle state, as the stats report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenerState {
    /// Connecting or waiting for a restart.
    Starting,
    /// Connected, and its reads work.
    Live,
    /// Dead; a restart is scheduled.
    Restarting,
}

/// One listener, as the stats report it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Backend name.
    pub backend: BackendId,
    /// Backend kind.
    pub kind: &'static str,
    /// Lifecycle state.
    pub state: ListenerState,
    /// The cursor of the last event read.
    pub cursor: Option<StreamCursor>,
    /// Restarts by the supervisor.
    pub restarts: u64,
    /// The backoff delay before the latest restart (never above the [`crate::BackendRetry`]
    /// cap); `None` before the first restart.
    pub restart_delay: Option<Duration>,
    /// Notification connections re-made without a restart.
    pub reconnects: u64,
    /// Events read.
    pub events_read: u64,
    /// Malformed rows skipped.
    pub rows_skipped: u64,
    /// The last error, secrets removed.
    pub last_error: Option<String>,
}

/// One subscriber, as the stats report it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SubscriberStats {
    /// Subscriber id.
    pub id: SubscriberId,
    /// Backend name.
    pub backend: BackendId,
    /// The name given with [`crate::SubscribeRequest::with_name`].
    pub name: Option<String>,
    /// The cursor of the last event processed.
    pub cursor: StreamCursor,
    /// Delivery mode.
    pub mode: FilterMode,
    /// Events delivered.
    pub delivered: u64,
    /// Lag in events: how many events the listener has read past this subscriber's cursor
    /// (matching the filter or not). Counted exactly from the last time the filter met a live
    /// batch containing its cursor; `None` until then for a subscriber that started from a
    /// cursor other than the listener's (resuming from history). 0 when the subscriber is at
    /// or ahead of the listener.
    pub lag_events: Option<u64>,
    /// Lag in time: milliseconds from the occurred-at of the **oldest event not yet processed**
    /// by this subscriber's filter (the one that did not fit in a full buffer, or the first of
    /// the latest catch-up read) to now; 0 when nothing is pending (saturating: a producer
    /// clock ahead of this one also gives 0).
    pub lag_ms: u64,
    /// Live batches dropped while blocked or catching up.
    pub live_batches_dropped: u64,
    /// Catch-up reads made.
    pub catch_up_reads: u64,
    /// Filter restarts.
    pub restarts: u64,
}

/// A snapshot of the whole tree. `Display` prints one line per listener and subscriber.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SupervisorStats {
    /// Per backend.
    pub listeners: Vec<ListenerStats>,
    /// Per subscriber.
    pub subscribers: Vec<SubscriberStats>,
}

impl fmt::Display for ListenerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listener {} ({}): {:?}, {} events read, {} rows skipped, {} restarts, {} reconnects",
            self.backend, self.kind, self.state, self.events_read, self.rows_skipped, self.restarts, self.reconnects
        )?;
        if let Some(delay) = self.restart_delay {
            write!(f, ", last restart delay {delay:?}")?;
        }
        if let Some(cursor) = &self.cursor {
            write!(f, ", cursor {cursor}")?;
        }
        if let Some(err) = &self.last_error {
            write!(f, ", last error: {err}")?;
        }
        Ok(())
    }
}

impl fmt::Display for SubscriberStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lag_events = self.lag_events.map_or_else(|| "?".to_owned(), |n| n.to_string());
        write!(
            f,
            "subscriber {} on {}: {:?}, {} delivered, lag {lag_events} events / {} ms, {} live batches dropped, \
             {} catch-up reads, {} restarts, cursor {}",
            self.id,
            self.backend,
            self.mode,
            self.delivered,
            self.lag_ms,
            self.live_batches_dropped,
            self.catch_up_reads,
            self.restarts,
            self.cursor
        )
    }
}

impl fmt::Display for SupervisorStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for listener in &self.listeners {
            writeln!(f, "{listener}")?;
        }
        for subscriber in &self.subscribers {
            writeln!(f, "{subscriber}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriber_lines_show_both_lags_and_unknown_event_lag_as_a_question_mark() {
        let mut stats = SubscriberStats {
            id: SubscriberId(3),
            backend: "postgres".into(),
            name: None,
            cursor: StreamCursor::empty(),
            mode: FilterMode::Blocked,
            delivered: 4,
            lag_events: Some(46),
            lag_ms: 1250,
            live_batches_dropped: 2,
            catch_up_reads: 1,
            restarts: 0,
        };
        let line = stats.to_string();
        assert!(line.contains("subscriber sub-3 on postgres: Blocked"), "{line}");
        assert!(line.contains("lag 46 events / 1250 ms"), "{line}");
        stats.lag_events = None;
        assert!(stats.to_string().contains("lag ? events / 1250 ms"));
    }
}

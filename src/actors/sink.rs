//! Where a filter delivers: one family's events, those its subscriber's filter wants, into a
//! bounded channel (behind a [`crate::Subscription`]) or to an actor-native consumer.
//!
//! A filter holds its sink as a [`Sink`] trait object, so the filter is written once for every
//! family: the family's own code ([`FamilySink`], generic over [`Event`]) picks its events out
//! of what the listener read, matches them against the subscriber's filter and hands them over.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use ractor::ActorRef;
use tokio::sync::mpsc;

use super::request::Event;
use crate::backends::Positioned;
use crate::cursor::{Frontier, StreamCursor};
use crate::error::Error;
use crate::family::Family;

/// Whether a sink took an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    Done,
    Full,
    Closed,
}

/// Where the events of one family go: a bounded channel, or an actor-native consumer.
pub(crate) enum Out<E> {
    /// A bounded channel, read through a [`crate::Subscription`].
    Channel(mpsc::Sender<Result<E, Error>>),
    /// Each event is cast to an actor; `false` when it is gone.
    Actor(Arc<dyn Fn(E) -> bool + Send + Sync>),
}

impl<E: Send + 'static> Out<E> {
    /// Casts each event to `actor`, converted with `From<E>`.
    pub(crate) fn actor<M>(actor: ActorRef<M>) -> Self
    where
        M: ractor::Message + From<E>,
    {
        Self::Actor(Arc::new(move |event| actor.cast(M::from(event)).is_ok()))
    }

    fn send(&self, event: E) -> Sent {
        match self {
            Self::Channel(tx) => match tx.try_send(Ok(event)) {
                Ok(()) => Sent::Done,
                Err(mpsc::error::TrySendError::Full(_)) => Sent::Full,
                Err(mpsc::error::TrySendError::Closed(_)) => Sent::Closed,
            },
            Self::Actor(send) => {
                if send(event) {
                    Sent::Done
                } else {
                    Sent::Closed
                }
            }
        }
    }
}

/// What a filter delivers into (see the module docs).
pub(crate) trait Sink: Send + Sync + 'static {
    /// The family it delivers.
    fn family(&self) -> Family;

    /// Hands `event` over if it is of this sink's family and the subscriber's filter wants it
    /// (`None` otherwise), with its cursor set by `stamp` first. `delivered` counts it before
    /// the send (whoever receives the event finds it counted), and takes it back when the sink
    /// did not take it.
    fn offer(&self, item: &Positioned, stamp: &dyn Fn(&mut StreamCursor), delivered: &AtomicU64) -> Option<Sent>;

    /// The subscription starts after `at` (called once its start is fixed).
    fn started(&self, _at: &Frontier) {}

    /// Hands a channel subscriber an error, waiting for room off the caller (it must not be
    /// lost to a full buffer). Actor sinks get none: their subscription just ends.
    fn send_error(&self, err: Error);

    /// Resolves once a channel sink has room (`true`), or is closed (`false`); `None` for actor
    /// sinks, which never fill.
    fn room(&self) -> Option<BoxFuture<'static, bool>>;

    /// The filter has handled every event up to `through` (handed over or not wanted).
    fn passed(&self, through: &Frontier);
}

/// How far a reading subscriber's filter has got, for a consumer that must know when every
/// event up to a position has reached it (a durable member moves the positions of partitions
/// whose events it does not receive: lease entries, completions its filter leaves out). The
/// filter records, after each run of events, how many it had sent and the frontier it had
/// handled; the consumer counts what it took from the channel, in order. A mark whose count the
/// consumer has taken names a frontier every event of which it has received.
#[derive(Debug, Default)]
pub(crate) struct Passed(Mutex<PassedState>);

#[derive(Debug, Default)]
struct PassedState {
    /// Events sent into the channel.
    sent: u64,
    /// Events the consumer took out of it.
    taken: u64,
    /// (events sent then, frontier handled then), oldest first; at most one per count.
    marks: VecDeque<(u64, Frontier)>,
}

impl Passed {
    fn state(&self) -> std::sync::MutexGuard<'_, PassedState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The filter sent one more event.
    fn sent(&self) {
        self.state().sent += 1;
    }

    /// The filter has handled everything up to `through`.
    fn mark(&self, through: &Frontier) {
        let mut state = self.state();
        let sent = state.sent;
        match state.marks.back_mut() {
            Some((n, last)) if *n == sent => {
                if last != through {
                    *last = through.clone();
                }
            }
            _ => state.marks.push_back((sent, through.clone())),
        }
    }

    /// The consumer took one more event out of the channel (and is done with it).
    pub(crate) fn took(&self) {
        self.state().taken += 1;
    }

    /// The furthest frontier every event of which the consumer has taken, if any yet.
    pub(crate) fn through(&self) -> Option<Frontier> {
        let mut state = self.state();
        let taken = state.taken;
        let mut latest = None;
        while state.marks.front().is_some_and(|(n, _)| *n <= taken) {
            latest = state.marks.pop_front();
        }
        let (n, through) = latest?;
        // Kept for the next call: it stays true.
        state.marks.push_front((n, through.clone()));
        Some(through)
    }
}

/// The sink of one family: its filter and where its events go.
pub(crate) struct FamilySink<E: Event> {
    pub(crate) family: Family,
    pub(crate) filter: E::Filter,
    pub(crate) out: Out<E>,
    /// Where a consumer that asked for it learns how far the filter has got.
    pub(crate) passed: Option<Arc<Passed>>,
}

impl<E: Event> Sink for FamilySink<E> {
    fn family(&self) -> Family {
        self.family
    }

    fn offer(&self, item: &Positioned, stamp: &dyn Fn(&mut StreamCursor), delivered: &AtomicU64) -> Option<Sent> {
        let mut event = E::pick(&self.filter, &item.event)?;
        // With `opentelemetry`, an event carrying its producer's trace context is handed over
        // while a span of that trace, linked to the producer's span, is open.
        #[cfg(feature = "opentelemetry")]
        let _delivery = crate::trace_context::delivery_span(&item.event);
        stamp(event.cursor_mut());
        delivered.fetch_add(1, Ordering::Relaxed);
        let sent = self.out.send(event);
        if sent != Sent::Done {
            delivered.fetch_sub(1, Ordering::Relaxed);
        } else if let Some(passed) = &self.passed {
            passed.sent();
        }
        Some(sent)
    }

    fn send_error(&self, err: Error) {
        if let Out::Channel(tx) = &self.out {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(Err(err)).await;
            });
        }
    }

    fn room(&self) -> Option<BoxFuture<'static, bool>> {
        match &self.out {
            Out::Channel(tx) => {
                let tx = tx.clone();
                Some(Box::pin(async move { tx.reserve().await.is_ok() }))
            }
            Out::Actor(_) => None,
        }
    }

    fn passed(&self, through: &Frontier) {
        if let Some(passed) = &self.passed {
            passed.mark(through);
        }
    }
}

impl<E: Event> fmt::Debug for FamilySink<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let out = match &self.out {
            Out::Channel(tx) => format!("channel of {}", tx.max_capacity()),
            Out::Actor(_) => "actor".to_owned(),
        };
        write!(f, "Sink({}, {:?}, {out})", self.family.name(), self.filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::Position;

    fn at(lo: u64) -> Frontier {
        Frontier::at(Position::new(0, lo))
    }

    #[test]
    fn a_mark_counts_once_the_consumer_took_every_event_sent_before_it() {
        let passed = Passed::default();
        assert_eq!(passed.through(), None, "nothing handled yet");
        passed.mark(&at(5));
        assert_eq!(passed.through(), Some(at(5)), "nothing was sent before it");
        passed.sent();
        passed.sent();
        passed.mark(&at(9));
        passed.mark(&at(12));
        assert_eq!(passed.through(), Some(at(5)), "two events sent before 12 are still in the channel");
        passed.took();
        assert_eq!(passed.through(), Some(at(5)));
        passed.took();
        assert_eq!(passed.through(), Some(at(12)), "the later mark of the same count replaced the earlier");
        assert_eq!(passed.through(), Some(at(12)), "it stays true");
        passed.sent();
        passed.mark(&at(20));
        assert_eq!(passed.through(), Some(at(12)));
        assert_eq!(passed.0.lock().map(|s| s.marks.len()).unwrap_or_default(), 2, "marks stay few");
    }
}

//! What a subscriber asks for: a [`SubscribeRequest`] of one event family (its filter, where it
//! starts, its backend and name), named after the family: [`Completions`], [`LeaseHistory`],
//! [`SignalDelivery`], [`InstanceTags`]. The family is the request's event type, an [`Event`].

use std::fmt;

use crate::backends::FamilyEvent;
use crate::cursor::StreamCursor;
use crate::event::CompletionEvent;
use crate::family::Family;
use crate::instance_tags::InstanceTagEvent;
use crate::lease_history::{LeaseHistoryEvent, LeaseHistoryFilter};
use crate::scanner_filter::ScannerFilter;
use crate::signal_delivery::{SignalDeliveryEvent, SignalDeliveryFilter};

use super::ids::BackendId;

pub(crate) mod sealed {
    /// Keeps [`super::Event`] to the crate's own families.
    pub trait Sealed {}
}

/// The event type of one family, and what its subscribers filter by: [`CompletionEvent`]
/// ([`ScannerFilter`]), [`LeaseHistoryEvent`] ([`LeaseHistoryFilter`]),
/// [`SignalDeliveryEvent`] ([`SignalDeliveryFilter`]) and [`InstanceTagEvent`] (no filter; no
/// backend produces them yet). Implemented by the crate for these four only.
pub trait Event: sealed::Sealed + Clone + fmt::Debug + Send + Sync + 'static {
    /// What a subscriber of this family filters by; its default accepts every event.
    type Filter: Clone + fmt::Debug + Default + Send + Sync + 'static;

    /// The family in the backends' order; `None` for a family no backend produces yet.
    #[doc(hidden)]
    const FAMILY: Option<Family>;

    /// This family's event in what the listener read, if the subscriber's filter wants it.
    #[doc(hidden)]
    fn pick(filter: &Self::Filter, event: &FamilyEvent) -> Option<Self>;

    /// Where the event's cursor is.
    #[doc(hidden)]
    fn cursor_mut(&mut self) -> &mut StreamCursor;
}

impl sealed::Sealed for CompletionEvent {}
impl Event for CompletionEvent {
    type Filter = ScannerFilter;
    const FAMILY: Option<Family> = Some(Family::Completion);

    fn pick(filter: &ScannerFilter, event: &FamilyEvent) -> Option<Self> {
        match event {
            FamilyEvent::Completion(event) if filter.matches_event(event) => Some(event.clone()),
            _ => None,
        }
    }

    fn cursor_mut(&mut self) -> &mut StreamCursor {
        &mut self.cursor
    }
}

impl sealed::Sealed for LeaseHistoryEvent {}
impl Event for LeaseHistoryEvent {
    type Filter = LeaseHistoryFilter;
    const FAMILY: Option<Family> = Some(Family::LeaseHistory);

    fn pick(filter: &LeaseHistoryFilter, event: &FamilyEvent) -> Option<Self> {
        match event {
            FamilyEvent::LeaseHistory(entry) if filter.matches(entry) => Some(entry.event.clone()),
            _ => None,
        }
    }

    fn cursor_mut(&mut self) -> &mut StreamCursor {
        LeaseHistoryEvent::cursor_mut(self)
    }
}

impl sealed::Sealed for SignalDeliveryEvent {}
impl Event for SignalDeliveryEvent {
    type Filter = SignalDeliveryFilter;
    const FAMILY: Option<Family> = Some(Family::SignalDelivery);

    fn pick(filter: &SignalDeliveryFilter, event: &FamilyEvent) -> Option<Self> {
        match event {
            FamilyEvent::SignalDelivery(entry) if filter.matches(entry) => Some(entry.event.clone()),
            _ => None,
        }
    }

    fn cursor_mut(&mut self) -> &mut StreamCursor {
        &mut self.cursor
    }
}

impl sealed::Sealed for InstanceTagEvent {}
impl Event for InstanceTagEvent {
    type Filter = ();
    const FAMILY: Option<Family> = None;

    fn pick((): &(), _event: &FamilyEvent) -> Option<Self> {
        None
    }

    fn cursor_mut(&mut self) -> &mut StreamCursor {
        match self {
            Self::Attached { cursor, .. } | Self::Cleared { cursor, .. } => cursor,
        }
    }
}

/// Where a subscription of the family `E` starts and what it wants. Build it through the
/// family's name ([`Completions`], [`LeaseHistory`], [`SignalDelivery`], [`InstanceTags`]) and
/// subscribe it with [`crate::CompletionSupervisorHandle::subscribe`] (a stream) or
/// [`crate::CompletionSupervisorHandle::subscribe_actor`] (an actor).
///
/// ```
/// use ff_completions::{Completions, LeaseHistory, LeaseHistoryFilter, Namespace, ScannerFilter, StreamCursor};
///
/// # let saved_hex = "";
/// // Resume after the cursor the subscriber persisted (empty: the tail), one tenant only,
/// // with metrics under the name "promoter".
/// let request = Completions::from_cursor(StreamCursor::from_hex(saved_hex)?)
///     .with_filter(ScannerFilter::new().with_namespace(Namespace::new("tenant-a")))
///     .with_name("promoter");
/// assert_eq!(request.name.as_deref(), Some("promoter"));
/// // Lease changes from now on, of one namespace.
/// let leases = LeaseHistory::tail().with_filter(LeaseHistoryFilter::new().with_namespace(Namespace::new("tenant-a")));
/// assert!(leases.from.is_empty());
/// # Ok::<(), ff_completions::Error>(())
/// ```
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SubscribeRequest<E: Event> {
    /// Backend name; `None` picks the only configured backend.
    pub backend: Option<BackendId>,
    /// The subscriber's filter.
    pub filter: E::Filter,
    /// Resume after this cursor (a cursor of this family); empty means from the tail.
    pub from: StreamCursor,
    /// A name for the subscriber's metrics series and stats; unnamed subscribers record no
    /// per-subscriber series (their ids are never reused, so such series would grow without
    /// bound).
    pub name: Option<String>,
    /// What a tail subscription does when the backend cannot tell its tail yet (it cannot be
    /// reached and the tree has read nothing from it): wait for it (the default), or fail at
    /// once ([`TailWait::FailFast`]). A cursor subscription ignores it.
    pub tail_wait: TailWait,
}

/// What [`crate::CompletionSupervisorHandle::subscribe`] does with a tail subscription when
/// the backend cannot tell its tail: it cannot be reached, and the tree has read no position
/// from it yet (once the tree has read one, a tail subscription starts at the tree's last read
/// without waiting: everything committed after the call returned comes after that position).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TailWait {
    /// The call waits until the backend answers (or the tree reads its first position), then
    /// returns: every matching event committed after it returned is delivered. Bound the wait
    /// with `tokio::time::timeout` if needed.
    #[default]
    Wait,
    /// The call fails at once with [`crate::Error::Unavailable`] (transient: retry later)
    /// instead of waiting.
    FailFast,
}

/// A subscription to completions (the default family): [`SubscribeRequest`] of
/// [`CompletionEvent`], filtered by a [`ScannerFilter`].
pub type Completions = SubscribeRequest<CompletionEvent>;
/// A subscription to lease history: [`SubscribeRequest`] of [`LeaseHistoryEvent`], filtered
/// by a [`LeaseHistoryFilter`].
pub type LeaseHistory = SubscribeRequest<LeaseHistoryEvent>;
/// A subscription to signal deliveries: [`SubscribeRequest`] of [`SignalDeliveryEvent`],
/// filtered by a [`SignalDeliveryFilter`].
pub type SignalDelivery = SubscribeRequest<SignalDeliveryEvent>;
/// A subscription to instance tags: no backend produces them yet, so subscribing answers
/// [`crate::Error::Unavailable`].
pub type InstanceTags = SubscribeRequest<InstanceTagEvent>;

impl<E: Event> Default for SubscribeRequest<E> {
    fn default() -> Self {
        Self {
            backend: None,
            filter: E::Filter::default(),
            from: StreamCursor::empty(),
            name: None,
            tail_wait: TailWait::Wait,
        }
    }
}

impl<E: Event> SubscribeRequest<E> {
    /// New events only: every matching event committed after
    /// [`crate::CompletionSupervisorHandle::subscribe`] returned, none before (while the
    /// backend cannot be reached, see [`TailWait`]).
    pub fn tail() -> Self {
        Self::default()
    }

    /// Events after `cursor`, a cursor of this family (an empty cursor means the tail).
    pub fn from_cursor(cursor: StreamCursor) -> Self {
        Self { from: cursor, ..Self::default() }
    }

    /// Sets the filter.
    #[must_use]
    pub fn with_filter(mut self, filter: E::Filter) -> Self {
        self.filter = filter;
        self
    }

    /// Names the subscriber: its metrics carry `subscriber="<name>"`. Give each long-lived
    /// subscriber its own name (at most 64 characters, no control characters); subscribers
    /// sharing a name share their series.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// A tail subscription fails at once with [`crate::Error::Unavailable`] rather than wait
    /// while the backend cannot tell its tail ([`TailWait::FailFast`]).
    #[must_use]
    pub fn without_waiting(mut self) -> Self {
        self.tail_wait = TailWait::FailFast;
        self
    }

    /// Picks a backend by name.
    #[must_use]
    pub fn on_backend(mut self, backend: impl Into<BackendId>) -> Self {
        self.backend = Some(backend.into());
        self
    }
}

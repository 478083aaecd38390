//! What a durable subscriber asks for: a [`DurableRequest`], exclusive (one consumer at a time)
//! or a group member.

use std::time::Duration;

use crate::actors::ids::BackendId;
use crate::backends::groups::Sharing;
use crate::scanner_filter::ScannerFilter;

/// A durable subscription to completions: [`DurableRequest::exclusive`] (one consumer at a
/// time) or [`DurableRequest::group`] (members share the partitions), subscribed with
/// [`crate::CompletionSupervisorHandle::subscribe`] like any other request.
#[derive(Clone, Debug)]
pub struct DurableRequest {
    pub(crate) name: String,
    pub(crate) sharing: Sharing,
    pub(crate) member: Option<String>,
    pub(crate) filter: ScannerFilter,
    pub(crate) backend: Option<BackendId>,
    pub(crate) lease_ttl: Duration,
    pub(crate) ack_after_delivery: bool,
    pub(crate) park_after: u32,
}

impl DurableRequest {
    /// The default lease of a member's partitions: a member that dies loses them this long
    /// after its last heartbeat (heartbeats come every third of it).
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

    /// The shortest lease a member may ask for.
    pub const MIN_LEASE_TTL: Duration = Duration::from_millis(300);

    /// How often acknowledgements made after delivery are written.
    pub const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(50);

    /// The default number of refusals ([`crate::DurableSubscription::nack`]) after which an
    /// event is parked.
    pub const DEFAULT_PARK_AFTER: u32 = 5;

    /// A durable subscription with one consumer: the backend stores its position under
    /// `name`; a process that subscribes again under the name takes every partition over at
    /// once and fences the previous consumer: its acks fail with [`crate::Error::Fenced`], and
    /// its stream ends with `Fenced` at its next heartbeat. A new name starts at the tail.
    pub fn exclusive(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            sharing: Sharing::Exclusive,
            member: None,
            filter: ScannerFilter::default(),
            backend: None,
            lease_ttl: Self::DEFAULT_LEASE_TTL,
            ack_after_delivery: false,
            park_after: Self::DEFAULT_PARK_AFTER,
        }
    }

    /// A member of the group `name`: live members share the 256 flow partitions evenly, each
    /// completion goes to the member holding its partition, and a member that dies loses its
    /// partitions to the others once its lease expires. A new group starts at the tail.
    pub fn group(name: impl Into<String>) -> Self {
        Self { sharing: Sharing::Shared, ..Self::exclusive(name) }
    }

    /// Names the member (1 to 64 characters, no control characters); a random id otherwise.
    /// A member that restarts under its own id takes its partitions back at once (fencing its
    /// earlier incarnation) instead of waiting for their leases to expire.
    #[must_use]
    pub fn with_member(mut self, member: impl Into<String>) -> Self {
        self.member = Some(member.into());
        self
    }

    /// Only completions matching `filter` are delivered; the others are acknowledged with the
    /// next delivered event of their partition.
    #[must_use]
    pub fn with_filter(mut self, filter: ScannerFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Picks a backend by name.
    #[must_use]
    pub fn on_backend(mut self, backend: impl Into<BackendId>) -> Self {
        self.backend = Some(backend.into());
        self
    }

    /// How long the member's partitions stay its own without a heartbeat (at least 300 ms, at
    /// most a day; default [`Self::DEFAULT_LEASE_TTL`]): a dead member's partitions move after this.
    #[must_use]
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Self::MIN_LEASE_TTL);
        self
    }

    /// Acknowledges each event once the consumer asks for the next one (and within
    /// [`Self::ACK_FLUSH_INTERVAL`]): delivery at least once, with no ack calls. Without it the
    /// consumer acknowledges with [`crate::DurableSubscription::ack`] or a [`crate::AckTicket`].
    #[must_use]
    pub fn with_ack_after_delivery(mut self) -> Self {
        self.ack_after_delivery = true;
        self
    }

    /// Parks an event once its consumers refused it `attempts` times (at least 1; default
    /// [`Self::DEFAULT_PARK_AFTER`]): see [`crate::DurableSubscription::nack`]. Members of one
    /// group should agree on it: the member that refuses an event decides.
    #[must_use]
    pub fn with_park_after(mut self, attempts: u32) -> Self {
        self.park_after = attempts.max(1);
        self
    }

    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

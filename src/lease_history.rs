//! The lease-history family: what happened to an execution's lease (acquired, renewed,
//! expired, reclaimed, revoked), the filter a subscriber gives, and the stream it reads.

use crate::cursor::StreamCursor;
use crate::error::Error;
use crate::types::{ExecutionId, LeaseId, Namespace, TimestampMs, WorkerInstanceId};

/// One change of an execution's lease, as a subscriber receives it. Producers write it
/// atomically with the lease change (a claim, a heartbeat, an expiry sweep, a reclaim by
/// another worker, an operator's revoke).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum LeaseHistoryEvent {
    /// A worker claimed the execution.
    Acquired {
        /// Where to resume from to receive the events after this one.
        cursor: StreamCursor,
        /// The execution.
        execution_id: ExecutionId,
        /// The new lease, when the producer knows it.
        lease_id: Option<LeaseId>,
        /// The worker holding it.
        worker_instance_id: Option<WorkerInstanceId>,
        /// When the producer committed it (backend clock).
        at: TimestampMs,
    },
    /// The holder heartbeated: its lease is extended.
    Renewed {
        /// Where to resume from to receive the events after this one.
        cursor: StreamCursor,
        /// The execution.
        execution_id: ExecutionId,
        /// The renewed lease.
        lease_id: Option<LeaseId>,
        /// The worker holding it.
        worker_instance_id: Option<WorkerInstanceId>,
        /// When the producer committed it.
        at: TimestampMs,
    },
    /// The holder stopped heartbeating and an expiry sweep took the lease away.
    Expired {
        /// Where to resume from to receive the events after this one.
        cursor: StreamCursor,
        /// The execution.
        execution_id: ExecutionId,
        /// The lease that expired.
        lease_id: Option<LeaseId>,
        /// The worker that held it.
        prev_owner: Option<WorkerInstanceId>,
        /// When the producer committed it.
        at: TimestampMs,
    },
    /// Another worker claimed the execution after its lease expired.
    Reclaimed {
        /// Where to resume from to receive the events after this one.
        cursor: StreamCursor,
        /// The execution.
        execution_id: ExecutionId,
        /// The new lease.
        new_lease_id: Option<LeaseId>,
        /// The worker holding it now.
        new_owner: Option<WorkerInstanceId>,
        /// When the producer committed it.
        at: TimestampMs,
    },
    /// The lease was taken away by someone other than its holder.
    Revoked {
        /// Where to resume from to receive the events after this one.
        cursor: StreamCursor,
        /// The execution.
        execution_id: ExecutionId,
        /// The revoked lease.
        lease_id: Option<LeaseId>,
        /// Who revoked it (known producers write `operator`, `reconciler` or `backend`).
        revoked_by: String,
        /// When the producer committed it.
        at: TimestampMs,
    },
}

impl LeaseHistoryEvent {
    /// The wire names of the five kinds, as producers write them.
    pub const WIRE_KINDS: [&'static str; 5] = ["acquired", "renewed", "expired", "reclaimed", "revoked"];

    /// Builds the event of wire kind `kind` (one of [`Self::WIRE_KINDS`]); `worker` is the
    /// holder (`Acquired`, `Renewed`), the previous owner (`Expired`) or the new owner
    /// (`Reclaimed`); `revoked_by` is used by `Revoked` only (empty when `None`).
    ///
    /// # Errors
    /// [`Error::Validation`] for an unknown kind: the reader skips that row.
    pub fn from_wire(
        kind: &str,
        cursor: StreamCursor,
        execution_id: ExecutionId,
        lease_id: Option<LeaseId>,
        worker: Option<WorkerInstanceId>,
        revoked_by: Option<String>,
        at: TimestampMs,
    ) -> Result<Self, Error> {
        Ok(match kind {
            "acquired" => Self::Acquired { cursor, execution_id, lease_id, worker_instance_id: worker, at },
            "renewed" => Self::Renewed { cursor, execution_id, lease_id, worker_instance_id: worker, at },
            "expired" => Self::Expired { cursor, execution_id, lease_id, prev_owner: worker, at },
            "reclaimed" => Self::Reclaimed { cursor, execution_id, new_lease_id: lease_id, new_owner: worker, at },
            "revoked" => {
                Self::Revoked { cursor, execution_id, lease_id, revoked_by: revoked_by.unwrap_or_default(), at }
            }
            other => {
                let shown: String = other.chars().take(80).collect();
                return Err(Error::validation(format!("unknown lease history kind {shown:?}")));
            }
        })
    }

    /// The wire name of its kind.
    pub fn wire_kind(&self) -> &'static str {
        match self {
            Self::Acquired { .. } => "acquired",
            Self::Renewed { .. } => "renewed",
            Self::Expired { .. } => "expired",
            Self::Reclaimed { .. } => "reclaimed",
            Self::Revoked { .. } => "revoked",
        }
    }

    /// Where to resume from to receive the events after this one.
    pub fn cursor(&self) -> &StreamCursor {
        match self {
            Self::Acquired { cursor, .. }
            | Self::Renewed { cursor, .. }
            | Self::Expired { cursor, .. }
            | Self::Reclaimed { cursor, .. }
            | Self::Revoked { cursor, .. } => cursor,
        }
    }

    pub(crate) fn cursor_mut(&mut self) -> &mut StreamCursor {
        match self {
            Self::Acquired { cursor, .. }
            | Self::Renewed { cursor, .. }
            | Self::Expired { cursor, .. }
            | Self::Reclaimed { cursor, .. }
            | Self::Revoked { cursor, .. } => cursor,
        }
    }

    /// The execution whose lease changed.
    pub fn execution_id(&self) -> &ExecutionId {
        match self {
            Self::Acquired { execution_id, .. }
            | Self::Renewed { execution_id, .. }
            | Self::Expired { execution_id, .. }
            | Self::Reclaimed { execution_id, .. }
            | Self::Revoked { execution_id, .. } => execution_id,
        }
    }

    /// The lease the event names (for `Reclaimed`, the new one).
    pub fn lease_id(&self) -> Option<&LeaseId> {
        match self {
            Self::Acquired { lease_id, .. }
            | Self::Renewed { lease_id, .. }
            | Self::Expired { lease_id, .. }
            | Self::Revoked { lease_id, .. } => lease_id.as_ref(),
            Self::Reclaimed { new_lease_id, .. } => new_lease_id.as_ref(),
        }
    }

    /// When the producer committed it (backend clock).
    pub fn at(&self) -> TimestampMs {
        match self {
            Self::Acquired { at, .. }
            | Self::Renewed { at, .. }
            | Self::Expired { at, .. }
            | Self::Reclaimed { at, .. }
            | Self::Revoked { at, .. } => *at,
        }
    }
}

/// Which lease-history events a subscriber wants: an execution, a namespace, a worker (the
/// lease's holder, previous owner or new owner), any of them or none. Values match exactly.
///
/// ```
/// use ff_completions::{LeaseHistoryFilter, Namespace, WorkerInstanceId};
///
/// let filter = LeaseHistoryFilter::new()
///     .with_namespace(Namespace::new("tenant-a"))
///     .with_worker(WorkerInstanceId::new("worker-7"));
/// assert!(!filter.is_noop());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct LeaseHistoryFilter {
    /// Only this execution.
    pub execution_id: Option<ExecutionId>,
    /// Only executions of this namespace.
    pub namespace: Option<Namespace>,
    /// Only leases this worker held, lost or took over.
    pub worker: Option<WorkerInstanceId>,
}

impl LeaseHistoryFilter {
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

    /// Restricts to one worker.
    #[must_use]
    pub fn with_worker(mut self, worker: WorkerInstanceId) -> Self {
        self.worker = Some(worker);
        self
    }

    /// True when it accepts everything.
    pub fn is_noop(&self) -> bool {
        self == &Self::default()
    }

    /// Whether `entry` matches.
    pub(crate) fn matches(&self, entry: &LeaseEntry) -> bool {
        self.execution_id.as_ref().is_none_or(|id| id == entry.event.execution_id())
            && self.namespace.as_ref().is_none_or(|ns| entry.namespace.as_ref() == Some(ns))
            && self.worker.as_ref().is_none_or(|w| entry.worker.as_ref() == Some(w))
    }
}

/// A lease-history event as the tree carries it: with the row's namespace and worker, which
/// filters match on but the event does not carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseEntry {
    pub(crate) event: LeaseHistoryEvent,
    pub(crate) namespace: Option<Namespace>,
    pub(crate) worker: Option<WorkerInstanceId>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::FlowId;

    fn cursor() -> StreamCursor {
        StreamCursor::new(vec![0x03, 0xf1, 0, 0, 0, 0, 0, 0, 0, 9])
    }

    #[test]
    fn every_kind_round_trips_through_its_wire_name_with_all_fields() {
        let exec = ExecutionId::new_in(&FlowId::new());
        let (lease, worker) = (Some(LeaseId::new("l-1")), Some(WorkerInstanceId::new("w-1")));
        for kind in LeaseHistoryEvent::WIRE_KINDS {
            let event = LeaseHistoryEvent::from_wire(
                kind,
                cursor(),
                exec,
                lease.clone(),
                worker.clone(),
                Some("operator".into()),
                TimestampMs(42),
            )
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(event.wire_kind(), kind);
            assert_eq!(event.cursor(), &cursor());
            assert_eq!(event.execution_id(), &exec);
            assert_eq!(event.lease_id(), lease.as_ref());
            assert_eq!(event.at(), TimestampMs(42));
            let expected = match kind {
                "acquired" => LeaseHistoryEvent::Acquired {
                    cursor: cursor(),
                    execution_id: exec,
                    lease_id: lease.clone(),
                    worker_instance_id: worker.clone(),
                    at: TimestampMs(42),
                },
                "renewed" => LeaseHistoryEvent::Renewed {
                    cursor: cursor(),
                    execution_id: exec,
                    lease_id: lease.clone(),
                    worker_instance_id: worker.clone(),
                    at: TimestampMs(42),
                },
                "expired" => LeaseHistoryEvent::Expired {
                    cursor: cursor(),
                    execution_id: exec,
                    lease_id: lease.clone(),
                    prev_owner: worker.clone(),
                    at: TimestampMs(42),
                },
                "reclaimed" => LeaseHistoryEvent::Reclaimed {
                    cursor: cursor(),
                    execution_id: exec,
                    new_lease_id: lease.clone(),
                    new_owner: worker.clone(),
                    at: TimestampMs(42),
                },
                _ => LeaseHistoryEvent::Revoked {
                    cursor: cursor(),
                    execution_id: exec,
                    lease_id: lease.clone(),
                    revoked_by: "operator".into(),
                    at: TimestampMs(42),
                },
            };
            assert_eq!(event, expected);
        }
    }

    #[test]
    fn an_unknown_kind_is_a_validation_error_never_a_panic() {
        let exec = ExecutionId::new_in(&FlowId::new());
        for bad in ["", "ACQUIRED", "stolen", "\0"] {
            let got = LeaseHistoryEvent::from_wire(bad, cursor(), exec, None, None, None, TimestampMs(0));
            assert!(matches!(got, Err(Error::Validation { .. })), "{bad:?}");
        }
    }

    #[test]
    fn the_filter_matches_execution_namespace_and_worker_exactly() {
        let exec = ExecutionId::new_in(&FlowId::new());
        let entry = LeaseEntry {
            event: LeaseHistoryEvent::Expired {
                cursor: cursor(),
                execution_id: exec,
                lease_id: None,
                prev_owner: Some(WorkerInstanceId::new("w")),
                at: TimestampMs(1),
            },
            namespace: Some(Namespace::new("a")),
            worker: Some(WorkerInstanceId::new("w")),
        };
        assert!(LeaseHistoryFilter::new().matches(&entry));
        assert!(LeaseHistoryFilter::new().with_execution(exec).with_worker("w".into()).matches(&entry));
        assert!(!LeaseHistoryFilter::new().with_execution(ExecutionId::new_in(&FlowId::new())).matches(&entry));
        assert!(!LeaseHistoryFilter::new().with_namespace(Namespace::new("b")).matches(&entry));
        assert!(!LeaseHistoryFilter::new().with_worker("W".into()).matches(&entry));
    }
}

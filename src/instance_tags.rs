//! The instance-tag family: types only. No backend produces it yet, and subscribing to
//! [`crate::InstanceTags`] answers [`crate::Error::Unavailable`].

use crate::cursor::StreamCursor;
use crate::types::{ExecutionId, TimestampMs};

/// A tag attached to or cleared from an execution.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum InstanceTagEvent {
    /// A tag was attached.
    Attached {
        /// Where to resume from.
        cursor: StreamCursor,
        /// The execution.
        execution_id: ExecutionId,
        /// The tag.
        tag: String,
        /// When the producer committed it.
        at: TimestampMs,
    },
    /// A tag was cleared.
    Cleared {
        /// Where to resume from.
        cursor: StreamCursor,
        /// The execution.
        execution_id: ExecutionId,
        /// The tag.
        tag: String,
        /// When the producer committed it.
        at: TimestampMs,
    },
}

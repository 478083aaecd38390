//! Durable named subscriptions and groups, on top of the tree's handle. The backend keeps, per
//! name, the acknowledged position of each flow partition; processes subscribing under one
//! name share the partitions through leases that expire and fencing tokens that grow, so each
//! completion is handled by one member, in order per partition, and a restarted process
//! resumes from the stored positions with nothing persisted by the engine.
//!
//! - `request`: what a durable subscriber asks for ([`DurableRequest`]).
//! - `subscription`: what it gets ([`DurableSubscription`], [`AckTicket`], [`GroupStats`]).
//! - `ledger`: what a member knows between heartbeats, without I/O.
//! - `member`: the member's two tasks (heartbeats and acks; reading the tree through its
//!   handle), started by [`crate::CompletionSupervisorHandle::subscribe`].
//! - `admin`: what operators do from outside the members ([`GroupAdmin`]): show a group, move
//!   its positions, list, replay and discard parked events.
//!
//! The contract with the backends (heartbeat, fenced ack, leave, view) is the backends' group
//! store seam, beside the completion source.
//!
//! ```text
//! DurableSubscription ── events ◄── delivery task ◄── tree subscription (from the held positions)
//!        │ ack / ticket                  │ admits held partitions only
//!        ▼                               ▼
//!      Ledger ◄──── heartbeat task ───► backend: members, leases, acknowledged positions
//! ```

mod admin;
mod ledger;
mod member;
mod request;
mod subscription;

pub use crate::backends::groups::Nacked;
pub use admin::{Backlog, GroupAdmin, GroupReport, MoveTo, ParkedEvent, ParkedId, PartitionReport};
pub use request::DurableRequest;
pub use subscription::{AckTicket, DurableSubscription, GroupMemberStats, GroupPartitionStats, GroupStats, Stalled};

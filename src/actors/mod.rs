//! The actor tree: one [`supervisor::CompletionSupervisor`], one `Listener` per backend, one
//! `Filter` per subscriber, and the handle engines hold.
//!
//! ```text
//! engine actor (optional parent: spawn_linked)
//! └── CompletionSupervisor      restarts children, keeps their cursors across restarts
//!     ├── Listener(postgres)    owns the notification connection, reads the outbox in order
//!     ├── Listener(valkey)
//!     ├── Filter(subscriber 1)  filters, dedupes by cursor, delivers, catches up when slow
//!     └── Filter(subscriber n)
//! ```
//!
//! The listener reads and fans out the events of every family (completions, lease history,
//! signal delivery); a filter delivers one family, the one its sink names.
//!
//! Files, from the bottom up: `ids` (backend and subscriber names), `request` (what a
//! subscriber asks for, per family), `shared` (the state kept outside the actors so that a
//! restart resumes where the dead actor stopped, and the batch a listener fans out), `sink`
//! (where a filter delivers), the actors `filter`, `listener` and `supervisor`, then `stats`,
//! `supervisor_config` and `handle`, which engines hold.

pub(crate) mod awaits;
pub(crate) mod filter;
pub mod handle;
pub(crate) mod ids;
pub(crate) mod listener;
pub(crate) mod request;
pub(crate) mod shared;
pub(crate) mod sink;
pub(crate) mod stats;
pub mod supervisor;
pub(crate) mod supervisor_config;

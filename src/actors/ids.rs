//! The names of a tree's children: [`BackendId`] for a listener's backend, [`SubscriberId`] for
//! a subscription.

use std::fmt;

/// Names a backend inside one supervisor (by default its kind: `postgres`, `valkey`, `sqlite`;
/// see [`crate::SupervisorConfig::with_named_backend`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(String);

impl BackendId {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for BackendId {
    fn from(name: &str) -> Self {
        Self(name.to_owned())
    }
}

impl From<String> for BackendId {
    fn from(name: String) -> Self {
        Self(name)
    }
}

impl std::borrow::Borrow<str> for BackendId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for BackendId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for BackendId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Identifies one subscription inside one supervisor. Ids are handed out by the supervisor and
/// never reused by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriberId(pub(crate) u64);

impl SubscriberId {
    /// The id as a number (as shown by `Display` after `sub-`).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SubscriberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sub-{}", self.0)
    }
}

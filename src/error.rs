//! The one error type of the crate. Its `Display` never prints a password.

use std::fmt;
use std::sync::Arc;

use crate::stream_cursor::StreamCursor;

/// The crate's errors: of subscriptions, the tree, the backends and durable groups.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend cannot be reached or is not set up (connection refused, schema missing).
    #[error("the backend is unavailable ({op}): {detail}")]
    Unavailable {
        /// What was being attempted.
        op: &'static str,
        /// Why it failed, with secrets already removed.
        detail: String,
        /// The driver's or server's own error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// A connection broke or a server answered with a transport-level error.
    #[error("the connection failed ({op}): {detail}")]
    Transport {
        /// What was being attempted.
        op: &'static str,
        /// Why it failed, with secrets already removed.
        detail: String,
        /// The driver's or server's own error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// The backend's schema or function library is missing or of another version: retrying
    /// will not help until an operator acts.
    #[error("the backend's schema is missing or of another version ({op}): {detail}")]
    Schema {
        /// What was being attempted.
        op: &'static str,
        /// What is missing or wrong.
        detail: String,
        /// The driver's or server's own error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// Input was rejected: a malformed cursor, id, URL, config or row, or a statement's data
    /// the database refused.
    #[error("invalid input: {detail}")]
    Validation {
        /// What was wrong.
        detail: String,
    },
    /// The cursor points below what the backend still retains.
    #[error("the cursor has expired: {}", match oldest { Some(c) => format!("the oldest position still kept is {c}"), None => "nothing is kept".to_owned() })]
    CursorExpired {
        /// The oldest cursor a subscriber can still resume from (`None` when nothing is kept).
        oldest: Option<StreamCursor>,
    },
    /// The cursor names history this database does not have: the tick its position was read
    /// in is missing here, or is another one. The database was restored from a backup or a dump
    /// older than the cursor, failed over to a replica that had not received it, or is another
    /// database. Nothing after the cursor can be delivered exactly once; a subscriber that
    /// accepts the gap subscribes again from `tail`.
    #[error("the cursor's history is not in this database: {reason}")]
    CursorHistoryLost {
        /// What was found instead, for the operator.
        reason: String,
        /// The tail of the history the database has now, when known.
        tail: Option<StreamCursor>,
    },
    /// An operation did not finish in time.
    #[error("{op} timed out")]
    Timeout {
        /// What was being attempted.
        op: &'static str,
    },
    /// A durable group member no longer holds the partition it acknowledges (its lease expired
    /// and another member took it, or a newer incarnation of the member rejoined): nothing was
    /// written, and the transaction the ack joined must roll back.
    #[error("fenced: {detail}")]
    Fenced {
        /// Which group, member and partition.
        detail: String,
    },
    /// An acknowledgement inside the engine's transaction (an [`crate::AckTicket`]) of an
    /// event whose position the group has already acknowledged: its effect committed before
    /// (the transaction was retried after an unknown commit outcome, or the event was handed
    /// out twice). Nothing was written, and the transaction must roll back.
    #[error("already acknowledged: {detail}")]
    AlreadyAcknowledged {
        /// Which group and partition.
        detail: String,
    },
    /// The actor tree is gone or did not answer.
    #[error("the actor tree failed: {detail}")]
    Actor {
        /// What failed.
        detail: String,
    },
}

/// The seed's name for [`Error`]: the seed's [`crate::CompletionBackend`] signatures name it, so
/// code written against the seed compiles unchanged.
pub type EngineError = Error;

/// The error a driver or server reported, kept as the [`std::error::Error::source`] of an
/// [`Error`]. It prints with secrets removed, like the error's own text; [`Self::get_ref`]
/// gives the original (an `sqlx::Error`, a `ferriskey::Error`) to downcast.
#[derive(Clone)]
pub struct ErrorSource(Arc<dyn std::error::Error + Send + Sync>);

impl ErrorSource {
    pub(crate) fn new(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(err))
    }

    /// The original error.
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Display for ErrorSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0.to_string()))
    }
}

impl fmt::Debug for ErrorSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrorSource({self})")
    }
}

impl std::error::Error for ErrorSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl Error {
    /// An [`Error::Unavailable`] without a source.
    pub(crate) fn unavailable(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Unavailable { op, detail: detail.into(), source: None }
    }

    /// An [`Error::Transport`] without a source.
    pub(crate) fn transport(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Transport { op, detail: detail.into(), source: None }
    }

    /// An [`Error::Schema`] without a source.
    pub(crate) fn schema(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Schema { op, detail: detail.into(), source: None }
    }

    /// Keeps `err` as the source of an `Unavailable`, `Transport` or `Schema` error; the other
    /// kinds carry their whole story in their text.
    pub(crate) fn with_source(mut self, err: impl std::error::Error + Send + Sync + 'static) -> Self {
        if let Self::Unavailable { source, .. } | Self::Transport { source, .. } | Self::Schema { source, .. } =
            &mut self
        {
            *source = Some(ErrorSource::new(err));
        }
        self
    }

    /// An [`Error::Fenced`] for `member` of `group` on `partition`.
    pub(crate) fn fenced(group: &str, member: &str, partition: u16) -> Self {
        Self::Fenced { detail: format!("member {member:?} of group {group:?} no longer holds partition {partition}") }
    }

    /// An [`Error::Fenced`] for an incarnation of `member` of `group` that a newer process
    /// subscribing under the member id superseded.
    pub(crate) fn superseded(group: &str, member: &str) -> Self {
        Self::Fenced {
            detail: format!(
                "another process took member {member:?} of group {group:?} over (it subscribed under the id)"
            ),
        }
    }

    /// An [`Error::AlreadyAcknowledged`] for `partition` of `group` (the SQL stores').
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn already_acknowledged(group: &str, partition: u16) -> Self {
        Self::AlreadyAcknowledged {
            detail: format!("group {group:?} has acknowledged partition {partition} at or past this position"),
        }
    }

    /// A [`Error::Validation`] with the given text.
    pub fn validation(detail: impl Into<String>) -> Self {
        Self::Validation { detail: detail.into() }
    }

    /// True for faults that go away by themselves (a lost connection, a restarting server);
    /// the supervisor counts only the others towards its restart intensity.
    ///
    /// ```
    /// use ff_completions::{BackendConfig, Error};
    ///
    /// // A malformed URL will not get better by retrying.
    /// let err: Error = BackendConfig::from_url("postgres://[::1").err().expect("malformed");
    /// assert!(!err.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Transport { .. } | Self::Timeout { .. })
    }
}

/// Removes the password from anything that looks like a URL with credentials.
pub(crate) fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let (head, tail) = rest.split_at(scheme_end + 3);
        out.push_str(head);
        let authority_end = tail.find(['/', ' ', '?', '#', '"', '\'']).unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":<redacted>");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(any(feature = "postgres", feature = "sqlite"))]
impl Error {
    /// The crate's error for an sqlx error of operation `op`, classified as the tree classifies
    /// its own: connection trouble is transient ([`Error::Transport`], [`Error::Unavailable`]),
    /// an undefined table, column or function, or an exception raised by a function, is
    /// [`Error::Schema`]; data the database refused (a data or constraint error) is
    /// [`Error::Validation`]. The original
    /// is kept as the source (except for validation errors); the text never carries a password.
    pub fn from_sqlx(op: &'static str, err: sqlx::Error) -> Self {
        let detail = redact(&err.to_string());
        let mapped = match &err {
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => {
                Self::transport(op, detail)
            }
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => Self::unavailable(op, detail),
            sqlx::Error::Configuration(_) => return Self::Validation { detail },
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                // Class 08 (connection), 57 (operator intervention: shutdown, terminated), 53 (resources).
                if code.starts_with("08") || code.starts_with("57") || code.starts_with("53") {
                    Self::transport(op, detail)
                } else if code.starts_with("42") {
                    // Undefined table, column or function: the schema is missing or of another version.
                    Self::schema(op, detail)
                } else if code == "P0001" {
                    // The subsystem's functions raise only for what an operator must fix (an
                    // adopted outbox without a sequence, a reader outside READ COMMITTED).
                    Self::schema(op, detail)
                } else if code.starts_with("22") || code.starts_with("23") {
                    return Self::Validation { detail };
                } else {
                    Self::transport(op, detail)
                }
            }
            _ => Self::transport(op, detail),
        };
        mapped.with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords_in_urls() {
        let text = "failed to connect to postgres://alice:s3cret@db:5432/x and redis://:hunter2@h:6379";
        let shown = redact(text);
        assert!(!shown.contains("s3cret") && !shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice:<redacted>@db:5432"), "{shown}");
    }

    #[test]
    fn an_expired_cursor_names_the_oldest_position_in_hex() {
        let err = Error::CursorExpired { oldest: Some(StreamCursor::new(vec![0x03, 0x00, 0x2a])) };
        assert_eq!(err.to_string(), "the cursor has expired: the oldest position still kept is 03002a");
        let none = Error::CursorExpired { oldest: None };
        assert_eq!(none.to_string(), "the cursor has expired: nothing is kept");
    }

    #[test]
    fn a_source_is_kept_for_downcasting_and_prints_without_secrets() {
        use std::error::Error as _;
        let io = std::io::Error::other("refused by postgres://alice:s3cret@db/x");
        let err = Error::unavailable("connect", "refused").with_source(io);
        let source = err.source().map(ToString::to_string).unwrap_or_default();
        assert!(source.contains("alice:<redacted>@db") && !source.contains("s3cret"), "{source}");
        let Error::Unavailable { source: Some(kept), .. } = &err else { panic!("{err:?}") };
        assert!(kept.get_ref().downcast_ref::<std::io::Error>().is_some());
        assert!(Error::validation("x").with_source(std::io::Error::other("y")).source().is_none());
    }

    #[test]
    fn redact_leaves_urls_without_credentials_alone() {
        assert_eq!(redact("valkey://h:1/0"), "valkey://h:1/0");
    }
}

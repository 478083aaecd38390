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
    /// The backend's schema or function library is missing or damaged (a table, function or
    /// trigger the tree reads is not there): retrying will not help until an operator
    /// installs it. A schema of another version is [`Error::SchemaVersion`].
    #[error("the backend's schema is missing or damaged ({op}): {detail}")]
    Schema {
        /// What was being attempted.
        op: &'static str,
        /// What is missing or wrong.
        detail: String,
        /// The driver's or server's own error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// The schema installed in the database is not the version this crate needs (a migration
    /// is missing, or the database holds one this crate does not know): the text names the
    /// migration. Install as the schema's owner (the tree does on connect unless told not to
    /// migrate), or run the crate's version the database was installed by.
    #[error("the installed schema is not the version this crate needs ({op}): {detail}")]
    SchemaVersion {
        /// What was being attempted.
        op: &'static str,
        /// Which migration is missing or unknown, and what to do.
        detail: String,
    },
    /// The server refused a privilege the tree needs (Postgres SQLSTATE 42501, Valkey `NOPERM`):
    /// the role it connects as lacks a grant. The text names the privilege and the object;
    /// `ff_completions_grant_runtime(role)` grants every one the tree needs (see the guide's
    /// "Deploying" page). Retrying will not help until an operator grants it.
    #[error("permission denied ({op}): {detail}")]
    Permission {
        /// What was being attempted.
        op: &'static str,
        /// Which privilege on which object, and how to grant it.
        detail: String,
        /// The driver's or server's own error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// TLS could not be set up: the server offers none although the config requires it, its
    /// certificate is not signed by the configured authority or names another host, a
    /// certificate or key file cannot be read, or the server refused the client certificate.
    /// Retrying will not help until the config or the certificates change.
    #[error("TLS failed ({op}): {detail}")]
    Tls {
        /// What was being attempted.
        op: &'static str,
        /// What TLS refused, with secrets already removed.
        detail: String,
        /// The driver's or server's own error, when there is one.
        #[source]
        source: Option<ErrorSource>,
    },
    /// A connection pooler between the tree and Postgres refused what it was sent (a startup
    /// parameter, a named prepared statement across transactions, the installer's session
    /// lock): the URL goes through a transaction pooler without saying so (`ff_poll_ms` or
    /// `ff_listen`), or the schema must be installed through a direct connection.
    #[error("the connection pooler refused the tree's session ({op}): {detail}")]
    Pooler {
        /// What was being attempted.
        op: &'static str,
        /// What the pooler refused, and what to change.
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

    /// An [`Error::Permission`] without a source.
    pub(crate) fn permission(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Permission { op, detail: detail.into(), source: None }
    }

    /// An [`Error::Tls`] without a source.
    pub(crate) fn tls(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Tls { op, detail: detail.into(), source: None }
    }

    /// An [`Error::Pooler`] without a source.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn pooler(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Pooler { op, detail: detail.into(), source: None }
    }

    /// Keeps `err` as the source of an `Unavailable`, `Transport`, `Schema`, `Permission`,
    /// `Tls` or `Pooler` error; the other kinds carry their whole story in their text.
    pub(crate) fn with_source(mut self, err: impl std::error::Error + Send + Sync + 'static) -> Self {
        if let Self::Unavailable { source, .. }
        | Self::Transport { source, .. }
        | Self::Schema { source, .. }
        | Self::Permission { source, .. }
        | Self::Tls { source, .. }
        | Self::Pooler { source, .. } = &mut self
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
    /// and so is a lock or statement timeout ([`Error::Timeout`]); a refused privilege is
    /// [`Error::Permission`], a TLS failure [`Error::Tls`], a pooler's refusal (an unsupported
    /// startup parameter, a prepared statement that does not survive a transaction pooler)
    /// [`Error::Pooler`]; an undefined table, column or function, or an exception raised by a
    /// function, is [`Error::Schema`]; data the database refused (a data or constraint error)
    /// is [`Error::Validation`]. The original is kept as the source (except for validation
    /// errors); the text never carries a password.
    pub fn from_sqlx(op: &'static str, err: sqlx::Error) -> Self {
        let detail = redact(&err.to_string());
        let mapped = match &err {
            sqlx::Error::Tls(_) => Self::tls(op, detail),
            sqlx::Error::Io(io) if tls_alert(io) => Self::tls(op, detail),
            sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => Self::transport(op, detail),
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => Self::unavailable(op, detail),
            sqlx::Error::Configuration(_) => return Self::Validation { detail },
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                match code.as_str() {
                    // lock_not_available (lock_timeout), query_canceled (statement_timeout, or
                    // an operator's pg_cancel_backend): the next try may well get through.
                    "55P03" | "57014" => {
                        tracing::debug!(op, %detail, "postgres statement timed out");
                        return Self::Timeout { op };
                    }
                    "42501" => Self::permission(op, format!("{detail}; {GRANT_HINT}")),
                    // invalid_authorization_specification, invalid_password: the login itself
                    // was refused (no pg_hba.conf entry, a wrong password, a missing or refused
                    // client certificate).
                    "28000" | "28P01" => Self::permission(
                        op,
                        format!(
                            "{detail}; the server refused the login: check the user, its password or client certificate, and pg_hba.conf"
                        ),
                    ),
                    // A named prepared statement that is not on this server connection, or is
                    // there twice: a transaction pooler hands each transaction another one.
                    "26000" | "42P05" => Self::pooler(op, format!("{detail}; {POOLER_HINT}")),
                    // PgBouncer refuses startup parameters it does not know (sent as options).
                    "08P01" if detail.contains("unsupported startup parameter") => {
                        Self::pooler(op, format!("{detail}; {POOLER_HINT}"))
                    }
                    // Class 08 (connection), 57 (operator intervention: shutdown, terminated), 53 (resources).
                    c if c.starts_with("08") || c.starts_with("57") || c.starts_with("53") => {
                        Self::transport(op, detail)
                    }
                    // Undefined table, column or function: the schema is missing.
                    c if c.starts_with("42") => Self::schema(op, detail),
                    // The subsystem's functions raise only for what an operator must fix (an
                    // adopted outbox without a sequence, a reader outside READ COMMITTED).
                    "P0001" => Self::schema(op, detail),
                    c if c.starts_with("22") || c.starts_with("23") => return Self::Validation { detail },
                    _ => Self::transport(op, detail),
                }
            }
            _ => Self::transport(op, detail),
        };
        mapped.with_source(err)
    }
}

/// What a refused privilege's error adds for the operator.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
const GRANT_HINT: &str = "the role lacks a privilege the tree needs: as the schema's owner, run \
     SELECT ff_completions_grant_runtime('<role>') (SELECT * FROM ff_completions_missing_privileges('<role>') lists what is missing)";

/// What a pooler's refusal adds for the operator.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
const POOLER_HINT: &str = "this URL goes through a transaction pooler (PgBouncer): add ff_poll_ms=<ms> (poll only) \
     or ff_listen=<host:port of the server itself> (wake-ups on a direct session) to the URL, so that every \
     statement is unnamed and runs in a transaction of its own";

/// Whether an I/O error is a TLS alert (the peer refused the handshake, e.g. a client
/// certificate it does not trust) rather than a dropped connection.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
fn tls_alert(io: &std::io::Error) -> bool {
    io.get_ref().is_some_and(|inner| {
        let text = inner.to_string();
        text.contains("received fatal alert") || text.contains("invalid peer certificate") || text.contains("TLS")
    })
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

//! Deploying as operators do (`docs/deploying.md`): TLS to Postgres and Valkey against TLS
//! servers, PgBouncer in transaction mode, a runtime role of least privilege, every statement
//! bounded by lock and statement timeouts, and errors that name their cause.

use std::time::Duration;

use ff_completions::Error;
use futures::{Stream, StreamExt};

mod pooler;
mod roles;
mod timeouts;
mod tls;

/// How long a failure that must come "at once" may take: a connect attempt, never a retry loop.
const AT_ONCE: Duration = Duration::from_secs(15);

/// The first item of a subscription that must end with an error, within [`AT_ONCE`].
async fn first_error<S, E>(stream: &mut S) -> Error
where
    S: Stream<Item = Result<E, Error>> + Unpin,
    E: std::fmt::Debug,
{
    match tokio::time::timeout(AT_ONCE, stream.next()).await {
        Ok(Some(Err(err))) => err,
        Ok(other) => panic!("expected an error, got {other:?}"),
        Err(_) => panic!("no error within {AT_ONCE:?}: the failure was retried instead of reported"),
    }
}

/// Asserts that nothing the crate prints of `err` (its text, its debug form, its sources)
/// shows any of `secrets`.
#[track_caller]
fn assert_prints_no_secret(err: &Error, secrets: &[&str]) {
    let mut shown = format!("{err} {err:?}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        shown.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    for secret in secrets {
        assert!(!shown.contains(secret), "the error shows a secret: {shown}");
    }
}

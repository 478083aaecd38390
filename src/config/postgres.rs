//! The Postgres connection: its URL with the driver's parameters (`sslmode`, `sslrootcert`,
//! `sslcert`, `sslkey`, …), and the crate's own, which the driver never sees: `ff_poll_ms`
//! (poll only), `ff_listen` (split mode: wake-ups on a direct session while statements go
//! through a transaction pooler) and `ff_migrate` (install on connect, or only check).

use std::fmt;
use std::time::Duration;

use crate::error::{Error, redact};

/// The URL parameter that selects poll-only mode: `?ff_poll_ms=200`.
pub(crate) const POLL_MS_PARAM: &str = "ff_poll_ms";
/// The URL parameter that selects split mode: `?ff_listen=db-primary:5432`.
pub(crate) const LISTEN_PARAM: &str = "ff_listen";
/// The URL parameter that turns installing on connect off: `?ff_migrate=false`.
pub(crate) const MIGRATE_PARAM: &str = "ff_migrate";

/// Postgres connection: a `postgres://` URL, how the listener wakes, and whether the tree
/// installs the schema.
///
/// Through a transaction pooler (PgBouncer in `pool_mode = transaction`), say so with one of
/// the two pooled modes: poll only ([`Self::poll_interval`], `?ff_poll_ms=200`), or split mode
/// ([`Self::listen_url`], `?ff_listen=db:5432`: LISTEN on a session of its own to the server
/// itself, every other statement through the pooler). In both, every statement the tree sends
/// is unnamed (no prepared statement outlives it) and runs in a transaction of its own that
/// sets its timeouts with `SET LOCAL`: no session state is relied on.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresConnection {
    /// The URL, credentials included (never printed).
    pub url: String,
    /// `None`: LISTEN/NOTIFY wakes the listener (on a session to `url`, or to
    /// [`Self::listen_url`] when set). `Some(interval)`: no LISTEN; the listener polls the
    /// outbox this often, and `url` may be a transaction pooler.
    pub poll_interval: Option<Duration>,
    /// Split mode: the URL of the server itself (not the pooler), for the listener's LISTEN
    /// session and for installing the schema; every other statement goes through `url`, a
    /// transaction pooler. `?ff_listen=host:port` derives it from `url` (same user, password,
    /// database and TLS parameters).
    pub listen_url: Option<String>,
    /// Whether the tree installs or upgrades the schema when it connects (default `true`,
    /// which needs the schema owner's privileges). `false` (`?ff_migrate=false`): it only
    /// checks that the installed schema is the one this crate needs, and names the missing
    /// migration when it is not ([`Error::SchemaVersion`]), for a runtime role without
    /// `CREATE`.
    pub migrate: bool,
}

impl PostgresConnection {
    /// A connection to `url`, LISTEN on a session of its own, installing on connect.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), poll_interval: None, listen_url: None, migrate: true }
    }

    /// Whether `url` may be a transaction pooler (poll-only or split mode): statements are
    /// unnamed and transaction-scoped.
    pub fn through_pooler(&self) -> bool {
        self.poll_interval.is_some() || self.listen_url.is_some()
    }

    /// Parses the crate's own parameters off a `postgres://` URL (the driver would refuse them).
    ///
    /// # Errors
    /// [`Error::Validation`] for a malformed value, or both `ff_poll_ms` and `ff_listen`.
    pub(crate) fn from_url(text: &str) -> Result<Self, Error> {
        let Some((base, query)) = text.split_once('?') else { return Ok(Self::new(text)) };
        let mut connection = Self::new(base);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some((POLL_MS_PARAM, v)) => {
                    let ms: u64 =
                        v.parse().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                            Error::validation(format!("{POLL_MS_PARAM}={v:?} is not a positive number"))
                        })?;
                    connection.poll_interval = Some(Duration::from_millis(ms));
                }
                Some((LISTEN_PARAM, v)) => connection.listen_url = Some(v.to_owned()),
                Some((MIGRATE_PARAM, v)) => {
                    connection.migrate = match v {
                        "true" | "on" | "yes" | "1" => true,
                        "false" | "off" | "no" | "0" => false,
                        _ => return Err(Error::validation(format!("{MIGRATE_PARAM}={v:?} is not true or false"))),
                    }
                }
                _ => kept.push(pair),
            }
        }
        if !kept.is_empty() {
            connection.url = format!("{base}?{}", kept.join("&"));
        }
        if let Some(address) = connection.listen_url.take() {
            if connection.poll_interval.is_some() {
                return Err(Error::validation(format!(
                    "{POLL_MS_PARAM} (poll only) and {LISTEN_PARAM} (wake-ups on a direct session) exclude each other"
                )));
            }
            connection.listen_url = Some(direct_url(&connection.url, &address)?);
        }
        Ok(connection)
    }
}

/// `url` with its host and port replaced by `address` (`host:port`, `[v6]:port`, or `host`
/// for port 5432), and without `host`, `hostaddr` or `port` query parameters.
fn direct_url(url: &str, address: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::validation(format!("{LISTEN_PARAM}={address:?}: {why} (expected host:port)"));
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => {
            (host, port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("malformed port"))?)
        }
        _ => (address, 5432),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let mut parsed =
        url::Url::parse(url).map_err(|e| Error::validation(format!("bad postgres URL {:?}: {e}", redact(url))))?;
    parsed.set_host(Some(host)).map_err(|e| bad(&e.to_string()))?;
    parsed.set_port(Some(port)).map_err(|()| bad("malformed port"))?;
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| !matches!(k.as_ref(), "host" | "hostaddr" | "port"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok(parsed.into())
}

impl fmt::Debug for PostgresConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConnection")
            .field("url", &redact(&self.url))
            .field("poll_interval", &self.poll_interval)
            .field("listen_url", &self.listen_url.as_deref().map(redact))
            .field("migrate", &self.migrate)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_only_mode_comes_from_the_url_and_goes_through_a_pooler() {
        let pg = PostgresConnection::from_url("postgres://u:pw@h/db?sslmode=disable&ff_poll_ms=250").ok();
        let pg = pg.unwrap_or_else(|| panic!("refused"));
        assert_eq!(pg.url, "postgres://u:pw@h/db?sslmode=disable");
        assert_eq!(pg.poll_interval, Some(Duration::from_millis(250)));
        assert!(pg.through_pooler() && pg.migrate);
        assert!(PostgresConnection::from_url("postgres://h/db?ff_poll_ms=0").is_err());
    }

    #[test]
    fn split_mode_listens_on_the_named_server_with_the_same_credentials_and_tls() {
        let url = "postgres://app:s3cret@pooler:6432/engine?sslmode=verify-full&sslrootcert=/ca.pem&ff_listen=db:5432";
        let pg = PostgresConnection::from_url(url).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pg.url, "postgres://app:s3cret@pooler:6432/engine?sslmode=verify-full&sslrootcert=/ca.pem");
        let listen = pg.listen_url.as_deref().unwrap_or_default();
        assert!(listen.starts_with("postgres://app:s3cret@db:5432/engine?sslmode=verify-full"), "{listen}");
        assert!(pg.through_pooler() && pg.poll_interval.is_none());
        assert!(!format!("{pg:?}").contains("s3cret"), "{pg:?}");
        let default_port = PostgresConnection::from_url("postgres://h:6432/db?ff_listen=db").ok();
        assert_eq!(default_port.and_then(|p| p.listen_url).as_deref(), Some("postgres://db:5432/db"));
    }

    #[test]
    fn malformed_pooled_settings_are_validation_errors() {
        for url in [
            "postgres://h/db?ff_listen=db:0",
            "postgres://h/db?ff_listen=db:x",
            "postgres://h/db?ff_listen=:5432",
            "postgres://h/db?ff_listen=db:5432&ff_poll_ms=100",
            "postgres://h/db?ff_migrate=maybe",
        ] {
            assert!(matches!(PostgresConnection::from_url(url), Err(Error::Validation { .. })), "{url}");
        }
    }

    #[test]
    fn installing_on_connect_can_be_turned_off() {
        let pg = PostgresConnection::from_url("postgres://h/db?ff_migrate=false").unwrap_or_else(|e| panic!("{e}"));
        assert!(!pg.migrate && !pg.through_pooler());
        assert_eq!(pg.url, "postgres://h/db");
    }
}

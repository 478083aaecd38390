//! Configuration from `FF_COMPLETIONS_*` environment variables, one place for every name.
//! A bad value is a [`Error::Validation`] naming the variable; it never panics. Every
//! number must be a positive whole number within its variable's range (zero is refused: a
//! zero tick, batch or buffer would stall or panic the tree).

use std::time::Duration;

use crate::actors::supervisor_config::SupervisorConfig;
use crate::config::{BackendConfig, BackendConnection, Retention};
use crate::config::{MAX_BATCH_SIZE, MAX_INTERVAL, MAX_SUBSCRIBER_BUFFER};
use crate::error::Error;

/// Backend URLs, comma-separated (`postgres://…`, `valkey://…`, `sqlite://…`). Required.
pub const URL: &str = "FF_COMPLETIONS_URL";
/// Safety tick of every listener, in milliseconds.
pub const TICK_MS: &str = "FF_COMPLETIONS_TICK_MS";
/// Rows per read.
pub const BATCH_SIZE: &str = "FF_COMPLETIONS_BATCH_SIZE";
/// Events buffered per subscriber before its filter catches up from the backend.
pub const SUBSCRIBER_BUFFER: &str = "FF_COMPLETIONS_SUBSCRIBER_BUFFER";
/// Per-request timeout, in milliseconds.
pub const REQUEST_TIMEOUT_MS: &str = "FF_COMPLETIONS_REQUEST_TIMEOUT_MS";
/// Connect timeout, in milliseconds.
pub const CONNECT_TIMEOUT_MS: &str = "FF_COMPLETIONS_CONNECT_TIMEOUT_MS";
/// Postgres `lock_timeout` of the tree's statements, in milliseconds.
pub const LOCK_TIMEOUT_MS: &str = "FF_COMPLETIONS_LOCK_TIMEOUT_MS";
/// Postgres poll-only mode (no LISTEN, e.g. behind PgBouncer): poll interval in milliseconds.
pub const POLL_MS: &str = "FF_COMPLETIONS_POLL_MS";
/// Retention: remove completions older than this many seconds.
pub const RETENTION_MAX_AGE_S: &str = "FF_COMPLETIONS_RETENTION_MAX_AGE_S";
/// Retention: keep at most this many of the newest completions.
pub const RETENTION_MAX_EVENTS: &str = "FF_COMPLETIONS_RETENTION_MAX_EVENTS";
/// Crash loops escalate beyond `N/SECONDS` (N non-transient crashes within SECONDS).
pub const RESTART_INTENSITY: &str = "FF_COMPLETIONS_RESTART_INTENSITY";
/// Valkey: the approximate `MAXLEN ~` the producers' `XADD` keeps the completion stream to.
pub const VALKEY_STREAM_MAXLEN: &str = "FF_COMPLETIONS_VALKEY_STREAM_MAXLEN";
/// `true` or `false`: connect to every backend while spawning and fail fast when one cannot be
/// reached (see [`SupervisorConfig::connect_at_start`]).
pub const CONNECT_AT_START: &str = "FF_COMPLETIONS_CONNECT_AT_START";

/// Every variable this module reads, for documentation and diagnostics.
pub const ALL: [&str; 13] = [
    URL,
    TICK_MS,
    BATCH_SIZE,
    SUBSCRIBER_BUFFER,
    REQUEST_TIMEOUT_MS,
    CONNECT_TIMEOUT_MS,
    LOCK_TIMEOUT_MS,
    POLL_MS,
    RETENTION_MAX_AGE_S,
    RETENTION_MAX_EVENTS,
    RESTART_INTENSITY,
    VALKEY_STREAM_MAXLEN,
    CONNECT_AT_START,
];

/// Longest timeout or poll interval, in milliseconds (Postgres' `statement_timeout` limit).
const MAX_MILLIS: u64 = i32::MAX as u64;
/// Longest retention age, in seconds (100 years).
const MAX_AGE_S: u64 = 100 * 365 * 24 * 3600;

/// `true`/`1` or `false`/`0`, or `None` when the variable is unset or empty.
fn flag(lookup: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<bool>, Error> {
    match lookup(name).as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some("true" | "1") => Ok(Some(true)),
        Some("false" | "0") => Ok(Some(false)),
        Some(other) => Err(Error::validation(format!("{name}={other:?}: expected true or false"))),
    }
}

/// A whole number in `1..=max`, or `None` when the variable is unset or empty.
fn number(lookup: &dyn Fn(&str) -> Option<String>, name: &str, max: u64) -> Result<Option<u64>, Error> {
    match lookup(name) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .map(Some)
            .ok_or_else(|| Error::validation(format!("{name}={v:?} is not a whole number from 1 to {max}"))),
    }
}

fn millis(lookup: &dyn Fn(&str) -> Option<String>, name: &str, max: u64) -> Result<Option<Duration>, Error> {
    Ok(number(lookup, name, max)?.map(Duration::from_millis))
}

fn intensity(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<(u32, Duration)>, Error> {
    let Some(v) = lookup(RESTART_INTENSITY).filter(|v| !v.trim().is_empty()) else { return Ok(None) };
    let bad = || Error::validation(format!("{RESTART_INTENSITY}={v:?} must look like 5/60 (crashes/seconds)"));
    let (n, secs) = v.trim().split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    let secs: u64 = secs.trim().parse().ok().filter(|s| *s > 0).ok_or_else(bad)?;
    Ok(Some((n, Duration::from_secs(secs))))
}

/// The URLs of a comma-separated list; a piece without a scheme continues the previous URL's
/// seed node list (`valkey+cluster://a:7000,b:7001,postgres://..` is two URLs).
fn backend_urls(list: &str) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    for piece in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        match urls.last_mut() {
            Some(last) if !piece.contains("://") && !piece.starts_with("sqlite:") => {
                last.push(',');
                last.push_str(piece);
            }
            _ => urls.push(piece.to_owned()),
        }
    }
    urls
}

/// Builds a tree configuration from `lookup` (the environment, or a map in tests).
///
/// # Errors
/// [`Error::Validation`] naming the variable that is missing or malformed.
pub fn supervisor_config_from(lookup: &dyn Fn(&str) -> Option<String>) -> Result<SupervisorConfig, Error> {
    let urls =
        lookup(URL).filter(|u| !u.trim().is_empty()).ok_or_else(|| Error::validation(format!("{URL} is not set")))?;
    let mut config = SupervisorConfig::new();
    let request = millis(lookup, REQUEST_TIMEOUT_MS, MAX_MILLIS)?;
    let connect = millis(lookup, CONNECT_TIMEOUT_MS, MAX_MILLIS)?;
    let lock = millis(lookup, LOCK_TIMEOUT_MS, MAX_MILLIS)?;
    let poll = millis(lookup, POLL_MS, MAX_MILLIS)?;
    let max_age = number(lookup, RETENTION_MAX_AGE_S, MAX_AGE_S)?.map(Duration::from_secs);
    let max_events = number(lookup, RETENTION_MAX_EVENTS, u64::MAX)?;
    let stream_maxlen = number(lookup, VALKEY_STREAM_MAXLEN, i64::MAX as u64)?;
    for url in backend_urls(&urls) {
        let mut backend = BackendConfig::from_url(&url)?;
        if let Some(d) = request {
            backend.timeouts = backend.timeouts.with_request(d);
        }
        if let Some(d) = connect {
            backend.timeouts = backend.timeouts.with_connect(d);
        }
        if let Some(d) = lock {
            backend.timeouts = backend.timeouts.with_lock(d);
        }
        if let Some(d) = poll.filter(|_| matches!(backend.connection, BackendConnection::Postgres(_))) {
            backend = backend.with_poll_only(d)?;
        }
        if let (Some(maxlen), BackendConnection::Valkey(valkey)) = (stream_maxlen, &mut backend.connection) {
            *valkey = valkey.clone().with_stream_maxlen(maxlen);
        }
        if max_age.is_some() || max_events.is_some() {
            let mut retention = Retention::max_events(max_events.unwrap_or(u64::MAX));
            retention.max_events = max_events;
            retention.max_age = max_age;
            backend = backend.with_retention(retention);
        }
        config = config.with_backend(backend);
    }
    let any_postgres = config.backends.iter().any(|(_, b)| matches!(b.connection, BackendConnection::Postgres(_)));
    if poll.is_some() && !any_postgres {
        return Err(Error::validation(format!("{POLL_MS} is a Postgres setting and {URL} names no Postgres URL")));
    }
    if let Some(tick) = millis(lookup, TICK_MS, MAX_INTERVAL.as_millis() as u64)? {
        config = config.with_tick(tick);
    }
    if let Some(n) = number(lookup, BATCH_SIZE, MAX_BATCH_SIZE as u64)? {
        config = config.with_batch_size(n as usize);
    }
    if let Some(n) = number(lookup, SUBSCRIBER_BUFFER, MAX_SUBSCRIBER_BUFFER as u64)? {
        config = config.with_subscriber_buffer(n as usize);
    }
    if let Some((n, within)) = intensity(lookup)? {
        config = config.with_restart_intensity(n, within);
    }
    if let Some(connect) = flag(lookup, CONNECT_AT_START)? {
        config = config.with_connect_at_start(connect);
    }
    Ok(config)
}

impl SupervisorConfig {
    /// Builds a configuration from the `FF_COMPLETIONS_*` environment variables (see
    /// [`crate::env_config`]).
    ///
    /// # Errors
    /// [`Error::Validation`] naming the variable that is missing or malformed.
    pub fn from_env() -> Result<Self, Error> {
        supervisor_config_from(&|name| std::env::var(name).ok())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<SupervisorConfig, Error> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        supervisor_config_from(&|name| map.get(name).cloned())
    }

    #[test]
    fn every_variable_is_applied() {
        let c = from(&[
            (URL, "postgres://u:pw@h/db, sqlite::memory:, valkey://h:6380"),
            (TICK_MS, "250"),
            (BATCH_SIZE, "128"),
            (SUBSCRIBER_BUFFER, "64"),
            (REQUEST_TIMEOUT_MS, "900"),
            (CONNECT_TIMEOUT_MS, "800"),
            (LOCK_TIMEOUT_MS, "700"),
            (POLL_MS, "100"),
            (RETENTION_MAX_AGE_S, "3600"),
            (RETENTION_MAX_EVENTS, "1000"),
            (RESTART_INTENSITY, "5/60"),
            (VALKEY_STREAM_MAXLEN, "5000"),
            (CONNECT_AT_START, "true"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.backends.len(), 3);
        let BackendConnection::Valkey(valkey) = &c.backends[2].1.connection else { panic!("not valkey") };
        assert_eq!((valkey.port, valkey.stream_maxlen), (6380, 5000));
        assert_eq!((c.tick, c.batch_size, c.subscriber_buffer), (Duration::from_millis(250), 128, 64));
        let pg = &c.backends[0].1;
        assert_eq!(pg.timeouts.request, Some(Duration::from_millis(900)));
        assert_eq!(pg.timeouts.connect, Some(Duration::from_millis(800)));
        assert_eq!(pg.timeouts.lock, Some(Duration::from_millis(700)));
        let BackendConnection::Postgres(conn) = &pg.connection else { panic!("not postgres") };
        assert_eq!(conn.poll_interval, Some(Duration::from_millis(100)));
        let retention = pg.retention.clone().unwrap_or_else(|| panic!("no retention"));
        assert_eq!((retention.max_age, retention.max_events), (Some(Duration::from_secs(3600)), Some(1000)));
        assert_eq!(c.restart_intensity.map(|r| (r.max_restarts, r.within)), Some((5, Duration::from_secs(60))));
        assert!(c.connect_at_start);
        assert!(!from(&[(URL, "sqlite::memory:")]).unwrap_or_else(|e| panic!("{e}")).connect_at_start);
    }

    #[test]
    fn a_cluster_url_s_seed_nodes_stay_one_backend_in_the_url_list() {
        let c = from(&[(URL, "valkey+cluster://a:7000,b:7001, sqlite::memory:,valkey+cluster://c:7000,d")])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.backends.len(), 3);
        let BackendConnection::Valkey(first) = &c.backends[0].1.connection else { panic!("not valkey") };
        assert_eq!(first.nodes().collect::<Vec<_>>(), [("a", 7000), ("b", 7001)]);
        let BackendConnection::Valkey(last) = &c.backends[2].1.connection else { panic!("not valkey") };
        assert_eq!(last.nodes().collect::<Vec<_>>(), [("c", 7000), ("d", 6379)]);
        assert_eq!(backend_urls("postgres://h/db,valkey://v"), ["postgres://h/db", "valkey://v"]);
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases = [
            (TICK_MS, "soon"),
            (TICK_MS, "0"),
            (TICK_MS, "86400001"),
            (BATCH_SIZE, "0"),
            (BATCH_SIZE, "100001"),
            (SUBSCRIBER_BUFFER, "0"),
            (SUBSCRIBER_BUFFER, "18446744073709551615"),
            (REQUEST_TIMEOUT_MS, "2147483648"),
            (CONNECT_TIMEOUT_MS, "0"),
            (POLL_MS, "0"),
            (RETENTION_MAX_AGE_S, "18446744073709551615"),
            (VALKEY_STREAM_MAXLEN, "18446744073709551615"),
            (RESTART_INTENSITY, "5"),
            (CONNECT_AT_START, "yes"),
            (URL, "ftp://x"),
        ];
        for (name, value) in cases {
            let mut vars = vec![(URL, "sqlite::memory:")];
            vars.push((name, value));
            match from(&vars) {
                Err(Error::Validation { detail }) => {
                    assert!(detail.contains(name) || name == URL, "{detail}")
                }
                other => panic!("{name}={value} gave {other:?}"),
            }
        }
        assert!(matches!(from(&[]), Err(Error::Validation { .. })));
    }

    #[test]
    fn values_at_the_top_of_their_range_are_accepted() {
        let c = from(&[
            (URL, "sqlite::memory:"),
            (TICK_MS, "86400000"),
            (BATCH_SIZE, "100000"),
            (SUBSCRIBER_BUFFER, "1000000"),
            (REQUEST_TIMEOUT_MS, "2147483647"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.tick, c.batch_size, c.subscriber_buffer), (MAX_INTERVAL, MAX_BATCH_SIZE, MAX_SUBSCRIBER_BUFFER));
        assert_eq!(c.backends[0].1.timeouts.request, Some(Duration::from_millis(2_147_483_647)));
    }
}

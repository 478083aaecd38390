//! Backend configuration: connection per backend, timeouts, retry policy, and URL parsing.
//! `Debug` and `Display` never show a password.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, redact};

mod postgres;

pub use postgres::PostgresConnection;

/// Shortest safety tick and held-back re-poll: a zero interval would make `tokio::time`
/// panic (the tick) or spin (the re-poll).
pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(1);
/// Longest safety tick, re-poll or gauge interval: longer ones overflow a clock deadline.
pub(crate) const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Shortest interval of the periodic backend queries: gauges and the trim job.
pub(crate) const MIN_QUERY_INTERVAL: Duration = Duration::from_millis(10);
/// Largest read: rows per read are clamped to `1..=MAX_BATCH_SIZE`.
pub(crate) const MAX_BATCH_SIZE: usize = 100_000;
/// Largest subscriber buffer: events buffered are clamped to `1..=MAX_SUBSCRIBER_BUFFER`.
pub(crate) const MAX_SUBSCRIBER_BUFFER: usize = 1_000_000;

/// Request and connect timeouts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendTimeouts {
    /// Per-request timeout; `None` means the backend's default (Valkey: 5 s here, not ferriskey's
    /// 250 ms; Postgres: [`Self::POSTGRES_STATEMENT`]). Postgres applies it as
    /// `statement_timeout` to every statement the tree and its group members send; SQLite
    /// ignores it.
    pub request: Option<Duration>,
    /// Connect timeout; `None` means 5 s.
    pub connect: Option<Duration>,
    /// Postgres: the longest a statement of the tree or of a group member waits for a lock
    /// (`lock_timeout`); `None` means [`Self::POSTGRES_LOCK`]. A statement that times out is
    /// an [`Error::Timeout`], transient: the tree retries it. Valkey has no lock waits (each
    /// command is bounded by `request`); SQLite waits up to its busy timeout (5 s).
    pub lock: Option<Duration>,
}

impl BackendTimeouts {
    /// Sets the request timeout.
    #[must_use]
    pub fn with_request(mut self, d: Duration) -> Self {
        self.request = Some(d);
        self
    }

    /// The default `statement_timeout` of the tree's Postgres statements: 30 s.
    pub const POSTGRES_STATEMENT: Duration = Duration::from_secs(30);

    /// The default `lock_timeout` of the tree's Postgres statements: 1 s, below a third of the
    /// shortest lease a durable group member renews at its default ttl (5 s), so a heartbeat
    /// that waits for a lock fails and is tried again before its leases run out.
    pub const POSTGRES_LOCK: Duration = Duration::from_secs(1);

    /// Sets the connect timeout.
    #[must_use]
    pub fn with_connect(mut self, d: Duration) -> Self {
        self.connect = Some(d);
        self
    }

    /// Sets the lock timeout (Postgres).
    #[must_use]
    pub fn with_lock(mut self, d: Duration) -> Self {
        self.lock = Some(d);
        self
    }

    /// The `statement_timeout` of the tree's Postgres statements: the request timeout, or
    /// [`Self::POSTGRES_STATEMENT`].
    pub fn postgres_statement_or_default(&self) -> Duration {
        self.request.unwrap_or(Self::POSTGRES_STATEMENT)
    }

    /// The `lock_timeout` of the tree's Postgres statements, or [`Self::POSTGRES_LOCK`].
    pub fn lock_or_default(&self) -> Duration {
        self.lock.unwrap_or(Self::POSTGRES_LOCK)
    }

    /// The request timeout, or its default (5 s) when unset: what Valkey clients of the tree
    /// wait for an answer.
    pub fn request_or_default(&self) -> Duration {
        self.request.unwrap_or(Duration::from_secs(5))
    }

    /// The connect timeout, or its default (5 s) when unset.
    pub fn connect_or_default(&self) -> Duration {
        self.connect.unwrap_or(Duration::from_secs(5))
    }
}

/// Retry policy of a backend: its reads and connects, and the restart backoff of its listener
/// and filters (doubling from `factor`, capped, with jitter).
/// `None` fields take the defaults: base 2, factor 50 ms, 6 doublings (cap 3.2 s), jitter 20 %.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendRetry {
    /// Exponent base of the backoff curve.
    pub exponent_base: Option<u32>,
    /// First delay, in milliseconds.
    pub factor: Option<u32>,
    /// Number of growth steps before the delay stops growing.
    pub number_of_retries: Option<u32>,
    /// Jitter as a percentage of the computed delay.
    pub jitter_percent: Option<u32>,
}

impl BackendRetry {
    /// A policy with every field given.
    pub fn new(exponent_base: u32, factor_ms: u32, number_of_retries: u32, jitter_percent: u32) -> Self {
        Self {
            exponent_base: Some(exponent_base),
            factor: Some(factor_ms),
            number_of_retries: Some(number_of_retries),
            jitter_percent: Some(jitter_percent),
        }
    }
}

/// How much completion history a backend keeps. A trim job removes what is older than
/// `max_age` or beyond the newest `max_events`, every `interval`; a subscriber whose cursor falls
/// below what is kept gets [`Error::CursorExpired`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Remove completions older than this.
    pub max_age: Option<Duration>,
    /// Keep at most this many of the newest completions.
    pub max_events: Option<u64>,
    /// How often the trim job runs.
    pub interval: Duration,
}

impl Retention {
    /// Keep completions for `max_age`, trimming every minute.
    pub fn max_age(max_age: Duration) -> Self {
        Self { max_age: Some(max_age), max_events: None, interval: Duration::from_secs(60) }
    }

    /// Keep the newest `max_events` completions, trimming every minute.
    pub fn max_events(max_events: u64) -> Self {
        Self { max_age: None, max_events: Some(max_events), interval: Duration::from_secs(60) }
    }

    /// Sets how often the trim job runs, from
    /// [`MIN_QUERY_INTERVAL`](crate::SupervisorConfig::MIN_QUERY_INTERVAL) on.
    #[must_use]
    pub fn every(mut self, interval: Duration) -> Self {
        self.interval = interval.max(MIN_QUERY_INTERVAL);
        self
    }
}

/// Valkey connection parameters.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ValkeyConnection {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// ACL user name.
    pub username: Option<String>,
    /// Password (never printed).
    pub password: Option<String>,
    /// Use TLS (`valkeys://`): the server's certificate is verified against
    /// [`Self::tls_ca`], or the system's roots when unset.
    pub tls: bool,
    /// A PEM file of the authority the server's certificate must be signed by (`?cacert=` in
    /// the URL).
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key, PEM files, for servers that ask for one
    /// (`tls-auth-clients yes`; `?cert=…&key=…` in the URL).
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Cluster mode: `host:port` (and [`ValkeyConnection::seed_nodes`]) are nodes to discover
    /// the cluster from; ferriskey's cluster client routes each call to the primary owning its
    /// keys' slot (database 0 only).
    pub cluster: bool,
    /// Further nodes to discover a cluster from, after `host:port` (any one that answers is
    /// enough); empty for a single node.
    pub seed_nodes: Vec<(String, u16)>,
    /// Logical database number.
    pub database: i64,
    /// `MAXLEN ~` the producers trim the completion stream to on every `XADD`.
    pub stream_maxlen: u64,
    /// The demo engine follows every write with `WAIT <n>` and fails the call (the write done,
    /// its durability not confirmed) when fewer replicas acknowledged it in time: a completion
    /// it reports is on `n` replicas, so a failover cannot lose it. 0 (the default): no `WAIT`,
    /// and a failover may lose the writes its replicas had not received yet.
    pub wait_replicas: u32,
}

impl ValkeyConnection {
    /// Plain connection to `host:port`, database 0.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            username: None,
            password: None,
            tls: false,
            tls_ca: None,
            tls_client: None,
            cluster: false,
            seed_nodes: Vec::new(),
            database: 0,
            stream_maxlen: 1_000_000,
            wait_replicas: 0,
        }
    }

    /// Sets user name and password.
    #[must_use]
    pub fn with_credentials(mut self, username: Option<String>, password: Option<String>) -> Self {
        self.username = username;
        self.password = password;
        self
    }

    /// Enables or disables TLS.
    #[must_use]
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// TLS with `ca` as the authority of the server's certificate, and a client certificate
    /// and key when the server asks for one (implies [`Self::with_tls`]).
    #[must_use]
    pub fn with_tls_files(mut self, ca: Option<PathBuf>, client: Option<(PathBuf, PathBuf)>) -> Self {
        self.tls = true;
        self.tls_ca = ca;
        self.tls_client = client;
        self
    }

    /// Selects a database.
    #[must_use]
    pub fn with_database(mut self, database: i64) -> Self {
        self.database = database;
        self
    }

    /// Enables or disables cluster mode (`host:port` is then one seed node of the cluster).
    #[must_use]
    pub fn with_cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// Cluster mode seeded with several nodes: the first becomes `host:port`, the others
    /// [`ValkeyConnection::seed_nodes`]; a client finds the cluster through any one that answers.
    ///
    /// ```
    /// use ff_completions::ValkeyConnection;
    ///
    /// let v = ValkeyConnection::new("unused", 1).with_seed_nodes([("a", 7000), ("b", 7001)])?;
    /// assert_eq!(v.to_string(), "valkey+cluster://a:7000,b:7001/0");
    /// assert!(ValkeyConnection::new("a", 1).with_seed_nodes([("b", 0)]).is_err());
    /// # Ok::<(), ff_completions::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Validation`] for an empty list, an empty host, port 0 or a node named twice.
    pub fn with_seed_nodes<H: Into<String>>(
        mut self,
        nodes: impl IntoIterator<Item = (H, u16)>,
    ) -> Result<Self, Error> {
        let nodes: Vec<(String, u16)> = nodes.into_iter().map(|(h, p)| (h.into(), p)).collect();
        check_seed_nodes(&nodes)?;
        let mut nodes = nodes.into_iter();
        let Some((host, port)) = nodes.next() else {
            return Err(Error::validation("a valkey cluster needs at least one seed node"));
        };
        self.host = host;
        self.port = port;
        self.seed_nodes = nodes.collect();
        self.cluster = true;
        Ok(self)
    }

    /// `host:port`, then the further seed nodes.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, u16)> {
        std::iter::once((self.host.as_str(), self.port)).chain(self.seed_nodes.iter().map(|(h, p)| (h.as_str(), *p)))
    }

    /// Makes the demo engine wait for `replicas` replicas to acknowledge each write (`WAIT`,
    /// see [`ValkeyConnection::wait_replicas`]).
    #[must_use]
    pub fn with_wait_replicas(mut self, replicas: u32) -> Self {
        self.wait_replicas = replicas;
        self
    }

    /// Sets the approximate length producers trim the completion stream to (default 1,000,000).
    #[must_use]
    pub fn with_stream_maxlen(mut self, maxlen: u64) -> Self {
        self.stream_maxlen = maxlen.max(1);
        self
    }
}

impl fmt::Debug for ValkeyConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValkeyConnection")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .field("tls_client", &self.tls_client)
            .field("cluster", &self.cluster)
            .field("seed_nodes", &self.seed_nodes)
            .field("database", &self.database)
            .field("stream_maxlen", &self.stream_maxlen)
            .field("wait_replicas", &self.wait_replicas)
            .finish()
    }
}

impl fmt::Display for ValkeyConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "valkeys" } else { "valkey" };
        let cluster = if self.cluster { "+cluster" } else { "" };
        write!(f, "{scheme}{cluster}://")?;
        match (&self.username, &self.password) {
            (Some(u), Some(_)) => write!(f, "{u}:<redacted>@")?,
            (None, Some(_)) => write!(f, ":<redacted>@")?,
            (Some(u), None) => write!(f, "{u}@")?,
            (None, None) => {}
        }
        for (i, (host, port)) in self.nodes().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            if host.contains(':') {
                write!(f, "{comma}[{host}]:{port}")?;
            } else {
                write!(f, "{comma}{host}:{port}")?;
            }
        }
        write!(f, "/{}", self.database)
    }
}

/// A seed list is not empty and names each node once, with a host and a port other than 0.
fn check_seed_nodes(nodes: &[(String, u16)]) -> Result<(), Error> {
    if nodes.is_empty() {
        return Err(Error::validation("a valkey cluster needs at least one seed node"));
    }
    for (i, (host, port)) in nodes.iter().enumerate() {
        if host.trim().is_empty() {
            return Err(Error::validation(format!("valkey seed node {} has no host", i + 1)));
        }
        if *port == 0 {
            return Err(Error::validation(format!("valkey seed node {host}:0 has no port")));
        }
        if nodes[..i].contains(&(host.clone(), *port)) {
            return Err(Error::validation(format!("valkey seed node {host}:{port} is named twice")));
        }
    }
    Ok(())
}

/// Splits `scheme://[userinfo@]h1:p1,h2:p2/rest` into the URL with the first node only and the
/// further nodes (host, port; port 6379 when not given).
fn split_seed_nodes(text: &str) -> Result<(String, Vec<(String, u16)>), Error> {
    let Some((scheme, rest)) = text.split_once("://") else { return Ok((text.to_owned(), Vec::new())) };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    let Some((first, others)) = hosts.split_once(',') else { return Ok((text.to_owned(), Vec::new())) };
    let others = others.split(',').map(|node| parse_node(scheme, node)).collect::<Result<Vec<_>, _>>()?;
    Ok((format!("{scheme}://{userinfo}{first}{path}"), others))
}

/// `host[:port]` or `[v6]:port` of a seed list.
fn parse_node(scheme: &str, node: &str) -> Result<(String, u16), Error> {
    let bad = || Error::validation(format!("{scheme} URL: malformed seed node {node:?} (expected host:port)"));
    let node = node.trim();
    let (host, port) = match node.strip_prefix('[') {
        Some(v6) => {
            let (host, rest) = v6.split_once(']').ok_or_else(bad)?;
            (host, rest.strip_prefix(':'))
        }
        None => match node.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (node, None),
        },
    };
    if host.is_empty() || host.contains([':', '@', ' ']) && !node.starts_with('[') {
        return Err(bad());
    }
    let port = match port {
        None => 6379,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
    };
    Ok((host.to_owned(), port))
}

/// SQLite database: a file, or a private in-memory database.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SqliteConnection {
    /// A database file, created when missing.
    File(PathBuf),
    /// An in-memory database shared by this process's connections under this name.
    Memory(String),
}

/// Per-backend connection shape.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendConnection {
    /// Postgres over sqlx.
    Postgres(PostgresConnection),
    /// Valkey over ferriskey.
    Valkey(ValkeyConnection),
    /// Embedded SQLite over sqlx.
    Sqlite(SqliteConnection),
}

/// A backend to listen to: its connection, timeouts and retry policy.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendConfig {
    /// Where to connect.
    pub connection: BackendConnection,
    /// Timeouts.
    pub timeouts: BackendTimeouts,
    /// Retry and restart backoff policy.
    pub retry: BackendRetry,
    /// History kept; `None` keeps everything.
    pub retention: Option<Retention>,
}

impl BackendConfig {
    fn with_connection(connection: BackendConnection) -> Self {
        Self { connection, timeouts: BackendTimeouts::default(), retry: BackendRetry::default(), retention: None }
    }

    /// Postgres at `url`.
    pub fn postgres(url: impl Into<String>) -> Self {
        Self::with_connection(BackendConnection::Postgres(PostgresConnection::new(url)))
    }

    /// Valkey at `host:port`.
    pub fn valkey(host: impl Into<String>, port: u16) -> Self {
        Self::with_connection(BackendConnection::Valkey(ValkeyConnection::new(host, port)))
    }

    /// Valkey with full connection parameters.
    pub fn valkey_with(connection: ValkeyConnection) -> Self {
        Self::with_connection(BackendConnection::Valkey(connection))
    }

    /// SQLite database file at `path` (created when missing).
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Self::with_connection(BackendConnection::Sqlite(SqliteConnection::File(path.into())))
    }

    /// A fresh in-memory SQLite database, unique to this config.
    pub fn sqlite_in_memory() -> Self {
        let name = format!("ff-completions-{}", uuid::Uuid::new_v4().simple());
        Self::with_connection(BackendConnection::Sqlite(SqliteConnection::Memory(name)))
    }

    /// Sets the timeouts.
    #[must_use]
    pub fn with_timeouts(mut self, timeouts: BackendTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Sets the retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: BackendRetry) -> Self {
        self.retry = retry;
        self
    }

    /// Postgres only: wake by polling the outbox every `interval` instead of LISTEN/NOTIFY, for
    /// connection poolers in transaction mode (PgBouncer) where LISTEN does not work.
    ///
    /// # Errors
    /// [`Error::Validation`] on a Valkey or SQLite config, where it would do nothing.
    pub fn with_poll_only(mut self, interval: Duration) -> Result<Self, Error> {
        let BackendConnection::Postgres(pg) = &mut self.connection else {
            return Err(Error::validation(format!(
                "poll-only mode is a Postgres setting; a {} listener has no notification connection to replace",
                self.kind()
            )));
        };
        if pg.listen_url.is_some() {
            return Err(Error::validation(
                "poll-only mode and split mode (a LISTEN session of its own) exclude each other",
            ));
        }
        pg.poll_interval = Some(interval.max(Duration::from_millis(1)));
        Ok(self)
    }

    /// Postgres only: split mode. Every statement goes through the connection's URL (a
    /// transaction pooler such as PgBouncer), unnamed and in a transaction of its own, while the
    /// listener's LISTEN session, and installing the schema, use `direct_url` (the server
    /// itself): a pooled deployment keeps the wake-ups of a direct session. The URL parameter
    /// `?ff_listen=host:port` does the same with the pooler URL's credentials.
    ///
    /// # Errors
    /// [`Error::Validation`] on a Valkey or SQLite config, or one in poll-only mode.
    pub fn with_listen_url(mut self, direct_url: impl Into<String>) -> Result<Self, Error> {
        let kind = self.kind();
        match &mut self.connection {
            BackendConnection::Postgres(pg) if pg.poll_interval.is_none() => {
                pg.listen_url = Some(direct_url.into());
                Ok(self)
            }
            BackendConnection::Postgres(_) => {
                Err(Error::validation("split mode (a LISTEN session of its own) and poll-only mode exclude each other"))
            }
            _ => Err(Error::validation(format!("split mode is a Postgres setting, not a {kind} one"))),
        }
    }

    /// Postgres only: start without installing or upgrading the schema, for a runtime role
    /// without `CREATE`: the tree checks that the installed schema is the version this crate
    /// needs ([`Error::SchemaVersion`] names the missing migration) and that the role holds
    /// every privilege it needs ([`Error::Permission`] names the first missing ones). The URL
    /// parameter `?ff_migrate=false` does the same.
    ///
    /// # Errors
    /// [`Error::Validation`] on a Valkey or SQLite config.
    pub fn without_migrating(mut self) -> Result<Self, Error> {
        let kind = self.kind();
        match &mut self.connection {
            BackendConnection::Postgres(pg) => {
                pg.migrate = false;
                Ok(self)
            }
            _ => Err(Error::validation(format!("starting without migrating is a Postgres setting, not a {kind} one"))),
        }
    }

    /// Sets the retention policy (a trim job run by the supervisor).
    #[must_use]
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = Some(retention);
        self
    }

    /// A short name of the backend kind: `postgres`, `valkey` or `sqlite`.
    pub fn kind(&self) -> &'static str {
        match self.connection {
            BackendConnection::Postgres(_) => "postgres",
            BackendConnection::Valkey(_) => "valkey",
            BackendConnection::Sqlite(_) => "sqlite",
        }
    }

    /// Parses `postgres://` / `postgresql://`, `valkey://` / `redis://` (TLS: `valkeys://` /
    /// `rediss://`, user, password, `/db`; a cluster: `valkey+cluster://` and the like, naming
    /// one seed node or several, `valkey+cluster://a:7000,b:7001`), and `sqlite://path` /
    /// `sqlite::memory:`.
    ///
    /// ```
    /// use ff_completions::BackendConfig;
    ///
    /// let pg = BackendConfig::from_url("postgres://app:s3cret@db:5432/engine?ff_poll_ms=200")?;
    /// assert_eq!(pg.kind(), "postgres");
    /// assert!(!format!("{pg} {pg:?}").contains("s3cret"));
    /// assert_eq!(BackendConfig::from_url("rediss://cache:6380/2")?.kind(), "valkey");
    /// assert_eq!(BackendConfig::from_url("valkey+cluster://node-1:7000")?.to_string(), "valkey+cluster://node-1:7000/0");
    /// assert!(BackendConfig::from_url("ftp://nowhere").is_err());
    /// # Ok::<(), ff_completions::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Validation`] naming what is wrong; the message never shows the password.
    pub fn from_url(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        if text == "sqlite::memory:" || text == "sqlite://:memory:" {
            return Ok(Self::sqlite_in_memory());
        }
        if let Some(path) = text.strip_prefix("sqlite://").or_else(|| text.strip_prefix("sqlite:")) {
            if path.is_empty() {
                return Err(Error::validation("sqlite URL names no file"));
            }
            return Ok(Self::sqlite(path));
        }
        let valkey = ["valkey", "redis"].iter().any(|s| text.starts_with(s));
        let (first_node, seed_nodes) = if valkey { split_seed_nodes(text)? } else { (text.to_owned(), Vec::new()) };
        let url = url::Url::parse(&first_node)
            .map_err(|e| Error::validation(format!("bad backend URL {:?}: {e}", redact(text))))?;
        if !seed_nodes.is_empty() && !url.scheme().ends_with("+cluster") {
            return Err(Error::validation(format!(
                "{} URL names several nodes; only a cluster URL (valkey+cluster://) may",
                url.scheme()
            )));
        }
        match url.scheme() {
            "postgres" | "postgresql" => {
                if url.host_str().is_none_or(str::is_empty) && !text.contains("host=") {
                    return Err(Error::validation(format!("postgres URL {:?} has no host", redact(text))));
                }
                Ok(Self::with_connection(BackendConnection::Postgres(PostgresConnection::from_url(text)?)))
            }
            full @ ("valkey" | "valkeys" | "redis" | "rediss" | "valkey+cluster" | "valkeys+cluster"
            | "redis+cluster" | "rediss+cluster") => {
                let (scheme, cluster) = match full.strip_suffix("+cluster") {
                    Some(scheme) => (scheme, true),
                    None => (full, false),
                };
                let host = url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| Error::validation(format!("{scheme} URL has no host")))?;
                let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
                let port = url.port().unwrap_or(6379);
                let database =
                    match url.path().trim_start_matches('/') {
                        "" => 0,
                        db => db.parse::<i64>().ok().filter(|d| *d >= 0).ok_or_else(|| {
                            Error::validation(format!("{scheme} URL database {db:?} is not a number"))
                        })?,
                    };
                let decode = |s: &str| {
                    url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned())
                };
                let username = Some(url.username()).filter(|u| !u.is_empty()).and_then(decode);
                let password = url.password().and_then(decode);
                let tls = matches!(scheme, "valkeys" | "rediss");
                if cluster && database != 0 {
                    return Err(Error::validation(format!("{full} URL: a cluster has database 0 only")));
                }
                let mut connection = ValkeyConnection::new(host.clone(), port)
                    .with_credentials(username, password)
                    .with_tls(tls)
                    .with_database(database)
                    .with_cluster(cluster);
                let mut cert = None;
                let mut key = None;
                for (name, value) in url.query_pairs() {
                    match name.as_ref() {
                        "cacert" => connection.tls_ca = Some(PathBuf::from(value.as_ref())),
                        "cert" => cert = Some(PathBuf::from(value.as_ref())),
                        "key" => key = Some(PathBuf::from(value.as_ref())),
                        other => {
                            return Err(Error::validation(format!(
                                "{scheme} URL: unknown parameter {other:?} (known: cacert, cert, key)"
                            )));
                        }
                    }
                }
                match (cert, key) {
                    (Some(cert), Some(key)) => connection.tls_client = Some((cert, key)),
                    (None, None) => {}
                    _ => return Err(Error::validation(format!("{scheme} URL: cert and key go together"))),
                }
                if !tls && (connection.tls_ca.is_some() || connection.tls_client.is_some()) {
                    return Err(Error::validation(format!(
                        "{scheme} URL names TLS files without TLS: use {scheme}s://"
                    )));
                }
                if !seed_nodes.is_empty() {
                    connection = connection.with_seed_nodes(std::iter::once((host, port)).chain(seed_nodes))?;
                }
                Ok(Self::valkey_with(connection))
            }
            other => Err(Error::validation(format!(
                "unsupported backend URL scheme {other:?} (use postgres://, valkey://, valkey+cluster://, redis:// or sqlite://)"
            ))),
        }
    }
}

impl fmt::Display for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.connection {
            BackendConnection::Postgres(p) => f.write_str(&redact(&p.url)),
            BackendConnection::Valkey(v) => v.fmt(f),
            BackendConnection::Sqlite(SqliteConnection::File(p)) => write!(f, "sqlite://{}", p.display()),
            BackendConnection::Sqlite(SqliteConnection::Memory(_)) => f.write_str("sqlite::memory:"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valkey_url_parses_every_part() {
        let c = BackendConfig::from_url("rediss://bob:p%40ss@cache.local:6380/3").ok();
        let Some(BackendConnection::Valkey(v)) = c.map(|c| c.connection) else { panic!("not valkey") };
        assert_eq!((v.host.as_str(), v.port, v.database, v.tls), ("cache.local", 6380, 3, true));
        assert_eq!(v.username.as_deref(), Some("bob"));
        assert_eq!(v.password.as_deref(), Some("p@ss"));
    }

    #[test]
    fn cluster_urls_name_a_seed_node_and_database_0_only() {
        for url in ["valkey+cluster://n1:7000", "rediss+cluster://u:pw@n1:7000/0"] {
            let c = BackendConfig::from_url(url).ok();
            let Some(BackendConnection::Valkey(v)) = c.map(|c| c.connection) else { panic!("{url}: not valkey") };
            assert!(v.cluster && v.database == 0 && v.port == 7000, "{v:?}");
        }
        assert!(matches!(BackendConfig::from_url("valkey+cluster://n1:7000/2"), Err(Error::Validation { .. })));
        let plain = BackendConfig::from_url("valkey://n1:7000").ok();
        assert!(matches!(plain.map(|c| c.connection), Some(BackendConnection::Valkey(v)) if !v.cluster));
    }

    fn valkey_of(url: &str) -> ValkeyConnection {
        match BackendConfig::from_url(url).map(|c| c.connection) {
            Ok(BackendConnection::Valkey(v)) => v,
            other => panic!("{url}: {other:?}"),
        }
    }

    #[test]
    fn cluster_urls_and_the_builder_name_several_seed_nodes() {
        let v = valkey_of("valkeys+cluster://u:p,w@n1:7000,n2:7001,[::1]:7002,n4/0");
        assert!(v.cluster && v.tls);
        assert_eq!(v.password.as_deref(), Some("p,w"));
        let nodes: Vec<(&str, u16)> = v.nodes().collect();
        assert_eq!(nodes, [("n1", 7000), ("n2", 7001), ("::1", 7002), ("n4", 6379)]);
        assert_eq!(v.to_string(), "valkeys+cluster://u:<redacted>@n1:7000,n2:7001,[::1]:7002,n4:6379/0");
        assert_eq!(valkey_of(&v.to_string().replace("<redacted>", "x")).nodes().count(), 4);
        let built = ValkeyConnection::new("x", 1).with_seed_nodes([("a", 7000), ("b", 7001)]).ok();
        let built = built.unwrap_or_else(|| panic!("refused"));
        assert!(built.cluster);
        assert_eq!(built.nodes().collect::<Vec<_>>(), [("a", 7000), ("b", 7001)]);
        assert_eq!(valkey_of("valkey+cluster://a:7000,b:7001"), built);
    }

    #[test]
    fn malformed_seed_node_lists_are_validation_errors() {
        for url in [
            "valkey+cluster://a:7000,",
            "valkey+cluster://a:7000,,b:7001",
            "valkey+cluster://a:7000,b:x",
            "valkey+cluster://a:7000,b:0",
            "valkey+cluster://a:7000,b:70000",
            "valkey+cluster://a:7000,:7001",
            "valkey+cluster://a:7000,[::1:7001",
            "valkey+cluster://a:7000,a:7000",
            "valkey+cluster://a:7000,b:7001/3",
            "valkey://a:7000,b:7001",
            "redis://u:topsecret@a:7000,b:7001",
        ] {
            match BackendConfig::from_url(url) {
                Err(Error::Validation { detail }) => assert!(!detail.contains("topsecret"), "{detail}"),
                other => panic!("{url:?} gave {other:?}"),
            }
        }
        let empty: [(&str, u16); 0] = [];
        let lists: [Vec<(&str, u16)>; 4] =
            [empty.to_vec(), vec![("", 7000)], vec![("a", 0)], vec![("a", 7000), ("b", 7001), ("a", 7000)]];
        for list in lists {
            let refused = ValkeyConnection::new("h", 1).with_seed_nodes(list.clone());
            assert!(matches!(refused, Err(Error::Validation { .. })), "{list:?} gave {refused:?}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_or_display() {
        for url in ["valkey://u:topsecret@h:1/0", "postgres://u:topsecret@h:5432/db", "redis://:topsecret@h"] {
            let c = BackendConfig::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(!format!("{c:?}").contains("topsecret"), "{c:?}");
            assert!(!format!("{c}").contains("topsecret"), "{c}");
        }
    }

    #[test]
    fn bad_urls_are_validation_errors_without_secrets() {
        for url in [
            "",
            "http://h",
            "valkey://",
            "valkey://h:1/notanumber",
            "redis://u:topsecret@h:99999",
            "sqlite://",
            "postgres://",
        ] {
            match BackendConfig::from_url(url) {
                Err(Error::Validation { detail }) => assert!(!detail.contains("topsecret"), "{detail}"),
                other => panic!("{url:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn poll_only_mode_is_refused_where_it_would_do_nothing() {
        assert!(BackendConfig::postgres("postgres://h/db").with_poll_only(Duration::from_millis(5)).is_ok());
        for config in [BackendConfig::sqlite_in_memory(), BackendConfig::valkey("h", 6379)] {
            let err = config.with_poll_only(Duration::from_millis(5)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("poll-only mode is a Postgres setting"), "{err}");
        }
    }

    #[test]
    fn sqlite_urls_parse() {
        assert_eq!(BackendConfig::from_url("sqlite:///tmp/x.db").ok().map(|c| c.kind()), Some("sqlite"));
        assert_eq!(BackendConfig::from_url("sqlite::memory:").ok().map(|c| c.kind()), Some("sqlite"));
    }
}

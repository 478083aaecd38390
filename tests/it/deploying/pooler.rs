//! PgBouncer 1.18 (Debian 12's package) in `pool_mode = transaction`, started by the harness in
//! front of the shared test server: poll-only and split mode deliver everything, installing
//! through the pooler stops with a message that says to install directly (or goes through the
//! split mode's direct session), a URL that does not say it is pooled is refused by name, and
//! durable groups work through it.

use std::collections::HashSet;
use std::sync::Arc;

use ff_completions::{
    BackendConfig, CompletionSupervisorHandle, Completions, DurableRequest, Error, ExecutionId, SupervisorConfig,
};
use ff_completions_lab::{Engine, ExecutionSpec, PostgresEngine};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::OnceCell;

use super::first_error;
use crate::contract::{QUIET, WAIT, complete_n, running};
use crate::durable::{TTL, complete_spread, holding, unique};
use crate::support::pgbouncer::PgBouncer;
use crate::support::postgres::{fresh_database, reader_order, server};
use crate::support::{assert_exactly_once, assert_no_more, init_tracing, take_events, wait_until};

static BOUNCER: OnceCell<PgBouncer> = OnceCell::const_new();

/// The pooler in front of the shared server, shared by this binary's tests.
async fn bouncer() -> &'static PgBouncer {
    let port = server().await.port;
    BOUNCER.get_or_init(|| PgBouncer::start(port, &["postgres"], 6)).await
}

/// A fresh database with the subsystem and the demo installed directly (as a deployment
/// installs before it goes through the pooler), its engine, and its URL through the pooler.
async fn installed() -> (String, String, Arc<PostgresEngine>) {
    init_tracing();
    let direct = fresh_database().await;
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&direct)).await.expect("engine"));
    let pooled = bouncer().await.pooled(&direct);
    (direct, pooled, engine)
}

async fn tree(url: &str) -> CompletionSupervisorHandle {
    let config = BackendConfig::from_url(url).expect("config");
    CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(config)).await.expect("spawn tree").0
}

/// Poll-only mode through the pooler (`?ff_poll_ms=`), with six server sessions shared by
/// every client: completions committed by four concurrent producers all arrive once, in the
/// order the reader promises (computed from the recorded ticks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_only_through_pgbouncer_delivers_everything_in_the_readers_order() {
    let (direct, pooled, engine) = installed().await;
    let tree = tree(&format!("{pooled}?ff_poll_ms=20")).await;
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    // Claimed up front: concurrent claims would take each other's executions.
    let ids = running(&*engine, ExecutionSpec::new, 100).await;
    let producers: Vec<_> = ids
        .chunks(25)
        .map(|chunk| {
            let (engine, chunk) = (engine.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for id in &chunk {
                    assert!(engine.complete(id).await.expect("complete"), "{id} was running");
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.expect("producer");
    }
    let got = take_events(&mut live, 100, WAIT).await;
    assert_exactly_once(&got, &reader_order(&direct).await, true);
    assert_no_more(&mut live, QUIET).await;
    tree.shutdown().await;
}

/// Split mode (`?ff_listen=host:port` of the server itself) on a database with nothing
/// installed: the schema is installed through the direct session, the listener LISTENs on a
/// session of its own to the server, the reads go through the pooler, and completions arrive
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_installs_and_listens_directly_and_reads_through_pgbouncer() {
    init_tracing();
    let direct = fresh_database().await;
    let database = direct.rsplit('/').next().unwrap_or_default().to_owned();
    let pg_port = server().await.port;
    let pooled = bouncer().await.pooled(&direct);
    let tree = tree(&format!("{pooled}?ff_listen=127.0.0.1:{pg_port}")).await;
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    let engine = Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&direct)).await.expect("engine"));
    let done = complete_n(&*engine, 20).await;
    assert_exactly_once(&take_events(&mut live, 20, WAIT).await, &done, true);
    let mut admin = PgConnection::connect(&direct).await.expect("admin");
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2 AND query ILIKE 'LISTEN%'",
    )
    .bind(&database)
    .bind(ff_completions::postgres::LISTENER_APPLICATION_NAME)
    .fetch_one(&mut admin)
    .await
    .expect("pg_stat_activity");
    assert_eq!(listening, 1, "one LISTEN session on the server itself");
    let log = bouncer().await.log();
    assert!(log.contains(&format!("db={database}")), "no client of the pooler for {database}:\n{log}");
    tree.shutdown().await;
}

/// In poll-only mode through the pooler, a database without the schema: connecting stops at
/// once with a pooler error that says to install through a direct connection (sqlx's
/// installer holds a session lock across transactions, which a transaction pooler cannot keep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installing_through_pgbouncer_in_poll_only_mode_stops_with_a_message_to_install_directly() {
    init_tracing();
    let pooled = bouncer().await.pooled(&fresh_database().await);
    let config = BackendConfig::from_url(&format!("{pooled}?ff_poll_ms=50")).expect("config");
    let err = ff_completions::postgres::connect_pool(&config, 1).await.expect_err("refused");
    assert!(matches!(err, Error::Pooler { .. }) && !err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("install it once through a direct connection"), "{err}");
    let tree = tree(&format!("{pooled}?ff_poll_ms=50")).await;
    let err = match tree.subscribe(Completions::tail()).await {
        Err(err) => err,
        Ok(mut subscription) => first_error(&mut subscription).await,
    };
    assert!(matches!(err, Error::Pooler { .. }), "{err:?}");
    tree.shutdown().await;
}

/// The pooler's URL without `ff_poll_ms` or `ff_listen`: the session's startup options are
/// refused by PgBouncer, and the error says what it is and which parameter to add.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooler_url_that_does_not_say_so_is_refused_with_a_pooler_error() {
    let (_direct, pooled, _engine) = installed().await;
    let err = ff_completions::postgres::connect_pool(&BackendConfig::postgres(&pooled), 1).await.expect_err("refused");
    assert!(matches!(err, Error::Pooler { .. }) && !err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("ff_poll_ms") && err.to_string().contains("ff_listen"), "{err}");
}

/// Two members of a durable group on a tree that reads through the pooler: they split the
/// partitions, and each completion reaches one of them, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_groups_through_pgbouncer_split_the_partitions_and_deliver_each_completion_once() {
    let (_direct, pooled, engine) = installed().await;
    let tree = tree(&format!("{pooled}?ff_poll_ms=20")).await;
    let group = unique("pooled");
    let request = |member: &str| DurableRequest::group(&group).with_member(member).with_lease_ttl(TTL);
    let mut a = tree.subscribe(request("a")).await.expect("a");
    holding(&a, 256).await;
    let mut b = tree.subscribe(request("b")).await.expect("b");
    wait_until(WAIT, "a and b hold 128 each", || async { a.partitions().len() == 128 && b.partitions().len() == 128 })
        .await;
    let held_a: HashSet<u16> = a.partitions().into_iter().collect();
    let ids = complete_spread(engine.as_ref(), 40).await;
    let (in_a, in_b): (Vec<ExecutionId>, Vec<ExecutionId>) =
        ids.iter().partition(|id| held_a.contains(&id.partition()));
    assert_exactly_once(&take_events(&mut a, in_a.len(), WAIT).await, &in_a, false);
    assert_exactly_once(&take_events(&mut b, in_b.len(), WAIT).await, &in_b, false);
    assert_no_more(&mut a, QUIET).await;
    assert_no_more(&mut b, QUIET).await;
    drop((a, b));
    tree.shutdown().await;
}

/// The one value the reader keeps per server session, the cluster's system identifier in
/// `ff_completions.system_identifier`, is harmless through the pooler: whichever server
/// session a transaction gets, with the value cached or not (cleared here, as a new session
/// has it), the function answers the cluster's own identifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_identifier_a_server_session_caches_is_the_clusters_whichever_session_answers() {
    let (_direct, pooled, _engine) = installed().await;
    let config = BackendConfig::from_url(&format!("{pooled}?ff_poll_ms=50")).expect("config");
    let pool = ff_completions::postgres::connect_pool(&config, 8).await.expect("a pool through the pooler");
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(pool.acquire().await.expect("through the pooler"));
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let mut tx = client.begin().await.expect("begin");
        if i % 2 == 0 {
            sqlx::query("SELECT set_config('ff_completions.system_identifier', '', false)")
                .persistent(false)
                .execute(&mut *tx)
                .await
                .expect("clear the cached value");
        }
        let same: bool = sqlx::query_scalar(
            "SELECT ff_completions_system_identifier() = (SELECT c.system_identifier FROM pg_control_system() c)",
        )
        .persistent(false)
        .fetch_one(&mut *tx)
        .await
        .expect("system identifier");
        assert!(same, "client {i} got another system identifier");
        tx.commit().await.expect("commit");
    }
}

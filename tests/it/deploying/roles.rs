//! Least privilege: the schema's owner (not a superuser) installs; a runtime role holding
//! exactly the grants of `ff_completions_grant_runtime` runs the tree, the families and a
//! durable group without migrating; a role without them is told which privilege it lacks; a
//! schema of another version names the migration.

use std::sync::Arc;
use std::time::Duration;

use ff_completions::{
    BackendConfig, CompletionSupervisorHandle, Completions, DurableRequest, Error, LeaseHistory, Retention,
    SupervisorConfig,
};
use ff_completions_lab::PostgresEngine;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::contract::{WAIT, complete_n};
use crate::durable::{TTL, holding, unique};
use crate::families::{claim, create, take};
use crate::support::postgres::fresh_database;
use crate::support::{assert_exactly_once, init_tracing, take_events};

/// Runs `statements` at `url`, one by one.
async fn run(url: &str, statements: &[&str]) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    for statement in statements {
        sqlx::query(sqlx::AssertSqlSafe(statement.to_string()))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// A database owned by a role that is not a superuser, with the subsystem and the demo
/// installed by that role.
struct Owned {
    /// The harness's superuser URL of the database.
    admin: String,
    /// The owner's URL.
    owner: String,
    /// The demo engine, as the owner.
    engine: Arc<PostgresEngine>,
}

impl Owned {
    async fn new() -> Self {
        init_tracing();
        let admin = fresh_database().await;
        let owner_role = format!("owner_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let database = admin.rsplit('/').next().unwrap_or_default().to_owned();
        run(
            &admin,
            &[&format!("CREATE ROLE {owner_role} LOGIN"), &format!("ALTER DATABASE {database} OWNER TO {owner_role}")],
        )
        .await;
        let owner = Self::url_as(&admin, &owner_role);
        let engine = Arc::new(
            PostgresEngine::connect(&BackendConfig::postgres(&owner)).await.expect("the owner installs the subsystem"),
        );
        Self { admin, owner, engine }
    }

    fn url_as(admin: &str, role: &str) -> String {
        admin.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1)
    }

    /// A new login role (created by the superuser) and its URL, without migrating.
    async fn role(&self, prefix: &str) -> (String, String) {
        let role = format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        run(&self.admin, &[&format!("CREATE ROLE {role} LOGIN")]).await;
        let url = format!("{}?ff_migrate=false", Self::url_as(&self.admin, &role));
        (role, url)
    }

    /// The owner grants `role` the runtime privileges.
    async fn grant_runtime(&self, role: &str) {
        run(&self.owner, &[&format!("SELECT ff_completions_grant_runtime('{role}')")]).await;
    }
}

/// The error connecting as `url` ends with.
async fn connect_error(url: &str) -> Error {
    match ff_completions::postgres::connect_pool(&BackendConfig::from_url(url).expect("config"), 1).await {
        Err(err) => err,
        Ok(_) => panic!("{url}: connected"),
    }
}

/// The schema's owner is not a superuser: it installs the subsystem (and the demo) in its
/// database, and a tree connected as it delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_owner_who_is_not_a_superuser_installs_and_delivers() {
    let db = Owned::new().await;
    let mut conn = PgConnection::connect(&db.owner).await.expect("as the owner");
    let superuser: bool = sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        .fetch_one(&mut conn)
        .await
        .expect("role");
    assert!(!superuser);
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(&db.owner)))
            .await
            .expect("spawn");
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    let done = complete_n(&*db.engine, 3).await;
    assert_exactly_once(&take_events(&mut live, 3, WAIT).await, &done, true);
    tree.shutdown().await;
}

/// A runtime role holding exactly what `ff_completions_grant_runtime` grants, in a database
/// where PUBLIC may neither execute the subsystem's functions nor create temporary tables: a
/// tree started without migrating checks the version and the privileges, delivers completions
/// and lease history, runs retention, and a durable group member of it holds every partition
/// and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_role_with_exactly_the_granted_privileges_runs_the_tree_families_retention_and_groups() {
    let db = Owned::new().await;
    let database = db.admin.rsplit('/').next().unwrap_or_default().to_owned();
    run(
        &db.owner,
        &[
            "REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC",
            "REVOKE EXECUTE ON ALL PROCEDURES IN SCHEMA public FROM PUBLIC",
            &format!("REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC"),
        ],
    )
    .await;
    let (role, url) = db.role("runtime").await;
    db.grant_runtime(&role).await;
    let config = BackendConfig::from_url(&url)
        .expect("config")
        .with_retention(Retention::max_events(1_000_000).every(Duration::from_millis(50)));
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(config)).await.expect("spawn");
    let mut completions = tree.subscribe(Completions::tail()).await.expect("completions");
    let mut leases = tree.subscribe(LeaseHistory::tail()).await.expect("lease history");
    let mut member = tree
        .subscribe(DurableRequest::exclusive(unique("runtime")).with_lease_ttl(TTL).with_ack_after_delivery())
        .await
        .expect("durable");
    holding(&member, 256).await;
    let done = complete_n(&*db.engine, 4).await;
    assert_exactly_once(&take_events(&mut completions, 4, WAIT).await, &done, true);
    assert_exactly_once(&take_events(&mut member, 4, WAIT).await, &done, true);
    create(&*db.engine, None, 2).await;
    let claimed = claim(&*db.engine, "w-1", 2).await;
    let acquired: Vec<ff_completions::LeaseHistoryEvent> = take(&mut leases, 4 + 2, WAIT).await;
    assert!(acquired.iter().any(|e| claimed.contains(e.execution_id())), "{acquired:?}");
    let stats = tree.stats().await.expect("stats");
    assert!(stats.listeners.iter().all(|l| l.restarts == 0), "the listener failed as the runtime role: {stats:?}");
    drop(member);
    tree.shutdown().await;
}

/// Roles without the grants, started without migrating, are refused at once with a
/// permission error that names the privilege and the object: one with no grant at all, one
/// with every grant but `INSERT` on the tick table. A role that tries to install without
/// `CREATE` is told it lacks the privilege, not that the schema is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_the_grants_is_told_which_privilege_it_lacks() {
    let db = Owned::new().await;
    let (_, none) = db.role("nothing").await;
    let err = connect_error(&none).await;
    assert!(matches!(err, Error::Permission { .. }) && !err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("SELECT on table ff_completion_event"), "{err}");

    let (almost, almost_url) = db.role("almost").await;
    db.grant_runtime(&almost).await;
    run(&db.owner, &[&format!("REVOKE INSERT ON ff_completion_tick FROM {almost}")]).await;
    let err = connect_error(&almost_url).await;
    assert!(matches!(err, Error::Permission { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("INSERT on table ff_completion_tick") && !text.contains("SELECT on table"), "{text}");
    assert!(text.contains("ff_completions_grant_runtime"), "{text}");

    let installer = almost_url.replace("?ff_migrate=false", "");
    let err = connect_error(&installer).await;
    assert!(matches!(err, Error::Permission { .. }), "{err:?}");
    assert!(err.to_string().contains("permission denied for schema public"), "{err}");
}

/// Started without migrating: a ledger without migration 0008 is refused with the
/// migration's name; a database without the schema says it is not installed; a ledger with a
/// migration this crate does not know says it comes from a newer version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_without_migrating_names_the_missing_or_unknown_migration() {
    let db = Owned::new().await;
    let check = format!("{}?ff_migrate=false", db.owner);
    ff_completions::postgres::connect_pool(&BackendConfig::from_url(&check).expect("config"), 1)
        .await
        .expect("the installed schema passes");
    run(
        &db.admin,
        &["INSERT INTO ff_completions_migrations (version, description, success, checksum, execution_time) \
           SELECT 99, description, success, checksum, execution_time FROM ff_completions_migrations WHERE version = 7"],
    )
    .await;
    let err = connect_error(&check).await;
    assert!(matches!(err, Error::SchemaVersion { .. }) && !err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("migration 0099, which this crate does not know"), "{err}");
    run(&db.admin, &["DELETE FROM ff_completions_migrations WHERE version IN (8, 99)"]).await;
    let err = connect_error(&check).await;
    assert!(matches!(err, Error::SchemaVersion { .. }), "{err:?}");
    assert!(err.to_string().contains("migration 0008_deploying is not installed"), "{err}");

    let empty = format!("{}?ff_migrate=false", fresh_database().await);
    let err = connect_error(&empty).await;
    assert!(matches!(err, Error::Schema { .. }) && !err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("not installed"), "{err}");
}

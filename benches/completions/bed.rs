//! The test bed: servers the bench starts itself on loopback (one Postgres, one Valkey, SQLite
//! files), a fresh database / flushed keyspace / new file for every run, and the producers'
//! workload: executions created ahead (untimed), then completed by the backend's own terminal
//! operations (timed).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ff_completions::{BackendConfig, BackendConnection, ExecutionId, FlowId};
use ff_completions_lab::{CancelFlowPolicy, Engine, ExecutionSpec, connect_engine};
use futures::StreamExt;
use uuid::Uuid;

use crate::measure::Commits;
use crate::support;

/// A backend the bench drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Kind {
    Postgres,
    Valkey,
    /// Three primaries on this machine.
    ValkeyCluster,
    Sqlite,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Valkey => "valkey",
            Self::ValkeyCluster => "valkey-cluster",
            Self::Sqlite => "sqlite",
        }
    }
}

/// The servers of the whole bench.
pub struct Bed {
    valkey: Option<support::valkey::ValkeyServer>,
    valkey_cluster: Option<support::valkey::ValkeyCluster>,
    files: tempfile::TempDir,
    next_file: AtomicUsize,
}

impl Bed {
    pub async fn start(kinds: &[Kind]) -> Self {
        let valkey = match kinds.contains(&Kind::Valkey) {
            true => Some(support::valkey::ValkeyServer::start().await),
            false => None,
        };
        let valkey_cluster = match kinds.contains(&Kind::ValkeyCluster) {
            true => Some(support::valkey::ValkeyCluster::start(3).await),
            false => None,
        };
        Self { valkey, valkey_cluster, files: tempfile::tempdir().expect("temp dir"), next_file: AtomicUsize::new(0) }
    }

    /// A backend with no history, its schema or library installed.
    pub async fn fresh(&self, kind: Kind) -> Run {
        let run = match kind {
            Kind::Postgres => {
                let url = support::postgres::fresh_database().await;
                Run { kind, config: BackendConfig::postgres(url.clone()), pg_url: Some(url), sqlite: None }
            }
            Kind::Valkey => {
                let server = self.valkey.as_ref().expect("the bed was started with valkey");
                let _: ferriskey::Value = server.command(&["FLUSHALL"]).await;
                // Connections of earlier runs would count as this run's.
                let _: ferriskey::Value = server.command(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]).await;
                Run { kind, config: server.config(), pg_url: None, sqlite: None }
            }
            Kind::ValkeyCluster => {
                let cluster = self.valkey_cluster.as_ref().expect("the bed was started with a valkey cluster");
                for node in &cluster.nodes {
                    let _: ferriskey::Value = node.command(&["FLUSHALL"]).await;
                    let _: ferriskey::Value =
                        node.command(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]).await;
                }
                Run { kind, config: cluster.config(), pg_url: None, sqlite: None }
            }
            Kind::Sqlite => {
                let n = self.next_file.fetch_add(1, Ordering::Relaxed);
                let path = self.files.path().join(format!("bench-{n}.db"));
                Run { kind, config: BackendConfig::sqlite(path.clone()), pg_url: None, sqlite: Some(path) }
            }
        };
        drop(run.engine().await);
        run
    }
}

/// One backend of one measurement.
pub struct Run {
    pub kind: Kind,
    pub config: BackendConfig,
    pub pg_url: Option<String>,
    pub sqlite: Option<std::path::PathBuf>,
}

impl Run {
    pub async fn engine(&self) -> Arc<dyn Engine> {
        connect_engine(&self.config).await.expect("engine connects")
    }

    pub fn sqlite_path(&self) -> &std::path::Path {
        self.sqlite.as_deref().expect("a sqlite run")
    }

    pub async fn pg_pool(&self, max: u32) -> sqlx::PgPool {
        let url = self.pg_url.as_deref().expect("a postgres run");
        sqlx::postgres::PgPoolOptions::new().max_connections(max).connect(url).await.expect("postgres pool")
    }

    pub async fn valkey_client(&self) -> ferriskey::Client {
        self.valkey_client_named("bench").await
    }

    /// A client of its own, named `name` in `CLIENT LIST`.
    pub async fn valkey_client_named(&self, name: &str) -> ferriskey::Client {
        let config = self
            .config
            .clone()
            .with_timeouts(ff_completions::BackendTimeouts::default().with_request(Duration::from_secs(30)));
        ff_completions::valkey::connect_client(&config, name).await.expect("valkey client")
    }

    /// Server connections held now: (notification connections, all connections), the
    /// bench's own admin connection left out.
    pub async fn connections(&self) -> (u64, u64) {
        match self.kind {
            Kind::Postgres => {
                let pool = self.pg_pool(1).await;
                let (listen, all): (i64, i64) = sqlx::query_as(
                    "SELECT count(*) FILTER (WHERE query ILIKE 'listen%'), count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .fetch_one(&pool)
                .await
                .expect("pg_stat_activity");
                pool.close().await;
                (listen as u64, all as u64)
            }
            Kind::Valkey => {
                let client = self.valkey_client().await;
                let list: String = client.cmd("CLIENT").arg("LIST").execute().await.expect("CLIENT LIST");
                let listener = format!(" name={} ", ff_completions::valkey::LISTENER_CLIENT_NAME);
                let blocking = list
                    .lines()
                    .filter(|l| l.contains(&listener) || l.contains(&format!(" name={FLOOR_CLIENT} ")))
                    .count() as u64;
                (blocking, list.lines().filter(|l| !l.contains(" name=bench ")).count() as u64)
            }
            Kind::ValkeyCluster => {
                // Summed over the primaries (CLIENT LIST goes to one node of a cluster).
                let BackendConnection::Valkey(v) = &self.config.connection else { return (0, 0) };
                let nodes: String =
                    self.valkey_client().await.cmd("CLUSTER").arg("NODES").execute().await.expect("nodes");
                let (mut listener_conns, mut all) = (0, 0);
                for port in nodes.lines().filter_map(|l| {
                    l.split_whitespace().nth(1)?.split('@').next()?.rsplit_once(':')?.1.parse::<u16>().ok()
                }) {
                    let node = BackendConfig::valkey_with(ff_completions::ValkeyConnection::new(v.host.clone(), port));
                    let client = ff_completions::valkey::connect_client(&node, "bench").await.expect("node client");
                    let list: String = client.cmd("CLIENT").arg("LIST").execute().await.expect("CLIENT LIST");
                    let listener = format!(" name={} ", ff_completions::valkey::LISTENER_CLIENT_NAME);
                    listener_conns += list.lines().filter(|l| l.contains(&listener)).count() as u64;
                    all += list
                        .lines()
                        .filter(|l| !l.contains(" name=bench ") && !l.contains(" name=test-admin "))
                        .count() as u64;
                }
                (listener_conns, all)
            }
            Kind::Sqlite => (0, 0),
        }
    }
}

/// The name of the Valkey floor's connection.
pub const FLOOR_CLIENT: &str = "bench-floor";

/// What one producer call completes: one execution, or a whole flow in one commit.
pub enum Unit {
    One(ExecutionId),
    Flow(FlowId, Vec<ExecutionId>),
}

impl Unit {
    pub fn ids(&self) -> Vec<Uuid> {
        match self {
            Self::One(id) => vec![id.uuid()],
            Self::Flow(_, ids) => ids.iter().map(ExecutionId::uuid).collect(),
        }
    }

    /// Commits this unit's completions with the backend's terminal operations (a cancel of
    /// one execution, or the cancel of a flow: one transaction / one FCALL for all its
    /// members); returns how many completions it wrote.
    pub async fn commit(&self, engine: &dyn Engine) -> Result<u64, ff_completions_lab::Error> {
        match self {
            Self::One(id) => Ok(u64::from(engine.cancel(id).await?)),
            Self::Flow(flow, _) => engine.cancel_flow(flow, CancelFlowPolicy::CancelAll).await,
        }
    }
}

/// Creates `units` units ahead of the timed part: single executions (`batch` = 1) or flows of
/// `batch` executions, all eligible.
pub async fn prepare(run: &Run, engine: &Arc<dyn Engine>, units: usize, batch: usize) -> Vec<Unit> {
    let per_flow = if batch == 1 { 64 } else { batch };
    let executions = units * batch;
    let flows: Vec<FlowId> = (0..executions.div_ceil(per_flow)).map(|_| FlowId::new()).collect();
    let specs: Vec<ExecutionSpec> =
        (0..executions).map(|i| ExecutionSpec::new(&flows[i / per_flow]).with_namespace("bench")).collect();
    match run.kind {
        Kind::Postgres => create_in_bulk(run, &flows, &specs).await,
        _ => create_one_by_one(engine, &flows, &specs).await,
    }
    if batch == 1 {
        specs.iter().map(|s| Unit::One(s.id)).collect()
    } else {
        specs.chunks(batch).map(|c| Unit::Flow(c[0].flow_id.expect("flow"), c.iter().map(|s| s.id).collect())).collect()
    }
}

/// Postgres: the same SQL functions, called for thousands of rows per statement.
async fn create_in_bulk(run: &Run, flows: &[FlowId], specs: &[ExecutionSpec]) {
    let pool = run.pg_pool(1).await;
    let flow_ids: Vec<Uuid> = flows.iter().map(FlowId::uuid).collect();
    sqlx::query("SELECT count(ff_create_flow(f, 'bench')) FROM unnest($1::uuid[]) AS f")
        .bind(&flow_ids)
        .execute(&pool)
        .await
        .expect("create flows");
    for chunk in specs.chunks(10_000) {
        let ids: Vec<Uuid> = chunk.iter().map(|s| s.id.uuid()).collect();
        let partitions: Vec<i16> = chunk.iter().map(|s| s.id.partition() as i16).collect();
        let flows: Vec<Uuid> = chunk.iter().map(|s| s.flow_id.expect("flow").uuid()).collect();
        sqlx::query(
            "SELECT count(ff_create_execution(e, p, f, 'bench', '{}'::jsonb, '{}'::uuid[], 1)) \
             FROM unnest($1::uuid[], $2::int2[], $3::uuid[]) AS t(e, p, f)",
        )
        .bind(&ids)
        .bind(&partitions)
        .bind(&flows)
        .execute(&pool)
        .await
        .expect("create executions");
    }
    pool.close().await;
}

async fn create_one_by_one(engine: &Arc<dyn Engine>, flows: &[FlowId], specs: &[ExecutionSpec]) {
    let ns = ff_completions::Namespace::new("bench");
    futures::stream::iter(flows)
        .for_each_concurrent(64, |f| {
            let ns = ns.clone();
            async move { engine.create_flow(f, Some(&ns)).await.expect("create flow") }
        })
        .await;
    futures::stream::iter(specs)
        .for_each_concurrent(64, |s| async move { engine.create_execution(s).await.expect("create execution") })
        .await;
}

/// What producers did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Produced {
    pub events: u64,
    pub commits: u64,
    pub elapsed: Duration,
}

/// The producers' runtime: threads of their own, so a commit's time is taken the moment it
/// returns, whatever the subscribers in this process are busy with.
pub fn producer_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("producer")
            .enable_all()
            .build()
            .expect("producer runtime")
    })
}

/// Runs `work` on the producers' runtime with an engine connected there.
async fn on_producers<T, F, Fut>(config: &BackendConfig, work: F) -> T
where
    F: FnOnce(Arc<dyn Engine>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let config = config.clone();
    producer_runtime()
        .spawn(async move {
            let engine = connect_engine(&config).await.expect("producer engine");
            work(engine).await
        })
        .await
        .expect("producers")
}

/// Commits units one at a time, `pace` apart, recording each commit's time.
pub async fn paced(run: &Run, units: Arc<Vec<Unit>>, pace: Duration, commits: Arc<Commits>) -> Produced {
    on_producers(&run.config, move |engine| async move {
        let start = Instant::now();
        let mut events = 0;
        let mut tick = tokio::time::interval(pace);
        for unit in units.iter() {
            tick.tick().await;
            let issued = Instant::now();
            events += unit.commit(engine.as_ref()).await.expect("commit");
            commits.record(unit.ids(), issued, Instant::now());
        }
        Produced { events, commits: units.len() as u64, elapsed: start.elapsed() }
    })
    .await
}

/// `producers` concurrent producers commit units as fast as they can until `window` ends or
/// the units run out.
pub async fn saturate(run: &Run, units: Arc<Vec<Unit>>, producers: usize, window: Duration) -> Produced {
    on_producers(&run.config, move |engine| saturate_with(engine, units, producers, window)).await
}

async fn saturate_with(engine: Arc<dyn Engine>, units: Arc<Vec<Unit>>, producers: usize, window: Duration) -> Produced {
    let next = Arc::new(AtomicUsize::new(0));
    let events = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + window;
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let (engine, units, next, events) = (engine.clone(), units.clone(), next.clone(), events.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let Some(unit) = units.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    let n = unit.commit(engine.as_ref()).await.expect("commit");
                    events.fetch_add(n, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("producer");
    }
    let commits = next.load(Ordering::Relaxed).min(units.len()) as u64;
    Produced { events: events.load(Ordering::Relaxed), commits, elapsed: start.elapsed() }
}

//! Postgres under real operations, on a one-table outbox and on one partitioned as FlowFabric
//! deploys it (256 hash partitions on `partition_key`, a per-row trigger notifying
//! `ff_completion`): each figure beside a bare floor measured in the same run.
//!
//! - **latency**: producers insert one completion per transaction (FlowFabric's way: the
//!   partitioned shape's trigger notifies; on the one-table outbox each producer sends
//!   `ff_completions_wake()` after its commit), paced; subscribers of the tree against the floor,
//!   one `LISTEN` connection reading `event_id > last` on each notification and handing every
//!   row to each of its subscribers. The server's commit timestamp → receipt (by the wall clock
//!   both share): a producer's call may return well after its commit is visible.
//! - **idle**: a tree with 16 subscribers and nothing committed: CPU its server processes burn.
//! - **pages**: pages of the outbox (every partition, heap and indexes) one read touches: ours
//!   when nothing changed and for a one-row batch, the floor's read of that row; with no other
//!   transaction open and with 100 open in another database of the cluster.
//! - **catch-up**: a subscriber resuming behind 3,000 one-row batches, until it has them all.
//! - **trim**: delivery p99 while retention removes a large old history, against p99 without.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ff_completions::{BackendConfig, CompletionSupervisorHandle, Completions, StreamCursor, SupervisorConfig};
use futures::StreamExt;
use rand::Rng;
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgListener};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::measure::{CommitTimes, Commits, Spread, Tally, wait_for_all};
use crate::support;
use ff_completions_lab::harness::postgres::{outbox_pages, read_at_head};

const PARTITIONED_OUTBOX: &str = include_str!("../../tests/fixtures/partitioned_outbox.sql");

/// The outbox's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One table, as the subsystem creates it.
    Plain,
    /// 256 hash partitions, FlowFabric's deployed shape.
    Partitioned,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "one table",
            Self::Partitioned => "256 partitions",
        }
    }
}

/// A receiver of completions: the tree, or the floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    Ours,
    Floor,
}

/// The sizes of a run.
pub struct OperationsSizes {
    pub events: usize,
    pub producers: usize,
    /// Pause between two commits of one producer.
    pub pace: Duration,
    pub subscribers: Vec<usize>,
    pub idle_window: Duration,
    pub history: u64,
    pub open_elsewhere: usize,
    pub small_batches: usize,
    pub trim_history: u64,
    pub trim_window: Duration,
}

impl OperationsSizes {
    pub fn full() -> Self {
        Self {
            events: 5_000,
            producers: 4,
            pace: Duration::from_millis(10),
            subscribers: vec![1, 64],
            idle_window: Duration::from_secs(10),
            history: 100_000,
            open_elsewhere: 100,
            small_batches: 3_000,
            trim_history: 590_000,
            trim_window: Duration::from_secs(4),
        }
    }

    pub fn smoke() -> Self {
        Self {
            events: 60,
            producers: 2,
            pace: Duration::from_millis(5),
            subscribers: vec![1, 4],
            idle_window: Duration::from_millis(500),
            history: 2_000,
            open_elsewhere: 3,
            small_batches: 100,
            trim_history: 5_000,
            trim_window: Duration::from_millis(500),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LatencyRow {
    pub shape: Shape,
    pub reader: Reader,
    pub subscribers: usize,
    pub spread: Spread,
    /// Completions committed that the subscriber with the fewest never received.
    pub lost: u64,
}

#[derive(Clone, Debug)]
pub struct IdleRow {
    pub shape: Shape,
    /// Server CPU, in percent of one core.
    pub cpu_percent: f64,
    pub window: Duration,
}

#[derive(Clone, Debug)]
pub struct PagesRow {
    pub shape: Shape,
    pub open_elsewhere: usize,
    pub ours_idle: i64,
    pub ours_one_row: i64,
    pub floor_one_row: i64,
}

#[derive(Clone, Debug)]
pub struct CatchUpRow {
    pub shape: Shape,
    pub batches: usize,
    pub took: Option<Duration>,
}

#[derive(Clone, Debug)]
pub struct TrimRow {
    pub history: u64,
    pub without: Spread,
    pub during: Spread,
    pub removed: u64,
    pub trim_took: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct OperationsResults {
    pub latency: Vec<LatencyRow>,
    pub idle: Vec<IdleRow>,
    pub pages: Vec<PagesRow>,
    pub catch_up: Vec<CatchUpRow>,
    pub trim: Option<TrimRow>,
}

pub async fn run(sizes: &OperationsSizes) -> OperationsResults {
    let mut results = OperationsResults::default();
    for shape in [Shape::Partitioned, Shape::Plain] {
        for &n in &sizes.subscribers {
            for reader in [Reader::Floor, Reader::Ours] {
                eprintln!("operations: latency, {}, {n} subscriber(s), {reader:?}", shape.name());
                results.latency.push(latency(shape, reader, n, sizes).await);
            }
        }
        eprintln!("operations: idle, {}", shape.name());
        results.idle.push(idle(shape, sizes).await);
        for open in [0, sizes.open_elsewhere] {
            eprintln!("operations: pages, {}, {open} open elsewhere", shape.name());
            results.pages.push(pages(shape, open, sizes).await);
        }
        eprintln!("operations: catch-up, {}", shape.name());
        results.catch_up.push(catch_up(shape, sizes).await);
    }
    eprintln!("operations: trim under producers");
    results.trim = Some(trim(sizes).await);
    results
}

/// A fresh database with the outbox in `shape` and the subsystem installed.
async fn database(shape: Shape) -> String {
    let url = support::postgres::fresh_database().await;
    if shape == Shape::Partitioned {
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql(PARTITIONED_OUTBOX).execute(&mut conn).await.expect("the partitioned outbox");
    }
    ff_completions::postgres::connect_pool(&BackendConfig::postgres(&url), 1).await.expect("install").close().await;
    url
}

const INSERT: &str = "INSERT INTO ff_completion_event (partition_key, execution_id, outcome, namespace, occurred_at_ms) \
                      VALUES ($1, $2, 'success', 'bench', (extract(epoch FROM clock_timestamp()) * 1000)::int8)";

/// `producers` connections each committing its share of `events` completions one per
/// transaction, `pace` apart, recording when each commit returned; on the one-table outbox each
/// sends `ff_completions_wake()` after its commit (the partitioned shape's trigger notifies).
async fn produce(url: &str, shape: Shape, events: usize, producers: usize, pace: Duration, commits: Arc<Commits>) {
    let per = events.div_ceil(producers);
    let tasks: Vec<JoinHandle<()>> = (0..producers)
        .map(|_| {
            let (url, commits) = (url.to_owned(), commits.clone());
            tokio::spawn(async move {
                let mut conn = PgConnection::connect(&url).await.expect("producer");
                let mut tick = tokio::time::interval(pace);
                for _ in 0..per {
                    tick.tick().await;
                    let id = Uuid::new_v4();
                    let partition: i16 = rand::rng().random_range(0..256);
                    let issued = Instant::now();
                    sqlx::query(INSERT).bind(partition).bind(id).execute(&mut conn).await.expect("insert");
                    commits.record([id], issued, Instant::now());
                    if shape == Shape::Plain {
                        sqlx::query("SELECT ff_completions_wake()").execute(&mut conn).await.expect("wake");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("producer");
    }
}

/// `n` subscribers of the tree, each counting into its tally.
async fn ours(url: &str, tallies: &[Arc<Tally>]) -> (CompletionSupervisorHandle, Vec<JoinHandle<()>>) {
    let config = SupervisorConfig::new().with_backend(BackendConfig::postgres(url)).with_connect_at_start(true);
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("tree");
    let mut tasks = Vec::new();
    for tally in tallies {
        let mut events = tree.subscribe(Completions::tail()).await.expect("subscribe");
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(event)) = events.next().await {
                tally.record(event.execution_id.uuid());
            }
        }));
    }
    (tree, tasks)
}

/// The floor: one `LISTEN` connection; on each notification, the rows above the last `event_id`
/// it read, each handed to every subscriber.
async fn floor(url: &str, tallies: Vec<Arc<Tally>>) -> JoinHandle<()> {
    let mut conn = PgConnection::connect(url).await.expect("floor connection");
    let mut last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(event_id), 0) FROM ff_completion_event")
        .fetch_one(&mut conn)
        .await
        .expect("max(event_id)");
    let mut listener = PgListener::connect(url).await.expect("listen connection");
    listener.listen("ff_completion").await.expect("LISTEN");
    tokio::spawn(async move {
        while listener.recv().await.is_ok() {
            while listener.next_buffered().is_some() {}
            while let Ok(rows) = sqlx::query_as::<_, (i64, Uuid)>(
                "SELECT event_id, execution_id FROM ff_completion_event WHERE event_id > $1 ORDER BY event_id LIMIT 1000",
            )
            .bind(last)
            .fetch_all(&mut conn)
            .await
            {
                for (event_id, id) in &rows {
                    last = *event_id;
                    for tally in &tallies {
                        tally.record(*id);
                    }
                }
                if rows.len() < 1000 {
                    break;
                }
            }
        }
    })
}

async fn latency(shape: Shape, reader: Reader, n: usize, sizes: &OperationsSizes) -> LatencyRow {
    let url = database(shape).await;
    let tallies: Vec<Arc<Tally>> = (0..n).map(|_| Arc::new(Tally::new(true))).collect();
    let (tree, tasks) = match reader {
        Reader::Ours => {
            let (tree, tasks) = ours(&url, &tallies).await;
            (Some(tree), tasks)
        }
        Reader::Floor => (None, vec![floor(&url, tallies.clone()).await]),
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let commits = Arc::new(Commits::default());
    produce(&url, shape, sizes.events, sizes.producers, sizes.pace, commits.clone()).await;
    let produced = (sizes.events.div_ceil(sizes.producers) * sizes.producers) as u64;
    // The floor loses late commits for good: stop waiting once nothing moves.
    crate::measure::wait_for_all_or_stall(&tallies, produced, Duration::from_secs(30), Duration::from_secs(3)).await;
    let mut delays = Vec::new();
    let mut lost = 0;
    let committed = CommitTimes::of_postgres(&url).await;
    for tally in &tallies {
        let received = tally.received_wall();
        lost = lost.max(produced.saturating_sub(received.len() as u64));
        delays.extend(committed.delays(&received));
    }
    for task in tasks {
        task.abort();
    }
    if let Some(tree) = tree {
        tree.shutdown().await;
    }
    LatencyRow { shape, reader, subscribers: n, spread: Spread::of(delays), lost }
}

/// CPU time (user + system, in clock ticks) of the server processes serving `database`.
async fn server_cpu_ticks(admin: &mut PgConnection, database: &str) -> u64 {
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(database)
            .fetch_all(admin)
            .await
            .expect("pids");
    pids.into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command (which may hold spaces, in parentheses): utime is the
            // 12th of them, stime the 13th.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

async fn idle(shape: Shape, sizes: &OperationsSizes) -> IdleRow {
    let url = database(shape).await;
    let database = url.rsplit('/').next().unwrap_or_default().to_owned();
    let tallies: Vec<Arc<Tally>> = (0..16).map(|_| Arc::new(Tally::new(false))).collect();
    let (tree, tasks) = ours(&url, &tallies).await;
    // One completion, so that every reader has read something, then quiet.
    let commits = Arc::new(Commits::default());
    produce(&url, shape, 1, 1, Duration::from_millis(1), commits).await;
    wait_for_all(&tallies, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin_url = url.replacen(&format!("/{database}"), "/postgres", 1);
    let mut admin = PgConnection::connect(&admin_url).await.expect("admin");
    let before = server_cpu_ticks(&mut admin, &database).await;
    let started = Instant::now();
    tokio::time::sleep(sizes.idle_window).await;
    let after = server_cpu_ticks(&mut admin, &database).await;
    let window = started.elapsed();
    for task in tasks {
        task.abort();
    }
    tree.shutdown().await;
    let ticks_per_s = 100.0;
    let cpu_percent = after.saturating_sub(before) as f64 / ticks_per_s / window.as_secs_f64() * 100.0;
    IdleRow { shape, cpu_percent, window }
}

async fn pages(shape: Shape, open_elsewhere: usize, sizes: &OperationsSizes) -> PagesRow {
    let url = database(shape).await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "INSERT INTO ff_completion_event (partition_key, execution_id, outcome, occurred_at_ms) \
         SELECT (g % 256)::int2, gen_random_uuid(), 'success', 1 FROM generate_series(1, $1) g",
    )
    .bind(sizes.history as i64)
    .execute(&mut conn)
    .await
    .expect("history");
    sqlx::query("ANALYZE ff_completion_event").execute(&mut conn).await.expect("analyze");
    let elsewhere = support::postgres::fresh_database().await;
    let mut bystanders = Vec::with_capacity(open_elsewhere);
    for _ in 0..open_elsewhere {
        let mut bystander = PgConnection::connect(&elsewhere).await.expect("connect");
        sqlx::query("BEGIN").execute(&mut bystander).await.expect("begin");
        sqlx::query("SELECT pg_current_xact_id()").execute(&mut bystander).await.expect("a transaction id");
        bystanders.push(bystander);
    }
    // Plans made and the newest tick recorded; then an idle read, and a read of one new row.
    let read = read_at_head(&mut conn).await;
    outbox_pages(&mut conn, &read).await;
    let read = read_at_head(&mut conn).await;
    let ours_idle = outbox_pages(&mut conn, &read).await;
    let last: i64 = sqlx::query_scalar("SELECT max(event_id) FROM ff_completion_event")
        .fetch_one(&mut conn)
        .await
        .expect("max(event_id)");
    sqlx::query(INSERT).bind(17i16).bind(Uuid::new_v4()).execute(&mut conn).await.expect("a row");
    let ours_one_row = outbox_pages(&mut conn, &read).await;
    let floor_read = format!(
        "SELECT event_id, execution_id FROM ff_completion_event WHERE event_id > {last} ORDER BY event_id LIMIT 1000"
    );
    outbox_pages(&mut conn, &floor_read).await;
    sqlx::query(INSERT).bind(18i16).bind(Uuid::new_v4()).execute(&mut conn).await.expect("a row");
    let floor_one_row = outbox_pages(&mut conn, &floor_read.replace(&last.to_string(), &(last + 1).to_string())).await;
    drop(bystanders);
    PagesRow { shape, open_elsewhere, ours_idle, ours_one_row, floor_one_row }
}

async fn catch_up(shape: Shape, sizes: &OperationsSizes) -> CatchUpRow {
    let url = database(shape).await;
    let config = SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)).with_connect_at_start(true);
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("tree");
    let mut live = tree.subscribe(Completions::tail()).await.expect("tail");
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query(INSERT).bind(1i16).bind(Uuid::new_v4()).execute(&mut conn).await.expect("a row");
    sqlx::query("SELECT ff_completions_wake()").execute(&mut conn).await.expect("wake");
    let start: StreamCursor = match tokio::time::timeout(Duration::from_secs(30), live.next()).await {
        Ok(Some(Ok(event))) => event.cursor,
        other => panic!("the first completion did not arrive: {other:?}"),
    };
    drop(live);
    for i in 0..sizes.small_batches {
        sqlx::query(INSERT).bind((i % 256) as i16).bind(Uuid::new_v4()).execute(&mut conn).await.expect("a row");
        sqlx::query("SELECT ff_completions_tick()").execute(&mut conn).await.expect("a tick");
    }
    let started = Instant::now();
    let mut behind = tree.subscribe(Completions::from_cursor(start)).await.expect("resume");
    let mut got = 0;
    let deadline = started + Duration::from_secs(120);
    while got < sizes.small_batches {
        match tokio::time::timeout_at(deadline.into(), behind.next()).await {
            Ok(Some(Ok(_))) => got += 1,
            _ => break,
        }
    }
    let took = (got == sizes.small_batches).then(|| started.elapsed());
    tree.shutdown().await;
    CatchUpRow { shape, batches: sizes.small_batches, took }
}

/// Delivery to one subscriber while paced producers commit for `window`; with `during`, a trim
/// of the whole old history runs meanwhile (returns its rows removed and time).
async fn delivery_window(url: &str, window: Duration, during: Option<&str>) -> (Spread, Option<(u64, Duration)>) {
    let tallies = vec![Arc::new(Tally::new(true))];
    let (tree, tasks) = ours(url, &tallies).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let commits = Arc::new(Commits::default());
    let events = (window.as_millis() / 5).max(10) as usize;
    let trimming = during.map(|url| {
        let url = url.to_owned();
        tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let started = Instant::now();
            sqlx::query("SELECT ff_completions_trim_plan(3600000, NULL)").execute(&mut conn).await.expect("plan");
            let mut removed = 0u64;
            loop {
                let (rows, done): (i64, bool) =
                    sqlx::query_as("SELECT o_rows, o_done FROM ff_completions_trim_step(5000)")
                        .fetch_one(&mut conn)
                        .await
                        .expect("step");
                removed += rows.max(0) as u64;
                if done {
                    return (removed, started.elapsed());
                }
            }
        })
    });
    produce(url, Shape::Plain, events, 2, Duration::from_millis(10), commits.clone()).await;
    wait_for_all(&tallies, (events.div_ceil(2) * 2) as u64, Duration::from_secs(60)).await;
    let trimmed = match trimming {
        Some(task) => Some(task.await.expect("trim")),
        None => None,
    };
    let spread = Spread::of(CommitTimes::of_postgres(url).await.delays(&tallies[0].received_wall()));
    for task in tasks {
        task.abort();
    }
    tree.shutdown().await;
    (spread, trimmed)
}

async fn trim(sizes: &OperationsSizes) -> TrimRow {
    let url = database(Shape::Plain).await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    // An old history: rows in batches of 10,000, each tick aged two hours.
    let mut left = sizes.trim_history;
    while left > 0 {
        let n = left.min(10_000);
        sqlx::query(
            "INSERT INTO ff_completion_event (partition_key, execution_id, outcome, occurred_at_ms) \
             SELECT (g % 256)::int2, gen_random_uuid(), 'success', 1 FROM generate_series(1, $1) g",
        )
        .bind(n as i64)
        .execute(&mut conn)
        .await
        .expect("history");
        sqlx::query("SELECT ff_completions_tick()").execute(&mut conn).await.expect("tick");
        left -= n;
    }
    sqlx::query("UPDATE ff_completion_tick SET created_at_ms = created_at_ms - 7200000")
        .execute(&mut conn)
        .await
        .expect("age the history");
    let (without, _) = delivery_window(&url, sizes.trim_window, None).await;
    let (during, trimmed) = delivery_window(&url, sizes.trim_window, Some(&url)).await;
    let (removed, trim_took) = trimmed.unwrap_or_default();
    TrimRow { history: sizes.trim_history, without, during, removed, trim_took }
}

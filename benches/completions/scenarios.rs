//! The scenarios: latency, throughput at saturation, catch-up from an old cursor, fan-out to
//! many idle subscribers, and DAG promotion along a chain. Each returns rows for the report.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ff_completions::cursor::{encode_postgres_cursor, encode_sqlite_cursor, encode_valkey_cursor};
use ff_completions::{CompletionSupervisorHandle, Completions, ExecutionId, FlowId, StreamCursor, SupervisorConfig};
use ff_completions_lab::{DependencyResolution, ExecutionSpec};
use futures::StreamExt;
use sqlx::Connection;

use crate::bed::{Bed, Kind, Run, paced, prepare, saturate};
use crate::designs::{Design, SETTLE, Subscribers, entries};
use crate::measure::{Commits, From, Spread, rss_bytes, wait_for_all, wait_for_all_or_stall};

/// How big each scenario is.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub latency_events: usize,
    pub latency_pace: Duration,
    pub latency_subscribers: Vec<usize>,
    pub throughput_subscribers: Vec<usize>,
    pub window: Duration,
    pub drain: Duration,
    pub producers: usize,
    pub batch: usize,
    pub history: u64,
    pub fanout_subscribers: usize,
    pub chain: usize,
}

impl Sizes {
    /// `cargo bench`: the figures the README reports (about ten minutes).
    pub fn full() -> Self {
        Self {
            latency_events: 2_000,
            latency_pace: Duration::from_millis(2),
            latency_subscribers: vec![1, 64],
            throughput_subscribers: vec![1, 16, 64, 256],
            window: Duration::from_secs(3),
            drain: Duration::from_secs(30),
            producers: 4,
            batch: 16,
            history: 1_000_000,
            fanout_subscribers: 10_000,
            chain: 100,
        }
    }

    /// `cargo test`: every scenario at a tiny size, so none of them rots.
    pub fn smoke() -> Self {
        Self {
            latency_events: 30,
            latency_pace: Duration::from_millis(2),
            latency_subscribers: vec![1, 4],
            throughput_subscribers: vec![1, 4],
            window: Duration::from_millis(300),
            drain: Duration::from_secs(20),
            producers: 2,
            batch: 4,
            history: 3_000,
            fanout_subscribers: 50,
            chain: 5,
        }
    }

    /// Units to create ahead for a saturation window: more than producers can commit in it.
    fn units(&self, kind: Kind, batched: bool) -> usize {
        let per_second = match (kind, batched) {
            (Kind::Sqlite, false) => 3_000,
            (Kind::Sqlite, true) => 400,
            (_, false) => 8_000,
            (_, true) => 2_000,
        };
        (per_second as f64 * self.window.as_secs_f64()).ceil() as usize
    }
}

/// Commit-to-delivery latency of one design.
#[derive(Clone, Debug)]
pub struct LatencyRow {
    pub backend: Kind,
    pub design: Design,
    pub subscribers: usize,
    /// From the producer's call returning.
    pub spread: Spread,
    /// From the producer's call being issued (the commit's own round trip included).
    pub from_issue: Spread,
    pub missing: u64,
}

/// Commits paced completions one at a time; every subscriber's receipt is one sample.
pub async fn latency(bed: &Bed, kind: Kind, design: Design, subscribers: usize, sizes: &Sizes) -> LatencyRow {
    let run = bed.fresh(kind).await;
    let engine = run.engine().await;
    let units = Arc::new(prepare(&run, &engine, sizes.latency_events, 1).await);
    let subs = Subscribers::start(design, &run, subscribers, true).await;
    tokio::time::sleep(SETTLE).await;
    let commits = Arc::new(Commits::default());
    let produced = paced(&run, units, sizes.latency_pace, commits.clone()).await;
    wait_for_all(&subs.tallies, produced.events, sizes.drain).await;
    // Postgres tells when each commit happened; elsewhere the producer's call returning is the
    // nearest the client sees.
    let committed = match &run.pg_url {
        Some(url) => Some(crate::measure::CommitTimes::of_postgres(url).await),
        None => None,
    };
    let (mut returned, mut issued) = (Vec::new(), Vec::new());
    let mut missing = 0;
    for tally in &subs.tallies {
        let received = tally.received();
        missing += produced.events.saturating_sub(received.len() as u64);
        match &committed {
            Some(committed) => returned.extend(committed.delays(&tally.received_wall())),
            None => returned.extend(commits.delays(&received, From::Returned)),
        }
        issued.extend(commits.delays(&received, From::Issued));
    }
    subs.stop().await;
    LatencyRow {
        backend: kind,
        design,
        subscribers,
        spread: Spread::of(returned),
        from_issue: Spread::of(issued),
        missing,
    }
}

/// Delivery while producers commit as fast as they can.
#[derive(Clone, Debug)]
pub struct ThroughputRow {
    pub backend: Kind,
    pub design: Design,
    pub subscribers: usize,
    pub batched: bool,
    /// Completions committed per second.
    pub produced_per_s: f64,
    /// Producer calls (commits) per second.
    pub commits_per_s: f64,
    /// Mean, over subscribers, of events delivered per second during the window.
    pub delivered_per_s: f64,
    /// Events committed but not yet delivered to the slowest subscriber when producers stopped.
    pub lag_at_end: u64,
    /// Time after producers stopped until every subscriber had everything (`None`: not
    /// within the drain limit).
    pub drained: Option<Duration>,
    /// Events the slowest subscriber had not received when the drain limit passed: lost for
    /// the designs that read `event_id > last_seen` (their gap), still on their way otherwise.
    pub missing: u64,
    /// Notification connections (LISTEN / blocking reads) during the window.
    pub notification_connections: u64,
    /// Every server connection of the database during the window (producers' included).
    pub connections: u64,
}

pub async fn throughput(
    bed: &Bed,
    kind: Kind,
    design: Design,
    subscribers: usize,
    batched: bool,
    sizes: &Sizes,
) -> ThroughputRow {
    let run = bed.fresh(kind).await;
    let engine = run.engine().await;
    let batch = if batched { sizes.batch } else { 1 };
    let units = Arc::new(prepare(&run, &engine, sizes.units(kind, batched), batch).await);
    let subs = Subscribers::start(design, &run, subscribers, false).await;
    tokio::time::sleep(SETTLE).await;
    let (connections, produced) = tokio::join!(
        async {
            tokio::time::sleep(sizes.window / 2).await;
            run.connections().await
        },
        saturate(&run, units, sizes.producers, sizes.window),
    );
    let delivered: Vec<u64> = subs.tallies.iter().map(|t| t.count()).collect();
    let drained = wait_for_all_or_stall(&subs.tallies, produced.events, sizes.drain, Duration::from_secs(3)).await;
    let missing = subs.tallies.iter().map(|t| produced.events.saturating_sub(t.count())).max().unwrap_or(0);
    subs.stop().await;
    let seconds = produced.elapsed.as_secs_f64().max(1e-9);
    let mean_delivered = delivered.iter().sum::<u64>() as f64 / delivered.len().max(1) as f64;
    ThroughputRow {
        backend: kind,
        design,
        subscribers,
        batched,
        produced_per_s: produced.events as f64 / seconds,
        commits_per_s: produced.commits as f64 / seconds,
        delivered_per_s: mean_delivered / seconds,
        lag_at_end: produced.events.saturating_sub(delivered.iter().copied().min().unwrap_or(0)),
        drained,
        missing,
        notification_connections: connections.0,
        connections: connections.1,
    }
}

/// Replaying history from an old cursor.
#[derive(Clone, Debug)]
pub struct CatchUpRow {
    pub backend: Kind,
    pub design: Design,
    pub events: u64,
    pub per_s: f64,
    pub complete: bool,
}

/// Writes `history` completions, then replays them: ours from the cursor before the first,
/// and the floor as bare paged reads on one connection.
pub async fn catch_up(bed: &Bed, kind: Kind, sizes: &Sizes) -> Vec<CatchUpRow> {
    let run = bed.fresh(kind).await;
    drop(run.engine().await);
    fill_history(&run, sizes.history).await;
    let limit = Duration::from_secs(600);

    let start = Instant::now();
    let subs = Subscribers::start_at(Design::Ours, &run, 1, false, oldest_cursor(kind)).await;
    let complete = wait_for_all(&subs.tallies, sizes.history, limit).await.is_some();
    let ours = start.elapsed();
    let replayed = subs.tallies[0].count();
    subs.stop().await;
    let mut rows = vec![CatchUpRow {
        backend: kind,
        design: Design::Ours,
        events: replayed,
        per_s: replayed as f64 / ours.as_secs_f64(),
        complete,
    }];
    let start = Instant::now();
    let read = floor_replay(&run, sizes.history).await;
    rows.push(CatchUpRow {
        backend: kind,
        design: Design::Floor,
        events: read,
        per_s: read as f64 / start.elapsed().as_secs_f64(),
        complete: read >= sizes.history,
    });
    rows
}

/// The cursor before every event of a backend.
fn oldest_cursor(kind: Kind) -> StreamCursor {
    match kind {
        Kind::Postgres => encode_postgres_cursor(0, 0),
        Kind::Valkey | Kind::ValkeyCluster => encode_valkey_cursor(0, 0),
        Kind::Sqlite => encode_sqlite_cursor(0),
    }
}

/// History for the catch-up scenario, written in bulk (in chunks of 100,000 per transaction
/// or call) straight into the outbox or stream, in the producers' format.
async fn fill_history(run: &Run, events: u64) {
    const CHUNK: u64 = 100_000;
    let mut written = 0;
    while written < events {
        let n = CHUNK.min(events - written) as i64;
        match run.kind {
            Kind::Postgres => {
                let pool = run.pg_pool(1).await;
                sqlx::query(
                    "INSERT INTO ff_completion_event (execution_id, outcome, namespace, occurred_at_ms, partition_key) \
                     SELECT gen_random_uuid(), 'success', 'bench', ff_now_ms(), 0 FROM generate_series(1, $1)",
                )
                .bind(n)
                .execute(&pool)
                .await
                .expect("postgres history");
                pool.close().await;
            }
            Kind::Valkey | Kind::ValkeyCluster => {
                let client = run.valkey_client().await;
                let _: ferriskey::Value = client
                    .cmd("EVAL")
                    .arg(HISTORY_LUA)
                    .arg(1)
                    // History in one partition: the tree reads every partition stream.
                    .arg(ff_completions::valkey::stream_key(0))
                    .arg(n)
                    .arg(written as i64)
                    .execute()
                    .await
                    .expect("valkey history");
            }
            Kind::Sqlite => {
                let path = run.sqlite_path();
                let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                    .await
                    .expect("sqlite connection");
                sqlx::query(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
                     INSERT INTO ff_completion_event (execution_id, outcome, namespace, occurred_at_ms, partition_key) \
                     SELECT printf('%08x-0000-4000-8000-%012x', i + ?2, i + ?2), 'success', 'bench', \
                     CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER), 0 FROM n",
                )
                .bind(n)
                .bind(written as i64)
                .execute(&mut conn)
                .await
                .expect("sqlite history");
            }
        }
        written += n as u64;
    }
}

/// `XADD`s ARGV[1] completion entries numbered from ARGV[2], as the library's producers write them.
const HISTORY_LUA: &str = r"
local n, base = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = redis.call('TIME')
local ms = tostring(tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
for i = 1, n do
  local k = base + i
  local id = string.format('{fp:0}:%08x-0000-4000-8000-%012x', k % 4294967296, k)
  redis.call('XADD', KEYS[1], '*', 'execution_id', id, 'flow_id', '', 'outcome', 'success',
    'namespace', 'bench', 'tags', '', 'occurred_at_ms', ms, 'partition', '0')
end
return n
";

/// Reads the whole history in pages of 1,000 on one connection, as fast as the server
/// answers; returns the events read.
async fn floor_replay(run: &Run, events: u64) -> u64 {
    let mut read = 0u64;
    match run.kind {
        Kind::Postgres => {
            let mut conn =
                sqlx::PgConnection::connect(run.pg_url.as_deref().expect("postgres")).await.expect("connect");
            let mut last = 0i64;
            while read < events {
                let rows: Vec<OutboxRow> = sqlx::query_as(PG_PAGE).bind(last).fetch_all(&mut conn).await.expect("page");
                let Some(row) = rows.last() else { break };
                last = row.0;
                read += rows.len() as u64;
            }
        }
        Kind::Sqlite => {
            let path = run.sqlite_path();
            let mut conn =
                sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.expect("connect");
            let mut last = 0i64;
            while read < events {
                let rows: Vec<SqliteOutboxRow> = sqlx::query_as(
                    "SELECT event_id, execution_id, flow_id, outcome, namespace, occurred_at_ms \
                         FROM ff_completion_event WHERE event_id > ?1 ORDER BY event_id LIMIT 1000",
                )
                .bind(last)
                .fetch_all(&mut conn)
                .await
                .expect("page");
                let Some(row) = rows.last() else { break };
                last = row.0;
                read += rows.len() as u64;
            }
        }
        Kind::Valkey | Kind::ValkeyCluster => {
            let client = run.valkey_client().await;
            let mut from = "-".to_owned();
            while read < events {
                let reply: ferriskey::Value = client
                    .cmd("XRANGE")
                    .arg(ff_completions::valkey::stream_key(0))
                    .arg(from.as_str())
                    .arg("+")
                    .arg("COUNT")
                    .arg(1000)
                    .execute()
                    .await
                    .expect("XRANGE");
                let page = entries(&reply);
                let Some((last, _)) = page.last() else { break };
                from = format!("({last}");
                read += page.len() as u64;
            }
        }
    }
    read
}

type SqliteOutboxRow = (i64, Option<String>, Option<String>, Option<String>, Option<String>, Option<i64>);
type OutboxRow = (i64, uuid::Uuid, Option<uuid::Uuid>, Option<String>, Option<String>, Option<i64>, Option<i16>);

const PG_PAGE: &str = "SELECT event_id, execution_id, flow_id, outcome, namespace, occurred_at_ms, partition_key \
                       FROM ff_completion_event WHERE event_id > $1 ORDER BY event_id LIMIT 1000";

/// Many idle subscribers on one supervisor.
#[derive(Clone, Debug)]
pub struct FanOutRow {
    pub backend: Kind,
    pub subscribers: usize,
    pub bytes_per_subscriber: f64,
    pub subscribe_s: f64,
    /// Commit to each subscriber's receipt of one event: `max` is the time to reach them all.
    pub spread: Spread,
}

pub async fn fan_out(bed: &Bed, kind: Kind, sizes: &Sizes) -> FanOutRow {
    let run = bed.fresh(kind).await;
    let engine = run.engine().await;
    let units = Arc::new(prepare(&run, &engine, 1, 1).await);
    let before = rss_bytes();
    let start = Instant::now();
    let subs = Subscribers::start(Design::Ours, &run, sizes.fanout_subscribers, true).await;
    let subscribe_s = start.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let after = rss_bytes();
    let commits = Arc::new(Commits::default());
    paced(&run, units, Duration::from_millis(1), commits.clone()).await;
    wait_for_all(&subs.tallies, 1, Duration::from_secs(120)).await;
    let delays = subs.tallies.iter().flat_map(|t| commits.delays(&t.received(), From::Issued)).collect();
    subs.stop().await;
    FanOutRow {
        backend: kind,
        subscribers: sizes.fanout_subscribers,
        bytes_per_subscriber: after.saturating_sub(before) as f64 / sizes.fanout_subscribers as f64,
        subscribe_s,
        spread: Spread::of(delays),
    }
}

/// DAG promotion hop by hop along a chain.
#[derive(Clone, Debug)]
pub struct DagRow {
    pub backend: Kind,
    pub hops: usize,
    /// A parent's completion committed to its child promoted (eligible), per level.
    pub spread: Spread,
    pub total: Duration,
}

/// A chain of `sizes.chain` executions: a worker claims and completes the eligible one; a
/// promoter subscribed to the tree resolves the completed one's child as each event arrives.
pub async fn dag_chain(bed: &Bed, kind: Kind, sizes: &Sizes) -> DagRow {
    let run = bed.fresh(kind).await;
    let engine = run.engine().await;
    let flow = FlowId::new();
    engine.create_flow(&flow, None).await.expect("flow");
    let mut chain: Vec<ExecutionId> = Vec::with_capacity(sizes.chain);
    for _ in 0..sizes.chain {
        let spec =
            ExecutionSpec::new(&flow).with_namespace("bench").with_parents(chain.last().copied().into_iter().collect());
        engine.create_execution(&spec).await.expect("execution");
        chain.push(spec.id);
    }
    let (tree, _join) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(run.config.clone()))
        .await
        .expect("tree");
    let mut events = tree.subscribe(Completions::tail()).await.expect("subscribe");
    let (promoted_tx, mut promoted_rx) = tokio::sync::mpsc::unbounded_channel();
    let promoter_engine = engine.clone();
    let promoter = tokio::spawn(async move {
        while let Some(Ok(event)) = events.next().await {
            for child in promoter_engine.children(&event.execution_id).await.expect("children") {
                let resolved = promoter_engine.resolve_dependency(&event.execution_id, &child).await;
                if resolved.expect("resolve") == DependencyResolution::Promoted {
                    let _ = promoted_tx.send((child, Instant::now()));
                }
            }
        }
    });
    let mut committed: HashMap<ExecutionId, Instant> = HashMap::new();
    let mut hops = Vec::new();
    let start = Instant::now();
    for (level, id) in chain.iter().enumerate() {
        if level > 0 {
            let (child, at) = tokio::time::timeout(Duration::from_secs(30), promoted_rx.recv())
                .await
                .expect("the child is promoted")
                .expect("promoter running");
            assert_eq!(child, *id, "the chain's next execution is promoted");
            hops.push(at.saturating_duration_since(committed[&chain[level - 1]]));
        }
        let claimed = engine.claim("bench-worker", 1).await.expect("claim");
        assert_eq!(claimed, vec![*id], "the eligible execution is claimed");
        engine.complete(id).await.expect("complete");
        committed.insert(*id, Instant::now());
    }
    let total = start.elapsed();
    promoter.abort();
    tree.shutdown().await;
    DagRow { backend: kind, hops: hops.len(), spread: Spread::of(hops), total }
}

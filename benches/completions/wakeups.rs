//! Postgres wake-ups, on a server of its own that flushes every commit to disk (fsync and
//! synchronous_commit on): what producers pay per commit for each way of waking the listener,
//! what an unrelated open transaction does to delivery, and how many reads the listener issues
//! when idle and when busy (counted by pg_stat_statements).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ff_completions::postgres::CommitWake;
use ff_completions::{BackendConfig, CompletionSupervisorHandle, SupervisorConfig};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

use crate::bed::{Kind, Run, producer_runtime};
use crate::designs::{Design, SETTLE, Subscribers};
use crate::measure::{Commits, From, Spread, wait_for_all};
use crate::scenarios::Sizes;
use crate::support::postgres::{FSYNC_AND_STATEMENT_STATS, PrivatePg};

/// How the listener learns of a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// No tree, no notification: the producers' floor.
    Nothing,
    /// The tree delivering by its polls alone: no notification at all.
    PollingOnly,
    /// The project's default: `ff_completions_wake()` after each commit (coalesced, from an
    /// autocommit connection) and adaptive polling.
    AfterCommit,
    /// The opt-in in-commit trigger (the previous default): NOTIFY inside each producer's commit.
    InCommit,
}

impl Wakeup {
    pub fn name(self) -> &'static str {
        match self {
            Self::Nothing => "none (no tree)",
            Self::PollingOnly => "none (tree polling)",
            Self::AfterCommit => "after commit (ours)",
            Self::InCommit => "in-commit trigger",
        }
    }
}

/// Producers at saturation, one single-row insert per transaction.
#[derive(Clone, Debug)]
pub struct ProducerRow {
    pub clients: usize,
    pub wakeup: Wakeup,
    pub commits_per_s: f64,
    /// Commit returned → subscriber has it (none without a tree).
    pub delivery: Option<Spread>,
    pub missing: u64,
    /// `ff_completions_read` calls per second during the window (none without a tree).
    pub reads_per_s: Option<f64>,
}

/// Paced completions with or without an unrelated transaction left open.
#[derive(Clone, Debug)]
pub struct OpenTransactionRow {
    pub open_elsewhere: bool,
    pub delivery: Spread,
}

/// Everything this scenario measured.
#[derive(Clone, Debug, Default)]
pub struct WakeupResults {
    pub producers: Vec<ProducerRow>,
    pub open_transaction: Vec<OpenTransactionRow>,
    /// `ff_completions_read` calls per second with nothing to read.
    pub idle_reads_per_s: f64,
}

impl WakeupResults {
    /// Commits/s with `wakeup` ÷ with `baseline`, at `clients`.
    pub fn ratio(&self, clients: usize, wakeup: Wakeup, baseline: Wakeup) -> Option<f64> {
        let rate = |w| self.producers.iter().find(|r| r.clients == clients && r.wakeup == w).map(|r| r.commits_per_s);
        Some(rate(wakeup)? / rate(baseline)?)
    }
}

/// The scenario's sizes.
pub struct WakeupSizes {
    pub clients: Vec<usize>,
    pub window: Duration,
    pub paced_events: usize,
    pub pace: Duration,
    pub idle: Duration,
}

impl WakeupSizes {
    pub fn of(sizes: &Sizes) -> Self {
        if sizes.history >= 1_000_000 {
            Self {
                clients: vec![16, 32],
                window: Duration::from_secs(5),
                paced_events: 1_000,
                pace: Duration::from_millis(2),
                idle: Duration::from_secs(5),
            }
        } else {
            Self {
                clients: vec![2, 4],
                window: Duration::from_millis(300),
                paced_events: 30,
                pace: Duration::from_millis(2),
                idle: Duration::from_millis(500),
            }
        }
    }
}

pub async fn run(sizes: &Sizes) -> WakeupResults {
    let sizes = WakeupSizes::of(sizes);
    let server = PrivatePg::start_with(FSYNC_AND_STATEMENT_STATS).await;
    let mut admin = PgConnection::connect(&server.url()).await.expect("connect");
    for sql in ["CREATE DATABASE bench", "CREATE DATABASE bystander"] {
        sqlx::query(sql).execute(&mut admin).await.expect(sql);
    }
    let url = server.url_of("bench");
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("CREATE EXTENSION pg_stat_statements").execute(&mut conn).await.expect("pg_stat_statements");
    let run =
        Run { kind: Kind::Postgres, config: BackendConfig::postgres(&url), pg_url: Some(url.clone()), sqlite: None };
    // The subsystem's schema, installed as a tree does on its first start.
    let (tree, _) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(run.config.clone()))
        .await
        .expect("tree spawns");
    tree.shutdown().await;

    let mut results = WakeupResults::default();
    // A warm-up window (discarded): the first commits of a new server pay for its cold caches.
    producers(&run, &mut conn, sizes.clients[0], Wakeup::Nothing, sizes.window).await;
    for &clients in &sizes.clients {
        let mut rounds = Vec::new();
        for round in 0..ROUNDS {
            for wakeup in WAKEUPS {
                eprintln!("postgres Wakeups: {clients} clients, {}, round {}", wakeup.name(), round + 1);
                rounds.push(producers(&run, &mut conn, clients, wakeup, sizes.window).await);
            }
        }
        for wakeup in WAKEUPS {
            results.producers.push(mean_of(rounds.iter().filter(|r| r.wakeup == wakeup)));
        }
    }
    results.idle_reads_per_s = idle_reads(&run, &mut conn, sizes.idle).await;
    for open_elsewhere in [false, true] {
        let bystander = if open_elsewhere { Some(open_transaction(&server.url_of("bystander")).await) } else { None };
        let delivery = paced(&run, sizes.paced_events, sizes.pace).await;
        results.open_transaction.push(OpenTransactionRow { open_elsewhere, delivery });
        drop(bystander);
    }
    results
}

/// The ways of waking, in the order each round measures them.
const WAKEUPS: [Wakeup; 4] = [Wakeup::Nothing, Wakeup::PollingOnly, Wakeup::AfterCommit, Wakeup::InCommit];

/// Each way of waking is measured this many times, taking turns; the report shows the mean.
const ROUNDS: usize = 3;

/// The mean commits/s and reads/s of rounds of one way of waking, with the first round's
/// delivery spread and every round's missing events.
fn mean_of<'a>(rows: impl Iterator<Item = &'a ProducerRow>) -> ProducerRow {
    let rows: Vec<&ProducerRow> = rows.collect();
    let n = rows.len().max(1) as f64;
    let mut mean = rows[0].clone();
    mean.commits_per_s = rows.iter().map(|r| r.commits_per_s).sum::<f64>() / n;
    mean.missing = rows.iter().map(|r| r.missing).sum();
    mean.reads_per_s = mean.reads_per_s.map(|_| rows.iter().filter_map(|r| r.reads_per_s).sum::<f64>() / n);
    mean
}

/// `ff_completions_read` calls so far.
async fn reads(conn: &mut PgConnection) -> u64 {
    let calls: Option<i64> =
        sqlx::query_scalar("SELECT sum(calls)::int8 FROM pg_stat_statements WHERE query LIKE '%ff_completions_read(%'")
            .fetch_one(conn)
            .await
            .expect("pg_stat_statements");
    calls.unwrap_or(0).max(0) as u64
}

/// Inserts one completion row (the outbox's own shape, plain SQL) per transaction.
const INSERT: &str = "INSERT INTO ff_completion_event (execution_id, outcome, namespace, occurred_at_ms, partition_key) \
                      VALUES ($1, 'success', 'bench', 1, 0)";

async fn producers(
    run: &Run,
    conn: &mut PgConnection,
    clients: usize,
    wakeup: Wakeup,
    window: Duration,
) -> ProducerRow {
    let in_commit = wakeup == Wakeup::InCommit;
    sqlx::query("SELECT ff_completions_set_commit_trigger($1)")
        .bind(in_commit)
        .execute(&mut *conn)
        .await
        .expect("trigger");
    let subscribers = match wakeup {
        Wakeup::Nothing => None,
        _ => Some(Subscribers::start(Design::Ours, run, 1, true).await),
    };
    tokio::time::sleep(SETTLE).await;
    let commits = Arc::new(Commits::default());
    let reads_before = reads(conn).await;
    let url = run.pg_url.clone().expect("postgres");
    let wake = wakeup == Wakeup::AfterCommit;
    let (committed, elapsed) = {
        let commits = commits.clone();
        producer_runtime()
            .spawn(async move { saturate(&url, clients, window, wake, commits).await })
            .await
            .expect("producers")
    };
    let reads_during = reads(conn).await.saturating_sub(reads_before);
    let (delivery, missing, reads_per_s) = match subscribers {
        None => (None, 0, None),
        Some(subs) => {
            wait_for_all(&subs.tallies, committed, Duration::from_secs(30)).await;
            let received = subs.tallies[0].received();
            let missing = committed.saturating_sub(received.len() as u64);
            let spread = Spread::of(commits.delays(&received, From::Returned));
            subs.stop().await;
            (Some(spread), missing, Some(reads_during as f64 / elapsed.as_secs_f64()))
        }
    };
    sqlx::query("SELECT ff_completions_set_commit_trigger(false)").execute(&mut *conn).await.expect("trigger off");
    ProducerRow {
        clients,
        wakeup,
        commits_per_s: committed as f64 / elapsed.as_secs_f64(),
        delivery,
        missing,
        reads_per_s,
    }
}

/// `clients` connections insert as fast as they can for `window`; returns commits and time.
async fn saturate(url: &str, clients: usize, window: Duration, wake: bool, commits: Arc<Commits>) -> (u64, Duration) {
    let wake = match wake {
        true => {
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await.expect("wake pool");
            Some(CommitWake::spawn(pool))
        }
        false => None,
    };
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(PgConnection::connect(url).await.expect("producer connection"));
    }
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (done, stop, commits, wake) = (done.clone(), stop.clone(), commits.clone(), wake.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let id = Uuid::new_v4();
                    let issued = Instant::now();
                    sqlx::query(INSERT).bind(id).execute(&mut conn).await.expect("insert");
                    commits.record([id], issued, Instant::now());
                    if let Some(wake) = &wake {
                        wake.wake();
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    for task in tasks {
        task.await.expect("producer");
    }
    (done.load(Ordering::Relaxed), elapsed)
}

/// Reads per second a tree with one subscriber issues while nothing is committed.
async fn idle_reads(run: &Run, conn: &mut PgConnection, idle: Duration) -> f64 {
    let subs = Subscribers::start(Design::Ours, run, 1, false).await;
    tokio::time::sleep(SETTLE).await;
    let before = reads(conn).await;
    let started = Instant::now();
    tokio::time::sleep(idle).await;
    let per_s = reads(conn).await.saturating_sub(before) as f64 / started.elapsed().as_secs_f64();
    subs.stop().await;
    per_s
}

/// A connection to another database of the cluster with a transaction that wrote and stays
/// open (idle in transaction) until the connection is dropped.
async fn open_transaction(url: &str) -> PgConnection {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut conn).await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut conn).await.expect("take a transaction id");
    conn
}

/// One producer commits `n` rows `pace` apart, each followed by the after-commit wake-up.
async fn paced(run: &Run, n: usize, pace: Duration) -> Spread {
    let subs = Subscribers::start(Design::Ours, run, 1, true).await;
    tokio::time::sleep(SETTLE).await;
    let commits = Arc::new(Commits::default());
    let url = run.pg_url.clone().expect("postgres");
    let recorded = commits.clone();
    producer_runtime()
        .spawn(async move {
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.expect("pool");
            let wake = CommitWake::spawn(pool.clone());
            let mut tick = tokio::time::interval(pace);
            for _ in 0..n {
                tick.tick().await;
                let id = Uuid::new_v4();
                let issued = Instant::now();
                sqlx::query(INSERT).bind(id).execute(&pool).await.expect("insert");
                recorded.record([id], issued, Instant::now());
                wake.wake();
            }
        })
        .await
        .expect("paced producer");
    wait_for_all(&subs.tallies, n as u64, Duration::from_secs(30)).await;
    let spread = Spread::of(commits.delays(&subs.tallies[0].received(), From::Returned));
    subs.stop().await;
    spread
}

//! Lease heartbeats: renewals/s a backend sustains with lease history on and off, in one run.
//!
//! History on: `Engine::renew_lease`, the heartbeat that extends the lease and writes a
//! `renewed` event in the same transaction (and, on Postgres, asks for the after-commit wake-up),
//! with a tree running and one lease-history subscriber draining the events. History off: the
//! same lease extension without the event, one autocommit `UPDATE` of the same row with the same
//! predicate (`lease_expires_at_ms` only: on SQLite a change of `lease_renewals` fires the
//! history trigger). The two alternate in windows of equal length, same executions, same
//! producers; the ratio of medians is what history costs a heartbeat.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ff_completions::{CompletionSupervisorHandle, ExecutionId, FlowId, LeaseHistory, SupervisorConfig, TimestampMs};
use ff_completions_lab::{Engine, ExecutionSpec};
use futures::StreamExt;

use crate::bed::{Bed, Kind, Run};
use crate::scenarios::Sizes;

/// Executions each producer heartbeats in turn (no two producers touch one row).
pub const LEASES_PER_PRODUCER: usize = 16;
/// Windows of each mode, alternated.
const ROUNDS: usize = 3;
const WORKER: &str = "heartbeat-bench";

/// Renewals/s of one backend, with history and without.
#[derive(Clone, Debug)]
pub struct HeartbeatRow {
    pub backend: Kind,
    /// Each window's renewals/s with history, in the order run.
    pub with_history: Vec<f64>,
    /// Each window's renewals/s without history.
    pub without_history: Vec<f64>,
    /// Lease events the subscriber received (at least the renewals with history).
    pub events_received: u64,
    pub renewals_with_history: u64,
}

impl HeartbeatRow {
    pub fn median(samples: &[f64]) -> f64 {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(0.0)
    }

    /// With history over without (medians).
    pub fn ratio(&self) -> f64 {
        Self::median(&self.with_history) / Self::median(&self.without_history).max(f64::MIN_POSITIVE)
    }
}

/// Whether the scenario runs on `kind` (it needs SQL for the history-off heartbeat).
pub fn applies(kind: Kind) -> bool {
    matches!(kind, Kind::Postgres | Kind::Sqlite)
}

/// The heartbeat without history: the lease extension alone.
enum Baseline {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Baseline {
    async fn connect(run: &Run, producers: usize) -> Self {
        match run.kind {
            Kind::Postgres => Self::Postgres(run.pg_pool(producers as u32).await),
            Kind::Sqlite => {
                let engine = ff_completions_lab::SqliteEngine::connect(&run.config).await.expect("sqlite engine");
                Self::Sqlite(engine.pool().clone())
            }
            other => panic!("no history-off heartbeat on {}", other.name()),
        }
    }

    async fn renew(&self, id: &ExecutionId) -> bool {
        let until = TimestampMs::now().0 + ff_completions_lab::LEASE_DURATION.as_millis() as i64;
        let sql = "UPDATE ff_execution SET lease_expires_at_ms = $1 \
                   WHERE execution_id = $2 AND worker = $3 AND state = 'running' AND lease_state = 'active'";
        let rows = match self {
            Self::Postgres(pool) => {
                sqlx::query(sql).bind(until).bind(id.uuid()).bind(WORKER).execute(pool).await.map(|r| r.rows_affected())
            }
            Self::Sqlite(pool) => sqlx::query(sql)
                .bind(until)
                .bind(id.uuid().to_string())
                .bind(WORKER)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
        };
        rows.expect("history-off heartbeat") == 1
    }
}

pub async fn run(bed: &Bed, kind: Kind, sizes: &Sizes) -> HeartbeatRow {
    let run = bed.fresh(kind).await;
    let engine = run.engine().await;
    let producers = sizes.producers;
    let flow = FlowId::new();
    engine.create_flow(&flow, None).await.expect("flow");
    let total = producers * LEASES_PER_PRODUCER;
    for _ in 0..total {
        engine.create_execution(&ExecutionSpec::new(&flow)).await.expect("execution");
    }
    let mut ids = Vec::with_capacity(total);
    while ids.len() < total {
        let got = engine.claim(WORKER, total - ids.len()).await.expect("claim");
        assert!(!got.is_empty(), "every execution is claimable");
        ids.extend(got);
    }
    let baseline = Arc::new(Baseline::connect(&run, producers).await);

    let (tree, _) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(run.config.clone()))
        .await
        .expect("tree");
    let mut leases = tree.subscribe(LeaseHistory::tail()).await.expect("sub");
    let received = Arc::new(AtomicU64::new(0));
    let counting = received.clone();
    let drain = tokio::spawn(async move {
        while let Some(Ok(_)) = leases.next().await {
            counting.fetch_add(1, Ordering::Relaxed);
        }
    });

    let shares: Vec<Vec<ExecutionId>> = ids.chunks(LEASES_PER_PRODUCER).map(<[ExecutionId]>::to_vec).collect();
    let mut row = HeartbeatRow {
        backend: kind,
        with_history: Vec::new(),
        without_history: Vec::new(),
        events_received: 0,
        renewals_with_history: 0,
    };
    for _ in 0..ROUNDS {
        for history in [true, false] {
            let (n, per_s) = window(&engine, &baseline, &shares, history, sizes.window).await;
            if history {
                row.with_history.push(per_s);
                row.renewals_with_history += n;
            } else {
                row.without_history.push(per_s);
            }
        }
    }
    // The subscriber gets every renewal (the claims' `acquired` came before its tail).
    let deadline = Instant::now() + sizes.drain;
    while received.load(Ordering::Relaxed) < row.renewals_with_history && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    row.events_received = received.load(Ordering::Relaxed);
    drain.abort();
    tree.shutdown().await;
    eprintln!(
        "{} heartbeats: with history {:?}/s, without {:?}/s, ratio {:.2}, events received {} of {}",
        kind.name(),
        row.with_history.iter().map(|v| v.round()).collect::<Vec<_>>(),
        row.without_history.iter().map(|v| v.round()).collect::<Vec<_>>(),
        row.ratio(),
        row.events_received,
        row.renewals_with_history
    );
    row
}

/// One window: every producer heartbeats its executions in turn until `length` has passed.
/// Returns the renewals and renewals/s.
async fn window(
    engine: &Arc<dyn Engine>,
    baseline: &Arc<Baseline>,
    shares: &[Vec<ExecutionId>],
    history: bool,
    length: Duration,
) -> (u64, f64) {
    let start = Instant::now();
    let end = start + length;
    let tasks: Vec<_> = shares
        .iter()
        .cloned()
        .map(|share| {
            let (engine, baseline) = (engine.clone(), baseline.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                for id in share.iter().cycle() {
                    if Instant::now() >= end {
                        break;
                    }
                    let renewed = if history {
                        engine.renew_lease(id, WORKER).await.expect("heartbeat")
                    } else {
                        baseline.renew(id).await
                    };
                    assert!(renewed, "the worker holds every lease");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await.expect("producer");
    }
    (n, n as f64 / start.elapsed().as_secs_f64())
}

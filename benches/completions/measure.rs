//! What a run records: when producers committed each execution's completion, what each
//! subscriber received and when, and the summaries the report prints.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

/// When each execution's completion was committed: the producer's call was issued, and it
/// returned (the commit is visible somewhere between the two).
#[derive(Default)]
pub struct Commits(Mutex<HashMap<Uuid, (Instant, Instant)>>);

/// Which end of the producer's call a delay is measured from.
#[derive(Clone, Copy)]
pub enum From {
    /// The call returned: the producer knows its commit is done (0 when a subscriber had it first).
    Returned,
    /// The call was issued: includes the commit's own round trip.
    Issued,
}

impl Commits {
    pub fn record(&self, ids: impl IntoIterator<Item = Uuid>, issued: Instant, returned: Instant) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.extend(ids.into_iter().map(|id| (id, (issued, returned))));
    }

    /// Commit-to-receipt delays of `received`, for the executions committed here.
    pub fn delays(&self, received: &[(Uuid, Instant)], from: From) -> Vec<Duration> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        received
            .iter()
            .filter_map(|(id, at)| {
                let (issued, returned) = map.get(id)?;
                Some(at.saturating_duration_since(match from {
                    From::Returned => *returned,
                    From::Issued => *issued,
                }))
            })
            .collect()
    }
}

/// When each completion committed by the server's own clock (Postgres with
/// `track_commit_timestamp`): a producer's call can return well after its commit is visible
/// (its task waits for a core), so only the server tells when the commit happened.
pub struct CommitTimes(HashMap<Uuid, SystemTime>);

impl CommitTimes {
    /// The commit time of every row of the outbox at `url`, by execution.
    pub async fn of_postgres(url: &str) -> Self {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url).await.expect("connect");
        let rows: Vec<(Uuid, Option<f64>)> = sqlx::query_as(
            "SELECT execution_id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM ff_completion_event",
        )
        .fetch_all(&mut conn)
        .await
        .expect("commit timestamps (track_commit_timestamp = on)");
        Self(
            rows.into_iter()
                .filter_map(|(id, at)| Some((id, SystemTime::UNIX_EPOCH + Duration::from_secs_f64(at?))))
                .collect(),
        )
    }

    /// Commit-to-receipt delays of `received` (by the wall clock the server shares).
    pub fn delays(&self, received: &[(Uuid, SystemTime)]) -> Vec<Duration> {
        received.iter().filter_map(|(id, at)| Some(at.duration_since(*self.0.get(id)?).unwrap_or_default())).collect()
    }
}

/// One subscriber's receipts.
pub struct Tally {
    count: AtomicU64,
    keep: bool,
    received: Mutex<Vec<(Uuid, Instant, SystemTime)>>,
}

impl Tally {
    /// Counts receipts; `keep` also remembers each one with its time (for latency).
    pub fn new(keep: bool) -> Self {
        Self { count: AtomicU64::new(0), keep, received: Mutex::new(Vec::new()) }
    }

    pub fn record(&self, id: Uuid) {
        if self.keep {
            let (now, wall) = (Instant::now(), SystemTime::now());
            self.received.lock().unwrap_or_else(|e| e.into_inner()).push((id, now, wall));
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> Vec<(Uuid, Instant)> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(id, at, _)| (*id, *at)).collect()
    }

    /// Receipts by the wall clock, to compare with the server's commit times.
    pub fn received_wall(&self) -> Vec<(Uuid, SystemTime)> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(id, _, wall)| (*id, *wall)).collect()
    }
}

/// Waits until every tally has counted `n`, or `timeout` passes; returns the time it took,
/// `None` on timeout.
pub async fn wait_for_all(tallies: &[std::sync::Arc<Tally>], n: u64, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if tallies.iter().all(|t| t.count() >= n) {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Like [`wait_for_all`], but also gives up once no tally has moved for `stall` (a design
/// that skipped events never gets them, however long one waits).
pub async fn wait_for_all_or_stall(
    tallies: &[std::sync::Arc<Tally>],
    n: u64,
    timeout: Duration,
    stall: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let (mut seen, mut moved) = (0u64, Instant::now());
    loop {
        if tallies.iter().all(|t| t.count() >= n) {
            return Some(start.elapsed());
        }
        let now: u64 = tallies.iter().map(|t| t.count()).sum();
        if now != seen {
            (seen, moved) = (now, Instant::now());
        }
        if start.elapsed() >= timeout || moved.elapsed() >= stall {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Min, p50, p99 and max of a set of delays, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread {
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: usize,
}

impl Spread {
    pub fn of(delays: Vec<Duration>) -> Self {
        if delays.is_empty() {
            return Self::default();
        }
        // Microseconds, 3 significant figures.
        let mut histogram = ff_completions_lab::micros_histogram();
        for delay in &delays {
            histogram.saturating_record(delay.as_micros().min(u128::from(u64::MAX)) as u64);
        }
        let ms = |us: u64| us as f64 / 1e3;
        Self {
            min: ms(histogram.min()),
            p50: ms(histogram.value_at_quantile(0.5)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
            samples: delays.len(),
        }
    }
}

/// Resident memory of this process, in bytes (Linux).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

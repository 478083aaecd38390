//! Several engine instances sharing one promoter group, as OS processes. Each member is this
//! binary started again (`instances member …`); it joins the durable group `promoter`, gets a
//! share of the 256 flow partitions, and writes each completion's effect row in the same
//! transaction as its acknowledgement. The parent produces completions, checks that every one
//! was handled exactly once and in order within its partition, and with `--chaos` SIGKILLs a
//! random member now and then and starts a new one, reporting how long each takeover took.
//! On Valkey the effect rows go to an SQLite file and the ack is its own call after the
//! effect's transaction: each completion at least once, a repeat only of an effect a killed
//! member wrote before it could ack, or whose ack was fenced.
//!
//! ```text
//! cargo run --release --example instances                          # 3 members, an SQLite file
//! cargo run --release --example instances -- --chaos               # kill and replace members
//! cargo run --release --example instances -- --backend postgres://postgres@127.0.0.1:5432/app
//! cargo run --release --example instances -- --backend valkey://127.0.0.1:6379 --chaos
//! cargo run --release --example instances -- --bench               # takeover and throughput figures
//! cargo run --release --example instances -- --chaos --duration 60s --retention-age 4s   # aggressive retention
//! ```

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use clap::Parser;
use ff_completions::__store::{Ack, Position, Sharing};
use ff_completions::{BackendConfig, PARTITION_COUNT, TimestampMs};
use rand::Rng;

use ff_completions_lab::instances as group;
use group::{MemberProcess, Repeats, Run, converged, settle, settle_allowing_repeats};

#[derive(Parser, Debug, Clone)]
#[command(about = "Three OS processes share one durable promoter group; --chaos kills and replaces them")]
struct Args {
    /// `sqlite` (a file in a temporary directory), a `postgres://` URL, or a `valkey://` (or
    /// `valkey+cluster://`) URL, whose effect rows go to an SQLite file.
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// Member processes.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// How long producers run.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// SIGKILL a random member every fifth of the run and start a new one a second later.
    #[arg(long)]
    chaos: bool,
    /// The members' lease.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Each producer's pause between completions in the takeover measure.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    pace: Duration,
    /// Trim, every 300 ms, every event older than this (as an aggressive retention job would).
    #[arg(long, value_parser = humantime::parse_duration)]
    retention_age: Option<Duration>,
    /// Trim, every 300 ms, all but this many events (on Valkey: of each partition's stream).
    #[arg(long)]
    retention_events: Option<u64>,
    /// Measure instead (Postgres): heartbeat latency of a member holding every partition, for
    /// this long without, then with a consumer's transaction open on one of its partitions (an
    /// ack inside it, neither committed nor rolled back), then without again.
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_open_tx: Option<Duration>,
    /// Measure instead: throughput with 1, 2 and 4 members, takeover after repeated kills, and
    /// the cost of an acknowledgement.
    #[arg(long)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let raw: Vec<String> = std::env::args().collect();
    if group::member_main(&raw) {
        return Ok(());
    }
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(async {
        let target = Target::from_arg(&args.backend)?;
        match args.heartbeat_open_tx {
            Some(open_for) => heartbeats_beside_an_open_transaction(&args, open_for).await,
            None if args.bench => bench(&args, &target).await,
            None => demo(&args, &target).await,
        }
    })
}

/// Where the group lives and where the effect rows go.
struct Target {
    backend: BackendConfig,
    /// The effect rows' database: `sqlite` or `postgres`.
    kind: &'static str,
    /// Its file or URL.
    at: String,
    /// Keeps a temporary SQLite file.
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    /// `sqlite` (a temporary file), a Postgres URL, or a Valkey URL (effects in a temporary
    /// SQLite file).
    fn from_arg(arg: &str) -> anyhow::Result<Self> {
        let file = |name: &str| -> anyhow::Result<(tempfile::TempDir, String)> {
            let dir = tempfile::tempdir()?;
            let at = dir.path().join(name).display().to_string();
            Ok((dir, at))
        };
        if arg == "sqlite" {
            let (dir, at) = file("instances.db")?;
            return Ok(Self { backend: BackendConfig::sqlite(&at), kind: "sqlite", at, _dir: Some(dir) });
        }
        let backend = BackendConfig::from_url(arg)?;
        match backend.kind() {
            "postgres" => Ok(Self { backend, kind: "postgres", at: arg.to_owned(), _dir: None }),
            kind if kind.starts_with("valkey") => {
                let (dir, at) = file("effects.db")?;
                Ok(Self { backend, kind: "sqlite", at, _dir: Some(dir) })
            }
            other => anyhow::bail!("--backend takes sqlite, a postgres:// or a valkey:// URL, not {other}"),
        }
    }

    /// Whether the ack is its own call after the effect's transaction (at least once).
    fn ack_after_effect(&self) -> bool {
        self.backend.kind().starts_with("valkey")
    }

    async fn start(&self) -> anyhow::Result<Run> {
        Run::start_with(self.backend.clone(), self.kind, self.at.clone()).await
    }
}

/// A kill of a member and when its partitions were handled again by another.
struct Takeover {
    /// From the SIGKILL.
    after_kill: Duration,
    /// From the moment its last lease ran out.
    after_expiry: Duration,
}

/// A killed member: its id and process (what it printed), its partitions, when it was
/// killed and when its leases ran out.
struct Killed {
    id: String,
    process: MemberProcess,
    partitions: Vec<i64>,
    at: TimestampMs,
    expires: TimestampMs,
}

/// Kills a random member.
async fn kill_one(run: &Run, group: &str, members: &mut Vec<(String, MemberProcess)>) -> anyhow::Result<Killed> {
    let victim = rand::rng().random_range(0..members.len());
    let (id, mut process) = members.remove(victim);
    let view = run.store.view(group).await?.unwrap_or_default();
    let held: Vec<_> = view.partitions.iter().filter(|p| p.owner.as_ref().is_some_and(|(o, _)| *o == id)).collect();
    let expires = held.iter().filter_map(|p| p.owner.as_ref().map(|(_, at)| *at)).max().unwrap_or_default();
    let partitions = held.iter().map(|p| i64::from(p.partition)).collect();
    let at = TimestampMs::now();
    process.kill9().await?;
    Ok(Killed { id, process, partitions, at, expires })
}

/// Polls the group until none of the killed member's partitions is held by it any more and
/// every one of them has a holder; returns when.
async fn moved(run: &Run, group: &str, killed: &Killed) -> anyhow::Result<TimestampMs> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = run.store.view(group).await?.unwrap_or_default();
        let now = TimestampMs::now();
        let done = view
            .partitions
            .iter()
            .filter(|p| killed.partitions.contains(&i64::from(p.partition)))
            .all(|p| p.owner.as_ref().is_some_and(|(owner, expires)| *owner != killed.id && *expires > now));
        if done || Instant::now() > deadline {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// When another member first wrote an effect in the killed member's partitions after the kill.
async fn takeover_of(run: &Run, killed: &Killed) -> anyhow::Result<Option<Takeover>> {
    let effects = run.db.effects().await?;
    let first = effects
        .iter()
        .filter(|e| e.member != killed.id && e.done > killed.at && killed.partitions.contains(&e.partition))
        .map(|e| e.done)
        .min();
    Ok(first.map(|done| Takeover {
        after_kill: Duration::from_millis(done.millis_since(killed.at)),
        after_expiry: Duration::from_millis(done.millis_since(killed.expires)),
    }))
}

fn spawn_members(
    run: &Run,
    group: &str,
    ids: impl IntoIterator<Item = String>,
    ttl: Duration,
) -> anyhow::Result<Vec<(String, MemberProcess)>> {
    ids.into_iter()
        .map(|id| MemberProcess::spawn(run, group, Some(&id), ttl, Duration::ZERO).map(|p| (id, p)))
        .collect()
}

/// Heartbeats of a member holding every partition, every 100 ms for `open_for`, first alone and
/// then while another connection keeps a transaction open that acknowledged one of its
/// partitions: p50 / p99 / max of each, and whether every lease stayed ahead of the clock.
async fn heartbeats_beside_an_open_transaction(args: &Args, open_for: Duration) -> anyhow::Result<()> {
    use sqlx::Connection;

    anyhow::ensure!(args.backend.starts_with("postgres"), "--heartbeat-open-tx needs a postgres:// --backend");
    let backend = BackendConfig::from_url(&args.backend)?;
    let store = ff_completions::__store::Store::open(&backend).await?;
    let group = format!("heartbeat-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let leases = store.heartbeat(&group, "a", args.ttl, Sharing::Shared, true).await?;
    anyhow::ensure!(leases.len() == usize::from(PARTITION_COUNT), "the member holds every partition");
    let measure = async |label: &str| -> anyhow::Result<()> {
        let (mut took, mut behind) = (Vec::new(), 0usize);
        let started = Instant::now();
        while started.elapsed() < open_for {
            let at = Instant::now();
            let held = store.heartbeat(&group, "a", args.ttl, Sharing::Shared, false).await?;
            took.push(at.elapsed());
            let now = TimestampMs::now();
            let view = store.view(&group).await?.ok_or_else(|| anyhow::anyhow!("no group"))?;
            behind +=
                view.partitions.iter().filter(|p| p.owner.as_ref().is_none_or(|(_, until)| *until <= now)).count();
            anyhow::ensure!(held.len() == usize::from(PARTITION_COUNT), "{label}: the member lost partitions");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        took.sort();
        println!(
            "{label}: {} heartbeats, p50 {:?}, p99 {:?}, max {:?}; leases found not ahead of the clock: {behind}",
            took.len(),
            percentile(&took, 0.5),
            percentile(&took, 0.99),
            took.last().copied().unwrap_or_default()
        );
        Ok(())
    };
    measure("without an open transaction").await?;
    let mut conn = sqlx::postgres::PgConnection::connect(&args.backend).await?;
    let mut tx = conn.begin().await?;
    let first = &leases[0];
    let ack = Ack {
        partition: first.partition,
        token: first.token,
        position: Position { lo: first.acked.lo + 1, ..first.acked },
    };
    ff_completions::__store::ack_in(&mut *tx, &group, "a", &[ack]).await?;
    measure(&format!("with a transaction open on partition {} for {open_for:?}", first.partition)).await?;
    tx.rollback().await?;
    // Again without, for the drift of a shared machine between the two.
    measure("after the transaction ended").await?;
    Ok(())
}

/// A trimming task while `--retention-*` asks for one: its stop, what it removed, its handle.
type Trimmer = (tokio_util::sync::CancellationToken, Arc<AtomicU64>, tokio::task::JoinHandle<()>);

async fn trim_meanwhile(args: &Args, run: &Run) -> anyhow::Result<Option<Trimmer>> {
    if args.retention_age.is_none() && args.retention_events.is_none() {
        return Ok(None);
    }
    let mut retention = match args.retention_age {
        Some(age) => ff_completions::Retention::max_age(age),
        None => ff_completions::Retention::max_events(0),
    };
    retention.max_events = args.retention_events;
    let store = ff_completions::__store::Store::open(&run.backend).await?;
    let (stop, removed) = (tokio_util::sync::CancellationToken::new(), Arc::new(AtomicU64::new(0)));
    let task = {
        let (stop, removed) = (stop.clone(), removed.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                // A busy backend (SQLite's write lock) is tried again at the next round.
                if let Ok(n) = store.trim(&retention).await {
                    removed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    Ok(Some((stop, removed, task)))
}

async fn demo(args: &Args, target: &Target) -> anyhow::Result<()> {
    let mut run = target.start().await?;
    let group = format!("promoter-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    println!("{} member processes share group {group} on {}", args.members, target.backend.kind());
    let mut members = spawn_members(&run, &group, (0..args.members).map(|i| format!("m{i}")), args.ttl)?;
    converged(&run.store, &group, args.members, Duration::from_secs(60)).await?;
    let started = Instant::now();
    run.produce(2, Duration::ZERO);
    let trimmer = trim_meanwhile(args, &run).await?;
    let mut next_id = args.members;
    let mut takeovers = Vec::new();
    while started.elapsed() < args.duration {
        tokio::time::sleep(args.duration / 5).await;
        if !args.chaos || started.elapsed() >= args.duration || members.len() < 2 {
            continue;
        }
        let killed = kill_one(&run, &group, &mut members).await?;
        println!("  SIGKILL {} (held {} partitions)", killed.id, killed.partitions.len());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let id = format!("m{next_id}");
        next_id += 1;
        members.extend(spawn_members(&run, &group, [id.clone()], args.ttl)?);
        println!("  started {id}");
        takeovers.push(killed);
    }
    run.stop_producing().await;
    let produced_for = started.elapsed();
    if let Some((stop, removed, task)) = trimmer {
        stop.cancel();
        let _ = task.await;
        println!("retention removed {} events meanwhile", removed.load(std::sync::atomic::Ordering::Relaxed));
    }
    // Where the ack follows the effect's transaction, an effect may repeat: only one a killed
    // member wrote before it could ack, or one whose ack its member reported fenced.
    let repeats = if target.ack_after_effect() {
        let all = members.iter().map(|(_, p)| p).chain(takeovers.iter().map(|k| &k.process));
        Repeats::after_interruptions(takeovers.iter().map(|k| k.id.clone()), all)
    } else {
        Repeats::default()
    };
    let verdict = settle_allowing_repeats(&run.db, &run.produced, Duration::from_secs(60), &repeats).await?;
    println!(
        "{} completions in {produced_for:.1?}: effects {} (lost {}, duplicated {}, out of order {}, unexpected {}); \
         by member {:?}",
        verdict.expected,
        verdict.effects,
        verdict.lost,
        verdict.duplicated,
        verdict.out_of_order,
        verdict.unexpected,
        verdict.by_member
    );
    for killed in &takeovers {
        let victim = &killed.id;
        match takeover_of(&run, killed).await? {
            Some(t) => println!(
                "  takeover of {victim}'s partitions: {:?} after the kill, {:?} after its leases ran out",
                t.after_kill, t.after_expiry
            ),
            None => println!("  takeover of {victim}'s partitions: no later completion in them"),
        }
    }
    if !verdict.ok() {
        for line in verdict.explain() {
            println!("    {line}");
        }
    }
    let ended: Vec<&str> = members.iter_mut().filter_map(|(id, p)| p.exited().then_some(id.as_str())).collect();
    println!("members that ended by themselves: {ended:?}");
    anyhow::ensure!(ended.is_empty(), "members ended: {ended:?}");
    if target.ack_after_effect() {
        anyhow::ensure!(verdict.ok(), "the group did not handle every completion at least once, in order");
        println!(
            "every completion was handled, in order within its partition; {} repeated after an interruption",
            verdict.repeated
        );
    } else {
        anyhow::ensure!(verdict.ok(), "the group did not handle every completion exactly once, in order");
        println!("every completion was handled exactly once, in order within its partition");
    }
    Ok(())
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

async fn bench(args: &Args, target: &Target) -> anyhow::Result<()> {
    anyhow::ensure!(
        !target.ack_after_effect(),
        "--bench measures effect and ack in one transaction: sqlite or a postgres:// URL"
    );
    let kind = target.kind;
    let backlog = 3000;
    println!(
        "throughput on {kind}: members drain a backlog of {backlog} completions, effect and ack in one transaction each"
    );
    let mut base = None;
    for members in [1usize, 2, 4] {
        let mut run = target.start().await?;
        let group = format!("bench-{members}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        // The group starts at the tail: create it before the backlog, then leave it.
        run.store.heartbeat(&group, "creator", args.ttl, Sharing::Shared, true).await?;
        run.store.leave(&group, "creator").await?;
        run.produce(2, Duration::ZERO);
        while run.produced.count.load(std::sync::atomic::Ordering::Relaxed) < backlog {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        run.stop_producing().await;
        let started = Instant::now();
        let processes = spawn_members(&run, &group, (0..members).map(|i| format!("b{i}")), args.ttl)?;
        let verdict = settle(&run.db, &run.produced, Duration::from_secs(120)).await?;
        let rate = verdict.effects as f64 / started.elapsed().as_secs_f64();
        let ratio = rate / *base.get_or_insert(rate);
        println!(
            "  {members} member(s): {rate:>6.0} completions/s ({ratio:.2}x of 1 member; processes started and joined \
             included), exactly once: {}",
            verdict.ok()
        );
        drop(processes);
    }

    println!("takeover after SIGKILL: 3 members, lease {:?}, 2 producers pausing {:?}", args.ttl, args.pace);
    let mut run = target.start().await?;
    let group = format!("takeover-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut members = spawn_members(&run, &group, (0..3).map(|i| format!("t{i}")), args.ttl)?;
    converged(&run.store, &group, 3, Duration::from_secs(60)).await?;
    run.produce(2, args.pace);
    let (mut after_kill, mut after_expiry, mut leases_moved) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed = kill_one(&run, &group, &mut members).await?;
        let moved_at = moved(&run, &group, &killed).await?;
        leases_moved.push(Duration::from_millis(moved_at.millis_since(killed.expires)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(t) = takeover_of(&run, &killed).await? {
            after_kill.push(t.after_kill);
            after_expiry.push(t.after_expiry);
        }
        members.extend(spawn_members(&run, &group, [format!("t{}", round + 3)], args.ttl)?);
        converged(&run.store, &group, 3, Duration::from_secs(60)).await?;
    }
    run.stop_producing().await;
    after_kill.sort();
    after_expiry.sort();
    leases_moved.sort();
    let mut lag: Vec<Duration> =
        run.db.effects().await?.iter().map(|e| Duration::from_millis(e.done.millis_since(e.committed))).collect();
    lag.sort();
    println!(
        "  {} kills: every lease held by another member {:?} p50 / {:?} p99 after the dead one's ran out",
        leases_moved.len(),
        percentile(&leases_moved, 0.5),
        percentile(&leases_moved, 0.99)
    );
    println!(
        "  first effect in its partitions: after the kill p50 {:?} p99 {:?}; after the lease ran out p50 {:?} p99 {:?}",
        percentile(&after_kill, 0.5),
        percentile(&after_kill, 0.99),
        percentile(&after_expiry, 0.5),
        percentile(&after_expiry, 0.99)
    );
    println!(
        "  for scale, commit to effect of every completion in that run: p50 {:?} p99 {:?}",
        percentile(&lag, 0.5),
        percentile(&lag, 0.99)
    );
    drop(members);

    let n = 500;
    let group = format!("ack-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let leases = run.store.heartbeat(&group, "a", Duration::from_secs(60), Sharing::Exclusive, true).await?;
    let token = leases.first().map(|l| l.token).unwrap_or_default();
    let started = Instant::now();
    for i in 0..n {
        let partition = (i % usize::from(PARTITION_COUNT)) as u16;
        let position = Position { lane: 0, major: u64::MAX >> 2, hi: 1, lo: i as u64, minor: 0, check: 0 };
        run.store.ack(&group, "a", &[Ack { partition, token, position }]).await?;
    }
    let per_ack = started.elapsed() / n as u32;
    let started = Instant::now();
    for _ in 0..n {
        run.store.view(&group).await?;
    }
    let per_view = started.elapsed() / n as u32;
    println!(
        "cost per ack on {kind}: {per_ack:?} per acknowledgement round trip ({:.2}x a read of the group's 256 partitions)",
        per_ack.as_secs_f64() / per_view.as_secs_f64()
    );
    Ok(())
}

//! Durable groups across real OS processes. Members are this binary started again as
//! `groups member …`: each writes every completion's effect row in the same transaction as its
//! acknowledgement ([`ff_completions::AckTicket`]) on SQLite and Postgres; on Valkey, whose ack
//! is a call of its own, right after it (an effect may then repeat, only for a member killed
//! or paused between the two). The parent produces completions on every
//! partition, SIGKILLs, SIGSTOPs and restarts members, and then checks the effect rows: each
//! completion exactly once, in commit order within its partition.
//!
//! ```text
//! cargo test --test groups                              # every scenario on SQLite and Postgres
//! cargo test --test groups -- --backend sqlite --scenario kill
//! ```

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;

use ff_completions_lab::harness as support;
use ff_completions_lab::instances as group;
use group::{MemberProcess, Repeats, Run, Verdict, converged, settle_allowing_repeats};

#[derive(Parser, Debug, Clone)]
#[command(about = "Durable groups across OS processes: SIGKILL, SIGSTOP, restart; effects exactly once")]
struct Args {
    /// sqlite, postgres, valkey or all.
    #[arg(long, default_value = "all")]
    backend: String,
    /// kill, pause, exclusive, retention or all.
    #[arg(long, default_value = "all")]
    scenario: String,
}

fn main() {
    let raw: Vec<String> = std::env::args().collect();
    if group::member_main(&raw) {
        return;
    }
    let ours: Vec<String> =
        raw.iter().take(1).cloned().chain(support::known_args(&raw[1..], &["--backend", "--scenario"], &[])).collect();
    let args = Args::parse_from(ours);
    support::init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let code = match runtime {
        Ok(runtime) => runtime.block_on(run_all(args)),
        Err(err) => {
            eprintln!("no tokio runtime: {err}");
            2
        }
    };
    std::process::exit(code);
}

/// A throwaway backend for one scenario, kept alive while the scenario runs: a private
/// Postgres server, an SQLite file, or a Valkey server (effect rows then go to an SQLite file:
/// the ack is its own call after the effect's transaction).
enum Backend {
    Postgres(#[allow(dead_code)] support::postgres::PrivatePg),
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Valkey(#[allow(dead_code)] support::valkey::ValkeyServer, #[allow(dead_code)] tempfile::TempDir),
}

impl Backend {
    async fn start(kind: &str) -> anyhow::Result<(Self, Run)> {
        match kind {
            "postgres" => {
                let server = support::postgres::PrivatePg::start().await;
                let run = Run::start("postgres", server.url()).await?;
                Ok((Self::Postgres(server), run))
            }
            "sqlite" => {
                let dir = tempfile::tempdir()?;
                let run = Run::start("sqlite", dir.path().join("groups.db").display().to_string()).await?;
                Ok((Self::Sqlite(dir), run))
            }
            "valkey" => {
                let server = support::valkey::ValkeyServer::start().await;
                let dir = tempfile::tempdir()?;
                let effects = dir.path().join("effects.db").display().to_string();
                let run = Run::start_with(server.config(), "sqlite", effects).await?;
                Ok((Self::Valkey(server, dir), run))
            }
            other => anyhow::bail!("unknown backend {other:?} (sqlite, postgres, valkey or all)"),
        }
    }

    /// The repeats this backend may show: none where the effect and its ack are one
    /// transaction; on Valkey, the effects of a member `killed` before it could ack and those
    /// whose ack a member reported fenced.
    fn repeats(&self, killed: &[&str], members: &[&MemberProcess]) -> Repeats {
        match self {
            Self::Valkey(..) => {
                Repeats::after_interruptions(killed.iter().map(ToString::to_string), members.iter().copied())
            }
            _ => Repeats::default(),
        }
    }
}

const TTL: Duration = Duration::from_millis(1500);

/// Three members share a group; one is SIGKILLed mid-stream and restarted under its member id
/// before its lease ran out (its rejoin raises its tokens, fencing whatever the killed process
/// had begun, and it goes on from the acknowledged positions); a fourth joins later.
async fn kill_scenario(kind: &str) -> anyhow::Result<Verdict> {
    let (backend, mut run) = Backend::start(kind).await?;
    let group = "promoter";
    let mut members: Vec<MemberProcess> = (0..3)
        .map(|i| MemberProcess::spawn(&run, group, Some(&format!("m{i}")), TTL, Duration::ZERO))
        .collect::<anyhow::Result<_>>()?;
    converged(&run.store, group, 3, Duration::from_secs(60)).await?;
    run.produce(2, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut victim = members.remove(1);
    victim.kill9().await?;
    let killed_at = run.produced.count.load(Ordering::Relaxed);
    tokio::time::sleep(TTL / 3).await;
    let restarted_at = ff_completions::TimestampMs::now();
    members.push(MemberProcess::spawn(&run, group, Some("m1"), TTL, Duration::ZERO)?);
    tokio::time::sleep(Duration::from_secs(3)).await;
    members.push(MemberProcess::spawn(&run, group, Some("m3"), TTL, Duration::ZERO)?);
    tokio::time::sleep(Duration::from_secs(3)).await;
    run.stop_producing().await;
    let all: Vec<&MemberProcess> = members.iter().chain([&victim]).collect();
    let verdict =
        settle_allowing_repeats(&run.db, &run.produced, Duration::from_secs(60), &backend.repeats(&["m1"], &all))
            .await?;
    let by_restarted = run.db.effects().await?.iter().filter(|e| e.member == "m1" && e.done >= restarted_at).count();
    println!(
        "   killed m1 after {killed_at} completions, restarted it {:?} later (it wrote {by_restarted} effects); \
         effects by member {:?}",
        TTL / 3,
        verdict.by_member
    );
    anyhow::ensure!(by_restarted > 0, "the restarted member wrote no effect");
    anyhow::ensure!(verdict.by_member.contains_key("m3"), "the member that joined later took no partition");
    Ok(verdict)
}

/// One of three members is SIGSTOPped past its lease while it holds events, then resumed:
/// the others take its partitions over meanwhile, and its work on them does not commit (its
/// acknowledgements are fenced and their effects roll back, or it learns of the move first and
/// drops what it had read). On SQLite a member stopped inside a write transaction holds the
/// database's write lock, so nobody can take anything over until it resumes: the member is
/// then stopped again, up to three times.
async fn pause_scenario(kind: &str) -> anyhow::Result<Verdict> {
    let (backend, mut run) = Backend::start(kind).await?;
    let group = "promoter";
    let work = Duration::from_millis(30);
    let members: Vec<MemberProcess> = (0..3)
        .map(|i| MemberProcess::spawn(&run, group, Some(&format!("m{i}")), TTL, work))
        .collect::<anyhow::Result<_>>()?;
    converged(&run.store, group, 3, Duration::from_secs(60)).await?;
    run.produce(2, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut taken_over = 0;
    for _ in 0..3 {
        let before = held_by(&run.store, group, "m0").await?;
        members[0].signal("-STOP")?;
        tokio::time::sleep(TTL * 3).await;
        let during = held_by(&run.store, group, "m0").await?;
        members[0].signal("-CONT")?;
        taken_over = before.iter().filter(|(partition, token)| during.get(partition) != Some(token)).count();
        if taken_over > 0 {
            break;
        }
        println!("   m0 was stopped holding the write lock: nothing could be taken over; stopping it again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.stop_producing().await;
    let all: Vec<&MemberProcess> = members.iter().collect();
    let verdict =
        settle_allowing_repeats(&run.db, &run.produced, Duration::from_secs(60), &backend.repeats(&[], &all)).await?;
    let (fenced, skipped) = (members[0].fenced(), members[0].skipped());
    println!(
        "   paused m0 for {:?}: {taken_over} of its partitions taken over meanwhile, {fenced} of its \
         acknowledgements fenced, {skipped} events dropped before their work began; effects by member {:?}",
        TTL * 3,
        verdict.by_member
    );
    anyhow::ensure!(taken_over > 0, "none of the paused member's partitions was taken over while it was stopped");
    Ok(verdict)
}

/// The partitions `member` holds in `group` now, with their tokens.
async fn held_by(
    store: &ff_completions::__store::Store,
    group: &str,
    member: &str,
) -> anyhow::Result<std::collections::BTreeMap<u16, u64>> {
    let view = store.view(group).await?.ok_or_else(|| anyhow::anyhow!("group {group} is gone"))?;
    Ok(view
        .partitions
        .iter()
        .filter(|p| p.owner.as_ref().is_some_and(|(owner, _)| owner == member))
        .map(|p| (p.partition, p.token))
        .collect())
}

/// Retention trims aggressively under a running group, every 300 ms (SQL: every event older
/// than 4 s; Valkey: all but the last 200 entries of each partition's stream, about 4 s of
/// the lease-only partition's, and nothing of the others: by age, a stream's newest entry is
/// kept, but a re-read from a stored position at an older entry trimmed after a newer one came
/// reads as expired, see `src/backends/valkey/source.rs`) while one
/// partition receives lease entries only (an execution whose lease is renewed
/// again and again) and the others completions; members join, and one is SIGKILLed (each move
/// reads the tree again from the stored positions, the lease-only partition's long trimmed
/// past its group's start). Nothing ends: every member not killed still runs at the end, every
/// stored position can still be read from, and each completion has its effect once.
async fn retention_scenario(kind: &str) -> anyhow::Result<Verdict> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    let (backend, mut run) = Backend::start(kind).await?;
    let group = "promoter";
    // The lease-only partition: its one execution is claimed before anything else exists.
    let flow = ff_completions::FlowId::new();
    let spec = ff_completions_lab::ExecutionSpec::new(&flow);
    let quiet = spec.id.partition();
    run.engine.create_flow(&flow, None).await?;
    run.engine.create_execution(&spec).await?;
    anyhow::ensure!(run.engine.claim("lease-holder", 1).await? == [spec.id], "the lease-only execution is not claimed");
    let mut members: Vec<MemberProcess> = (0..2)
        .map(|i| MemberProcess::spawn(&run, group, Some(&format!("m{i}")), TTL, Duration::ZERO))
        .collect::<anyhow::Result<_>>()?;
    converged(&run.store, group, 2, Duration::from_secs(60)).await?;

    let (stop, removed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let renewer = {
        let (engine, stop, id) = (run.engine.clone(), stop.clone(), spec.id);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = engine.renew_lease(&id, "lease-holder").await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let trimmer = {
        let (store, stop, removed) =
            (ff_completions::__store::Store::open(&run.backend).await?, stop.clone(), removed.clone());
        let kind = kind.to_owned();
        tokio::spawn(async move {
            let retention = match kind.as_str() {
                "valkey" => ff_completions::Retention::max_events(200),
                _ => ff_completions::Retention::max_age(Duration::from_secs(4)),
            };
            while !stop.load(Ordering::Relaxed) {
                // A busy backend (SQLite's write lock) is tried again at the next round.
                if let Ok(n) = store.trim(&retention).await {
                    removed.fetch_add(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    run.produce_outside(2, Duration::from_millis(5), Some(quiet));
    tokio::time::sleep(Duration::from_secs(3)).await;
    members.push(MemberProcess::spawn(&run, group, Some("m2"), TTL, Duration::ZERO)?);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut victim = members.remove(0);
    victim.kill9().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    members.push(MemberProcess::spawn(&run, group, Some("m3"), TTL, Duration::ZERO)?);
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.stop_producing().await;
    let all: Vec<&MemberProcess> = members.iter().chain([&victim]).collect();
    let verdict =
        settle_allowing_repeats(&run.db, &run.produced, Duration::from_secs(60), &backend.repeats(&["m0"], &all))
            .await?;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::join!(renewer, trimmer);
    let ended: Vec<usize> = members.iter_mut().enumerate().filter_map(|(i, m)| m.exited().then_some(i)).collect();
    println!(
        "   retention removed {} events; lease-only partition {quiet}; effects by member {:?}",
        removed.load(Ordering::Relaxed),
        verdict.by_member
    );
    anyhow::ensure!(ended.is_empty(), "members ended: {ended:?} (of m1, m2, m3)");
    // Every stored position is still one the backend can read from.
    let report = ff_completions::GroupAdmin::open(&run.backend).await?.show(group).await?;
    let stalled: Vec<u16> = report
        .iter()
        .flat_map(|r| &r.partitions)
        .filter(|p| p.backlog.stalled().is_some())
        .map(|p| p.partition)
        .collect();
    anyhow::ensure!(stalled.is_empty(), "partitions whose positions were trimmed away: {stalled:?}");
    anyhow::ensure!(removed.load(Ordering::Relaxed) > 0, "retention removed nothing");
    Ok(verdict)
}

/// A durable subscription without a group: its process is SIGKILLed and started again.
async fn exclusive_scenario(kind: &str) -> anyhow::Result<Verdict> {
    let (backend, mut run) = Backend::start(kind).await?;
    let name = "promoter";
    let mut first = MemberProcess::spawn(&run, name, None, TTL, Duration::ZERO)?;
    converged(&run.store, name, 1, Duration::from_secs(60)).await?;
    run.produce(2, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.kill9().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = MemberProcess::spawn(&run, name, None, TTL, Duration::ZERO)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.stop_producing().await;
    // Both processes are the member "exclusive": on Valkey, an effect the first wrote and did
    // not ack may repeat (and so, in principle, could one of the second's).
    let repeats = backend.repeats(&["exclusive"], &[&first, &second]);
    settle_allowing_repeats(&run.db, &run.produced, Duration::from_secs(60), &repeats).await
}

async fn run_all(args: Args) -> i32 {
    let backends: Vec<&str> = match args.backend.as_str() {
        "all" => vec!["sqlite", "postgres", "valkey"],
        one => vec![one],
    };
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "all" => vec!["kill", "pause", "exclusive", "retention"],
        one => vec![one],
    };
    let (mut passed, mut failed) = (0, 0);
    for backend in &backends {
        for scenario in &scenarios {
            println!("== groups on {backend}: {scenario}");
            let started = Instant::now();
            let result = match *scenario {
                "kill" => kill_scenario(backend).await,
                "pause" => pause_scenario(backend).await,
                "exclusive" => exclusive_scenario(backend).await,
                "retention" => retention_scenario(backend).await,
                other => Err(anyhow::anyhow!("unknown scenario {other:?} (kill, pause, exclusive, retention or all)")),
            };
            match result {
                Ok(v) if v.ok() => {
                    passed += 1;
                    println!(
                        "   ok: {} completions, {} effects, 0 lost, 0 duplicated, 0 out of order, {} repeated after \
                         an interruption ({:.1?})",
                        v.expected,
                        v.effects,
                        v.repeated,
                        started.elapsed()
                    );
                }
                Ok(v) => {
                    failed += 1;
                    println!(
                        "   FAILED: {} completions, {} effects: {} lost, {} duplicated, {} out of order, {} unexpected",
                        v.expected, v.effects, v.lost, v.duplicated, v.out_of_order, v.unexpected
                    );
                    for line in v.explain() {
                        println!("     {line}");
                    }
                }
                Err(err) => {
                    failed += 1;
                    println!("   FAILED: {err:#}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    i32::from(failed > 0)
}

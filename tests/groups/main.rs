//! Durable groups across real OS processes. Members are this binary started again as
//! `groups member …`: each writes every completion's effect row in the same transaction as its
//! acknowledgement ([`ff_completions::AckTicket`]). The parent produces completions on every
//! partition, SIGKILLs, SIGSTOPs and restarts members, and then checks the effect rows: each
//! completion exactly once, in commit order within its partition.
//!
//! ```text
//! cargo test --test groups                              # every scenario on SQLite and Postgres
//! cargo test --test groups -- --backend sqlite --scenario kill
//! ```

#[path = "../it/support/mod.rs"]
mod support;

#[path = "../../examples/instances/group.rs"]
mod group;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;

use group::{MemberProcess, Run, Verdict, converged, settle};

#[derive(Parser, Debug, Clone)]
#[command(about = "Durable groups across OS processes: SIGKILL, SIGSTOP, restart; effects exactly once")]
struct Args {
    /// sqlite, postgres or all.
    #[arg(long, default_value = "all")]
    backend: String,
    /// kill, pause, exclusive or all.
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

/// A throwaway backend for one scenario: a private Postgres server or an SQLite file, kept
/// alive while the scenario runs.
enum Backend {
    Postgres(#[allow(dead_code)] support::postgres::PrivatePg),
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
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
            other => anyhow::bail!("unknown backend {other:?} (sqlite, postgres or all)"),
        }
    }
}

const TTL: Duration = Duration::from_millis(1500);

/// Three members share a group; one is SIGKILLed mid-stream and a new one joins later.
async fn kill_scenario(kind: &str) -> anyhow::Result<Verdict> {
    let (_backend, mut run) = Backend::start(kind).await?;
    let group = "promoter";
    let mut members: Vec<MemberProcess> = (0..3)
        .map(|i| MemberProcess::spawn(&run, group, Some(&format!("m{i}")), TTL, Duration::ZERO))
        .collect::<anyhow::Result<_>>()?;
    converged(&run.store, group, 3, Duration::from_secs(60)).await?;
    run.produce(2, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let victim = members.remove(1);
    victim.kill9().await?;
    let killed_at = run.produced.count.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    members.push(MemberProcess::spawn(&run, group, Some("m3"), TTL, Duration::ZERO)?);
    tokio::time::sleep(Duration::from_secs(3)).await;
    run.stop_producing().await;
    let verdict = settle(&run.db, &run.produced, Duration::from_secs(60)).await?;
    println!("   killed m1 after {killed_at} completions; effects by member {:?}", verdict.by_member);
    anyhow::ensure!(verdict.by_member.contains_key("m3"), "the member that joined later took no partition");
    Ok(verdict)
}

/// One of three members is SIGSTOPped past its lease while it holds events, then resumed: its
/// acknowledgements of partitions taken over meanwhile are fenced, and their effects roll back.
async fn pause_scenario(kind: &str) -> anyhow::Result<Verdict> {
    let (_backend, mut run) = Backend::start(kind).await?;
    let group = "promoter";
    let work = Duration::from_millis(30);
    let members: Vec<MemberProcess> = (0..3)
        .map(|i| MemberProcess::spawn(&run, group, Some(&format!("m{i}")), TTL, work))
        .collect::<anyhow::Result<_>>()?;
    converged(&run.store, group, 3, Duration::from_secs(60)).await?;
    run.produce(2, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    members[0].signal("-STOP")?;
    tokio::time::sleep(TTL * 3).await;
    members[0].signal("-CONT")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.stop_producing().await;
    let verdict = settle(&run.db, &run.produced, Duration::from_secs(60)).await?;
    let fenced = members[0].fenced();
    println!(
        "   paused m0 for {:?}: {fenced} of its acknowledgements fenced; effects by member {:?}",
        TTL * 3,
        verdict.by_member
    );
    anyhow::ensure!(fenced > 0, "the paused member held events but none of its acknowledgements was fenced");
    Ok(verdict)
}

/// A durable subscription without a group: its process is SIGKILLed and started again.
async fn exclusive_scenario(kind: &str) -> anyhow::Result<Verdict> {
    let (_backend, mut run) = Backend::start(kind).await?;
    let name = "promoter";
    let first = MemberProcess::spawn(&run, name, None, TTL, Duration::ZERO)?;
    converged(&run.store, name, 1, Duration::from_secs(60)).await?;
    run.produce(2, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.kill9().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _second = MemberProcess::spawn(&run, name, None, TTL, Duration::ZERO)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.stop_producing().await;
    settle(&run.db, &run.produced, Duration::from_secs(60)).await
}

async fn run_all(args: Args) -> i32 {
    let backends: Vec<&str> = match args.backend.as_str() {
        "all" => vec!["sqlite", "postgres"],
        one => vec![one],
    };
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "all" => vec!["kill", "pause", "exclusive"],
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
                other => Err(anyhow::anyhow!("unknown scenario {other:?} (kill, pause, exclusive or all)")),
            };
            match result {
                Ok(v) if v.ok() => {
                    passed += 1;
                    println!(
                        "   ok: {} completions, {} effects, 0 lost, 0 duplicated, 0 out of order ({:.1?})",
                        v.expected,
                        v.effects,
                        started.elapsed()
                    );
                }
                Ok(v) => {
                    failed += 1;
                    println!("   FAILED: {v:?}");
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

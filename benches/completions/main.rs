//! Benchmarks: the actor tree against the seed design and against the floor, measured side by
//! side in one run on servers the bench starts itself on loopback.
//!
//! ```text
//! cargo bench --bench completions                        # every scenario (about 10 minutes):
//!                                                        # writes benches/results/{report.md,plot.svg}
//! cargo bench --bench completions -- --scenario latency,throughput --backend postgres
//! cargo test --bench completions                         # smoke: every scenario, tiny (CI)
//! ```
//!
//! `cargo bench` passes `--bench`; without it (under `cargo test`) each scenario runs at a
//! tiny size and the run checks its own results, so the bench cannot rot unnoticed.

mod bed;
mod designs;
mod heartbeats;
mod measure;
mod operations;
mod report;
mod scenarios;
mod wakeups;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use ff_completions_lab::harness as support;

use bed::{Bed, Kind};
use designs::Design;
use report::Results;
use scenarios::Sizes;

/// A scenario of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Latency,
    Throughput,
    CatchUp,
    FanOut,
    Dag,
    /// Postgres only: producers' commits/s per way of waking the listener, delivery beside an
    /// unrelated open transaction, reads when idle and busy (a server flushing every commit).
    Wakeups,
    /// Postgres and SQLite: lease heartbeats/s with lease history on and off, alternated.
    Heartbeats,
    /// Postgres only, a one-table and a 256-partition outbox: delivery latency against a bare
    /// floor, idle cost, pages per read, catch-up over small batches, delivery during a trim.
    Operations,
}

#[derive(Parser, Debug)]
#[command(about = "ff-completions benchmarks: ours against the seed design and the floor")]
struct Args {
    /// Full sizes (`cargo bench` passes it); without it, a smoke run at tiny sizes.
    #[arg(long)]
    bench: bool,
    /// Scenarios to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// Backends to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    backend: Vec<Kind>,
    /// Where report.md and plot.svg go (default: benches/results for a full run of every
    /// scenario, else a temporary directory).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let raw: Vec<String> = std::env::args().collect();
    let ours = raw.iter().take(1).cloned().chain(support::known_args(
        &raw[1..],
        &["--scenario", "--backend", "--out"],
        &["--bench"],
    ));
    let args = Args::parse_from(ours);
    support::init_tracing();
    let everything = args.scenario.is_empty() && args.backend.is_empty();
    let scenarios = if args.scenario.is_empty() {
        vec![
            Scenario::Latency,
            Scenario::Throughput,
            Scenario::CatchUp,
            Scenario::FanOut,
            Scenario::Dag,
            Scenario::Wakeups,
            Scenario::Heartbeats,
            Scenario::Operations,
        ]
    } else {
        args.scenario.clone()
    };
    let kinds = if args.backend.is_empty() {
        vec![Kind::Postgres, Kind::Valkey, Kind::ValkeyCluster, Kind::Sqlite]
    } else {
        args.backend.clone()
    };
    let sizes = if args.bench { Sizes::full() } else { Sizes::smoke() };

    let started = Instant::now();
    let bed = Bed::start(&kinds).await;
    let operations_sizes =
        if args.bench { operations::OperationsSizes::full() } else { operations::OperationsSizes::smoke() };
    let results = run(&bed, &scenarios, &kinds, &sizes, &operations_sizes).await;
    let elapsed = started.elapsed();

    let command = if args.bench { "cargo bench --bench completions" } else { "cargo test --bench completions" };
    let markdown = report::markdown(&results, &sizes, &operations_sizes, command, elapsed);
    let temp = tempfile::tempdir().expect("temp dir");
    let out = match (&args.out, args.bench && everything) {
        (Some(dir), _) => dir.clone(),
        (None, true) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results"),
        (None, false) => temp.path().to_owned(),
    };
    std::fs::create_dir_all(&out).expect("output directory");
    std::fs::write(out.join("report.md"), &markdown).expect("write report.md");
    if let Err(err) = report::plot(&results, &out.join("plot.svg")) {
        eprintln!("plot failed: {err}");
        std::process::exit(1);
    }
    println!("{markdown}");
    println!("report: {}", out.join("report.md").display());

    if !args.bench {
        let problems = smoke_problems(&results, &scenarios, &kinds, &sizes, &out);
        for p in &problems {
            eprintln!("smoke check failed: {p}");
        }
        println!(
            "smoke: {} passed, {} failed",
            smoke_checks(&scenarios, &kinds) - problems.len().min(smoke_checks(&scenarios, &kinds)),
            problems.len()
        );
        if !problems.is_empty() {
            std::process::exit(1);
        }
    }
}

async fn run(
    bed: &Bed,
    scenarios: &[Scenario],
    kinds: &[Kind],
    sizes: &Sizes,
    operations_sizes: &operations::OperationsSizes,
) -> Results {
    let mut results = Results::default();
    for &kind in kinds {
        let designs: Vec<Design> =
            [Design::Ours, Design::Seed, Design::Floor].into_iter().filter(|d| d.applies_to(kind)).collect();
        for &scenario in scenarios {
            eprintln!("{} {scenario:?}", kind.name());
            match scenario {
                Scenario::Latency => {
                    for &design in &designs {
                        for &n in &sizes.latency_subscribers {
                            if design != Design::Floor || n == 1 {
                                results.latency.push(scenarios::latency(bed, kind, design, n, sizes).await);
                            }
                        }
                    }
                }
                Scenario::Throughput => {
                    for batched in [false, true] {
                        for &design in &designs {
                            for &n in &sizes.throughput_subscribers {
                                if design != Design::Floor || n == 1 {
                                    let row = scenarios::throughput(bed, kind, design, n, batched, sizes).await;
                                    results.throughput.push(row);
                                }
                            }
                        }
                    }
                }
                Scenario::CatchUp => results.catch_up.extend(scenarios::catch_up(bed, kind, sizes).await),
                Scenario::FanOut => results.fan_out.push(scenarios::fan_out(bed, kind, sizes).await),
                Scenario::Dag => results.dag.push(scenarios::dag_chain(bed, kind, sizes).await),
                Scenario::Wakeups if kind == Kind::Postgres => results.wakeups = Some(wakeups::run(sizes).await),
                Scenario::Wakeups => {}
                Scenario::Heartbeats if heartbeats::applies(kind) => {
                    results.heartbeats.push(heartbeats::run(bed, kind, sizes).await);
                }
                Scenario::Heartbeats => {}
                Scenario::Operations if kind == Kind::Postgres => {
                    results.operations = Some(operations::run(operations_sizes).await);
                }
                Scenario::Operations => {}
            }
        }
    }
    results
}

/// How many checks a smoke run makes: one per scenario and backend it applies to, and one for
/// the files.
fn smoke_checks(scenarios: &[Scenario], kinds: &[Kind]) -> usize {
    scenarios.iter().map(|&s| kinds.iter().filter(|&&k| applies(s, k)).count()).sum::<usize>() + 1
}

fn applies(scenario: Scenario, kind: Kind) -> bool {
    match scenario {
        Scenario::Wakeups | Scenario::Operations => kind == Kind::Postgres,
        Scenario::Heartbeats => heartbeats::applies(kind),
        _ => true,
    }
}

/// What a smoke run must show: every scenario ran on every backend, ours lost nothing, and
/// the report and plot were written.
fn smoke_problems(
    results: &Results,
    scenarios: &[Scenario],
    kinds: &[Kind],
    sizes: &Sizes,
    out: &std::path::Path,
) -> Vec<String> {
    let mut problems = Vec::new();
    for &kind in kinds {
        for &scenario in scenarios.iter().filter(|&&s| applies(s, kind)) {
            let ok = match scenario {
                Scenario::Latency => {
                    let rows: Vec<_> = results.latency.iter().filter(|r| r.backend == kind).collect();
                    !rows.is_empty()
                        && rows.iter().all(|r| r.spread.samples > 0 && (r.design != Design::Ours || r.missing == 0))
                }
                Scenario::Throughput => {
                    let rows: Vec<_> = results.throughput.iter().filter(|r| r.backend == kind).collect();
                    !rows.is_empty()
                        && rows.iter().all(|r| r.produced_per_s > 0.0)
                        && rows.iter().filter(|r| r.design == Design::Ours).all(|r| r.drained.is_some())
                }
                Scenario::CatchUp => {
                    results
                        .catch_up
                        .iter()
                        .filter(|r| r.backend == kind)
                        .all(|r| r.complete && r.events == sizes.history)
                        && results.catch_up.iter().any(|r| r.backend == kind)
                }
                Scenario::FanOut => {
                    results.fan_out.iter().any(|r| r.backend == kind && r.spread.samples == sizes.fanout_subscribers)
                }
                Scenario::Dag => results.dag.iter().any(|r| r.backend == kind && r.hops == sizes.chain - 1),
                Scenario::Wakeups => results.wakeups.as_ref().is_some_and(|w| {
                    w.producers.iter().all(|r| r.commits_per_s > 0.0 && r.missing == 0)
                        && w.open_transaction.iter().all(|r| r.delivery.samples > 0)
                }),
                Scenario::Heartbeats => results.heartbeats.iter().any(|r| {
                    r.backend == kind
                        && r.with_history.iter().chain(&r.without_history).all(|v| *v > 0.0)
                        && r.events_received >= r.renewals_with_history
                }),
                Scenario::Operations => results.operations.as_ref().is_some_and(|o| {
                    !o.latency.is_empty()
                        && o.latency.iter().all(|r| r.spread.samples > 0 && r.spread.p50 > 0.0)
                        && o.latency.iter().filter(|r| r.reader == operations::Reader::Ours).all(|r| r.lost == 0)
                        && o.pages.iter().all(|r| r.ours_one_row > 0 && r.floor_one_row > 0)
                        && o.catch_up.iter().all(|r| r.took.is_some())
                        && o.trim.as_ref().is_some_and(|t| t.removed > 0 && t.during.samples > 0)
                }),
            };
            if !ok {
                problems.push(format!("{scenario:?} on {}", kind.name()));
            }
        }
    }
    let written = |name: &str| std::fs::metadata(out.join(name)).map(|m| m.len() > 0).unwrap_or(false);
    if !written("report.md") || !written("plot.svg") {
        problems.push("report.md and plot.svg written".into());
    }
    problems
}

//! DAG promotion driven by completion events: the job ff-completions exists for.
//!
//! ```text
//! cargo run --release --example dag_promotion                        # embedded SQLite, no server
//! cargo run --release --example dag_promotion -- --chaos             # kill the listener meanwhile
//! cargo run --release --example dag_promotion -- --no-promoter       # the reconciler alone
//! cargo run --release --example dag_promotion -- --backend postgres --url postgres://user@host/db
//! cargo run --release --example dag_promotion -- --backend valkey --url valkey://host:6379
//! cargo run --release --example dag_promotion -- --backend valkey --url valkey+cluster://node:7000
//! cargo run --release --example dag_promotion --features opentelemetry -- --trace --flows 3
//! ```
//!
//! Builds flows (fan-out, fan-in, a chain, a diamond), runs workers that claim eligible
//! executions and complete, fail (some after a retry) or cancel them, and promotes or skips
//! children from completion events in an actor spawned with the completion tree under one
//! engine actor; it resolves each delivered batch of completions in one engine call. The
//! summary shows delivery latency (commit -> the promoter has the event) and promotion latency
//! (commit -> child eligible) as p50 / p99 / max. The run checks exactness itself: each
//! execution's completion must arrive exactly once (by id), chaos or not. A reconciler scans
//! for edges left unresolved; with the promoter on it should fix none. `--no-promoter` turns event-driven promotion off to watch the reconciler work alone:
//! it then resolves every edge (a reconciler scan every `--reconcile-ms`, an edge resolved when
//! seen in two scans in a row), so the run is slower but must reach the same final states.
//! Beside completions it drives lease history and signal delivery through the same tree
//! (`families.rs`): long executions heartbeat their leases, an expiry sweep runs, under
//! `--chaos` a stalled worker's lease expires and is reclaimed, and waiters suspend on a signal
//! (buffered, satisfied, deduped); a lease and a signal subscriber check that every event the
//! run caused arrived exactly once, in order per execution. On a backend whose engine does not
//! produce these families yet, that part is skipped with one line.
//! Prints a summary and exits non-zero unless every execution reached the state the DAG implies,
//! every completion arrived exactly once, and so did every lease and signal event it caused.
//!
//! `--trace` (built with the `opentelemetry` feature) traces the first flow: each completion
//! records its producer's span (`execute`) as a W3C `traceparent`, the tree's delivery span
//! continues that trace, and the promoter resolves the children in a `promote` span of it; the
//! spans are printed to stdout as they end (no collector needed): one trace from a parent's
//! completion to its children's promotion.
//!
//! The scenario itself (the promoters subscribed to the tree, the workers, the ledgers) is the
//! lab's `dag` module (`lab/src/dag/`), shared with the `dag` tests; the engine it drives is the
//! lab's demo engine. This file reads the command line and prints the summary.

use std::time::Duration;

use clap::Parser;
use ff_completions::BackendConfig;
use ff_completions_lab::dag as scenario;

#[derive(Parser, Debug)]
#[command(about = "DAG promotion driven by ff-completions")]
struct Args {
    /// sqlite (embedded, default), postgres or valkey.
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// Backend URL (required for postgres and valkey; optional sqlite://path).
    #[arg(long)]
    url: Option<String>,
    /// Flows to run.
    #[arg(long, default_value_t = 150)]
    flows: usize,
    /// Width of each flow's fan-out (and fan-in).
    #[arg(long, default_value_t = 8)]
    fan_out: usize,
    /// Length of each flow's chain.
    #[arg(long, default_value_t = 10)]
    chain_len: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Promoter actors, each serving the flows of some partitions.
    #[arg(long, default_value_t = 4)]
    promoters: usize,
    /// Percent of executions that fail terminally.
    #[arg(long, default_value_t = 3)]
    fail_percent: u32,
    /// Percent of executions that fail once, then succeed on retry.
    #[arg(long, default_value_t = 5)]
    retry_percent: u32,
    /// Percent of executions that are cancelled.
    #[arg(long, default_value_t = 1)]
    cancel_percent: u32,
    /// Seed of the DAG decisions and the chaos schedule.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Kill the listener actor and its connection (on servers: `pg_terminate_backend` on
    /// Postgres, `CLIENT KILL` on Valkey) at random intervals.
    #[arg(long)]
    chaos: bool,
    /// Do not resolve children from completion events: the reconciler alone must drive every
    /// flow to its final state (a way to see the reconciler work on its own).
    #[arg(long)]
    no_promoter: bool,
    /// Milliseconds between reconciler scans.
    #[arg(long, default_value_t = 1000)]
    reconcile_ms: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Serve the tree's metrics as Prometheus text on this address while the flow runs
    /// (e.g. 127.0.0.1:9184; any path).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Trace the first flow and print its spans to stdout (needs the `opentelemetry` feature).
    #[arg(long)]
    trace: bool,
}

/// Installs a Prometheus recorder with its own HTTP listener on `addr`.
fn serve_metrics(addr: std::net::SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("metrics on {addr}: {e}"))?;
    println!("metrics at http://{addr}/metrics");
    Ok(())
}

#[tokio::main]
async fn main() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let provider = args.trace.then(scenario::trace::stdout_provider);
    if args.trace && !cfg!(feature = "opentelemetry") {
        eprintln!("error: --trace needs the opentelemetry feature (cargo run --features opentelemetry ..)");
        std::process::exit(2);
    }
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_filter(filter))
        .with(provider.as_ref().map(scenario::trace::layer))
        .init();
    let temp = tempfile::tempdir();
    let backend = match (args.backend.as_str(), &args.url) {
        (_, Some(url)) => BackendConfig::from_url(url),
        ("sqlite", None) => match &temp {
            Ok(dir) => Ok(BackendConfig::sqlite(dir.path().join("dag.db"))),
            Err(e) => Err(ff_completions::Error::validation(format!("no temp dir: {e}"))),
        },
        (other, None) => Err(ff_completions::Error::validation(format!("--backend {other} needs --url"))),
    };
    let backend = match backend {
        Ok(b) => b,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    };
    if let Some(addr) = args.metrics_addr
        && let Err(err) = serve_metrics(addr)
    {
        eprintln!("error: {err}");
        std::process::exit(2);
    }
    let scenario = scenario::Scenario {
        backend: backend.clone(),
        flows: args.flows,
        fan_out: args.fan_out,
        chain_len: args.chain_len,
        workers: args.workers,
        promoters: args.promoters,
        fail_percent: args.fail_percent,
        retry_percent: args.retry_percent,
        cancel_percent: args.cancel_percent,
        seed: args.seed,
        chaos: args.chaos,
        promoter: !args.no_promoter,
        reconcile_every: Duration::from_millis(args.reconcile_ms.max(1)),
        progress: !args.trace,
        timeout: Duration::from_secs(args.timeout_secs),
        trace: args.trace,
        pace: Duration::ZERO,
        on_planned: None,
    };
    println!(
        "DAG promotion on {backend} ({} flows, seed {}{}{})",
        args.flows,
        args.seed,
        if args.chaos { ", chaos" } else { "" },
        if args.no_promoter { ", reconciler only" } else { "" }
    );
    let outcome = scenario::run(&scenario).await;
    if let Some(provider) = provider {
        let _ = provider.shutdown();
    }
    match outcome {
        Ok(report) => {
            scenario::report::print_summary(&report, scenario.reconcile_every);
            if !report.mismatches.is_empty() || !report.exactly_once() || !report.families_exactly_once() {
                std::process::exit(1);
            }
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}

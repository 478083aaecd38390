//! A live view of a DAG run in the browser: the tree's completions served as Server-Sent
//! Events (each event's id its cursor, so a reconnecting browser resumes exactly where it
//! stopped), and a page that draws the flows as they run.
//!
//! ```text
//! cargo run --example live_view                          # embedded SQLite; open http://127.0.0.1:8080
//! cargo run --example live_view -- --pace-ms 200 --flows 6
//! cargo run --example live_view -- --backend postgres --url postgres://user@host/db
//! cargo run --example live_view -- --screenshot docs/live-view.png   # needs Debian's chromium
//! ```
//!
//! The run is the DAG example's scenario (`lab/src/dag/`), paced so it can be watched: each
//! worker spends `--pace-ms` on each execution. The page (`lab/src/live_view/page.html`) knows
//! the flows' shape (`/flows`) and follows `/events`: nodes turn eligible when every parent
//! succeeded, then succeeded, failed, cancelled or skipped as their completions arrive. After
//! the run the server stays up until Ctrl-C (or, with `--screenshot`, takes a screenshot of the
//! finished run in headless Chromium and exits).

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ff_completions::{BackendConfig, CompletionSupervisorHandle, SupervisorConfig};
use ff_completions_lab::dag::{self as scenario, OnPlanned};
use ff_completions_lab::live_view::LiveView;
use ff_completions_lab::live_view::browser::Chromium;

#[derive(Parser, Debug)]
#[command(about = "A live view of a DAG run, from ff-completions' stream")]
struct Args {
    /// sqlite (embedded, default), postgres or valkey.
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// Backend URL (required for postgres and valkey).
    #[arg(long)]
    url: Option<String>,
    /// Where to serve the page.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// Flows to run.
    #[arg(long, default_value_t = 8)]
    flows: usize,
    /// Milliseconds a worker spends on each execution.
    #[arg(long, default_value_t = 60)]
    pace_ms: u64,
    /// Seed of the DAG decisions.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// After the run, save a screenshot of the finished page here and exit.
    #[arg(long)]
    screenshot: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    if let Err(err) = run(Args::parse()).await {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let temp = tempfile::tempdir()?;
    let backend = match (args.backend.as_str(), &args.url) {
        (_, Some(url)) => BackendConfig::from_url(url)?,
        ("sqlite", None) => BackendConfig::sqlite(temp.path().join("live.db")),
        (other, None) => return Err(format!("--backend {other} needs --url").into()),
    };
    let (tree, _) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend.clone())).await?;
    // Where the run's completions start: read before the run.
    let start = tree.completion_position().await?;
    let view = LiveView::new(tree.clone(), start);
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let _server = view.serve(listener);
    println!("live view at http://{}/", args.addr);
    let planned = view.clone();
    let s = scenario::Scenario {
        backend,
        flows: args.flows,
        fan_out: 4,
        chain_len: 3,
        workers: 3,
        promoters: 2,
        fail_percent: 8,
        retry_percent: 5,
        cancel_percent: 3,
        seed: args.seed,
        chaos: false,
        promoter: true,
        reconcile_every: Duration::from_secs(1),
        progress: false,
        timeout: Duration::from_secs(600),
        trace: false,
        pace: Duration::from_millis(args.pace_ms),
        on_planned: Some(OnPlanned(Arc::new(move |flows| planned.set_flows(flows)))),
    };
    let report = scenario::run(&s).await?;
    println!(
        "run done: {} executions, {} promotions, {} skips, every state as the DAG implies: {}",
        report.executions,
        report.promotions,
        report.skips,
        report.mismatches.is_empty()
    );
    match args.screenshot {
        Some(path) => screenshot(args.addr, &path).await?,
        None => {
            println!("serving until Ctrl-C");
            tokio::signal::ctrl_c().await?;
        }
    }
    tree.shutdown().await;
    Ok(())
}

/// Opens the page in headless Chromium, waits until it shows every execution final, and saves
/// a PNG of it.
async fn screenshot(addr: std::net::SocketAddr, path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let chromium = Chromium::start(1200, 360).await?;
    let page = chromium.open(&format!("http://{addr}/")).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let shown = Chromium::eval(&page, "[window.liveView.final, window.liveView.total]").await?;
        if shown[0].as_u64().is_some_and(|f| f > 0 && Some(f) == shown[1].as_u64()) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the page shows {shown} after 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(path, Chromium::screenshot(&page).await?)?;
    println!("screenshot saved to {}", path.display());
    Ok(())
}

//! Prints completions as they commit, one line each (or JSON), with the cursor to resume from.
//!
//! ```text
//! cargo run --example tail_completions -- --url sqlite://dag.db
//! cargo run --example tail_completions -- --url postgres://user@host/db --namespace tenant-a --json
//! cargo run --example tail_completions -- --url valkey://host:6379 --cursor 01... --limit 100 --stats
//! ```
//!
//! The URL may also come from `FF_COMPLETIONS_URL` (with every other `FF_COMPLETIONS_*`
//! setting). Ctrl-C shuts the tree down cleanly.

use clap::Parser;
use ff_completions::{
    CompletionSupervisorHandle, Completions, Error, Namespace, ScannerFilter, StreamCursor, SupervisorConfig,
};
use futures::StreamExt;

#[derive(Parser, Debug)]
#[command(about = "Tail completion events from a backend")]
struct Args {
    /// Backend URL: postgres://, valkey://, redis://, sqlite://path. Defaults to FF_COMPLETIONS_URL.
    #[arg(long)]
    url: Option<String>,
    /// Only this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only executions with this tag, as key=value.
    #[arg(long)]
    tag: Option<String>,
    /// Resume after this cursor (hex, as printed); from the tail when absent.
    #[arg(long)]
    cursor: Option<String>,
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<usize>,
    /// Print the tree's stats on exit (per subscriber: delivered, lag in events and ms).
    #[arg(long)]
    stats: bool,
}

fn request(args: &Args) -> Result<Completions, Error> {
    let mut filter = ScannerFilter::new();
    if let Some(ns) = &args.namespace {
        filter = filter.with_namespace(Namespace::new(ns.clone()));
    }
    if let Some(tag) = &args.tag {
        let (k, v) = tag.split_once('=').ok_or_else(|| Error::validation("--tag must be key=value"))?;
        filter = filter.with_instance_tag(k, v);
    }
    let from = match &args.cursor {
        Some(hex) => StreamCursor::from_hex(hex)?,
        None => StreamCursor::empty(),
    };
    Ok(Completions::from_cursor(from).with_filter(filter))
}

fn config(args: &Args) -> Result<SupervisorConfig, Error> {
    match &args.url {
        Some(url) => Ok(SupervisorConfig::new().with_backend(ff_completions::BackendConfig::from_url(url)?)),
        None => SupervisorConfig::from_env(),
    }
}

async fn tail(args: &Args, tree: &CompletionSupervisorHandle) -> Result<(), Error> {
    let mut events = tree.subscribe(request(args)?).await?;
    let result = print_events(args, &mut events).await;
    if args.stats {
        match tree.stats().await {
            // One line per listener and subscriber, lag included:
            // `subscriber sub-1 on postgres: Live, 12 delivered, lag 0 events / 0 ms, …`
            Ok(stats) => eprint!("{stats}"),
            Err(err) => eprintln!("stats unavailable: {err}"),
        }
    }
    result
}

async fn print_events(args: &Args, events: &mut ff_completions::Subscription) -> Result<(), Error> {
    let mut seen = 0;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(event) = event else { return Ok(()) };
        let event = event?;
        if args.json {
            let line = serde_json::json!({
                "cursor": event.cursor.to_hex(),
                "execution_id": event.execution_id,
                "flow_id": event.flow_id,
                "outcome": event.outcome.as_wire(),
                "namespace": event.namespace,
                "tags": event.tags,
                "at_ms": event.at.0,
            });
            println!("{line}");
        } else {
            let ns = event.namespace.as_ref().map(Namespace::as_str).unwrap_or("-");
            println!("{} {:<9} {} ns={ns} cursor={}", event.at.0, event.outcome, event.execution_id, event.cursor);
        }
        seen += 1;
        if args.limit.is_some_and(|limit| seen >= limit) {
            return Ok(());
        }
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let tree = match config(&args) {
        // A command line tool: a backend it cannot reach is an error to show now, not a wait.
        Ok(config) => CompletionSupervisorHandle::spawn(config.with_connect_at_start(true)).await.map(|(tree, _)| tree),
        Err(err) => Err(err),
    };
    let tree = match tree {
        Ok(tree) => tree,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    };
    let result = tail(&args, &tree).await;
    tree.shutdown().await;
    if let Err(err) = result {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

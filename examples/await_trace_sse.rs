//! Figures for awaiting one execution, trace context and the live view, each against a baseline
//! measured in the same run:
//!
//! - **await**: commit -> the awaiting future's wake, p50 / p99, against a plain tail
//!   subscriber's delivery of the same completions; memory per pending await, with 100,000
//!   pending.
//! - **trace**: the completion path (the producer's call, commit -> delivery) of completions
//!   recorded with a `traceparent`, against completions without one, taking turns; the
//!   `opentelemetry` feature on and its layer installed, so each traced delivery span continues
//!   its producer's trace.
//! - **sse**: delivery commit -> the live view's page in headless Chromium (p50 / p99, at 100
//!   completions a second), the events per second that page keeps up with while producers
//!   commit as fast as they can, and the rate at which it replays the whole run from the start.
//!
//! ```text
//! cargo run --release --example await_trace_sse                   # embedded SQLite
//! cargo run --release --example await_trace_sse -- --url postgres://user@host/db
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ff_completions::{
    BackendConfig, CompletionSupervisorHandle, Completions, ExecutionId, FlowId, SupervisorConfig, TraceParent,
};
use ff_completions_lab::dag::{FlowShape, NodeShape};
use ff_completions_lab::live_view::LiveView;
use ff_completions_lab::live_view::browser::{Chromium, Page};
use ff_completions_lab::{Engine, ExecutionSpec, connect_engine};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot};
use tracing_subscriber::layer::SubscriberExt as _;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(about = "Figures: await vs a plain subscriber, trace context cost, the live view's SSE")]
struct Args {
    /// Backend URL (default: embedded SQLite in a temporary directory).
    #[arg(long)]
    url: Option<String>,
    /// Completions awaited one at a time (and delivered to the plain subscriber).
    #[arg(long, default_value_t = 1_000)]
    awaits: usize,
    /// Pending awaits whose memory is measured.
    #[arg(long, default_value_t = 100_000)]
    pending: usize,
    /// Completions per kind (traced, untraced), taking turns.
    #[arg(long, default_value_t = 1_000)]
    traced: usize,
    /// Completions committed at 100 a second for the page's delivery latency.
    #[arg(long, default_value_t = 300)]
    paced: usize,
    /// Completions committed as fast as the producers can for the page's rate.
    #[arg(long, default_value_t = 5_000)]
    burst: usize,
    /// Concurrent producers of the burst.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Sections to run: await, trace, sse.
    #[arg(long, value_delimiter = ',', default_value = "await,trace,sse")]
    only: Vec<String>,
}

#[tokio::main]
async fn main() {
    // The delivery spans continue their producers' traces through this layer (spans kept in
    // memory: the cost measured is the feature's, not an exporter's).
    let (provider, _spans) = ff_completions_lab::dag::trace::memory_provider();
    let registry = tracing_subscriber::registry().with(ff_completions_lab::dag::trace::layer(&provider));
    if let Err(err) = tracing::subscriber::set_global_default(registry) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
    if let Err(err) = run(Args::parse()).await {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Error> {
    let temp = tempfile::tempdir()?;
    let backend = match &args.url {
        Some(url) => BackendConfig::from_url(url)?,
        None => BackendConfig::sqlite(temp.path().join("figures.db")),
    };
    let engine = connect_engine(&backend).await?;
    let (tree, _) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend.clone())).await?;
    println!("figures on {} (debug build: {})", backend.kind(), cfg!(debug_assertions));
    let only = |s: &str| args.only.iter().any(|o| o == s);
    if only("await") {
        awaits(&args, &tree, &*engine).await?;
    }
    if only("trace") {
        trace(&args, &tree, &*engine).await?;
    }
    if only("sse") {
        sse(&args, &tree, engine.clone()).await?;
    }
    tree.shutdown().await;
    Ok(())
}

/// `n` claimed executions of fresh flows of at most 50, in creation order, and their flows.
async fn running(engine: &dyn Engine, n: usize) -> Result<Vec<(FlowId, ExecutionId)>, Error> {
    let mut ids = Vec::with_capacity(n);
    let mut flow = FlowId::new();
    for i in 0..n {
        if i % 50 == 0 {
            flow = FlowId::new();
            engine.create_flow(&flow, None).await?;
        }
        let spec = ExecutionSpec::new(&flow);
        engine.create_execution(&spec).await?;
        ids.push((flow, spec.id));
    }
    let mut claimed = 0;
    while claimed < n {
        claimed += engine.claim("figures", n).await?.len();
    }
    Ok(ids)
}

/// Deliveries of a plain tail subscriber: each execution's arrival instant.
fn plain_subscriber(
    mut sub: impl futures::Stream<Item = Result<ff_completions::CompletionEvent, ff_completions::Error>>
    + Unpin
    + Send
    + 'static,
) -> mpsc::UnboundedReceiver<(ExecutionId, Instant)> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(event)) = sub.next().await {
            if tx.send((event.execution_id, Instant::now())).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for `id`'s arrival on the plain subscriber.
async fn arrival(rx: &mut mpsc::UnboundedReceiver<(ExecutionId, Instant)>, id: ExecutionId) -> Result<Instant, Error> {
    while let Some((got, at)) = rx.recv().await {
        if got == id {
            return Ok(at);
        }
    }
    Err("the plain subscriber ended".into())
}

/// Microseconds up to a minute, three significant digits.
fn histogram() -> Result<Histogram<u64>, Error> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn p(h: &Histogram<u64>, q: f64) -> String {
    format!("{:.2} ms", h.value_at_quantile(q) as f64 / 1000.0)
}

async fn awaits(args: &Args, tree: &CompletionSupervisorHandle, engine: &dyn Engine) -> Result<(), Error> {
    let ids = running(engine, args.awaits).await?;
    let mut plain = plain_subscriber(tree.subscribe(Completions::tail()).await?);
    let (mut awaited, mut delivered) = (histogram()?, histogram()?);
    for (_, id) in &ids {
        let watch = tree.watch_completion(*id).await?;
        let (woke, wake) = oneshot::channel();
        tokio::spawn(async move {
            if watch.await.is_ok() {
                let _ = woke.send(Instant::now());
            }
        });
        engine.complete(id).await?;
        let committed = Instant::now();
        let at = arrival(&mut plain, *id).await?;
        delivered.saturating_record(us(at.saturating_duration_since(committed)));
        awaited.saturating_record(us(wake.await?.saturating_duration_since(committed)));
    }
    println!("\nawait ({} completions, one at a time; commit = the producer's call returned)", args.awaits);
    println!("  await_completion wake   p50 {}  p99 {}", p(&awaited, 0.5), p(&awaited, 0.99));
    println!("  plain tail subscriber   p50 {}  p99 {}", p(&delivered, 0.5), p(&delivered, 0.99));
    println!(
        "  ratio await / plain     p50 {:.2}  p99 {:.2}",
        awaited.value_at_quantile(0.5) as f64 / delivered.value_at_quantile(0.5) as f64,
        awaited.value_at_quantile(0.99) as f64 / delivered.value_at_quantile(0.99) as f64
    );

    // Pending awaits on executions that never complete: the hub's entry and the watch each.
    let flow = FlowId::new();
    let before = rss_bytes();
    let started = Instant::now();
    let mut pending = Vec::with_capacity(args.pending);
    for _ in 0..args.pending {
        pending.push(tree.watch_completion(ExecutionId::new_in(&flow)).await?);
    }
    let took = started.elapsed();
    let after = rss_bytes();
    println!(
        "  {} pending awaits: {:.1} MiB resident more, {} bytes each (the watch itself {} bytes); registered in {:.0} ms",
        args.pending,
        after.saturating_sub(before) as f64 / (1024.0 * 1024.0),
        after.saturating_sub(before) / args.pending.max(1) as u64,
        std::mem::size_of::<ff_completions::CompletionWatch>(),
        took.as_secs_f64() * 1000.0
    );
    drop(pending);
    Ok(())
}

async fn trace(args: &Args, tree: &CompletionSupervisorHandle, engine: &dyn Engine) -> Result<(), Error> {
    let ids = running(engine, args.traced * 2).await?;
    let mut plain = plain_subscriber(tree.subscribe(Completions::tail()).await?);
    let mut call = [histogram()?, histogram()?];
    let mut delivery = [histogram()?, histogram()?];
    for (i, (_, id)) in ids.iter().enumerate() {
        let traced = i % 2;
        let started = Instant::now();
        if traced == 1 {
            // A fresh trace per completion, as a producer's span would give.
            let tp = TraceParent::parse(&format!(
                "00-{:032x}-{:016x}-01",
                rand::random::<u128>() | 1,
                rand::random::<u64>() | 1
            ))?;
            engine.complete_traced(id, &tp).await?;
        } else {
            engine.complete(id).await?;
        }
        let committed = Instant::now();
        call[traced].saturating_record(us(committed - started));
        let at = arrival(&mut plain, *id).await?;
        delivery[traced].saturating_record(us(at.saturating_duration_since(committed)));
    }
    println!(
        "\ntrace context ({} completions each, taking turns; opentelemetry feature on, its layer installed)",
        args.traced
    );
    for (name, i) in [("without traceparent", 0), ("with traceparent   ", 1)] {
        println!(
            "  {name}  producer call p50 {}  p99 {}   commit -> delivery p50 {}  p99 {}",
            p(&call[i], 0.5),
            p(&call[i], 0.99),
            p(&delivery[i], 0.5),
            p(&delivery[i], 0.99)
        );
    }
    let ratio = |h: &[Histogram<u64>; 2]| h[1].value_at_quantile(0.5) as f64 / h[0].value_at_quantile(0.5) as f64;
    println!("  ratio with / without   producer call p50 {:.2}   delivery p50 {:.2}", ratio(&call), ratio(&delivery));
    Ok(())
}

async fn sse(args: &Args, tree: &CompletionSupervisorHandle, engine: Arc<dyn Engine>) -> Result<(), Error> {
    let ids = running(&*engine, args.paced + args.burst).await?;
    let mut flows: Vec<FlowShape> = Vec::new();
    let mut by_flow: HashMap<FlowId, usize> = HashMap::new();
    for (flow, id) in &ids {
        let i = *by_flow.entry(*flow).or_insert_with(|| {
            flows.push(FlowShape { flow_id: *flow, nodes: Vec::new() });
            flows.len() - 1
        });
        flows[i].nodes.push(NodeShape { id: *id, parents: Vec::new() });
    }
    let view = LiveView::new(tree.clone(), tree.completion_position().await?);
    view.set_flows(flows);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let url = format!("http://{}/", listener.local_addr()?);
    let _server = view.serve(listener);
    let chromium = Chromium::start(1280, 900).await?;
    let page = chromium.open(&url).await?;
    let total = ids.len() as u64;
    until(&page, "window.liveView.opens >= 1 && window.liveView.total", |v| v.as_u64() == Some(total)).await?;

    // Paced: one completion every 10 ms; the page measures commit (the event's `at`) -> arrival.
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for (_, id) in &ids[..args.paced] {
        tick.tick().await;
        engine.complete(id).await?;
    }
    let paced = args.paced as u64;
    until(&page, "window.liveView.received", |v| v.as_u64() >= Some(paced)).await?;
    let latencies = Chromium::eval(&page, "window.liveView.latencies()").await?;
    let mut page_ms = Histogram::<u64>::new(3)?;
    for l in latencies.as_array().into_iter().flatten() {
        page_ms.saturating_record(l.as_u64().unwrap_or(0));
    }
    println!("\nsse (one headless Chromium page drawing {} executions)", total);
    println!(
        "  commit -> page, {} completions at 100/s: p50 {} ms  p99 {} ms (the event's millisecond `at` to the page's Date.now())",
        args.paced,
        page_ms.value_at_quantile(0.5),
        page_ms.value_at_quantile(0.99)
    );

    // Burst: producers commit the rest as fast as they can; the page follows.
    let started = Instant::now();
    let burst: Vec<ExecutionId> = ids[args.paced..].iter().map(|(_, id)| *id).collect();
    let chunk = burst.len().div_ceil(args.producers.max(1)).max(1);
    let producers: Vec<_> = burst
        .chunks(chunk)
        .map(|ids| {
            let (engine, ids) = (engine.clone(), ids.to_vec());
            tokio::spawn(async move {
                for id in &ids {
                    engine.complete(id).await?;
                }
                Ok::<_, ff_completions_lab::Error>(())
            })
        })
        .collect();
    for producer in producers {
        producer.await??;
    }
    let committed = started.elapsed();
    until(&page, "window.liveView.received", |v| v.as_u64() >= Some(total)).await?;
    let shown = started.elapsed();
    println!(
        "  burst of {}: producers committed {:.0}/s; the page had them all at {:.0} events/s",
        args.burst,
        args.burst as f64 / committed.as_secs_f64(),
        args.burst as f64 / shown.as_secs_f64()
    );

    // Replay: a second page reads the whole run from the start.
    let started = Instant::now();
    let replay = chromium.open(&url).await?;
    until(&replay, "window.liveView.received", |v| v.as_u64() >= Some(total)).await?;
    let replayed = started.elapsed();
    let dup = Chromium::eval(&page, "window.liveView.duplicates + window.liveView.final").await?;
    println!(
        "  replay of all {total} from the start in a new page (page load included): {:.0} events/s; first page final + duplicates = {dup}",
        total as f64 / replayed.as_secs_f64()
    );
    drop(chromium);
    Ok(())
}

/// Polls `expression` in `page` every 10 ms until `done` says so (at most two minutes).
async fn until(page: &Page, expression: &str, done: impl Fn(&serde_json::Value) -> bool) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let value = Chromium::eval(page, expression).await?;
        if done(&value) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{expression} is still {value} after two minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The process's resident memory.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

//! Delivery latency as deployments connect, each comparison measured side by side in one run,
//! on servers this example starts itself on loopback (the lab's harness):
//!
//! - Postgres over TLS (`sslmode=verify-full`) against plain TCP (`sslmode=disable`), same
//!   server, database and role;
//! - Postgres through PgBouncer in transaction mode, poll-only (`ff_poll_ms`) and split mode
//!   (`ff_listen`: LISTEN on a direct session, reads through the pooler), against direct;
//! - Valkey over TLS with a client certificate against plain TCP, one `redis-server` listening
//!   both ways.
//!
//! Every tree subscribes to the same database (or server) at once, so one commit is delivered
//! to all of them: the latencies compared come from the same commits, under the same load.
//! Delivery latency: from the producer's commit returning to the subscriber receiving it.
//!
//! ```text
//! cargo run --release --example deploying -- --events 400
//! ```
//!
//! Needs what `scripts/test.sh` installs: Debian's postgresql, pgbouncer and redis-server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use ff_completions::{BackendConfig, CompletionSupervisorHandle, Completions, ExecutionId, FlowId, SupervisorConfig};
use ff_completions_lab::harness::pgbouncer::PgBouncer;
use ff_completions_lab::harness::postgres::PrivatePg;
use ff_completions_lab::harness::tls::TestCa;
use ff_completions_lab::harness::valkey::ValkeyServer;
use ff_completions_lab::{Engine, ExecutionSpec, PostgresEngine, ValkeyEngine};
use futures::StreamExt;

#[derive(Parser, Debug)]
#[command(about = "Delivery p50 over TLS and through PgBouncer, against plain and direct")]
struct Args {
    /// Completions committed one at a time per backend.
    #[arg(long, default_value_t = 400)]
    events: usize,
    /// Pause between two commits, in milliseconds.
    #[arg(long, default_value_t = 5)]
    gap_ms: u64,
    /// Poll interval of the poll-only tree through PgBouncer, in milliseconds.
    #[arg(long, default_value_t = 10)]
    poll_ms: u64,
}

/// When each subscriber received each execution.
type Received = Arc<Mutex<HashMap<ExecutionId, Instant>>>;

/// A tree on `url`, subscribed from the tail, recording what it receives.
async fn subscriber(url: &str) -> anyhow::Result<(CompletionSupervisorHandle, Received)> {
    let config = BackendConfig::from_url(url)?;
    let (tree, _) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(config)).await?;
    let mut events = tree.subscribe(Completions::tail()).await?;
    let received: Received = Arc::default();
    let record = received.clone();
    tokio::spawn(async move {
        while let Some(Ok(event)) = events.next().await {
            record.lock().unwrap_or_else(|p| p.into_inner()).insert(event.execution_id, Instant::now());
        }
    });
    Ok((tree, received))
}

/// Commits `n` completions one at a time; when each commit returned.
async fn produce(engine: &dyn Engine, n: usize, gap: Duration) -> anyhow::Result<Vec<(ExecutionId, Instant)>> {
    let flow = FlowId::new();
    engine.create_flow(&flow, None).await?;
    let mut committed = Vec::with_capacity(n);
    for _ in 0..n {
        let spec = ExecutionSpec::new(&flow);
        engine.create_execution(&spec).await?;
        engine.claim("figures", 1).await?;
        engine.complete(&spec.id).await?;
        committed.push((spec.id, Instant::now()));
        tokio::time::sleep(gap).await;
    }
    Ok(committed)
}

/// p50 and p99 of one subscriber's delivery delays, in milliseconds (waiting up to 30 s for
/// the last ones).
async fn percentiles(committed: &[(ExecutionId, Instant)], received: &Received) -> anyhow::Result<(f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = received.lock().unwrap_or_else(|p| p.into_inner()).len();
        if got >= committed.len() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{got} of {} delivered", committed.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = received.lock().unwrap_or_else(|p| p.into_inner());
    let mut delays: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| received.get(id).map(|r| r.saturating_duration_since(*at).as_secs_f64() * 1000.0))
        .collect();
    delays.sort_by(f64::total_cmp);
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99)))
}

/// Measures every `(name, url)` against the same commits of `engine`, prints them and the
/// ratio of each to the first (the baseline).
async fn compare(title: &str, engine: &dyn Engine, urls: &[(&str, String)], args: &Args) -> anyhow::Result<()> {
    let mut trees = Vec::new();
    for (name, url) in urls {
        trees.push((*name, subscriber(url).await?));
    }
    // Every tree live before the first commit: one warm-up completion each must arrive.
    let warm = produce(engine, 1, Duration::ZERO).await?;
    for (_, (_, received)) in &trees {
        percentiles(&warm, received).await?;
        received.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
    let committed = produce(engine, args.events, Duration::from_millis(args.gap_ms)).await?;
    println!("\n{title} ({} completions, one every {} ms)", args.events, args.gap_ms);
    println!("| connection | delivery p50 | p99 | p50 against {} |", trees[0].0);
    println!("|---|---|---|---|");
    let mut baseline = None;
    for (name, (_, received)) in &trees {
        let (p50, p99) = percentiles(&committed, received).await?;
        let base = *baseline.get_or_insert(p50);
        println!("| {name} | {p50:.2} ms | {p99:.2} ms | {:.2}x |", p50 / base);
    }
    for (_, (tree, _)) in trees {
        tree.shutdown().await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ca = TestCa::new("figures-ca");
    let pg = PrivatePg::start_tls(&ca, "figures-password-unused").await;
    let admin = pg.url();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await?;
    sqlx::query("CREATE DATABASE figures").execute(&mut conn).await?;
    let plain = format!("postgres://postgres@127.0.0.1:{}/figures?sslmode=disable", pg.port);
    let tls = format!(
        "postgres://postgres@localhost:{}/figures?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca.cert.display()
    );
    let engine = PostgresEngine::connect(&BackendConfig::from_url(&plain)?).await?;
    let bouncer = PgBouncer::start(pg.port, &["postgres"], 8).await;
    let pooled = bouncer.url("figures");
    compare(
        "Postgres: TLS against plain TCP",
        &engine,
        &[("plain TCP", plain.clone()), ("verify-full TLS", tls)],
        &args,
    )
    .await?;
    compare(
        "Postgres: through PgBouncer 1.18 (transaction mode) against direct",
        &engine,
        &[
            ("direct", plain.clone()),
            ("PgBouncer, split mode", format!("{pooled}?ff_listen=127.0.0.1:{}", pg.port)),
            (
                &format!("PgBouncer, poll-only every {} ms", args.poll_ms),
                format!("{pooled}?ff_poll_ms={}", args.poll_ms),
            ),
        ],
        &args,
    )
    .await?;

    let valkey = ValkeyServer::start_tls_beside_plain(&ca, "figures-password").await;
    let plain = valkey.plain_connection().ok_or_else(|| anyhow::anyhow!("no plain port"))?;
    let plain = BackendConfig::valkey_with(plain);
    let tls = valkey.config();
    let engine = ValkeyEngine::connect(&plain).await?;
    let url = |config: &BackendConfig| config.to_string().replace("<redacted>", "figures-password");
    let tls_url = format!(
        "{}?cacert={}&cert={}&key={}",
        url(&tls),
        ca.cert.display(),
        valkey.tls().map(|t| t.client.cert.display().to_string()).unwrap_or_default(),
        valkey.tls().map(|t| t.client.key.display().to_string()).unwrap_or_default()
    );
    compare(
        "Valkey (Debian's redis-server 7.0): TLS with a client certificate against plain TCP",
        &engine,
        &[("plain TCP", url(&plain)), ("TLS", tls_url)],
        &args,
    )
    .await?;
    Ok(())
}

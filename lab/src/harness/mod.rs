//! Shared test support: servers the harness starts itself, waiting on streams with a timeout,
//! and the ledger that checks exactly-once, in-order delivery.

#![allow(dead_code)]

pub mod pgbouncer;
pub mod postgres;
pub mod tls;
pub mod valkey;

use std::collections::HashSet;
use std::future::Future;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use ff_completions::{CompletionEvent, ExecutionId};
use futures::{Stream, StreamExt};

/// Installs a tracing subscriber once (RUST_LOG controls it; warnings by default).
pub fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    // The OS may hand a port just released to the next caller: never give one out twice in
    // this process, or two test servers would race for it.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Keeps only the flags a harness-less test or bench binary knows, since `cargo test` passes
/// its own (such as `--nocapture`) to every binary: `valued` flags take the next argument
/// (or `--flag=value`), `switches` stand alone.
pub fn known_args(args: &[String], valued: &[&str], switches: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if valued.iter().any(|flag| arg.starts_with(&format!("{flag}="))) || switches.contains(&arg.as_str()) {
            out.push(arg.clone());
        } else if valued.contains(&arg.as_str()) && i + 1 < args.len() {
            out.push(arg.clone());
            out.push(args[i + 1].clone());
            i += 1;
        }
        i += 1;
    }
    out
}

/// Takes exactly `n` events, failing the test if they do not arrive within `timeout`.
pub async fn take_events<S>(stream: &mut S, n: usize, timeout: Duration) -> Vec<CompletionEvent>
where
    S: Stream<Item = Result<CompletionEvent, ff_completions::Error>> + Unpin,
{
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(event))) => out.push(event),
            Ok(Some(Err(err))) => panic!("stream error after {} of {n} events: {err}", out.len()),
            Ok(None) => panic!("stream ended after {} of {n} events", out.len()),
            Err(_) => panic!("timed out after {} of {n} events", out.len()),
        }
    }
    out
}

/// Asserts that nothing more arrives for `quiet`.
pub async fn assert_no_more<S>(stream: &mut S, quiet: Duration)
where
    S: Stream<Item = Result<CompletionEvent, ff_completions::Error>> + Unpin,
{
    if let Ok(Some(item)) = tokio::time::timeout(quiet, stream.next()).await {
        panic!("expected no more events, got {item:?}");
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every expected completion once, nothing else, and within each partition in `expected`'s
/// order: what a backend that orders per partition (Valkey) promises.
#[track_caller]
pub fn assert_exactly_once_per_partition(received: &[CompletionEvent], expected: &[ExecutionId]) {
    assert_exactly_once(received, expected, false);
    let got: Vec<ExecutionId> = received.iter().map(|e| e.execution_id).collect();
    for p in expected.iter().map(|id| id.partition()).collect::<HashSet<_>>() {
        let of = |ids: &[ExecutionId]| ids.iter().filter(|id| id.partition() == p).copied().collect::<Vec<_>>();
        assert_eq!(of(&got), of(expected), "partition {p}'s events arrived out of order");
    }
}

/// Checks a subscriber's deliveries against what producers committed: every expected
/// execution exactly once, and (when `ordered`) in the given order.
#[track_caller]
pub fn assert_exactly_once(received: &[CompletionEvent], expected: &[ExecutionId], ordered: bool) {
    let got: Vec<ExecutionId> = received.iter().map(|e| e.execution_id).collect();
    let mut seen = HashSet::new();
    let duplicates: Vec<_> = got.iter().filter(|id| !seen.insert(**id)).collect();
    assert!(duplicates.is_empty(), "{} duplicates, first {:?}", duplicates.len(), duplicates.first());
    let want: HashSet<_> = expected.iter().copied().collect();
    let lost: Vec<_> = expected.iter().filter(|id| !seen.contains(id)).collect();
    assert!(lost.is_empty(), "{} of {} lost, first {:?}", lost.len(), expected.len(), lost.first());
    let extra: Vec<_> = got.iter().filter(|id| !want.contains(id)).collect();
    assert!(extra.is_empty(), "{} unexpected events, first {:?}", extra.len(), extra.first());
    if ordered {
        assert_eq!(got, expected, "events arrived out of order");
    }
    let cursors: Vec<_> = received.iter().map(|e| e.cursor.clone()).collect();
    let unique: HashSet<_> = cursors.iter().collect();
    assert_eq!(unique.len(), cursors.len(), "cursors must be distinct");
}

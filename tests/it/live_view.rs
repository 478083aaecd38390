//! The live view (`examples/live_view`, `lab/src/live_view/`) in a real headless Chromium: a
//! small paced DAG run on embedded SQLite, drawn by the page from the Server-Sent Events
//! stream, whose connection is cut mid-run. The browser reconnects with `Last-Event-ID` and the
//! page ends showing every execution's final state, each received exactly once.

use std::sync::Arc;
use std::time::Duration;

use ff_completions::{BackendConfig, CompletionSupervisorHandle, ExecutionId, SupervisorConfig};
use ff_completions_lab::connect_engine;
use ff_completions_lab::dag::{self as scenario, OnPlanned};
use ff_completions_lab::live_view::browser::Chromium;
use ff_completions_lab::live_view::{LiveView, Proxy};

use crate::support::{init_tracing, wait_until};

/// Bound on every wait of this test (none is a timed assertion: each only stops a hung run).
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_shows_every_executions_final_state_once_after_its_stream_is_cut_mid_run() {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let backend = BackendConfig::sqlite(dir.path().join("live.db"));
    let (tree, _) =
        CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(backend.clone())).await.expect("tree");
    let start = tree.completion_position().await.expect("the position before the run");
    let view = LiveView::new(tree.clone(), start);
    let server = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("a port");
    let upstream = server.local_addr().expect("its address");
    let _server = view.serve(server);
    // The browser goes through a proxy whose connections the test cuts.
    let proxy = Proxy::start(upstream).await.expect("proxy");

    let chromium = Chromium::start(1024, 600).await.expect("headless chromium (scripts/test.sh installs it)");
    let page = chromium.open(&format!("http://{}/", proxy.addr)).await.expect("the page opens");

    // A small run, paced so that it lasts several times the page's round trip: 4 flows of 12.
    let planned = view.clone();
    let s = scenario::Scenario {
        backend: backend.clone(),
        flows: 4,
        fan_out: 4,
        chain_len: 3,
        workers: 3,
        promoters: 1,
        fail_percent: 8,
        retry_percent: 5,
        cancel_percent: 3,
        seed: 7,
        chaos: false,
        promoter: true,
        reconcile_every: Duration::from_secs(1),
        progress: false,
        timeout: WAIT,
        trace: false,
        pace: Duration::from_millis(50),
        on_planned: Some(OnPlanned(Arc::new(move |flows| planned.set_flows(flows)))),
    };
    let run = tokio::spawn(async move { scenario::run(&s).await });

    // Mid-run: the page has drawn some completions, not all; cut every connection it has.
    let shown = || async { Chromium::eval(&page, "[window.liveView.received, window.liveView.total]").await };
    wait_until(WAIT, "the page's first completion", || async {
        shown().await.is_ok_and(|v| v[0].as_u64().is_some_and(|r| r > 0))
    })
    .await;
    let at_cut = shown().await.expect("the page answers");
    let cut = proxy.cut_all();
    let (received, total) = (at_cut[0].as_u64().unwrap_or(0), at_cut[1].as_u64().unwrap_or(0));
    assert!(received < total, "the cut came mid-run: the page had {received} of {total}");
    assert!(cut >= 1, "the stream's connection was open when cut");

    let report = run.await.expect("run task").expect("the run completes");
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    wait_until(WAIT, "the page to show every execution final", || async {
        Chromium::eval(&page, "window.liveView.final === window.liveView.total && window.liveView.total > 0")
            .await
            .is_ok_and(|v| v.as_bool() == Some(true))
    })
    .await;

    let page_says = Chromium::eval(
        &page,
        "[window.liveView.duplicates, window.liveView.reconnects, window.liveView.received, window.liveView.failed]",
    )
    .await
    .expect("the page answers");
    assert_eq!(page_says[0].as_u64(), Some(0), "no completion was drawn twice: {page_says}");
    assert!(page_says[1].as_u64().is_some_and(|r| r >= 1), "the browser reconnected: {page_says}");
    assert_eq!(page_says[2].as_u64(), Some(report.executions as u64), "one event per execution: {page_says}");
    assert!(page_says[3].is_null(), "the stream never failed: {page_says}");
    assert!(view.resumed() >= 1, "the reconnection resumed from its Last-Event-ID");

    // Each execution's state on the page is the engine's.
    let states = Chromium::eval(&page, "window.liveView.states()").await.expect("the page's states");
    let states = states.as_object().expect("an object of states");
    assert_eq!(states.len(), report.executions, "every execution is drawn");
    let engine = connect_engine(&backend).await.expect("engine");
    for (id, shown) in states {
        let id: ExecutionId = id.parse().expect("an execution id");
        let info = engine.execution(&id).await.expect("engine read").expect("the execution exists");
        assert_eq!(shown.as_str(), Some(info.state.as_str()), "{id}'s state on the page");
    }
    drop(chromium);
    tree.shutdown().await;
}

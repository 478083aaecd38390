//! The DAG promotion scenario of `examples/dag_promotion`, small, on each backend, with and
//! without chaos: every execution must reach the state its DAG implies. With the promoter off,
//! the reconciler alone must get there.

use std::time::Duration;

use ff_completions::BackendConfig;

use ff_completions_lab::dag as scenario;

use crate::support::init_tracing;

fn small(backend: BackendConfig, chaos: bool) -> scenario::Scenario {
    // Under chaos on a server, enough work to span several faults (one every 50 to 300 ms,
    // connection and listener kills taking turns) even on a fast backend.
    let flows = if chaos && backend.kind() != "sqlite" { 36 } else { 12 };
    scenario::Scenario {
        backend,
        flows,
        fan_out: 4,
        chain_len: 5,
        workers: 3,
        promoters: 2,
        fail_percent: 3,
        retry_percent: 10,
        cancel_percent: 2,
        seed: 11,
        chaos,
        promoter: true,
        reconcile_every: Duration::from_secs(1),
        progress: false,
        timeout: Duration::from_secs(120),
        trace: false,
        pace: Duration::ZERO,
        on_planned: None,
    }
}

async fn check(backend: BackendConfig, chaos: bool) {
    init_tracing();
    let on_a_server = backend.kind() != "sqlite";
    let backend_kind = backend.kind().to_owned();
    let report = scenario::run(&small(backend, chaos)).await.expect("scenario runs");
    assert!(report.mismatches.is_empty(), "{:?}", &report.mismatches[..report.mismatches.len().min(5)]);
    assert_eq!(report.events, report.executions as u64, "every execution's completion arrived once");
    assert!(report.exactly_once(), "duplicates {:?}, missing {:?}", report.duplicates, report.missing);
    assert_eq!(report.delivery_us.len(), report.executions as u64, "one delivery per completion");
    assert!(!report.promotion_us.is_empty() && report.promotion_us.len() <= report.promotions, "{report:?}");
    assert!(report.batches > 0 && report.batched_events == report.executions as u64, "{report:?}");
    assert!(report.promotions > 0 && report.skips > 0, "{report:?}");
    assert_eq!(report.by_outcome.values().sum::<u64>(), report.executions as u64);
    check_families(&report, &backend_kind, chaos);
    if chaos {
        assert!(report.chaos_faults > 0 && report.listener_restarts > 0, "{report:?}");
        if on_a_server {
            assert!(report.connection_kills > 0, "the listener's connection was killed too: {report:?}");
        } else {
            assert_eq!(report.connection_kills, 0, "SQLite has no connection to kill: {report:?}");
        }
    } else {
        assert_eq!(report.reconciler_fixed, 0, "the promoter missed nothing in a healthy run");
    }
}

/// The lease history and signal delivery the run caused arrived exactly once, in order, and
/// each kind occurred: every backend produces both families.
fn check_families(report: &scenario::Report, backend: &str, chaos: bool) {
    let Some(f) = &report.families else {
        panic!("{backend} produces lease history and signal delivery, yet the run skipped them");
    };
    assert!(f.exactly_once(), "lease and signal events each arrived once, in order: {f:?}");
    assert!(f.leases("acquired") > 0 && f.leases("renewed") > 0, "{f:?}");
    assert!(f.signals("satisfied") > 0 && f.signals("buffered") > 0 && f.signals("deduped") > 0, "{f:?}");
    if chaos {
        assert!(f.stalls > 0 && f.stale_refused == f.stalls, "the stalled worker's heartbeats were refused: {f:?}");
        assert!(f.leases("expired") > 0 && f.leases("reclaimed") > 0, "{f:?}");
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_scenario_verifies_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    check(BackendConfig::sqlite(dir.path().join("dag.db")), false).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_scenario_verifies_on_sqlite_under_chaos() {
    let dir = tempfile::tempdir().expect("temp dir");
    check(BackendConfig::sqlite(dir.path().join("dag.db")), true).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_promoter_the_reconciler_alone_drives_every_flow_to_its_final_state() {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let s = scenario::Scenario {
        flows: 3,
        fan_out: 2,
        chain_len: 2,
        fail_percent: 20,
        promoter: false,
        reconcile_every: Duration::from_millis(100),
        timeout: Duration::from_secs(60),
        ..small(BackendConfig::sqlite(dir.path().join("dag.db")), false)
    };
    let report = scenario::run(&s).await.expect("scenario runs");
    assert!(report.mismatches.is_empty(), "{:?}", &report.mismatches[..report.mismatches.len().min(5)]);
    assert_eq!(report.events, report.executions as u64, "every execution's completion arrived once");
    assert!(report.reconciler_fixed > 0, "the reconciler resolved the edges: {report:?}");
    assert!(report.promotions > 0 && report.skips > 0, "it both promoted and skipped: {report:?}");
    assert!(report.exactly_once(), "duplicates {:?}, missing {:?}", report.duplicates, report.missing);
    assert!(report.promotion_us.is_empty(), "no completion event promoted anything: {report:?}");
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_scenario_verifies_on_postgres() {
    check(BackendConfig::postgres(crate::support::postgres::fresh_database().await), false).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_scenario_verifies_on_postgres_under_chaos() {
    check(BackendConfig::postgres(crate::support::postgres::fresh_database().await), true).await;
}

#[cfg(feature = "valkey")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_scenario_verifies_on_valkey() {
    let server = crate::support::valkey::ValkeyServer::start().await;
    check(server.config(), false).await;
}

#[cfg(feature = "valkey")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_scenario_verifies_on_a_valkey_cluster() {
    let cluster = crate::support::valkey::ValkeyCluster::start(3).await;
    check(cluster.config(), false).await;
}

#[cfg(feature = "valkey")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_scenario_verifies_on_a_valkey_cluster_under_chaos() {
    let cluster = crate::support::valkey::ValkeyCluster::start(3).await;
    check(cluster.config(), true).await;
}

#[cfg(feature = "valkey")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_scenario_verifies_on_valkey_under_chaos() {
    let server = crate::support::valkey::ValkeyServer::start().await;
    check(server.config(), true).await;
}

/// The first flow's trace, kept in memory: each traced completion's producer span (`execute`),
/// the tree's delivery span (a child of it, linked to it) and the promoter's `promote` span of
/// its children (a child of it) share one trace. Current-thread runtime: every task and actor
/// of the run sees the test's own subscriber.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn one_trace_runs_from_a_parents_completion_through_its_delivery_to_the_childs_promotion() {
    use opentelemetry::trace::SpanKind;
    use tracing_subscriber::layer::SubscriberExt;

    let (provider, exporter) = scenario::trace::memory_provider();
    let subscriber = tracing_subscriber::registry().with(scenario::trace::layer(&provider));
    let _guard = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().expect("temp dir");
    let s = scenario::Scenario {
        flows: 2,
        fan_out: 2,
        chain_len: 1,
        fail_percent: 0,
        retry_percent: 0,
        cancel_percent: 0,
        trace: true,
        ..small(BackendConfig::sqlite(dir.path().join("dag.db")), false)
    };
    let report = scenario::run(&s).await.expect("scenario runs");
    assert!(report.mismatches.is_empty() && report.exactly_once(), "{report:?}");
    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();
    let (executes, deliveries, promotes) = (named("execute"), named("ff_completions.deliver"), named("promote"));
    // The first flow: root, two fanned out, the fan-in, one chained, two of the diamond and its
    // join, 8 executions (those the lease and signal part takes over complete untraced).
    assert!(!executes.is_empty() && executes.len() <= 8, "one producer span per traced completion");
    assert_eq!(promotes.len(), executes.len(), "each traced parent's children promoted in a span of its trace");
    let root = executes.iter().find(|e| e.parent_span_id == opentelemetry::trace::SpanId::INVALID).expect("a root");
    for promote in &promotes {
        let producer = executes
            .iter()
            .find(|e| e.span_context.span_id() == promote.parent_span_id)
            .expect("a promote span's parent is a producer's execute span");
        assert_eq!(promote.span_context.trace_id(), producer.span_context.trace_id(), "one trace");
    }
    for delivery in &deliveries {
        assert_eq!(delivery.span_kind, SpanKind::Consumer);
        let producer = executes
            .iter()
            .find(|e| e.span_context.span_id() == delivery.parent_span_id)
            .expect("a delivery span's parent is the producer's span");
        assert_eq!(delivery.span_context.trace_id(), producer.span_context.trace_id());
        let linked: Vec<_> = delivery.links.iter().map(|l| l.span_context.span_id()).collect();
        assert_eq!(linked, vec![producer.span_context.span_id()], "linked to the producer's span");
    }
    assert!(deliveries.len() >= executes.len(), "each traced completion delivered in a span: {}", deliveries.len());
    let root_trace = root.span_context.trace_id();
    assert!(
        promotes.iter().any(|p| p.span_context.trace_id() == root_trace),
        "the root's completion leads to its children's promotion in its own trace"
    );
}

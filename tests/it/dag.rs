//! The DAG promotion scenario of `examples/dag_promotion`, small, on each backend, with and
//! without chaos: every execution must reach the state its DAG implies.

use std::time::Duration;

use ff_completions::BackendConfig;

// The example's reporting helpers are not used here.
#[allow(dead_code)]
#[path = "../../examples/dag_promotion/scenario.rs"]
mod scenario;

use crate::support::init_tracing;

fn small(backend: BackendConfig, chaos: bool) -> scenario::Scenario {
    scenario::Scenario {
        backend,
        flows: 12,
        fan_out: 4,
        chain_len: 5,
        workers: 3,
        fail_percent: 3,
        retry_percent: 10,
        cancel_percent: 2,
        seed: 11,
        chaos,
        progress: false,
        timeout: Duration::from_secs(120),
    }
}

async fn check(backend: BackendConfig, chaos: bool) {
    init_tracing();
    let report = scenario::run(&small(backend, chaos)).await.expect("scenario runs");
    assert!(report.mismatches.is_empty(), "{:?}", &report.mismatches[..report.mismatches.len().min(5)]);
    assert_eq!(report.events, report.executions as u64, "every execution's completion arrived once");
    assert!(report.promotions > 0 && report.skips > 0, "{report:?}");
    assert_eq!(report.by_outcome.values().sum::<u64>(), report.executions as u64);
    if chaos {
        assert!(report.chaos_faults > 0 && report.listener_restarts > 0, "{report:?}");
    } else {
        assert_eq!(report.reconciler_fixed, 0, "the promoter missed nothing in a healthy run");
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
async fn dag_scenario_verifies_on_valkey_under_chaos() {
    let server = crate::support::valkey::ValkeyServer::start().await;
    check(server.config(), true).await;
}

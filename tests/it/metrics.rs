//! Metrics recorded through the `metrics` facade, read back with a debugging recorder.

use std::sync::OnceLock;
use std::time::Duration;

use ff_completions::{
    BackendConfig, CompletionSupervisorHandle, Engine, ExecutionSpec, FlowId, SubscribeRequest, SupervisorConfig,
    backends::postgres::PostgresEngine,
};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::support::{init_tracing, postgres::fresh_database, take_events, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// Keeps every counter and gauge, cumulative, readable at any time.
#[derive(Default)]
struct TestRecorder {
    values: Mutex<HashMap<Key, (bool, Arc<AtomicU64>)>>,
}

impl TestRecorder {
    fn slot(&self, key: &Key, is_gauge: bool) -> Arc<AtomicU64> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.entry(key.clone()).or_insert_with(|| (is_gauge, Arc::new(AtomicU64::new(0)))).1.clone()
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key, false))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key, true))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn recorder() -> &'static TestRecorder {
    static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(recorder).expect("install the test recorder once");
        recorder
    })
}

/// The value of a metric whose labels include all of `labels`.
fn value(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values = recorder().values.lock().unwrap_or_else(|p| p.into_inner());
    values.iter().find_map(|(key, (is_gauge, v))| {
        let matches = key.name() == name
            && labels.iter().all(|(k, want)| key.labels().any(|l| l.key() == *k && l.value() == *want));
        let raw = v.load(Ordering::Relaxed);
        matches.then(|| if *is_gauge { f64::from_bits(raw) } else { raw as f64 })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_filter_and_backend_metrics_are_recorded() {
    init_tracing();
    recorder();
    let url = fresh_database().await;
    let engine = PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("engine");
    let backend = "pg-metrics";
    let config = SupervisorConfig::new()
        .with_named_backend(backend, BackendConfig::postgres(&url))
        .with_subscriber_buffer(4)
        .with_gauge_interval(Duration::from_millis(50));
    let (tree, _) = CompletionSupervisorHandle::spawn(config).await.expect("spawn");
    let mut fast = tree.subscribe(SubscribeRequest::tail()).await.expect("fast");
    let slow = tree.subscribe(SubscribeRequest::tail()).await.expect("slow");
    let (fast_id, slow_id) = (fast.id().to_string(), slow.id().to_string());

    let flow = FlowId::new();
    engine.create_flow(&flow, None).await.expect("flow");
    let mut ids = Vec::new();
    for _ in 0..50 {
        let spec = ExecutionSpec::new(&flow);
        engine.create_execution(&spec).await.expect("create");
        ids.push(spec.id);
    }
    let mut claimed = 0;
    while claimed < ids.len() {
        claimed += engine.claim("w", 50).await.expect("claim").len();
    }
    for id in &ids {
        engine.complete(id).await.expect("complete");
    }
    take_events(&mut fast, 50, WAIT).await;

    let read = |name: &'static str, sub: Option<String>| {
        let backend = backend.to_owned();
        move || {
            let (backend, sub) = (backend.clone(), sub.clone());
            async move {
                let mut labels = vec![("backend", backend.as_str())];
                if let Some(s) = &sub {
                    labels.push(("subscriber", s.as_str()));
                }
                value(name, &labels).is_some()
            }
        }
    };
    wait_until(WAIT, "gauges", read("ff_completions_backend_gauge", None)).await;
    // A subscriber in catch-up reads on its own and can get ahead of the listener's reads.
    wait_until(WAIT, "50 events read by the listener", || async {
        value("ff_completions_events_read_total", &[("backend", backend)]) == Some(50.0)
    })
    .await;
    wait_until(WAIT, "50 events delivered to the fast subscriber", || async {
        value("ff_completions_events_delivered_total", &[("backend", backend), ("subscriber", &fast_id)]) == Some(50.0)
    })
    .await;
    assert_eq!(
        value("ff_completions_events_delivered_total", &[("backend", backend), ("subscriber", &slow_id)]),
        Some(4.0)
    );
    assert!(
        value("ff_completions_live_batches_dropped_total", &[("subscriber", &slow_id), ("backend", backend)])
            >= Some(1.0)
    );
    assert_eq!(
        value("ff_completions_subscriber_lag_events", &[("backend", backend), ("subscriber", &fast_id)]),
        Some(0.0)
    );
    assert!(value("ff_completions_subscriber_lag_ms", &[("backend", backend), ("subscriber", &fast_id)]).is_some());
    assert!(
        value("ff_completions_backend_gauge", &[("backend", backend), ("name", "notification_queue_usage")]).is_some()
    );

    // An open transaction holding rows back shows in the held-back gauge.
    let spec = ExecutionSpec::new(&flow);
    engine.create_execution(&spec).await.expect("create");
    engine.claim("w", 1).await.expect("claim");
    let mut tx = engine.pool().begin().await.expect("begin");
    let _: bool = sqlx::query_scalar("SELECT ff_complete_execution($1)")
        .bind(spec.id.uuid())
        .fetch_one(&mut *tx)
        .await
        .expect("A");
    let more = ExecutionSpec::new(&flow);
    engine.create_execution(&more).await.expect("create");
    engine.claim("w", 1).await.expect("claim");
    engine.complete(&more.id).await.expect("complete");
    wait_until(WAIT, "held-back gauge", || async {
        value("ff_completions_held_back", &[("backend", backend)]) == Some(1.0)
    })
    .await;
    tx.commit().await.expect("commit");
    take_events(&mut fast, 2, WAIT).await;
    wait_until(WAIT, "held-back gauge cleared", || async {
        value("ff_completions_held_back", &[("backend", backend)]) == Some(0.0)
    })
    .await;

    let cell = tree.listener_cell(backend).await.expect("listener");
    cell.kill();
    wait_until(WAIT, "restart counter", || async {
        value("ff_completions_listener_restarts_total", &[("backend", backend)]) >= Some(1.0)
    })
    .await;
    drop(slow);
}

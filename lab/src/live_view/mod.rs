//! A live view of a DAG run: an axum server that serves a completion subscription as
//! Server-Sent Events, each event's id its cursor, so a browser that reconnects (its
//! `EventSource` sends the last id it received as `Last-Event-ID`) resumes exactly after the
//! last event it has; and a page that draws the run's flows as they unfold.
//!
//! Routes: `/` the page (`page.html`), `/flows` the flows' shape (JSON, empty until the run has
//! planned them), `/events` the stream: from `Last-Event-ID` when the browser sends one, else
//! from the run's start position. Each event is `event: completion`, `id: <cursor hex>`,
//! `data: {"execution_id", "flow_id", "outcome", "at_ms"}`; the first tells the browser to
//! reconnect after 200 ms.
//!
//! The page knows only the flows' shape and the completions: a node is waiting, eligible (every
//! parent succeeded), or in its terminal state (success, failed, cancelled, skipped). It counts
//! what it received per execution, so a duplicate after a reconnect shows.

pub mod browser;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use ff_completions::{CompletionEvent, CompletionSupervisorHandle, Completions, StreamCursor};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_util::task::AbortOnDropHandle;

use crate::dag::FlowShape;

/// The page.
pub const PAGE: &str = include_str!("page.html");

/// How soon a browser reconnects after losing the stream.
pub const RECONNECT: Duration = Duration::from_millis(200);

/// What the server shows: the run's flows, and the tree whose completions it streams.
pub struct LiveView {
    tree: CompletionSupervisorHandle,
    /// Where the run's completions start (a cursor read before the run).
    start: StreamCursor,
    flows: RwLock<Vec<FlowShape>>,
    /// Streams opened from a browser's `Last-Event-ID`.
    resumed: AtomicU64,
}

impl LiveView {
    /// A view of the completions after `start` on `tree`; no flows until [`Self::set_flows`].
    pub fn new(tree: CompletionSupervisorHandle, start: StreamCursor) -> Arc<Self> {
        Arc::new(Self { tree, start, flows: RwLock::new(Vec::new()), resumed: AtomicU64::new(0) })
    }

    /// The run's flows, as it planned them.
    pub fn set_flows(&self, flows: Vec<FlowShape>) {
        *self.flows.write().unwrap_or_else(|p| p.into_inner()) = flows;
    }

    /// How many streams were opened from a browser's `Last-Event-ID` (reconnections).
    pub fn resumed(&self) -> u64 {
        self.resumed.load(Ordering::Relaxed)
    }

    /// The routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/", get(|| async { Html(PAGE) }))
            .route("/flows", get(flows))
            .route("/events", get(events))
            .with_state(self.clone())
    }

    /// Serves the routes on `listener` until the returned handle is dropped. Each connection
    /// sends its events at once (`TCP_NODELAY`: no 40 ms wait for the browser's delayed ACK).
    pub fn serve(self: &Arc<Self>, listener: TcpListener) -> AbortOnDropHandle<()> {
        let app = self.router();
        let listener = listener.tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::warn!(error = %err, "live view: TCP_NODELAY not set");
            }
        });
        AbortOnDropHandle::new(tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(error = %err, "live view server stopped");
            }
        }))
    }
}

async fn flows(State(view): State<Arc<LiveView>>) -> Json<Vec<FlowShape>> {
    Json(view.flows.read().unwrap_or_else(|p| p.into_inner()).clone())
}

/// The stream, from `Last-Event-ID` (a reconnecting browser) or the run's start.
async fn events(State(view): State<Arc<LiveView>>, headers: HeaderMap) -> Response {
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
    let from = match resume.map(StreamCursor::from_hex).transpose() {
        Ok(Some(from)) => {
            view.resumed.fetch_add(1, Ordering::Relaxed);
            from
        }
        Ok(None) => view.start.clone(),
        Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
    };
    match view.tree.subscribe(Completions::from_cursor(from)).await {
        Ok(sub) => {
            let hello = futures::stream::once(async { Event::default().retry(RECONNECT).comment("live view") });
            let events = hello.chain(sub.map(to_sse)).map(Ok::<_, std::convert::Infallible>);
            let sse: Sse<_> = Sse::new(events).keep_alive(KeepAlive::default());
            ([(header::CACHE_CONTROL, "no-store")], sse).into_response()
        }
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err.to_string()).into_response(),
    }
}

/// One completion as an SSE event, its cursor as the id (an error ends the page's view).
fn to_sse(item: Result<CompletionEvent, ff_completions::Error>) -> Event {
    match item {
        Ok(event) => {
            let data = serde_json::json!({
                "execution_id": event.execution_id.to_string(),
                "flow_id": event.flow_id.map(|f| f.to_string()),
                "outcome": event.outcome.as_wire(),
                "at_ms": event.at.0,
            });
            Event::default().event("completion").id(event.cursor.to_hex()).data(data.to_string())
        }
        Err(err) => Event::default().event("failed").data(err.to_string()),
    }
}

/// A TCP proxy in front of the server whose connections can all be cut at once (the browser
/// test's way to kill the SSE connection mid-run; new connections are served as before).
pub struct Proxy {
    /// Where browsers connect.
    pub addr: std::net::SocketAddr,
    connections: Arc<std::sync::Mutex<Vec<AbortOnDropHandle<()>>>>,
    _accept: AbortOnDropHandle<()>,
}

impl Proxy {
    /// A proxy to `upstream` on a free loopback port.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start(upstream: std::net::SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let connections: Arc<std::sync::Mutex<Vec<AbortOnDropHandle<()>>>> = Arc::default();
        let kept = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let pipe = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                kept.lock().unwrap_or_else(|p| p.into_inner()).push(AbortOnDropHandle::new(pipe));
            }
        });
        Ok(Self { addr, connections, _accept: AbortOnDropHandle::new(accept) })
    }

    /// Cuts every open connection (both sockets closed); returns how many.
    pub fn cut_all(&self) -> usize {
        let cut = std::mem::take(&mut *self.connections.lock().unwrap_or_else(|p| p.into_inner()));
        let open = cut.iter().filter(|c| !c.is_finished()).count();
        drop(cut);
        open
    }
}

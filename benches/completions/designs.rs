//! The three ways a subscriber can learn of completions, measured side by side:
//!
//! - **ours**: subscriptions on one `CompletionSupervisor` (one listener per backend, one
//!   filter per subscriber);
//! - **seed**: the original Postgres design, written again here for the bench: every
//!   subscriber owns a `PgListener` connection and, on each notification, drains
//!   `event_id > last_seen` pages of 256 from a shared pool of 10 connections into its
//!   1024-slot channel;
//! - **floor**: no actors and no filtering, one bare loop: `LISTEN` plus a read of the rows
//!   that woke it (Postgres), or `XREAD BLOCK` (Valkey). Nothing can learn of a commit
//!   faster; it is the floor every design is compared with.

use std::sync::Arc;
use std::time::Duration;

use ff_completions::{CompletionSupervisorHandle, Completions, ExecutionId, StreamCursor, SupervisorConfig};
use futures::StreamExt;
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgListener, PgPool};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::bed::{Kind, Run};
use crate::measure::Tally;

/// A subscriber design.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Design {
    Ours,
    Seed,
    Floor,
}

impl Design {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ours => "ours",
            Self::Seed => "seed",
            Self::Floor => "floor",
        }
    }

    /// Whether the bench has this design for `kind`.
    pub fn applies_to(self, kind: Kind) -> bool {
        match self {
            Self::Ours => true,
            Self::Seed => kind == Kind::Postgres,
            // No one-command floor on a cluster: XREAD cannot span slots.
            Self::Floor => matches!(kind, Kind::Postgres | Kind::Valkey),
        }
    }
}

/// Running subscribers of one design, each counting into its tally.
pub struct Subscribers {
    pub tallies: Vec<Arc<Tally>>,
    tasks: Vec<JoinHandle<()>>,
    tree: Option<CompletionSupervisorHandle>,
    pool: Option<PgPool>,
}

impl Subscribers {
    /// Starts `n` subscribers at the tail; they are registered when this returns.
    pub async fn start(design: Design, run: &Run, n: usize, keep: bool) -> Self {
        Self::start_at(design, run, n, keep, StreamCursor::empty()).await
    }

    /// Starts `n` subscribers of `design` from `cursor` (ours) or the tail (the others).
    pub async fn start_at(design: Design, run: &Run, n: usize, keep: bool, cursor: StreamCursor) -> Self {
        let tallies: Vec<Arc<Tally>> = (0..n).map(|_| Arc::new(Tally::new(keep))).collect();
        let mut this = Self { tallies: tallies.clone(), tasks: Vec::new(), tree: None, pool: None };
        match design {
            Design::Ours => {
                let config = SupervisorConfig::new().with_backend(run.config.clone());
                let (tree, _join) = CompletionSupervisorHandle::spawn(config).await.expect("tree spawns");
                for tally in tallies {
                    let request = Completions::from_cursor(cursor.clone());
                    let mut events = tree.subscribe(request).await.expect("subscribe");
                    this.tasks.push(tokio::spawn(async move {
                        while let Some(Ok(event)) = events.next().await {
                            tally.record(event.execution_id.uuid());
                        }
                    }));
                }
                this.tree = Some(tree);
            }
            Design::Seed => {
                let url = run.pg_url.clone().expect("the seed design is Postgres only");
                let pool = run.pg_pool(10).await;
                for tally in tallies {
                    this.tasks.extend(seed_subscriber(&url, pool.clone(), tally).await);
                }
                this.pool = Some(pool);
            }
            Design::Floor => {
                let tally = tallies.into_iter().next().expect("one floor subscriber");
                this.tasks.push(match run.kind {
                    Kind::Postgres => pg_floor(run.pg_url.as_deref().expect("postgres"), tally).await,
                    _ => xread_floor(run.valkey_client_named(crate::bed::FLOOR_CLIENT).await, tally).await,
                });
            }
        }
        this
    }

    /// Stops every subscriber (and the tree).
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(tree) = self.tree {
            tree.shutdown().await;
        }
        if let Some(pool) = self.pool {
            pool.close().await;
        }
    }
}

const SEED_REPLAY_BATCH: i64 = 256;
/// The seed's row: event_id, execution_id, flow_id, outcome, namespace, instance_tag,
/// occurred_at_ms, partition_key.
type SeedRow = (i64, Uuid, Option<Uuid>, String, Option<String>, Option<String>, i64, i16);
const SEED_STREAM_CAPACITY: usize = 1024;

/// One subscriber of the seed design: its own LISTEN connection, its own query per wake.
async fn seed_subscriber(url: &str, pool: PgPool, tally: Arc<Tally>) -> [JoinHandle<()>; 2] {
    let mut last_seen: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(event_id), 0) FROM ff_completion_event")
        .fetch_one(&pool)
        .await
        .expect("max(event_id)");
    let mut listener = PgListener::connect(url).await.expect("listen connection");
    listener.listen("ff_completion").await.expect("LISTEN");
    let (tx, mut rx) = mpsc::channel::<Uuid>(SEED_STREAM_CAPACITY);
    let reader = tokio::spawn(async move {
        while listener.recv().await.is_ok() {
            loop {
                let rows: Vec<SeedRow> = match sqlx::query_as(
                    "SELECT event_id, execution_id, flow_id, outcome, namespace, instance_tag, occurred_at_ms, \
                         partition_key FROM ff_completion_event WHERE event_id > $1 ORDER BY event_id ASC LIMIT $2",
                )
                .bind(last_seen)
                .bind(SEED_REPLAY_BATCH)
                .fetch_all(&pool)
                .await
                {
                    Ok(rows) => rows,
                    Err(_) => break,
                };
                if rows.is_empty() {
                    break;
                }
                for (event_id, execution_id, ..) in rows {
                    last_seen = event_id;
                    if tx.send(execution_id).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let consumer = tokio::spawn(async move {
        while let Some(id) = rx.recv().await {
            tally.record(id);
        }
    });
    [reader, consumer]
}

/// The Postgres floor: LISTEN, and on each wake read the new rows' ids on one connection.
async fn pg_floor(url: &str, tally: Arc<Tally>) -> JoinHandle<()> {
    let mut conn = PgConnection::connect(url).await.expect("floor connection");
    let mut last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(event_id), 0) FROM ff_completion_event")
        .fetch_one(&mut conn)
        .await
        .expect("max(event_id)");
    let mut listener = PgListener::connect(url).await.expect("listen connection");
    listener.listen("ff_completion").await.expect("LISTEN");
    tokio::spawn(async move {
        while listener.recv().await.is_ok() {
            while let Ok(rows) = sqlx::query_as::<_, (i64, Uuid)>(
                "SELECT event_id, execution_id FROM ff_completion_event WHERE event_id > $1 ORDER BY event_id LIMIT 1000",
            )
            .bind(last)
            .fetch_all(&mut conn)
            .await
            {
                for (event_id, id) in &rows {
                    last = *event_id;
                    tally.record(*id);
                }
                if rows.len() < 1000 {
                    break;
                }
            }
        }
    })
}

/// The Valkey floor: `XREAD BLOCK` over every partition stream (one command: a single node
/// takes keys of any slots) on a connection of its own, from each stream's current last id.
async fn xread_floor(client: ferriskey::Client, tally: Arc<Tally>) -> JoinHandle<()> {
    let streams: Vec<String> = (0..256).map(ff_completions::valkey::stream_key).collect();
    let mut last = Vec::with_capacity(streams.len());
    for stream in &streams {
        let newest: ferriskey::Value = client
            .cmd("XREVRANGE")
            .arg(stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .execute()
            .await
            .expect("XREVRANGE");
        last.push(entries(&newest).last().map_or_else(|| "0-0".to_owned(), |(id, _)| id.clone()));
    }
    tokio::spawn(async move {
        loop {
            let mut cmd = client.cmd("XREAD").arg("COUNT").arg(1000).arg("BLOCK").arg(1000).arg("STREAMS");
            for stream in &streams {
                cmd = cmd.arg(stream.as_str());
            }
            for id in &last {
                cmd = cmd.arg(id.as_str());
            }
            let reply: Result<ferriskey::Value, _> = cmd.execute().await;
            let Ok(reply) = reply else { return };
            let replied = match reply {
                ferriskey::Value::Map(streams) => streams,
                _ => continue,
            };
            for (key, stream_entries) in &replied {
                let ferriskey::Value::BulkString(key) = key else { continue };
                let Some(i) = streams.iter().position(|s| s.as_bytes() == &key[..]) else { continue };
                for (id, execution) in entries(stream_entries) {
                    if let Some(execution) = execution {
                        tally.record(execution);
                    }
                    last[i] = id;
                }
            }
        }
    })
}

/// `(id, execution uuid)` of each entry of an `XRANGE`/`XREAD` reply (map or array shape).
pub fn entries(reply: &ferriskey::Value) -> Vec<(String, Option<Uuid>)> {
    use ferriskey::Value;
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.to_vec()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let flat = |v: &Value| -> Vec<Value> {
        match v {
            Value::Array(items) => items.iter().filter_map(|i| i.as_ref().ok().cloned()).collect(),
            _ => Vec::new(),
        }
    };
    let execution_of = |fields: &Value| -> Option<Uuid> {
        let mut all: Vec<Value> = Vec::new();
        for item in flat(fields) {
            match item {
                Value::Array(_) => all.extend(flat(&item)),
                other => all.push(other),
            }
        }
        let at = all.iter().position(|v| text(v).as_deref() == Some("execution_id"))?;
        let value = text(all.get(at + 1)?)?;
        ExecutionId::parse(&value).ok().map(|id| id.uuid())
    };
    match reply {
        Value::Map(pairs) => pairs.iter().filter_map(|(id, f)| Some((text(id)?, execution_of(f)))).collect(),
        Value::Array(_) => flat(reply)
            .iter()
            .filter_map(|entry| match flat(entry).as_slice() {
                [id, f] => Some((text(id)?, execution_of(f))),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// How long the designs get to settle after subscribing before producers start.
pub const SETTLE: Duration = Duration::from_millis(300);

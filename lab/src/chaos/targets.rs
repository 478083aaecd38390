//! The backends the chaos runner drives, each with the real faults it can suffer.

use std::sync::Arc;
use std::time::Duration;

use crate::{Engine, connect_engine};
use ff_completions::cursor::{
    LEASE_HISTORY_CURSOR_TAG, SIGNAL_DELIVERY_CURSOR_TAG, decode_postgres_cursor, decode_sqlite_cursor,
    decode_valkey_frontier,
};
use ff_completions::{
    BackendConfig, CompletionEvent, CompletionSupervisorHandle, ExecutionId, StreamCursor, SubscriberId,
};

use crate::Error;
use rand::Rng;
use rand::rngs::StdRng;

/// Every backend this runner knows (`valkey-cluster`: three primaries with append-only files).
pub const ALL: [&str; 4] = ["postgres", "valkey", "valkey-cluster", "sqlite"];

/// A backend under test, with its server when it has one.
pub enum Target {
    Postgres {
        server: crate::harness::postgres::PrivatePg,
        pool: sqlx::PgPool,
        killer: Box<crate::faults::ConnectionKiller>,
    },
    Sqlite {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    },
    Valkey {
        server: crate::harness::valkey::ValkeyServer,
    },
    ValkeyCluster {
        cluster: crate::harness::valkey::ValkeyCluster,
    },
}

impl Target {
    pub async fn start(kind: &str) -> Self {
        match kind {
            "postgres" => {
                let server = crate::harness::postgres::PrivatePg::start().await;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(2))
                    .connect(&server.url())
                    .await
                    .expect("pool");
                sqlx::query("CREATE DATABASE chaos_bystander").execute(&pool).await.expect("a second database");
                let killer = Box::new(crate::faults::ConnectionKiller::new(&BackendConfig::postgres(server.url())));
                Self::Postgres { server, pool, killer }
            }
            "sqlite" => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("chaos.db");
                Self::Sqlite { _dir: dir, path }
            }
            "valkey" => Self::Valkey { server: crate::harness::valkey::ValkeyServer::start_persistent().await },
            "valkey-cluster" => {
                Self::ValkeyCluster { cluster: crate::harness::valkey::ValkeyCluster::start_persistent(3).await }
            }
            other => panic!("unknown backend {other:?} (use postgres, valkey, valkey-cluster, sqlite or all)"),
        }
    }

    pub fn config(&self) -> BackendConfig {
        match self {
            Self::Postgres { server, .. } => BackendConfig::postgres(server.url()),
            Self::Sqlite { path, .. } => BackendConfig::sqlite(path.clone()),
            Self::Valkey { server } => server.config(),
            Self::ValkeyCluster { cluster } => cluster.config(),
        }
    }

    pub async fn engine(&self) -> Arc<dyn Engine> {
        connect_engine(&self.config()).await.expect("engine")
    }

    /// The event's lane and its place in that lane's order (Valkey orders per partition: the
    /// lane is the event's partition, the place its stream id, read from the event's cursor).
    pub fn position(&self, event: &CompletionEvent) -> (u16, (u64, u64, u64)) {
        self.position_of(&event.execution_id, &event.cursor)
    }

    /// [`Self::position`] of a lease-history or signal-delivery event: its cursor is the
    /// backend's position with the family's tag after the backend byte.
    pub fn family_position(&self, execution: &ExecutionId, cursor: &StreamCursor) -> (u16, (u64, u64, u64)) {
        let mut bytes = cursor.as_bytes().to_vec();
        if bytes.len() > 1 && [LEASE_HISTORY_CURSOR_TAG, SIGNAL_DELIVERY_CURSOR_TAG].contains(&bytes[1]) {
            bytes.remove(1);
        }
        self.position_of(execution, &StreamCursor::new(bytes))
    }

    fn position_of(&self, execution: &ExecutionId, cursor: &StreamCursor) -> (u16, (u64, u64, u64)) {
        let decoded = match self {
            Self::Postgres { .. } => decode_postgres_cursor(cursor)
                .map(|c| c.map(|c| (0, (c.batch.unwrap_or(0), c.txid.unwrap_or(0), c.event_id as u64)))),
            Self::Sqlite { .. } => decode_sqlite_cursor(cursor).map(|c| c.map(|id| (0, (0, 0, id as u64)))),
            Self::Valkey { .. } | Self::ValkeyCluster { .. } => {
                let lane = execution.partition();
                decode_valkey_frontier(cursor).map(|c| {
                    c.and_then(|lanes| lanes.into_iter().find(|l| l.0 == lane)).map(|(_, ms, seq)| (lane, (0, ms, seq)))
                })
            }
        };
        decoded.ok().flatten().unwrap_or((0, (0, 0, 0)))
    }

    /// Completes inside a transaction held open for `hold` (Postgres): its completion arrives
    /// after what committed meanwhile, which it never holds back.
    pub async fn complete_held_open(
        &self,
        engine: &Arc<dyn Engine>,
        id: &ExecutionId,
        hold: Duration,
    ) -> Result<bool, Error> {
        let Self::Postgres { pool, .. } = self else { return engine.complete(id).await };
        let err = |e| Error::from(TransportError(e));
        let mut tx = pool.begin().await.map_err(err)?;
        let done: bool = sqlx::query_scalar("SELECT ff_complete_execution($1)")
            .bind(id.uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        tokio::time::sleep(hold).await;
        tx.commit().await.map_err(err)?;
        Ok(done)
    }

    /// Completes inside a transaction that rolls back (a hole in the ids), then for real.
    pub async fn complete_rolled_back_then_again(
        &self,
        engine: &Arc<dyn Engine>,
        id: &ExecutionId,
    ) -> Result<bool, Error> {
        if let Self::Postgres { pool, .. } = self {
            let err = |e| Error::from(TransportError(e));
            let mut tx = pool.begin().await.map_err(err)?;
            let _: bool = sqlx::query_scalar("SELECT ff_complete_execution($1)")
                .bind(id.uuid())
                .fetch_one(&mut *tx)
                .await
                .map_err(err)?;
            tx.rollback().await.map_err(err)?;
        }
        engine.complete(id).await
    }

    /// Injects one fault chosen by `rng`; returns its name.
    pub async fn inject(
        &self,
        tree: &CompletionSupervisorHandle,
        subs: &[SubscriberId],
        rng: &mut StdRng,
    ) -> &'static str {
        let backend = self.config().kind();
        match rng.random_range(0..11) {
            0..=2 => match tree.listener_cell(backend).await {
                Some(cell) => {
                    cell.kill();
                    "kill listener"
                }
                None => "listener already down",
            },
            3..=4 => match tree.filter_cell(subs[rng.random_range(0..subs.len())]).await {
                Some(cell) => {
                    cell.kill();
                    "kill filter"
                }
                None => "filter already down",
            },
            5..=7 => self.kill_connection().await,
            8..=9 => self.crash_server().await,
            _ => self.hold_unrelated_transactions(Duration::from_millis(rng.random_range(1000..5000))).await,
        }
    }

    /// Leaves two transactions that write nothing the reader reads open for `hold`: one in
    /// another database of the cluster, one idle in transaction in this one (Postgres).
    async fn hold_unrelated_transactions(&self, hold: Duration) -> &'static str {
        let Self::Postgres { server, .. } = self else { return "no unrelated transactions (no Postgres)" };
        let (here, elsewhere) = (server.url(), server.url().replace("/postgres", "/chaos_bystander"));
        tokio::spawn(async move {
            use sqlx::Connection;
            let (Ok(mut a), Ok(mut b)) =
                (sqlx::PgConnection::connect(&here).await, sqlx::PgConnection::connect(&elsewhere).await)
            else {
                return;
            };
            for conn in [&mut a, &mut b] {
                let _ = sqlx::query("BEGIN").execute(&mut *conn).await;
                let _ = sqlx::query("SELECT pg_current_xact_id()").execute(&mut *conn).await;
            }
            tokio::time::sleep(hold).await;
            for conn in [&mut a, &mut b] {
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            }
        });
        "hold unrelated transactions open"
    }

    async fn kill_connection(&self) -> &'static str {
        match self {
            Self::Postgres { killer, .. } => {
                let killed = killer.kill().await;
                if killed.is_ok() { "terminate LISTEN connection" } else { "terminate failed (server down)" }
            }
            Self::Valkey { server } => {
                if server.kill_listener_connections().await > 0 {
                    "CLIENT KILL listener"
                } else {
                    "no listener connection"
                }
            }
            Self::ValkeyCluster { cluster } => {
                // The subscriber connection lives on one primary, unknown here: try them all.
                let mut killed = 0;
                for node in &cluster.nodes {
                    killed += node.kill_listener_connections().await;
                }
                if killed > 0 { "CLIENT KILL listener" } else { "no listener connection" }
            }
            Self::Sqlite { .. } => "no connection to kill (embedded)",
        }
    }

    async fn crash_server(&self) -> &'static str {
        match self {
            Self::Postgres { server, .. } => {
                server.kill9().await;
                server.restart().await;
                "SIGKILL + restart server"
            }
            Self::Valkey { server } => {
                server.kill9_and_restart().await;
                "SIGKILL + restart server"
            }
            Self::ValkeyCluster { cluster } => {
                // The primary of slot 0, the seed node: clients made meanwhile must wait for it.
                cluster.nodes[0].kill9_and_restart().await;
                cluster.wait_until_ok().await;
                "SIGKILL + restart a primary"
            }
            Self::Sqlite { .. } => "no server to crash (embedded)",
        }
    }
}

/// Wraps a raw sqlx error from the runner's own transactions.
struct TransportError(sqlx::Error);

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        ff_completions::Error::Transport { op: "chaos transaction", detail: e.0.to_string(), source: None }.into()
    }
}

//! Faults injected from outside the completion tree, the way an operator or a network would:
//! killing the listener's notification connection (`pg_terminate_backend` on Postgres,
//! `CLIENT KILL` on Valkey; SQLite has none), and the example's `--chaos` task that takes turns
//! killing that connection and the listener actor.
//!
//! One copy for the example, the integration tests, the chaos runner and the bench, so what the
//! example does under `--chaos` is exactly what the tests check the tree survives.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ff_completions::{BackendConfig, CompletionSupervisorHandle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Kills the listener's notification connection of one backend. Its own admin connection is
/// made on first use and again after an error.
pub struct ConnectionKiller {
    backend: BackendConfig,
    admin: tokio::sync::Mutex<Option<Admin>>,
}

enum Admin {
    Postgres(sqlx::PgPool),
    Valkey(ferriskey::Client),
}

impl ConnectionKiller {
    pub fn new(backend: &BackendConfig) -> Self {
        Self { backend: backend.clone(), admin: tokio::sync::Mutex::new(None) }
    }

    /// The backend has a notification connection to kill (servers do, SQLite does not).
    pub fn has_connection(&self) -> bool {
        matches!(
            self.backend.connection,
            ff_completions::BackendConnection::Postgres(_) | ff_completions::BackendConnection::Valkey(_)
        )
    }

    /// Kills every listener connection of the backend (on Postgres, of its database); returns
    /// how many. On error the admin connection is dropped, to be made again next time.
    pub async fn kill(&self) -> Result<u64, String> {
        let mut admin = self.admin.lock().await;
        if admin.is_none() {
            *admin = self.connect().await?;
        }
        let result = match admin.as_ref() {
            None => Ok(0),
            Some(Admin::Postgres(pool)) => terminate_postgres_listeners(pool).await,
            Some(Admin::Valkey(client)) => kill_valkey_listeners(&self.backend, client).await,
        };
        if result.is_err() {
            *admin = None;
        }
        result
    }

    async fn connect(&self) -> Result<Option<Admin>, String> {
        match &self.backend.connection {
            ff_completions::BackendConnection::Postgres(pg) => Ok(Some(Admin::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(&pg.url)
                    .await
                    .map_err(|e| format!("connect to postgres: {e}"))?,
            ))),
            ff_completions::BackendConnection::Valkey(_) => Ok(Some(Admin::Valkey(
                ff_completions::valkey::connect_client(&self.backend, "ff-completions-faults")
                    .await
                    .map_err(|e| format!("connect to valkey: {e}"))?,
            ))),
            #[allow(unreachable_patterns)]
            _ => Ok(None),
        }
    }
}

/// `pg_terminate_backend` of every session of this database named like the listener's LISTEN
/// connection.
async fn terminate_postgres_listeners(pool: &sqlx::PgPool) -> Result<u64, String> {
    // Materialized first, so the filter on the name runs before any backend is terminated.
    let killed: i64 = sqlx::query_scalar(
        "WITH listeners AS MATERIALIZED (SELECT pid FROM pg_stat_activity \
                                          WHERE application_name = $1 AND datname = current_database()) \
         SELECT count(*) FROM listeners WHERE pg_terminate_backend(pid)",
    )
    .bind(ff_completions::postgres::LISTENER_APPLICATION_NAME)
    .fetch_one(pool)
    .await
    .map_err(|e| format!("pg_terminate_backend: {e}"))?;
    Ok(killed.max(0) as u64)
}

/// `CLIENT KILL ID` of every connection named like the listener's subscriber connection
/// ([`LISTENER_CLIENT_NAME`](ff_completions::valkey::LISTENER_CLIENT_NAME)), found
/// with `CLIENT LIST`; on a cluster, on every primary `CLUSTER NODES` names (`CLIENT` commands
/// are not routed to a chosen node by ferriskey's cluster client, so each gets a client of
/// its own).
async fn kill_valkey_listeners(backend: &BackendConfig, client: &ferriskey::Client) -> Result<u64, String> {
    let ff_completions::BackendConnection::Valkey(v) = &backend.connection else { return Ok(0) };
    if !v.cluster {
        return kill_valkey_listeners_on(client).await;
    }
    let nodes: String =
        client.cmd("CLUSTER").arg("NODES").execute().await.map_err(|e| format!("CLUSTER NODES: {e}"))?;
    let mut killed = 0;
    for line in nodes.lines().filter(|l| l.contains("master") && !l.contains("fail")) {
        let Some((host, port)) = line
            .split_whitespace()
            .nth(1)
            .and_then(|addr| addr.split('@').next())
            .and_then(|addr| addr.rsplit_once(':'))
            .and_then(|(host, port)| Some((host.to_owned(), port.parse::<u16>().ok()?)))
        else {
            continue;
        };
        let node = BackendConfig::valkey_with(
            ff_completions::ValkeyConnection::new(host, port)
                .with_credentials(v.username.clone(), v.password.clone())
                .with_tls(v.tls),
        );
        let node_client = ff_completions::valkey::connect_client(&node, "ff-completions-faults")
            .await
            .map_err(|e| format!("connect to a cluster node: {e}"))?;
        killed += kill_valkey_listeners_on(&node_client).await?;
    }
    Ok(killed)
}

/// [`kill_valkey_listeners`] on the one server `client` talks to.
async fn kill_valkey_listeners_on(client: &ferriskey::Client) -> Result<u64, String> {
    let list: String = client.cmd("CLIENT").arg("LIST").execute().await.map_err(|e| format!("CLIENT LIST: {e}"))?;
    let name = format!("name={}", ff_completions::valkey::LISTENER_CLIENT_NAME);
    let ids: Vec<&str> = list
        .lines()
        .filter(|line| line.split_whitespace().any(|kv| kv == name))
        .filter_map(|line| line.split_whitespace().find_map(|kv| kv.strip_prefix("id=")))
        .collect();
    let mut killed = 0;
    for id in ids {
        // The reply counts the clients killed: 0 when the connection closed meanwhile.
        let n: i64 = client
            .cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .execute()
            .await
            .map_err(|e| format!("CLIENT KILL ID {id}: {e}"))?;
        killed += n.max(0) as u64;
    }
    Ok(killed)
}

/// What the chaos task did.
#[derive(Debug, Default)]
pub struct ChaosCount {
    pub listener_kills: u64,
    pub connection_kills: u64,
}

/// Until `stop`, one fault after a random 50 to 300 ms or a random 20 to 80 completions (as
/// `completed` counts them), whichever comes first (both from the seed), so even a run that
/// ends in half a second takes several faults. On servers the faults take turns, the listener's
/// connection first, then the listener actor; on SQLite, which has no such connection, every
/// fault kills the actor.
pub async fn chaos(
    tree: CompletionSupervisorHandle,
    backend: BackendConfig,
    seed: u64,
    completed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> ChaosCount {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc4a05);
    let mut count = ChaosCount::default();
    let killer = ConnectionKiller::new(&backend);
    let has_connection = killer.has_connection();
    let mut connection_next = has_connection;
    loop {
        let due = Instant::now() + Duration::from_millis(rng.random_range(50..300));
        let due_at_completion = completed.load(Ordering::Relaxed) + rng.random_range(20..80);
        while Instant::now() < due
            && completed.load(Ordering::Relaxed) < due_at_completion
            && !stop.load(Ordering::Relaxed)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if connection_next {
            match killer.kill().await {
                Ok(n) => count.connection_kills += n,
                Err(err) => tracing::warn!(error = %err, "chaos could not kill the listener's connection"),
            }
        } else if let Some(cell) = tree.listener_cell(backend.kind()).await {
            cell.kill();
            count.listener_kills += 1;
        }
        connection_next = has_connection && !connection_next;
    }
    count
}

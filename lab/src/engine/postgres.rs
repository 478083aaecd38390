//! The Postgres demo engine: thin calls of the SQL functions in `lab/migrations/postgres/`
//! (ledger [`DEMO_MIGRATION_LEDGER`]), applied after the subsystem's own. Every operation that
//! may write a completion, a lease-history or a signal-delivery event asks for an after-commit
//! wake-up ([`CommitWake`]), as a host's producers may.

use std::sync::LazyLock;

use async_trait::async_trait;
use ff_completions::postgres::{CommitWake, connect_pool};
use ff_completions::{
    BackendConfig, ExecutionId, FlowId, Namespace, SignalDeliveryEffect, SignalId, TimestampMs, TraceParent,
    WaitpointId,
};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::{
    CancelFlowPolicy, DependencyResolution, Engine, ExecutionInfo, ExecutionSpec, FailOutcome, LEASE_DURATION,
    ResolvedEdge,
};
use crate::error::Error;

/// The ledger of the demo engine's migrations.
pub const DEMO_MIGRATION_LEDGER: &str = "ff_completions_demo_migrations";

/// The demo engine's embedded migrations (`lab/migrations/postgres/`), with their own ledger.
pub static DEMO_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("migrations/postgres");
    migrator.dangerous_set_table_name(DEMO_MIGRATION_LEDGER);
    migrator
});

/// The lease a claim or a heartbeat grants, in the producer functions' milliseconds.
const LEASE_MS: i64 = LEASE_DURATION.as_millis() as i64;

/// Drives executions through the Postgres producer functions.
#[derive(Clone, Debug)]
pub struct PostgresEngine {
    pool: PgPool,
    wake: CommitWake,
}

fn sql_err(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::from_sqlx(op, e)
}

fn exec_id(uuid: Uuid, partition: i16) -> Result<ExecutionId, Error> {
    let p = u16::try_from(partition).map_err(|_| Error::validation(format!("partition {partition} out of range")))?;
    Ok(ExecutionId::from_parts(p, uuid))
}

impl PostgresEngine {
    /// Connects a pool of 16 and applies the subsystem's and the demo engine's migrations.
    ///
    /// # Errors
    /// Connection or migration failures.
    pub async fn connect(config: &BackendConfig) -> Result<Self, Error> {
        let pool = connect_pool(config, 16).await?;
        DEMO_MIGRATOR.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => Error::from_sqlx("postgres demo migrate", e),
            other => {
                ff_completions::Error::Schema { op: "postgres demo migrate", detail: other.to_string(), source: None }
                    .into()
            }
        })?;
        Ok(Self { wake: CommitWake::spawn(pool.clone()), pool })
    }

    /// Wakes the listeners after completions you committed yourself through [`Self::pool`].
    pub fn wake_listeners(&self) {
        self.wake.wake();
    }

    /// The underlying pool, for transactions that combine engine calls with your own writes.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn call_bool(&self, sql: &'static str, op: &'static str, id: &ExecutionId) -> Result<bool, Error> {
        let changed = sqlx::query_scalar(sql).bind(id.uuid()).fetch_one(&self.pool).await.map_err(sql_err(op))?;
        if changed {
            self.wake.wake();
        }
        Ok(changed)
    }
}

#[async_trait]
impl Engine for PostgresEngine {
    async fn create_flow(&self, flow: &FlowId, namespace: Option<&Namespace>) -> Result<(), Error> {
        super::check_namespace(namespace)?;
        sqlx::query("SELECT ff_create_flow($1, $2)")
            .bind(flow.uuid())
            .bind(namespace.map(Namespace::as_str))
            .execute(&self.pool)
            .await
            .map_err(sql_err("ff_create_flow"))?;
        Ok(())
    }

    async fn create_execution(&self, spec: &ExecutionSpec) -> Result<(), Error> {
        spec.validate()?;
        let tags = serde_json::to_value(&spec.tags).map_err(|e| Error::validation(e.to_string()))?;
        let parents: Vec<Uuid> = spec.parents.iter().map(|p| p.uuid()).collect();
        sqlx::query("SELECT ff_create_execution($1, $2, $3, $4, $5, $6, $7)")
            .bind(spec.id.uuid())
            .bind(spec.id.partition() as i16)
            .bind(spec.flow_id.map(|f| f.uuid()))
            .bind(spec.namespace.as_ref().map(Namespace::as_str))
            .bind(sqlx::types::Json(tags))
            .bind(parents)
            .bind(spec.max_attempts as i32)
            .execute(&self.pool)
            .await
            .map_err(sql_err("ff_create_execution"))?;
        Ok(())
    }

    async fn claim(&self, worker: &str, limit: usize) -> Result<Vec<ExecutionId>, Error> {
        let rows: Vec<(Uuid, i16)> =
            sqlx::query_as("SELECT execution_id, partition_key FROM ff_claim_executions($1, $2, $3)")
                .bind(worker)
                .bind(limit as i32)
                .bind(LEASE_MS)
                .fetch_all(&self.pool)
                .await
                .map_err(sql_err("ff_claim_executions"))?;
        // Each claim opened a lease: its `acquired` or `reclaimed` event.
        if !rows.is_empty() {
            self.wake.wake();
        }
        rows.into_iter().map(|(u, p)| exec_id(u, p)).collect()
    }

    async fn complete(&self, id: &ExecutionId) -> Result<bool, Error> {
        self.call_bool("SELECT ff_complete_execution($1)", "ff_complete_execution", id).await
    }

    async fn complete_traced(&self, id: &ExecutionId, traceparent: &TraceParent) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await.map_err(sql_err("ff_complete_execution"))?;
        sqlx::query("SELECT set_config('ff_demo.traceparent', $1, true)")
            .bind(traceparent.to_string())
            .execute(&mut *tx)
            .await
            .map_err(sql_err("ff_complete_execution"))?;
        let changed: bool = sqlx::query_scalar("SELECT ff_complete_execution($1)")
            .bind(id.uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(sql_err("ff_complete_execution"))?;
        tx.commit().await.map_err(sql_err("ff_complete_execution"))?;
        if changed {
            self.wake.wake();
        }
        Ok(changed)
    }

    async fn fail(&self, id: &ExecutionId, retryable: bool) -> Result<FailOutcome, Error> {
        let outcome: String = sqlx::query_scalar("SELECT ff_fail_execution($1, $2)")
            .bind(id.uuid())
            .bind(retryable)
            .fetch_one(&self.pool)
            .await
            .map_err(sql_err("ff_fail_execution"))?;
        match outcome.as_str() {
            "retry_scheduled" => Ok(FailOutcome::RetryScheduled { delay_until: TimestampMs::now() }),
            "terminal_failed" => {
                self.wake.wake();
                Ok(FailOutcome::TerminalFailed)
            }
            other => Err(Error::State { detail: format!("fail {id}: {other}") }),
        }
    }

    async fn cancel(&self, id: &ExecutionId) -> Result<bool, Error> {
        self.call_bool("SELECT ff_cancel_execution($1)", "ff_cancel_execution", id).await
    }

    async fn expire(&self, id: &ExecutionId) -> Result<bool, Error> {
        self.call_bool("SELECT ff_expire_execution($1)", "ff_expire_execution", id).await
    }

    async fn cancel_flow(&self, flow: &FlowId, policy: CancelFlowPolicy) -> Result<u64, Error> {
        let n: i32 = sqlx::query_scalar("SELECT ff_cancel_flow($1, $2)")
            .bind(flow.uuid())
            .bind(policy.as_wire())
            .fetch_one(&self.pool)
            .await
            .map_err(sql_err("ff_cancel_flow"))?;
        if n > 0 {
            self.wake.wake();
        }
        Ok(n.max(0) as u64)
    }

    async fn resolve_dependency(
        &self,
        parent: &ExecutionId,
        child: &ExecutionId,
    ) -> Result<DependencyResolution, Error> {
        let result: String = sqlx::query_scalar("SELECT ff_resolve_dependency($1, $2)")
            .bind(parent.uuid())
            .bind(child.uuid())
            .fetch_one(&self.pool)
            .await
            .map_err(sql_err("ff_resolve_dependency"))?;
        let resolution = DependencyResolution::from_wire(&result)?;
        if resolution == DependencyResolution::Skipped {
            self.wake.wake();
        }
        Ok(resolution)
    }

    async fn children(&self, parent: &ExecutionId) -> Result<Vec<ExecutionId>, Error> {
        let rows: Vec<(Uuid, i16)> = sqlx::query_as(
            "SELECT d.child_id, e.partition_key FROM ff_dependency d JOIN ff_execution e ON e.execution_id = d.child_id \
             WHERE d.parent_id = $1",
        )
        .bind(parent.uuid())
        .fetch_all(&self.pool)
        .await
        .map_err(sql_err("children"))?;
        rows.into_iter().map(|(u, p)| exec_id(u, p)).collect()
    }

    async fn resolve_children(&self, parents: &[ExecutionId]) -> Result<Vec<ResolvedEdge>, Error> {
        let ids: Vec<Uuid> = parents.iter().map(ExecutionId::uuid).collect();
        let rows: Vec<(Uuid, i16, Uuid, i16, String)> = sqlx::query_as("SELECT * FROM ff_resolve_children($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await
            .map_err(sql_err("ff_resolve_children"))?;
        let edges = rows
            .iter()
            .map(|(p, pp, c, cp, resolution)| {
                Ok((exec_id(*p, *pp)?, exec_id(*c, *cp)?, DependencyResolution::from_wire(resolution)?))
            })
            .collect::<Result<Vec<ResolvedEdge>, Error>>()?;
        // A skipped child is a completion.
        if edges.iter().any(|(_, _, r)| *r == DependencyResolution::Skipped) {
            self.wake.wake();
        }
        Ok(edges)
    }

    async fn unresolved_dependencies(&self, limit: usize) -> Result<Vec<(ExecutionId, ExecutionId)>, Error> {
        let rows: Vec<(Uuid, i16, Uuid, i16)> = sqlx::query_as("SELECT * FROM ff_unresolved_dependencies($1)")
            .bind(limit as i32)
            .fetch_all(&self.pool)
            .await
            .map_err(sql_err("ff_unresolved_dependencies"))?;
        rows.into_iter().map(|(p, pp, c, cp)| Ok((exec_id(p, pp)?, exec_id(c, cp)?))).collect()
    }

    async fn execution(&self, id: &ExecutionId) -> Result<Option<ExecutionInfo>, Error> {
        let row: Option<(String, i32)> =
            sqlx::query_as("SELECT state, attempt FROM ff_execution WHERE execution_id = $1")
                .bind(id.uuid())
                .fetch_optional(&self.pool)
                .await
                .map_err(sql_err("execution"))?;
        Ok(row.map(|(state, attempt)| ExecutionInfo { state, attempt: attempt.max(0) as u32 }))
    }

    async fn renew_lease(&self, id: &ExecutionId, worker: &str) -> Result<bool, Error> {
        let renewed: bool = sqlx::query_scalar("SELECT ff_renew_lease($1, $2, $3)")
            .bind(id.uuid())
            .bind(worker)
            .bind(LEASE_MS)
            .fetch_one(&self.pool)
            .await
            .map_err(sql_err("ff_renew_lease"))?;
        if renewed {
            self.wake.wake();
        }
        Ok(renewed)
    }

    async fn expire_leases(&self, now: TimestampMs) -> Result<Vec<ExecutionId>, Error> {
        let rows: Vec<(Uuid, i16)> = sqlx::query_as("SELECT execution_id, partition_key FROM ff_expire_leases($1)")
            .bind(now.0)
            .fetch_all(&self.pool)
            .await
            .map_err(sql_err("ff_expire_leases"))?;
        if !rows.is_empty() {
            self.wake.wake();
        }
        rows.into_iter().map(|(u, p)| exec_id(u, p)).collect()
    }

    async fn revoke_lease(&self, id: &ExecutionId, revoked_by: &str) -> Result<bool, Error> {
        let revoked: bool = sqlx::query_scalar("SELECT ff_revoke_lease($1, $2)")
            .bind(id.uuid())
            .bind(revoked_by)
            .fetch_one(&self.pool)
            .await
            .map_err(sql_err("ff_revoke_lease"))?;
        if revoked {
            self.wake.wake();
        }
        Ok(revoked)
    }

    async fn suspend(&self, id: &ExecutionId, waitpoint: &WaitpointId) -> Result<bool, Error> {
        let result: String = sqlx::query_scalar("SELECT ff_suspend_execution($1, $2)")
            .bind(id.uuid())
            .bind(waitpoint.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(sql_err("ff_suspend_execution"))?;
        match result.as_str() {
            "satisfied" => Ok(true),
            "open" => Ok(false),
            other => Err(Error::State { detail: format!("suspend {id}: {other}") }),
        }
    }

    async fn deliver_signal(
        &self,
        id: &ExecutionId,
        waitpoint: &WaitpointId,
        signal_id: &SignalId,
        idempotency_key: Option<&str>,
        source_identity: Option<&str>,
    ) -> Result<SignalDeliveryEffect, Error> {
        let effect: Option<String> = sqlx::query_scalar("SELECT ff_deliver_signal($1, $2, $3, $4, $5)")
            .bind(id.uuid())
            .bind(waitpoint.as_str())
            .bind(signal_id.as_str())
            .bind(idempotency_key)
            .bind(source_identity)
            .fetch_one(&self.pool)
            .await
            .map_err(sql_err("ff_deliver_signal"))?;
        let Some(effect) = effect else {
            return Err(Error::State { detail: format!("deliver signal to {id}: no such execution") });
        };
        self.wake.wake();
        Ok(SignalDeliveryEffect::from_wire(&effect))
    }
}

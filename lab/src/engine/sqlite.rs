//! The SQLite demo engine: each operation is one write transaction (`BEGIN IMMEDIATE`, through
//! the subsystem's [`Database`]: this process's writers queue for their turn) that changes
//! state; the triggers of `lab/migrations/sqlite/` write the completion, lease or signal event
//! into the subsystem's outbox in that same transaction, and the commit wakes this process's
//! listeners.

use std::sync::LazyLock;

use async_trait::async_trait;
use ff_completions::sqlite::{Database, WriteTransaction};
use ff_completions::{
    BackendConfig, ExecutionId, FlowId, Namespace, SignalDeliveryEffect, SignalId, TimestampMs, TraceParent,
    WaitpointId,
};
use sqlx::SqliteConnection;
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqlitePool;
use uuid::Uuid;

use super::{
    CancelFlowPolicy, DependencyResolution, Engine, ExecutionInfo, ExecutionSpec, FailOutcome, LEASE_DURATION,
    ResolvedEdge,
};
use crate::error::Error;

/// The ledger of the demo engine's SQLite migrations.
pub const DEMO_MIGRATION_LEDGER: &str = "ff_completions_demo_migrations";

/// The demo engine's embedded migrations (`lab/migrations/sqlite/`), with their own ledger.
static DEMO_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("migrations/sqlite");
    migrator.dangerous_set_table_name(DEMO_MIGRATION_LEDGER);
    migrator
});

fn lease_end(now: TimestampMs) -> i64 {
    now.0.saturating_add(LEASE_DURATION.as_millis() as i64)
}

const TERMINAL: &str = "('success', 'failed', 'cancelled', 'expired', 'skipped')";

/// Drives executions in an SQLite database.
#[derive(Clone, Debug)]
pub struct SqliteEngine {
    db: Database,
}

fn sql_err(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::from_sqlx(op, e)
}

fn exec_id(text: &str, partition: i64) -> Result<ExecutionId, Error> {
    let uuid = Uuid::parse_str(text).map_err(|e| Error::validation(format!("stored execution id {text:?}: {e}")))?;
    let p = u16::try_from(partition).map_err(|_| Error::validation(format!("partition {partition} out of range")))?;
    Ok(ExecutionId::from_parts(p, uuid))
}

impl SqliteEngine {
    /// Opens (creating when missing) the database and applies the subsystem's migrations and
    /// the demo's.
    ///
    /// # Errors
    /// Open or migration failures.
    pub async fn connect(config: &BackendConfig) -> Result<Self, Error> {
        let db = Database::open(config).await?;
        DEMO_MIGRATOR.run(db.pool()).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => Error::from_sqlx("sqlite demo migrate", e),
            other => {
                ff_completions::Error::Schema { op: "sqlite demo migrate", detail: other.to_string(), source: None }
                    .into()
            }
        })?;
        Ok(Self { db })
    }

    /// The underlying pool.
    pub fn pool(&self) -> &SqlitePool {
        self.db.pool()
    }

    /// The database as the subsystem shares it in this process.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Begins a write transaction once this process's earlier writers are done.
    async fn write(&self) -> Result<WriteTransaction, Error> {
        Ok(self.db.begin_write(false).await?)
    }

    /// Begins a write transaction on a flow's critical path (dependency resolution): it passes
    /// the ordinary writers queued in this process.
    async fn write_urgent(&self) -> Result<WriteTransaction, Error> {
        Ok(self.db.begin_write(true).await?)
    }

    /// Resolves one edge inside the caller's write transaction.
    async fn resolve_in(
        tx: &mut SqliteConnection,
        parent_id: &str,
        child_id: &str,
    ) -> Result<DependencyResolution, Error> {
        let op = "resolve dependency";
        let parent_state: Option<String> = sqlx::query_scalar("SELECT state FROM ff_execution WHERE execution_id = ?")
            .bind(parent_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_err(op))?;
        let Some(parent_state) = parent_state.filter(|s| TERMINAL.contains(&format!("'{s}'"))) else {
            return Ok(DependencyResolution::ParentNotTerminal);
        };
        Self::resolve_edge(tx, parent_state == "success", parent_id, child_id).await
    }

    /// Resolves one edge of a terminal parent inside the caller's write transaction.
    async fn resolve_edge(
        tx: &mut SqliteConnection,
        succeeded: bool,
        parent_id: &str,
        child_id: &str,
    ) -> Result<DependencyResolution, Error> {
        let op = "resolve dependency";
        let edge = sqlx::query(
            "UPDATE ff_dependency SET state = ? WHERE parent_id = ? AND child_id = ? AND state = 'pending'",
        )
        .bind(if succeeded { "satisfied" } else { "failed" })
        .bind(parent_id)
        .bind(child_id)
        .execute(&mut *tx)
        .await
        .map_err(sql_err(op))?
        .rows_affected();
        Ok(if edge == 0 {
            DependencyResolution::AlreadyResolved
        } else if !succeeded {
            let skipped = sqlx::query(
                "UPDATE ff_execution SET state = 'skipped', updated_at_ms = ? \
                 WHERE execution_id = ? AND state IN ('blocked', 'eligible')",
            )
            .bind(TimestampMs::now().0)
            .bind(child_id)
            .execute(&mut *tx)
            .await
            .map_err(sql_err(op))?
            .rows_affected();
            if skipped == 1 { DependencyResolution::Skipped } else { DependencyResolution::AlreadyResolved }
        } else {
            // One statement: SET sees the old row, so the last pending parent of a blocked child
            // makes it eligible; nothing else ever makes a child eligible with no parent left.
            let row: Option<(i64, String)> = sqlx::query_as(
                "UPDATE ff_execution SET pending_parents = pending_parents - 1, \
                 state = CASE WHEN pending_parents = 1 AND state = 'blocked' THEN 'eligible' ELSE state END, \
                 updated_at_ms = ? WHERE execution_id = ? RETURNING pending_parents, state",
            )
            .bind(TimestampMs::now().0)
            .bind(child_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_err(op))?;
            match row {
                Some((0, state)) if state == "eligible" => DependencyResolution::Promoted,
                _ => DependencyResolution::Waiting,
            }
        })
    }

    /// Moves one execution from one of `from` to `to`; the trigger writes the completion.
    async fn transition(
        &self,
        id: &ExecutionId,
        to: &str,
        from: &'static str,
        op: &'static str,
    ) -> Result<bool, Error> {
        let mut tx = self.write().await?;
        let changed = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE ff_execution SET state = ?, worker = NULL, updated_at_ms = ? WHERE execution_id = ? AND state IN {from}"
        )))
        .bind(to)
        .bind(TimestampMs::now().0)
        .bind(id.uuid().to_string())
        .execute(&mut *tx)
        .await
        .map_err(sql_err(op))?
        .rows_affected();
        tx.commit().await.map_err(Error::from)?;
        Ok(changed == 1)
    }
}

#[async_trait]
impl Engine for SqliteEngine {
    async fn create_flow(&self, flow: &FlowId, namespace: Option<&Namespace>) -> Result<(), Error> {
        super::check_namespace(namespace)?;
        let mut tx = self.write().await?;
        sqlx::query("INSERT OR IGNORE INTO ff_flow (flow_id, namespace, created_at_ms) VALUES (?, ?, ?)")
            .bind(flow.uuid().to_string())
            .bind(namespace.map(Namespace::as_str))
            .bind(TimestampMs::now().0)
            .execute(&mut *tx)
            .await
            .map_err(sql_err("create flow"))?;
        tx.commit().await.map_err(Error::from)
    }

    async fn create_execution(&self, spec: &ExecutionSpec) -> Result<(), Error> {
        spec.validate()?;
        let tags = serde_json::to_string(&spec.tags).map_err(|e| Error::validation(e.to_string()))?;
        let parents: std::collections::BTreeSet<Uuid> = spec.parents.iter().map(|p| p.uuid()).collect();
        let state = if parents.is_empty() { "eligible" } else { "blocked" };
        let now = TimestampMs::now().0;
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO ff_execution (execution_id, partition_key, flow_id, namespace, tags, state, max_attempts, \
             pending_parents, created_at_ms, updated_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(spec.id.uuid().to_string())
        .bind(spec.id.partition() as i64)
        .bind(spec.flow_id.map(|f| f.uuid().to_string()))
        .bind(spec.namespace.as_ref().map(Namespace::as_str))
        .bind(tags)
        .bind(state)
        .bind(spec.max_attempts.max(1) as i64)
        .bind(parents.len() as i64)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(sql_err("create execution"))?;
        for parent in parents {
            sqlx::query("INSERT INTO ff_dependency (parent_id, child_id) VALUES (?, ?)")
                .bind(parent.to_string())
                .bind(spec.id.uuid().to_string())
                .execute(&mut *tx)
                .await
                .map_err(sql_err("create execution"))?;
        }
        tx.commit().await.map_err(Error::from)
    }

    async fn claim(&self, worker: &str, limit: usize) -> Result<Vec<ExecutionId>, Error> {
        // A read first (WAL readers never wait for the writer): an idle worker polling for work
        // takes no write lock, so it never delays the writers that have something to write.
        let eligible: Option<i64> = sqlx::query_scalar("SELECT 1 FROM ff_execution WHERE state = 'eligible' LIMIT 1")
            .fetch_optional(self.db.pool())
            .await
            .map_err(sql_err("claim"))?;
        if eligible.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.write().await?;
        // A new lease id per claim: the lease triggers write `acquired` or `reclaimed`.
        let now = TimestampMs::now();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "UPDATE ff_execution SET state = 'running', worker = ?, attempt = attempt + 1, updated_at_ms = ?, \
             lease_id = lower(hex(randomblob(16))), lease_state = 'active', lease_expires_at_ms = ? \
             WHERE execution_id IN (SELECT execution_id FROM ff_execution WHERE state = 'eligible' \
                                    ORDER BY created_at_ms LIMIT ?) \
             RETURNING execution_id, partition_key",
        )
        .bind(worker)
        .bind(now.0)
        .bind(lease_end(now))
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(sql_err("claim"))?;
        tx.commit().await.map_err(Error::from)?;
        rows.iter().map(|(id, p)| exec_id(id, *p)).collect()
    }

    async fn complete(&self, id: &ExecutionId) -> Result<bool, Error> {
        self.transition(id, "success", "('running')", "complete").await
    }

    /// The trigger writes the completion; the same transaction then records the producer's
    /// trace context on it (the newest completion of the execution: one writer at a time).
    async fn complete_traced(&self, id: &ExecutionId, traceparent: &TraceParent) -> Result<bool, Error> {
        let mut tx = self.write().await?;
        let changed = sqlx::query(
            "UPDATE ff_execution SET state = 'success', worker = NULL, updated_at_ms = ? WHERE execution_id = ? AND state = 'running'",
        )
        .bind(TimestampMs::now().0)
        .bind(id.uuid().to_string())
        .execute(&mut *tx)
        .await
        .map_err(sql_err("complete"))?
        .rows_affected();
        if changed == 1 {
            sqlx::query(
                "UPDATE ff_completion_event SET traceparent = ? WHERE event_id = \
                 (SELECT max(event_id) FROM ff_completion_event WHERE execution_id = ? AND family IS NULL)",
            )
            .bind(traceparent.to_string())
            .bind(id.uuid().to_string())
            .execute(&mut *tx)
            .await
            .map_err(sql_err("complete"))?;
        }
        tx.commit().await.map_err(Error::from)?;
        Ok(changed == 1)
    }

    async fn fail(&self, id: &ExecutionId, retryable: bool) -> Result<FailOutcome, Error> {
        let mut tx = self.write().await?;
        let row: Option<(String, i64, i64)> =
            sqlx::query_as("SELECT state, attempt, max_attempts FROM ff_execution WHERE execution_id = ?")
                .bind(id.uuid().to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(sql_err("fail"))?;
        let Some((state, attempt, max_attempts)) = row.filter(|(s, _, _)| s == "running") else {
            return Err(Error::State { detail: format!("fail {id}: not_running") });
        };
        let retry = retryable && attempt < max_attempts;
        let to = if retry { "eligible" } else { "failed" };
        sqlx::query(
            "UPDATE ff_execution SET state = ?, worker = NULL, updated_at_ms = ? WHERE execution_id = ? AND state = ?",
        )
        .bind(to)
        .bind(TimestampMs::now().0)
        .bind(id.uuid().to_string())
        .bind(state)
        .execute(&mut *tx)
        .await
        .map_err(sql_err("fail"))?;
        tx.commit().await.map_err(Error::from)?;
        Ok(if retry {
            FailOutcome::RetryScheduled { delay_until: TimestampMs::now() }
        } else {
            FailOutcome::TerminalFailed
        })
    }

    async fn cancel(&self, id: &ExecutionId) -> Result<bool, Error> {
        self.transition(id, "cancelled", "('blocked', 'eligible', 'running')", "cancel").await
    }

    async fn expire(&self, id: &ExecutionId) -> Result<bool, Error> {
        self.transition(id, "expired", "('blocked', 'eligible', 'running')", "expire").await
    }

    async fn cancel_flow(&self, flow: &FlowId, policy: CancelFlowPolicy) -> Result<u64, Error> {
        let states = match policy {
            CancelFlowPolicy::FlowOnly => "()",
            CancelFlowPolicy::CancelAll => "('blocked', 'eligible', 'running')",
            CancelFlowPolicy::CancelPending => "('blocked', 'eligible')",
        };
        let mut tx = self.write().await?;
        sqlx::query("UPDATE ff_flow SET state = 'cancelled' WHERE flow_id = ?")
            .bind(flow.uuid().to_string())
            .execute(&mut *tx)
            .await
            .map_err(sql_err("cancel flow"))?;
        let n = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE ff_execution SET state = 'cancelled', worker = NULL, updated_at_ms = ? WHERE flow_id = ? AND state IN {states}"
        )))
        .bind(TimestampMs::now().0)
        .bind(flow.uuid().to_string())
        .execute(&mut *tx)
        .await
        .map_err(sql_err("cancel flow"))?
        .rows_affected();
        tx.commit().await.map_err(Error::from)?;
        Ok(n)
    }

    async fn resolve_dependency(
        &self,
        parent: &ExecutionId,
        child: &ExecutionId,
    ) -> Result<DependencyResolution, Error> {
        let mut tx = self.write_urgent().await?;
        let resolution = Self::resolve_in(&mut tx, &parent.uuid().to_string(), &child.uuid().to_string()).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(resolution)
    }

    /// One transaction, one query for the pending edges of the whole batch (with each
    /// parent's state), then two statements per edge. Already resolved edges are left out.
    async fn resolve_children(&self, parents: &[ExecutionId]) -> Result<Vec<ResolvedEdge>, Error> {
        let op = "resolve children";
        let mut tx = self.write_urgent().await?;
        let mut resolved = Vec::new();
        // Well below SQLite's limit on bound parameters.
        for chunk in parents.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!(
                "SELECT d.parent_id, p.partition_key, p.state, d.child_id, c.partition_key FROM ff_dependency d \
                 JOIN ff_execution p ON p.execution_id = d.parent_id \
                 JOIN ff_execution c ON c.execution_id = d.child_id \
                 WHERE d.state = 'pending' AND d.parent_id IN ({marks}) ORDER BY d.child_id, d.parent_id"
            );
            let mut query = sqlx::query_as::<_, (String, i64, String, String, i64)>(sqlx::AssertSqlSafe(sql));
            for parent in chunk {
                query = query.bind(parent.uuid().to_string());
            }
            let edges = query.fetch_all(&mut *tx).await.map_err(sql_err(op))?;
            for (parent_id, parent_partition, parent_state, child_id, child_partition) in edges {
                let resolution = if TERMINAL.contains(&format!("'{parent_state}'")) {
                    Self::resolve_edge(&mut tx, parent_state == "success", &parent_id, &child_id).await?
                } else {
                    DependencyResolution::ParentNotTerminal
                };
                resolved.push((
                    exec_id(&parent_id, parent_partition)?,
                    exec_id(&child_id, child_partition)?,
                    resolution,
                ));
            }
        }
        tx.commit().await.map_err(Error::from)?;
        Ok(resolved)
    }

    async fn children(&self, parent: &ExecutionId) -> Result<Vec<ExecutionId>, Error> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT d.child_id, e.partition_key FROM ff_dependency d JOIN ff_execution e ON e.execution_id = d.child_id \
             WHERE d.parent_id = ?",
        )
        .bind(parent.uuid().to_string())
        .fetch_all(self.db.pool())
        .await
        .map_err(sql_err("children"))?;
        rows.iter().map(|(id, p)| exec_id(id, *p)).collect()
    }

    async fn unresolved_dependencies(&self, limit: usize) -> Result<Vec<(ExecutionId, ExecutionId)>, Error> {
        let rows: Vec<(String, i64, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT d.parent_id, p.partition_key, d.child_id, c.partition_key FROM ff_dependency d \
             JOIN ff_execution p ON p.execution_id = d.parent_id JOIN ff_execution c ON c.execution_id = d.child_id \
             WHERE d.state = 'pending' AND p.state IN {TERMINAL} LIMIT ?"
        )))
        .bind(limit as i64)
        .fetch_all(self.db.pool())
        .await
        .map_err(sql_err("unresolved dependencies"))?;
        rows.iter().map(|(p, pp, c, cp)| Ok((exec_id(p, *pp)?, exec_id(c, *cp)?))).collect()
    }

    async fn execution(&self, id: &ExecutionId) -> Result<Option<ExecutionInfo>, Error> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT state, attempt FROM ff_execution WHERE execution_id = ?")
                .bind(id.uuid().to_string())
                .fetch_optional(self.db.pool())
                .await
                .map_err(sql_err("execution"))?;
        Ok(row.map(|(state, attempt)| ExecutionInfo { state, attempt: attempt.max(0) as u32 }))
    }

    async fn renew_lease(&self, id: &ExecutionId, worker: &str) -> Result<bool, Error> {
        let op = "renew lease";
        let mut tx = self.write().await?;
        let renewed = sqlx::query(
            "UPDATE ff_execution SET lease_renewals = lease_renewals + 1, lease_expires_at_ms = ? \
             WHERE execution_id = ? AND worker = ? AND state = 'running' AND lease_state = 'active'",
        )
        .bind(lease_end(TimestampMs::now()))
        .bind(id.uuid().to_string())
        .bind(worker)
        .execute(&mut *tx)
        .await
        .map_err(sql_err(op))?
        .rows_affected();
        tx.commit().await.map_err(Error::from)?;
        Ok(renewed == 1)
    }

    async fn expire_leases(&self, now: TimestampMs) -> Result<Vec<ExecutionId>, Error> {
        let op = "expire leases";
        let mut tx = self.write().await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "UPDATE ff_execution SET state = 'eligible', lease_state = 'expired', worker = NULL, updated_at_ms = ? \
             WHERE state = 'running' AND lease_state = 'active' AND lease_expires_at_ms < ? \
             RETURNING execution_id, partition_key",
        )
        .bind(TimestampMs::now().0)
        .bind(now.0)
        .fetch_all(&mut *tx)
        .await
        .map_err(sql_err(op))?;
        tx.commit().await.map_err(Error::from)?;
        rows.iter().map(|(id, p)| exec_id(id, *p)).collect()
    }

    async fn revoke_lease(&self, id: &ExecutionId, revoked_by: &str) -> Result<bool, Error> {
        let op = "revoke lease";
        let mut tx = self.write().await?;
        let revoked = sqlx::query(
            "UPDATE ff_execution SET state = 'eligible', lease_state = 'revoked', lease_revoked_by = ?, \
             worker = NULL, updated_at_ms = ? WHERE execution_id = ? AND state = 'running' AND lease_state = 'active'",
        )
        .bind(revoked_by)
        .bind(TimestampMs::now().0)
        .bind(id.uuid().to_string())
        .execute(&mut *tx)
        .await
        .map_err(sql_err(op))?
        .rows_affected();
        tx.commit().await.map_err(Error::from)?;
        Ok(revoked == 1)
    }

    async fn suspend(&self, id: &ExecutionId, waitpoint: &WaitpointId) -> Result<bool, Error> {
        let op = "suspend";
        let (execution, now) = (id.uuid().to_string(), TimestampMs::now().0);
        let mut tx = self.write().await?;
        let suspended = sqlx::query(
            "UPDATE ff_execution SET state = 'suspended', worker = NULL, lease_state = 'released', updated_at_ms = ? \
             WHERE execution_id = ? AND state = 'running'",
        )
        .bind(now)
        .bind(&execution)
        .execute(&mut *tx)
        .await
        .map_err(sql_err(op))?
        .rows_affected();
        if suspended != 1 {
            return Err(Error::State { detail: format!("suspend {id}: not_running") });
        }
        // The oldest signal buffered for this waitpoint, consumed now.
        let consumed: Option<i64> = sqlx::query_scalar(
            "UPDATE ff_signal_delivery SET consumed = 1 WHERE delivery_id = (SELECT min(delivery_id) \
             FROM ff_signal_delivery WHERE execution_id = ? AND waitpoint_id = ? AND effect = 'buffered' \
             AND consumed = 0) RETURNING delivery_id",
        )
        .bind(&execution)
        .bind(waitpoint.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(sql_err(op))?;
        let state = if consumed.is_some() { "satisfied" } else { "open" };
        sqlx::query("INSERT OR REPLACE INTO ff_waitpoint (execution_id, waitpoint_id, state) VALUES (?, ?, ?)")
            .bind(&execution)
            .bind(waitpoint.as_str())
            .bind(state)
            .execute(&mut *tx)
            .await
            .map_err(sql_err(op))?;
        if consumed.is_some() {
            sqlx::query("UPDATE ff_execution SET state = 'eligible', updated_at_ms = ? WHERE execution_id = ?")
                .bind(now)
                .bind(&execution)
                .execute(&mut *tx)
                .await
                .map_err(sql_err(op))?;
        }
        tx.commit().await.map_err(Error::from)?;
        Ok(consumed.is_some())
    }

    async fn deliver_signal(
        &self,
        id: &ExecutionId,
        waitpoint: &WaitpointId,
        signal_id: &SignalId,
        idempotency_key: Option<&str>,
        source_identity: Option<&str>,
    ) -> Result<SignalDeliveryEffect, Error> {
        let op = "deliver signal";
        let mut tx = self.write().await?;
        // One statement decides the effect and records it; the trigger writes the event and,
        // when satisfied, releases the waitpoint and the execution. One writer at a time:
        // of concurrent deliveries of one key, the first is not deduped, the rest are.
        let effect: Option<String> = sqlx::query_scalar(
            "INSERT INTO ff_signal_delivery (execution_id, waitpoint_id, signal_id, idempotency_key, source_identity, \
             effect, delivered_at_ms) \
             SELECT e.execution_id, ?2, ?3, ?4, ?5, \
               CASE WHEN ?4 IS NOT NULL AND EXISTS (SELECT 1 FROM ff_signal_delivery d WHERE d.execution_id = ?1 \
                         AND d.idempotency_key = ?4 AND d.effect <> 'deduped') THEN 'deduped' \
                    WHEN EXISTS (SELECT 1 FROM ff_waitpoint w WHERE w.execution_id = ?1 AND w.waitpoint_id = ?2 \
                         AND w.state = 'open') THEN 'satisfied' \
                    ELSE 'buffered' END, ?6 \
             FROM ff_execution e WHERE e.execution_id = ?1 RETURNING effect",
        )
        .bind(id.uuid().to_string())
        .bind(waitpoint.as_str())
        .bind(signal_id.as_str())
        .bind(idempotency_key)
        .bind(source_identity)
        .bind(TimestampMs::now().0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(sql_err(op))?;
        let Some(effect) = effect else {
            return Err(Error::State { detail: format!("deliver signal to {id}: no such execution") });
        };
        tx.commit().await.map_err(Error::from)?;
        Ok(SignalDeliveryEffect::from_wire(&effect))
    }
}

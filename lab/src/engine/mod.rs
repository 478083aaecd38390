//! The demo execution engine: the small engine surface each backend exposes so examples, tests
//! and benchmarks drive real flows. Every terminal operation runs beside the data (a SQL
//! function, a Lua function, an SQLite trigger) and writes its completion atomically with the
//! state change, into the subsystem's outbox or streams; Rust never publishes one itself. Its
//! schema and producers are the lab's own: `lab/migrations/` (with a ledger of their own) and
//! the `ff_demo` Lua library (`lab/lua/ff_demo.lua`).

pub mod postgres;
pub mod sqlite;
pub mod valkey;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use ff_completions::{
    BackendConfig, BackendConnection, ExecutionId, FlowId, Namespace, SignalDeliveryEffect, SignalId, TimestampMs,
    TraceParent, WaitpointId,
};
use futures::future::try_join_all;

pub use self::postgres::PostgresEngine;
pub use self::sqlite::SqliteEngine;
pub use self::valkey::ValkeyEngine;
use crate::error::Error;

/// How long a claim's lease lasts without a heartbeat ([`Engine::renew_lease`] extends it by
/// as much); [`Engine::expire_leases`] takes the leases older than that away.
pub const LEASE_DURATION: std::time::Duration = std::time::Duration::from_secs(30);

fn family_not_done(op: &'static str) -> Error {
    let detail = "this backend's engine does not produce lease or signal events yet".to_owned();
    Error::Subsystem(ff_completions::Error::Unavailable { op, detail, source: None })
}

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecutionSpec {
    /// The new execution's id (its partition must be its flow's).
    pub id: ExecutionId,
    /// Its flow.
    pub flow_id: Option<FlowId>,
    /// Its namespace.
    pub namespace: Option<Namespace>,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Executions that must succeed before it becomes eligible.
    pub parents: Vec<ExecutionId>,
    /// Attempts before a retryable failure becomes terminal (at least 1).
    pub max_attempts: u32,
}

impl ExecutionSpec {
    /// An execution in `flow` with one attempt, no tags and no parents.
    pub fn new(flow: &FlowId) -> Self {
        Self {
            id: ExecutionId::new_in(flow),
            flow_id: Some(*flow),
            namespace: None,
            tags: BTreeMap::new(),
            parents: Vec::new(),
            max_attempts: 1,
        }
    }

    /// Sets the namespace.
    #[must_use]
    pub fn with_namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = Some(Namespace::new(ns));
        self
    }

    /// Adds a tag.
    #[must_use]
    pub fn with_tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value.into());
        self
    }

    /// Sets the parents.
    #[must_use]
    pub fn with_parents(mut self, parents: Vec<ExecutionId>) -> Self {
        self.parents = parents;
        self
    }

    /// Sets the attempts.
    #[must_use]
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Refuses what no backend can store as given, before anything is written.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        check_namespace(self.namespace.as_ref())?;
        for (key, value) in &self.tags {
            check_text("tag key", key)?;
            check_text("tag value", value)?;
        }
        Ok(())
    }
}

/// Refuses a namespace no backend can store as given.
pub(crate) fn check_namespace(namespace: Option<&Namespace>) -> Result<(), Error> {
    namespace.map_or(Ok(()), |ns| check_text("namespace", ns.as_str()))
}

/// Postgres `text` cannot hold NUL; the other backends could, but every backend refuses it alike.
fn check_text(what: &str, value: &str) -> Result<(), Error> {
    if value.contains('\0') {
        return Err(Error::validation(format!("{what} {:?} contains a NUL character", value.escape_debug())));
    }
    Ok(())
}

/// Outcome of a `fail()` call.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// Attempts remain: the execution is eligible again.
    RetryScheduled {
        /// When it may run again.
        delay_until: TimestampMs,
    },
    /// No retries left: the execution is terminal failed.
    TerminalFailed,
}

/// What `cancel_flow` does with the flow's members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CancelFlowPolicy {
    /// Cancel only the flow record.
    FlowOnly,
    /// Cancel every non-terminal member.
    CancelAll,
    /// Cancel blocked and eligible members; let running ones finish.
    CancelPending,
}

impl CancelFlowPolicy {
    /// The wire name used by the SQL and Lua producers.
    pub fn as_wire(&self) -> &'static str {
        match self {
            Self::FlowOnly => "flow_only",
            Self::CancelAll => "cancel_all",
            Self::CancelPending => "cancel_pending",
        }
    }
}

/// What resolving one dependency edge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DependencyResolution {
    /// The child's last parent succeeded: it is eligible now.
    Promoted,
    /// The parent did not succeed: the child was skipped (itself a completion).
    Skipped,
    /// The child still waits on other parents.
    Waiting,
    /// The edge was resolved before (by the promoter or the reconciler).
    AlreadyResolved,
    /// The parent is not terminal yet.
    ParentNotTerminal,
}

impl DependencyResolution {
    pub(crate) fn from_wire(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "promoted" => Self::Promoted,
            "skipped" => Self::Skipped,
            "waiting" => Self::Waiting,
            "already_resolved" => Self::AlreadyResolved,
            "parent_not_terminal" => Self::ParentNotTerminal,
            other => return Err(Error::validation(format!("unknown dependency resolution {other:?}"))),
        })
    }
}

/// An execution's state as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecutionInfo {
    /// `blocked`, `eligible`, `running`, or a terminal outcome.
    pub state: String,
    /// Attempts started.
    pub attempt: u32,
}

/// An edge `(parent, child)` and what resolving it did.
pub type ResolvedEdge = (ExecutionId, ExecutionId, DependencyResolution);

/// The engine operations of one backend.
#[async_trait]
pub trait Engine: Send + Sync {
    /// Creates a flow (idempotent).
    async fn create_flow(&self, flow: &FlowId, namespace: Option<&Namespace>) -> Result<(), Error>;
    /// Creates an execution, blocked on its parents or eligible.
    async fn create_execution(&self, spec: &ExecutionSpec) -> Result<(), Error>;
    /// Claims up to `limit` eligible executions for `worker`.
    async fn claim(&self, worker: &str, limit: usize) -> Result<Vec<ExecutionId>, Error>;
    /// Completes a running execution with success; `false` if it was not running.
    async fn complete(&self, id: &ExecutionId) -> Result<bool, Error>;
    /// Completes a running execution with success, recording the producer's W3C trace context
    /// with the completion (the `traceparent` column or stream field); `false` if it was not
    /// running.
    async fn complete_traced(&self, id: &ExecutionId, traceparent: &TraceParent) -> Result<bool, Error>;
    /// Fails a running execution, retrying while attempts remain and `retryable`.
    async fn fail(&self, id: &ExecutionId, retryable: bool) -> Result<FailOutcome, Error>;
    /// Cancels a non-terminal execution; `false` if it was terminal.
    async fn cancel(&self, id: &ExecutionId) -> Result<bool, Error>;
    /// Expires a non-terminal execution; `false` if it was terminal.
    async fn expire(&self, id: &ExecutionId) -> Result<bool, Error>;
    /// Cancels a flow's members by policy; returns how many were cancelled.
    async fn cancel_flow(&self, flow: &FlowId, policy: CancelFlowPolicy) -> Result<u64, Error>;
    /// Resolves the edge `parent -> child` after the parent reached a terminal state.
    async fn resolve_dependency(
        &self,
        parent: &ExecutionId,
        child: &ExecutionId,
    ) -> Result<DependencyResolution, Error>;
    /// The children of an execution.
    async fn children(&self, parent: &ExecutionId) -> Result<Vec<ExecutionId>, Error>;
    /// Resolves every edge out of `parents` (executions that reached a terminal state) and
    /// returns each edge `(parent, child)` with what resolving it did. Backends that can do it
    /// in one transaction or function call do (Postgres, SQLite); the default resolves the
    /// edges concurrently, one call each.
    ///
    /// # Errors
    /// As [`Self::children`] and [`Self::resolve_dependency`]; on Postgres and SQLite nothing
    /// is resolved then.
    async fn resolve_children(&self, parents: &[ExecutionId]) -> Result<Vec<ResolvedEdge>, Error> {
        let children =
            try_join_all(parents.iter().map(|p| async move { Ok::<_, Error>((*p, self.children(p).await?)) })).await?;
        let edges = children.into_iter().flat_map(|(p, cs)| cs.into_iter().map(move |c| (p, c)));
        try_join_all(edges.map(|(p, c)| async move { Ok((p, c, self.resolve_dependency(&p, &c).await?)) })).await
    }
    /// Edges whose parent is terminal but which were never resolved (the reconciler's list).
    async fn unresolved_dependencies(&self, limit: usize) -> Result<Vec<(ExecutionId, ExecutionId)>, Error>;
    /// An execution's stored state.
    async fn execution(&self, id: &ExecutionId) -> Result<Option<ExecutionInfo>, Error>;

    /// The heartbeat of `worker`, holder of `id`'s lease: extends it by [`LEASE_DURATION`]
    /// and writes a lease-history `renewed` event. Every claim writes `acquired` (or
    /// `reclaimed` after an expiry) with its new lease id.
    ///
    /// Returns `false` when `worker` does not hold an active lease on `id`.
    ///
    /// # Errors
    /// The backend's; [`ff_completions::Error::Unavailable`] on backends without lease history yet.
    async fn renew_lease(&self, id: &ExecutionId, worker: &str) -> Result<bool, Error> {
        let _ = (id, worker);
        Err(family_not_done("renew lease"))
    }

    /// The expiry sweep an engine runs periodically: each running execution whose lease ended
    /// before `now` loses it (an `expired` event naming its previous owner) and is eligible
    /// again; the next claim of it writes `reclaimed`. Returns the executions swept.
    ///
    /// # Errors
    /// As [`Self::renew_lease`].
    async fn expire_leases(&self, now: TimestampMs) -> Result<Vec<ExecutionId>, Error> {
        let _ = now;
        Err(family_not_done("expire leases"))
    }

    /// An operator takes `id`'s active lease away (a `revoked` event with `revoked_by`); the
    /// execution is eligible again. Returns `false` when it had no active lease.
    ///
    /// # Errors
    /// As [`Self::renew_lease`].
    async fn revoke_lease(&self, id: &ExecutionId, revoked_by: &str) -> Result<bool, Error> {
        let _ = (id, revoked_by);
        Err(family_not_done("revoke lease"))
    }

    /// A running execution suspends on `waitpoint` (its lease released). A signal buffered
    /// for that waitpoint is consumed at once: the waitpoint is satisfied and the execution
    /// eligible again (returns `true`); otherwise the waitpoint stays open (`false`).
    ///
    /// # Errors
    /// [`Error::State`] when the execution is not running; as [`Self::renew_lease`].
    async fn suspend(&self, id: &ExecutionId, waitpoint: &WaitpointId) -> Result<bool, Error> {
        let _ = (id, waitpoint);
        Err(family_not_done("suspend"))
    }

    /// Delivers a signal to `waitpoint` of `id`, writing a signal-delivery event with its
    /// effect in the same transaction: `Deduped` when a delivery with the same
    /// `idempotency_key` to this execution was seen before (of concurrent deliveries of one
    /// key exactly one is not deduped), else `Satisfied` when the waitpoint is open (it is
    /// satisfied, the execution eligible again), else `Buffered` (consumed when it opens).
    ///
    /// # Errors
    /// [`Error::State`] for an unknown execution; as [`Self::renew_lease`].
    async fn deliver_signal(
        &self,
        id: &ExecutionId,
        waitpoint: &WaitpointId,
        signal_id: &SignalId,
        idempotency_key: Option<&str>,
        source_identity: Option<&str>,
    ) -> Result<SignalDeliveryEffect, Error> {
        let _ = (id, waitpoint, signal_id, idempotency_key, source_identity);
        Err(family_not_done("deliver signal"))
    }
}

/// Connects the engine surface of the configured backend (installing the subsystem's schema or
/// library, then the demo's).
///
/// # Errors
/// As the backend's connect.
pub async fn connect_engine(config: &BackendConfig) -> Result<Arc<dyn Engine>, Error> {
    match &config.connection {
        BackendConnection::Postgres(_) => Ok(Arc::new(PostgresEngine::connect(config).await?)),
        BackendConnection::Sqlite(_) => Ok(Arc::new(SqliteEngine::connect(config).await?)),
        BackendConnection::Valkey(_) => Ok(Arc::new(ValkeyEngine::connect(config).await?)),
        _ => Err(Error::validation(format!("backend {config} has no demo engine"))),
    }
}

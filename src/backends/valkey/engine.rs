//! The Valkey engine surface: one `FCALL` per operation into the `ff_completions` library, which
//! writes state, the stream entry and the pub/sub message in one atomic call.

use async_trait::async_trait;
use ferriskey::{Client, Value};

use super::keys;
use super::library::{connect_client, ensure_library, fcall, map_err, valkey_connection};
use super::stream::text;
use crate::config::BackendConfig;
use crate::engine::{
    CancelFlowPolicy, DependencyResolution, Engine, ExecutionInfo, ExecutionSpec, FailOutcome, LEASE_DURATION,
};
use crate::error::Error;
use crate::signal_delivery::SignalDeliveryEffect;
use crate::types::{ExecutionId, FlowId, Namespace, SignalId, TimestampMs, WaitpointId};

/// [`LEASE_DURATION`] as the library's argument.
fn lease_ms() -> String {
    LEASE_DURATION.as_millis().to_string()
}

/// Drives executions through the `ff_completions` function library.
#[derive(Clone)]
pub struct ValkeyEngine {
    client: Client,
    maxlen: String,
    /// The partition the next claim starts at.
    next_claim: std::sync::Arc<std::sync::atomic::AtomicU16>,
    /// `WAIT` for this many replicas after each write (0: never).
    wait_replicas: u32,
    /// How long a `WAIT` may take.
    wait_timeout: std::time::Duration,
}

impl std::fmt::Debug for ValkeyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValkeyEngine").field("maxlen", &self.maxlen).finish_non_exhaustive()
    }
}

fn parse_ids(ids: &[String]) -> Result<Vec<ExecutionId>, Error> {
    ids.iter().map(|id| ExecutionId::parse(id)).collect()
}

impl ValkeyEngine {
    /// Connects and loads the function library when it is missing or of another version.
    /// Completions are trimmed to `MAXLEN ~` [`ValkeyConnection::stream_maxlen`](crate::ValkeyConnection).
    ///
    /// # Errors
    /// [`Error::Validation`] for a config of another backend, or of a cluster with a database
    /// other than 0;
    /// [`Error::Unavailable`] when the server refuses the connection or the credentials or
    /// is too old for functions; [`Error::Timeout`] and [`Error::Transport`] for
    /// connection trouble.
    pub async fn connect(config: &BackendConfig) -> Result<Self, Error> {
        let v = valkey_connection(config)?;
        let (maxlen, wait_replicas) = (v.stream_maxlen.max(1).to_string(), v.wait_replicas);
        let client = connect_client(config, "ff-completions-engine").await?;
        ensure_library(&client).await?;
        let wait_timeout = (config.timeouts.request_or_default() / 2).max(std::time::Duration::from_millis(100));
        Ok(Self { client, maxlen, next_claim: Default::default(), wait_replicas, wait_timeout })
    }

    /// The underlying client, for your own commands beside the engine's.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `FCALL` of a function that writes; with [`ValkeyConnection::wait_replicas`](crate::ValkeyConnection)
    /// set, followed by `WAIT` on the same connection.
    async fn write<T: ferriskey::FromValue>(
        &self,
        function: &'static str,
        keys: &[impl ferriskey::ToArgs],
        args: &[impl ferriskey::ToArgs],
    ) -> Result<T, Error> {
        let reply = fcall(&self.client, function, keys, args).await?;
        self.replicated().await?;
        Ok(reply)
    }

    /// Waits until the configured number of replicas acknowledged this client's writes. In a
    /// cluster, ferriskey sends `WAIT` to every primary and answers the smallest count.
    async fn replicated(&self) -> Result<(), Error> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let timeout_ms = self.wait_timeout.as_millis() as u64;
        let wait = self.client.cmd("WAIT").arg(self.wait_replicas).arg(timeout_ms);
        let acked: i64 = wait.execute().await.map_err(map_err("valkey WAIT"))?;
        if acked < i64::from(self.wait_replicas) {
            let detail = format!(
                "{acked} of {} replicas acknowledged the write within {timeout_ms} ms: done on the primary, but a failover may lose it",
                self.wait_replicas
            );
            return Err(Error::unavailable("valkey WAIT", detail));
        }
        Ok(())
    }

    /// A terminal call on one execution returning 0 or 1.
    async fn flag(&self, function: &'static str, id: &ExecutionId) -> Result<bool, Error> {
        let n: i64 = self.write(function, &keys::terminal(id), &[id.to_string(), self.maxlen.clone()]).await?;
        Ok(n == 1)
    }
}

#[async_trait]
impl Engine for ValkeyEngine {
    async fn create_flow(&self, flow: &FlowId, namespace: Option<&Namespace>) -> Result<(), Error> {
        crate::engine::check_namespace(namespace)?;
        let ns = namespace.map(|n| n.as_str().to_owned()).unwrap_or_default();
        let _: i64 = self.write("ff_create_flow", &[keys::flow(flow, "core")], &[flow.to_string(), ns]).await?;
        Ok(())
    }

    async fn create_execution(&self, spec: &ExecutionSpec) -> Result<(), Error> {
        spec.validate()?;
        let id = &spec.id;
        let tags = serde_json::to_string(&spec.tags).map_err(|e| Error::validation(e.to_string()))?;
        let mut keys = vec![
            keys::exec(id, "core"),
            keys::exec(id, "deps"),
            keys::eligible(id.partition()),
            keys::pending_edges(id.partition()),
        ];
        if let Some(flow) = &spec.flow_id {
            keys.extend([keys::flow(flow, "core"), keys::flow(flow, "members")]);
        }
        let mut args = vec![
            id.to_string(),
            spec.flow_id.map(|f| f.to_string()).unwrap_or_default(),
            spec.namespace.as_ref().map(|n| n.as_str().to_owned()).unwrap_or_default(),
            tags,
            spec.max_attempts.max(1).to_string(),
        ];
        args.extend(spec.parents.iter().map(ExecutionId::to_string));
        let _: String = self.write("ff_create_execution", &keys, &args).await?;
        Ok(())
    }

    /// Claims from the partitions' eligible indexes (each claim writes its lease's `acquired`
    /// or `reclaimed` in the same call) that hold executions, starting at a
    /// partition that moves on every call (so no partition starves), up to `limit` in all.
    async fn claim(&self, worker: &str, limit: usize) -> Result<Vec<ExecutionId>, Error> {
        let limit = limit.max(1);
        let sizes = futures::future::try_join_all(keys::partitions().map(|p| async move {
            let n: i64 =
                self.client.cmd("ZCARD").arg(keys::eligible(p)).execute().await.map_err(map_err("valkey ZCARD"))?;
            Ok::<_, Error>((p, n))
        }))
        .await?;
        let first = self.next_claim.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as usize;
        let mut claimed = Vec::new();
        for i in 0..sizes.len() {
            let (p, n) = sizes[(first + i) % sizes.len()];
            if n <= 0 || claimed.len() >= limit {
                continue;
            }
            let args = [worker.to_owned(), (limit - claimed.len()).to_string(), lease_ms(), self.maxlen.clone()];
            let keys = [keys::eligible(p), keys::stream(p), keys::lease_expiry(p)];
            let ids: Vec<String> = self.write("ff_claim", &keys, &args).await?;
            claimed.extend(parse_ids(&ids)?);
        }
        Ok(claimed)
    }

    async fn complete(&self, id: &ExecutionId) -> Result<bool, Error> {
        self.flag("ff_complete", id).await
    }

    async fn fail(&self, id: &ExecutionId, retryable: bool) -> Result<FailOutcome, Error> {
        let args = [id.to_string(), if retryable { "1" } else { "0" }.to_owned(), self.maxlen.clone()];
        let outcome: String = self.write("ff_fail", &keys::terminal(id), &args).await?;
        match outcome.as_str() {
            "retry_scheduled" => Ok(FailOutcome::RetryScheduled { delay_until: TimestampMs::now() }),
            "terminal_failed" => Ok(FailOutcome::TerminalFailed),
            other => Err(Error::State { detail: format!("fail {id}: {other}") }),
        }
    }

    async fn cancel(&self, id: &ExecutionId) -> Result<bool, Error> {
        self.flag("ff_cancel", id).await
    }

    async fn expire(&self, id: &ExecutionId) -> Result<bool, Error> {
        self.flag("ff_expire", id).await
    }

    async fn cancel_flow(&self, flow: &FlowId, policy: CancelFlowPolicy) -> Result<u64, Error> {
        let mut keys = vec![keys::flow(flow, "core"), keys::flow(flow, "members")];
        keys.extend(keys::terminal_shared(flow.partition()));
        let args = [policy.as_wire().to_owned(), self.maxlen.clone()];
        let n: i64 = self.write("ff_cancel_flow", &keys, &args).await?;
        Ok(n.max(0) as u64)
    }

    async fn resolve_dependency(
        &self,
        parent: &ExecutionId,
        child: &ExecutionId,
    ) -> Result<DependencyResolution, Error> {
        let mut keys = vec![
            keys::exec(parent, "core"),
            keys::exec(child, "core"),
            keys::exec(child, "deps"),
            keys::exec(child, "children"),
            keys::stream(child.partition()),
            keys::eligible(child.partition()),
        ];
        keys.push(keys::pending_edges(parent.partition()));
        let args = [parent.to_string(), child.to_string(), self.maxlen.clone()];
        let result: String = self.write("ff_resolve_dependency", &keys, &args).await?;
        DependencyResolution::from_wire(&result)
    }

    async fn children(&self, parent: &ExecutionId) -> Result<Vec<ExecutionId>, Error> {
        let no_args: &[&str] = &[];
        let ids: Vec<String> = fcall(&self.client, "ff_children", &[keys::exec(parent, "children")], no_args).await?;
        parse_ids(&ids)
    }

    async fn unresolved_dependencies(&self, limit: usize) -> Result<Vec<(ExecutionId, ExecutionId)>, Error> {
        let limit = limit.max(1);
        let per_partition = futures::future::try_join_all(keys::partitions().map(|p| async move {
            fcall::<Vec<String>>(&self.client, "ff_unresolved", &[keys::pending_edges(p)], &[limit.to_string()]).await
        }))
        .await?;
        per_partition
            .into_iter()
            .flatten()
            .take(limit)
            .map(|edge| {
                let (p, c) = edge.split_once('|').ok_or_else(|| Error::validation(format!("bad edge {edge:?}")))?;
                Ok((ExecutionId::parse(p)?, ExecutionId::parse(c)?))
            })
            .collect()
    }

    async fn execution(&self, id: &ExecutionId) -> Result<Option<ExecutionInfo>, Error> {
        let no_args: &[&str] = &[];
        let reply: Value = fcall(&self.client, "ff_execution", &[keys::exec(id, "core")], no_args).await?;
        let Value::Array(items) = reply else { return Ok(None) };
        let mut items = items.into_iter().map(|r| r.ok());
        let state = items.next().flatten().as_ref().and_then(text);
        let attempt = items.next().flatten().as_ref().and_then(text).and_then(|a| a.parse::<u32>().ok());
        match state {
            Some(state) => Ok(Some(ExecutionInfo { state, attempt: attempt.unwrap_or(0) })),
            None => Err(Error::schema("ff_execution", format!("{id}: no state in the reply"))),
        }
    }

    async fn renew_lease(&self, id: &ExecutionId, worker: &str) -> Result<bool, Error> {
        let p = id.partition();
        let keys = [keys::exec(id, "core"), keys::stream(p), keys::lease_expiry(p)];
        let args = [id.to_string(), worker.to_owned(), lease_ms(), self.maxlen.clone()];
        let n: i64 = self.write("ff_renew_lease", &keys, &args).await?;
        Ok(n == 1)
    }

    /// One call per partition (each in its own slot), all at once.
    async fn expire_leases(&self, now: TimestampMs) -> Result<Vec<ExecutionId>, Error> {
        let swept = futures::future::try_join_all(keys::partitions().map(|p| async move {
            let keys = [keys::lease_expiry(p), keys::stream(p), keys::eligible(p)];
            let ids: Vec<String> =
                self.write("ff_expire_leases", &keys, &[now.0.to_string(), self.maxlen.clone()]).await?;
            parse_ids(&ids)
        }))
        .await?;
        Ok(swept.into_iter().flatten().collect())
    }

    async fn revoke_lease(&self, id: &ExecutionId, revoked_by: &str) -> Result<bool, Error> {
        let p = id.partition();
        let keys = [keys::exec(id, "core"), keys::stream(p), keys::eligible(p), keys::lease_expiry(p)];
        let args = [id.to_string(), revoked_by.to_owned(), self.maxlen.clone()];
        let n: i64 = self.write("ff_revoke_lease", &keys, &args).await?;
        Ok(n == 1)
    }

    async fn suspend(&self, id: &ExecutionId, waitpoint: &WaitpointId) -> Result<bool, Error> {
        let p = id.partition();
        let keys = [
            keys::exec(id, "core"),
            keys::eligible(p),
            keys::lease_expiry(p),
            keys::exec(id, "waitpoints"),
            keys::exec(id, "buffered"),
        ];
        let reply: Value = self.write("ff_suspend", &keys, &[id.to_string(), waitpoint.as_str().to_owned()]).await?;
        match reply {
            Value::Int(n) => Ok(n == 1),
            other => Err(Error::State { detail: format!("suspend {id}: {}", text(&other).unwrap_or_default()) }),
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
        let p = id.partition();
        let keys = [
            keys::exec(id, "core"),
            keys::stream(p),
            keys::eligible(p),
            keys::exec(id, "waitpoints"),
            keys::exec(id, "buffered"),
            keys::exec(id, "signal_keys"),
        ];
        let args = [
            id.to_string(),
            waitpoint.as_str().to_owned(),
            signal_id.as_str().to_owned(),
            idempotency_key.unwrap_or_default().to_owned(),
            source_identity.unwrap_or_default().to_owned(),
            self.maxlen.clone(),
        ];
        let effect: String = self.write("ff_deliver_signal", &keys, &args).await?;
        if effect == "no_such_execution" {
            return Err(Error::State { detail: format!("deliver signal to {id}: no such execution") });
        }
        Ok(SignalDeliveryEffect::from_wire(&effect))
    }
}

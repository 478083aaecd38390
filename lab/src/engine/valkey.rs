//! The Valkey demo engine: one `FCALL` per operation into the demo's own function library
//! (`lab/lua/ff_demo.lua`, loaded after the subsystem's), which writes state, the stream entry
//! of the subsystem's partition stream and the pub/sub wake-up in one atomic call.

use async_trait::async_trait;
use ferriskey::{Client, FromValue, ToArgs, Value};
use ff_completions::valkey::{connect_client, load_library};
use ff_completions::{
    BackendConfig, BackendConnection, ExecutionId, FlowId, Namespace, SignalDeliveryEffect, SignalId, TimestampMs,
    TraceParent, WaitpointId,
};

use super::{
    CancelFlowPolicy, DependencyResolution, Engine, ExecutionInfo, ExecutionSpec, FailOutcome, LEASE_DURATION,
};
use crate::error::Error;

/// The demo's function library (`lab/lua/ff_demo.lua`).
pub const LIBRARY: &str = include_str!("../../lua/ff_demo.lua");

/// The version `FCALL ff_demo_version 0` answers; bumped together with `VERSION` in the Lua.
pub const LIBRARY_VERSION: &str = "2";

/// What the demo library's refused state changes start their error replies with.
const CONFLICT: &str = "ff_demo conflict:";
/// What the demo library's argument checks start their error replies with.
const INVALID: &str = "ff_demo invalid:";

/// A ferriskey error of operation `op`: a refused state change is [`Error::State`], a refused
/// argument a validation error; the rest as the subsystem maps it.
fn map_err(op: &'static str) -> impl Fn(ferriskey::Error) -> Error {
    move |e| {
        let text = e.to_string();
        if text.contains(CONFLICT) {
            return Error::State { detail: text };
        }
        if text.contains(INVALID) {
            return Error::validation(text);
        }
        Error::Subsystem(ff_completions::Error::from_valkey(op, e))
    }
}

fn is_function_missing(e: &ferriskey::Error) -> bool {
    e.to_string().contains("Function not found")
}

/// A reply's text (a string or a number), if it is one.
fn text(v: &Value) -> Option<String> {
    String::from_value(v).ok()
}

/// Loads the subsystem's library, then the demo's unless `ff_demo_version` answers
/// [`LIBRARY_VERSION`].
async fn load_libraries(client: &Client) -> Result<(), Error> {
    load_library(client).await?;
    let no_args: &[&str] = &[];
    match client.fcall::<String>("ff_demo_version", no_args, no_args).await {
        Ok(version) if version == LIBRARY_VERSION => Ok(()),
        Err(e) if !is_function_missing(&e) => Err(map_err("valkey demo library check")(e)),
        _ => client.function_load_replace(LIBRARY).await.map(drop).map_err(map_err("valkey FUNCTION LOAD")),
    }
}

/// `FCALL function keys args`; when the server answers "Function not found" (restarted without
/// persistence) it loads the libraries once and calls again. A call that timed out is never
/// repeated here: it may have run.
async fn fcall<T: FromValue>(
    client: &Client,
    function: &'static str,
    keys: &[impl ToArgs],
    args: &[impl ToArgs],
) -> Result<T, Error> {
    match client.fcall(function, keys, args).await {
        Err(e) if is_function_missing(&e) => {
            tracing::warn!(
                function,
                "demo function library missing (server restarted without persistence?); reloading"
            );
            load_libraries(client).await?;
            client.fcall(function, keys, args).await.map_err(map_err(function))
        }
        other => other.map_err(map_err(function)),
    }
}

/// [`LEASE_DURATION`] as the library's argument.
fn lease_ms() -> String {
    LEASE_DURATION.as_millis().to_string()
}

/// Drives executions through the `ff_demo` function library.
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
    ids.iter().map(|id| ExecutionId::parse(id).map_err(Error::from)).collect()
}

impl ValkeyEngine {
    /// Connects and loads the subsystem's function library, then the demo's, when missing or
    /// of another version. Completions are trimmed to `MAXLEN ~`
    /// [`ValkeyConnection::stream_maxlen`](ff_completions::ValkeyConnection).
    ///
    /// # Errors
    /// A validation error for a config of another backend, or of a cluster with a database
    /// other than 0; the subsystem's unavailable, timeout or transport errors when the server
    /// refuses the connection or the credentials, is too old for functions, or the connection
    /// fails.
    pub async fn connect(config: &BackendConfig) -> Result<Self, Error> {
        let BackendConnection::Valkey(v) = &config.connection else {
            return Err(Error::validation("not a valkey config"));
        };
        let (maxlen, wait_replicas) = (v.stream_maxlen.max(1).to_string(), v.wait_replicas);
        let client = connect_client(config, "ff-completions-engine").await?;
        load_libraries(&client).await?;
        let wait_timeout = (config.timeouts.request_or_default() / 2).max(std::time::Duration::from_millis(100));
        Ok(Self { client, maxlen, next_claim: Default::default(), wait_replicas, wait_timeout })
    }

    /// The underlying client, for your own commands beside the engine's.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `FCALL` of a function that writes; with [`ValkeyConnection::wait_replicas`](ff_completions::ValkeyConnection)
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
            return Err(ff_completions::Error::Unavailable { op: "valkey WAIT", detail, source: None }.into());
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
        super::check_namespace(namespace)?;
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
            let keys = [keys::eligible(p), ff_completions::valkey::stream_key(p), keys::lease_expiry(p)];
            let ids: Vec<String> = self.write("ff_claim", &keys, &args).await?;
            claimed.extend(parse_ids(&ids)?);
        }
        Ok(claimed)
    }

    async fn complete(&self, id: &ExecutionId) -> Result<bool, Error> {
        self.flag("ff_complete", id).await
    }

    async fn complete_traced(&self, id: &ExecutionId, traceparent: &TraceParent) -> Result<bool, Error> {
        let args = [id.to_string(), traceparent.to_string(), self.maxlen.clone()];
        let n: i64 = self.write("ff_complete_traced", &keys::terminal(id), &args).await?;
        Ok(n == 1)
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
            ff_completions::valkey::stream_key(child.partition()),
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
            None => Err(ff_completions::Error::Schema {
                op: "ff_execution",
                detail: format!("{id}: no state in the reply"),
                source: None,
            }
            .into()),
        }
    }

    async fn renew_lease(&self, id: &ExecutionId, worker: &str) -> Result<bool, Error> {
        let p = id.partition();
        let keys = [keys::exec(id, "core"), ff_completions::valkey::stream_key(p), keys::lease_expiry(p)];
        let args = [id.to_string(), worker.to_owned(), lease_ms(), self.maxlen.clone()];
        let n: i64 = self.write("ff_renew_lease", &keys, &args).await?;
        Ok(n == 1)
    }

    /// One call per partition (each in its own slot), all at once.
    async fn expire_leases(&self, now: TimestampMs) -> Result<Vec<ExecutionId>, Error> {
        let swept = futures::future::try_join_all(keys::partitions().map(|p| async move {
            let keys = [keys::lease_expiry(p), ff_completions::valkey::stream_key(p), keys::eligible(p)];
            let ids: Vec<String> =
                self.write("ff_expire_leases", &keys, &[now.0.to_string(), self.maxlen.clone()]).await?;
            parse_ids(&ids)
        }))
        .await?;
        Ok(swept.into_iter().flatten().collect())
    }

    async fn revoke_lease(&self, id: &ExecutionId, revoked_by: &str) -> Result<bool, Error> {
        let p = id.partition();
        let keys =
            [keys::exec(id, "core"), ff_completions::valkey::stream_key(p), keys::eligible(p), keys::lease_expiry(p)];
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
            ff_completions::valkey::stream_key(p),
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

/// Key names of the demo's state, as documented at the top of `lab/lua/ff_demo.lua`. Every key
/// carries the `{fp:N}` hash tag of the partition it belongs to, so a terminal call's keys (its
/// completion stream included) share one cluster slot.
mod keys {
    use ff_completions::valkey::stream_key;
    use ff_completions::{ExecutionId, FlowId, PARTITION_COUNT};

    /// `ff:exec:{fp:N}:<uuid>:<part>`.
    pub(super) fn exec(id: &ExecutionId, part: &str) -> String {
        format!("ff:exec:{}:{}:{part}", id.hash_tag(), id.uuid())
    }

    /// `ff:flow:{fp:N}:<uuid>:<part>`, N being the flow's partition.
    pub(super) fn flow(flow: &FlowId, part: &str) -> String {
        format!("ff:flow:{{fp:{}}}:{}:{part}", flow.partition(), flow.uuid())
    }

    /// `ff:eligible:{fp:N}`: partition N's eligible executions, scored by creation time.
    pub(super) fn eligible(partition: u16) -> String {
        format!("ff:eligible:{{fp:{partition}}}")
    }

    /// `ff:pending_edges:{fp:N}`: `parent|child` edges whose parent (in partition N) is terminal
    /// and which are not resolved yet.
    pub(super) fn pending_edges(partition: u16) -> String {
        format!("ff:pending_edges:{{fp:{partition}}}")
    }

    /// `ff:lease_expiry:{fp:N}`: partition N's leased executions, scored by lease end (ms).
    pub(super) fn lease_expiry(partition: u16) -> String {
        format!("ff:lease_expiry:{{fp:{partition}}}")
    }

    /// Every partition.
    pub(super) fn partitions() -> impl Iterator<Item = u16> {
        0..PARTITION_COUNT
    }

    /// The partition keys every terminal call in partition N writes: stream, eligible index,
    /// pending edges.
    pub(super) fn terminal_shared(partition: u16) -> [String; 3] {
        [stream_key(partition), eligible(partition), pending_edges(partition)]
    }

    /// The keys of a terminal call on one execution: its core and children, then its partition's.
    pub(super) fn terminal(id: &ExecutionId) -> Vec<String> {
        let mut keys = vec![exec(id, "core"), exec(id, "children")];
        keys.extend(terminal_shared(id.partition()));
        keys
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn execution_keys_carry_the_hash_tag_and_match_the_library() {
            let flow = FlowId::new();
            let id = ExecutionId::new_in(&flow);
            // The library derives related keys as 'ff:exec:' .. id .. ':' .. part.
            assert_eq!(exec(&id, "core"), format!("ff:exec:{id}:core"));
            assert!(self::flow(&flow, "members").starts_with(&format!("ff:flow:{}:", id.hash_tag())));
        }

        #[test]
        fn every_key_of_a_terminal_call_shares_the_execution_s_hash_tag() {
            let id = ExecutionId::new_in(&FlowId::new());
            for key in terminal(&id) {
                assert!(key.contains(&id.hash_tag()), "{key}");
            }
            assert_eq!(partitions().count(), 256);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_library_declares_its_version_and_the_subsystem_s_channels() {
        assert!(LIBRARY.starts_with("#!lua name=ff_demo\n"));
        assert!(LIBRARY.contains(&format!("local VERSION = '{LIBRARY_VERSION}'")));
        assert!(LIBRARY.contains(&format!("local CHANNEL = '{}'", ff_completions::valkey::PUBSUB_CHANNEL)));
        assert!(LIBRARY.contains(&format!("local FAMILY_CHANNEL = '{}'", ff_completions::valkey::FAMILY_CHANNEL)));
    }

    #[test]
    fn the_demo_library_s_refusals_map_to_state_and_validation() {
        let reply = |text: &str| {
            ferriskey::Error::from((
                ferriskey::ErrorKind::ResponseError,
                "An error was signalled by the server",
                text.to_owned(),
            ))
        };
        let conflict = map_err("ff_create_execution")(reply("ff_demo conflict: execution exists"));
        assert!(matches!(conflict, Error::State { .. }), "{conflict:?}");
        let invalid = map_err("ff_complete")(reply("ff_demo invalid: bad execution id"));
        assert!(matches!(invalid, Error::Subsystem(ff_completions::Error::Validation { .. })), "{invalid:?}");
    }
}

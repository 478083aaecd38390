//! One promoter group across OS processes, shared by the `instances` example and the `groups`
//! test: the member process (this binary started again as `<bin> member …`), which writes
//! each completion's effect row in the same transaction as its acknowledgement; producers; and
//! the check of the effect rows (each completion exactly once, in commit order within its
//! partition).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{Engine, ExecutionSpec, connect_engine};
use clap::Parser;
use ff_completions::__store::Store;
use ff_completions::{
    BackendConfig, CompletionSupervisorHandle, DurableRequest, ExecutionId, FlowId, PARTITION_COUNT, StreamCursor,
    SupervisorConfig, TimestampMs,
};

use ff_completions::Error;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A member process's own arguments (`<bin> member …`).
#[derive(Parser, Debug, Clone)]
pub struct MemberArgs {
    /// The backend's URL (`postgres://…`, `sqlite://…`, `valkey://…`).
    #[arg(long)]
    backend: String,
    /// Where effect rows go: `postgres` or `sqlite`.
    #[arg(long)]
    kind: String,
    /// Their Postgres URL or SQLite file (the backend's own database, except on Valkey).
    #[arg(long)]
    at: String,
    #[arg(long)]
    group: String,
    /// Member id; none: an exclusive durable subscription.
    #[arg(long)]
    member: Option<String>,
    #[arg(long)]
    ttl_ms: u64,
    /// Time spent on each event before its effect and ack are written.
    #[arg(long, default_value_t = 0)]
    work_ms: u64,
}

/// Runs a member process when the command line asks for one (`<bin> member …`); `false`
/// otherwise.
pub fn member_main(raw: &[String]) -> bool {
    if raw.get(1).map(String::as_str) != Some("member") {
        return false;
    }
    let args = MemberArgs::parse_from(raw[1..].iter());
    // RUST_LOG=ff_completions=debug shows the member's heartbeats and reads on stderr.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(member(args)),
        Err(err) => Err(err.into()),
    };
    if let Err(err) = result {
        eprintln!("member failed: {err:#}");
        std::process::exit(1);
    }
    true
}

/// Where effect rows go, on the member's own connection to the backend's database.
pub enum EffectDb {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl EffectDb {
    pub async fn connect(kind: &str, at: &str) -> anyhow::Result<Self> {
        Ok(match kind {
            "postgres" => Self::Postgres(sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(at).await?),
            _ => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(at)
                    .create_if_missing(true)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(30));
                Self::Sqlite(sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?)
            }
        })
    }

    /// Creates the effect table afresh (an earlier run's is dropped).
    pub async fn create_table(&self) -> anyhow::Result<()> {
        const DROP: &str = "DROP TABLE IF EXISTS ff_example_group_effect";
        match self {
            Self::Postgres(pool) => {
                sqlx::query(DROP).execute(pool).await?;
                sqlx::query(
                    "CREATE TABLE ff_example_group_effect (id bigserial PRIMARY KEY, execution_id text NOT NULL, \
                     member text NOT NULL, partition int NOT NULL, cursor bytea NOT NULL, committed_ms bigint NOT NULL, done_ms bigint NOT NULL)",
                )
                .execute(pool)
                .await?;
            }
            Self::Sqlite(pool) => {
                sqlx::query(DROP).execute(pool).await?;
                sqlx::query(
                    "CREATE TABLE ff_example_group_effect (id INTEGER PRIMARY KEY AUTOINCREMENT, execution_id TEXT \
                     NOT NULL, member TEXT NOT NULL, partition INTEGER NOT NULL, cursor BLOB NOT NULL, committed_ms \
                     INTEGER NOT NULL, done_ms INTEGER NOT NULL)",
                )
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Every effect row in commit order.
    pub async fn effects(&self) -> anyhow::Result<Vec<Effect>> {
        const SELECT: &str = "SELECT execution_id, member, CAST(partition AS BIGINT), cursor, committed_ms, done_ms FROM ff_example_group_effect \
             ORDER BY id";
        let rows: Vec<(String, String, i64, Vec<u8>, i64, i64)> = match self {
            Self::Postgres(pool) => sqlx::query_as(SELECT).fetch_all(pool).await?,
            Self::Sqlite(pool) => sqlx::query_as(SELECT).fetch_all(pool).await?,
        };
        Ok(rows
            .into_iter()
            .map(|(execution_id, member, partition, cursor, committed_ms, done_ms)| Effect {
                execution_id,
                member,
                partition,
                cursor,
                committed: TimestampMs(committed_ms),
                done: TimestampMs(done_ms),
            })
            .collect())
    }
}

/// One effect row: a completion a member handled, with its cursor and when it committed.
#[derive(Clone, Debug)]
pub struct Effect {
    pub execution_id: String,
    pub member: String,
    pub partition: i64,
    pub cursor: Vec<u8>,
    /// When the completion committed (the backend's clock).
    pub committed: TimestampMs,
    /// The member's clock when it wrote the row.
    pub done: TimestampMs,
}

/// Writes the effect of `event`, with its acknowledgement in the same transaction when a
/// ticket is given; `false` when the member was fenced or the event was already acknowledged
/// (the transaction rolled back).
pub async fn apply(
    db: &EffectDb,
    member: &str,
    event: &ff_completions::CompletionEvent,
    ticket: Option<&ff_completions::AckTicket>,
) -> anyhow::Result<bool> {
    const INSERT: &str = "INSERT INTO ff_example_group_effect (execution_id, member, partition, cursor, committed_ms, done_ms) VALUES ($1, $2, \
         $3, $4, $5, $6)";
    let done = TimestampMs::now().0;
    let id = event.execution_id.to_string();
    let partition = i32::from(event.execution_id.partition());
    let cursor = event.cursor.as_bytes().to_vec();
    // The same steps on either database (their pools and transactions are different types).
    macro_rules! effect_and_ack {
        ($pool:expr) => {{
            let mut tx = $pool.begin().await?;
            sqlx::query(INSERT)
                .bind(&id)
                .bind(member)
                .bind(partition)
                .bind(&cursor)
                .bind(event.at.0)
                .bind(done)
                .execute(&mut *tx)
                .await?;
            let acked = match ticket {
                None => Ok(()),
                Some(ticket) => ticket.commit_in(&mut *tx).await,
            };
            match acked {
                Ok(()) => tx.commit().await.map(|()| true)?,
                // Dropping `tx` rolls the effect back: another member (or an earlier commit)
                // handles the event.
                Err(Error::Fenced { .. } | Error::AlreadyAcknowledged { .. }) => false,
                Err(err) => return Err(err.into()),
            }
        }};
    }
    let acked = match db {
        EffectDb::Postgres(pool) => effect_and_ack!(pool),
        EffectDb::Sqlite(pool) => effect_and_ack!(pool),
    };
    Ok(acked)
}

pub async fn member(args: MemberArgs) -> anyhow::Result<()> {
    let config = BackendConfig::from_url(&args.backend)?;
    // On Valkey the ack is a call of its own, after the effect's transaction (at least once).
    let in_transaction = !config.kind().starts_with("valkey");
    let db = EffectDb::connect(&args.kind, &args.at).await?;
    let (tree, _join) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(config)).await?;
    let ttl = Duration::from_millis(args.ttl_ms);
    let request = match &args.member {
        Some(member) => DurableRequest::group(&args.group).with_member(member),
        None => DurableRequest::exclusive(&args.group),
    };
    let mut events = tree.subscribe(request.with_lease_ttl(ttl)).await?;
    let name = events.member().to_owned();
    println!("joined {name}");
    while let Some(event) = events.next().await {
        let event = event?;
        let ticket = match events.ticket(&event.cursor) {
            Ok(ticket) => ticket,
            Err(err) => {
                // Its partition moved on before the work began: another member handles it.
                println!("skipped {}: {err}", event.execution_id);
                continue;
            }
        };
        tokio::time::sleep(Duration::from_millis(args.work_ms)).await;
        let acked = if in_transaction {
            apply(&db, &name, &event, Some(&ticket)).await?
        } else {
            apply(&db, &name, &event, None).await?;
            match events.ack(&event.cursor).await {
                Ok(()) => true,
                Err(Error::Fenced { .. } | Error::Validation { .. }) => false,
                Err(err) => return Err(err.into()),
            }
        };
        if !acked {
            println!("fenced {}", event.execution_id);
        }
    }
    anyhow::bail!("the durable subscription ended")
}

/// A member process; killed when dropped.
pub struct MemberProcess {
    child: Child,
    pid: i32,
    /// Lines it printed (`joined …`, `fenced …`).
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl MemberProcess {
    pub fn spawn(run: &Run, group: &str, member: Option<&str>, ttl: Duration, work: Duration) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut command = Command::new(exe);
        command
            .arg("member")
            .args(["--backend", &run.backend.to_string(), "--kind", run.kind, "--at", &run.at, "--group", group])
            .args(["--ttl-ms", &ttl.as_millis().to_string(), "--work-ms", &work.as_millis().to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if let Some(member) = member {
            command.args(["--member", member]);
        }
        let mut child = command.spawn()?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).ok_or_else(|| anyhow::anyhow!("no pid"))?;
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(stdout) = child.stdout.take() {
            let lines = lines.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        Ok(Self { child, pid, lines })
    }

    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill").args([signal, &self.pid.to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill {signal} {}", self.pid);
        Ok(())
    }

    /// Whether it has exited (by itself: its stream ended, or it failed).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|status| status.is_some())
    }

    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.signal("-KILL")?;
        self.child.wait().await?;
        Ok(())
    }

    /// What follows `prefix` in each line it printed that starts with it.
    fn lines_after(&self, prefix: &str) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().filter_map(|l| l.strip_prefix(prefix)).map(str::to_owned).collect()
    }

    /// The completions whose ack it reported fenced.
    fn fenced_ids(&self) -> Vec<String> {
        self.lines_after("fenced ")
    }

    pub fn fenced(&self) -> usize {
        self.fenced_ids().len()
    }

    /// Events it dropped because their partition had moved on before it began them.
    pub fn skipped(&self) -> usize {
        self.lines_after("skipped ").len()
    }
}

/// Completions the producers committed.
#[derive(Default)]
pub struct Produced {
    pub completed: std::sync::Mutex<Vec<ExecutionId>>,
    pub stop: AtomicBool,
    pub count: AtomicU64,
}

/// Creates flows of five executions and completes them, one after the other, `pace` apart.
pub async fn produce(engine: Arc<dyn Engine>, produced: Arc<Produced>, worker: String, pace: Duration) {
    produce_outside(engine, produced, worker, pace, None).await;
}

/// As [`produce`], never in partition `avoid`.
pub async fn produce_outside(
    engine: Arc<dyn Engine>,
    produced: Arc<Produced>,
    worker: String,
    pace: Duration,
    avoid: Option<u16>,
) {
    while !produced.stop.load(Ordering::Relaxed) {
        let flow = FlowId::new();
        if avoid.is_some_and(|p| ExecutionId::new_in(&flow).partition() == p) {
            continue;
        }
        if engine.create_flow(&flow, None).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for _ in 0..5 {
            let spec = ExecutionSpec::new(&flow);
            let _ = engine.create_execution(&spec).await;
        }
        for id in engine.claim(&worker, 5).await.unwrap_or_default() {
            if let Ok(true) = engine.complete(&id).await {
                produced.completed.lock().unwrap_or_else(|p| p.into_inner()).push(id);
                produced.count.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(pace).await;
        }
    }
}

/// Waits until the group has `members` live members holding all partitions between them.
pub async fn converged(store: &Store, group: &str, members: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(view) = store.view(group).await? {
            let now = ff_completions::TimestampMs::now();
            let mut held: HashMap<&str, usize> = HashMap::new();
            for p in &view.partitions {
                if let Some((owner, expires)) = &p.owner
                    && *expires > now
                {
                    *held.entry(owner.as_str()).or_default() += 1;
                }
            }
            let total: usize = held.values().sum();
            let fair = usize::from(PARTITION_COUNT).div_ceil(members);
            // Members that join one after another settle near an even share (86/86/84 for three).
            if held.len() == members
                && total == usize::from(PARTITION_COUNT)
                && held.values().all(|n| *n + members >= fair)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("group {group} did not converge on {members} members: {held:?}, {total} held");
            }
        } else if Instant::now() > deadline {
            anyhow::bail!("group {group} was never created");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the effect rows show against what was committed.
#[derive(Debug, Default)]
pub struct Verdict {
    pub expected: usize,
    pub effects: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub unexpected: usize,
    pub out_of_order: usize,
    /// Repeats allowed by [`judge_allowing_repeats`].
    pub repeated: usize,
    /// A few of the lost completions, to look them up.
    pub lost_examples: Vec<String>,
    /// The first few duplicated completions, each with the member that wrote it first and again.
    pub duplicate_examples: Vec<String>,
    /// The effects written in the first lost completion's partition, in commit order.
    pub lost_context: Vec<String>,
    pub by_member: BTreeMap<String, usize>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost + self.duplicated + self.unexpected + self.out_of_order == 0 && self.expected > 0
    }

    /// What to print when the check failed: some lost and duplicated completions, and the
    /// effects of the first lost one's partition.
    pub fn explain(&self) -> Vec<String> {
        let lost = (!self.lost_examples.is_empty()).then(|| format!("lost, e.g. {:?}", self.lost_examples));
        lost.into_iter()
            .chain(self.duplicate_examples.iter().cloned())
            .chain(self.lost_context.iter().cloned())
            .collect()
    }
}

/// Which completions' effects may be written twice, for acks that are not in the effect's
/// transaction (Valkey): those whose first effect was written by a member killed before it
/// could ack, and those whose ack the member reported fenced (the partition had moved on).
#[derive(Clone, Debug, Default)]
pub struct Repeats {
    pub killed: Vec<String>,
    pub fenced: std::collections::HashSet<String>,
}

impl Repeats {
    /// The repeats of members `killed` (by id) and those whose ack one of `members` reported
    /// fenced.
    pub fn after_interruptions<'a>(
        killed: impl IntoIterator<Item = String>,
        members: impl IntoIterator<Item = &'a MemberProcess>,
    ) -> Self {
        Self {
            killed: killed.into_iter().collect(),
            fenced: members.into_iter().flat_map(MemberProcess::fenced_ids).collect(),
        }
    }

    fn allows(&self, execution: &str, first_member: &str) -> bool {
        self.killed.iter().any(|k| k == first_member) || self.fenced.contains(execution)
    }
}

/// Where an effect's completion stands in its partition's order: its cursor, or on Valkey
/// (a cursor names every partition's stream) the stream id of its own partition.
fn order_key(effect: &Effect) -> Vec<u8> {
    let cursor = StreamCursor::new(effect.cursor.clone());
    match ff_completions::cursor::decode_valkey_frontier(&cursor) {
        Ok(Some(lanes)) => lanes
            .iter()
            .find(|(lane, _, _)| i64::from(*lane) == effect.partition)
            .map(|(_, ms, seq)| [ms.to_be_bytes(), seq.to_be_bytes()].concat())
            .unwrap_or_default(),
        _ => effect.cursor.clone(),
    }
}

/// Judges the effect rows against the completions `expected`: each once, in order within its
/// partition, allowing the repeats `repeats` allows (counted apart; order is judged on first
/// copies).
pub fn judge_allowing_repeats(expected: &[ExecutionId], effects: &[Effect], repeats: &Repeats) -> Verdict {
    let mut verdict = Verdict { expected: expected.len(), effects: effects.len(), ..Verdict::default() };
    let mut first_by: HashMap<&str, &str> = HashMap::new();
    let mut last_in_partition: HashMap<i64, Vec<u8>> = HashMap::new();
    for effect in effects {
        *verdict.by_member.entry(effect.member.clone()).or_default() += 1;
        if let Some(first) = first_by.get(effect.execution_id.as_str()) {
            if repeats.allows(&effect.execution_id, first) {
                verdict.repeated += 1;
            } else {
                verdict.duplicated += 1;
                if verdict.duplicated <= 5 {
                    verdict.duplicate_examples.push(format!(
                        "duplicate {} first by {first}, again by {} (committed {}, done {})",
                        effect.execution_id, effect.member, effect.committed.0, effect.done.0
                    ));
                }
            }
            continue;
        }
        first_by.insert(effect.execution_id.as_str(), effect.member.as_str());
        let key = order_key(effect);
        if let Some(last) = last_in_partition.insert(effect.partition, key.clone())
            && last >= key
        {
            verdict.out_of_order += 1;
        }
    }
    let wanted: std::collections::HashSet<String> = expected.iter().map(ToString::to_string).collect();
    let lost: Vec<&String> = wanted.iter().filter(|id| !first_by.contains_key(id.as_str())).collect();
    verdict.lost = lost.len();
    verdict.lost_examples = lost.iter().take(5).map(|id| id.to_string()).collect();
    if let Some(partition) = lost.first().and_then(|id| ExecutionId::parse(id).ok()).map(|id| i64::from(id.partition()))
    {
        verdict.lost_context = effects
            .iter()
            .filter(|e| e.partition == partition)
            .map(|e| {
                format!(
                    "{} by {} committed {} done {} key {}",
                    e.execution_id,
                    e.member,
                    e.committed.0,
                    e.done.0,
                    hex::encode(order_key(e))
                )
            })
            .collect();
    }
    verdict.unexpected = first_by.keys().filter(|id| !wanted.contains(**id)).count();
    verdict
}

/// Waits until the effect rows cover every completion (or `timeout`), then judges them.
pub async fn settle(db: &EffectDb, produced: &Produced, timeout: Duration) -> anyhow::Result<Verdict> {
    settle_allowing_repeats(db, produced, timeout, &Repeats::default()).await
}

/// As [`settle`], judged by [`judge_allowing_repeats`].
pub async fn settle_allowing_repeats(
    db: &EffectDb,
    produced: &Produced,
    timeout: Duration,
    repeats: &Repeats,
) -> anyhow::Result<Verdict> {
    let expected = produced.completed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let deadline = Instant::now() + timeout;
    loop {
        let effects = db.effects().await?;
        let verdict = judge_allowing_repeats(&expected, &effects, repeats);
        if verdict.lost == 0 || Instant::now() > deadline {
            // A little longer: a duplicate would arrive after the last first delivery.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(judge_allowing_repeats(&expected, &db.effects().await?, repeats));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One backend with its producers, its effect rows and a view of the group.
pub struct Run {
    /// The backend.
    pub backend: BackendConfig,
    /// Where effect rows go: `postgres` or `sqlite`.
    pub kind: &'static str,
    /// Their Postgres URL or SQLite file.
    pub at: String,
    pub engine: Arc<dyn Engine>,
    pub db: EffectDb,
    pub store: Store,
    pub produced: Arc<Produced>,
    producers: Vec<tokio::task::JoinHandle<()>>,
}

impl Run {
    /// Connects to a Postgres URL or an SQLite file and creates the effect table there.
    pub async fn start(kind: &'static str, at: String) -> anyhow::Result<Self> {
        let backend = match kind {
            "postgres" => BackendConfig::postgres(&at),
            _ => BackendConfig::sqlite(&at),
        };
        Self::start_with(backend, kind, at).await
    }

    /// Connects to `backend`, with effect rows in a Postgres URL or an SQLite file of their own.
    pub async fn start_with(backend: BackendConfig, kind: &'static str, at: String) -> anyhow::Result<Self> {
        let engine = connect_engine(&backend).await?;
        let db = EffectDb::connect(kind, &at).await?;
        db.create_table().await?;
        let store = Store::open(&backend).await?;
        Ok(Self { backend, kind, at, engine, db, store, produced: Arc::default(), producers: Vec::new() })
    }

    /// Starts `producers` producers, each completing one execution every `pace`.
    pub fn produce(&mut self, producers: usize, pace: Duration) {
        self.produce_outside(producers, pace, None);
    }

    /// As [`Self::produce`], never in partition `avoid`.
    pub fn produce_outside(&mut self, producers: usize, pace: Duration, avoid: Option<u16>) {
        for i in 0..producers {
            let (engine, produced) = (self.engine.clone(), self.produced.clone());
            let worker = format!("producer-{i}");
            self.producers.push(tokio::spawn(produce_outside(engine, produced, worker, pace, avoid)));
        }
    }

    /// Stops the producers and waits for them.
    pub async fn stop_producing(&mut self) {
        self.produced.stop.store(true, Ordering::Relaxed);
        for producer in self.producers.drain(..) {
            let _ = producer.await;
        }
    }
}

//! A throwaway Postgres for the whole test binary: `initdb` into a temp dir (as the `postgres`
//! OS user when running as root), started on a free loopback port, stopped and removed by a
//! watchdog when the test process exits. Each test gets its own fresh database.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::OnceCell;

use ff_completions::ExecutionId;

use super::free_port;
use super::tls::TestCa;

/// The role of a TLS server ([`PrivatePg::start_tls`]) that logs in with a password (scram,
/// over TLS only) and owns its database [`TLS_DATABASE`].
pub const TLS_PASSWORD_USER: &str = "ff_app";
/// The role of a TLS server that logs in with a client certificate of the server's CA (its
/// common name), over TLS only; a member of [`TLS_PASSWORD_USER`].
pub const TLS_CERT_USER: &str = "ff_cert";
/// The database of a TLS server that [`TLS_PASSWORD_USER`] owns (a schema owner who is not a
/// superuser installs the subsystem there).
pub const TLS_DATABASE: &str = "app";

/// `pg_hba.conf` of a TLS server: the harness's `postgres` from loopback without a password
/// (TLS or not), every other role over TLS only, by client certificate or by password.
const TLS_HBA: &str = "\
local all all trust
host all postgres 127.0.0.1/32 trust
hostssl all ff_cert 127.0.0.1/32 cert
hostssl all all 127.0.0.1/32 scram-sha-256
hostnossl all all 127.0.0.1/32 reject
";

/// TLS on, with the files [`PrivatePg::start_tls`] puts in the data directory.
const TLS_SETTINGS: Settings = &[("ssl", "on"), ("ssl_ca_file", "root.crt"), ("password_encryption", "scram-sha-256")];

/// The running server.
pub struct PgServer {
    /// Loopback port it listens on.
    pub port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
}

static SERVER: OnceCell<PgServer> = OnceCell::const_new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The shared server, started on first use.
pub async fn server() -> &'static PgServer {
    SERVER.get_or_init(|| async { tokio::task::spawn_blocking(start).await.expect("start postgres") }).await
}

/// A URL of a fresh, empty database on the shared server.
pub async fn fresh_database() -> String {
    server().await.fresh_database().await
}

fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres is not installed: run scripts/test.sh, which installs Debian's postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0)
    });
    versions.pop().expect("no /usr/lib/postgresql/<v>/bin/postgres found: run scripts/test.sh")
}

pub(crate) fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// Runs a command as the `postgres` OS user when we are root.
pub(crate) fn as_server_user(program: &str) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", program]);
        cmd
    } else {
        Command::new(program)
    }
}

/// Waits for a background process on a thread of its own, so it never lingers as a zombie.
pub(crate) fn reap(mut child: std::process::Child) {
    std::thread::spawn(move || {
        let _ = child.wait();
    });
}

/// Creates a data directory owned by the server user and runs `initdb` in it.
fn init_data_dir(bin: &std::path::Path) -> PathBuf {
    let data_dir = std::env::temp_dir().join(format!("ff-completions-pg-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&data_dir).expect("create data dir");
    if is_root() {
        let ok = Command::new("chown").arg("postgres:postgres").arg(&data_dir).status().map(|s| s.success());
        assert_eq!(ok.ok(), Some(true), "chown data dir to postgres (is the postgres user there?)");
    }
    let initdb = as_server_user(bin.join("initdb").to_str().expect("utf-8 path"))
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "-D"])
        .arg(&data_dir)
        .stdout(Stdio::null())
        .output()
        .expect("run initdb");
    assert!(initdb.status.success(), "initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
    data_dir
}

/// Server settings on top of the throwaway defaults (no fsync, no synchronous commit).
pub type Settings = &'static [(&'static str, &'static str)];

/// synchronous_commit on: a SIGKILLed server loses no commit.
pub const DURABLE_COMMITS: Settings = &[("synchronous_commit", "on")];

/// Commits flushed to disk as in production (fsync and synchronous_commit on), and
/// pg_stat_statements loaded: for benchmarks of what producers pay per commit.
pub const FSYNC_AND_STATEMENT_STATS: Settings = &[
    ("synchronous_commit", "on"),
    ("fsync", "on"),
    ("full_page_writes", "on"),
    ("shared_preload_libraries", "pg_stat_statements"),
];

/// Starts `postgres` on `data_dir` and `port` under a watchdog that stops it when this test
/// process exits (and then removes the data), and waits until it accepts connections.
/// `settings` override the throwaway defaults.
fn launch(bin: &std::path::Path, data_dir: &std::path::Path, port: u16, settings: Settings) {
    let extra: String = settings.iter().map(|(k, v)| format!(" -c {k}={v}")).collect();
    let script = format!(
        "{postgres} -D {dir} -p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={dir} \
         -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400 \
         -c shared_buffers=64MB{extra} >> {dir}/server.log 2>&1 &
         pg=$!
         while [ -d /proc/{parent} ] && kill -0 $pg 2>/dev/null; do sleep 0.2; done
         kill -INT $pg 2>/dev/null; wait $pg
         [ -d /proc/{parent} ] || rm -rf {dir}",
        postgres = bin.join("postgres").display(),
        dir = data_dir.display(),
        parent = std::process::id(),
    );
    let watchdog = as_server_user("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn postgres");
    reap(watchdog);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "postgres did not start; see {}/server.log", data_dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start() -> PgServer {
    let bin = bin_dir();
    let data_dir = init_data_dir(&bin);
    let port = free_port();
    // Commit timestamps: benchmarks measure delivery from the server's own commit time.
    launch(&bin, &data_dir, port, &[("track_commit_timestamp", "on")]);
    PgServer { port, data_dir }
}

/// A server of one test's own, which it may SIGKILL and start again on the same data and port.
pub struct PrivatePg {
    /// Loopback port it listens on.
    pub port: u16,
    bin: PathBuf,
    data_dir: PathBuf,
    settings: Settings,
}

impl PrivatePg {
    /// Initialises and starts a new server whose commits survive a SIGKILL.
    pub async fn start() -> Self {
        Self::start_with(DURABLE_COMMITS).await
    }

    /// Initialises and starts a new server with `settings`.
    pub async fn start_with(settings: Settings) -> Self {
        let server = tokio::task::spawn_blocking(move || {
            let bin = bin_dir();
            let data_dir = init_data_dir(&bin);
            let port = free_port();
            launch(&bin, &data_dir, port, settings);
            Self { port, bin, data_dir, settings }
        })
        .await
        .expect("start private postgres");
        drop(connect_when_up(&server.url()).await);
        server
    }

    /// A server with `ssl = on`, a certificate of `ca` for the name `localhost` only (not for
    /// `127.0.0.1`), and `ca` as the authority of client certificates. Roles other than the
    /// harness's `postgres` connect over TLS only: [`TLS_PASSWORD_USER`] with `password`,
    /// [`TLS_CERT_USER`] with a client certificate of `ca`; both may install the subsystem in
    /// [`TLS_DATABASE`], which the first owns.
    pub async fn start_tls(ca: &TestCa, password: &str) -> Self {
        let server_files = ca.server(&["localhost"]);
        let root = ca.cert.clone();
        let server = tokio::task::spawn_blocking(move || {
            let bin = bin_dir();
            let data_dir = init_data_dir(&bin);
            for (from, to) in
                [(&server_files.cert, "server.crt"), (&server_files.key, "server.key"), (&root, "root.crt")]
            {
                std::fs::copy(from, data_dir.join(to)).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
            }
            std::fs::write(data_dir.join("pg_hba.conf"), TLS_HBA).expect("write pg_hba.conf");
            let key = data_dir.join("server.key");
            let ok = Command::new("chmod").arg("600").arg(&key).status().map(|s| s.success());
            assert_eq!(ok.ok(), Some(true), "chmod 600 server.key");
            if is_root() {
                let ok = Command::new("chown")
                    .arg("-R")
                    .arg("postgres:postgres")
                    .arg(&data_dir)
                    .status()
                    .map(|s| s.success());
                assert_eq!(ok.ok(), Some(true), "chown the data dir");
            }
            let port = free_port();
            launch(&bin, &data_dir, port, TLS_SETTINGS);
            Self { port, bin, data_dir, settings: TLS_SETTINGS }
        })
        .await
        .expect("start postgres with TLS");
        let mut admin = connect_when_up(&server.url()).await;
        for statement in [
            format!("CREATE ROLE {TLS_PASSWORD_USER} LOGIN PASSWORD '{password}'"),
            format!("CREATE ROLE {TLS_CERT_USER} LOGIN IN ROLE {TLS_PASSWORD_USER}"),
            format!("CREATE DATABASE {TLS_DATABASE} OWNER {TLS_PASSWORD_USER}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut admin)
                .await
                .expect("set up the TLS server's roles");
        }
        server
    }

    /// URL of a database on it.
    pub fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn postmaster_pid(&self) -> Option<String> {
        let pid_file = self.data_dir.join("postmaster.pid");
        let text = as_server_user("cat").arg(&pid_file).output().ok()?;
        String::from_utf8(text.stdout).ok()?.lines().next().map(str::to_owned)
    }

    /// SIGKILLs the postmaster and waits until nothing of it is left.
    pub async fn kill9(&self) {
        let pid = self.postmaster_pid().expect("postmaster.pid");
        let killed = Command::new("kill").args(["-9", &pid]).status().map(|s| s.success());
        assert_eq!(killed.ok(), Some(true), "kill -9 {pid}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            || Command::new("pgrep")
                .args(["-f", &format!("{}", self.data_dir.display())])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false)
        {
            assert!(Instant::now() < deadline, "postgres did not die");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server as `pg_ctl stop -m immediate` does: no checkpoint, no flush of what is
    /// still in WAL buffers (a crash, as far as the data is concerned).
    pub async fn stop_immediate(&self) {
        let (bin, dir) = (self.bin.clone(), self.data_dir.clone());
        let stopped = tokio::task::spawn_blocking(move || {
            as_server_user(bin.join("pg_ctl").to_str().expect("utf-8 path"))
                .args(["stop", "-m", "immediate", "-D"])
                .arg(&dir)
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
        })
        .await
        .expect("pg_ctl");
        assert_eq!(stopped.ok(), Some(true), "pg_ctl stop -m immediate");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "postgres did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A base backup of the running server (`pg_basebackup`, WAL streamed with it), in a new
    /// directory owned by the server user.
    pub async fn base_backup(&self) -> PathBuf {
        let (bin, port) = (self.bin.clone(), self.port);
        let dir = std::env::temp_dir().join(format!("ff-completions-pg-backup-{}-{}", std::process::id(), free_port()));
        let target = dir.clone();
        let out = tokio::task::spawn_blocking(move || {
            as_server_user(bin.join("pg_basebackup").to_str().expect("utf-8 path"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "-D",
                ])
                .arg(&target)
                .output()
        })
        .await
        .expect("pg_basebackup")
        .expect("run pg_basebackup");
        assert!(out.status.success(), "pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
        dir
    }

    /// A server started as a primary on `data_dir` (a base backup), on `port` (a new one when
    /// `None`: the same one lets clients reconnect to it as to the server it replaces).
    pub async fn start_from(data_dir: PathBuf, settings: Settings, port: Option<u16>) -> Self {
        let server = tokio::task::spawn_blocking(move || {
            let bin = bin_dir();
            let port = port.unwrap_or_else(free_port);
            launch(&bin, &data_dir, port, settings);
            Self { port, bin, data_dir, settings }
        })
        .await
        .expect("start postgres from a backup");
        drop(connect_when_up(&server.url()).await);
        server
    }

    /// Copies database `database` to database `into` of `other` with `pg_dump -Fc` and
    /// `pg_restore`, as an operator moving a database to a new cluster does.
    pub async fn dump_into(&self, database: &str, other: &PrivatePg, into: &str) {
        let mut admin = connect_when_up(&other.url()).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {into}")))
            .execute(&mut admin)
            .await
            .expect("createdb");
        let (bin, from, to) = (self.bin.clone(), self.url_of(database), other.url_of(into));
        let file = std::env::temp_dir().join(format!("ff-completions-dump-{}-{}", std::process::id(), free_port()));
        let out = tokio::task::spawn_blocking(move || {
            let dump = Command::new(bin.join("pg_dump")).args(["-Fc", "-f"]).arg(&file).arg(&from).output()?;
            if !dump.status.success() {
                return Ok::<_, std::io::Error>(dump);
            }
            let restore = Command::new(bin.join("pg_restore")).args(["--exit-on-error", "-d", &to]).arg(&file).output();
            let _ = std::fs::remove_file(&file);
            restore
        })
        .await
        .expect("pg_dump")
        .expect("run pg_dump and pg_restore");
        assert!(out.status.success(), "pg_dump/pg_restore failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts the server again on the same data directory and port.
    pub async fn restart(&self) {
        let (bin, dir, port, settings) = (self.bin.clone(), self.data_dir.clone(), self.port, self.settings);
        tokio::task::spawn_blocking(move || launch(&bin, &dir, port, settings)).await.expect("restart postgres");
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill").args(["-INT", &pid]).status();
            let cleanup =
                format!("while kill -0 {pid} 2>/dev/null; do sleep 0.1; done; rm -rf {}", self.data_dir.display());
            if let Ok(child) =
                as_server_user("sh").args(["-c", &cleanup]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
            {
                reap(child);
            }
        }
    }
}

impl PgServer {
    /// URL of a database on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a new empty database and returns its URL.
    pub async fn fresh_database(&self) -> String {
        let name = format!("t{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed));
        let mut admin = connect_when_up(&self.url("postgres")).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create database");
        self.url(&name)
    }
}

/// Connects to `url` once the server accepts sessions: a server whose port already accepts
/// TCP may still answer "the database system is starting up" for a moment.
pub async fn connect_when_up(url: &str) -> PgConnection {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match PgConnection::connect(url).await {
            Ok(conn) => return conn,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot reach test postgres: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The reader's promised order, computed independently of the reader from the recorded ticks: a
/// row belongs to the batch of the first tick whose snapshot sees it; batches in tick order,
/// `(txid, event_id)` within a batch. A tick is recorded first, so every committed row has one.
pub async fn reader_order(url: &str) -> Vec<ExecutionId> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("SELECT ff_completions_tick()").execute(&mut conn).await.expect("tick");
    let rows: Vec<(uuid::Uuid, i16)> = sqlx::query_as(
        "SELECT e.execution_id, e.partition_key FROM ff_completion_event e \
           JOIN LATERAL (SELECT min(t.tick_id) AS tick FROM ff_completion_tick t \
                          WHERE e.txid IS NULL OR pg_visible_in_snapshot(e.txid, t.snapshot)) b ON true \
          ORDER BY b.tick, e.txid NULLS FIRST, e.event_id",
    )
    .fetch_all(&mut conn)
    .await
    .expect("read outbox");
    rows.into_iter().map(|(u, p)| ExecutionId::from_parts(p as u16, u)).collect()
}

/// Completes `id` through the demo engine's SQL function on `conn`, inside whatever transaction
/// it holds, as a producer that sends no wake-up would; asserts the execution was running.
pub async fn complete_by_sql(conn: &mut PgConnection, id: ExecutionId) {
    let done: bool = sqlx::query_scalar("SELECT ff_complete_execution($1)")
        .bind(id.uuid())
        .fetch_one(conn)
        .await
        .expect("ff_complete_execution");
    assert!(done, "{id} was not running");
}

/// Pages of the outbox, its partitions and their indexes (hit or read) that `statement` touched,
/// from the server's I/O statistics of those tables alone.
pub async fn outbox_pages(conn: &mut PgConnection, statement: &str) -> i64 {
    async fn so_far(conn: &mut PgConnection) -> i64 {
        sqlx::query("SELECT pg_stat_force_next_flush()").execute(&mut *conn).await.expect("flush statistics");
        sqlx::query_scalar(
            "SELECT coalesce(sum(heap_blks_hit + heap_blks_read + coalesce(idx_blks_hit, 0) + coalesce(idx_blks_read, 0)), 0)::int8 \
               FROM pg_statio_user_tables s \
              WHERE s.relid = 'ff_completion_event'::regclass \
                 OR s.relid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'ff_completion_event'::regclass)",
        )
        .fetch_one(&mut *conn)
        .await
        .expect("outbox I/O statistics")
    }
    let before = so_far(conn).await;
    sqlx::query(sqlx::AssertSqlSafe(statement.to_owned())).execute(&mut *conn).await.expect("read");
    so_far(conn).await - before
}

/// The reader's next read after its newest batch, as the listener calls it.
pub async fn read_at_head(conn: &mut PgConnection) -> String {
    let (tick, fingerprint): (i64, i64) =
        sqlx::query_as("SELECT o_tick, o_fingerprint FROM ff_completions_head()").fetch_one(conn).await.expect("head");
    format!("SELECT * FROM ff_completions_read({}, 0, 0, -32769, {fingerprint}, 512)", 3 * tick + 2)
}

//! A throwaway PgBouncer (Debian's package, `/usr/sbin/pgbouncer`: 1.18 on Debian 12) in front
//! of a test Postgres, in `pool_mode = transaction` with its defaults otherwise (no
//! `ignore_startup_parameters`, no prepared-statement support, which came in 1.21): each
//! transaction gets whichever server session is free, as in a pooled deployment. Started as
//! the `postgres` OS user when running as root (PgBouncer refuses root) under a watchdog that
//! stops it when the test process exits; stopped on drop.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::postgres::{as_server_user, is_root, reap};

/// The binary of Debian's `pgbouncer` package.
const BINARY: &str = "/usr/sbin/pgbouncer";

/// A running PgBouncer.
pub struct PgBouncer {
    /// Loopback port it listens on.
    pub port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    /// Starts PgBouncer in transaction mode in front of the Postgres on `pg_port`, for every
    /// database, with `users` allowed in (trust: the server itself authenticates nothing
    /// more here), `pool_size` server sessions per database and user.
    pub async fn start(pg_port: u16, users: &[&str], pool_size: u32) -> Self {
        assert!(
            std::path::Path::new(BINARY).exists(),
            "{BINARY} not found: run scripts/test.sh, which installs Debian's pgbouncer"
        );
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("ff-completions-pgbouncer-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        let users_file: String = users.iter().map(|u| format!("\"{u}\" \"\"\n")).collect();
        std::fs::write(dir.join("users.txt"), users_file).expect("users.txt");
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port={pg_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nserver_tls_sslmode = disable\nauth_type = trust\nauth_file = {dir}/users.txt\npool_mode = transaction\n\
             default_pool_size = {pool_size}\nmax_client_conn = 500\nserver_reset_query =\n\
             logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("pgbouncer.ini");
        if is_root() {
            let ok = Command::new("chown").arg("-R").arg("postgres:postgres").arg(&dir).status().map(|s| s.success());
            assert_eq!(ok.ok(), Some(true), "chown the pgbouncer dir");
        }
        let script = format!(
            "{BINARY} -q {dir}/pgbouncer.ini >> {dir}/pgbouncer.log 2>&1 &
             pb=$!
             while [ -d /proc/{parent} ] && kill -0 $pb 2>/dev/null; do sleep 0.2; done
             kill -INT $pb 2>/dev/null; wait $pb
             rm -rf {dir}",
            dir = dir.display(),
            parent = std::process::id(),
        );
        let watchdog = as_server_user("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pgbouncer");
        reap(watchdog);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "pgbouncer did not start; see {}/pgbouncer.log", dir.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { port, dir }
    }

    /// URL of `database` through the pooler, as `user`.
    pub fn url_as(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// URL of `database` through the pooler, as `postgres`.
    pub fn url(&self, database: &str) -> String {
        self.url_as("postgres", database)
    }

    /// The same URL as `direct` (a database of the server behind the pooler), through the pooler.
    pub fn pooled(&self, direct: &str) -> String {
        let mut url = url::Url::parse(direct).expect("a postgres URL");
        url.set_port(Some(self.port)).expect("a port");
        url.into()
    }

    /// The pooler's log (what it refused, and why).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.join("pgbouncer.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<u32>() {
            let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
        }
    }
}

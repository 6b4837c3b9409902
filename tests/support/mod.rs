//! Test support shared by the integration tests: a real `redis-server` on a free loopback port
//! that a test can stop, restart and flush, and layer fixtures for both backends.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard::layer::{Layer, LayerSettings};

/// A `redis-server` child process on 127.0.0.1, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    extra: Vec<String>,
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_bin() -> String {
    std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned())
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// As [`RedisServer::start`], with more redis-server arguments (a TLS port, a unix socket…).
    pub fn start_with(extra: &[&str]) -> Self {
        let extra = extra.iter().map(|a| (*a).to_owned()).collect();
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            extra,
        };
        // A free port can be taken by another test between the probe and redis-server's bind;
        // the server then exits at once, and another port is tried.
        for _ in 0..4 {
            if server.try_spawn() {
                return server;
            }
            server.stop();
            server.port = free_port();
        }
        server.spawn();
        server
    }

    /// A server that also listens for TLS on another free port, with the certificate (and
    /// key) at these paths as its own and as the CA it trusts; returns it and its TLS port.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> (Self, u16) {
        let tls_port = free_port();
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let server = Self::start_with(&[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            cert,
            "--tls-auth-clients",
            "no",
        ]);
        (server, tls_port)
    }

    fn spawn(&mut self) {
        if !self.try_spawn() {
            panic!(
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
        }
    }

    /// Starts redis-server on this port; false when it exited or did not answer PING in 10 s.
    fn try_spawn(&mut self) -> bool {
        let child = Command::new(redis_bin())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (install it: apt-get install -y redis-server)",
                    redis_bin()
                )
            });
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && matches!(child.try_wait(), Ok(Some(_)))
            {
                return false;
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 7];
                    // With `--requirepass` an unauthenticated PING is refused, but answered.
                    if s.read_exact(&mut buf).is_ok()
                        && (&buf == b"+PONG\r\n" || &buf == b"-NOAUTH")
                    {
                        // Answered, and by ours unless it just exited (its port was taken).
                        return self
                            .child
                            .as_mut()
                            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Sends a signal to the server process (`STOP` freezes it with its connections open).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {pid} failed");
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0` (`redis://:PASSWORD@…` when started with `--requirepass`)
    pub fn url(&self) -> String {
        match self.password() {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// The `--requirepass` it was started with.
    pub fn password(&self) -> Option<&str> {
        let at = self.extra.iter().position(|a| a == "--requirepass")?;
        self.extra.get(at + 1).map(String::as_str)
    }

    /// Kills the server and waits for it to exit (its data is gone: it keeps nothing on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A synchronous client connection for inspecting or corrupting what is stored.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// Runs one command synchronously and returns its reply.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&[u8]]) -> T {
        self.try_cmd(args).unwrap()
    }

    /// How many times Redis ran `command` (lower case, as `INFO commandstats` names it), the
    /// calls scripts made included; 0 when never.
    #[allow(dead_code)]
    pub fn command_calls(&self, command: &str) -> u64 {
        let info: String = self.cmd(&[b"INFO", b"commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// As [`RedisServer::cmd`], returning the server's error instead of panicking.
    #[allow(dead_code)]
    pub fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&[u8]]) -> redis::RedisResult<T> {
        let mut conn = self.client().get_connection().unwrap();
        let mut cmd = redis::cmd(std::str::from_utf8(args[0]).unwrap());
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A directory under the system temp dir, removed on drop (the harness's config files and the
/// replication files redis-server writes, kept out of the source tree).
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// A fresh, empty directory named after `tag`.
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "switchyard-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// `name` inside it, as a string for command lines.
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (`limit` at most) until `cond` holds, polling every 20 ms; panics with `what`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Redis Cluster of `redis-server --cluster-enabled yes` nodes on free ports, every slot
/// assigned (`redis-cli --cluster create`), all killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes, masters first (`--cluster-replicas` puts replicas last).
    pub nodes: Vec<RedisServer>,
    dir: TempDir,
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each, waiting (30 s at most) until every
    /// node says `cluster_state:ok`.
    pub fn start(masters: usize, replicas: usize) -> Self {
        let dir = TempDir::new("cluster");
        let mut nodes = Vec::new();
        for i in 0..masters * (1 + replicas) {
            let conf = dir.file(&format!("nodes-{i}.conf"));
            // Each node its own RDB file: a replica's full sync writes one into the shared dir.
            let rdb = format!("node-{i}.rdb");
            // The bus port is chosen free too: by default it is the port + 10000, which may be
            // taken, or past 65535.
            let bus = free_port().to_string();
            nodes.push(RedisServer::start_with(&[
                "--cluster-port",
                &bus,
                "--dbfilename",
                &rdb,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "2000",
                "--dir",
                dir.path().to_str().unwrap(),
            ]));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new(cli_bin())
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", cli_bin()));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes, dir };
        wait_until(
            Duration::from_secs(30),
            "cluster_state:ok on every node",
            || {
                cluster.nodes.iter().all(|n| {
                    n.try_cmd::<String>(&[b"CLUSTER", b"INFO"])
                        .is_ok_and(|i| i.contains("cluster_state:ok"))
                })
            },
        );
        cluster
    }

    /// `redis://127.0.0.1:PORT/0` of the first node, as a user would set `REDIS_URL`.
    pub fn node_url(&self) -> String {
        self.nodes[0].url()
    }

    /// Starts one more node in cluster mode, not yet part of the cluster (`redis-cli
    /// --cluster add-node` joins it); returns its port.
    pub fn add_node(&mut self) -> u16 {
        let conf = self.dir.file(&format!("nodes-{}.conf", self.nodes.len()));
        let rdb = format!("node-{}.rdb", self.nodes.len());
        let bus = free_port().to_string();
        let node = RedisServer::start_with(&[
            "--cluster-port",
            &bus,
            "--dbfilename",
            &rdb,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &conf,
            "--cluster-node-timeout",
            "2000",
            "--dir",
            self.dir.path().to_str().unwrap(),
        ]);
        let port = node.port();
        self.nodes.push(node);
        port
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…` of every node.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }
}

fn cli_bin() -> String {
    std::env::var("REDIS_CLI_BIN").unwrap_or_else(|_| "redis-cli".to_owned())
}

/// A `redis-server --sentinel` child on a free port, killed on drop.
#[derive(Debug)]
pub struct SentinelProc {
    child: Child,
    port: u16,
}

impl SentinelProc {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs one command on this sentinel and returns its reply.
    pub fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn)
    }
}

impl Drop for SentinelProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The master name the Sentinel harness monitors.
pub const SENTINEL_MASTER: &str = "mymaster";

/// A master, its replicas and sentinels watching it (`down-after-milliseconds` 1000, so a
/// killed master is failed over within a few seconds), on free ports, all killed on drop.
#[derive(Debug)]
pub struct SentinelSetup {
    /// The master the setup started with (killing it is the failover test).
    pub master: RedisServer,
    /// Its replicas; writable (`replica-read-only no`) so a test can make one miss writes.
    pub replicas: Vec<RedisServer>,
    /// The sentinels.
    pub sentinels: Vec<SentinelProc>,
    /// The password every Redis of the setup requires.
    pub password: Option<String>,
    dir: TempDir,
}

impl SentinelSetup {
    /// Starts `replicas` replicas and `sentinels` sentinels (quorum: a majority of them) and
    /// waits until the replicas are in sync and every sentinel names the master.
    pub fn start(replicas: usize, sentinels: usize) -> Self {
        Self::start_with(replicas, sentinels, None)
    }

    /// As [`SentinelSetup::start`], with every Redis (not the sentinels) requiring `password`.
    pub fn start_with(replicas: usize, sentinels: usize, password: Option<&str>) -> Self {
        let dir = TempDir::new("sentinel");
        let dir_arg = dir.path().to_str().unwrap().to_owned();
        let auth: Vec<&str> = match password {
            Some(pw) => vec!["--requirepass", pw, "--masterauth", pw],
            None => Vec::new(),
        };
        let mut args = vec!["--dir", dir_arg.as_str()];
        args.extend(&auth);
        let master = RedisServer::start_with(&args);
        let master_port = master.port().to_string();
        let mut reps = Vec::new();
        for i in 0..replicas {
            let rdir = dir.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&rdir).unwrap();
            let mut args = vec![
                "--dir",
                rdir.to_str().unwrap(),
                "--replicaof",
                "127.0.0.1",
                &master_port,
                "--replica-read-only",
                "no",
            ];
            args.extend(&auth);
            reps.push(RedisServer::start_with(&args));
        }
        let quorum = sentinels / 2 + 1;
        let mut procs = Vec::new();
        for i in 0..sentinels {
            let port = free_port();
            let conf = dir.file(&format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir_arg}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} {quorum}\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 3000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n{}",
                    password
                        .map(|pw| format!("sentinel auth-pass {SENTINEL_MASTER} {pw}\n"))
                        .unwrap_or_default()
                ),
            )
            .unwrap();
            let child = Command::new(redis_bin())
                .args([conf.as_str(), "--sentinel"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {} --sentinel: {e}", redis_bin()));
            procs.push(SentinelProc { child, port });
        }
        let setup = SentinelSetup {
            password: password.map(str::to_owned),
            master,
            replicas: reps,
            sentinels: procs,
            dir,
        };
        wait_until(
            Duration::from_secs(10),
            "the replicas to be in sync",
            || {
                setup
                    .master
                    .try_cmd::<String>(&[b"INFO", b"replication"])
                    .is_ok_and(|i| i.matches("state=online").count() == replicas)
            },
        );
        wait_until(
            Duration::from_secs(10),
            "every sentinel to name the master",
            || {
                setup
                    .sentinels
                    .iter()
                    .all(|s| setup.master_port_by(s) == Some(setup.master.port()))
            },
        );
        setup
    }

    /// `redis+sentinel://[:PASSWORD@]127.0.0.1:P1,127.0.0.1:P2,…/mymaster/0`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let login = self
            .password
            .as_ref()
            .map(|pw| format!(":{pw}@"))
            .unwrap_or_default();
        format!(
            "redis+sentinel://{login}{}/{SENTINEL_MASTER}/0",
            hosts.join(",")
        )
    }

    /// The master's port as `sentinel` names it.
    pub fn master_port_by(&self, sentinel: &SentinelProc) -> Option<u16> {
        let (_, port): (String, String) = sentinel
            .try_cmd(&["SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER])
            .ok()?;
        port.parse().ok()
    }

    /// Waits (20 s at most) until every sentinel knows the others and the replicas, so that
    /// killing the master leads to a failover.
    pub fn wait_ready_for_failover(&self) {
        let others = (self.sentinels.len() - 1).to_string();
        let replicas = self.replicas.len().to_string();
        wait_until(
            Duration::from_secs(20),
            "every sentinel to know the other sentinels and the replicas",
            || {
                self.sentinels.iter().all(|s| {
                    s.try_cmd::<std::collections::HashMap<String, String>>(&[
                        "SENTINEL",
                        "MASTER",
                        SENTINEL_MASTER,
                    ])
                    .is_ok_and(|m| {
                        m.get("num-other-sentinels") == Some(&others)
                            && m.get("num-slaves") == Some(&replicas)
                    })
                })
            },
        );
    }

    /// Waits (`limit` at most) until every sentinel names the master on `port`.
    pub fn wait_master(&self, port: u16, limit: Duration) {
        wait_until(
            limit,
            &format!("every sentinel to name 127.0.0.1:{port} master"),
            || {
                self.sentinels
                    .iter()
                    .all(|s| self.master_port_by(s) == Some(port))
            },
        );
    }
}

/// Which backend a fixture runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `memory://`
    Memory,
    /// A fresh redis-server.
    Redis,
    /// A fresh master and one sentinel, through a `redis+sentinel://` URL.
    Sentinel,
    /// A fresh Redis Cluster of three masters, through a `redis+cluster://` URL.
    Cluster,
}

/// A layer and whatever keeps it alive.
#[derive(Debug)]
pub struct Fixture {
    pub layer: Layer,
    /// The redis-server of `Backend::Redis`, for tests that stop, restart or inspect it.
    pub redis: Option<RedisServer>,
    /// The layer URL, for peers (`None` on memory, where peers share the layer).
    url: Option<String>,
    /// Keeps a Sentinel or Cluster deployment running as long as the fixture.
    _deployment: Option<Deployment>,
}

#[derive(Debug)]
enum Deployment {
    Sentinel(SentinelSetup),
    Cluster(RedisCluster),
}

impl Fixture {
    /// A layer on `backend` with `settings` (a fresh redis-server, sentinel or cluster).
    pub async fn new(backend: Backend, settings: LayerSettings) -> Fixture {
        let (url, redis, deployment, mode) = match backend {
            Backend::Memory => {
                return Fixture {
                    layer: Layer::from_url("memory://", settings).await.unwrap(),
                    redis: None,
                    url: None,
                    _deployment: None,
                };
            }
            Backend::Redis => {
                let redis = RedisServer::start();
                (redis.url(), Some(redis), None, "single")
            }
            Backend::Sentinel => {
                let setup = tokio::task::spawn_blocking(|| SentinelSetup::start(0, 1))
                    .await
                    .unwrap();
                (
                    setup.url(),
                    None,
                    Some(Deployment::Sentinel(setup)),
                    "sentinel",
                )
            }
            Backend::Cluster => {
                let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
                    .await
                    .unwrap();
                (
                    cluster.url(),
                    None,
                    Some(Deployment::Cluster(cluster)),
                    "cluster",
                )
            }
        };
        let layer = Layer::from_url(&url, settings).await.unwrap();
        assert_eq!(layer.mode(), mode);
        Fixture {
            layer,
            redis,
            url: Some(url),
            _deployment: deployment,
        }
    }

    /// A second layer (another "process") on the same backend, with its own settings.
    pub async fn peer(&self, settings: LayerSettings) -> Layer {
        match &self.url {
            Some(url) => Layer::from_url(url, settings).await.unwrap(),
            None => self.layer.clone(),
        }
    }
}

/// Waits for `cond` to hold, polling every 10 ms, at most `limit`; panics with `what` otherwise.
pub async fn eventually<F: FnMut() -> bool>(limit: Duration, what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `text` of the next message on a socket's local channel (what a worker sent it), within
/// 10 s.
pub async fn next_text(ch: &mut switchyard::layer::LocalChannel) -> String {
    let m = ch
        .recv_timeout(Duration::from_secs(10))
        .await
        .expect("a reply within 10 s")
        .to_map()
        .unwrap();
    m.get_str("text").expect("a text frame").to_owned()
}

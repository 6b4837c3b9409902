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
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 7];
                    if s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n" {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "redis-server on port {} did not answer PING within 10 s",
            self.port
        );
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

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
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
            nodes.push(RedisServer::start_with(&[
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
}

fn cli_bin() -> String {
    std::env::var("REDIS_CLI_BIN").unwrap_or_else(|_| "redis-cli".to_owned())
}

/// Which backend a fixture runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `memory://`
    Memory,
    /// A fresh redis-server.
    Redis,
}

/// A layer and whatever keeps it alive.
#[derive(Debug)]
pub struct Fixture {
    pub layer: Layer,
    pub redis: Option<RedisServer>,
}

impl Fixture {
    /// A layer on `backend` with `settings` (a fresh redis-server for Redis).
    pub async fn new(backend: Backend, settings: LayerSettings) -> Fixture {
        match backend {
            Backend::Memory => Fixture {
                layer: Layer::from_url("memory://", settings).await.unwrap(),
                redis: None,
            },
            Backend::Redis => {
                let redis = RedisServer::start();
                let layer = Layer::from_url(&redis.url(), settings).await.unwrap();
                Fixture {
                    layer,
                    redis: Some(redis),
                }
            }
        }
    }

    /// A second layer (another "process") on the same backend, with its own settings.
    pub async fn peer(&self, settings: LayerSettings) -> Layer {
        match &self.redis {
            None => self.layer.clone(),
            Some(r) => Layer::from_url(&r.url(), settings).await.unwrap(),
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

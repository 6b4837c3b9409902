//! Running the real `switchyard` binary in tests: a child process killed on drop, with its
//! announced address read from stdout, plus the repo's redis-server harness.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/support/mod.rs"]
pub mod redis_support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use switchyard::layer::Layer;
use tokio_tungstenite::tungstenite::Message;

/// A running `switchyard` child.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    /// Lines the process printed on stdout after the first.
    pub stdout: mpsc::Receiver<String>,
    /// The URL it announced (`http://127.0.0.1:PORT/`), when it announces one.
    pub base: Option<String>,
    /// The whole announcement line, when it announces one.
    pub announcement: Option<String>,
}

/// The binary under test.
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.env_remove("REDIS_URL")
        .env_remove("SWITCHYARD_LAYER")
        .env_remove("PORT")
        .env("SWITCHYARD_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

impl Proc {
    /// Starts `switchyard ARGS` and, when `announces` is set, waits (10 s at most) for its
    /// "http://ADDR/" line.
    pub fn start(args: &[&str], announces: bool) -> Proc {
        let mut child = bin()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the switchyard binary starts");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = Proc {
            child,
            stdout: rx,
            base: None,
            announcement: None,
        };
        if announces {
            let line = proc
                .stdout
                .recv_timeout(Duration::from_secs(10))
                .expect("the process announces its address");
            let start = line
                .find("http://")
                .expect("an http:// URL in the announcement");
            let rest = &line[start + 7..];
            let host = &rest[..rest.find('/').expect("a path after the address")];
            proc.base = Some(format!("http://{host}"));
            proc.announcement = Some(line.clone());
        }
        proc
    }

    /// `ws://ADDR` for the announced address.
    pub fn ws(&self) -> String {
        self.base
            .as_ref()
            .expect("announced")
            .replacen("http://", "ws://", 1)
    }

    /// Sends SIGTERM and waits (10 s at most) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("waits") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "switchyard did not stop within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the helpers below wait for a socket, a frame or a response.
pub const CLIENT_WAIT: Duration = Duration::from_secs(20);

/// A client WebSocket.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `url` (handshake included) within [`CLIENT_WAIT`].
pub async fn connect(url: &str) -> Ws {
    tokio::time::timeout(CLIENT_WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connects in time")
        .expect("handshake")
        .0
}

/// The next text frame, skipping pings and pongs; panics on anything else or after
/// [`CLIENT_WAIT`].
pub async fn next_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(CLIENT_WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("ok");
        match msg {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// One HTTP/1.1 request on its own connection (a form body when `body` is not empty): the
/// status and the body.
pub async fn http(base: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    http_with(base, method, path, body, "").await
}

/// [`http`] with extra header lines (each ending in `\r\n`).
pub async fn http_with(
    base: &str,
    method: &str,
    path: &str,
    body: &str,
    extra: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{extra}content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(CLIENT_WAIT, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// What a one-shot command did: exit code, stdout, stderr.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `switchyard ARGS` (with `env` set) to completion, 20 s at most.
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = bin();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("the switchyard binary starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(20)) else {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        panic!("switchyard {args:?} did not exit within 20 s");
    };
    let out = out.expect("waits");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The next text frame within `limit`, skipping pings; `None` on timeout. A close or any other
/// frame fails the test: no socket may be closed by a failover.
pub async fn text_within(ws: &mut Ws, limit: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        match msg.expect("frame") {
            Message::Text(t) => return Some(t.to_string()),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// Broadcasts numbered frames into `group` every 50 ms until every socket has received one
/// sent after this call began; returns how long that took.
pub async fn broadcasts_resume(
    layer: &Layer,
    group: &str,
    sockets: &mut [Ws],
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    let mut reached: HashSet<usize> = HashSet::new();
    let mut sent: HashSet<String> = HashSet::new();
    let mut n = 0u64;
    while reached.len() < sockets.len() {
        assert!(
            start.elapsed() < limit,
            "only {} of {} sockets received a broadcast within {limit:?}",
            reached.len(),
            sockets.len()
        );
        n += 1;
        let text = format!("after-{n}");
        // While Redis recovers (a restart, a failover) a send may fail; the next one is
        // tried 50 ms later.
        if layer
            .group_send(group, &serde_json::json!({ "text": text }))
            .await
            .is_ok()
        {
            sent.insert(text);
        }
        for (i, ws) in sockets.iter_mut().enumerate() {
            if reached.contains(&i) {
                continue;
            }
            while let Some(t) = text_within(ws, Duration::from_millis(1)).await {
                if sent.contains(&t) {
                    reached.insert(i);
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

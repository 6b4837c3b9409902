//! The example app's own binary, run as its users run it: `dev` in one process, then `serve` +
//! `worker` + `send` on a redis-server the test starts, with real WebSocket and HTTP clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::RedisServer;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

/// The `rooms` binary as a child, killed on drop.
struct App {
    child: Child,
    base: Option<String>,
}

impl App {
    fn start(args: &[&str], announces: bool) -> App {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rooms"))
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("SWITCHYARD_LAYER")
            .env_remove("PORT")
            .env("SWITCHYARD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the rooms binary starts");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let base = announces.then(|| {
            let line = rx.recv_timeout(WAIT).expect("an address announced");
            let start = line.find("http://").expect("an http:// URL");
            let rest = &line[start + 7..];
            format!("http://{}", &rest[..rest.find('/').expect("a path")])
        });
        App { child, base }
    }

    fn base(&self) -> &str {
        self.base.as_deref().expect("announced")
    }

    fn ws(&self, path: &str) -> String {
        format!("{}{path}", self.base().replacen("http://", "ws://", 1))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str) -> Ws {
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake accepted")
        .0
}

async fn next_text(ws: &mut Ws) -> String {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("the socket stays open")
            .expect("a valid frame");
        match frame {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// `GET path` over a plain TCP socket: (status, body).
fn get(base: &str, path: &str) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn dev_serves_the_apps_own_routes() {
    let app = App::start(&["dev", "--port", "0", "--no-open"], true);
    let (status, body) = get(app.base(), "/");
    assert_eq!(status, 200);
    assert!(
        body.contains("/ws/room/&lt;name&gt;/"),
        "the app's page: {body}"
    );
    // A path no route matches is answered at once: 404, and a refused handshake.
    assert_eq!(
        get(app.base(), "/chat/lobby/").0,
        404,
        "no reference-app routes"
    );
    let refused = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(app.ws("/ws/nowhere/")),
    )
    .await
    .expect("an answer in time");
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("expected a refused handshake, got {other:?}"),
    }

    let mut alice = connect(&app.ws("/ws/room/lobby/")).await;
    let mut bob = connect(&app.ws("/ws/room/lobby/")).await;
    // Both joined at the handshake: each hears the room in the order its members sent.
    for i in 0..3 {
        alice.send(Message::text(format!("a{i}"))).await.unwrap();
    }
    for i in 0..3 {
        assert_eq!(next_text(&mut alice).await, format!("a{i}"));
        assert_eq!(next_text(&mut bob).await, format!("a{i}"));
    }
    bob.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut alice).await, "hello");
    assert_eq!(next_text(&mut bob).await, "hello");
}

#[tokio::test]
async fn serve_worker_and_send_on_redis() {
    let redis = RedisServer::start();
    let layer = format!("--layer={}", redis.url());
    let _worker = App::start(&["worker", &layer], false);
    let web = App::start(&["serve", &layer, "--port", "0"], true);

    let mut ws = connect(&web.ws("/ws/room/lobby/")).await;
    ws.send(Message::text("first")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "first", "the worker relays");

    let sent = Command::new(env!("CARGO_BIN_EXE_rooms"))
        .args([
            "send",
            &layer,
            "thumbnails",
            r#"{"id": 7, "room": "lobby"}"#,
        ])
        .env("SWITCHYARD_LOG", "warn")
        .output()
        .expect("rooms send runs");
    assert!(sent.status.success(), "send: {sent:?}");
    assert_eq!(next_text(&mut ws).await, "thumbnail 7 ready");

    let bad = Command::new(env!("CARGO_BIN_EXE_rooms"))
        .args(["worker", &layer, "--only-channels", "nothing.*"])
        .env("SWITCHYARD_LOG", "warn")
        .output()
        .expect("rooms worker runs");
    assert_eq!(
        bad.status.code(),
        Some(2),
        "globs matching none of the app's routes"
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("thumbnails"),
        "names the app's channels: {}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn help_names_the_app_and_the_standard_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_rooms"))
        .arg("--help")
        .output()
        .expect("rooms --help runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: rooms"), "{help}");
    for command in ["dev", "serve", "worker", "send", "flush", "stats", "jobs"] {
        assert!(
            help.contains(&format!("  {command}")),
            "{command} in {help}"
        );
    }
    assert!(
        !help.contains("bench"),
        "bench belongs to the reference app: {help}"
    );
    let mut version = String::new();
    Command::new(env!("CARGO_BIN_EXE_rooms"))
        .arg("--version")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut version)
        .unwrap();
    assert_eq!(
        version.trim(),
        format!("rooms {}", env!("CARGO_PKG_VERSION"))
    );
}

//! Authentication end to end through the shipped chat consumer and the real binary: `serve` and
//! `worker` on a real redis-server, with `--django-secret-key` (sessions written by real Django),
//! `--jwt-secret`, `--ops-token` and `--symmetric-encryption-key` on both processes. A socket with
//! a Django `sessionid` cookie, or a verified token, writes under its own name whatever handle it
//! sends; an anonymous one keeps its handle; a bad token is refused at the edge; `/metrics` and
//! `/healthz` want the ops token.
//!
//! Needs `.venv/bin/python` with Django (scripts/setup-python.sh) or `SWITCHYARD_PYTHON`: without
//! it the test fails when `CI` is set and is skipped otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use support::Proc;
use support::redis_support::{RedisServer, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const DJANGO_SECRET: &str = "django-insecure-switchyard-test-secret";
const JWT_SECRET: &str = "edge-jwt-secret";
const OPS: &str = "ops-token-for-tests";
const WAIT: Duration = Duration::from_secs(10);

fn python() -> Option<PathBuf> {
    let path = std::env::var("SWITCHYARD_PYTHON").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"),
        PathBuf::from,
    );
    let ok = Command::new(&path)
        .args(["-c", "import django, redis"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "Django is needed: run scripts/setup-python.sh (no usable {})",
        path.display()
    );
    eprintln!(
        "SKIP: no Django at {} (run scripts/setup-python.sh)",
        path.display()
    );
    None
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str, cookie: Option<&str>) -> Result<Ws, u16> {
    let mut req = url.into_client_request().unwrap();
    if let Some(cookie) = cookie {
        req.headers_mut().insert("cookie", cookie.parse().unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

async fn next_json(ws: &mut Ws) -> serde_json::Value {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        }
    })
    .await
    .expect("no frame within the wait")
}

/// Joins `room`, checks who the server says the socket is, sends as "mallory" and returns the
/// handle the broadcast carries.
async fn chat_as(
    base_ws: &str,
    room: &str,
    query: &str,
    cookie: Option<&str>,
    you: Option<&str>,
) -> String {
    let mut ws = open(&format!("{base_ws}/ws/chat/{room}/{query}"), cookie)
        .await
        .unwrap();
    let history = next_json(&mut ws).await;
    assert_eq!(history["type"], "history");
    assert_eq!(history["you"].as_str(), you, "{history}");
    ws.send(Message::text(
        r#"{"handle": "mallory", "message": "hello"}"#,
    ))
    .await
    .unwrap();
    let frame = next_json(&mut ws).await;
    assert_eq!(frame["message"], "hello", "{frame}");
    frame["handle"].as_str().unwrap().to_owned()
}

async fn get(addr: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = bearer.map_or_else(String::new, |t| format!("authorization: Bearer {t}\r\n"));
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("response timed out")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_names_django_and_token_users_and_the_edge_refuses_bad_tokens() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/django_sessions.py");
    let out = Command::new(&python)
        .arg(&script)
        .args([redis.url().as_str(), DJANGO_SECRET])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let user_session = made["user"].as_str().unwrap().to_owned();

    let layer = format!("--layer={}", redis.url());
    let key = "--symmetric-encryption-key=chat-key";
    let _worker = Proc::start(
        &[
            "worker",
            &layer,
            key,
            "--concurrency",
            "4",
            "--django-secret-key",
            DJANGO_SECRET,
        ],
        false,
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let web = Proc::start(
        &[
            "serve",
            &layer,
            key,
            "--port",
            "0",
            "--jwt-secret",
            JWT_SECRET,
            "--jwt-claims",
            "name",
            "--ops-token",
            OPS,
            "--metrics-bind",
            &metrics,
        ],
        true,
    );
    let base_ws = web.ws();

    // Django session cookie: the session's name, not the handle sent.
    let cookie = format!("csrftoken=x; sessionid={user_session}");
    assert_eq!(
        chat_as(&base_ws, "lobby", "", Some(&cookie), Some("Ann")).await,
        "Ann"
    );
    // Anonymous: the handle sent.
    assert_eq!(chat_as(&base_ws, "lobby", "", None, None).await, "mallory");
    // A token verified at the edge: its name claim.
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &Header::default(),
        &serde_json::json!({"sub": "zoe-1", "name": "Zoe", "exp": exp}),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        chat_as(
            &base_ws,
            "lobby",
            &format!("?token={token}"),
            None,
            Some("Zoe")
        )
        .await,
        "Zoe"
    );
    // A token signed with another secret never reaches the worker.
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &serde_json::json!({"sub": "zoe-1", "name": "Zoe", "exp": exp}),
        &EncodingKey::from_secret(b"guess").unwrap(),
    )
    .unwrap();
    assert_eq!(
        open(&format!("{base_ws}/ws/chat/lobby/?token={forged}"), None)
            .await
            .err(),
        Some(403)
    );

    // Ops endpoints want the ops token.
    let addr = base_ws.trim_start_matches("ws://").to_owned();
    assert_eq!(get(&addr, "/healthz", None).await.0, 401);
    assert_eq!(get(&addr, "/healthz", Some(OPS)).await.0, 200);
    assert_eq!(get(&metrics, "/metrics", None).await.0, 401);
    let (status, text) = get(&metrics, "/metrics", Some(OPS)).await;
    assert_eq!(status, 200);
    assert!(
        text.contains("\nswitchyard_auth_refused_total 2\n"),
        "{text}"
    );
}

/// Flags that cannot work stop `serve` before it listens, saying why.
#[test]
fn bad_edge_flags_are_refused_with_a_clear_error() {
    let cases: &[(&[&str], &str)] = &[
        (&["--jwt-algorithm", "ES256"], "--jwt-algorithm needs"),
        (
            &["--jwt-public-key", "/nonexistent/key.pem"],
            "cannot read the JWT public key",
        ),
        (
            &["--jwt-secret", "s", "--jwt-algorithm", "RS256"],
            "--jwt-secret is for HS256 only",
        ),
        (&["--auth-required-paths", "/api/*"], "need a JWT key"),
        (
            &["--jwt-secret", "s", "--auth-expired-close-code", "1000"],
            "4000-4999",
        ),
        (
            &[
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                "/nonexistent/key.pem",
            ],
            "/nonexistent/cert.pem",
        ),
        (&["--tls-cert", "/nonexistent/cert.pem"], "--tls-key"),
    ];
    for (flags, expected) in cases {
        let out = support::bin()
            .args(["serve", "--layer", "memory://", "--port", "0"])
            .args(*flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
}

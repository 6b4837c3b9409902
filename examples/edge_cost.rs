//! What authentication and TLS at the edge cost, measured in one process on 127.0.0.1: an
//! interface server on the in-memory layer with a minimal worker task (accept every socket, echo
//! every frame), and a client in the same runtime.
//!
//! - handshakes: sequential WebSocket handshakes (connect, accept, close) with no token, then with
//!   an HS256, RS256 and ES256 token checked by the server; per-handshake time, median of rounds.
//! - TLS: one socket echoing one small text frame at a time over `ws://` and over `wss://` (rustls,
//!   a certificate from rcgen); round trips per second, median of rounds; and sequential TLS
//!   connect + WSS handshakes.
//!
//! ```text
//! cargo run --release --example edge_cost -- [ROUNDS] [HANDSHAKES] [ECHOES]
//! ```
//! Needs the `openssl` command for the RSA key. Prints a table and a JSON line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::{CertificateDer, ServerName};
use switchyard::asgi::{
    WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT, WEBSOCKET_RECEIVE, WebsocketConnect, WebsocketReceive,
    WebsocketSend,
};
use switchyard::layer::{Layer, LayerSettings};
use switchyard::server::{AuthConfig, JwtConfig, JwtKey, Server, ServerConfig, TlsConfig};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Accepts every socket and echoes every frame.
async fn worker(layer: Layer, stop: CancellationToken) {
    let mut rx = layer.receiver().await.unwrap();
    let channels = [WEBSOCKET_CONNECT, WEBSOCKET_RECEIVE, WEBSOCKET_DISCONNECT].map(str::to_owned);
    while !stop.is_cancelled() {
        let Ok(Some(e)) = rx.receive(&channels, Duration::from_millis(200)).await else {
            continue;
        };
        match e.channel.as_str() {
            WEBSOCKET_CONNECT => {
                let m: WebsocketConnect = e.decode().unwrap();
                let _ = layer.send(&m.reply_channel, &WebsocketSend::accept()).await;
            }
            WEBSOCKET_RECEIVE => {
                let m: WebsocketReceive = e.decode().unwrap();
                if let Some(t) = m.text {
                    let _ = layer.send(&m.reply_channel, &WebsocketSend::text(t)).await;
                }
            }
            _ => {}
        }
    }
}

async fn start(config: ServerConfig) -> (std::net::SocketAddr, CancellationToken) {
    let layer = Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(worker(layer.clone(), stop.clone()));
    let server = Server::bind(ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        ..config
    })
    .await
    .unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.serve(layer, stop.clone()));
    (addr, stop)
}

fn jwt_server(key: JwtKey) -> ServerConfig {
    ServerConfig {
        auth: AuthConfig {
            jwt: Some(JwtConfig {
                key,
                claims: vec!["name".into()],
                leeway: Duration::from_secs(5),
                audience: None,
                issuer: None,
            }),
            ..AuthConfig::default()
        },
        ..ServerConfig::default()
    }
}

/// Microseconds per handshake (connect, 101, close), median of `rounds` runs of `n`.
async fn handshakes(
    addr: std::net::SocketAddr,
    token: Option<&str>,
    rounds: usize,
    n: usize,
) -> f64 {
    let mut per = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        for _ in 0..n {
            let mut req = format!("ws://{addr}/ws/").into_client_request().unwrap();
            if let Some(t) = token {
                req.headers_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
            ws.close(None).await.unwrap();
            while ws.next().await.is_some() {}
        }
        per.push(started.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    median(per)
}

async fn echo_rate<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, n: usize) -> f64
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    for i in 0..n {
        ws.send(Message::text(format!("echo {i}"))).await.unwrap();
        loop {
            if let Some(Ok(Message::Text(_))) = ws.next().await {
                break;
            }
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn connector(der: &CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn wss(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/ws/", addr.port());
    tokio_tungstenite::client_async(url, tls).await.unwrap().0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (rounds, n, echoes) = (arg(1, 5), arg(2, 500), arg(3, 5000));
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"sub": "user-1", "name": "Bench", "exp": exp});

    let dir = std::env::temp_dir().join(format!("switchyard-edge-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rsa = dir.join("rsa.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&rsa)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let rsa_private = std::fs::read(&rsa).unwrap();
    let rsa_public = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&rsa)
        .output()
        .unwrap()
        .stdout;
    let ec = rcgen::KeyPair::generate().unwrap();

    let secret = b"bench-secret".to_vec();
    let cases: Vec<(&str, ServerConfig, Option<String>)> = vec![
        ("none", ServerConfig::default(), None),
        (
            "HS256",
            jwt_server(JwtKey::Secret(secret.clone())),
            Some(
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &claims,
                    &EncodingKey::from_secret(&secret).unwrap(),
                )
                .unwrap(),
            ),
        ),
        (
            "RS256",
            jwt_server(JwtKey::RsaPem(rsa_public)),
            Some(
                jsonwebtoken::encode(
                    &Header::new(Algorithm::RS256),
                    &claims,
                    &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
                )
                .unwrap(),
            ),
        ),
        (
            "ES256",
            jwt_server(JwtKey::EcPem(ec.public_key_pem().into_bytes())),
            Some(
                jsonwebtoken::encode(
                    &Header::new(Algorithm::ES256),
                    &claims,
                    &EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
                )
                .unwrap(),
            ),
        ),
    ];
    let mut report = serde_json::Map::new();
    println!("handshake (connect + 101 + close), µs, median of {rounds} x {n}:");
    let mut base = 0.0;
    for (name, config, token) in cases {
        let (addr, stop) = start(config).await;
        // One discarded round: connection set-up paths and allocator warm.
        handshakes(addr, token.as_deref(), 1, n / 5 + 1).await;
        let us = handshakes(addr, token.as_deref(), rounds, n).await;
        if name == "none" {
            base = us;
        }
        println!(
            "  {name:<6} {us:8.1} µs  ({:+.1} µs, x{:.3})",
            us - base,
            us / base
        );
        report.insert(format!("handshake_us_{name}"), us.into());
        stop.cancel();
    }

    // TLS.
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).unwrap();
    let der = made.cert.der().clone();
    let (plain_addr, plain_stop) = start(ServerConfig::default()).await;
    let (tls_addr, tls_stop) = start(ServerConfig {
        tls: Some(TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }),
        ..ServerConfig::default()
    })
    .await;
    let connector = connector(&der);
    let (mut plain_rates, mut tls_rates) = (Vec::new(), Vec::new());
    let mut plain = tokio_tungstenite::connect_async(format!("ws://{plain_addr}/ws/"))
        .await
        .unwrap()
        .0;
    let mut secure = wss(tls_addr, &connector).await;
    for _ in 0..rounds {
        plain_rates.push(echo_rate(&mut plain, echoes).await);
        tls_rates.push(echo_rate(&mut secure, echoes).await);
    }
    let (p, t) = (median(plain_rates), median(tls_rates));
    println!("one-socket echo, round trips/s, median of {rounds} x {echoes} (alternating):");
    println!("  ws   {p:10.0}\n  wss  {t:10.0}  (x{:.3})", t / p);
    let mut tls_handshakes = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        for _ in 0..n {
            let mut ws = wss(tls_addr, &connector).await;
            ws.close(None).await.unwrap();
            while ws.next().await.is_some() {}
        }
        tls_handshakes.push(started.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    let h = median(tls_handshakes);
    println!("TLS connect + WSS handshake + close: {h:.1} µs (plain: {base:.1} µs)");
    report.insert("echo_per_s_ws".into(), p.into());
    report.insert("echo_per_s_wss".into(), t.into());
    report.insert("handshake_us_wss".into(), h.into());
    println!("{}", serde_json::Value::Object(report));
    plain_stop.cancel();
    tls_stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

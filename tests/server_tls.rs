//! TLS termination in the interface server over real sockets, with certificates made by rcgen:
//! HTTPS and WSS on the same port (the worker sees `https` / `wss`), a plaintext client gets no
//! HTTP answer, the certificate is reloaded on SIGHUP while an open socket keeps working, a
//! reload from broken files keeps the old certificate, and unusable files stop the start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod server_support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use rustls::pki_types::{CertificateDer, ServerName};
use switchyard::asgi::{HTTP_REQUEST, HttpRequest, WEBSOCKET_CONNECT, WebsocketConnect};
use switchyard::layer::{Layer, LayerSettings};
use switchyard::server::{Server, ServerConfig, TlsConfig, TlsReloader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use server_support::{WAIT, Worker};

/// A fresh self-signed certificate for localhost and 127.0.0.1: (certificate PEM, key PEM, DER).
fn certificate() -> (String, String, CertificateDer<'static>) {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    (
        made.cert.pem(),
        made.signing_key.serialize_pem(),
        made.cert.der().clone(),
    )
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(name: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("switchyard-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Files { dir }
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    fn write(&self, cert: &str, key: &str) {
        // Written beside and renamed, as certbot and friends do: a reload never sees half a file.
        for (path, text) in [(self.cert(), cert), (self.key(), key)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
    }
    fn config(&self) -> TlsConfig {
        TlsConfig {
            cert: self.cert(),
            key: self.key(),
        }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct TlsServer {
    addr: std::net::SocketAddr,
    reloader: TlsReloader,
    shutdown: CancellationToken,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(layer: &Layer, files: &Files) -> TlsServer {
    let server = Server::bind(ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        tls: Some(files.config()),
        ..ServerConfig::default()
    })
    .await
    .unwrap();
    let addr = server.local_addr();
    let reloader = server.tls_reloader().expect("TLS is on");
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(layer.clone(), shutdown.clone()));
    TlsServer {
        addr,
        reloader,
        shutdown,
    }
}

/// A client that trusts exactly `trusted`.
fn connector(trusted: &CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    trusted: &CertificateDer<'static>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(WAIT, connector(trusted).connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
}

async fn https_get(
    addr: std::net::SocketAddr,
    trusted: &CertificateDer<'static>,
    path: &str,
) -> String {
    let mut tls = tls_connect(addr, trusted).await.unwrap();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut response))
        .await
        .expect("HTTPS response timed out")
        .ok();
    String::from_utf8(response).unwrap()
}

type Wss = WebSocketStream<TlsStream<TcpStream>>;

async fn wss_connect(
    addr: std::net::SocketAddr,
    trusted: &CertificateDer<'static>,
    path: &str,
) -> Wss {
    let tls = tls_connect(addr, trusted).await.unwrap();
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("WSS handshake timed out")
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo(ws: &mut Wss, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match futures_util::StreamExt::next(ws).await {
                Some(Ok(Message::Text(t))) => return Some(t.to_string()),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("no echo within the wait");
    assert_eq!(got.as_deref(), Some(text));
}

async fn memory_layer() -> Layer {
    Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_share_the_port_and_the_worker_sees_the_secure_schemes() {
    let files = Files::new("tls-both");
    let (cert, key, der) = certificate();
    files.write(&cert, &key);
    let layer = memory_layer().await;
    let mut worker = Worker::echo(&layer).await;
    let server = start(&layer, &files).await;

    let response = https_get(server.addr, &der, "/secure/page").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.ends_with("\r\n\r\necho: /secure/page"),
        "{response}"
    );
    let request: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
    assert_eq!(request.scheme, "https");

    let mut ws = wss_connect(server.addr, &der, "/ws/echo/").await;
    let connect: WebsocketConnect = worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
    assert_eq!(connect.scheme, "wss");
    echo(&mut ws, "over wss £ ✓").await;

    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut got)).await;
    assert!(!got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    // A client that does not trust the certificate fails its handshake.
    let (_, _, stranger) = certificate();
    assert!(tls_connect(server.addr, &stranger).await.is_err());
}

/// Tries a handshake trusting `trusted` until it succeeds (the reload is asynchronous to the
/// signal), within [`WAIT`].
async fn until_served_with(addr: std::net::SocketAddr, trusted: &CertificateDer<'static>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tls_connect(addr, trusted).await.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not served within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_open_sockets_stay() {
    let files = Files::new("tls-reload");
    let (cert_a, key_a, der_a) = certificate();
    files.write(&cert_a, &key_a);
    let layer = memory_layer().await;
    let _worker = Worker::echo(&layer).await;
    let server = start(&layer, &files).await;
    let mut open = wss_connect(server.addr, &der_a, "/ws/long/").await;
    echo(&mut open, "before").await;

    let (cert_b, key_b, der_b) = certificate();
    files.write(&cert_b, &key_b);
    let pid = std::process::id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    until_served_with(server.addr, &der_b).await;

    // New clients get B (a client trusting only A is refused); the socket opened under A stays.
    assert!(tls_connect(server.addr, &der_a).await.is_err());
    echo(&mut open, "after the reload").await;
    let mut fresh = wss_connect(server.addr, &der_b, "/ws/new/").await;
    echo(&mut fresh, "new certificate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_keeps_the_certificate_in_service() {
    let files = Files::new("tls-bad-reload");
    let (cert, key, der) = certificate();
    files.write(&cert, &key);
    let layer = memory_layer().await;
    let _worker = Worker::echo(&layer).await;
    let server = start(&layer, &files).await;

    files.write("not a certificate", &key);
    let err = server.reloader.reload().unwrap_err().to_string();
    assert!(
        err.contains("cert.pem") && err.contains("no CERTIFICATE"),
        "{err}"
    );
    // A key that belongs to another certificate.
    let (_, other_key, _) = certificate();
    files.write(&cert, &other_key);
    let err = server.reloader.reload().unwrap_err().to_string();
    assert!(err.contains("cannot be used together"), "{err}");

    let response = https_get(server.addr, &der, "/still").await;
    assert!(response.ends_with("echo: /still"), "{response}");
}

#[tokio::test]
async fn unusable_tls_files_stop_the_start_with_the_path() {
    let files = Files::new("tls-missing");
    let bind = |tls: TlsConfig| {
        Server::bind(ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            tls: Some(tls),
            ..ServerConfig::default()
        })
    };
    let err = bind(files.config()).await.unwrap_err().to_string();
    assert!(err.contains(&files.cert().display().to_string()), "{err}");
    let (cert, _, _) = certificate();
    std::fs::write(files.cert(), cert).unwrap();
    std::fs::write(
        files.key(),
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = bind(files.config()).await.unwrap_err().to_string();
    assert!(err.contains(&files.key().display().to_string()), "{err}");
}

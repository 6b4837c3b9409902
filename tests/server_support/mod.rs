//! Shared by the interface-server tests: a real server on 127.0.0.1:0, a simulated worker (a task
//! reading the layer with its own receiver and answering through a closure), and small clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use switchyard::asgi::{
    HTTP_DISCONNECT, HTTP_REQUEST, HttpRequest, HttpResponse, WEBSOCKET_CONNECT,
    WEBSOCKET_DISCONNECT, WEBSOCKET_RECEIVE, WebsocketConnect, WebsocketReceive, WebsocketSend,
};
use switchyard::codec;
use switchyard::layer::{Envelope, Layer};
use switchyard::server::{Server, ServerConfig, ServerError, ServerMetrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Deterministic, non-repeating-looking bytes (xorshift), so a misplaced chunk cannot go unseen.
pub fn data(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub metrics: Arc<ServerMetrics>,
    handle: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// A fresh in-memory layer and a server on it.
    pub async fn on_memory(config: ServerConfig) -> (Layer, TestServer) {
        let layer = Layer::from_url("memory://", switchyard::layer::LayerSettings::default())
            .await
            .unwrap();
        let server = TestServer::start(layer.clone(), config).await;
        (layer, server)
    }

    pub async fn start(layer: Layer, config: ServerConfig) -> TestServer {
        let config = ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            ..config
        };
        let server = Server::bind(config).await.unwrap();
        let addr = server.local_addr();
        let metrics = server.metrics();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.serve(layer, shutdown.clone()));
        TestServer {
            addr,
            shutdown,
            metrics,
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Cancels and waits for `serve` to return.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(WAIT, h)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What a simulated worker sends: `(channel, msgpack map)`.
pub type Out = Vec<(String, Vec<u8>)>;

pub fn out<M: Serialize>(channel: &str, message: &M) -> (String, Vec<u8>) {
    (channel.to_owned(), codec::to_msgpack(message).unwrap())
}

/// A simulated worker: every message it receives is also reported on `seen`.
pub struct Worker {
    pub seen: mpsc::UnboundedReceiver<Envelope>,
    stop: CancellationToken,
}

impl Worker {
    /// Listens on `channels`, hands each message to `answer`, sends what it returns.
    pub async fn spawn<F>(layer: &Layer, channels: &[&str], mut answer: F) -> Worker
    where
        F: FnMut(&Envelope) -> Out + Send + 'static,
    {
        let mut receiver = layer.receiver().await.unwrap();
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
        let (tx, seen) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let layer = layer.clone();
        tokio::spawn(async move {
            while !token.is_cancelled() {
                let envelope = match receiver
                    .receive(&channels, Duration::from_millis(200))
                    .await
                {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                for (channel, payload) in answer(&envelope) {
                    let _ = layer.send_encoded(&channel, &payload).await;
                }
                let _ = tx.send(envelope);
            }
        });
        Worker { seen, stop }
    }

    /// Accepts sockets, echoes frames, answers HTTP with `200 echo: <path>`; sees disconnects.
    pub async fn echo(layer: &Layer) -> Worker {
        Worker::spawn(
            layer,
            &[
                WEBSOCKET_CONNECT,
                WEBSOCKET_RECEIVE,
                WEBSOCKET_DISCONNECT,
                HTTP_REQUEST,
                HTTP_DISCONNECT,
            ],
            echo_answer,
        )
        .await
    }

    /// The next message seen on `channel` (others are skipped), within [`WAIT`].
    pub async fn next_on(&mut self, channel: &str) -> Envelope {
        tokio::time::timeout(WAIT, async {
            loop {
                let e = self.seen.recv().await.expect("worker stopped");
                if e.channel == channel {
                    return e;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("nothing on {channel} within {WAIT:?}"))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn echo_answer(e: &Envelope) -> Out {
    match e.channel.as_str() {
        WEBSOCKET_CONNECT => {
            let m: WebsocketConnect = e.decode().unwrap();
            vec![out(&m.reply_channel, &WebsocketSend::accept())]
        }
        WEBSOCKET_RECEIVE => {
            let m: WebsocketReceive = e.decode().unwrap();
            let reply = match (m.text, m.bytes) {
                (Some(t), _) => WebsocketSend::text(t),
                (None, Some(b)) => WebsocketSend::bytes(b),
                _ => return vec![],
            };
            vec![out(&m.reply_channel, &reply)]
        }
        HTTP_REQUEST => {
            let m: HttpRequest = e.decode().unwrap();
            let body = format!("echo: {}", m.path);
            vec![out(
                &m.reply_channel,
                &HttpResponse::new(
                    200,
                    vec![("content-type".into(), "text/plain".into())],
                    body.as_bytes(),
                ),
            )]
        }
        _ => vec![],
    }
}

/// Connects a WebSocket client, panicking on failure.
pub async fn ws_connect(url: &str) -> Client {
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake timed out")
        .expect("handshake failed");
    assert_eq!(resp.status(), 101);
    ws
}

/// The HTTP status a refused handshake got.
pub async fn ws_refused_status(url: &str) -> u16 {
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake timed out")
    {
        Ok(_) => panic!("handshake unexpectedly accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected handshake error {e}"),
    }
}

/// The next data or close message from the server (pings and pongs skipped), within [`WAIT`].
pub async fn next_message(ws: &mut Client) -> Option<Message> {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("no message within the wait")
}

/// Reads until the server's close frame; returns its code (None when the stream ended without).
pub async fn close_code(ws: &mut Client) -> Option<u16> {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("socket not closed within the wait")
}

pub async fn send_text(ws: &mut Client, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// Sends raw bytes on a fresh TCP connection and returns everything read until the server
/// closes it (or `limit` passes).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(limit, tcp.read_to_end(&mut got)).await;
    got
}

/// The status code of a raw HTTP/1.1 response.
pub fn raw_status(response: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(response.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(WAIT).build().unwrap()
}

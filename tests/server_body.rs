//! Streamed request bodies over loopback with a real HTTP client (and raw TCP where the client
//! must misbehave): a body over `max_body_size` but within `max_request_body` reaches a
//! worker-side reader byte for byte as `http.request` + `http.request.body?` chunks with correct
//! `more_content` sequencing; over the hard limit (declared or while streaming) → 413; a client
//! that disconnects or stalls mid-upload → a `closed: true` chunk (and 408 for the stall); a body
//! channel that stays full → 503. Memory and Redis layers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod server_support;
mod support;

use std::time::Duration;

use server_support::*;
use support::{Backend, Fixture};
use switchyard::asgi::{HTTP_REQUEST, HttpRequest, HttpRequestBodyChunk, HttpResponse};
use switchyard::layer::{Layer, LayerSettings};
use switchyard::server::{Server, ServerConfig, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MIB: usize = 1 << 20;

/// What the worker-side reader saw of one request.
struct Streamed {
    request: HttpRequest,
    chunks: Vec<HttpRequestBodyChunk>,
    /// `body` plus every chunk's content, in order.
    body: Vec<u8>,
}

impl Streamed {
    fn closed(&self) -> bool {
        self.chunks.last().is_some_and(|c| c.closed)
    }
}

/// A worker-side task reading `http.request` and then, when there is one, its `body_channel`
/// (with its own receiver, as a worker would), answering complete bodies with
/// `200 <sha256 of the body>`. Stops when dropped.
struct BodyReader {
    seen: mpsc::UnboundedReceiver<Streamed>,
    _stop: tokio_util::sync::DropGuard,
}

impl BodyReader {
    async fn spawn(layer: &Layer) -> BodyReader {
        let mut receiver = layer.receiver().await.unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let layer = layer.clone();
        tokio::spawn(async move {
            let requests = [HTTP_REQUEST.to_owned()];
            while !token.is_cancelled() {
                let Ok(Some(envelope)) = receiver
                    .receive(&requests, Duration::from_millis(200))
                    .await
                else {
                    continue;
                };
                let request: HttpRequest = envelope.decode().unwrap();
                let mut seen = Streamed {
                    body: request.body.as_slice().to_vec(),
                    chunks: Vec::new(),
                    request,
                };
                if let Some(channel) = seen.request.body_channel.clone() {
                    let channels = [channel];
                    loop {
                        let Ok(Some(e)) = receiver.receive(&channels, WAIT).await else {
                            break; // nothing within the wait: the test sees no last chunk
                        };
                        let chunk: HttpRequestBodyChunk = e.decode().unwrap();
                        seen.body.extend_from_slice(chunk.content.as_slice());
                        let end = chunk.closed || !chunk.more_content;
                        seen.chunks.push(chunk);
                        if end {
                            break;
                        }
                    }
                }
                if !seen.closed() {
                    let hash = sha256_hex(&seen.body);
                    let reply = HttpResponse::new(200, vec![], hash.as_bytes());
                    let _ = layer.send(&seen.request.reply_channel, &reply).await;
                }
                let _ = tx.send(seen);
            }
        });
        BodyReader {
            seen,
            _stop: stop.drop_guard(),
        }
    }

    async fn next(&mut self) -> Streamed {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("the reader saw a request within the wait")
            .expect("reader running")
    }
}

fn streaming_config() -> ServerConfig {
    ServerConfig {
        max_body_size: MIB,
        max_request_body: Some(8 * MIB),
        ..ServerConfig::default()
    }
}

async fn five_mib_arrive_whole(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let server = TestServer::start(fx.layer.clone(), streaming_config()).await;
    let mut reader = BodyReader::spawn(&fx.layer).await;
    let sent = data(5 * MIB);
    let resp = http_client()
        .post(server.url("/upload"))
        .body(sent.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), sha256_hex(&sent));

    let got = reader.next().await;
    assert_eq!(got.request.body.as_slice().len(), MIB, "in-message part");
    let channel = got.request.body_channel.as_deref().unwrap();
    assert!(channel.starts_with("http.request.body?"), "{channel}");
    let chunk_size = ServerConfig::default().body_chunk_size;
    let (last, rest) = got.chunks.split_last().unwrap();
    for (i, c) in rest.iter().enumerate() {
        assert!(c.more_content, "chunk {i} says more_content");
        assert!(!c.closed, "chunk {i} not closed");
        assert_eq!(c.content.as_slice().len(), chunk_size, "chunk {i} is full");
    }
    assert!(!last.more_content && !last.closed);
    assert!(!last.content.as_slice().is_empty());
    assert_eq!(got.chunks.len(), (4 * MIB).div_ceil(chunk_size));
    assert_eq!(got.body.len(), sent.len());
    assert_eq!(sha256_hex(&got.body), sha256_hex(&sent), "byte for byte");
}

#[tokio::test]
async fn five_mib_body_streams_byte_for_byte_memory() {
    five_mib_arrive_whole(Backend::Memory).await;
}

#[tokio::test]
async fn five_mib_body_streams_byte_for_byte_redis() {
    five_mib_arrive_whole(Backend::Redis).await;
}

#[tokio::test]
async fn body_within_the_message_limit_has_no_body_channel() {
    let (layer, server) = TestServer::on_memory(streaming_config()).await;
    let mut reader = BodyReader::spawn(&layer).await;
    let sent = data(MIB);
    let resp = http_client()
        .post(server.url("/small"))
        .body(sent.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = reader.next().await;
    assert_eq!(got.request.body_channel, None);
    assert!(got.chunks.is_empty());
    assert_eq!(got.body, sent);
}

/// A request head declaring `length` body bytes.
fn head(length: usize) -> Vec<u8> {
    format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n\r\n").into_bytes()
}

/// One response (head and `content-length` body) read from `tcp`, within [`WAIT`]; the
/// connection may stay open.
async fn read_response(tcp: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if got.len() >= end + 4 + length {
                    return;
                }
            }
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed mid-response");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a whole response within the wait");
    got
}

#[tokio::test]
async fn over_the_hard_limit_is_413_declared_or_while_streaming() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        max_body_size: 1000,
        max_request_body: Some(10_000),
        body_chunk_size: 1024,
        ..ServerConfig::default()
    })
    .await;
    let mut reader = BodyReader::spawn(&layer).await;
    // Declared: refused before a byte of the body is read or anything is sent to the layer.
    let got = raw_exchange(server.addr, &head(10_001), Duration::from_secs(2)).await;
    assert_eq!(
        raw_status(&got),
        Some(413),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // Chunked, no length: found out while streaming; the reader is told `closed`.
    let mut chunked =
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..12 {
        chunked.extend_from_slice(b"3e8\r\n");
        chunked.extend_from_slice(&[b'z'; 1000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let got = raw_exchange(server.addr, &chunked, Duration::from_secs(5)).await;
    assert_eq!(
        raw_status(&got),
        Some(413),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let seen = reader.next().await;
    assert!(seen.request.body_channel.is_some());
    assert!(
        seen.closed(),
        "the reader was told the request is abandoned"
    );
    assert!(seen.body.len() <= 10_000);
    assert!(seen.body.iter().all(|b| *b == b'z'));
    assert_eq!(server.metrics.snapshot().http_413, 2);
}

async fn disconnect_mid_upload_is_closed(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let server = TestServer::start(fx.layer.clone(), streaming_config()).await;
    let mut reader = BodyReader::spawn(&fx.layer).await;
    let sent = data(2 * MIB);
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&head(5 * MIB)).await.unwrap();
    tcp.write_all(&sent).await.unwrap();
    tcp.flush().await.unwrap();
    drop(tcp);
    let got = reader.next().await;
    assert!(got.request.body_channel.is_some());
    assert!(got.closed(), "a closed chunk ends the stream");
    let (_, before) = got.chunks.split_last().unwrap();
    assert!(before.iter().all(|c| c.more_content && !c.closed));
    assert!(got.body.len() >= MIB && got.body.len() <= sent.len());
    assert_eq!(got.body, sent[..got.body.len()], "what came, came intact");
}

#[tokio::test]
async fn client_disconnect_mid_upload_sends_closed_memory() {
    disconnect_mid_upload_is_closed(Backend::Memory).await;
}

#[tokio::test]
async fn client_disconnect_mid_upload_sends_closed_redis() {
    disconnect_mid_upload_is_closed(Backend::Redis).await;
}

#[tokio::test]
async fn client_stalling_mid_upload_gets_408_and_reader_closed() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        http_timeout: Duration::from_millis(500),
        ..streaming_config()
    })
    .await;
    let mut reader = BodyReader::spawn(&layer).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&head(3 * MIB)).await.unwrap();
    tcp.write_all(&data(2 * MIB)).await.unwrap();
    // Then nothing more: the socket stays open, the body incomplete.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got)).await;
    assert_eq!(
        raw_status(&got),
        Some(408),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let seen = reader.next().await;
    assert!(seen.closed());
}

#[tokio::test]
async fn body_channel_that_stays_full_is_503() {
    let settings = LayerSettings {
        channel_capacity: vec![("http.request.body*".into(), 2)],
        ..LayerSettings::default()
    };
    let layer = Layer::from_url("memory://", settings).await.unwrap();
    let server = TestServer::start(
        layer.clone(),
        ServerConfig {
            max_body_size: 1000,
            max_request_body: Some(100_000),
            body_chunk_size: 1000,
            backpressure_timeout: Duration::from_millis(300),
            ..ServerConfig::default()
        },
    )
    .await;
    // Takes the request but never reads its body channel.
    let mut worker = Worker::spawn(&layer, &[HTTP_REQUEST], |_| vec![]).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&[head(20_000), vec![b'q'; 20_000]].concat())
        .await
        .unwrap();
    let got = read_response(&mut tcp).await;
    assert_eq!(
        raw_status(&got),
        Some(503),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        String::from_utf8_lossy(&got)
            .to_ascii_lowercase()
            .contains("retry-after: 1")
    );
    let request: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
    let channel = request.body_channel.unwrap();
    assert_eq!(layer.channel_depth(&channel).await.unwrap(), 2);
}

#[tokio::test]
async fn hard_limit_below_the_message_limit_is_a_config_error() {
    let err = Server::bind(ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        max_body_size: 2000,
        max_request_body: Some(1000),
        ..ServerConfig::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, ServerError::Config(_)), "{err}");
}

//! Streamed request bodies end to end: a real interface server, a real `Worker` and a consumer
//! answering with the body's length and sha256. The 5 MiB upload comes back correct (the
//! consumer sees the whole body, no `body_channel`, and `payload` agreeing with `content`); a
//! chunk stream that stalls gets the worker's own 408; a client gone mid-upload abandons the
//! request without running the consumer; a body over the worker's limit gets 413.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod server_support;
mod support;

use std::sync::Arc;
use std::time::Duration;

use server_support::{TestServer, WAIT, data, http_client, sha256_hex};
use support::{Backend, Fixture, eventually};
use switchyard::asgi::{HTTP_REQUEST, HttpRequest, HttpRequestBodyChunk, HttpResponse};
use switchyard::layer::{Layer, LayerSettings};
use switchyard::routing::{ConsumerError, Ctx, Message, Router, Value, route};
use switchyard::server::ServerConfig;
use switchyard::worker::{Worker, WorkerError, WorkerMetrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const MIB: usize = 1 << 20;

/// Answers `<length> <sha256> <body_channel present?> <payload agrees with content?>`.
async fn digest(m: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    let body = m.get("body").and_then(Value::as_bytes).unwrap_or_default();
    let typed: HttpRequest = m.decode().unwrap();
    let text = format!(
        "{} {} channel={} consistent={}",
        body.len(),
        sha256_hex(body),
        m.get("body_channel").is_some() || typed.body_channel.is_some(),
        typed.body.as_slice() == body,
    );
    ctx.reply(&HttpResponse::new(200, vec![], text.into_bytes()))
}

struct Running {
    metrics: Arc<WorkerMetrics>,
    _stop: tokio_util::sync::DropGuard,
    _handle: JoinHandle<Result<(), WorkerError>>,
}

fn start(layer: &Layer, tune: impl FnOnce(Worker) -> Worker) -> Running {
    let router = Router::new([route(HTTP_REQUEST, digest)]).unwrap();
    let worker = tune(
        Worker::new(layer.clone(), Arc::new(router))
            .concurrency(2)
            .receive_timeout(Duration::from_millis(200)),
    );
    let metrics = worker.metrics();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    Running {
        metrics,
        _stop: stop.drop_guard(),
        _handle: handle,
    }
}

fn streaming_config() -> ServerConfig {
    ServerConfig {
        max_body_size: MIB,
        max_request_body: Some(8 * MIB),
        ..ServerConfig::default()
    }
}

fn head(length: usize) -> Vec<u8> {
    format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n\r\n").into_bytes()
}

async fn five_mib_round_trip(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let server = TestServer::start(fx.layer.clone(), streaming_config()).await;
    let worker = start(&fx.layer, |w| w);
    let sent = data(5 * MIB);
    let resp = http_client()
        .post(server.url("/upload"))
        .body(sent.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.text().await.unwrap(),
        format!(
            "{} {} channel=false consistent=true",
            sent.len(),
            sha256_hex(&sent)
        )
    );
    let m = worker.metrics.snapshot();
    assert_eq!((m.bodies_assembled, m.consumed), (1, 1));
}

#[tokio::test]
async fn five_mib_upload_reaches_the_consumer_whole_memory() {
    five_mib_round_trip(Backend::Memory).await;
}

#[tokio::test]
async fn five_mib_upload_reaches_the_consumer_whole_redis() {
    five_mib_round_trip(Backend::Redis).await;
}

async fn stalled_upload_is_408(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    // The server would wait a minute for the client; the worker gives up first.
    let server = TestServer::start(fx.layer.clone(), streaming_config()).await;
    let worker = start(&fx.layer, |w| {
        w.body_receive_timeout(Duration::from_millis(400))
    });
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&head(3 * MIB)).await.unwrap();
    tcp.write_all(&data(2 * MIB)).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(
        text.ends_with("408 Request Timeout (upload too slow)\n"),
        "{text}"
    );
    let m = worker.metrics.snapshot();
    assert_eq!((m.bodies_timed_out, m.consumed), (1, 0));
}

#[tokio::test]
async fn stalled_upload_gets_the_workers_408_memory() {
    stalled_upload_is_408(Backend::Memory).await;
}

#[tokio::test]
async fn stalled_upload_gets_the_workers_408_redis() {
    stalled_upload_is_408(Backend::Redis).await;
}

async fn closed_upload_is_abandoned(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let server = TestServer::start(fx.layer.clone(), streaming_config()).await;
    let worker = start(&fx.layer, |w| w);
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&head(5 * MIB)).await.unwrap();
    tcp.write_all(&data(2 * MIB)).await.unwrap();
    drop(tcp);
    let metrics = worker.metrics.clone();
    eventually(WAIT, "the request is abandoned", || {
        metrics.snapshot().bodies_abandoned == 1
    })
    .await;
    let m = worker.metrics.snapshot();
    assert_eq!((m.consumed, m.errors, m.bodies_assembled), (0, 0, 0));
}

#[tokio::test]
async fn client_gone_mid_upload_does_not_run_the_consumer_memory() {
    closed_upload_is_abandoned(Backend::Memory).await;
}

#[tokio::test]
async fn client_gone_mid_upload_does_not_run_the_consumer_redis() {
    closed_upload_is_abandoned(Backend::Redis).await;
}

/// Messages put on the layer by hand, as a server would: the worker's own limits and bad chunks.
#[tokio::test]
async fn worker_limits_and_bad_chunks_get_clear_answers() {
    let layer = Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap();
    let worker = start(&layer, |w| w.max_request_body(1000));
    let inbox = layer.inbox("test.replies").await.unwrap();
    let mut chunk = HttpRequestBodyChunk::default();
    chunk.content = vec![b'a'; 600].into();

    // Over the worker's limit → 413, the consumer not run.
    let mut reply = inbox.new_channel();
    let body_channel = layer.new_channel("http.request.body?").unwrap();
    let mut request = HttpRequest::new(reply.name(), "POST", "/big");
    request.body = vec![b'a'; 600].into();
    request.body_channel = Some(body_channel.clone());
    layer.send(HTTP_REQUEST, &request).await.unwrap();
    chunk.more_content = true;
    layer.send(&body_channel, &chunk).await.unwrap();
    let r: HttpResponse = reply.recv_timeout(WAIT).await.unwrap().decode().unwrap();
    assert_eq!(r.status, Some(413));

    // An undecodable chunk → 400.
    let mut reply = inbox.new_channel();
    let body_channel = layer.new_channel("http.request.body?").unwrap();
    let mut request = HttpRequest::new(reply.name(), "POST", "/bad");
    request.body_channel = Some(body_channel.clone());
    layer.send(HTTP_REQUEST, &request).await.unwrap();
    layer
        .send(&body_channel, &switchyard::Map::new().with("content", 5))
        .await
        .unwrap();
    let r: HttpResponse = reply.recv_timeout(WAIT).await.unwrap().decode().unwrap();
    assert_eq!(r.status, Some(400));

    // Within the limit, in two chunks → the consumer runs on the whole body.
    let mut reply = inbox.new_channel();
    let body_channel = layer.new_channel("http.request.body?").unwrap();
    let mut request = HttpRequest::new(reply.name(), "POST", "/ok");
    request.body = b"ab".as_slice().into();
    request.body_channel = Some(body_channel.clone());
    layer.send(HTTP_REQUEST, &request).await.unwrap();
    let mut first = HttpRequestBodyChunk::default();
    first.content = b"cd".as_slice().into();
    first.more_content = true;
    let mut last = HttpRequestBodyChunk::default();
    last.content = b"e".as_slice().into();
    layer.send(&body_channel, &first).await.unwrap();
    layer.send(&body_channel, &last).await.unwrap();
    let r: HttpResponse = reply.recv_timeout(WAIT).await.unwrap().decode().unwrap();
    assert_eq!(r.status, Some(200));
    assert_eq!(
        String::from_utf8(r.content.into_vec()).unwrap(),
        format!("5 {} channel=false consistent=true", sha256_hex(b"abcde"))
    );

    let m = worker.metrics.snapshot();
    assert_eq!(
        (m.bodies_too_large, m.bodies_assembled, m.consumed),
        (1, 1, 1)
    );
}

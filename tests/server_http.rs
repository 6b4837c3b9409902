//! The interface server's HTTP side over loopback with a real HTTP client: the `http.request`
//! message byte for byte, streamed responses, timeouts and refusals (504, 503, 413, 431, 400),
//! slowloris, client disconnects, `/healthz`, proxy headers, connection limits, and Redis outages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod server_support;
mod support;

use std::time::Duration;

use server_support::*;
use support::{Backend, Fixture, eventually};
use switchyard::ByteString;
use switchyard::asgi::{HTTP_DISCONNECT, HTTP_REQUEST, HttpDisconnect, HttpRequest, HttpResponse};
use switchyard::layer::{Layer, LayerSettings};
use switchyard::server::ServerConfig;

async fn round_trip(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let server = TestServer::start(
        fx.layer.clone(),
        ServerConfig {
            root_path: "/app".into(),
            ..ServerConfig::default()
        },
    )
    .await;
    let mut worker = Worker::spawn(&fx.layer, &[HTTP_REQUEST], |e| {
        let m: HttpRequest = e.decode().unwrap();
        let mut body = b"got:".to_vec();
        body.extend_from_slice(m.body.as_slice());
        vec![out(
            &m.reply_channel,
            &HttpResponse::new(
                201,
                vec![
                    ("set-cookie".into(), "a=1".into()),
                    ("set-cookie".into(), "b=2".into()),
                    ("x-test".into(), "yes".into()),
                ],
                body,
            ),
        )]
    })
    .await;
    let resp = http_client()
        .post(server.url("/caf%C3%A9/a%20b?x=%41&y=1"))
        .header("X-Custom", "One")
        .header("x_underscored", "dropped")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let cookies: Vec<_> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(resp.headers()["x-test"], "yes");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"got:hello");

    let m: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
    assert_eq!(m.method, "POST");
    assert_eq!(m.http_version, "1.1");
    assert_eq!(m.scheme, "http");
    assert_eq!(m.path, "/café/a b");
    assert_eq!(m.query_string.as_slice(), b"x=%41&y=1");
    assert_eq!(m.root_path, "/app");
    assert_eq!(m.body.as_slice(), b"hello");
    assert_eq!(m.header("x-custom"), Some(&b"One"[..]));
    assert_eq!(m.header("x_underscored"), None);
    assert!(
        m.headers
            .iter()
            .all(|(n, _)| n.as_slice() == n.as_slice().to_ascii_lowercase())
    );
    assert_eq!(m.client.as_ref().unwrap().0, "127.0.0.1");
    assert_eq!(m.server, Some(("127.0.0.1".to_owned(), server.addr.port())));
    assert!(m.reply_channel.contains('!'));
}

#[tokio::test]
async fn http_round_trip_memory() {
    round_trip(Backend::Memory).await;
}

#[tokio::test]
async fn http_round_trip_redis() {
    round_trip(Backend::Redis).await;
}

#[tokio::test]
async fn streamed_response_arrives_whole_and_in_order() {
    let (layer, server) = TestServer::on_memory(ServerConfig::default()).await;
    let _worker = Worker::spawn(&layer, &[HTTP_REQUEST], |e| {
        let m: HttpRequest = e.decode().unwrap();
        let mut first = HttpResponse::new(
            200,
            vec![("content-type".into(), "text/plain".into())],
            &b"one,"[..],
        );
        first.more_content = true;
        vec![
            out(&m.reply_channel, &first),
            out(&m.reply_channel, &HttpResponse::chunk(&b"two,"[..], true)),
            out(&m.reply_channel, &HttpResponse::chunk(&b"three"[..], false)),
        ]
    })
    .await;
    let resp = http_client()
        .get(server.url("/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "one,two,three");
}

#[tokio::test]
async fn no_worker_reply_is_504() {
    let (_layer, server) = TestServer::on_memory(ServerConfig {
        http_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let resp = http_client().get(server.url("/slow")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    assert_eq!(server.metrics.snapshot().http_504, 1);
}

#[tokio::test]
async fn a_504_tells_the_consumer_with_http_disconnect() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        http_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    // Reads requests, never answers.
    let mut worker = Worker::spawn(&layer, &[HTTP_REQUEST, HTTP_DISCONNECT], |_| vec![]).await;
    let resp = http_client().get(server.url("/late")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    let request: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
    let gone: HttpDisconnect = worker.next_on(HTTP_DISCONNECT).await.decode().unwrap();
    assert_eq!(
        (gone.reply_channel.as_str(), gone.path.as_str()),
        (request.reply_channel.as_str(), "/late")
    );
    assert_eq!(server.metrics.snapshot().http_disconnects, 1);
}

#[tokio::test]
async fn huge_configured_timeouts_do_not_overflow_deadlines() {
    let layer = Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap();
    let huge = Duration::from_secs(u64::MAX / 2);
    let server = TestServer::start(
        layer.clone(),
        ServerConfig {
            http_timeout: huge,
            websocket_connect_timeout: huge,
            backpressure_timeout: huge,
            ..ServerConfig::default()
        },
    )
    .await;
    let _worker = Worker::echo(&layer).await;
    let resp = http_client().get(server.url("/far")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "echo: /far");
    let _ws = ws_connect(&server.ws_url("/far")).await;
}

#[tokio::test]
async fn full_request_channel_is_503_with_retry_after() {
    let settings = LayerSettings {
        channel_capacity: vec![("http.request".into(), 1)],
        ..LayerSettings::default()
    };
    let layer = Layer::from_url("memory://", settings).await.unwrap();
    layer
        .send(HTTP_REQUEST, &HttpRequest::new("x!y", "GET", "/filler"))
        .await
        .unwrap();
    let server = TestServer::start(
        layer.clone(),
        ServerConfig {
            backpressure_timeout: Duration::from_millis(300),
            ..ServerConfig::default()
        },
    )
    .await;
    let resp = http_client().get(server.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let m = server.metrics.snapshot();
    assert_eq!(m.http_503, 1);
    assert_eq!((m.backpressure_waits, m.backpressure_refusals), (1, 1));
}

/// With the default bound a request meeting a full `http.request` waits for a worker to make
/// room and is answered, not refused.
#[tokio::test]
async fn full_request_channel_waits_for_room_and_is_answered() {
    let settings = LayerSettings {
        channel_capacity: vec![("http.request".into(), 1)],
        ..LayerSettings::default()
    };
    let layer = Layer::from_url("memory://", settings).await.unwrap();
    layer
        .send(HTTP_REQUEST, &HttpRequest::new("x!y", "GET", "/filler"))
        .await
        .unwrap();
    let server = TestServer::start(layer.clone(), ServerConfig::default()).await;
    let url = server.url("/waited");
    let request = tokio::spawn(async move { http_client().get(url).send().await });
    eventually(Duration::from_secs(5), "the request waits for room", || {
        server.metrics.snapshot().backpressure_waits == 1
    })
    .await;
    let _worker = Worker::echo(&layer).await;
    let resp = tokio::time::timeout(WAIT, request)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "echo: /waited");
    let m = server.metrics.snapshot();
    assert_eq!((m.http_503, m.backpressure_refusals), (0, 0));
}

#[tokio::test]
async fn body_over_the_limit_is_413_declared_or_chunked() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        max_body_size: 1000,
        ..ServerConfig::default()
    })
    .await;
    let mut worker = Worker::echo(&layer).await;
    let resp = http_client()
        .post(server.url("/upload"))
        .body(vec![b'x'; 1001])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // Chunked, no Content-Length: the limit applies while reading.
    let mut chunked =
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"190\r\n");
        chunked.extend_from_slice(&[b'y'; 400]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let got = raw_exchange(server.addr, &chunked, Duration::from_secs(2)).await;
    assert_eq!(
        raw_status(&got),
        Some(413),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // A body at the limit passes.
    let resp = http_client()
        .post(server.url("/upload"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let m: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
    assert_eq!(m.body.as_slice().len(), 1000);
    assert_eq!(server.metrics.snapshot().http_413, 2);
}

#[tokio::test]
async fn malformed_and_oversized_heads_are_refused() {
    let (_layer, server) = TestServer::on_memory(ServerConfig {
        max_headers: 10,
        max_header_size: 2048,
        ..ServerConfig::default()
    })
    .await;
    let limit = Duration::from_secs(2);
    let garbage = raw_exchange(server.addr, b"NOT HTTP AT ALL\r\n\r\n", limit).await;
    assert_eq!(
        raw_status(&garbage),
        Some(400),
        "{}",
        String::from_utf8_lossy(&garbage)
    );
    let bad_header =
        raw_exchange(server.addr, b"GET / HTTP/1.1\r\nbad header\r\n\r\n", limit).await;
    assert_eq!(raw_status(&bad_header), Some(400));
    let mut many = b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..20 {
        many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(
        raw_status(&raw_exchange(server.addr, &many, limit).await),
        Some(431)
    );
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(4000)
    );
    assert_eq!(
        raw_status(&raw_exchange(server.addr, big.as_bytes(), limit).await),
        Some(431)
    );
    let bad_path = raw_exchange(server.addr, b"GET /%ff HTTP/1.1\r\nhost: x\r\n\r\n", limit).await;
    assert_eq!(raw_status(&bad_path), Some(400));
}

#[tokio::test]
async fn slowloris_head_is_cut_after_the_header_read_timeout() {
    let (_layer, server) = TestServer::on_memory(ServerConfig {
        header_read_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    // Half a head, never finished: the server must close the connection on its own.
    let got = raw_exchange(server.addr, b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ", WAIT).await;
    // hyper closes without a response (or with 408); either way the connection ended in time.
    assert!(
        got.is_empty() || raw_status(&got) == Some(408),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // A connection that says nothing at all is closed too (no idle slot hoarding).
    let silent = raw_exchange(server.addr, b"", WAIT).await;
    assert!(silent.is_empty() || raw_status(&silent) == Some(408));
    tokio::time::timeout(Duration::from_secs(5), async {
        while server.metrics.snapshot().open_connections > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("slow connection still open");
}

#[tokio::test]
async fn client_gone_mid_request_sends_http_disconnect() {
    let (layer, server) = TestServer::on_memory(ServerConfig::default()).await;
    // This worker never answers requests; it only watches.
    let mut worker = Worker::spawn(&layer, &[HTTP_REQUEST, HTTP_DISCONNECT], |_| vec![]).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET /away HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let request: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
    drop(tcp);
    let gone: HttpDisconnect = worker.next_on(HTTP_DISCONNECT).await.decode().unwrap();
    assert_eq!(gone.reply_channel, request.reply_channel);
    assert_eq!(gone.path, "/away");
}

#[tokio::test]
async fn healthz_is_answered_without_workers() {
    let (layer, server) = TestServer::on_memory(ServerConfig::default()).await;
    let resp = http_client()
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["layer"], "ok");
    assert_eq!(layer.channel_depth(HTTP_REQUEST).await.unwrap(), 0);
    assert_eq!(server.metrics.snapshot().http_requests, 0);
}

/// Once the inbox is stopped (here: the shutdown grace ended with a request and a handshake still
/// waiting), no reply can come: both are answered 503 at once, not after their timeouts.
#[tokio::test]
async fn waiting_requests_get_503_once_replies_cannot_arrive() {
    use switchyard::asgi::WEBSOCKET_CONNECT;
    let (layer, mut server) = TestServer::on_memory(ServerConfig {
        http_timeout: Duration::from_secs(60),
        websocket_connect_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    // Reads requests and connects, never answers.
    let mut worker = Worker::spawn(&layer, &[HTTP_REQUEST, WEBSOCKET_CONNECT], |_| vec![]).await;
    let request = tokio::spawn(http_client().get(server.url("/stuck")).send());
    worker.next_on(HTTP_REQUEST).await;
    let ws_url = server.ws_url("/stuck-ws");
    let handshake = tokio::spawn(async move { ws_refused_status(&ws_url).await });
    worker.next_on(WEBSOCKET_CONNECT).await;
    // The client gives up after WAIT, far below the 60 s timeouts: a 503 must come from the stop.
    server.stop().await;
    let resp = request.await.unwrap().unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.text().await.unwrap(), "Replies cannot be received\n");
    assert_eq!(handshake.await.unwrap(), 503);
}

#[tokio::test]
async fn proxy_headers_only_when_enabled() {
    let layer = Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap();
    let mut worker = Worker::echo(&layer).await;
    for enabled in [false, true] {
        let server = TestServer::start(
            layer.clone(),
            ServerConfig {
                proxy_headers: enabled,
                ..ServerConfig::default()
            },
        )
        .await;
        let resp = http_client()
            .get(server.url("/p"))
            .header("x-forwarded-for", "203.0.113.9, 10.0.0.1")
            .header("x-forwarded-port", "4443")
            .header("x-forwarded-proto", "https")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let m: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
        if enabled {
            assert_eq!(m.client, Some(("203.0.113.9".to_owned(), 4443)));
            assert_eq!(m.scheme, "https");
        } else {
            assert_eq!(m.client.as_ref().unwrap().0, "127.0.0.1");
            assert_eq!(m.scheme, "http");
        }
    }
}

#[tokio::test]
async fn connections_over_the_limit_get_503() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    })
    .await;
    let _worker = Worker::echo(&layer).await;
    let _a = ws_connect(&server.ws_url("/a")).await;
    let _b = ws_connect(&server.ws_url("/b")).await;
    let got = raw_exchange(
        server.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(raw_status(&got), Some(503));
    assert_eq!(server.metrics.snapshot().connections_refused, 1);
    drop(_a);
    // A slot frees when a socket closes.
    tokio::time::timeout(WAIT, async {
        loop {
            let got = raw_exchange(
                server.addr,
                b"GET /x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                Duration::from_secs(2),
            )
            .await;
            if raw_status(&got) == Some(200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn redis_down_gives_503_quickly_and_recovers() {
    let mut fx = Fixture::new(Backend::Redis, LayerSettings::default()).await;
    let server = TestServer::start(fx.layer.clone(), ServerConfig::default()).await;
    let _worker = Worker::echo(&fx.layer).await;
    let client = http_client();
    assert_eq!(
        client.get(server.url("/up")).send().await.unwrap().status(),
        200
    );
    fx.redis.as_mut().unwrap().stop();
    let resp = tokio::time::timeout(
        Duration::from_secs(8),
        client.get(server.url("/down")).send(),
    )
    .await
    .expect("a request during the outage must be answered, not hang")
    .unwrap();
    assert_eq!(resp.status(), 503);
    let health = client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let health: serde_json::Value = serde_json::from_slice(&health).unwrap();
    assert_eq!(health["layer"], "unavailable");
    fx.redis.as_mut().unwrap().restart();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(r) = client.get(server.url("/again")).send().await
                && r.status() == 200
            {
                assert_eq!(r.text().await.unwrap(), "echo: /again");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("service did not recover after Redis came back");
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let (layer, mut server) = TestServer::on_memory(ServerConfig::default()).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let _worker = Worker::spawn(&layer, &[HTTP_REQUEST], move |e| {
        let m: HttpRequest = e.decode().unwrap();
        tx.send(m.reply_channel).unwrap();
        vec![]
    })
    .await;
    let client = http_client();
    let url = server.url("/inflight");
    let pending =
        tokio::spawn(async move { client.get(url).send().await.unwrap().text().await.unwrap() });
    let reply_channel = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    server.shutdown.cancel();
    // New connections are refused once the listener is gone.
    tokio::time::timeout(WAIT, async {
        while tokio::net::TcpStream::connect(server.addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    layer
        .send(
            &reply_channel,
            &HttpResponse::new(200, vec![], ByteString::from("finished")),
        )
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, pending).await.unwrap().unwrap(),
        "finished"
    );
    server.stop().await;
}

/// Collects what the access log writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn access_log_has_a_line_per_request_and_per_socket() {
    use tracing_subscriber::layer::SubscriberExt;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::filter::Targets::new()
                .with_target("switchyard::access", tracing::Level::INFO),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone()),
        );
    // Global, not scoped: tracing caches per-callsite interest, and a scoped subscriber races
    // with the other tests of this binary hitting the same callsites. Only this test sets it;
    // the lines it looks for name paths no other test uses.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let (layer, server) = TestServer::on_memory(ServerConfig::default()).await;
    let mut worker = Worker::echo(&layer).await;
    let resp = http_client()
        .get(server.url("/logged?q=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut ws = ws_connect(&server.ws_url("/sock")).await;
    ws.close(None).await.unwrap();
    worker.next_on(switchyard::asgi::WEBSOCKET_DISCONNECT).await;
    support::eventually(WAIT, "WSDISCONNECT logged", || {
        String::from_utf8_lossy(&captured.0.lock().unwrap()).contains("WSDISCONNECT")
    })
    .await;
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let find = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {log}"))
    };
    let get = find("GET /logged 200");
    assert!(
        get.contains("client=127.0.0.1:") && get.contains("duration_ms="),
        "{get}"
    );
    find("WSCONNECTING /sock");
    find("WSCONNECT /sock");
    find("WSDISCONNECT /sock 1005");
}

#[tokio::test]
async fn redis_down_refuses_handshakes_with_503() {
    let mut fx = Fixture::new(Backend::Redis, LayerSettings::default()).await;
    let server = TestServer::start(fx.layer.clone(), ServerConfig::default()).await;
    let _worker = Worker::echo(&fx.layer).await;
    let _ok = ws_connect(&server.ws_url("/before")).await;
    fx.redis.as_mut().unwrap().stop();
    let status = tokio::time::timeout(
        Duration::from_secs(8),
        ws_refused_status(&server.ws_url("/during")),
    )
    .await
    .expect("a handshake during the outage must be answered, not hang");
    assert_eq!(status, 503);
}

#[tokio::test]
async fn stalled_stream_is_cut_and_slow_body_is_408() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        http_timeout: Duration::from_millis(400),
        ..ServerConfig::default()
    })
    .await;
    // Starts a streamed response and never finishes it.
    let mut worker = Worker::spawn(&layer, &[HTTP_REQUEST, HTTP_DISCONNECT], |e| {
        if e.channel != HTTP_REQUEST {
            return vec![];
        }
        let m: HttpRequest = e.decode().unwrap();
        let mut first = HttpResponse::new(200, vec![], &b"partial"[..]);
        first.more_content = true;
        vec![out(&m.reply_channel, &first)]
    })
    .await;
    let got = raw_exchange(
        server.addr,
        b"GET /stalled HTTP/1.1\r\nhost: x\r\n\r\n",
        WAIT,
    )
    .await;
    let text = String::from_utf8_lossy(&got);
    assert_eq!(raw_status(&got), Some(200), "{text}");
    assert!(text.contains("partial"), "{text}");
    // Chunked encoding never terminated: the client can tell the body is incomplete.
    assert!(!text.ends_with("0\r\n\r\n"), "{text}");
    let request: HttpRequest = worker.next_on(HTTP_REQUEST).await.decode().unwrap();
    let gone: HttpDisconnect = worker.next_on(HTTP_DISCONNECT).await.decode().unwrap();
    assert_eq!(gone.reply_channel, request.reply_channel);
    assert_eq!(server.metrics.snapshot().http_aborted_streams, 1);

    // A body that trickles in slower than the HTTP timeout.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut tcp,
        b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly a little",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut got),
    )
    .await;
    assert_eq!(
        raw_status(&got),
        Some(408),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

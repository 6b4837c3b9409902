//! The interface server's edge rules over loopback with real clients: the WebSocket origin policy
//! (cross-origin 403 before any worker hears of it, same-origin 101, no-Origin both ways, allowed
//! patterns, public paths), Host validation (missing / repeated / malformed → 400 always, the
//! allowed list), the per-address connection limit (peer address, and forwarded address behind a
//! proxy), the per-socket frame rate limit (delayed, then closed with 1008), and the cap on groups
//! per socket (a real worker's `group_add` past it closes the socket with 1008 and is undone, on
//! Redis and on the in-memory layer), each counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod server_support;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use server_support::*;
use switchyard::asgi::{WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT, WebsocketDisconnect};
use switchyard::layer::{Layer, LayerSettings};
use switchyard::routing::{ConsumerError, Ctx, Message as AsgiMessage, Router, route};
use switchyard::server::{FrameRateLimit, OriginPolicy, ServerConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;

/// Opens `url` with extra request headers; `Ok(status 101)` or `Err(refused status)`.
async fn handshake(url: &str, headers: &[(&'static str, &str)]) -> Result<Client, u16> {
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, HeaderValue::from_str(value).unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake timed out")
    {
        Ok((ws, resp)) => {
            assert_eq!(resp.status(), 101);
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected handshake error {e}"),
    }
}

#[tokio::test]
async fn cross_origin_handshakes_are_refused_before_any_worker_sees_them() {
    let (layer, server) = TestServer::on_memory(ServerConfig::default()).await;
    let mut worker = Worker::echo(&layer).await;
    let own = format!("http://{}", server.addr);
    let url = server.ws_url("/ws/chat/lobby/");

    let lookalike = format!("http://{}.evil.example", server.addr.ip());
    // Same host, another port: another origin.
    let other_port = format!("http://{}:{}", server.addr.ip(), server.addr.port() + 1);
    for evil in [
        "http://evil.example",
        "null",
        lookalike.as_str(),
        other_port.as_str(),
    ] {
        assert_eq!(
            handshake(&url, &[("origin", evil)]).await.err(),
            Some(403),
            "{evil}"
        );
    }
    let m = server.metrics.snapshot();
    assert_eq!((m.origin_rejected, m.ws_connects, m.ws_accepted), (4, 0, 0));

    // The page's own origin is accepted, and so is a client that sends none.
    let mut ws = handshake(&url, &[("origin", &own)]).await.unwrap();
    send_text(&mut ws, "same origin").await;
    assert_eq!(
        next_message(&mut ws).await,
        Some(Message::text("same origin"))
    );
    let _plain = handshake(&url, &[]).await.unwrap();
    let m = server.metrics.snapshot();
    assert_eq!((m.origin_rejected, m.ws_connects, m.ws_accepted), (4, 2, 2));
    // The first connect the worker saw is the accepted one: the refused never reached it.
    let first: switchyard::asgi::WebsocketConnect =
        worker.next_on(WEBSOCKET_CONNECT).await.decode().unwrap();
    assert_eq!(first.header("origin"), Some(own.as_bytes()));
}

#[tokio::test]
async fn missing_origin_passes_by_default_and_can_be_refused() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        origins: OriginPolicy {
            refuse_missing: true,
            public_paths: vec!["/ws/public/*".into()],
            ..OriginPolicy::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let _worker = Worker::echo(&layer).await;
    assert_eq!(
        handshake(&server.ws_url("/ws/chat/x/"), &[]).await.err(),
        Some(403)
    );
    let own = format!("http://{}", server.addr);
    handshake(&server.ws_url("/ws/chat/x/"), &[("origin", &own)])
        .await
        .unwrap();
    // A public path takes any origin, or none.
    handshake(&server.ws_url("/ws/public/feed/"), &[])
        .await
        .unwrap();
    handshake(
        &server.ws_url("/ws/public/feed/"),
        &[("origin", "https://anyone.example")],
    )
    .await
    .unwrap();
    assert_eq!(server.metrics.snapshot().origin_rejected, 1);
}

#[tokio::test]
async fn allowed_origin_patterns_and_forwarded_scheme() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        origins: OriginPolicy {
            allowed: vec![
                "https://*.example.com".into(),
                "http://app.test:3000".into(),
            ],
            ..OriginPolicy::default()
        },
        proxy_headers: true,
        ..ServerConfig::default()
    })
    .await;
    let _worker = Worker::echo(&layer).await;
    let url = server.ws_url("/ws/echo/");
    for (origin, expected) in [
        ("https://a.example.com", None),
        ("https://a.b.example.com", None),
        ("http://a.example.com", Some(403)),
        ("https://example.com", Some(403)),
        ("http://app.test:3000", None),
        ("http://app.test", Some(403)),
    ] {
        assert_eq!(
            handshake(&url, &[("origin", origin)]).await.err(),
            expected,
            "{origin}"
        );
    }
    // Behind a TLS-terminating proxy that says so, the page's origin is https on the public host.
    let forwarded = [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "chat.example.org"),
    ];
    let with = |origin: &'static str| {
        let mut h = forwarded.to_vec();
        h.push(("origin", origin));
        h
    };
    handshake(&url, &with("https://chat.example.org"))
        .await
        .unwrap();
    assert_eq!(
        handshake(&url, &with("http://chat.example.org"))
            .await
            .err(),
        Some(403)
    );
}

/// The status of a raw request, and the rest of the response.
async fn raw(server: &TestServer, request: &str) -> (Option<u16>, String) {
    let got = raw_exchange(server.addr, request.as_bytes(), Duration::from_secs(5)).await;
    // `HTTP/1.x NNN`: an HTTP/1.0 request is answered in HTTP/1.0.
    let status = std::str::from_utf8(got.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|_| got.starts_with(b"HTTP/1."));
    (status, String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
async fn host_headers_follow_rfc_9112_and_the_allowed_list() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        allowed_hosts: vec![".example.com".into(), "127.0.0.1".into()],
        ..ServerConfig::default()
    })
    .await;
    let _worker = Worker::echo(&layer).await;
    let ok = |host: &str| format!("GET /p HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    for host in [
        "example.com",
        "a.b.example.com:8443",
        "127.0.0.1:9",
        "EXAMPLE.com.",
    ] {
        let (status, text) = raw(&server, &ok(host)).await;
        assert_eq!(status, Some(200), "{host}: {text}");
        assert!(text.ends_with("echo: /p"), "{text}");
    }
    let refused = [
        (ok("evil.example"), "Host not allowed\n"),
        (ok("badexample.com"), "Host not allowed\n"),
        (ok("exa mple.com"), "Invalid Host header\n"),
        (ok("example.com:99999"), "Invalid Host header\n"),
        (ok("example.com@evil"), "Invalid Host header\n"),
        (
            "GET /p HTTP/1.1\r\nconnection: close\r\n\r\n".to_owned(),
            "Missing Host header\n",
        ),
        (
            "GET /p HTTP/1.1\r\nhost: example.com\r\nhost: example.com\r\nconnection: close\r\n\r\n"
                .to_owned(),
            "Several Host headers\n",
        ),
    ];
    for (request, reason) in &refused {
        let (status, text) = raw(&server, request).await;
        assert_eq!(status, Some(400), "{request:?}: {text}");
        assert!(text.ends_with(reason), "{request:?}: {text}");
    }
    // HTTP/1.0 may omit Host; with an allowed list that names hosts, such a request names none.
    let (status, _) = raw(&server, "GET /p HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, Some(400));
    // Handshakes obey the same rules.
    assert_eq!(
        handshake(&server.ws_url("/ws/"), &[("host", "evil.example")])
            .await
            .err(),
        Some(400)
    );
    // Health probes name the pod's address: only the list is skipped, not RFC 9112.
    let (status, _) = raw(
        &server,
        "GET /healthz HTTP/1.1\r\nhost: 10.1.2.3:8000\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, Some(200));
    let (status, _) = raw(
        &server,
        "GET /healthz HTTP/1.1\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, Some(400));
    assert_eq!(
        server.metrics.snapshot().host_rejected,
        refused.len() as u64 + 3
    );
    assert_eq!(server.metrics.snapshot().http_requests, 4);
}

#[tokio::test]
async fn default_hosts_take_any_name_but_not_malformed_heads() {
    let (layer, server) = TestServer::on_memory(ServerConfig::default()).await;
    let _worker = Worker::echo(&layer).await;
    let (status, _) = raw(
        &server,
        "GET / HTTP/1.1\r\nhost: anything.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, Some(200));
    let (status, _) = raw(&server, "GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, Some(200));
    for bad in [
        "GET / HTTP/1.1\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: a/b\r\nconnection: close\r\n\r\n",
    ] {
        assert_eq!(raw(&server, bad).await.0, Some(400), "{bad:?}");
    }
    assert_eq!(server.metrics.snapshot().host_rejected, 3);
}

#[tokio::test]
async fn connections_per_peer_address_are_limited_and_counted() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        max_connections_per_ip: 2,
        limit_loopback: true,
        ..ServerConfig::default()
    })
    .await;
    let _worker = Worker::echo(&layer).await;
    let a = ws_connect(&server.ws_url("/a")).await;
    let _b = ws_connect(&server.ws_url("/b")).await;
    let (status, text) = raw(&server, "GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(status, Some(429), "{text}");
    assert!(text.ends_with("too many open connections from this IP\n"));
    assert_eq!(server.metrics.snapshot().per_ip_refused, 1);
    // A slot frees when a socket closes.
    drop(a);
    tokio::time::timeout(WAIT, async {
        loop {
            let (status, _) = raw(
                &server,
                "GET /x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            )
            .await;
            if status == Some(200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn loopback_is_not_limited_unless_asked() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        max_connections_per_ip: 1,
        ..ServerConfig::default()
    })
    .await;
    let _worker = Worker::echo(&layer).await;
    let _a = ws_connect(&server.ws_url("/a")).await;
    let _b = ws_connect(&server.ws_url("/b")).await;
    assert_eq!(server.metrics.snapshot().per_ip_refused, 0);
}

#[tokio::test]
async fn behind_a_proxy_sockets_are_limited_per_forwarded_address() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        max_connections_per_ip: 2,
        proxy_headers: true,
        ..ServerConfig::default()
    })
    .await;
    let mut worker = Worker::echo(&layer).await;
    let url = server.ws_url("/ws/echo/");
    let client = |ip: &'static str| [("x-forwarded-for", ip)];
    let first = handshake(&url, &client("203.0.113.7")).await.unwrap();
    let _second = handshake(&url, &client("203.0.113.7, 10.0.0.1"))
        .await
        .unwrap();
    assert_eq!(
        handshake(&url, &client("203.0.113.7")).await.err(),
        Some(429)
    );
    // Another client behind the same proxy is not affected.
    let _other = handshake(&url, &client("198.51.100.1")).await.unwrap();
    let m = server.metrics.snapshot();
    assert_eq!((m.per_ip_refused, m.ws_connects), (1, 3));
    // Closing a socket gives its address a slot back.
    drop(first);
    worker.next_on(WEBSOCKET_DISCONNECT).await;
    tokio::time::timeout(WAIT, async {
        while handshake(&url, &client("203.0.113.7")).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_flooding_socket_is_slowed_then_closed_1008() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        limit_loopback: true,
        ws_rate_limit: Some(FrameRateLimit {
            messages_per_second: 10.0,
            message_burst: 5.0,
            bytes_per_second: 0.0,
            byte_burst: 0.0,
            close_after: Duration::from_secs(1),
        }),
        ..ServerConfig::default()
    })
    .await;
    let mut worker = Worker::echo(&layer).await;
    let mut ws = ws_connect(&server.ws_url("/flood")).await;
    for i in 0..60 {
        if ws.send(Message::text(format!("m{i}"))).await.is_err() {
            break;
        }
    }
    // Echoes come back in order: the burst at once, then one per tenth of a second, until the
    // socket has been over its limit for a second.
    let mut echoes = Vec::new();
    let code = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => echoes.push((t.to_string(), Instant::now())),
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(code, Some(1008));
    let texts: Vec<&str> = echoes.iter().map(|(t, _)| t.as_str()).collect();
    let expected: Vec<String> = (0..texts.len()).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected, "echoes in order, none skipped");
    // 5 at once and about 10 delayed over the second; a slow machine can only delay more.
    assert!(
        (8..=17).contains(&echoes.len()),
        "{} frames got through",
        echoes.len()
    );
    let spread = echoes.last().unwrap().1 - echoes[4].1;
    assert!(
        spread >= Duration::from_millis(600),
        "the frames after the burst were not delayed: {spread:?}"
    );
    let d: WebsocketDisconnect = worker.next_on(WEBSOCKET_DISCONNECT).await.decode().unwrap();
    assert_eq!(d.code, 1008);
    let m = server.metrics.snapshot();
    assert_eq!(d.order, m.ws_frames_in + 1);
    assert_eq!(m.ws_rate_limit_closes, 1);
    // The echo of the last frames forwarded may come after the close.
    assert!(
        (echoes.len() as u64..=echoes.len() as u64 + 2).contains(&m.ws_frames_in),
        "{} forwarded, {} echoed",
        m.ws_frames_in,
        echoes.len()
    );
    assert!(m.ws_frames_throttled >= 3, "{m:?}");
}

#[tokio::test]
async fn a_socket_within_its_limit_is_never_delayed() {
    let (layer, server) = TestServer::on_memory(ServerConfig {
        limit_loopback: true,
        ws_rate_limit: Some(FrameRateLimit {
            messages_per_second: 1.0,
            message_burst: 30.0,
            bytes_per_second: 1000.0,
            byte_burst: 100_000.0,
            close_after: Duration::from_secs(1),
        }),
        ..ServerConfig::default()
    })
    .await;
    let _worker = Worker::echo(&layer).await;
    let mut ws = ws_connect(&server.ws_url("/calm")).await;
    for i in 0..20 {
        send_text(&mut ws, &format!("{i}")).await;
        assert_eq!(
            next_message(&mut ws).await,
            Some(Message::text(format!("{i}")))
        );
    }
    let m = server.metrics.snapshot();
    assert_eq!((m.ws_frames_throttled, m.ws_rate_limit_closes), (0, 0));
    // A large frame within the byte burst passes at once too.
    ws.send(Message::binary(vec![7u8; 99_000])).await.unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Some(Message::binary(vec![7u8; 99_000]))
    );
    assert_eq!(server.metrics.snapshot().ws_frames_throttled, 0);
}

/// Accepts every socket.
async fn accept(_: AsgiMessage, ctx: Ctx) -> Result<(), ConsumerError> {
    ctx.accept()
}

/// `join N` adds the socket to groups `g0` … `g{N-1}` and answers `joined N as {channel}`.
async fn join(m: AsgiMessage, ctx: Ctx) -> Result<(), ConsumerError> {
    let n: usize = m
        .text()
        .and_then(|t| t.strip_prefix("join "))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ConsumerError::other("expected `join N`"))?;
    for i in 0..n {
        ctx.group_add(&format!("g{i}"))?;
    }
    let channel = ctx.reply_channel().unwrap_or_default().to_owned();
    ctx.send_text(format!("joined {n} as {channel}"))
}

/// Sends `join n` and returns the socket's channel from the answer.
async fn joined(ws: &mut Client, n: usize) -> String {
    send_text(ws, &format!("join {n}")).await;
    match next_message(ws).await {
        Some(Message::Text(t)) => {
            let prefix = format!("joined {n} as ");
            t.strip_prefix(prefix.as_str())
                .unwrap_or_else(|| panic!("unexpected answer {t}"))
                .to_owned()
        }
        other => panic!("expected the join's answer, got {other:?}"),
    }
}

/// A server capping sockets at `cap` groups on `server_layer`, a routed worker on
/// `worker_layer` (the same backend): up to the cap stays open, one more closes with 1008, is
/// counted once, and the group that went over no longer holds the socket's channel.
async fn groups_per_socket_are_capped(server_layer: Layer, worker_layer: Layer) {
    const CAP: usize = 5;
    let server = TestServer::start(
        server_layer.clone(),
        ServerConfig {
            max_groups_per_socket: CAP,
            ..ServerConfig::default()
        },
    )
    .await;
    let router = Router::new([
        route("websocket.connect", accept),
        route("websocket.receive", join),
    ])
    .unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        switchyard::worker::Worker::new(worker_layer, Arc::new(router))
            .receive_timeout(Duration::from_millis(200))
            .run(stop.clone()),
    );

    let mut within = ws_connect(&server.ws_url("/ws/groups/")).await;
    let channel = joined(&mut within, CAP).await;
    // Joining the same groups again is no new membership.
    assert_eq!(joined(&mut within, CAP).await, channel);
    for i in 0..CAP {
        let members = server_layer.group_channels(&format!("g{i}")).await.unwrap();
        assert!(members.contains(&channel), "g{i}: {members:?}");
    }

    let mut over = ws_connect(&server.ws_url("/ws/groups/")).await;
    let over_channel = joined(&mut over, 1).await;
    // Its answer may come before or after the close: the close is what counts.
    send_text(&mut over, &format!("join {}", CAP + 1)).await;
    assert_eq!(close_code(&mut over).await, Some(1008));
    // The membership is discarded before the close is sent.
    let last = server_layer
        .group_channels(&format!("g{CAP}"))
        .await
        .unwrap();
    assert!(!last.contains(&over_channel), "{last:?}");
    assert_eq!(server.metrics.snapshot().ws_group_cap_closes, 1);

    // The socket within the cap is untouched.
    assert_eq!(joined(&mut within, CAP).await, channel);
    assert_eq!(server.metrics.snapshot().ws_group_cap_closes, 1);
    stop.cancel();
    tokio::time::timeout(WAIT, worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn groups_per_socket_are_capped_on_redis() {
    let redis = support::RedisServer::start();
    let server_layer = Layer::from_url(&redis.url(), LayerSettings::default())
        .await
        .unwrap();
    let worker_layer = Layer::from_url(&redis.url(), LayerSettings::default())
        .await
        .unwrap();
    groups_per_socket_are_capped(server_layer, worker_layer).await;
}

#[tokio::test]
async fn groups_per_socket_are_capped_in_memory() {
    let layer = Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap();
    groups_per_socket_are_capped(layer.clone(), layer).await;
}

//! What users get when Redis fails under the real binary: `serve` and `worker` processes on a
//! redis-server the harness stops, restarts and flushes, with real WebSocket and HTTP clients.
//! Sockets keep receiving broadcasts after Redis lost its data (memberships put back by the
//! server that holds them) and a socket's ordered frames are relayed again at once, the first request after a restart succeeds, `/healthz` tells the
//! truth, a killed server's memberships and inbox go with its lease, `flush` touches only its
//! own keys, and `--on-layer-loss close` closes sockets with 1012.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::redis_support::RedisServer;
use support::{Proc, Ws, bin, broadcasts_resume, connect, http, text_within};
use switchyard::layer::{Layer, LayerSettings};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// The close code the server sends within `limit`.
async fn close_code(ws: &mut Ws, limit: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()?? {
            Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

async fn http_get(base: &str, path: &str) -> (u16, String) {
    http(base, "GET", path, "").await
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns the time it took.
async fn wait_for<F, Fut>(limit: Duration, what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn zcard(redis: &RedisServer, key: &str) -> usize {
    redis
        .try_cmd::<usize>(&[b"ZCARD", key.as_bytes()])
        .unwrap_or(0)
}

fn serve(redis: &RedisServer, extra: &[&str]) -> Proc {
    let url = redis.url();
    let mut args = vec!["serve", "--port", "0", "--layer", url.as_str()];
    args.extend_from_slice(extra);
    Proc::start(&args, true)
}

fn worker(redis: &RedisServer) -> Proc {
    let url = redis.url();
    Proc::start(
        &["worker", "--concurrency", "32", "--layer", url.as_str()],
        false,
    )
}

async fn test_layer(redis: &RedisServer) -> Layer {
    Layer::from_url(&redis.url(), LayerSettings::default())
        .await
        .unwrap()
}

/// Opens `n` sockets in relay room `room` and waits until the group has `expected` members
/// and the server reports the memberships.
async fn join_room(
    server: &Proc,
    redis: &RedisServer,
    room: &str,
    n: usize,
    expected: usize,
) -> Vec<Ws> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(connect(&format!("{}/ws/relay/{room}/", server.ws())).await);
    }
    let key = format!("asgi:group:relay-{room}");
    wait_for(WAIT, "every socket in the group", || async {
        zcard(redis, &key) == expected
    })
    .await;
    let base = server.base.clone().expect("announced");
    wait_for(WAIT, "the server to record the memberships", || {
        let base = base.clone();
        async move {
            let (_, body) = http_get(&base, "/healthz").await;
            serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["memberships"].as_u64())
                .is_some_and(|m| m as usize >= n)
        }
    })
    .await;
    sockets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_hear_broadcasts_again_after_a_restart_and_after_flushall() {
    let mut redis = RedisServer::start();
    let server = serve(&redis, &[]);
    let _worker = worker(&redis);
    let mut sockets = join_room(&server, &redis, "faults", 200, 200).await;
    let layer = test_layer(&redis).await;

    // (a) Redis restarts without its data (nothing is saved): the group is gone.
    redis.restart();
    assert_eq!(zcard(&redis, "asgi:group:relay-faults"), 0);
    let took =
        broadcasts_resume(&layer, "relay-faults", &mut sockets, Duration::from_secs(5)).await;
    eprintln!("after a restart, all 200 sockets heard a broadcast {took:?} after Redis answered");
    assert_eq!(zcard(&redis, "asgi:group:relay-faults"), 200);
    a_socket_relays_again(&mut sockets, "relayed after the restart").await;

    // (b) FLUSHALL with Redis up.
    redis.cmd::<()>(&[b"FLUSHALL"]);
    let took =
        broadcasts_resume(&layer, "relay-faults", &mut sockets, Duration::from_secs(5)).await;
    eprintln!("after FLUSHALL, all 200 sockets heard a broadcast {took:?} later");
    assert_eq!(zcard(&redis, "asgi:group:relay-faults"), 200);
    a_socket_relays_again(&mut sockets, "relayed after FLUSHALL").await;
}

/// Socket 0 sends `text` through the relay, which keeps each socket's frames in order: Redis
/// lost that socket's ordering state with the rest, and every socket must still hear the frame
/// within 5 s (its order restarts; it used to park until the 60-s expiry).
async fn a_socket_relays_again(sockets: &mut [Ws], text: &str) {
    sockets[0].send(Message::text(text)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    for (i, ws) in sockets.iter_mut().enumerate() {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = text_within(ws, left).await;
            match got.as_deref() {
                Some(t) if t == text => break,
                Some(_) => continue,
                None => panic!("socket {i} did not hear {text:?} within 5 s"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_and_handshake_after_a_restart_succeed() {
    let mut redis = RedisServer::start();
    let server = serve(&redis, &[]);
    let _worker = worker(&redis);
    let base = server.base.clone().unwrap();
    assert_eq!(http_get(&base, "/").await.0, 200);
    let mut echo = connect(&format!("{}/ws/echo/", server.ws())).await;
    echo.send(Message::text("warm")).await.unwrap();
    assert_eq!(text_within(&mut echo, WAIT).await.as_deref(), Some("warm"));

    // (c) Both processes' connections died with Redis; the very next request goes through.
    redis.restart();
    let (status, body) = http_get(&base, "/").await;
    assert_eq!(status, 200, "first request after the restart: {body}");
    let mut fresh = connect(&format!("{}/ws/echo/", server.ws())).await;
    fresh.send(Message::text("first")).await.unwrap();
    assert_eq!(
        text_within(&mut fresh, WAIT).await.as_deref(),
        Some("first")
    );
    // And the socket opened before the restart still echoes.
    echo.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        text_within(&mut echo, WAIT).await.as_deref(),
        Some("still here")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_503_while_redis_is_down_and_200_once_it_is_back() {
    let mut redis = RedisServer::start();
    let server = serve(&redis, &[]);
    let base = server.base.clone().unwrap();
    let (status, body) = http_get(&base, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""status":"ok""#), "{body}");

    // (e) While Redis is down.
    redis.stop();
    wait_for(Duration::from_secs(5), "/healthz to answer 503", || {
        let base = base.clone();
        async move { http_get(&base, "/healthz").await.0 == 503 }
    })
    .await;
    let (_, body) = http_get(&base, "/healthz").await;
    assert!(
        body.contains(r#""status":"layer_unavailable""#)
            && body.contains(r#""layer":"unavailable""#),
        "{body}"
    );
    // A request meanwhile is answered 503 at once, not after the 60 s response timeout.
    let asked = Instant::now();
    assert_eq!(http_get(&base, "/").await.0, 503);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );

    redis.restart();
    wait_for(
        Duration::from_secs(5),
        "/healthz to answer 200 again",
        || {
            let base = base.clone();
            async move { http_get(&base, "/healthz").await.0 == 200 }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_servers_memberships_and_inbox_go_with_its_lease() {
    let redis = RedisServer::start();
    let mut doomed = serve(&redis, &["--lease-ttl", "3"]);
    let survivor = serve(&redis, &["--lease-ttl", "3"]);
    let _worker = worker(&redis);
    let _doomed_sockets = join_room(&doomed, &redis, "lease", 20, 20).await;
    let members: Vec<String> = redis.cmd(&[b"ZRANGE", b"asgi:group:relay-lease", b"0", b"-1"]);
    let doomed_inbox = {
        let m = &members[0];
        m[..=m.find('!').unwrap()].to_owned()
    };
    let mut survivors = join_room(&survivor, &redis, "lease", 20, 40).await;
    let layer = test_layer(&redis).await;
    // Park a message in the doomed inbox so it has a key to remove.
    let report = layer
        .group_send("relay-lease", &serde_json::json!({"text": "before"}))
        .await
        .unwrap();
    assert_eq!((report.members, report.full), (40, 0));

    // (d) kill -9: no graceful release; the lease lapses and a live server removes the rest.
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    let _ = layer
        .group_send("relay-lease", &serde_json::json!({"text": "to the dead"}))
        .await;
    let inbox_key = format!("asgi{doomed_inbox}");
    let took = wait_for(
        Duration::from_secs(10),
        "the dead server's members to go",
        || async {
            zcard(&redis, "asgi:group:relay-lease") == 20
                && redis
                    .try_cmd::<i64>(&[b"EXISTS", inbox_key.as_bytes()])
                    .unwrap_or(1)
                    == 0
        },
    )
    .await;
    eprintln!(
        "a killed server's memberships and inbox were removed {took:?} after kill -9 (lease ttl 3 s)"
    );
    let left: Vec<String> = redis.cmd(&[b"ZRANGE", b"asgi:group:relay-lease", b"0", b"-1"]);
    assert!(
        left.iter().all(|m| !m.starts_with(&doomed_inbox)),
        "{left:?}"
    );
    let index = format!("asgi:inbox-groups:{doomed_inbox}");
    assert_eq!(redis.cmd::<i64>(&[b"EXISTS", index.as_bytes()]), 0);
    // The survivors' broadcasts no longer pay for missing members.
    let report = layer
        .group_send("relay-lease", &serde_json::json!({"text": "after"}))
        .await
        .unwrap();
    assert_eq!((report.members, report.full), (20, 0));
    for ws in &mut survivors {
        let mut got = Vec::new();
        while let Some(t) = text_within(ws, WAIT).await {
            got.push(t.clone());
            if t == "after" {
                break;
            }
        }
        assert_eq!(got.last().map(String::as_str), Some("after"), "{got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_layer_loss_close_closes_every_socket_with_1012() {
    let redis = RedisServer::start();
    let server = serve(&redis, &["--on-layer-loss", "close"]);
    let _worker = worker(&redis);
    let mut sockets = join_room(&server, &redis, "closing", 5, 5).await;
    let mut echo = connect(&format!("{}/ws/echo/", server.ws())).await;
    // (g) Redis loses its data: every socket, in a group or not, is told to reconnect.
    redis.cmd::<()>(&[b"FLUSHALL"]);
    for ws in sockets.iter_mut().chain(std::iter::once(&mut echo)) {
        assert_eq!(close_code(ws, WAIT).await, Some(1012));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_and_stats_leave_a_neighbouring_prefix_alone() {
    let redis = RedisServer::start();
    let url = redis.url();
    // Another project's keys under prefixes that start with ours.
    redis.cmd::<()>(&[b"ZADD", b"asgi_stagingtasks", b"1", b"theirs"]);
    redis.cmd::<()>(&[b"ZADD", b"asgi_staging:group:room", b"1", b"theirs"]);
    redis.cmd::<()>(&[b"ZADD", b"asgixfoo", b"1", b"theirs"]);
    redis.cmd::<()>(&[b"ZADD", b"asgix:group:room", b"1", b"theirs"]);
    // Ours.
    let sent = bin()
        .args(["send", "--layer", &url, "tasks.x", r#"{"n": 1}"#])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    let layer = test_layer(&redis).await;
    layer.group_add("room", "member").await.unwrap();

    // (f) stats lists ours only.
    let stats = bin()
        .args(["stats", "--json", "--layer", &url])
        .output()
        .unwrap();
    assert!(stats.status.success(), "{stats:?}");
    let listed: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(
        listed,
        serde_json::json!({
            "channels": [{"name": "tasks.x", "count": 1}],
            "groups": [{"name": "room", "count": 1}],
        })
    );

    let flushed = bin().args(["flush", "--layer", &url]).output().unwrap();
    assert!(flushed.status.success(), "{flushed:?}");
    for theirs in [
        "asgi_stagingtasks",
        "asgi_staging:group:room",
        "asgixfoo",
        "asgix:group:room",
    ] {
        assert_eq!(
            redis.cmd::<i64>(&[b"EXISTS", theirs.as_bytes()]),
            1,
            "{theirs} must survive our flush"
        );
    }
    assert_eq!(redis.cmd::<i64>(&[b"EXISTS", b"asgitasks.x"]), 0);
    assert_eq!(redis.cmd::<i64>(&[b"EXISTS", b"asgi:group:room"]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_globs_match_nothing_exits_2() {
    let redis = RedisServer::start();
    let out = bin()
        .args([
            "worker",
            "--layer",
            &redis.url(),
            "--only-channels",
            "nothing.matches.*",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to listen on"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_health_endpoint_follows_the_layer() {
    let mut redis = RedisServer::start();
    let port = support::redis_support::free_port();
    let bind = format!("127.0.0.1:{port}");
    let _worker = Proc::start(
        &["worker", "--layer", &redis.url(), "--health-bind", &bind],
        false,
    );
    let base = format!("http://{bind}");
    wait_for(WAIT, "the worker's /healthz to answer 200", || {
        let base = base.clone();
        async move {
            tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
                .await
                .is_ok()
                && http_get(&base, "/healthz").await.0 == 200
        }
    })
    .await;
    redis.stop();
    wait_for(
        Duration::from_secs(10),
        "the worker's /healthz to answer 503",
        || {
            let base = base.clone();
            async move { http_get(&base, "/healthz").await.0 == 503 }
        },
    )
    .await;
    redis.restart();
    wait_for(
        Duration::from_secs(10),
        "the worker's /healthz to answer 200 again",
        || {
            let base = base.clone();
            async move { http_get(&base, "/healthz").await.0 == 200 }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_whose_frames_go_nowhere_too_long_is_closed_1011() {
    let mut redis = RedisServer::start();
    let server = serve(&redis, &["--layer-outage-close", "1"]);
    let _worker = worker(&redis);
    let mut echo = connect(&format!("{}/ws/echo/", server.ws())).await;
    echo.send(Message::text("up")).await.unwrap();
    assert_eq!(text_within(&mut echo, WAIT).await.as_deref(), Some("up"));
    redis.stop();
    // Every frame is lost now; after a second of that the server says so with 1011.
    let started = Instant::now();
    let code = loop {
        assert!(started.elapsed() < WAIT, "the socket was never closed");
        if echo.send(Message::text("anyone?")).await.is_err() {
            break close_code(&mut echo, WAIT).await;
        }
        if let Some(code) = close_code(&mut echo, Duration::from_millis(200)).await {
            break Some(code);
        }
    };
    assert_eq!(code, Some(1011));
    let (_, metrics) = http_get(&server.base.clone().unwrap(), "/healthz").await;
    assert!(metrics.contains(r#""layer":"unavailable""#), "{metrics}");
}

//! The `switchyard` binary end to end: `serve` + `worker` on a real redis-server and `dev` on
//! the in-memory layer, driven by real HTTP and WebSocket clients; the chat room, echo, relay and
//! background jobs; the small commands (`send`, `stats`, `flush`) with their exit codes; and a
//! graceful stop on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::redis_support::RedisServer;
use support::{Proc, bin, connect, http, http_with, next_text};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// Exercises a running server (dev, or serve + worker) through its public surface.
async fn exercise(base: &str, ws_base: &str) {
    // Pages through the layer.
    let (status, body) = http(base, "GET", "/", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("<title>Switchyard chat</title>"), "{body}");
    assert_eq!(
        http(base, "GET", "/nowhere", "").await,
        (404, "not found\n".to_owned())
    );

    // Echo: text and binary unchanged.
    let mut echo = connect(&format!("{ws_base}/ws/echo/")).await;
    echo.send(Message::text("héllo")).await.unwrap();
    assert_eq!(next_text(&mut echo).await, "héllo");
    echo.send(Message::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, echo.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::binary(vec![0u8, 159, 146, 150]));

    // An unknown socket path is refused (403).
    let refused = tokio_tungstenite::connect_async(format!("{ws_base}/ws/nowhere/")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }

    // Relay: every member, sender included, gets the frame unchanged.
    let mut a = connect(&format!("{ws_base}/ws/relay/r1/")).await;
    let mut b = connect(&format!("{ws_base}/ws/relay/r1/")).await;
    a.send(Message::text("to everyone")).await.unwrap();
    assert_eq!(next_text(&mut a).await, "to everyone");
    assert_eq!(next_text(&mut b).await, "to everyone");

    // Chat: history on join, broadcast with a server timestamp, bad input answered, not broadcast.
    let mut ann = connect(&format!("{ws_base}/ws/chat/lobby/")).await;
    let hello: serde_json::Value = serde_json::from_str(&next_text(&mut ann).await).unwrap();
    assert_eq!(hello["type"], "history");
    ann.send(Message::text(
        r#"{"handle": " ann ", "message": "<script>x</script>"}"#,
    ))
    .await
    .unwrap();
    let said: serde_json::Value = serde_json::from_str(&next_text(&mut ann).await).unwrap();
    assert_eq!(
        (said["type"].as_str(), said["handle"].as_str()),
        (Some("message"), Some("ann"))
    );
    assert_eq!(
        said["message"], "<script>x</script>",
        "stored and sent as text; the page escapes it"
    );
    assert!(said["ts"].as_str().unwrap().ends_with('Z'));
    ann.send(Message::text("not json")).await.unwrap();
    let err: serde_json::Value = serde_json::from_str(&next_text(&mut ann).await).unwrap();
    assert_eq!(err["type"], "error");
    let mut bob = connect(&format!("{ws_base}/ws/chat/lobby/")).await;
    let history: serde_json::Value = serde_json::from_str(&next_text(&mut bob).await).unwrap();
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.last().unwrap()["message"], "<script>x</script>");
    let (_, rooms) = http(base, "GET", "/api/rooms", "").await;
    assert!(rooms.contains("\"lobby\""), "{rooms}");

    // Background job: POST starts it on jobs.digest, the page's socket hears the result.
    let mut page = connect(&format!("{ws_base}/ws/jobs/ticket-0001/")).await;
    let (status, body) = http(
        base,
        "POST",
        "/jobs/",
        "ticket=ticket-0001&text=abc&rounds=1",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let done: serde_json::Value = serde_json::from_str(&next_text(&mut page).await).unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(
        done["digest"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let (status, _) = http(
        base,
        "POST",
        "/jobs/",
        "ticket=ticket-0001&text=abc&rounds=0",
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_everything_in_one_process() {
    let metrics_port = support::redis_support::free_port();
    let metrics = format!("--metrics-bind=127.0.0.1:{metrics_port}");
    let mut dev = Proc::start(&["dev", "--port", "0", "--no-open", &metrics], true);
    let base = dev.base.clone().unwrap();
    exercise(&base, &dev.ws()).await;

    // Prometheus metrics count what just happened, per channel.
    let (status, text) = http(
        &format!("http://127.0.0.1:{metrics_port}"),
        "GET",
        "/metrics",
        "",
    )
    .await;
    assert_eq!(status, 200);
    let value = |line: &str| -> u64 {
        let found = text
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("{line} in {text}"));
        found.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("switchyard_worker_messages_in_total{channel=\"websocket.receive\"}") >= 5);
    assert!(value("switchyard_worker_messages_in_total{channel=\"jobs.digest\"}") >= 1);
    assert!(value("switchyard_worker_messages_out_total{channel=\"group\"}") >= 3);
    assert!(value("switchyard_server_messages_in_total{channel=\"http.request\"}") >= 5);
    assert_eq!(value("switchyard_consumer_panics_total"), 0);
    assert_eq!(value("switchyard_layer_channel_full_total"), 0);
    assert!(text.contains("switchyard_consumer_latency_seconds_bucket{le=\"+Inf\"}"));
    assert!(dev.terminate().success(), "dev exits 0 on SIGTERM");
}

/// Opens `url` with an `Origin` header; the handshake's status (101 when accepted).
async fn handshake_status(url: &str, origin: &str) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", origin.parse().unwrap());
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
    {
        Ok((_, resp)) => resp.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_refuses_cross_origin_job_posts_and_sockets() {
    let metrics_port = support::redis_support::free_port();
    let metrics = format!("--metrics-bind=127.0.0.1:{metrics_port}");
    let mut dev = Proc::start(&["dev", "--port", "0", "--no-open", &metrics], true);
    let base = dev.base.clone().unwrap();
    let ws_base = dev.ws();
    let own = base.clone();
    let form = "ticket=ticket-csrf1&text=abc&rounds=1";

    // A form on another site posting into the job queue: refused, and no job runs.
    let mut page = connect(&format!("{ws_base}/ws/jobs/ticket-csrf1/")).await;
    for extra in [
        "origin: http://evil.example\r\n",
        "origin: null\r\n",
        "sec-fetch-site: cross-site\r\n",
        "referer: http://evil.example/attack.html\r\n",
    ] {
        let (status, body) = http_with(&base, "POST", "/jobs/", form, extra).await;
        assert_eq!(status, 403, "{extra}: {body}");
        assert!(body.starts_with("Forbidden (CSRF check failed)"), "{body}");
    }
    // The page's own post is accepted, and its socket hears only that one job.
    let (status, body) =
        http_with(&base, "POST", "/jobs/", form, &format!("origin: {own}\r\n")).await;
    assert_eq!(status, 202, "{body}");
    let accepted: serde_json::Value = serde_json::from_str(&body).unwrap();
    let done: serde_json::Value = serde_json::from_str(&next_text(&mut page).await).unwrap();
    assert_eq!(done["job"], accepted["job"]);

    // Sockets: another site's page is refused at the edge; the page's own origin and, under
    // `dev`, a front end on another localhost port are accepted.
    let chat = format!("{ws_base}/ws/chat/lobby/");
    assert_eq!(handshake_status(&chat, "http://evil.example").await, 403);
    assert_eq!(handshake_status(&chat, &own).await, 101);
    assert_eq!(handshake_status(&chat, "http://localhost:5173").await, 101);
    let (_, text) = http(
        &format!("http://127.0.0.1:{metrics_port}"),
        "GET",
        "/metrics",
        "",
    )
    .await;
    assert!(
        text.lines()
            .any(|l| l == "switchyard_edge_refusals_total{rule=\"origin\"} 1"),
        "{text}"
    );
    assert!(dev.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_worker_on_redis_and_a_django_style_broadcast() {
    let redis = RedisServer::start();
    let layer = format!("--layer={}", redis.url());
    let mut worker = Proc::start(&["worker", &layer, "--concurrency", "4"], false);
    let mut web = Proc::start(&["serve", &layer, "--port", "0"], true);
    let base = web.base.clone().unwrap();
    exercise(&base, &web.ws()).await;

    // Anything sharing the Redis can broadcast into a room: here `switchyard send --group`, which
    // writes exactly what channels_redis' group_send writes.
    let mut carol = connect(&format!("{}/ws/chat/lobby/", web.ws())).await;
    next_text(&mut carol).await; // history
    let out = bin()
        .args([
            "send",
            &layer,
            "--group",
            "chat-lobby",
            r#"{"text": "from outside"}"#,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sent to group chat-lobby (1 members, 0 full)"
    );
    assert_eq!(next_text(&mut carol).await, "from outside");

    // A background job started from the command line: a worker routed to the task channel runs
    // it and the page waiting on the job's group hears the result.
    let mut page = connect(&format!("{}/ws/jobs/cli-ticket-1/", web.ws())).await;
    let job = r#"{"job": "from-cli", "ticket": "cli-ticket-1", "text": "abc", "rounds": 1}"#;
    let out = bin()
        .args(["send", &layer, "jobs.digest", job])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let done: serde_json::Value = serde_json::from_str(&next_text(&mut page).await).unwrap();
    assert_eq!(
        (done["job"].as_str(), done["type"].as_str()),
        (Some("from-cli"), Some("done"))
    );
    assert_eq!(
        done["digest"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    assert!(web.terminate().success(), "serve exits 0 on SIGTERM");
    assert!(worker.terminate().success(), "worker exits 0 on SIGTERM");
}

#[test]
fn small_commands_and_their_exit_codes() {
    let redis = RedisServer::start();
    let layer = format!("--layer={}", redis.url());
    let run = |args: &[&str]| bin().args(args).output().unwrap();

    let out = run(&[
        "send",
        &layer,
        "tasks.thumbnails",
        r#"{"id": 7, "data": {"$bytes": "AAE="}}"#,
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["stats", &layer, "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"channels":[{"name":"tasks.thumbnails","count":1}],"groups":[]}"#
    );
    let out = run(&["stats", &layer]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("tasks.thumbnails") && table.contains("channel"),
        "{table}"
    );
    assert!(run(&["flush", &layer]).status.success());
    let out = run(&["stats", &layer, "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"channels":[],"groups":[]}"#
    );

    // Usage and configuration errors: 2; layer unreachable: 3; channel full: 4.
    assert_eq!(run(&["send", &layer, "x", "[1, 2]"]).status.code(), Some(2));
    assert_eq!(
        run(&["send", &layer, "bad name", "{}"]).status.code(),
        Some(2)
    );
    assert_eq!(
        run(&["send", "--layer=ftp://x", "x", "{}"]).status.code(),
        Some(2)
    );
    assert_eq!(run(&["nonsense"]).status.code(), Some(2));
    let dead = format!(
        "--layer=redis://127.0.0.1:{}/0",
        support::redis_support::free_port()
    );
    let out = run(&["send", &dead, "x", "{}"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("channel layer unavailable"),
        "{out:?}"
    );
    assert!(
        run(&["send", &layer, "--capacity=1", "full", "{}"])
            .status
            .success()
    );
    assert_eq!(
        run(&["send", &layer, "--capacity=1", "full", "{}"])
            .status
            .code(),
        Some(4)
    );
    // A worker on the in-memory layer would share nothing with any server.
    assert_eq!(run(&["worker", "--layer=memory://"]).status.code(), Some(1));
}

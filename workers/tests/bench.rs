//! `switchyard bench` against tiny real servers started by the test on 127.0.0.1: a WebSocket
//! echo server (faithful, or deliberately dropping, corrupting or duplicating messages so the
//! counters are shown to catch it), a WebSocket room relay, and a raw-TCP HTTP/1.1 server that
//! answers with Content-Length and chunked bodies in turn.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// The handshake callback must return tungstenite's (large) error response type.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use switchyard_workers::bench::{self, BenchError, Report};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const LIMIT: Duration = Duration::from_secs(10);

/// What the test echo server does to the messages it echoes.
#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    /// Drops every n-th message.
    Drop(u64),
    /// Flips one padding byte of every n-th message.
    Corrupt(u64),
    /// Echoes every n-th message twice.
    Duplicate(u64),
}

async fn echo_server(fault: Fault) -> SocketAddr {
    echo_server_on("127.0.0.1:0", fault).await
}

async fn echo_server_on(bind: &str, fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let mut n = 0u64;
                while let Some(Ok(msg)) = ws.next().await {
                    if !(msg.is_text() || msg.is_binary()) {
                        continue;
                    }
                    n += 1;
                    let reply = match fault {
                        Fault::Drop(every) if n.is_multiple_of(every) => continue,
                        Fault::Corrupt(every) if n.is_multiple_of(every) => {
                            let mut bytes = msg.into_data().to_vec();
                            let last = bytes.len() - 1;
                            bytes[last] = if bytes[last] == b'x' { b'y' } else { b'x' };
                            Message::Binary(bytes.into())
                        }
                        Fault::Duplicate(every) if n.is_multiple_of(every) => {
                            if ws.send(msg.clone()).await.is_err() {
                                return;
                            }
                            msg
                        }
                        _ => msg,
                    };
                    if ws.send(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

type Rooms = Arc<Mutex<HashMap<String, Vec<mpsc::UnboundedSender<Message>>>>>;

/// Relays every text frame to every member of the room named in the path
/// (`/ws/relay/<room>/`), sender included. Members join during the handshake, so a client is
/// in its room as soon as its handshake completes.
async fn relay_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rooms: Rooms = Arc::default();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let rooms = rooms.clone();
            tokio::spawn(async move {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let room = Arc::new(Mutex::new(String::new()));
                let join = {
                    let (rooms, room) = (rooms.clone(), room.clone());
                    move |req: &Request, resp: Response| {
                        let name = req.uri().path().to_owned();
                        rooms
                            .lock()
                            .unwrap()
                            .entry(name.clone())
                            .or_default()
                            .push(tx);
                        *room.lock().unwrap() = name;
                        Ok(resp)
                    }
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, join).await else {
                    return;
                };
                let room = room.lock().unwrap().clone();
                let (mut sink, mut stream) = ws.split();
                tokio::spawn(async move {
                    while let Some(msg) = rx.recv().await {
                        if sink.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
                while let Some(Ok(msg)) = stream.next().await {
                    if msg.is_text() {
                        let members = rooms
                            .lock()
                            .unwrap()
                            .get(&room)
                            .cloned()
                            .unwrap_or_default();
                        for member in members {
                            let _ = member.send(msg.clone());
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Answers every request with "ok", alternating Content-Length and chunked responses.
async fn http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut served = 0u64;
                loop {
                    // A whole request: head, then Content-Length bytes of body.
                    let (head_end, body_len) = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map(|v| v.trim().parse::<usize>().unwrap())
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break (end + 4, len);
                            }
                        }
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    buf.drain(..head_end + body_len);
                    served += 1;
                    let response: &[u8] = if served.is_multiple_of(2) {
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n1\r\nk\r\n0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    };
                    if tcp.write_all(response).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn bench(args: &[&str]) -> anyhow::Result<Report> {
    let mut argv = vec!["bench"];
    argv.extend_from_slice(args);
    let parsed = bench::parse_args(argv).unwrap();
    tokio::time::timeout(LIMIT, bench::execute(parsed))
        .await
        .expect("bench run within the time limit")
}

/// The report's final JSON line, parsed back, and its last printed line equals it.
fn json_line(report: &Report) -> Value {
    let mut out = Vec::new();
    report.write_to(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let last = text.lines().last().unwrap();
    assert_eq!(last, report.json_line());
    serde_json::from_str(last).unwrap()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_closed_loop_counts_every_message() {
    let addr = echo_server(Fault::None).await;
    let url = format!("ws://{addr}/ws/echo/");
    let report = bench(&[
        "echo",
        "-q",
        "--url",
        &url,
        "-c",
        "4",
        "--in-flight",
        "3",
        "--count",
        "2000",
        "--size",
        "100",
        "-d",
        "8",
    ])
    .await
    .unwrap();
    let v = json_line(&report);
    assert_eq!(v["mode"], "echo");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(u(&v, "connections"), 4);
    assert_eq!(u(&v, "sent"), 2000);
    assert_eq!(u(&v, "received"), 2000);
    for key in ["lost", "corrupted", "duplicates", "out_of_order"] {
        assert_eq!(u(&v, key), 0, "{key}");
    }
    assert_eq!(u(&v["rtt_us"], "count"), 2000);
    let rtt = &v["rtt_us"];
    assert!(u(rtt, "p50") <= u(rtt, "p99") && u(rtt, "p99") <= u(rtt, "max"));
    assert!(v["echoes_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["connect_failures"], serde_json::json!({}));
    // The load generator reports its own CPU, to show whether it was the bottleneck.
    assert!(v["client_cpu_s"]["user"].as_f64().unwrap() >= 0.0);
    assert!(v["client_cpu_s"]["sys"].as_f64().unwrap() >= 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_open_loop_binary_at_a_fixed_rate() {
    let addr = echo_server(Fault::None).await;
    let url = format!("ws://{addr}/ws/echo/");
    let report = bench(&[
        "echo", "-q", "--url", &url, "-c", "3", "--rate", "600", "--binary", "-d", "1",
    ])
    .await
    .unwrap();
    let v = json_line(&report);
    assert_eq!(v["ok"], true, "{v}");
    let sent = u(&v, "sent");
    // About 600 in one second; the schedule is exact, only the stop time varies.
    assert!((450..=700).contains(&sent), "sent {sent}");
    assert_eq!(u(&v, "received"), sent);
    assert_eq!(u(&v, "lost"), 0);
    assert_eq!(u(&v["send_lag_us"], "count"), sent);
    assert_eq!(v["binary"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_detects_lost_corrupted_and_duplicated_messages() {
    let cases = [
        (Fault::Drop(10), "40", "lost", 30),
        (Fault::Corrupt(10), "40", "corrupted", 30),
        (Fault::Duplicate(10), "40", "duplicates", 30),
        // More drops than slots in flight: the closed loop must not stall on them.
        (Fault::Drop(50), "2", "lost", 6),
    ];
    for (fault, in_flight, counter, expected) in cases {
        let addr = echo_server(fault).await;
        let url = format!("ws://{addr}/ws/echo/");
        let report = bench(&[
            "echo",
            "-q",
            "--url",
            &url,
            "-c",
            "1",
            "--in-flight",
            in_flight,
            "--count",
            "300",
            "--drain",
            "0.3",
        ])
        .await
        .unwrap();
        let v = json_line(&report);
        assert_eq!(v["ok"], false, "{fault:?}: {v}");
        assert_eq!(u(&v, counter), expected, "{fault:?}: {v}");
        assert_eq!(u(&v, "sent"), 300);
        for other in ["lost", "corrupted", "duplicates"]
            .iter()
            .filter(|k| **k != counter)
        {
            assert_eq!(u(&v, other), 0, "{fault:?}: {other} in {v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_delivers_every_message_to_every_member() {
    let addr = relay_server().await;
    let url = format!("ws://{addr}/ws/relay/{{room}}/");
    let report = bench(&[
        "broadcast",
        "-q",
        "--url",
        &url,
        "-c",
        "10",
        "--rooms",
        "2",
        "--senders",
        "3",
        "--rate",
        "200",
        "--count",
        "300",
        "--settle",
        "0",
        "-d",
        "8",
    ])
    .await
    .unwrap();
    let v = json_line(&report);
    assert_eq!(v["mode"], "broadcast");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["members"], serde_json::json!([5, 5]));
    assert_eq!(u(&v, "sent"), 300);
    // Every sent message reaches the 5 members of its sender's room, the sender included.
    assert_eq!(u(&v, "expected"), 1500);
    assert_eq!(u(&v, "received"), 1500);
    for key in [
        "lost",
        "corrupted",
        "misrouted",
        "duplicates",
        "out_of_order",
    ] {
        assert_eq!(u(&v, key), 0, "{key}");
    }
    assert_eq!(u(&v["latency_us"], "count"), 1500);
    // One last-member figure per broadcast; the slowest of them is the slowest delivery.
    let last = &v["last_member_latency_us"];
    assert_eq!(u(last, "count"), 300);
    assert_eq!(u(last, "max"), u(&v["latency_us"], "max"));
    assert!(u(last, "p50") >= u(&v["latency_us"], "p50"));
    // The slowest broadcast is named: one of the 100 sends of one of the 3 senders, and its
    // last-member latency is the slowest of them all (the histogram's max, within its precision).
    let slowest = &v["slowest_broadcast"];
    assert!(u(slowest, "sender") < 3, "{slowest}");
    assert!(u(slowest, "index") < 100, "{slowest}");
    let worst = u(slowest, "last_member_us");
    assert!(
        worst <= u(last, "max") && worst * 1000 >= u(last, "max") * 999,
        "{slowest} vs {last}"
    );
    let per_sender = v["per_sender"].as_array().unwrap();
    assert_eq!(per_sender.len(), 3);
    for (s, entry) in per_sender.iter().enumerate() {
        assert_eq!(u(entry, "room") as usize, s % 2);
        assert_eq!(u(entry, "sent"), 100);
        assert_eq!(u(entry, "expected"), 500);
        assert_eq!(u(entry, "received"), 500);
    }
}

/// `--window`: a closed loop. At 1 msg/s an open loop would send ~2 messages per sender in
/// the run; with 2 in flight each sender sends its whole share as fast as its frames come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_window_sends_as_fast_as_frames_come_back() {
    let addr = relay_server().await;
    let url = format!("ws://{addr}/ws/relay/{{room}}/");
    let report = bench(&[
        "broadcast",
        "-q",
        "--url",
        &url,
        "-c",
        "10",
        "--rooms",
        "2",
        "--senders",
        "3",
        "--rate",
        "1",
        "--window",
        "2",
        "--count",
        "300",
        "--settle",
        "0",
        "-d",
        "2",
    ])
    .await
    .unwrap();
    let v = json_line(&report);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(u(&v, "window"), 2);
    assert_eq!(u(&v, "sent"), 300);
    assert_eq!(u(&v, "received"), 1500);
    for key in ["lost", "duplicates", "out_of_order"] {
        assert_eq!(u(&v, key), 0, "{key}");
    }
    let zero = bench(&["broadcast", "-q", "--url", &url, "--window", "0"]).await;
    assert!(
        zero.is_err_and(|e| e.to_string().contains("--window must be at least 1")),
        "a zero window is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_counts_members_that_missed_messages() {
    // An echo server is a relay whose rooms have one member: the others get nothing.
    let addr = echo_server(Fault::None).await;
    let url = format!("ws://{addr}/ws/relay/{{room}}/");
    let report = bench(&[
        "broadcast",
        "-q",
        "--url",
        &url,
        "-c",
        "3",
        "--senders",
        "1",
        "--rate",
        "100",
        "--count",
        "20",
        "--settle",
        "0",
        "--drain",
        "0.3",
    ])
    .await
    .unwrap();
    let v = json_line(&report);
    assert_eq!(v["ok"], false);
    assert_eq!(u(&v, "expected"), 60);
    assert_eq!(u(&v, "received"), 20);
    assert_eq!(u(&v, "lost"), 40);
    // No broadcast reached every member, so none has a last-member latency.
    assert_eq!(u(&v["last_member_latency_us"], "count"), 0);
    assert!(
        v["slowest_broadcast"].is_null(),
        "{}",
        v["slowest_broadcast"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_opens_holds_and_closes_cleanly() {
    let addr = echo_server(Fault::None).await;
    let url = format!("ws://{addr}/ws/echo/");
    let report = bench(&[
        "connect",
        "-q",
        "--url",
        &url,
        "-c",
        "60",
        "--concurrency",
        "8",
        "--hold",
        "0.2",
    ])
    .await
    .unwrap();
    let v = json_line(&report);
    assert_eq!(v["mode"], "connect");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(u(&v, "connected"), 60);
    assert_eq!(u(&v, "failed"), 0);
    assert_eq!(u(&v, "dropped"), 0);
    assert_eq!(u(&v, "closed_clean"), 60);
    assert_eq!(u(&v["connect_us"], "count"), 60);
}

/// A WebSocket server that accepts, records each client's source IP, and reads until close.
async fn peer_recording_server() -> (SocketAddr, Arc<Mutex<Vec<std::net::IpAddr>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peers: Arc<Mutex<Vec<std::net::IpAddr>>> = Arc::default();
    let seen = peers.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            seen.lock().unwrap().push(peer.ip());
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    (addr, peers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_over_loopback_source_addresses() {
    let (addr, peers) = peer_recording_server().await;
    let url = format!("ws://{addr}/ws/echo/");
    let report = bench(&["connect", "-q", "--url", &url, "-c", "40", "--hold", "0"])
        .await
        .unwrap();
    assert!(report.ok, "{}", report.json_line());
    let mut ips = peers.lock().unwrap().clone();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 40, "{ips:?}");
    assert_eq!(ips[0].to_string(), "127.0.0.1");
    assert_eq!(ips[39].to_string(), "127.0.0.40");

    let (addr, peers) = peer_recording_server().await;
    let url = format!("ws://{addr}/ws/echo/");
    let report = bench(&[
        "connect",
        "-q",
        "--url",
        &url,
        "-c",
        "10",
        "--hold",
        "0",
        "--source-addrs",
        "1",
    ])
    .await
    .unwrap();
    assert!(report.ok, "{}", report.json_line());
    let ips = peers.lock().unwrap().clone();
    assert_eq!(ips.len(), 10);
    assert!(
        ips.iter().all(|ip| ip.to_string() == "127.0.0.1"),
        "{ips:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_counted_by_kind() {
    // A port nobody listens on: every attempt is refused.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("ws://{addr}/ws/echo/");
    let report = bench(&["connect", "-q", "--url", &url, "-c", "5", "--hold", "0"])
        .await
        .unwrap();
    let v = json_line(&report);
    assert_eq!(v["ok"], false);
    assert_eq!(u(&v, "connected"), 0);
    assert_eq!(v["failures"], serde_json::json!({"refused": 5}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_keep_alive_get_and_post() {
    let addr = http_server().await;
    let url = format!("http://{addr}/hello");
    let report = bench(&[
        "http", "-q", "--url", &url, "-c", "4", "--count", "400", "-d", "8",
    ])
    .await
    .unwrap();
    let v = json_line(&report);
    assert_eq!(v["mode"], "http");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["method"], "GET");
    assert_eq!(u(&v, "completed"), 400);
    assert_eq!(v["status"], serde_json::json!({"200": 400}));
    assert_eq!(v["errors"], serde_json::json!({}));
    assert_eq!(u(&v, "reconnects"), 0);
    assert_eq!(u(&v["latency_us"], "count"), 400);

    let report = bench(&[
        "http",
        "-q",
        "--url",
        &url,
        "-c",
        "2",
        "--rate",
        "300",
        "--body-size",
        "5000",
        "-d",
        "1",
    ])
    .await
    .unwrap();
    let v = json_line(&report);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["method"], "POST");
    let done = u(&v, "completed");
    assert!((200..=350).contains(&done), "completed {done}");
    assert_eq!(u(&v, "sent"), done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_over_ipv6_loopback() {
    let addr = echo_server_on("[::1]:0", Fault::None).await;
    let url = format!("ws://[::1]:{}/ws/echo/", addr.port());
    let report = bench(&["echo", "-q", "--url", &url, "-c", "3", "--count", "300"])
        .await
        .unwrap();
    let v = json_line(&report);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(u(&v, "received"), 300);
}

#[tokio::test]
async fn no_server_is_an_error_not_an_empty_report() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    for mode in ["echo", "broadcast"] {
        let url = match mode {
            "echo" => format!("ws://{addr}/ws/echo/"),
            _ => format!("ws://{addr}/ws/relay/{{room}}/"),
        };
        let err = bench(&[mode, "-q", "--url", &url, "-c", "2"])
            .await
            .unwrap_err();
        match err.downcast_ref::<BenchError>() {
            Some(BenchError::NoConnection(why)) => assert!(why.contains("refused"), "{why}"),
            other => panic!("{mode}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn non_loopback_targets_are_refused_before_connecting() {
    for args in [
        vec!["echo", "--url", "ws://10.0.0.1:8000/ws/echo/"],
        vec!["broadcast", "--url", "ws://example.com/ws/relay/{room}/"],
        vec!["connect", "--url", "ws://192.168.1.1/"],
        vec!["http", "--url", "http://8.8.8.8/"],
    ] {
        let err = bench(&args).await.unwrap_err();
        let bench_err = err.downcast_ref::<BenchError>().unwrap();
        assert!(
            matches!(bench_err, BenchError::NotLoopback(_)),
            "{args:?}: {err}"
        );
        assert!(
            err.to_string().contains("only targets this machine"),
            "{err}"
        );
    }
}

#[test]
fn the_binary_exits_2_for_a_non_loopback_target() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "bench",
            "echo",
            "--url",
            "ws://203.0.113.9:8000/ws/echo/",
            "-d",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to load 203.0.113.9"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_flags_are_usage_errors() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "bench",
            "echo",
            "--size",
            "10",
            "--url",
            "ws://127.0.0.1:1/",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size must be at least 49"));
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["bench", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for mode in ["echo", "broadcast", "connect", "http"] {
        assert!(text.contains(mode), "{text}");
    }
}

//! Per-connection order on the shipped routes, as users run them: `switchyard serve` and two
//! `switchyard worker` processes (default flags) on a real redis-server, real WebSocket clients
//! sending 1,000 numbered frames as fast as they can. Each sender's frames must reach every room
//! member in the order sent, none missing, and the chat history must be in that order too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::redis_support::RedisServer;
use support::{Proc, Ws, next_text};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);
const FRAMES: usize = 1000;

/// `serve` and two workers on one Redis.
struct Stack {
    _redis: RedisServer,
    _workers: Vec<Proc>,
    web: Proc,
}

impl Stack {
    fn start() -> Stack {
        let redis = RedisServer::start();
        let layer = format!("--layer={}", redis.url());
        let workers = (0..2)
            .map(|_| Proc::start(&["worker", &layer], false))
            .collect();
        let web = Proc::start(&["serve", &layer, "--port", "0"], true);
        Stack {
            _redis: redis,
            _workers: workers,
            web,
        }
    }

    async fn connect(&self, path: &str) -> Ws {
        support::connect(&format!("{}{path}", self.web.ws())).await
    }
}

/// Sends `frames` as fast as the socket takes them (one flush at the end).
async fn send_all(ws: &mut Ws, frames: impl IntoIterator<Item = String>) {
    for f in frames {
        ws.feed(Message::text(f)).await.unwrap();
    }
    ws.flush().await.unwrap();
}

/// Reads `n` text frames.
fn read_n(mut ws: Ws, n: usize) -> tokio::task::JoinHandle<(Ws, Vec<String>)> {
    tokio::spawn(async move {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            got.push(next_text(&mut ws).await);
        }
        (ws, got)
    })
}

/// Pairs of neighbours out of order in `seq`.
fn inversions(seq: &[usize]) -> usize {
    seq.windows(2).filter(|w| w[0] > w[1]).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_keeps_each_senders_order_with_two_workers() {
    let stack = Stack::start();
    let room = "/ws/relay/ordered/";
    let mut alice = stack.connect(room).await;
    let bob = stack.connect(room).await;
    let listener = stack.connect(room).await;
    // Everyone in the room before the first frame: one relayed probe reaches the listener.
    send_all(&mut alice, ["probe".to_owned()]).await;
    let (listener, probe) = read_n(listener, 1).await.unwrap();
    assert_eq!(probe, ["probe"]);
    let (alice_rx, bob_rx) = (read_n(alice, 1), read_n(bob, 1));
    let (alice, _) = alice_rx.await.unwrap();
    let (bob, _) = bob_rx.await.unwrap();
    // Each socket's writer and reader run apart: a member must read while it sends, or its
    // outbound queue overflows (slow-client policy).
    let (mut alice_tx, alice_rx) = alice.split();
    let (mut bob_tx, bob_rx) = bob.split();
    let reader = |mut rx: futures_util::stream::SplitStream<Ws>| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 2 * FRAMES {
                match tokio::time::timeout(WAIT, rx.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => got.push(t.to_string()),
                    Ok(Some(Ok(_))) => {}
                    other => panic!("relay stopped after {} frames: {other:?}", got.len()),
                }
            }
            got
        })
    };
    let (a_read, b_read, l_read) = (
        reader(alice_rx),
        reader(bob_rx),
        read_n(listener, 2 * FRAMES),
    );
    let send = |name: &'static str| (0..FRAMES).map(move |i| format!("{name} {i}"));
    for f in send("a") {
        alice_tx.feed(Message::text(f)).await.unwrap();
    }
    for f in send("b") {
        bob_tx.feed(Message::text(f)).await.unwrap();
    }
    alice_tx.flush().await.unwrap();
    bob_tx.flush().await.unwrap();
    let (_, at_listener) = l_read.await.unwrap();
    for (member, got) in [
        ("alice", a_read.await.unwrap()),
        ("bob", b_read.await.unwrap()),
        ("listener", at_listener),
    ] {
        for sender in ["a", "b"] {
            let seq: Vec<usize> = got
                .iter()
                .filter_map(|t| t.strip_prefix(sender)?.trim().parse().ok())
                .collect();
            assert_eq!(
                inversions(&seq),
                0,
                "{member} saw {sender}'s frames out of order"
            );
            assert_eq!(
                seq,
                (0..FRAMES).collect::<Vec<_>>(),
                "{member}: {sender}'s frames"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_keeps_order_and_history_with_two_workers() {
    let stack = Stack::start();
    let room = "/ws/chat/ordered/";
    let mut writer = stack.connect(room).await;
    let mut reader = stack.connect(room).await;
    for ws in [&mut writer, &mut reader] {
        let history: serde_json::Value = serde_json::from_str(&next_text(ws).await).unwrap();
        assert_eq!(history["type"], "history");
    }
    let (mut writer_tx, writer_rx) = writer.split();
    // The writer hears its own messages too; they are read (and checked) so its queue drains.
    let writer_read = tokio::spawn(async move {
        let mut rx = writer_rx;
        let mut got = Vec::new();
        while got.len() < FRAMES {
            match tokio::time::timeout(WAIT, rx.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => got.push(t.to_string()),
                Ok(Some(Ok(_))) => {}
                other => panic!("chat stopped after {} messages: {other:?}", got.len()),
            }
        }
        got
    });
    let reader_read = read_n(reader, FRAMES);
    for i in 0..FRAMES {
        let m = serde_json::json!({"handle": "ann", "message": format!("m{i}")});
        writer_tx.feed(Message::text(m.to_string())).await.unwrap();
    }
    writer_tx.flush().await.unwrap();
    let numbers = |frames: &[String]| -> Vec<usize> {
        frames
            .iter()
            .map(|t| {
                let v: serde_json::Value = serde_json::from_str(t).unwrap();
                assert_eq!(v["type"], "message", "{t}");
                v["message"].as_str().unwrap()[1..].parse().unwrap()
            })
            .collect()
    };
    let all: Vec<usize> = (0..FRAMES).collect();
    let (_, at_reader) = reader_read.await.unwrap();
    let at_reader = numbers(&at_reader);
    assert_eq!(inversions(&at_reader), 0);
    assert_eq!(at_reader, all);
    assert_eq!(numbers(&writer_read.await.unwrap()), all);
    // A newcomer gets the room's last 50 messages, oldest first, in the order they were sent.
    let mut late = stack.connect(room).await;
    let history: serde_json::Value = serde_json::from_str(&next_text(&mut late).await).unwrap();
    let kept: Vec<usize> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap()[1..].parse().unwrap())
        .collect();
    assert_eq!(kept, (FRAMES - 50..FRAMES).collect::<Vec<_>>());
}

//! Connection owners, as users run them: `switchyard serve` and `switchyard worker` processes
//! (default flags) on a real redis-server, real WebSocket clients on the shipped relay route
//! (strictly ordered). The worker that accepts a socket owns its frames and runs them in order
//! without an ordering step in Redis; when it is killed -9 or stopped, or Redis restarts, the
//! socket's frames go on through the shared channels, in order, none lost that the client sent
//! after the owner's last one had come back (a frame in a killed worker's hand is lost, as from
//! any channel).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::redis_support::{RedisServer, free_port};
use support::{Proc, Ws, http};
use tokio_tungstenite::tungstenite::Message;

/// Longest wait for one relayed frame: a lapsed owner's lease (5 s) is seen within a second more.
const WAIT: Duration = Duration::from_secs(20);
const SOCKETS: usize = 8;

/// A process with its metrics endpoint.
struct Metered {
    proc: Proc,
    metrics: String,
}

impl Metered {
    fn start(args: &[&str], announces: bool) -> Metered {
        let port = free_port();
        let bind = format!("--metrics-bind=127.0.0.1:{port}");
        let mut args = args.to_vec();
        args.push(&bind);
        Metered {
            proc: Proc::start(&args, announces),
            metrics: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The sum of every sample of `name` (all label sets).
    async fn metric(&self, name: &str) -> u64 {
        let (status, text) = http(&self.metrics, "GET", "/metrics", "").await;
        assert_eq!(status, 200, "metrics: {text}");
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

fn worker(redis: &RedisServer) -> Metered {
    Metered::start(&["worker", &format!("--layer={}", redis.url())], false)
}

fn serve(redis: &RedisServer) -> Metered {
    Metered::start(
        &["serve", &format!("--layer={}", redis.url()), "--port", "0"],
        true,
    )
}

/// `SOCKETS` sockets, each alone in its relay room (so it hears its own frames only).
async fn open_sockets(server: &Metered, tag: &str) -> Vec<Ws> {
    let mut sockets = Vec::new();
    for i in 0..SOCKETS {
        let url = format!("{}/ws/relay/{tag}{i}/", server.proc.ws());
        sockets.push(support::connect(&url).await);
    }
    sockets
}

/// Sends frames `range` on every socket (`pause` between two frames of a socket) while reading
/// them back; returns each socket's numbers as they came back.
async fn relay_numbers(
    sockets: Vec<Ws>,
    range: std::ops::Range<usize>,
    pause: Duration,
) -> (Vec<Ws>, Vec<Vec<usize>>) {
    let mut tasks = Vec::new();
    for ws in sockets {
        let range = range.clone();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let expected = range.len();
            let reader = tokio::spawn(async move {
                let mut got = Vec::with_capacity(expected);
                while got.len() < expected {
                    match tokio::time::timeout(WAIT, rx.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => got.push(t.parse::<usize>().unwrap()),
                        Ok(Some(Ok(_))) => {}
                        other => panic!("relay stopped after {got:?}: {other:?}"),
                    }
                }
                (rx, got)
            });
            for i in range {
                tx.feed(Message::text(i.to_string())).await.unwrap();
                if !pause.is_zero() {
                    tx.flush().await.unwrap();
                    tokio::time::sleep(pause).await;
                }
            }
            tx.flush().await.unwrap();
            let (rx, got) = reader.await.unwrap();
            (tx.reunite(rx).unwrap(), got)
        }));
    }
    let mut sockets = Vec::new();
    let mut numbers = Vec::new();
    for task in tasks {
        let (ws, got) = task.await.unwrap();
        sockets.push(ws);
        numbers.push(got);
    }
    (sockets, numbers)
}

fn assert_all_in_order(numbers: &[Vec<usize>], range: std::ops::Range<usize>, when: &str) {
    let expected: Vec<usize> = range.collect();
    for (i, got) in numbers.iter().enumerate() {
        assert_eq!(got, &expected, "socket {i} {when}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accepting_worker_runs_its_sockets_frames_in_order_without_parking() {
    let redis = RedisServer::start();
    let workers = [worker(&redis), worker(&redis)];
    let server = serve(&redis);
    let sockets = open_sockets(&server, "owned").await;
    let (_sockets, numbers) = relay_numbers(sockets, 0..300, Duration::ZERO).await;
    assert_all_in_order(&numbers, 0..300, "with two workers");
    let (mut owned, mut parked) = (0, 0);
    for w in &workers {
        owned += w.metric("switchyard_owned_messages_total").await;
        parked += w.metric("switchyard_parked_total").await;
    }
    // Every frame ran on its socket's owner; none waited in Redis for a predecessor.
    assert_eq!(owned, (SOCKETS * 300) as u64);
    assert_eq!(parked, 0);
    assert_eq!(
        server.metric("switchyard_ws_owner_takebacks_total").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_sockets_go_on_in_order_through_the_layer() {
    let redis = RedisServer::start();
    let mut owner = worker(&redis);
    let server = serve(&redis);
    // Opened while only `owner` runs: it accepts, and so owns, every socket.
    let sockets = open_sockets(&server, "killed").await;
    let (sockets, numbers) = relay_numbers(sockets, 0..50, Duration::ZERO).await;
    assert_all_in_order(&numbers, 0..50, "before the kill");
    assert_eq!(
        owner.metric("switchyard_owned_messages_total").await,
        (SOCKETS * 50) as u64
    );
    let other = worker(&redis);
    owner.proc.child.kill().unwrap();
    owner.proc.child.wait().unwrap();
    // Sent at once: they wait in the dead owner's channel until the server sees its lease
    // lapse, are moved back, and run on the other worker through the layer's ordering.
    let (sockets, numbers) = relay_numbers(sockets, 50..250, Duration::ZERO).await;
    assert_all_in_order(&numbers, 50..250, "after the owner was killed");
    assert_eq!(server.metric("switchyard_ws_owners_lapsed_total").await, 1);
    // Each socket leaves its lapsed owner as it sends its next frame, after those moved back.
    let (_sockets, numbers) = relay_numbers(sockets, 250..260, Duration::ZERO).await;
    assert_all_in_order(&numbers, 250..260, "once taken back");
    assert_eq!(
        server.metric("switchyard_ws_owner_takebacks_total").await,
        SOCKETS as u64
    );
    assert_eq!(other.metric("switchyard_owned_messages_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_owner_hands_its_sockets_over_without_losing_a_frame() {
    let redis = RedisServer::start();
    let mut owner = worker(&redis);
    let server = serve(&redis);
    let sockets = open_sockets(&server, "stopped").await;
    let _other = worker(&redis);
    // Frames keep coming while the owner stops: those in its hand run there, the rest wait
    // in its channel or come after, and all of them must come back in order.
    let stopping = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = tokio::task::spawn_blocking(move || owner.proc.terminate())
            .await
            .unwrap();
        assert!(status.success(), "the owner stops cleanly: {status:?}");
    });
    let (_sockets, numbers) = relay_numbers(sockets, 0..600, Duration::from_millis(2)).await;
    stopping.await.unwrap();
    assert_all_in_order(&numbers, 0..600, "across the owner's stop");
    assert_eq!(
        server.metric("switchyard_ws_owner_takebacks_total").await,
        SOCKETS as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_sockets_keep_their_order_after_redis_restarts() {
    let mut redis = RedisServer::start();
    let _worker = worker(&redis);
    let server = serve(&redis);
    let sockets = open_sockets(&server, "restart").await;
    let (mut sockets, numbers) = relay_numbers(sockets, 0..50, Duration::ZERO).await;
    assert_all_in_order(&numbers, 0..50, "before the restart");
    redis.restart();
    // Until the layer is back, a frame may be lost (counted by the server); a probe that comes
    // back says this socket's path works again.
    for ws in &mut sockets {
        let deadline = tokio::time::Instant::now() + WAIT;
        'probe: loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no relay after the restart"
            );
            ws.send(Message::text("1000000")).await.unwrap();
            let until = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, ws.next()).await {
                if m.is_text() {
                    break 'probe;
                }
            }
        }
        // Probes sent before the one that came back may still arrive: drain them.
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(300), ws.next()).await
        {}
    }
    let (_sockets, numbers) = relay_numbers(sockets, 50..250, Duration::ZERO).await;
    assert_all_in_order(&numbers, 50..250, "after the restart");
}

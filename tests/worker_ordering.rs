//! Strict ordering per connection across workers: 3 workers (separate layer connections, as
//! separate processes would have), 100 connections, each connection's frames and disconnect
//! sent in a shuffled order after its connect and consumed with shuffled delays. Every connection's
//! messages must run in order, none lost, none twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use support::{Backend, Fixture, eventually, next_text};
use switchyard::layer::LayerSettings;
use switchyard::routing::asgi::{WebsocketConnect, WebsocketDisconnect, WebsocketReceive};
use switchyard::routing::{
    ConsumerError, Ctx, Map, Message, Router, WebsocketConsumer, route_class,
};
use switchyard::worker::Worker;
use tokio_util::sync::CancellationToken;

const CONNECTIONS: usize = 100;
const FRAMES: u64 = 8;
const WORKERS: usize = 3;

type Log = Arc<Mutex<HashMap<String, Vec<u64>>>>;

struct Ordered {
    log: Log,
}

impl Ordered {
    async fn record(&self, m: &Message) -> Result<(), ConsumerError> {
        let reply = m.reply_channel().unwrap_or_default().to_owned();
        let order = m.order().unwrap_or(u64::MAX);
        // Shuffled work: 0–3 ms, so workers overtake each other.
        let delay = rand::rng().random_range(0..3000);
        tokio::time::sleep(Duration::from_micros(delay)).await;
        self.log
            .lock()
            .unwrap()
            .entry(reply)
            .or_default()
            .push(order);
        Ok(())
    }
}

impl WebsocketConsumer for Ordered {
    fn strict_ordering(&self) -> bool {
        true
    }
    async fn connect(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        self.record(m).await?;
        ctx.accept()
    }
    async fn receive(&self, m: &Message, _ctx: &Ctx) -> Result<(), ConsumerError> {
        self.record(m).await
    }
    async fn disconnect(&self, m: &Message, _ctx: &Ctx) -> Result<(), ConsumerError> {
        self.record(m).await
    }
}

async fn every_connection_in_order(backend: Backend) {
    let settings = LayerSettings {
        capacity: 10_000,
        ..LayerSettings::default()
    };
    let fx = Fixture::new(backend, settings.clone()).await;
    let log: Log = Arc::default();
    let router = Arc::new(
        Router::new([route_class(Ordered { log: log.clone() }).path("^/ordered/")]).unwrap(),
    );
    let token = CancellationToken::new();
    let mut handles = Vec::new();
    let mut metrics = Vec::new();
    for _ in 0..WORKERS {
        let layer = fx.peer(settings.clone()).await;
        let worker = Worker::new(layer, router.clone())
            .concurrency(2)
            .receive_timeout(Duration::from_millis(200));
        metrics.push(worker.metrics());
        handles.push(tokio::spawn(worker.run(token.clone())));
    }

    // Every connection's connect first, as an interface server does (it reads no frame before
    // the connect ran and accepted), then all frames and disconnects shuffled.
    let mut connects: Vec<(&'static str, Map, String)> = Vec::new();
    let mut sends: Vec<(&'static str, Map, String)> = Vec::new();
    let to_map = |v: &dyn erased::Ser| v.map();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for c in 0..CONNECTIONS {
        let reply = format!("test.ordering!conn{c}");
        connects.push((
            "websocket.connect",
            to_map(&WebsocketConnect::new(&reply, "/ordered/")),
            reply.clone(),
        ));
        for i in 1..=FRAMES {
            sends.push((
                "websocket.receive",
                to_map(&WebsocketReceive::text(
                    &reply,
                    "/ordered/",
                    format!("f{i}"),
                    i,
                )),
                reply.clone(),
            ));
        }
        sends.push((
            "websocket.disconnect",
            to_map(&WebsocketDisconnect::new(
                &reply,
                "/ordered/",
                1000,
                FRAMES + 1,
            )),
            reply.clone(),
        ));
    }
    sends.shuffle(&mut rng);
    let total = connects.len() + sends.len();
    for (channel, m, _) in &connects {
        fx.layer.send(channel, m).await.unwrap();
    }
    let l = log.clone();
    eventually(Duration::from_secs(60), "every connect consumed", || {
        l.lock().unwrap().len() == CONNECTIONS
    })
    .await;
    for (channel, m, _) in &sends {
        fx.layer.send(channel, m).await.unwrap();
    }

    let l = log.clone();
    eventually(Duration::from_secs(60), "every message consumed", || {
        l.lock().unwrap().values().map(Vec::len).sum::<usize>() >= total
    })
    .await;
    // Anything consumed twice would show up now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel();
    for h in handles {
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    let log = log.lock().unwrap();
    assert_eq!(log.len(), CONNECTIONS);
    let want: Vec<u64> = (0..=FRAMES + 1).collect();
    for (reply, orders) in log.iter() {
        assert_eq!(
            orders, &want,
            "connection {reply} ran out of order, lost or twice"
        );
    }
    let parked: u64 = metrics.iter().map(|m| m.snapshot().parked).sum();
    let consumed: Vec<u64> = metrics.iter().map(|m| m.snapshot().consumed).collect();
    assert!(
        parked > 0,
        "the shuffle parked messages (the gate was exercised)"
    );
    assert!(
        consumed.iter().all(|c| *c > 0),
        "every worker took messages: {consumed:?}"
    );
    assert_eq!(consumed.iter().sum::<u64>() as usize, total);
    eprintln!("ordering ({backend:?}): {total} messages, {parked} parked, per worker {consumed:?}");
}

mod erased {
    use switchyard::routing::{Map, codec};
    pub trait Ser {
        fn map(&self) -> Map;
    }
    impl<T: serde::Serialize> Ser for T {
        fn map(&self) -> Map {
            codec::from_msgpack(&codec::to_msgpack(self).unwrap()).unwrap()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_in_order_memory() {
    every_connection_in_order(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_in_order_redis() {
    every_connection_in_order(Backend::Redis).await;
}

/// A strict-ordering consumer that gives up on frame 1 (ConsumeLater until the retries run out)
/// must not stall the connection: frame 2 runs after frame 1 is dropped, and frames requeued
/// with ConsumeLater keep their turn.
struct Stubborn {
    log: Log,
}

impl WebsocketConsumer for Stubborn {
    fn strict_ordering(&self) -> bool {
        true
    }
    async fn receive(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        match (m.text(), m.retries()) {
            (Some("never"), _) => return Err(ConsumerError::ConsumeLater),
            (Some("twice"), r) if r < 2 => return Err(ConsumerError::ConsumeLater),
            _ => {}
        }
        let reply = m.reply_channel().unwrap_or_default().to_owned();
        self.log
            .lock()
            .unwrap()
            .entry(reply)
            .or_default()
            .push(m.order().unwrap_or(u64::MAX));
        ctx.send_text(format!("ran {}", m.order().unwrap_or(u64::MAX)))
    }
}

async fn gave_up_message_does_not_stall(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let log: Log = Arc::default();
    let router = Arc::new(Router::new([route_class(Stubborn { log: log.clone() })]).unwrap());
    let token = CancellationToken::new();
    let worker = Worker::new(fx.layer.clone(), router)
        .concurrency(3)
        .max_retries(2)
        .receive_timeout(Duration::from_millis(200));
    let metrics = worker.metrics();
    let handle = tokio::spawn(worker.run(token.clone()));
    let inbox = fx.layer.inbox("test.stubborn").await.unwrap();
    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();
    fx.layer
        .send("websocket.connect", &WebsocketConnect::new(&reply, "/"))
        .await
        .unwrap();
    let accepted = ch
        .recv_timeout(Duration::from_secs(10))
        .await
        .expect("the accept")
        .to_map()
        .unwrap();
    assert_eq!(accepted, Map::new().with("accept", true));
    // Frames only after the accept, as an interface server sends them.
    for (order, t) in [(3, "ok"), (2, "twice"), (1, "never")] {
        fx.layer
            .send(
                "websocket.receive",
                &WebsocketReceive::text(&reply, "/", t, order),
            )
            .await
            .unwrap();
    }
    assert_eq!(next_text(&mut ch).await, "ran 2");
    assert_eq!(next_text(&mut ch).await, "ran 3");
    assert_eq!(log.lock().unwrap()[&reply], [2, 3]);
    let s = metrics.snapshot();
    assert_eq!(s.dropped, 1, "frame 1 given up");
    assert_eq!(s.requeued, 2 + 2);
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn gave_up_message_does_not_stall_memory() {
    gave_up_message_does_not_stall(Backend::Memory).await;
}

#[tokio::test]
async fn gave_up_message_does_not_stall_redis() {
    gave_up_message_does_not_stall(Backend::Redis).await;
}

/// Strict consumer answering every message with `ran {order}`.
struct Replying;

impl Replying {
    fn ran(m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        ctx.send_text(format!("ran {}", m.order().unwrap_or(u64::MAX)))
    }
}

impl WebsocketConsumer for Replying {
    fn strict_ordering(&self) -> bool {
        true
    }
    async fn connect(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        Self::ran(m, ctx)
    }
    async fn receive(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        Self::ran(m, ctx)
    }
    async fn disconnect(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        Self::ran(m, ctx)
    }
}

const WAIT: Duration = Duration::from_secs(10);

/// Sends the connect of socket `reply` and waits for a [`Replying`] consumer's "ran 0".
async fn connect(fx: &Fixture, reply: &str, ch: &mut switchyard::layer::LocalChannel) {
    fx.layer
        .send("websocket.connect", &WebsocketConnect::new(reply, "/"))
        .await
        .unwrap();
    assert_eq!(next_text(ch).await, "ran 0");
}

async fn stop(
    token: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), switchyard::worker::WorkerError>>,
) {
    token.cancel();
    tokio::time::timeout(WAIT, handle)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
}

/// The successor of a finished message is run by the worker that finished it, not re-sent to
/// its channel: a full `websocket.receive` (capacity 2, frame 1 and another connection's frame)
/// used to make the re-send give up after 10 s and lose the frame, the connection's later
/// frames staying parked for the group expiry.
async fn successor_runs_even_when_its_channel_is_full(backend: Backend) {
    let settings = LayerSettings {
        channel_capacity: vec![("websocket.receive".to_owned(), 2)],
        ..LayerSettings::default()
    };
    let fx = Fixture::new(backend, settings).await;
    let router = Arc::new(Router::new([route_class(Replying)]).unwrap());
    let inbox = fx.layer.inbox("test.full").await.unwrap();
    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();
    let frame = |order: u64| WebsocketReceive::text(&reply, "/", format!("f{order}"), order);

    // The connect runs; then a frames-only worker parks frame 2 (frame 1 is not there yet).
    let connects = Worker::new(fx.layer.clone(), router.clone())
        .only_channels(&["websocket.connect"])
        .receive_timeout(Duration::from_millis(100));
    let token = CancellationToken::new();
    let handle = tokio::spawn(connects.run(token.clone()));
    connect(&fx, &reply, &mut ch).await;
    stop(token, handle).await;
    let frames = Worker::new(fx.layer.clone(), router.clone())
        .only_channels(&["websocket.receive"])
        .receive_timeout(Duration::from_millis(100));
    let frames_metrics = frames.metrics();
    let token = CancellationToken::new();
    let handle = tokio::spawn(frames.run(token.clone()));
    fx.layer.send("websocket.receive", &frame(2)).await.unwrap();
    eventually(WAIT, "frame 2 parked", || {
        frames_metrics.snapshot().parked == 1
    })
    .await;
    stop(token, handle).await;

    // Frame 1 and another connection's frame fill websocket.receive.
    fx.layer.send("websocket.receive", &frame(1)).await.unwrap();
    fx.layer
        .send(
            "websocket.receive",
            &WebsocketReceive::text("test.full!other", "/", "x", 7),
        )
        .await
        .unwrap();
    let refused = fx
        .layer
        .send(
            "websocket.receive",
            &WebsocketReceive::text("test.full!other", "/", "x", 8),
        )
        .await
        .unwrap_err();
    assert!(refused.is_full(), "{refused}");

    // A worker runs frame 1, then the parked frame 2 itself, though its channel is full.
    let worker = Worker::new(fx.layer.clone(), router)
        .concurrency(1)
        .receive_timeout(Duration::from_millis(100));
    let metrics = worker.metrics();
    let token = CancellationToken::new();
    let handle = tokio::spawn(worker.run(token.clone()));
    assert_eq!(next_text(&mut ch).await, "ran 1");
    assert_eq!(next_text(&mut ch).await, "ran 2");
    let m = metrics.clone();
    eventually(WAIT, "the other connection's frame ran too", || {
        m.snapshot().consumed == 3
    })
    .await;
    assert_eq!(metrics.snapshot().dropped, 0);
    stop(token, handle).await;
}

#[tokio::test]
async fn successor_runs_even_when_its_channel_is_full_memory() {
    successor_runs_even_when_its_channel_is_full(Backend::Memory).await;
}

#[tokio::test]
async fn successor_runs_even_when_its_channel_is_full_redis() {
    successor_runs_even_when_its_channel_is_full(Backend::Redis).await;
}

/// A worker running [`Replying`] on `fx`'s layer, and a socket of `tag`'s inbox whose connect it
/// ran ("ran 0"): the worker's metrics, its stop token and task, the inbox (kept open) and the
/// socket's reply channel.
struct ConnectedSocket {
    metrics: Arc<switchyard::worker::WorkerMetrics>,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), switchyard::worker::WorkerError>>,
    _inbox: switchyard::layer::ProcessInbox,
    ch: switchyard::layer::LocalChannel,
    reply: String,
}

impl ConnectedSocket {
    async fn open(fx: &Fixture, tag: &str) -> ConnectedSocket {
        let (metrics, token, handle) = replying_worker(fx.layer.clone());
        let inbox = fx.layer.inbox(tag).await.unwrap();
        let mut ch = inbox.new_channel();
        let reply = ch.name().to_owned();
        connect(fx, &reply, &mut ch).await;
        ConnectedSocket {
            metrics,
            token,
            handle,
            _inbox: inbox,
            ch,
            reply,
        }
    }

    /// Frame `order` of this socket, text `f{order}`.
    fn frame(&self, order: u64) -> WebsocketReceive {
        WebsocketReceive::text(&self.reply, "/", format!("f{order}"), order)
    }
}

/// A gap in the orders (a frame that never reaches a worker) no longer freezes the connection:
/// once the message parked behind it has waited the layer expiry (1 s here) it is dropped
/// (never delivered past expiry), the gap is skipped and counted, and later frames run. A
/// parked disconnect runs late rather than being dropped, with nothing else arriving.
async fn gap_is_skipped_after_the_expiry(backend: Backend) {
    let settings = LayerSettings {
        expiry: Duration::from_secs(1),
        ..LayerSettings::default()
    };
    let fx = Fixture::new(backend, settings).await;
    let ConnectedSocket {
        metrics,
        token,
        handle,
        _inbox,
        mut ch,
        reply,
    } = ConnectedSocket::open(&fx, "test.gap").await;
    let frame = |order: u64| WebsocketReceive::text(&reply, "/", format!("f{order}"), order);
    // Frame 1 never comes; frame 2 parks behind the gap.
    fx.layer.send("websocket.receive", &frame(2)).await.unwrap();
    let m = metrics.clone();
    eventually(WAIT, "frame 2 dropped past expiry, order 1 skipped", || {
        let s = m.snapshot();
        (s.parked, s.ordering_expired, s.ordering_skipped) == (1, 1, 1)
    })
    .await;
    fx.layer.send("websocket.receive", &frame(3)).await.unwrap();
    assert_eq!(next_text(&mut ch).await, "ran 3");

    // Frame 4 never comes; frame 5 and the disconnect park, and nothing else arrives.
    fx.layer.send("websocket.receive", &frame(5)).await.unwrap();
    fx.layer
        .send(
            "websocket.disconnect",
            &WebsocketDisconnect::new(&reply, "/", 1000, 6),
        )
        .await
        .unwrap();
    assert_eq!(
        next_text(&mut ch).await,
        "ran 6",
        "frame 5 expired, the disconnect ran"
    );
    let s = metrics.snapshot();
    assert_eq!((s.ordering_expired, s.ordering_skipped), (2, 2));
    assert_eq!(s.consumed, 3);
    assert!(ch.try_recv().is_none(), "nothing else ran");
    stop(token, handle).await;
}

#[tokio::test]
async fn gap_is_skipped_after_the_expiry_memory() {
    gap_is_skipped_after_the_expiry(Backend::Memory).await;
}

#[tokio::test]
async fn gap_is_skipped_after_the_expiry_redis() {
    gap_is_skipped_after_the_expiry(Backend::Redis).await;
}

/// Redis loses the ordering state of an open connection (a restart without persistence, a
/// flush, a failover to a replica that missed it; here FLUSHALL, then garbage in it). The
/// worker that recorded the socket's last frame knows the next turn without it and writes the
/// state again with that frame's done; a worker that does not (another process) finds nothing
/// recorded and restarts the order at the frame it has, counted. Either way every frame runs,
/// in order, at once, instead of parking until the expiry (60 s by default) skips the orders
/// that ran before.
#[tokio::test]
async fn order_restarts_when_redis_loses_the_state() {
    let fx = Fixture::new(Backend::Redis, LayerSettings::default()).await;
    let mut socket = ConnectedSocket::open(&fx, "test.lost").await;
    for order in 1..=2 {
        fx.layer
            .send("websocket.receive", &socket.frame(order))
            .await
            .unwrap();
        assert_eq!(next_text(&mut socket.ch).await, format!("ran {order}"));
    }

    let redis = fx.redis.as_ref().expect("a Redis fixture");
    // The reply goes out before a frame is recorded as done: wait for the record, or the flush
    // could come first and the done would write the state again.
    let key = format!("asgi:order:{}", socket.reply);
    let recorded_next = |next: &str| {
        redis
            .try_cmd::<Option<String>>(&[b"HGET", key.as_bytes(), b"next"])
            .ok()
            .flatten()
            .as_deref()
            == Some(next)
    };
    eventually(WAIT, "frame 2 recorded as done", || recorded_next("3")).await;
    let _: () = redis.cmd(&[b"FLUSHALL"]);
    // The inbox's own keys went with the flush; the reply channel is read again as before.
    for order in 3..=6 {
        fx.layer
            .send("websocket.receive", &socket.frame(order))
            .await
            .unwrap();
    }
    for order in 3..=6 {
        assert_eq!(next_text(&mut socket.ch).await, format!("ran {order}"));
    }
    let s = socket.metrics.snapshot();
    assert_eq!(
        (s.ordering_restarted, s.parked, s.ordering_skipped),
        (0, 0, 0),
        "the worker knew frame 3's turn"
    );
    eventually(WAIT, "the state written again", || recorded_next("7")).await;
    let (frame7, frame8) = (socket.frame(7), socket.frame(8));
    stop(socket.token, socket.handle).await;

    // Lost again, and the next frame goes to another process's worker.
    let _: () = redis.cmd(&[b"FLUSHALL"]);
    let (metrics, token, handle) = replying_worker(fx.peer(LayerSettings::default()).await);
    fx.layer.send("websocket.receive", &frame7).await.unwrap();
    assert_eq!(next_text(&mut socket.ch).await, "ran 7");
    let s = metrics.snapshot();
    assert_eq!(
        (s.ordering_restarted, s.parked, s.ordering_skipped),
        (1, 0, 0)
    );
    eventually(WAIT, "frame 7 recorded as done", || recorded_next("8")).await;
    stop(token, handle).await;

    // Garbage in the state (not a number where `next` and `run` go) reads as no state.
    let _: () = redis.cmd(&[b"HSET", key.as_bytes(), b"next", b"zz", b"run", b"?"]);
    let (metrics, token, handle) = replying_worker(fx.peer(LayerSettings::default()).await);
    fx.layer.send("websocket.receive", &frame8).await.unwrap();
    assert_eq!(next_text(&mut socket.ch).await, "ran 8");
    assert_eq!(metrics.snapshot().ordering_restarted, 1);
    stop(token, handle).await;
}

/// A worker running [`Replying`] on `layer`.
fn replying_worker(
    layer: switchyard::layer::Layer,
) -> (
    Arc<switchyard::worker::WorkerMetrics>,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), switchyard::worker::WorkerError>>,
) {
    let router = Arc::new(Router::new([route_class(Replying)]).unwrap());
    let worker = Worker::new(layer, router).receive_timeout(Duration::from_millis(100));
    let metrics = worker.metrics();
    let token = CancellationToken::new();
    let handle = tokio::spawn(worker.run(token.clone()));
    (metrics, token, handle)
}

/// Replies `ran {order}`; a frame whose text is `slow` first signals `started`, then runs until
/// the test signals `release` (10 s at most).
struct SlowOnce {
    started: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
}

impl WebsocketConsumer for SlowOnce {
    fn strict_ordering(&self) -> bool {
        true
    }
    async fn connect(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        Replying::ran(m, ctx)
    }
    async fn receive(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        if m.text() == Some("slow") {
            self.started.notify_one();
            let _ = tokio::time::timeout(WAIT, self.release.notified()).await;
        }
        Replying::ran(m, ctx)
    }
}

/// A message that passed the quick gate (no hold recorded) and runs longer than the layer
/// expiry (2 s here) is not overtaken: it records its hold at half the expiry, so the upkeep
/// of a successor parked meanwhile waits for it instead of skipping it, and a later frame
/// parks too. When it is done, the successor parked past the expiry is dropped (counted) and
/// the later frame runs: "ran 1" comes before "ran 3".
async fn long_run_is_not_overtaken(backend: Backend) {
    let settings = LayerSettings {
        expiry: Duration::from_secs(2),
        ..LayerSettings::default()
    };
    let fx = Fixture::new(backend, settings.clone()).await;
    let started = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let router = Arc::new(
        Router::new([route_class(SlowOnce {
            started: started.clone(),
            release: release.clone(),
        })])
        .unwrap(),
    );
    let inbox = fx.layer.inbox("test.slow").await.unwrap();
    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();
    let frame = |order: u64, text: &str| WebsocketReceive::text(&reply, "/", text, order);

    // One slot: the first worker takes nothing while frame 1 runs.
    let first = Worker::new(fx.layer.clone(), router.clone())
        .concurrency(1)
        .receive_timeout(Duration::from_millis(100));
    let token = CancellationToken::new();
    let first_handle = tokio::spawn(first.run(token.clone()));
    connect(&fx, &reply, &mut ch).await;
    fx.layer
        .send("websocket.receive", &frame(1, "slow"))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, started.notified())
        .await
        .expect("frame 1 started");

    let second =
        Worker::new(fx.peer(settings).await, router).receive_timeout(Duration::from_millis(100));
    let metrics = second.metrics();
    let second_handle = tokio::spawn(second.run(token.clone()));
    fx.layer
        .send("websocket.receive", &frame(2, "f2"))
        .await
        .unwrap();
    let m = metrics.clone();
    eventually(WAIT, "frame 2 parked", || m.snapshot().parked == 1).await;
    // Past the expiry of frame 2's park (the second worker's upkeep has come and gone), with
    // frame 1 still running.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    fx.layer
        .send("websocket.receive", &frame(3, "f3"))
        .await
        .unwrap();
    let m = metrics.clone();
    eventually(WAIT, "frame 3 parked behind the running frame 1", || {
        m.snapshot().parked == 2
    })
    .await;
    release.notify_one();
    assert_eq!(next_text(&mut ch).await, "ran 1");
    assert_eq!(next_text(&mut ch).await, "ran 3");
    token.cancel();
    for h in [first_handle, second_handle] {
        tokio::time::timeout(WAIT, h)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    assert!(ch.try_recv().is_none(), "frame 2 expired, never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_run_is_not_overtaken_memory() {
    long_run_is_not_overtaken(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_run_is_not_overtaken_redis() {
    long_run_is_not_overtaken(Backend::Redis).await;
}

/// A strictly ordered message the gate refuses for good (a reply channel that is not a valid
/// name) is dropped once, not requeued ten times.
async fn permanent_gate_error_is_not_requeued(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let router = Arc::new(Router::new([route_class(Replying)]).unwrap());
    let worker = Worker::new(fx.layer.clone(), router).receive_timeout(Duration::from_millis(100));
    let metrics = worker.metrics();
    let token = CancellationToken::new();
    let handle = tokio::spawn(worker.run(token.clone()));
    fx.layer
        .send(
            "websocket.receive",
            &WebsocketReceive::text("bad name", "/", "x", 1),
        )
        .await
        .unwrap();
    let m = metrics.clone();
    eventually(WAIT, "the message dropped", || m.snapshot().dropped == 1).await;
    let s = metrics.snapshot();
    assert_eq!((s.requeued, s.consumed), (0, 0));
    stop(token, handle).await;
}

#[tokio::test]
async fn permanent_gate_error_is_not_requeued_memory() {
    permanent_gate_error_is_not_requeued(Backend::Memory).await;
}

#[tokio::test]
async fn permanent_gate_error_is_not_requeued_redis() {
    permanent_gate_error_is_not_requeued(Backend::Redis).await;
}

/// [`Replying`], letting the worker's other tasks run first (so that they come to hold their
/// messages while this one runs, whatever the layer).
struct Yielding;

impl WebsocketConsumer for Yielding {
    fn strict_ordering(&self) -> bool {
        true
    }
    async fn connect(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        Replying::ran(m, ctx)
    }
    async fn receive(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        tokio::task::yield_now().await;
        Replying::ran(m, ctx)
    }
}

/// How many ordering steps read the state in Redis (each reads it with one HMGET, in a script
/// or not).
fn ordering_steps(fx: &Fixture) -> Option<u64> {
    Some(fx.redis.as_ref()?.command_calls("hmget"))
}

/// A worker that holds frames 1..=20 of one socket at once (one pop) runs them one after
/// another in one task, in order, with one layer step each: the first gated alone (from what
/// this process knows: it recorded the connect), each next one gated in the step that records
/// its predecessor as done, the last done alone. Nothing is parked in the layer.
async fn held_frames_run_in_order_with_one_step_each(backend: Backend) {
    const HELD: u64 = 20;
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let router = Arc::new(Router::new([route_class(Yielding)]).unwrap());
    let inbox = fx.layer.inbox("test.held").await.unwrap();
    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();

    // The connect runs first, on a worker stopped afterwards.
    let first =
        Worker::new(fx.layer.clone(), router.clone()).receive_timeout(Duration::from_millis(100));
    let token = CancellationToken::new();
    let handle = tokio::spawn(first.run(token.clone()));
    connect(&fx, &reply, &mut ch).await;
    stop(token, handle).await;

    for order in 1..=HELD {
        fx.layer
            .send(
                "websocket.receive",
                &WebsocketReceive::text(&reply, "/", format!("f{order}"), order),
            )
            .await
            .unwrap();
    }
    let steps_before = ordering_steps(&fx);
    // Concurrency above the frames: one pop takes them all.
    let worker = Worker::new(fx.layer.clone(), router)
        .concurrency(32)
        .receive_timeout(Duration::from_millis(100));
    let metrics = worker.metrics();
    let token = CancellationToken::new();
    let handle = tokio::spawn(worker.run(token.clone()));
    for order in 1..=HELD {
        assert_eq!(next_text(&mut ch).await, format!("ran {order}"));
    }
    let m = metrics.clone();
    eventually(WAIT, "the last frame recorded as done", || {
        m.snapshot().consumed == HELD
    })
    .await;
    stop(token, handle).await;
    let s = metrics.snapshot();
    assert_eq!(s.parked, 0, "nothing parked in the layer");
    assert_eq!(s.duplicates, 0);
    assert_eq!(
        s.ordering_held,
        HELD - 1,
        "every frame after the first gated with its predecessor's done"
    );
    if fx.redis.is_some() {
        let (before, after) = (steps_before.unwrap(), ordering_steps(&fx).unwrap());
        assert_eq!(
            after - before,
            HELD,
            "{} done-and-gate steps and one done, each one read; the first gate none (this \
             process recorded the connect's done)",
            HELD - 1
        );
    }
}

#[tokio::test]
async fn held_frames_run_in_order_with_one_step_each_memory() {
    held_frames_run_in_order_with_one_step_each(Backend::Memory).await;
}

#[tokio::test]
async fn held_frames_run_in_order_with_one_step_each_redis() {
    held_frames_run_in_order_with_one_step_each(Backend::Redis).await;
}

/// `ordering_done_then_gate` is a done followed by a gate, atomically: the gated message runs
/// when it is next, parks when it is ahead (its payload then kept in the layer), and the parked
/// message whose turn the done brought is handed out when the gated one is not it.
async fn done_then_gate_is_done_and_gate_in_one_step(backend: Backend) {
    use switchyard::layer::Gate;
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let layer = &fx.layer;
    let r = "test.fused!c1";
    let hold = Duration::from_secs(10);
    let ch = "websocket.receive";
    let gate = |order: u64, payload: &'static [u8]| async move {
        layer
            .ordering_gate(r, order, ch, payload, hold)
            .await
            .unwrap()
    };
    assert_eq!(gate(0, b"\x80").await.gate, Gate::Run);
    // Another worker parks 2.
    assert_eq!(gate(2, b"\x82").await.gate, Gate::Parked);
    // Done 0 and gate 3 (ahead of 1): 3 parks, nothing to hand out (1 is not parked).
    let out = layer
        .ordering_done_then_gate(r, 0, 3, ch, b"\x83", hold)
        .await
        .unwrap();
    assert_eq!((out.gate, out.upkeep.resume), (Gate::Parked, None));
    assert_eq!(gate(1, b"\x81").await.gate, Gate::Run);
    // Done 1 and gate 2, which is next: it runs (its parked copy is unparked), no hand-out.
    let out = layer
        .ordering_done_then_gate(r, 1, 2, ch, b"\x82", hold)
        .await
        .unwrap();
    assert_eq!((out.gate, out.upkeep.resume), (Gate::Run, None));
    // Done 2 and gate 4: 4 parks, and 3 (parked) is handed out. The done needs no script, and
    // 4, seen ahead of `next`, goes to the script with its value: one call in all.
    let scripts = || fx.redis.as_ref().map(|r| r.command_calls("evalsha"));
    let scripts_before = scripts();
    let out = layer
        .ordering_done_then_gate(r, 2, 4, ch, b"\x84", hold)
        .await
        .unwrap();
    assert_eq!(out.gate, Gate::Parked);
    if let Some(before) = scripts_before {
        assert_eq!(scripts(), Some(before + 1), "one script call to park");
    }
    let resume = out.upkeep.resume.expect("3 handed out");
    assert_eq!((resume.0.as_str(), &resume.1[..]), (ch, &b"\x83"[..]));
    // A stale order is refused in the same step.
    let out = layer
        .ordering_done_then_gate(r, 2, 2, ch, b"\x82", hold)
        .await
        .unwrap();
    assert_eq!(out.gate, Gate::Stale);
    assert_eq!(gate(3, b"\x83").await.gate, Gate::Run);
    let resume = layer.ordering_done(r, 3, false).await.unwrap().resume;
    assert_eq!(
        resume.map(|m| m.1),
        Some(bytes::Bytes::from_static(b"\x84"))
    );
    assert_eq!(gate(4, b"\x84").await.gate, Gate::Run);
    if let Some(redis) = &fx.redis {
        let parked_until: i64 = redis.cmd(&[b"HEXISTS", b"asgi:order:test.fused!c1", b"u"]);
        assert_eq!(
            parked_until, 0,
            "with the last parked message unparked, the quick paths are back"
        );
    }
    assert_eq!(layer.ordering_done(r, 4, true).await.unwrap().resume, None);
    if let Some(redis) = &fx.redis {
        let exists: i64 = redis.cmd(&[b"EXISTS", b"asgi:order:test.fused!c1"]);
        assert_eq!(exists, 0, "the state goes with the last message");
    }
}

#[tokio::test]
async fn done_then_gate_is_done_and_gate_in_one_step_memory() {
    done_then_gate_is_done_and_gate_in_one_step(Backend::Memory).await;
}

#[tokio::test]
async fn done_then_gate_is_done_and_gate_in_one_step_redis() {
    done_then_gate_is_done_and_gate_in_one_step(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_in_order_cluster() {
    every_connection_in_order(Backend::Cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gave_up_message_does_not_stall_cluster() {
    gave_up_message_does_not_stall(Backend::Cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successor_runs_even_when_its_channel_is_full_cluster() {
    successor_runs_even_when_its_channel_is_full(Backend::Cluster).await;
}

/// The done of the common case runs without the script (see `ordering.rs`); what the script
/// did besides is mended from what it read. Where the state was lost, the done writes it again
/// with its expiry; where the order had restarted at a later frame that ran first (a consumer
/// still running across a state loss), `next` goes back to where that frame left it instead of
/// behind it; a worker that recorded a done knows the next turn without reading Redis, and a
/// worker that did not reads it.
#[tokio::test]
async fn script_free_done_mends_lost_and_restarted_state() {
    use switchyard::layer::Gate;
    let fx = Fixture::new(Backend::Redis, LayerSettings::default()).await;
    let redis = fx.redis.as_ref().expect("a Redis fixture");
    let other = fx.peer(LayerSettings::default()).await;
    let (a, b) = (&fx.layer, &other);
    let r = "test.mend!c1";
    let key = format!("asgi:order:{r}");
    let hold = Duration::from_secs(10);
    let ch = "websocket.receive";
    let gate = |layer: &switchyard::layer::Layer, order: u64| {
        let layer = layer.clone();
        async move {
            layer
                .ordering_gate(r, order, ch, b"\x80", hold)
                .await
                .unwrap()
                .gate
        }
    };
    let next = || redis.cmd::<Option<String>>(&[b"HGET", key.as_bytes(), b"next"]);
    let hmgets = || ordering_steps(&fx).unwrap();

    assert_eq!(gate(a, 0).await, Gate::Run);
    a.ordering_done(r, 0, false).await.unwrap();
    let before = hmgets();
    assert_eq!(gate(a, 1).await, Gate::Run, "the turn a recorded");
    assert_eq!(hmgets(), before, "known to a without a read");

    // The state is lost while 1 runs; its done writes it again, with an expiry.
    let _: () = redis.cmd(&[b"FLUSHALL"]);
    a.ordering_done(r, 1, false).await.unwrap();
    assert_eq!(next().as_deref(), Some("2"));
    let ttl: i64 = redis.cmd(&[b"TTL", key.as_bytes()]);
    assert!(ttl > 0, "the state written again expires (ttl {ttl})");
    assert_eq!(gate(b, 2).await, Gate::Run, "b reads the turn");
    assert_eq!(gate(b, 1).await, Gate::Stale);

    // Lost again while 2 runs on b: frame 5 restarts the order on a and runs first.
    let _: () = redis.cmd(&[b"FLUSHALL"]);
    let restarted = a.ordering_gate(r, 5, ch, b"\x85", hold).await.unwrap();
    assert_eq!(restarted.gate, Gate::Run);
    assert!(restarted.upkeep.restarted);
    a.ordering_done(r, 5, false).await.unwrap();
    assert_eq!(next().as_deref(), Some("6"));
    // Frame 7 comes to b and parks behind 6.
    let parked = b.ordering_gate(r, 7, ch, b"\x87", hold).await.unwrap();
    assert_eq!(parked.gate, Gate::Parked);
    // 2 finishes: next is not set back behind 5, which ran.
    let up = b.ordering_done(r, 2, false).await.unwrap();
    assert_eq!(up.resume, None, "7 waits for 6");
    assert_eq!(next().as_deref(), Some("6"));
    assert_eq!(gate(b, 6).await, Gate::Run);
    let up = b.ordering_done(r, 6, false).await.unwrap();
    let resume = up.resume.expect("7 handed out with 6's done");
    assert_eq!(&resume.1[..], b"\x87");
    assert_eq!(gate(b, 7).await, Gate::Run);
    assert_eq!(b.ordering_done(r, 7, true).await.unwrap().resume, None);
    let exists: i64 = redis.cmd(&[b"EXISTS", key.as_bytes()]);
    assert_eq!(exists, 0, "the state goes with the last message");
}

/// Dones in flight together on one shard go to Redis together: one MULTI for those that came
/// while another was in flight, not one each. Each is recorded all the same.
#[tokio::test]
async fn concurrent_dones_share_a_multi() {
    use switchyard::layer::Gate;
    const CONNECTIONS: u64 = 50;
    let fx = Fixture::new(Backend::Redis, LayerSettings::default()).await;
    let redis = fx.redis.as_ref().expect("a Redis fixture");
    let layer = &fx.layer;
    let reply = |i: u64| format!("test.multi!c{i}");
    for i in 0..CONNECTIONS {
        let outcome = layer
            .ordering_gate(&reply(i), 0, "websocket.connect", b"\x80", WAIT)
            .await
            .unwrap();
        assert_eq!(outcome.gate, Gate::Run);
    }
    let transactions = || redis.command_calls("exec");
    let before = transactions();
    let dones = (0..CONNECTIONS).map(|i| {
        let r = reply(i);
        async move { layer.ordering_done(&r, 0, false).await.unwrap() }
    });
    for upkeep in futures_util::future::join_all(dones).await {
        assert_eq!(upkeep.resume, None);
    }
    let used = transactions() - before;
    assert!(
        (1..CONNECTIONS / 2).contains(&used),
        "{CONNECTIONS} dones in {used} MULTIs"
    );
    for i in 0..CONNECTIONS {
        let key = format!("asgi:order:{}", reply(i));
        let next: Option<String> = redis.cmd(&[b"HGET", key.as_bytes(), b"next"]);
        assert_eq!(next.as_deref(), Some("1"), "{key}");
    }
}

//! The worker runtime against both layers, with real worker tasks: replies, deny/close,
//! consumer atomicity on error and panic, ConsumeLater (bounded), channel globs, a slow consumer
//! not delaying others, no worker popping more than it can run, graceful stop finishing the
//! message in hand, channel sessions shared by several workers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::{Backend, Fixture, eventually};
use switchyard::layer::{Layer, LayerSettings, LocalChannel, ProcessInbox};
use switchyard::routing::asgi::{WebsocketConnect, WebsocketDisconnect, WebsocketReceive};
use switchyard::routing::{
    ConsumerError, Ctx, Map, Message, Router, Value, WebsocketConsumer, route, route_class,
};
use switchyard::worker::{Worker, WorkerError, WorkerMetrics};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

struct Running {
    token: CancellationToken,
    handle: JoinHandle<Result<(), WorkerError>>,
    metrics: Arc<WorkerMetrics>,
}

impl Running {
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("worker stops within 10 s")
            .unwrap()
            .unwrap();
    }
}

fn start(worker: Worker) -> Running {
    let worker = worker.receive_timeout(Duration::from_millis(200));
    let token = CancellationToken::new();
    let metrics = worker.metrics();
    let handle = tokio::spawn(worker.run(token.clone()));
    Running {
        token,
        handle,
        metrics,
    }
}

async fn next(ch: &mut LocalChannel) -> Map {
    ch.recv_timeout(WAIT)
        .await
        .expect("a reply within 10 s")
        .to_map()
        .unwrap()
}

fn text(t: &str) -> Map {
    Map::new().with("text", t)
}

async fn connect(m: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    match m.path() {
        Some("/deny/") => Err(ConsumerError::DenyConnection),
        Some("/close/") => {
            ctx.send_text("closing")?; // discarded: the consumer did not return Ok
            Err(ConsumerError::Close(4001))
        }
        _ => ctx.accept(),
    }
}

async fn echo(m: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    ctx.send_text(format!("echo:{}", m.text().unwrap_or("")))
}

async fn fail(_: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    ctx.send_text("half-done")?;
    Err(ConsumerError::other("database is down"))
}

async fn boom(_: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    ctx.send_text("half-done")?;
    let v: Vec<u8> = Vec::new();
    // A consumer bug: index out of bounds.
    let _ = v[usize::from(ctx.reply_channel().is_some())];
    Ok(())
}

async fn later(m: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    if m.retries() < 2 {
        return Err(ConsumerError::ConsumeLater);
    }
    ctx.send_text(format!("after {} retries", m.retries()))
}

async fn never(_: Message, _: Ctx) -> Result<(), ConsumerError> {
    Err(ConsumerError::ConsumeLater)
}

fn basic_router() -> Router {
    Router::new([
        route("websocket.connect", connect),
        route("websocket.receive", echo).path("^/echo/"),
        route("websocket.receive", fail).path("^/fail/"),
        route("websocket.receive", boom).path("^/panic/"),
        route("websocket.receive", later).path("^/later/"),
        route("websocket.receive", never).path("^/never/"),
    ])
    .unwrap()
}

async fn inbox(layer: &Layer) -> ProcessInbox {
    layer.inbox("test.replies").await.unwrap()
}

async fn replies_and_control_errors(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let running = start(
        Worker::new(fx.layer.clone(), Arc::new(basic_router()))
            .concurrency(2)
            .max_retries(3),
    );
    let inbox = inbox(&fx.layer).await;
    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();
    let send = |channel: &'static str, m: Map| {
        let layer = fx.layer.clone();
        async move { layer.send(channel, &m).await.unwrap() }
    };
    let as_map = |v: &dyn erased::Ser| v.map();

    send(
        "websocket.connect",
        as_map(&WebsocketConnect::new(&reply, "/echo/")),
    )
    .await;
    assert_eq!(next(&mut ch).await, Map::new().with("accept", true));

    send(
        "websocket.connect",
        as_map(&WebsocketConnect::new(&reply, "/deny/")),
    )
    .await;
    assert_eq!(next(&mut ch).await, Map::new().with("close", true));

    send(
        "websocket.connect",
        as_map(&WebsocketConnect::new(&reply, "/close/")),
    )
    .await;
    assert_eq!(next(&mut ch).await, Map::new().with("close", 4001));

    // Errors and panics discard the consumer's sends; the worker goes on.
    send(
        "websocket.receive",
        as_map(&WebsocketReceive::text(&reply, "/fail/", "x", 1)),
    )
    .await;
    send(
        "websocket.receive",
        as_map(&WebsocketReceive::text(&reply, "/panic/", "x", 2)),
    )
    .await;
    send(
        "websocket.receive",
        as_map(&WebsocketReceive::text(&reply, "/echo/", "hi", 3)),
    )
    .await;
    assert_eq!(next(&mut ch).await, text("echo:hi"));
    let m = running.metrics.clone();
    eventually(WAIT, "one error and one panic counted", || {
        let s = m.snapshot();
        s.errors == 1 && s.panics == 1
    })
    .await;

    // ConsumeLater: requeued with __retries__ until the consumer takes it.
    send(
        "websocket.receive",
        as_map(&WebsocketReceive::text(&reply, "/later/", "x", 4)),
    )
    .await;
    assert_eq!(next(&mut ch).await, text("after 2 retries"));

    // ...and dropped after max_retries.
    send(
        "websocket.receive",
        as_map(&WebsocketReceive::text(&reply, "/never/", "x", 5)),
    )
    .await;
    eventually(WAIT, "the never-consumed message dropped", || {
        m.snapshot().dropped == 1
    })
    .await;
    let s = m.snapshot();
    assert_eq!(s.requeued, 2 + 3);
    assert!(ch.try_recv().is_none(), "nothing else was sent");

    // Messages no route matches are counted, not fatal.
    send(
        "websocket.receive",
        as_map(&WebsocketReceive::text(&reply, "/nowhere/", "x", 6)),
    )
    .await;
    eventually(WAIT, "unrouted counted", || m.snapshot().unrouted == 1).await;
    send(
        "websocket.receive",
        as_map(&WebsocketReceive::text(&reply, "/echo/", "still", 7)),
    )
    .await;
    assert_eq!(next(&mut ch).await, text("echo:still"));
    running.stop().await;
}

/// Serializes typed messages into maps for sending.
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

#[tokio::test]
async fn replies_and_control_errors_memory() {
    replies_and_control_errors(Backend::Memory).await;
}

#[tokio::test]
async fn replies_and_control_errors_redis() {
    replies_and_control_errors(Backend::Redis).await;
}

/// A `thumbnails` consumer that blocks until the test releases it.
#[derive(Default)]
struct Gate {
    started: Notify,
    release: Notify,
    finished: AtomicBool,
}

fn slow_router(gate: Arc<Gate>) -> Router {
    Router::new([
        route("thumbnails", move |m: Message, ctx: Ctx| {
            let gate = gate.clone();
            async move {
                gate.started.notify_one();
                gate.release.notified().await;
                gate.finished.store(true, Ordering::SeqCst);
                let to = m.get_str("notify").unwrap_or_default().to_owned();
                ctx.send(&to, &Map::new().with("text", "thumbnail ready"))
            }
        }),
        route("websocket.receive", echo),
    ])
    .unwrap()
}

async fn slow_consumer_does_not_delay_others(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let gate = Arc::new(Gate::default());
    let running =
        start(Worker::new(fx.layer.clone(), Arc::new(slow_router(gate.clone()))).concurrency(2));
    let inbox = inbox(&fx.layer).await;
    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();
    fx.layer
        .send("thumbnails", &Map::new().with("notify", reply.as_str()))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, gate.started.notified())
        .await
        .expect("the slow consumer starts");
    for i in 0..5 {
        fx.layer
            .send(
                "websocket.receive",
                &WebsocketReceive::text(&reply, "/", format!("m{i}"), i),
            )
            .await
            .unwrap();
        assert_eq!(next(&mut ch).await, text(&format!("echo:m{i}")));
    }
    assert!(
        !gate.finished.load(Ordering::SeqCst),
        "the echoes were answered while the slow consumer was still running"
    );
    gate.release.notify_one();
    assert_eq!(next(&mut ch).await, text("thumbnail ready"));
    running.stop().await;
}

/// Two workers of 2 consumers each and 4 jobs that each wait until all 4 are running: a worker
/// that popped more than it could run (as a batch bigger than its idle consumers would) leaves a
/// job waiting behind its own busy consumers and the barrier is never reached.
async fn a_worker_takes_no_more_than_it_can_run(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let all_running = Arc::new(tokio::sync::Barrier::new(4));
    let handled_by: Arc<std::sync::Mutex<Vec<&'static str>>> = Arc::default();
    let router = |name: &'static str| {
        let all_running = all_running.clone();
        let handled_by = handled_by.clone();
        Arc::new(
            Router::new([route("jobs.wait", move |m: Message, ctx: Ctx| {
                let all_running = all_running.clone();
                let handled_by = handled_by.clone();
                async move {
                    handled_by.lock().unwrap().push(name);
                    all_running.wait().await;
                    let to = m.get_str("notify").unwrap_or_default().to_owned();
                    ctx.send(&to, &Map::new().with("text", name))
                }
            })])
            .unwrap(),
        )
    };
    let inbox = inbox(&fx.layer).await;
    let mut ch = inbox.new_channel();
    // Queued before any worker starts, so the first pop sees all four.
    for _ in 0..4 {
        fx.layer
            .send("jobs.wait", &Map::new().with("notify", ch.name()))
            .await
            .unwrap();
    }
    let a = start(Worker::new(fx.layer.clone(), router("a")).concurrency(2));
    let b = start(Worker::new(fx.layer.clone(), router("b")).concurrency(2));
    let mut done = Vec::new();
    for _ in 0..4 {
        done.push(next(&mut ch).await);
    }
    let mut by = handled_by.lock().unwrap().clone();
    by.sort_unstable();
    assert_eq!(by, ["a", "a", "b", "b"], "each worker ran exactly its 2");
    assert_eq!(a.metrics.snapshot().consumed, 2);
    assert_eq!(b.metrics.snapshot().consumed, 2);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_no_more_than_it_can_run_memory() {
    a_worker_takes_no_more_than_it_can_run(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_no_more_than_it_can_run_redis() {
    a_worker_takes_no_more_than_it_can_run(Backend::Redis).await;
}

#[tokio::test]
async fn slow_consumer_does_not_delay_others_memory() {
    slow_consumer_does_not_delay_others(Backend::Memory).await;
}

#[tokio::test]
async fn slow_consumer_does_not_delay_others_redis() {
    slow_consumer_does_not_delay_others(Backend::Redis).await;
}

async fn graceful_stop_finishes_message_in_hand(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let gate = Arc::new(Gate::default());
    let running = start(Worker::new(
        fx.layer.clone(),
        Arc::new(slow_router(gate.clone())),
    ));
    let inbox = inbox(&fx.layer).await;
    let mut ch = inbox.new_channel();
    fx.layer
        .send("thumbnails", &Map::new().with("notify", ch.name()))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, gate.started.notified())
        .await
        .expect("the consumer starts");
    running.token.cancel();
    // The worker must still be running the message in hand.
    tokio::task::yield_now().await;
    assert!(!running.handle.is_finished());
    gate.release.notify_one();
    tokio::time::timeout(WAIT, running.handle)
        .await
        .expect("stops after the message in hand")
        .unwrap()
        .unwrap();
    assert_eq!(next(&mut ch).await, text("thumbnail ready"));
    // And it took nothing else: a message sent after the stop stays queued.
    fx.layer
        .send("thumbnails", &Map::new().with("notify", ch.name()))
        .await
        .unwrap();
    assert_eq!(fx.layer.channel_depth("thumbnails").await.unwrap(), 1);
}

#[tokio::test]
async fn graceful_stop_finishes_message_in_hand_memory() {
    graceful_stop_finishes_message_in_hand(Backend::Memory).await;
}

#[tokio::test]
async fn graceful_stop_finishes_message_in_hand_redis() {
    graceful_stop_finishes_message_in_hand(Backend::Redis).await;
}

async fn channel_globs(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let router = Arc::new(slow_router(Arc::new(Gate::default())));
    let w = Worker::new(fx.layer.clone(), router.clone());
    assert_eq!(w.channels(), ["thumbnails", "websocket.receive"]);
    assert_eq!(
        w.clone().only_channels(&["websocket.*"]).channels(),
        ["websocket.receive"]
    );
    let excluding = w.clone().exclude_channels(&["thumb*"]);
    assert_eq!(excluding.channels(), ["websocket.receive"]);
    let err = w
        .clone()
        .only_channels(&["http.*"])
        .run(CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, WorkerError::NoChannels { .. }), "{err}");

    let running = start(excluding);
    let inbox = inbox(&fx.layer).await;
    let mut ch = inbox.new_channel();
    fx.layer
        .send("thumbnails", &Map::new().with("notify", ch.name()))
        .await
        .unwrap();
    fx.layer
        .send(
            "websocket.receive",
            &WebsocketReceive::text(ch.name(), "/", "x", 1),
        )
        .await
        .unwrap();
    assert_eq!(next(&mut ch).await, text("echo:x"));
    running.stop().await;
    assert_eq!(
        fx.layer.channel_depth("thumbnails").await.unwrap(),
        1,
        "the excluded channel was not consumed"
    );
}

#[tokio::test]
async fn channel_globs_memory() {
    channel_globs(Backend::Memory).await;
}

#[tokio::test]
async fn channel_globs_redis() {
    channel_globs(Backend::Redis).await;
}

/// Counts frames per connection in the channel session.
struct Counter;

impl WebsocketConsumer for Counter {
    fn channel_session(&self) -> bool {
        true
    }
    async fn connect(&self, _m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        ctx.session_set("count", 0)?;
        ctx.accept()
    }
    async fn receive(&self, _m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        let n = ctx
            .session_get("count")
            .and_then(|v| v.as_i64())
            .unwrap_or(-100)
            + 1;
        ctx.session_set("count", n)?;
        ctx.send_text(n.to_string())
    }
    async fn disconnect(&self, _m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        ctx.session_delete("count")
    }
}

async fn channel_session_is_shared_by_workers(backend: Backend) {
    let settings = LayerSettings {
        group_expiry: Duration::from_secs(1),
        ..LayerSettings::default()
    };
    let fx = Fixture::new(backend, settings.clone()).await;
    let router = Arc::new(Router::new([route_class(Counter)]).unwrap());
    let mut workers = Vec::new();
    for _ in 0..3 {
        let layer = fx.peer(settings.clone()).await;
        workers.push(start(Worker::new(layer, router.clone())));
    }
    let inbox = inbox(&fx.layer).await;
    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();
    fx.layer
        .send("websocket.connect", &WebsocketConnect::new(&reply, "/"))
        .await
        .unwrap();
    assert_eq!(next(&mut ch).await, Map::new().with("accept", true));
    for i in 1..=6u64 {
        fx.layer
            .send(
                "websocket.receive",
                &WebsocketReceive::text(&reply, "/", "tick", i),
            )
            .await
            .unwrap();
        assert_eq!(next(&mut ch).await, text(&i.to_string()));
    }
    let consumed: Vec<u64> = workers
        .iter()
        .map(|w| w.metrics.snapshot().consumed)
        .collect();
    assert_eq!(consumed.iter().sum::<u64>(), 7);
    assert_eq!(
        fx.layer.session_get(&reply).await.unwrap(),
        Map::new().with("count", Value::Int(6))
    );
    fx.layer
        .send(
            "websocket.disconnect",
            &WebsocketDisconnect::new(&reply, "/", 1000, 7),
        )
        .await
        .unwrap();
    let layer = fx.layer.clone();
    let r = reply.clone();
    let deleted = async move {
        for _ in 0..500 {
            if layer.session_get(&r).await.unwrap().get("count").is_none() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    };
    assert!(deleted.await, "disconnect deleted the key");

    // A session expires with the group expiry (1 s here).
    fx.layer
        .session_set(&reply, "k", &Value::from("v"))
        .await
        .unwrap();
    assert_eq!(
        fx.layer.session_get(&reply).await.unwrap().get_str("k"),
        Some("v")
    );
    let layer = fx.layer.clone();
    let expired = async move {
        for _ in 0..300 {
            if layer.session_get(&reply).await.unwrap().is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    assert!(expired.await, "the session expired within 6 s");
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test]
async fn channel_session_is_shared_by_workers_memory() {
    channel_session_is_shared_by_workers(Backend::Memory).await;
}

#[tokio::test]
async fn channel_session_is_shared_by_workers_redis() {
    channel_session_is_shared_by_workers(Backend::Redis).await;
}

#[tokio::test]
async fn bad_names_are_errors_not_panics() {
    let fx = Fixture::new(Backend::Memory, LayerSettings::default()).await;
    assert!(fx.layer.session_get("bad name").await.is_err());
    assert!(
        fx.layer
            .session_set("bad name", "k", &Value::Nil)
            .await
            .is_err()
    );
    assert!(
        fx.layer
            .ordering_gate("bad name", 0, "x", b"\x80", Duration::from_secs(1))
            .await
            .is_err()
    );
    let err = Worker::new(fx.layer.clone(), Arc::new(basic_router()))
        .concurrency(0)
        .run(CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, WorkerError::Config(_)));
}

#[tokio::test]
async fn worker_rides_out_a_redis_restart() {
    let mut fx = Fixture::new(Backend::Redis, LayerSettings::default()).await;
    let running = start(Worker::new(fx.layer.clone(), Arc::new(basic_router())).concurrency(2));
    let inbox = inbox(&fx.layer).await;
    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();
    fx.layer
        .send(
            "websocket.receive",
            &WebsocketReceive::text(&reply, "/echo/", "before", 1),
        )
        .await
        .unwrap();
    assert_eq!(next(&mut ch).await, text("echo:before"));

    fx.redis.as_mut().unwrap().restart();
    // Sends fail fast while the layer reconnects; retry until one is accepted.
    let mut sent = false;
    for _ in 0..200 {
        if fx
            .layer
            .send(
                "websocket.receive",
                &WebsocketReceive::text(&reply, "/echo/", "after", 2),
            )
            .await
            .is_ok()
        {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sent, "the layer reconnected within 10 s");
    assert_eq!(next(&mut ch).await, text("echo:after"));
    running.stop().await;
}

#[tokio::test]
async fn redis_layout_of_sessions_and_ordering() {
    let fx = Fixture::new(Backend::Redis, LayerSettings::default()).await;
    let redis = fx.redis.as_ref().unwrap();
    let reply = "daphne.response.abc!xyz";
    fx.layer
        .session_set(reply, "count", &Value::Int(6))
        .await
        .unwrap();
    let key = format!("asgi:session:{reply}");
    let stored: Vec<u8> = redis.cmd(&[b"HGET", key.as_bytes(), b"count"]);
    assert_eq!(stored, [0x06], "the value is msgpack");
    let ttl: i64 = redis.cmd(&[b"TTL", key.as_bytes()]);
    assert!(
        (86_000..=86_400).contains(&ttl),
        "expires with the group expiry: {ttl}"
    );

    use switchyard::layer::Gate;
    let hold = Duration::from_secs(10);
    assert_eq!(
        fx.layer
            .ordering_gate(reply, 0, "websocket.connect", b"\x80", hold)
            .await
            .unwrap()
            .gate,
        Gate::Run
    );
    assert_eq!(
        fx.layer
            .ordering_gate(reply, 2, "websocket.receive", b"\x81\xa1k\x01", hold)
            .await
            .unwrap()
            .gate,
        Gate::Parked
    );
    let okey = format!("asgi:order:{reply}");
    let parked: Vec<u8> = redis.cmd(&[b"HGET", okey.as_bytes(), b"p:2"]);
    let (at, rest) = parked.split_at(parked.iter().position(|b| *b == b' ').unwrap());
    let at: f64 = std::str::from_utf8(at).unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    assert!((now - at).abs() < 10_000.0, "parked at {at}, now {now}");
    assert_eq!(rest, b" websocket.receive\x00\x81\xa1k\x01");
    assert_eq!(
        fx.layer
            .ordering_done(reply, 0, false)
            .await
            .unwrap()
            .resume,
        None
    );
    assert_eq!(
        fx.layer
            .ordering_gate(reply, 1, "websocket.receive", b"\x80", hold)
            .await
            .unwrap()
            .gate,
        Gate::Run
    );
    let resumed = fx
        .layer
        .ordering_done(reply, 1, false)
        .await
        .unwrap()
        .resume
        .unwrap();
    assert_eq!(resumed.0, "websocket.receive");
    assert_eq!(&resumed.1[..], b"\x81\xa1k\x01");
    // Handed out, but still parked until it passes the gate.
    let still: i64 = redis.cmd(&[b"HEXISTS", okey.as_bytes(), b"p:2"]);
    assert_eq!(still, 1);
    assert_eq!(
        fx.layer
            .ordering_gate(reply, 2, "websocket.receive", b"\x80", hold)
            .await
            .unwrap()
            .gate,
        Gate::Run
    );
    let still: i64 = redis.cmd(&[b"HEXISTS", okey.as_bytes(), b"p:2"]);
    assert_eq!(still, 0, "unparked when it runs");
    assert_eq!(
        fx.layer.ordering_done(reply, 2, true).await.unwrap().resume,
        None
    );
    let exists: i64 = redis.cmd(&[b"EXISTS", okey.as_bytes()]);
    assert_eq!(exists, 0, "the ordering state goes with the disconnect");
    fx.layer.flush().await.unwrap();
    let exists: i64 = redis.cmd(&[b"EXISTS", key.as_bytes()]);
    assert_eq!(exists, 0, "flush removes sessions");
}

async fn fail_connect(_: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    ctx.accept()?; // discarded: the consumer did not return Ok
    Err(ConsumerError::other("database is down"))
}

async fn panic_connect(_: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    ctx.accept()?;
    panic!("a consumer bug in connect");
}

async fn fail_http(_: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    ctx.send_text("half-done")?;
    Err(ConsumerError::other("database is down"))
}

async fn hang(_: Message, _: Ctx) -> Result<(), ConsumerError> {
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

fn failing_router() -> Router {
    Router::new([
        route("websocket.connect", fail_connect).path("^/fail/"),
        route("websocket.connect", panic_connect).path("^/panic/"),
        route("websocket.connect", hang).path("^/hang/"),
        route("http.request", fail_http).path("^/fail/"),
        route("http.request", hang).path("^/hang/"),
        route("websocket.receive", hang).path("^/hang/"),
        route("websocket.receive", echo).path("^/echo/"),
    ])
    .unwrap()
}

fn is_500(m: &Map) -> bool {
    m.get("status") == Some(&Value::Int(500))
        && m.get("content")
            == Some(&Value::Bytes(
                b"500 Internal Server Error\n".to_vec().into(),
            ))
}

/// A consumer that errors, panics or times out still answers its client: 500 to an
/// http.request, `{"close": true}` to a websocket.connect (instead of the server's 60 s / 5 s
/// timeouts); a hung consumer is aborted after the worker's consumer timeout, counted, and the
/// loop goes on.
async fn failed_consumers_answer_the_client(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let running = start(
        Worker::new(fx.layer.clone(), Arc::new(failing_router()))
            .concurrency(1)
            .consumer_timeout(Duration::from_millis(300)),
    );
    let inbox = inbox(&fx.layer).await;
    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();
    let http = |path: &str| switchyard::routing::asgi::HttpRequest::new(&reply, "GET", path);

    for path in ["/fail/", "/panic/", "/hang/"] {
        fx.layer
            .send("websocket.connect", &WebsocketConnect::new(&reply, path))
            .await
            .unwrap();
        assert_eq!(
            next(&mut ch).await,
            Map::new().with("close", true),
            "connect to {path} closed"
        );
    }
    for path in ["/fail/", "/hang/"] {
        fx.layer.send("http.request", &http(path)).await.unwrap();
        let m = next(&mut ch).await;
        assert!(is_500(&m), "{path}: {m:?}");
    }
    // The loop (concurrency 1) was freed from the hung frame.
    fx.layer
        .send(
            "websocket.receive",
            &WebsocketReceive::text(&reply, "/hang/", "x", 1),
        )
        .await
        .unwrap();
    fx.layer
        .send(
            "websocket.receive",
            &WebsocketReceive::text(&reply, "/echo/", "after", 2),
        )
        .await
        .unwrap();
    assert_eq!(next(&mut ch).await, text("echo:after"));
    let s = running.metrics.snapshot();
    assert_eq!((s.errors, s.panics, s.timeouts), (2, 1, 3));
    running.stop().await;
}

#[tokio::test]
async fn failed_consumers_answer_the_client_memory() {
    failed_consumers_answer_the_client(Backend::Memory).await;
}

#[tokio::test]
async fn failed_consumers_answer_the_client_redis() {
    failed_consumers_answer_the_client(Backend::Redis).await;
}

/// A class consumer whose disconnect hook fails or panics still leaves its groups.
struct Grouped;

impl WebsocketConsumer for Grouped {
    fn groups(&self, _kwargs: &switchyard::routing::Kwargs) -> Vec<String> {
        vec!["lobby".to_owned()]
    }
    async fn connect(&self, _m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        ctx.accept()
    }
    async fn disconnect(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        ctx.group_send("lobby", &Map::new().with("text", "left"))?; // discarded
        if m.path() == Some("/panic/") {
            panic!("a consumer bug in disconnect");
        }
        Err(ConsumerError::other("database is down"))
    }
}

async fn failed_disconnect_still_leaves_groups(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let running = start(Worker::new(
        fx.layer.clone(),
        Arc::new(Router::new([route_class(Grouped)]).unwrap()),
    ));
    let inbox = inbox(&fx.layer).await;
    let mut stays = inbox.new_channel();
    fx.layer.group_add("lobby", stays.name()).await.unwrap();
    for path in ["/fail/", "/panic/"] {
        let mut ch = inbox.new_channel();
        let reply = ch.name().to_owned();
        fx.layer
            .send("websocket.connect", &WebsocketConnect::new(&reply, path))
            .await
            .unwrap();
        assert_eq!(next(&mut ch).await, Map::new().with("accept", true));
        assert!(
            fx.layer
                .group_channels("lobby")
                .await
                .unwrap()
                .contains(&reply)
        );
        fx.layer
            .send(
                "websocket.disconnect",
                &WebsocketDisconnect::new(&reply, path, 1000, 1),
            )
            .await
            .unwrap();
        // Polled: the layer has no membership event to await.
        let mut left = false;
        for _ in 0..200 {
            if !fx
                .layer
                .group_channels("lobby")
                .await
                .unwrap()
                .contains(&reply)
            {
                left = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(left, "{path}: left the group");
    }
    assert_eq!(
        fx.layer.group_channels("lobby").await.unwrap(),
        [stays.name().to_owned()]
    );
    assert!(
        stays.try_recv().is_none(),
        "the failed hooks' group sends were discarded"
    );
    let s = running.metrics.snapshot();
    assert_eq!((s.errors, s.panics), (1, 1));
    running.stop().await;
}

#[tokio::test]
async fn failed_disconnect_still_leaves_groups_memory() {
    failed_disconnect_still_leaves_groups(Backend::Memory).await;
}

#[tokio::test]
async fn failed_disconnect_still_leaves_groups_redis() {
    failed_disconnect_still_leaves_groups(Backend::Redis).await;
}

/// Graceful stop waits at most the stop grace for a consumer that never returns.
async fn stop_grace_bounds_a_hung_consumer(backend: Backend) {
    let fx = Fixture::new(backend, LayerSettings::default()).await;
    let running = start(
        Worker::new(fx.layer.clone(), Arc::new(failing_router()))
            .consumer_timeout(Duration::from_secs(3600))
            .stop_grace(Duration::from_millis(300)),
    );
    let inbox = inbox(&fx.layer).await;
    let ch = inbox.new_channel();
    fx.layer
        .send(
            "websocket.receive",
            &WebsocketReceive::text(ch.name(), "/hang/", "x", 1),
        )
        .await
        .unwrap();
    let m = running.metrics.clone();
    eventually(WAIT, "the hung frame taken", || {
        m.snapshot()
            .received_by_channel
            .iter()
            .any(|(c, n)| c == "websocket.receive" && *n == 1)
    })
    .await;
    running.stop().await; // within 10 s, else it panics
}

#[tokio::test]
async fn stop_grace_bounds_a_hung_consumer_memory() {
    stop_grace_bounds_a_hung_consumer(Backend::Memory).await;
}

#[tokio::test]
async fn stop_grace_bounds_a_hung_consumer_redis() {
    stop_grace_bounds_a_hung_consumer(Backend::Redis).await;
}

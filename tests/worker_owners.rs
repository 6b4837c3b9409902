//! A worker as a connection owner, on a real redis-server: it names itself in the accept only
//! when the connect says the server takes an owner, runs what arrives on its owner channel in
//! the order sent, runs a message its consumer requeues again in place (its successors wait)
//! instead of sending it to the back of `websocket.receive`, holds a socket's first frame until
//! its connect has applied every action, and owns under a new name once Redis lost its lease.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Backend, Fixture, next_text};
use switchyard::layer::owner::owner_channel;
use switchyard::layer::{LayerSettings, LocalChannel};
use switchyard::routing::asgi::{WebsocketConnect, WebsocketDisconnect, WebsocketReceive};
use switchyard::routing::{
    ConsumerError, Ctx, Map, Message, Router, Value, WebsocketConsumer, route_class,
};
use switchyard::worker::Worker;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// Requeues "twice" until its second retry and "never" for good; logs every other frame.
struct Stubborn {
    log: Arc<Mutex<Vec<u64>>>,
}

impl WebsocketConsumer for Stubborn {
    fn strict_ordering(&self) -> bool {
        true
    }
    async fn connect(&self, _m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        ctx.accept()
    }
    async fn receive(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        match (m.text(), m.retries()) {
            (Some("never"), _) => return Err(ConsumerError::ConsumeLater),
            (Some("twice"), r) if r < 2 => return Err(ConsumerError::ConsumeLater),
            _ => {}
        }
        let order = m.order().unwrap_or(u64::MAX);
        self.log.lock().unwrap().push(order);
        ctx.send_text(format!("ran {order}"))
    }
    async fn disconnect(&self, m: &Message, _ctx: &Ctx) -> Result<(), ConsumerError> {
        self.log.lock().unwrap().push(m.order().unwrap_or(u64::MAX));
        Ok(())
    }
}

/// Stops a worker started with `tokio::spawn(worker.run(token))` and waits for it to return
/// without error.
async fn stop_worker(
    token: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), switchyard::worker::WorkerError>>,
) {
    token.cancel();
    tokio::time::timeout(WAIT, handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Sends the connect of socket `ch` as a server that takes an owner; returns the owner the
/// accept names.
async fn connect_owned(fx: &Fixture, ch: &mut LocalChannel) -> String {
    let mut connect = WebsocketConnect::new(ch.name(), "/");
    connect.owners = true;
    fx.layer.send("websocket.connect", &connect).await.unwrap();
    let accept = ch.recv_timeout(WAIT).await.unwrap().to_map().unwrap();
    assert_eq!(accept.get("accept"), Some(&Value::Bool(true)));
    accept
        .get_str("x-switchyard-owner")
        .expect("the worker names itself owner")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_runs_its_channel_in_order_and_requeues_in_place() {
    let fx = Fixture::new(Backend::Redis, LayerSettings::default()).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let router = Arc::new(Router::new([route_class(Stubborn { log: log.clone() })]).unwrap());
    let token = CancellationToken::new();
    let worker = Worker::new(fx.layer.clone(), router)
        .max_retries(2)
        .receive_timeout(Duration::from_millis(200));
    let metrics = worker.metrics();
    let handle = tokio::spawn(worker.run(token.clone()));
    let inbox = fx.layer.inbox("test.owned").await.unwrap();

    // A connect without the server's word: a plain accept.
    let mut plain = inbox.new_channel();
    let plain_name = plain.name().to_owned();
    fx.layer
        .send(
            "websocket.connect",
            &WebsocketConnect::new(&plain_name, "/"),
        )
        .await
        .unwrap();
    let accept = plain.recv_timeout(WAIT).await.unwrap().to_map().unwrap();
    assert_eq!(accept.get("accept"), Some(&Value::Bool(true)));
    assert_eq!(accept.get("x-switchyard-owner"), None);

    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();
    let owner = connect_owned(&fx, &mut ch).await;
    assert!(owner.starts_with("switchyard.owner."), "{owner}");

    let channel = owner_channel(&owner);
    for (order, text) in [(1, "ok"), (2, "twice"), (3, "ok"), (4, "never"), (5, "ok")] {
        fx.layer
            .send(&channel, &WebsocketReceive::text(&reply, "/", text, order))
            .await
            .unwrap();
    }
    fx.layer
        .send(&channel, &WebsocketDisconnect::new(&reply, "/", 1000, 6))
        .await
        .unwrap();
    for order in [1, 2, 3, 5] {
        assert_eq!(next_text(&mut ch).await, format!("ran {order}"));
    }
    support::eventually(WAIT, "the disconnect to run", || {
        log.lock().unwrap().len() == 5
    })
    .await;
    // Frame 4 was given up after its retries; the disconnect ran last.
    assert_eq!(*log.lock().unwrap(), [1, 2, 3, 5, 6]);
    let s = metrics.snapshot();
    assert_eq!(s.owned, 6);
    assert_eq!(s.requeued, 2 + 2);
    assert_eq!(s.dropped, 1);
    assert_eq!(s.parked, 0);
    // Requeued in place: nothing went back to the shared channel.
    assert_eq!(
        fx.layer.channel_depth("websocket.receive").await.unwrap(),
        0
    );
    stop_worker(token, handle).await;
    // A stopped worker gives its lease up.
    assert!(!fx.layer.owner_alive(&owner).await.unwrap());
}

/// Connects a socket with the server's word that it takes an owner; returns the owner named.
async fn owner_of_new_socket(fx: &Fixture, inbox: &switchyard::layer::ProcessInbox) -> String {
    connect_owned(fx, &mut inbox.new_channel()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_whose_lease_redis_lost_owns_new_sockets_under_a_new_name() {
    let fx = Fixture::new(Backend::Redis, LayerSettings::default()).await;
    let router = Arc::new(
        Router::new([route_class(Stubborn {
            log: Arc::default(),
        })])
        .unwrap(),
    );
    let token = CancellationToken::new();
    let worker = Worker::new(fx.layer.clone(), router).receive_timeout(Duration::from_millis(200));
    let handle = tokio::spawn(worker.run(token.clone()));
    let inbox = fx.layer.inbox("test.rotate").await.unwrap();
    let first = owner_of_new_socket(&fx, &inbox).await;
    assert!(fx.layer.owner_alive(&first).await.unwrap());

    // Redis loses the lease (as on a restart): a server may have taken the sockets back, so
    // the name is never taken up again.
    let redis = fx.redis.as_ref().unwrap();
    let _: i64 = redis.cmd(&[b"ZREM", b"asgi:leases", first.as_bytes()]);
    let deadline = tokio::time::Instant::now() + WAIT;
    let second = loop {
        let owner = owner_of_new_socket(&fx, &inbox).await;
        if owner != first {
            break owner;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still owning under {first}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(fx.layer.owner_alive(&second).await.unwrap());
    support::eventually(WAIT, "the old name given up", || {
        let score: Option<f64> = redis.cmd(&[b"ZSCORE", b"asgi:leases", first.as_bytes()]);
        score.is_none()
    })
    .await;
    stop_worker(token, handle).await;
}

/// Accepts, then sends to `slow` (full until the test makes room), then records "set" in the
/// channel session; every frame answers with what its session holds.
struct SlowConnect;

impl WebsocketConsumer for SlowConnect {
    fn strict_ordering(&self) -> bool {
        true
    }
    fn channel_session(&self) -> bool {
        true
    }
    async fn connect(&self, _m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        ctx.accept()?;
        ctx.send("slow", &Map::new().with("n", 2))?;
        ctx.session_set("state", "set")
    }
    async fn receive(&self, _m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        let state = ctx
            .session_get("state")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "missing".to_owned());
        ctx.send_text(state)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_sockets_first_frame_waits_for_its_connect_to_finish() {
    let settings = LayerSettings {
        channel_capacity: vec![("slow".into(), 1)],
        ..LayerSettings::default()
    };
    let fx = Fixture::new(Backend::Redis, settings).await;
    // Full: the connect's send after its accept waits for room.
    fx.layer
        .send("slow", &Map::new().with("n", 1))
        .await
        .unwrap();
    let router = Arc::new(Router::new([route_class(SlowConnect)]).unwrap());
    let token = CancellationToken::new();
    let worker = Worker::new(fx.layer.clone(), router).receive_timeout(Duration::from_millis(200));
    let handle = tokio::spawn(worker.run(token.clone()));
    let inbox = fx.layer.inbox("test.slowconnect").await.unwrap();
    let mut ch = inbox.new_channel();
    let reply = ch.name().to_owned();
    let owner = connect_owned(&fx, &mut ch).await;
    fx.layer
        .send(
            &owner_channel(&owner),
            &WebsocketReceive::text(&reply, "/", "first", 1),
        )
        .await
        .unwrap();
    // The connect is still sending: frame 1 has not run (it would answer "missing").
    assert!(
        ch.recv_timeout(Duration::from_millis(500)).await.is_none(),
        "frame 1 ran before its connect had finished"
    );
    let mut rx = fx.layer.receiver().await.unwrap();
    let made_room = rx
        .receive(&["slow".to_owned()], WAIT)
        .await
        .unwrap()
        .expect("the message that filled the channel");
    assert_eq!(made_room.to_map().unwrap().get("n"), Some(&Value::from(1)));
    assert_eq!(next_text(&mut ch).await, "set");
    stop_worker(token, handle).await;
}

//! Taking a lapsed connection owner's sockets back, on a real redis-server: the waiting messages
//! move to the shared channels (receive and disconnect apart, send times kept), each
//! connection's ordering state is set to its lowest order moved, a socket with nothing moved is
//! set to the order it sends next, and nothing set once is set again by a later take-back.
//! Where owners cannot be (several shards), the layer says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use switchyard::codec;
use switchyard::layer::owner::owner_channel;
use switchyard::layer::{Layer, LayerSettings};
use switchyard::routing::asgi::{WebsocketDisconnect, WebsocketReceive};

use support::RedisServer;

fn frame(reply: &str, order: u64) -> Vec<u8> {
    codec::to_msgpack(&WebsocketReceive::text(
        reply,
        "/ws/relay/r/",
        order.to_string(),
        order,
    ))
    .unwrap()
}

fn disconnect(reply: &str, order: u64) -> Vec<u8> {
    codec::to_msgpack(&WebsocketDisconnect::new(
        reply,
        "/ws/relay/r/",
        1000,
        order,
    ))
    .unwrap()
}

fn next_of(redis: &RedisServer, reply: &str) -> Option<String> {
    redis.cmd(&[b"HGET", format!("asgi:order:{reply}").as_bytes(), b"next"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_back_moves_what_waits_and_sets_each_connection_once() {
    let redis = RedisServer::start();
    let layer = Layer::from_url(&redis.url(), LayerSettings::default())
        .await
        .unwrap();
    assert!(layer.supports_owners());
    let owner = "switchyard.owner.TestOwner1";
    let channel = owner_channel(owner);
    let (a, b, quiet) = ("s.a!1", "s.b!2", "s.c!3");
    for payload in [frame(a, 4), frame(b, 9), frame(a, 5), disconnect(a, 6)] {
        layer.send_encoded(&channel, &payload).await.unwrap();
    }
    // The connect's state, as the owner left it (never advanced while it owned the sockets).
    for reply in [a, b, quiet] {
        let _: () = redis.cmd(&[
            b"HSET",
            format!("asgi:order:{reply}").as_bytes(),
            b"next",
            b"1",
        ]);
    }

    assert_eq!(
        layer
            .take_back_owned(owner, Some((quiet, 12)))
            .await
            .unwrap(),
        4
    );
    let zcard = |key: &str| -> usize { redis.cmd(&[b"ZCARD", key.as_bytes()]) };
    assert_eq!(zcard(&format!("asgi{channel}")), 0);
    assert_eq!(zcard("asgiwebsocket.receive"), 3);
    assert_eq!(zcard("asgiwebsocket.disconnect"), 1);
    assert_eq!(next_of(&redis, a).as_deref(), Some("4"));
    assert_eq!(next_of(&redis, b).as_deref(), Some("9"));
    assert_eq!(next_of(&redis, quiet).as_deref(), Some("12"));

    // A later frame of `a` that reached the dead owner meanwhile moves too, but `a` stays at
    // 4 (its frames 4 and 5 still wait); `b` taking itself back at 10 changes nothing either.
    layer.send_encoded(&channel, &frame(a, 7)).await.unwrap();
    assert_eq!(
        layer.take_back_owned(owner, Some((b, 10))).await.unwrap(),
        1
    );
    assert_eq!(next_of(&redis, a).as_deref(), Some("4"));
    assert_eq!(next_of(&redis, b).as_deref(), Some("9"));
    assert_eq!(zcard("asgiwebsocket.receive"), 4);

    // The moved messages are the bytes that were sent, in send order.
    let mut receiver = layer.receiver().await.unwrap();
    let got = receiver
        .receive_many(
            &["websocket.receive".to_owned()],
            std::time::Duration::from_secs(1),
            10,
        )
        .await
        .unwrap();
    let payloads: Vec<Vec<u8>> = got.iter().map(|e| e.payload.to_vec()).collect();
    assert_eq!(
        payloads,
        [frame(a, 4), frame(b, 9), frame(a, 5), frame(a, 7)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_lease_is_alive_until_given_up_and_owners_need_one_server() {
    let redis = RedisServer::start();
    let layer = Layer::from_url(&redis.url(), LayerSettings::default())
        .await
        .unwrap();
    let lease = layer
        .start_owner()
        .await
        .unwrap()
        .expect("owners on one server");
    let name = lease.name().get().to_string();
    assert!(layer.owner_alive(&name).await.unwrap());
    assert!(!layer.owner_alive("switchyard.owner.Nobody").await.unwrap());
    lease.release().await;
    assert!(!layer.owner_alive(&name).await.unwrap());

    let other = RedisServer::start();
    let sharded = Layer::from_url(
        &format!("{},{}", redis.url(), other.url()),
        LayerSettings::default(),
    )
    .await
    .unwrap();
    assert!(!sharded.supports_owners());
    assert!(sharded.start_owner().await.unwrap().is_none());
}

//! Receiving over channels no single pop covers (two shards; the slots of a Redis Cluster): a
//! message on any of them is taken as soon as it arrives, and what a pop still in flight took
//! when its receiver was dropped goes back on its channel, not lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::{RedisCluster, RedisServer};
use switchyard::layer::{Layer, LayerSettings};

/// Two channel names for which `apart` holds (they live in different lanes).
fn two_lane_channels(apart: impl Fn(&str, &str) -> bool) -> (String, String) {
    let a = "lanes.0".to_owned();
    let b = (1..1000)
        .map(|i| format!("lanes.{i}"))
        .find(|b| apart(&a, b))
        .expect("two names in different lanes");
    (a, b)
}

async fn lanes_behave(layer: &Layer, peer: &Layer, (a, b): (String, String)) {
    let chans = vec![a.clone(), b.clone()];
    let mut rx = layer.receiver().await.unwrap();
    // Nothing waiting: a message sent while the receiver blocks on both lanes arrives at once.
    for target in [&a, &b] {
        let sender = peer.clone();
        let to = target.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            sender
                .send(&to, &serde_json::json!({"to": to}))
                .await
                .unwrap();
        });
        let asked = Instant::now();
        let got = rx
            .receive(&chans, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.channel, *target);
        // Taken within a blocking pop's reach, not after a turn of slices or the timeout.
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
    }
    // The last receive was answered by `b`'s lane while `a`'s pop stayed in flight (it
    // blocks up to 5 s): a message now sent to `a` is taken by that pop, for no one yet.
    // Dropping the receiver puts it back on `a`.
    peer.send(&a, &serde_json::json!({"n": 2})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        peer.channel_depth(&a).await.unwrap(),
        0,
        "the in-flight pop took it"
    );
    drop(rx);
    let mut other = peer.receiver().await.unwrap();
    let back = other
        .receive(std::slice::from_ref(&a), Duration::from_secs(10))
        .await
        .unwrap()
        .expect("the message the dropped receiver's pop took is back on its channel");
    assert_eq!(back.to_map().unwrap().get("n"), Some(&2.into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards() {
    let (r1, r2) = (RedisServer::start(), RedisServer::start());
    let url = format!("{},{}", r1.url(), r2.url());
    let layer = Layer::from_url(&url, LayerSettings::default())
        .await
        .unwrap();
    let peer = Layer::from_url(&url, LayerSettings::default())
        .await
        .unwrap();
    let Layer::Redis(redis) = &layer else {
        unreachable!()
    };
    let names = two_lane_channels(|a, b| redis.shard_of(a) != redis.shard_of(b));
    lanes_behave(&layer, &peer, names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slots() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
        .await
        .unwrap();
    let layer = Layer::from_url(&cluster.url(), LayerSettings::default())
        .await
        .unwrap();
    let peer = Layer::from_url(&cluster.url(), LayerSettings::default())
        .await
        .unwrap();
    let slot = |name: &str| redis::cluster_routing::Slot::for_key(format!("asgi{{{name}}}"));
    let names = two_lane_channels(|a, b| slot(a) != slot(b));
    lanes_behave(&layer, &peer, names).await;
}

//! How long an interface server takes to put its group memberships back after Redis lost its
//! data: starts its own `redis-server` on a free loopback port, holds N local channels in one
//! process inbox spread over G groups (joined the way a worker joins them), then `FLUSHALL`s
//! and times until every membership is back in Redis.
//!
//! `cargo run --release --example reassert_bench -- 10000 100000` (memberships per run; groups
//! default to one per 100 members, at least 1; `REASSERT_GROUPS` overrides).
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The repo's redis-server harness (free port, no persistence, killed on drop), as the worker
// bench uses it, so that how a test Redis starts is written once.
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use switchyard::layer::{Layer, LayerSettings};

async fn measure(members: usize) {
    let redis = support::RedisServer::start();
    let url = redis.url();
    let groups = std::env::var("REASSERT_GROUPS")
        .ok()
        .and_then(|g| g.parse().ok())
        .unwrap_or((members / 100).max(1));
    let layer = Layer::from_url(&url, LayerSettings::default())
        .await
        .unwrap();
    let inbox = layer.inbox("bench.reassert").await.unwrap();
    let channels: Vec<_> = (0..members).map(|_| inbox.new_channel()).collect();
    let joined = Instant::now();
    futures_util::stream::iter(channels.iter().enumerate())
        .for_each_concurrent(256, |(i, c)| {
            let layer = layer.clone();
            async move {
                layer
                    .group_add(&format!("room{}", i % groups), c.name())
                    .await
                    .unwrap();
            }
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while inbox.memberships() < members {
        assert!(
            Instant::now() < deadline,
            "the inbox never heard of every membership"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let join_time = joined.elapsed();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let count = |mut conn: redis::aio::MultiplexedConnection| async move {
        let mut pipe = redis::pipe();
        for g in 0..groups {
            pipe.cmd("ZCARD").arg(format!("asgi:group:room{g}"));
        }
        let counts: Vec<usize> = pipe.query_async(&mut conn).await.unwrap();
        counts.iter().sum::<usize>()
    };
    assert_eq!(count(conn.clone()).await, members);
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let flushed = Instant::now();
    let mut seen_reasserting = false;
    while count(conn.clone()).await < members {
        seen_reasserting |= inbox.reasserting();
        assert!(
            flushed.elapsed() < Duration::from_secs(120),
            "memberships were not put back within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let back = flushed.elapsed();
    println!(
        "{members} memberships in {groups} groups: joined in {:.2} s; after FLUSHALL all back in {:.3} s (lease renewal every 1 s, so up to 1 s of that is waiting for the renewal; reasserting seen: {seen_reasserting})",
        join_time.as_secs_f64(),
        back.as_secs_f64()
    );
    drop(channels);
    inbox.shutdown(Duration::from_secs(5)).await;
}

#[tokio::main]
async fn main() {
    // The inbox logs how long putting the memberships back took ("elapsed").
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .init();
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    for members in if sizes.is_empty() {
        vec![10_000, 100_000]
    } else {
        sizes
    } {
        measure(members).await;
    }
}

//! A measurement, not a check (speed is never asserted): echo throughput of one worker process
//! on each layer, with and without strict ordering. Run with `cargo bench --bench worker`
//! (it starts its own redis-server on 127.0.0.1); without `--bench` it only says so and exits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{Backend, Fixture};
use switchyard::layer::LayerSettings;
use switchyard::routing::asgi::WebsocketReceive;
use switchyard::routing::{ConsumerError, Ctx, Message, Router, route};
use switchyard::worker::Worker;
use tokio_util::sync::CancellationToken;

fn messages() -> u64 {
    std::env::var("SWITCHYARD_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

async fn echo(m: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    ctx.send_text(m.text().unwrap_or_default().to_owned())
}

async fn measure(backend: Backend, concurrency: usize, strict: bool) {
    let settings = LayerSettings {
        capacity: 1_000_000,
        local_buffer: Some(1_000_000),
        ..LayerSettings::default()
    };
    let fx = Fixture::new(backend, settings).await;
    let mut r = route("websocket.receive", echo);
    if strict {
        r = r.strict_ordering();
    }
    let router = Arc::new(Router::new([r]).unwrap());
    let worker = Worker::new(fx.layer.clone(), router).concurrency(concurrency);
    let metrics = worker.metrics();
    let inbox = fx.layer.inbox("bench").await.unwrap();
    let mut ch = inbox.new_channel();
    for i in 0..messages() {
        fx.layer
            .send(
                "websocket.receive",
                &WebsocketReceive::text(ch.name(), "/", "x", i),
            )
            .await
            .unwrap();
    }
    let token = CancellationToken::new();
    let started = Instant::now();
    let handle = tokio::spawn(worker.run(token.clone()));
    for got in 0..messages() {
        if ch.recv_timeout(Duration::from_secs(30)).await.is_none() {
            let s = metrics.snapshot();
            let total = messages();
            panic!("reply {got} of {total} never came (strict {strict}): {s:?}");
        }
    }
    let elapsed = started.elapsed();
    token.cancel();
    handle.await.unwrap().unwrap();
    let s = metrics.snapshot();
    eprintln!(
        "{backend:?} concurrency {concurrency} strict {strict}: {} echoes in {elapsed:?} = {:.0} msg/s, mean handling {:.0} µs",
        messages(),
        messages() as f64 / elapsed.as_secs_f64(),
        s.latency_sum_us as f64 / s.consumed.max(1) as f64
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("worker bench: run it with `cargo bench --bench worker`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for backend in [Backend::Memory, Backend::Redis] {
            for concurrency in [1, 8] {
                measure(backend, concurrency, false).await;
            }
            measure(backend, 8, true).await;
        }
    });
}

//! Idle memory per WebSocket: runs the interface server (in-memory layer, a worker that accepts
//! every socket) in this process, opens N idle sockets from a child process (this same binary in
//! client mode, so the clients' memory is not counted), and prints the server's RSS delta per
//! socket once all N are open and quiet.
//!
//! ```text
//! cargo run --release --example idle_bench -- 10000
//! ```

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use switchyard::asgi::{WEBSOCKET_CONNECT, WebsocketConnect, WebsocketSend};
use switchyard::layer::{Layer, LayerSettings};
use switchyard::server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--clients") {
        let url = args.get(2).context("url")?.clone();
        let n: usize = args.get(3).context("count")?.parse()?;
        return clients(&url, n).await;
    }
    let n: usize = args.get(1).map_or(Ok(10_000), |s| s.parse())?;
    let settings = LayerSettings {
        capacity: 10_000,
        ..LayerSettings::default()
    };
    let layer = Layer::from_url("memory://", settings).await?;
    let server = Server::bind(ServerConfig {
        bind: "127.0.0.1:0".parse()?,
        max_connections: n + 100,
        ..ServerConfig::default()
    })
    .await?;
    let addr = server.local_addr();
    let metrics = server.metrics();
    let shutdown = CancellationToken::new();
    tokio::spawn(accept_worker(layer.clone(), shutdown.clone()));
    tokio::spawn(server.serve(layer, shutdown.clone()));

    // Warm up: one socket through every code path, so one-off allocations are not counted.
    run_clients(&format!("ws://{addr}/warmup"), 10)?.wait()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes()?;

    let mut child = run_clients(&format!("ws://{addr}/idle"), n)?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::task::spawn_blocking(move || lines.next())
        .await?
        .context("client process ended early")??;
    if line.trim() != format!("connected {n}") {
        bail!("client process said {line:?}");
    }
    while metrics.snapshot().open_websockets < n as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_bytes()?;
    let delta = after.saturating_sub(before);
    println!(
        "{n} idle WebSockets: server RSS {} KiB -> {} KiB, delta {} KiB, {} bytes per socket",
        before / 1024,
        after / 1024,
        delta / 1024,
        delta / n as u64
    );
    child.kill()?;
    child.wait()?;
    shutdown.cancel();
    Ok(())
}

fn run_clients(url: &str, n: usize) -> anyhow::Result<std::process::Child> {
    Ok(Command::new(std::env::current_exe()?)
        .args(["--clients", url, &n.to_string()])
        .stdout(Stdio::piped())
        .spawn()?)
}

/// Client mode: opens `n` sockets (100 handshakes at a time), says so, and holds them until
/// killed (the warm-up run closes them and exits).
async fn clients(url: &str, n: usize) -> anyhow::Result<()> {
    let mut sockets = Vec::with_capacity(n);
    let mut pending = futures_util::stream::iter(0..n)
        .map(|_| tokio_tungstenite::connect_async(url.to_owned()))
        .buffer_unordered(100);
    while let Some(result) = pending.next().await {
        sockets.push(result.context("connect")?.0);
    }
    println!("connected {n}");
    if url.ends_with("/warmup") {
        for mut ws in sockets {
            let _ = ws.close(None).await;
        }
        return Ok(());
    }
    // Keep reading so pings are answered, without holding more than the sockets.
    let readers = sockets
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { while ws.next().await.is_some() {} }));
    futures_util::future::join_all(readers).await;
    Ok(())
}

async fn accept_worker(layer: Layer, stop: CancellationToken) -> anyhow::Result<()> {
    let mut receiver = layer.receiver().await?;
    let channels = [WEBSOCKET_CONNECT.to_owned()];
    while !stop.is_cancelled() {
        if let Some(e) = receiver.receive(&channels, Duration::from_secs(1)).await? {
            let m: WebsocketConnect = e.decode()?;
            layer
                .send(&m.reply_channel, &WebsocketSend::accept())
                .await?;
        }
    }
    Ok(())
}

/// Resident set size of this process, from /proc/self/statm.
fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm.split_whitespace().nth(1).context("statm")?.parse()?;
    Ok(pages * 4096)
}

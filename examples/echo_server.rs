//! An interface server plus a tiny raw-layer echo worker in one process: every WebSocket is
//! accepted and every frame echoed unchanged (text as text, binary as binary) through the channel
//! layer; HTTP requests get `200 echo: <path>`. The Autobahn script runs against it.
//!
//! ```text
//! cargo run --example echo_server -- [LAYER_URL] [ADDR]
//! cargo run --example echo_server -- memory:// 127.0.0.1:9001
//! ```
//!
//! Limits are raised for conformance runs (Autobahn sends 16 MiB messages and bursts of a
//! thousand frames): 32 MiB frames and messages, and deep queues.

use std::time::Duration;

use anyhow::Context;
use switchyard::asgi::{
    HTTP_REQUEST, HttpRequest, HttpResponse, WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT,
    WEBSOCKET_RECEIVE, WebsocketConnect, WebsocketReceive, WebsocketSend,
};
use switchyard::layer::{Layer, LayerError, LayerSettings};
use switchyard::server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "memory://".to_owned());
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9001".to_owned());
    let settings = LayerSettings {
        capacity: 10_000,
        local_buffer: Some(10_000),
        ..LayerSettings::default()
    };
    let layer = Layer::from_url(&url, settings).await?;
    let config = ServerConfig {
        bind: addr.parse().context("ADDR must look like 127.0.0.1:9001")?,
        ws_max_frame_size: 32 << 20,
        ws_max_message_size: 32 << 20,
        outbound_queue: 10_000,
        ..ServerConfig::default()
    };
    let server = Server::bind(config).await?;
    println!("echo server on ws://{} (layer {url})", server.local_addr());
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(echo_worker(layer.clone(), shutdown.clone()));
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        signal.cancel();
    });
    server.serve(layer, shutdown.clone()).await?;
    shutdown.cancel();
    worker.await??;
    Ok(())
}

/// Receives connects, frames and HTTP requests, and answers each on its reply channel.
async fn echo_worker(layer: Layer, stop: CancellationToken) -> anyhow::Result<()> {
    let mut receiver = layer.receiver().await?;
    let channels = [
        WEBSOCKET_CONNECT,
        WEBSOCKET_RECEIVE,
        WEBSOCKET_DISCONNECT,
        HTTP_REQUEST,
    ]
    .map(str::to_owned);
    // Checked between receives only: a receive dropped mid-flight would lose its message.
    while !stop.is_cancelled() {
        let envelope = match receiver.receive(&channels, Duration::from_secs(1)).await {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "receive failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let result = match envelope.channel.as_str() {
            WEBSOCKET_CONNECT => {
                let m: WebsocketConnect = envelope.decode()?;
                reply(&layer, &m.reply_channel, &WebsocketSend::accept()).await
            }
            WEBSOCKET_RECEIVE => {
                let m: WebsocketReceive = envelope.decode()?;
                let echo = match (m.text, m.bytes) {
                    (Some(text), _) => WebsocketSend::text(text),
                    (None, Some(bytes)) => WebsocketSend::bytes(bytes),
                    (None, None) => continue,
                };
                reply(&layer, &m.reply_channel, &echo).await
            }
            HTTP_REQUEST => {
                let m: HttpRequest = envelope.decode()?;
                let body = format!("echo: {}\n", m.path);
                let response = HttpResponse::new(
                    200,
                    vec![("content-type".into(), "text/plain".into())],
                    body.as_bytes(),
                );
                reply(&layer, &m.reply_channel, &response).await
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "reply not sent");
        }
    }
    Ok(())
}

/// Sends a reply, waiting while the reply channel is full ("wait and try again", ASGI 1.0).
async fn reply<M: serde::Serialize>(
    layer: &Layer,
    channel: &str,
    message: &M,
) -> Result<(), LayerError> {
    let mut tries = 0;
    loop {
        match layer.send(channel, message).await {
            Err(e) if e.is_full() && tries < 200 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => return other,
        }
    }
}

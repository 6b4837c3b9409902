//! A custom app in one file: a class-style room consumer and a background-task consumer, routed,
//! then run as `dev` does (interface server and worker in one process on the in-memory layer).
//!
//! ```sh
//! cargo run --example custom_app            # then: websocat ws://127.0.0.1:8001/ws/room/lobby/
//! ```

use std::sync::Arc;

use switchyard::layer::{Layer, LayerSettings};
use switchyard::routing::asgi::WebsocketSend;
use switchyard::routing::{
    ConsumerError, Ctx, Kwargs, Message, RouteError, Router, WebsocketConsumer, route, route_class,
};
use switchyard::server::{Server, ServerConfig};
use switchyard::worker::Worker;
use tokio_util::sync::CancellationToken;

struct Room;

impl WebsocketConsumer for Room {
    fn groups(&self, kw: &Kwargs) -> Vec<String> {
        vec![format!("room-{}", kw["name"])] // joined on connect, left on disconnect
    }
    async fn receive(&self, msg: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        let text = msg.text().unwrap_or_default();
        ctx.group_send(
            &format!("room-{}", ctx.kwarg("name")),
            &WebsocketSend::text(text),
        )
    }
}

async fn thumbnail(msg: Message, _ctx: Ctx) -> Result<(), ConsumerError> {
    tracing::info!(id = ?msg.get("id"), "making a thumbnail");
    Ok(())
}

fn routes() -> Result<Router, RouteError> {
    Router::new([
        route_class(Room).path(r"^/ws/room/(?P<name>[a-z0-9-]+)/$"),
        route("thumbnails", thumbnail), // switchyard send thumbnails '{"id": 7}'
    ])
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let layer = Layer::from_url("memory://", LayerSettings::default()).await?;
    let token = CancellationToken::new();
    let worker = Worker::new(layer.clone(), Arc::new(routes()?));
    let worker_token = token.clone();
    tokio::spawn(async move { worker.run(worker_token).await });
    let config = ServerConfig {
        bind: "127.0.0.1:8001".parse()?,
        ..ServerConfig::default()
    };
    let server = Server::bind(config).await?;
    println!("listening on ws://{}/ws/room/<name>/", server.local_addr());
    let ctrl_c = token.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        ctrl_c.cancel();
    });
    server.serve(layer, token).await?;
    Ok(())
}

//! An app of its own on Switchyard: chat rooms on `/ws/room/<name>/`, a page on `/`, and a
//! `thumbnails` task channel whose consumer tells the room when a job is done. The binary is
//! the standard command line on these routes:
//!
//! ```sh
//! cargo run -p switchyard-example-rooms -- dev                       # one process, in memory
//! cargo run -p switchyard-example-rooms -- serve                     # with Redis: the web process
//! cargo run -p switchyard-example-rooms -- worker                    # and as many workers as you like
//! cargo run -p switchyard-example-rooms -- send thumbnails '{"id": 7, "room": "lobby"}'
//! ```

use std::process::ExitCode;

use switchyard::layer::Layer;
use switchyard::routing::asgi::{HttpResponse, WebsocketSend};
use switchyard::routing::{
    ByteString, ConsumerError, Ctx, Kwargs, Message, RouteError, Router, WebsocketConsumer, route,
    route_class,
};

const PAGE: &str = "<!doctype html><title>rooms</title>\
<p>Open a WebSocket to <code>/ws/room/&lt;name&gt;/</code>: every frame goes to everyone in the room.</p>";

/// A chat room: every member's frames go to every member, in the order each member sent them.
struct Room;

impl WebsocketConsumer for Room {
    fn groups(&self, kw: &Kwargs) -> Vec<String> {
        vec![room_group(&kw["name"])] // joined on connect, left on disconnect
    }

    fn strict_ordering(&self) -> bool {
        true
    }

    async fn receive(&self, msg: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        let text = msg.text().unwrap_or_default();
        ctx.group_send(&room_group(ctx.kwarg("name")), &WebsocketSend::text(text))
    }
}

fn room_group(name: &str) -> String {
    format!("room-{name}")
}

/// `GET /`
async fn page(_msg: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    let headers = vec![(
        ByteString::from("content-type"),
        ByteString::from("text/html; charset=utf-8"),
    )];
    ctx.reply(&HttpResponse::new(200, headers, PAGE.as_bytes()))
}

/// A background job: `{"id": 7, "room": "lobby"}` on `thumbnails`; the room hears when it is done.
async fn thumbnail(msg: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    let id = msg.get("id").and_then(|v| v.as_i64()).unwrap_or_default();
    tracing::info!(id, "making a thumbnail");
    match msg.get_str("room") {
        Some(room) => ctx.group_send(
            &room_group(room),
            &WebsocketSend::text(format!("thumbnail {id} ready")),
        ),
        None => Ok(()),
    }
}

/// The app's routes (the layer is there for consumers that keep state in it; these do not).
fn routes(_layer: Layer) -> Result<Router, RouteError> {
    Router::new([
        route_class(Room).path(r"^/ws/room/(?P<name>[a-z0-9-]{1,50})/$"),
        route("http.request", page)
            .path("^/$")
            .method("^(?:GET|HEAD)$"),
        route("thumbnails", thumbnail),
    ])
}

fn main() -> ExitCode {
    switchyard::run::App::new(routes)
        .name("rooms")
        .version(env!("CARGO_PKG_VERSION"))
        .main()
}

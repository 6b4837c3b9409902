//! The reference consumers the `switchyard` binary serves, and their routing: the chat rooms
//! (pages over HTTP through the layer, sockets on `/ws/chat/<room>/`), `/ws/echo/`,
//! `/ws/relay/<room>/` (and `/ws/relay-unordered/<room>/`, the same without per-connection
//! order), and the background-job demo on the task channel `jobs.digest`. Chat and relay keep
//! each socket's messages in the order sent, with any number of workers.
//!
//! Room `<room>` is the group `chat-<room>`, so anything sharing the layer (another worker,
//! `switchyard send --group`, Django's `group_send`) can broadcast into it.

pub mod chat;
pub mod echo;
pub mod jobs;
pub mod pages;
pub mod time;

use std::sync::Arc;

use switchyard::layer::Layer;
use switchyard_routing::asgi::{
    HTTP_DISCONNECT, HTTP_REQUEST, WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT, WEBSOCKET_RECEIVE,
};
use switchyard_routing::consumer::{ConsumerError, Ctx};
use switchyard_routing::router::{RouteError, Router, route};
use switchyard_routing::{Message, csrf_protect, route_class};

/// Room names: what the chat URL accepts (and what fits in a group name).
pub const ROOM_PATTERN: &str = "[A-Za-z0-9_-]{1,50}";

/// The app's routes. Consumers that keep app data (chat history, room list) use `layer`.
pub fn routes(layer: Layer) -> Result<Router, RouteError> {
    let store = Arc::new(chat::ChatStore::new(layer.clone()));
    Router::new([
        // Pages and the job form, through the layer like any Channels 1 HTTP consumer.
        route(HTTP_REQUEST, pages::index)
            .path("^/$")
            .method("^(?:GET|HEAD)$"),
        route(HTTP_REQUEST, pages::chat_page)
            .path(&format!("^/chat/{ROOM_PATTERN}/$"))
            .method("^(?:GET|HEAD)$"),
        route(HTTP_REQUEST, pages::jobs_page)
            .path("^/jobs/$")
            .method("^(?:GET|HEAD)$"),
        // State-changing: a cross-origin post (a form on another site) gets 403.
        route(HTTP_REQUEST, csrf_protect(jobs::start))
            .path("^/jobs/$")
            .method("^POST$"),
        route(HTTP_REQUEST, pages::asset)
            .path("^/static/(?P<file>[a-z]+\\.(?:css|js))$")
            .method("^(?:GET|HEAD)$"),
        {
            let store = Arc::clone(&store);
            route(HTTP_REQUEST, move |m: Message, ctx: Ctx| {
                let store = Arc::clone(&store);
                async move { pages::rooms(&store, &m, &ctx).await }
            })
            .path("^/api/rooms$")
        },
        {
            let layer = layer.clone();
            route(HTTP_REQUEST, move |m: Message, ctx: Ctx| {
                let layer = layer.clone();
                async move { pages::dead_jobs(&layer, &m, &ctx).await }
            })
            .path("^/api/jobs/dead$")
            .method("^(?:GET|HEAD)$")
        },
        route(HTTP_REQUEST, pages::not_found),
        route(HTTP_DISCONNECT, ignore),
        // Sockets.
        route_class(chat::ChatRoom::new(Arc::clone(&store)))
            .path(&format!("^/ws/chat/(?P<room>{ROOM_PATTERN})/$")),
        route(WEBSOCKET_CONNECT, echo::accept).path("^/ws/echo/$"),
        route(WEBSOCKET_RECEIVE, echo::echo).path("^/ws/echo/$"),
        route(WEBSOCKET_DISCONNECT, ignore).path("^/ws/echo/$"),
        route_class(echo::Relay::default()).path("^/ws/relay/(?P<room>[A-Za-z0-9_-]{1,80})/$"),
        route_class(echo::Relay::unordered())
            .path("^/ws/relay-unordered/(?P<room>[A-Za-z0-9_-]{1,80})/$"),
        route_class(jobs::JobSocket).path("^/ws/jobs/(?P<ticket>[A-Za-z0-9-]{8,64})/$"),
        route(jobs::JOB_CHANNEL, jobs::digest),
        // Durable on Redis; `dev`'s in-memory layer has no durable channels.
        if matches!(layer, Layer::Redis(_)) {
            route(jobs::DURABLE_CHANNEL, jobs::digest).durable(jobs::durable_policy())
        } else {
            route(jobs::DURABLE_CHANNEL, jobs::digest)
        },
        // Anything else: refuse unknown socket paths (403), consume the rest.
        route(WEBSOCKET_CONNECT, deny),
        route(WEBSOCKET_RECEIVE, ignore),
        route(WEBSOCKET_DISCONNECT, ignore),
    ])
}

async fn ignore(_message: Message, _ctx: Ctx) -> Result<(), ConsumerError> {
    Ok(())
}

async fn deny(_message: Message, _ctx: Ctx) -> Result<(), ConsumerError> {
    Err(ConsumerError::DenyConnection)
}

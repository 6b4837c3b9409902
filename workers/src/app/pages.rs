//! The HTTP side of the reference app: the room list, the chat and job pages, their CSS and JS
//! (compiled into the binary, no build step), the JSON room list, and a 404 for everything else.
//! Served by workers through the layer, as Channels 1 served Django views.

use switchyard_routing::asgi::{Header, HttpResponse};
use switchyard_routing::{ByteString, ConsumerError, Ctx, Message};

use super::chat::ChatStore;

const INDEX_HTML: &str = include_str!("../../static/index.html");
const CHAT_HTML: &str = include_str!("../../static/chat.html");
const JOBS_HTML: &str = include_str!("../../static/jobs.html");
const STYLE_CSS: &str = include_str!("../../static/style.css");
const CHAT_JS: &str = include_str!("../../static/chat.js");
const JOBS_JS: &str = include_str!("../../static/jobs.js");

fn header(name: &str, value: &str) -> Header {
    (ByteString::from(name), ByteString::from(value))
}

/// Replies with `status`, a content type and a body (no body for HEAD).
pub fn respond(
    message: &Message,
    ctx: &Ctx,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> Result<(), ConsumerError> {
    let headers = vec![
        header("content-type", content_type),
        header("cache-control", "no-cache"),
        header("x-content-type-options", "nosniff"),
    ];
    let body = if message.get_str("method") == Some("HEAD") {
        &b""[..]
    } else {
        body
    };
    ctx.reply(&HttpResponse::new(status, headers, body))
}

/// `GET /`
pub async fn index(message: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    respond(
        &message,
        &ctx,
        200,
        "text/html; charset=utf-8",
        INDEX_HTML.as_bytes(),
    )
}

/// `GET /chat/<room>/` (the page reads the room from its own URL).
pub async fn chat_page(message: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    respond(
        &message,
        &ctx,
        200,
        "text/html; charset=utf-8",
        CHAT_HTML.as_bytes(),
    )
}

/// `GET /jobs/`
pub async fn jobs_page(message: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    respond(
        &message,
        &ctx,
        200,
        "text/html; charset=utf-8",
        JOBS_HTML.as_bytes(),
    )
}

/// `GET /static/<file>`
pub async fn asset(message: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    let (content_type, body) = match ctx.kwarg("file") {
        "style.css" => ("text/css; charset=utf-8", STYLE_CSS),
        "chat.js" => ("text/javascript; charset=utf-8", CHAT_JS),
        "jobs.js" => ("text/javascript; charset=utf-8", JOBS_JS),
        _ => return not_found(message, ctx).await,
    };
    respond(&message, &ctx, 200, content_type, body.as_bytes())
}

/// `GET /api/rooms`: the most recently active rooms, as a JSON list of names.
pub async fn rooms(store: &ChatStore, message: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
    let rooms = store.recent_rooms(50).await.map_err(ConsumerError::other)?;
    let body = serde_json::to_vec(&rooms).map_err(ConsumerError::other)?;
    respond(message, ctx, 200, "application/json", &body)
}

/// `GET /api/jobs/dead`: the dead letters of the durable job channel, as JSON (an empty list on
/// the in-memory layer, which has no durable channels).
pub async fn dead_jobs(
    layer: &switchyard::layer::Layer,
    message: &Message,
    ctx: &Ctx,
) -> Result<(), ConsumerError> {
    let dead = match layer {
        switchyard::layer::Layer::Redis(r) => r
            .dead_list(super::jobs::DURABLE_CHANNEL, 100)
            .await
            .map_err(ConsumerError::other)?,
        _ => Vec::new(),
    };
    let body = serde_json::to_vec(&dead).map_err(ConsumerError::other)?;
    respond(message, ctx, 200, "application/json", &body)
}

/// Anything not routed above.
pub async fn not_found(message: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    respond(
        &message,
        &ctx,
        404,
        "text/plain; charset=utf-8",
        b"not found\n",
    )
}

//! Chat rooms, the classic Channels demo: a socket on `/ws/chat/<room>/` joins the group
//! `chat-<room>`, gets the room's last 50 messages, and every `{"handle", "message"}` it sends is
//! stamped with the server time, kept in the room's history and broadcast to the room.
//!
//! History and the list of active rooms live in the channel layer (Redis, or memory under `dev`)
//! as app data, so any worker can serve any socket. The consumer keeps strict per-connection
//! order, so a sender's messages are broadcast and kept in the history in the order sent.
//!
//! A signed-in visitor writes under their own name, whatever handle the page sends: the name of
//! a token verified by the interface server (`user`: its `name` claim, else `sub`), else that of
//! the Django session of the handshake's `sessionid` cookie (the session's `username` or `name`
//! key, which a Django project sets at login, else `user <id>`). The history frame says who the
//! socket is (`"you"`, null when anonymous).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::layer::{Layer, LayerError};
use switchyard_routing::asgi::WebsocketSend;
use switchyard_routing::{ConsumerError, Ctx, Kwargs, Message, WebsocketConsumer};

use super::time::now_rfc3339;

/// Messages kept per room.
pub const HISTORY: usize = 50;
/// Longest handle, in characters.
pub const MAX_HANDLE: usize = 32;
/// Longest message, in characters.
pub const MAX_MESSAGE: usize = 2000;
/// A room's history and its place in the room list lapse after this long without messages.
const RETAIN: Duration = Duration::from_secs(7 * 86_400);
const ROOMS_INDEX: &str = "chat-rooms";
/// Rooms the active-room list remembers (the most recently used).
const ROOMS_KEPT: usize = 200;

/// The group a room broadcasts to.
pub fn group_of(room: &str) -> String {
    format!("chat-{room}")
}

/// One chat message as stored and as sent to browsers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Always `"message"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The room.
    pub room: String,
    /// Who wrote it.
    pub handle: String,
    /// What they wrote (plain text; the page inserts it as text).
    pub message: String,
    /// Server time, RFC 3339 UTC.
    pub ts: String,
}

/// What a browser sends (a signed-in visitor's handle is ignored, and may be left out).
#[derive(Debug, Deserialize)]
struct Incoming {
    #[serde(default)]
    handle: String,
    message: String,
}

/// The name a signed-in visitor writes under: the edge-verified token first, then the Django
/// session; `None` when anonymous. At most [`MAX_HANDLE`] characters.
pub fn signed_in_name(message: &Message, ctx: &Ctx) -> Option<String> {
    let text = |v: &switchyard_routing::Value| v.as_str().map(str::to_owned);
    let name = if let Some(user) = message.user() {
        user.get("name")
            .and_then(text)
            .or_else(|| user.get("sub").and_then(text))
    } else {
        let session = ctx.http_session()?;
        let id = session.user_id()?;
        Some(
            ["username", "name"]
                .iter()
                .find_map(|k| session.data.get(*k).and_then(|v| v.as_str()))
                .map_or_else(|| format!("user {id}"), str::to_owned),
        )
    }?;
    let name: String = name.trim().chars().take(MAX_HANDLE).collect();
    (!name.is_empty()).then_some(name)
}

/// Room history and the active-room list, in the channel layer.
#[derive(Debug, Clone)]
pub struct ChatStore {
    layer: Layer,
}

impl ChatStore {
    /// A store on `layer`.
    pub fn new(layer: Layer) -> Self {
        ChatStore { layer }
    }

    fn history_key(room: &str) -> String {
        format!("chat-history.{room}")
    }

    /// Appends to a room's history and marks the room active (only rooms where someone spoke
    /// are listed, so opening sockets to made-up rooms cannot fill the list).
    pub async fn record(&self, message: &ChatMessage) -> Result<(), LayerError> {
        let json = serde_json::to_vec(message).map_err(|e| LayerError::Protocol(e.to_string()))?;
        self.layer
            .list_push(&Self::history_key(&message.room), &json, HISTORY, RETAIN)
            .await?;
        self.layer
            .index_touch(ROOMS_INDEX, &message.room, ROOMS_KEPT, RETAIN)
            .await
    }

    /// A room's last messages, oldest first (entries that do not parse are skipped).
    pub async fn history(&self, room: &str) -> Result<Vec<ChatMessage>, LayerError> {
        let items = self.layer.list_items(&Self::history_key(room)).await?;
        Ok(items
            .iter()
            .filter_map(|b| serde_json::from_slice(b).ok())
            .collect())
    }

    /// The most recently active rooms.
    pub async fn recent_rooms(&self, limit: usize) -> Result<Vec<String>, LayerError> {
        self.layer.index_recent(ROOMS_INDEX, limit).await
    }
}

/// The chat socket consumer.
#[derive(Debug)]
pub struct ChatRoom {
    store: std::sync::Arc<ChatStore>,
}

impl ChatRoom {
    /// A consumer keeping its data in `store`.
    pub fn new(store: std::sync::Arc<ChatStore>) -> Self {
        ChatRoom { store }
    }
}

fn error_frame(ctx: &Ctx, error: &str) -> Result<(), ConsumerError> {
    ctx.send_json(&serde_json::json!({"type": "error", "error": error}))
}

/// Checks and normalises what a browser sent: the handle trimmed, both non-empty and bounded.
fn validate(incoming: Incoming) -> Result<(String, String), &'static str> {
    let handle = incoming.handle.trim().to_owned();
    if handle.is_empty() {
        return Err("a handle is required");
    }
    if handle.chars().count() > MAX_HANDLE {
        return Err("the handle is too long (32 characters at most)");
    }
    if incoming.message.trim().is_empty() {
        return Err("the message is empty");
    }
    if incoming.message.chars().count() > MAX_MESSAGE {
        return Err("the message is too long (2000 characters at most)");
    }
    Ok((handle, incoming.message))
}

impl WebsocketConsumer for ChatRoom {
    /// A socket's messages run one after the other, whichever worker takes them: each is
    /// recorded and broadcast before the next, so the room and its history see them in the
    /// order sent.
    fn strict_ordering(&self) -> bool {
        true
    }

    // The Django session of the handshake, remembered in the channel session for the frames.
    fn http_session(&self) -> bool {
        true
    }

    fn channel_session(&self) -> bool {
        true
    }

    fn groups(&self, kwargs: &Kwargs) -> Vec<String> {
        kwargs
            .get("room")
            .map(|r| vec![group_of(r)])
            .unwrap_or_default()
    }

    async fn connect(&self, message: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        let room = ctx.kwarg("room").to_owned();
        let you = signed_in_name(message, ctx);
        ctx.accept()?;
        let history = self
            .store
            .history(&room)
            .await
            .map_err(ConsumerError::other)?;
        ctx.send_json(
            &serde_json::json!({"type": "history", "room": room, "you": you, "messages": history}),
        )
    }

    async fn receive(&self, message: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        let Some(text) = message.text() else {
            return error_frame(
                ctx,
                "send JSON text frames: {\"handle\": ..., \"message\": ...}",
            );
        };
        let incoming: Incoming = match serde_json::from_str(text) {
            Ok(i) => i,
            Err(_) => {
                return error_frame(
                    ctx,
                    "send JSON text frames: {\"handle\": ..., \"message\": ...}",
                );
            }
        };
        let mut incoming = incoming;
        if let Some(name) = signed_in_name(message, ctx) {
            incoming.handle = name;
        }
        let (handle, body) = match validate(incoming) {
            Ok(v) => v,
            Err(e) => return error_frame(ctx, e),
        };
        let room = ctx.kwarg("room").to_owned();
        let chat = ChatMessage {
            kind: "message".into(),
            room: room.clone(),
            handle,
            message: body,
            ts: now_rfc3339(),
        };
        self.store
            .record(&chat)
            .await
            .map_err(ConsumerError::other)?;
        let frame = serde_json::to_string(&chat).map_err(ConsumerError::other)?;
        ctx.group_send(&group_of(&room), &WebsocketSend::text(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = |h: &str, m: &str| {
            validate(Incoming {
                handle: h.into(),
                message: m.into(),
            })
        };
        assert_eq!(ok("  ann ", "hi <b>"), Ok(("ann".into(), "hi <b>".into())));
        assert!(ok("", "x").is_err());
        assert!(ok("a", "   ").is_err());
        assert!(ok(&"h".repeat(33), "x").is_err());
        assert!(ok("a", &"é".repeat(2001)).is_err());
        assert!(ok("a", &"é".repeat(2000)).is_ok());
    }
}

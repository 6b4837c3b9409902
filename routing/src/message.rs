//! [`Message`]: one message as a consumer sees it — the channel it came on, its content as an
//! ordered map, and the msgpack bytes it was read as (so typed decoding needs no re-encoding and
//! a requeue sends the same bytes).

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, CodecError};
use crate::value::{Map, Value};

/// The layer's key naming a `!` message's target; never shown to consumers.
const TARGET_KEY: &str = "__asgi_channel__";

/// A message read from a channel.
#[derive(Debug, Clone)]
pub struct Message {
    /// The channel it was read from (`websocket.receive`, `thumbnails`, …): the message type.
    pub channel: String,
    /// The decoded content, in the order it was written.
    pub content: Map,
    /// The msgpack map as read (typed decoding and requeues use these bytes).
    pub payload: Bytes,
}

impl Message {
    /// A message from the stored msgpack bytes.
    pub fn from_payload(channel: impl Into<String>, payload: Bytes) -> Result<Self, CodecError> {
        let mut content: Map = codec::from_msgpack(&payload)?;
        content.remove(TARGET_KEY);
        Ok(Message {
            channel: channel.into(),
            content,
            payload,
        })
    }

    /// A message from anything that serializes to a map (tests, the test client).
    pub fn new<M: Serialize + ?Sized>(
        channel: impl Into<String>,
        content: &M,
    ) -> Result<Self, CodecError> {
        let payload = Bytes::from(codec::to_msgpack(content)?);
        Self::from_payload(channel, payload)
    }

    /// A content key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.get(key)
    }

    /// A string content key.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.content.get_str(key)
    }

    /// The connection's reply channel, when the message has one.
    pub fn reply_channel(&self) -> Option<&str> {
        self.get_str("reply_channel")
    }

    /// `text` of a WebSocket frame.
    pub fn text(&self) -> Option<&str> {
        self.get_str("text")
    }

    /// `bytes` of a WebSocket frame.
    pub fn bytes(&self) -> Option<&[u8]> {
        self.get("bytes").and_then(Value::as_bytes)
    }

    /// `user`: who the interface server authenticated (a verified token's `sub` and configured
    /// claims), on `http.request`, `websocket.connect` and `websocket.receive`; `None` when
    /// anonymous. Only the server sets it, so a consumer can trust it.
    pub fn user(&self) -> Option<&crate::Map> {
        match self.get("user") {
            Some(crate::Value::Map(user)) => Some(user),
            _ => None,
        }
    }

    /// `path` of an HTTP request or WebSocket event.
    pub fn path(&self) -> Option<&str> {
        self.get_str("path")
    }

    /// `order` of a WebSocket event (connect 0, frames 1.., disconnect last).
    pub fn order(&self) -> Option<u64> {
        self.get("order")
            .and_then(Value::as_i64)
            .and_then(|o| u64::try_from(o).ok())
    }

    /// How many times the message was requeued by `ConsumeLater` (`__retries__`).
    pub fn retries(&self) -> u32 {
        self.get("__retries__")
            .and_then(Value::as_i64)
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or(0)
    }

    /// For a message of a durable channel, which run this is (1 for the first; retries and runs
    /// after a worker was lost count up). `None` on at-most-once channels.
    pub fn attempt(&self) -> Option<u32> {
        self.get(crate::durable::ATTEMPT_KEY)
            .and_then(Value::as_i64)
            .and_then(|a| u32::try_from(a).ok())
    }

    /// For a message of a durable channel, its id: the same on every attempt, so a consumer can
    /// make its effects idempotent. `None` on at-most-once channels.
    pub fn job_id(&self) -> Option<&str> {
        self.get(crate::durable::JOB_ID_KEY).and_then(Value::as_str)
    }

    /// Decodes the content into a typed message (an `asgi` struct or your own).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        codec::from_msgpack(&self.payload)
    }

    /// A field as text for routing filters: a string, or UTF-8 bytes.
    pub(crate) fn field_text(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            Value::Bytes(b) => std::str::from_utf8(b.as_slice()).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asgi::WebsocketReceive;

    #[test]
    fn accessors_and_typed_decode() {
        let m = Message::new(
            "websocket.receive",
            &WebsocketReceive::text("a!b", "/chat/", "hi", 3),
        )
        .unwrap();
        assert_eq!(m.reply_channel(), Some("a!b"));
        assert_eq!(m.text(), Some("hi"));
        assert_eq!(m.path(), Some("/chat/"));
        assert_eq!(m.order(), Some(3));
        assert_eq!(m.retries(), 0);
        let typed: WebsocketReceive = m.decode().unwrap();
        assert_eq!(typed.text.as_deref(), Some("hi"));
    }

    #[test]
    fn hides_the_layer_target_key() {
        let m = Message::new(
            "x",
            &Map::new().with("__asgi_channel__", "a!b").with("k", 1),
        )
        .unwrap();
        assert!(m.get("__asgi_channel__").is_none());
        assert_eq!(m.get("k").and_then(Value::as_i64), Some(1));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Message::from_payload("x", Bytes::from_static(b"\xc1")).is_err());
    }
}

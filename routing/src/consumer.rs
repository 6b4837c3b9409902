//! What a consumer is and what it can do: the [`Handler`] trait (any
//! `async fn(Message, Ctx) -> Result<(), ConsumerError>`), the [`Ctx`] it is given (kwargs from the
//! route, the reply channel, the channel session, the HTTP session) and the outbox of [`Action`]s
//! it fills. The worker applies the outbox only after the consumer returns `Ok` — Channels 1's
//! consumer atomicity: a consumer that fails leaves no half-sent replies behind.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::Serialize;
use thiserror::Error;

use crate::asgi::WebsocketSend;
use crate::codec::{self, CodecError};
use crate::message::Message;
use crate::names::{self, NameError};
use crate::value::{Map, Value};

/// Named captures of the route's filters.
pub type Kwargs = HashMap<String, String>;

/// A boxed, sendable future (what a type-erased consumer returns).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How a consumer ends other than `Ok`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// Refuse a WebSocket handshake: the worker replies `{"close": true}` (HTTP 403).
    #[error("connection denied")]
    DenyConnection,
    /// Close the socket with this code: the worker replies `{"close": code}`.
    #[error("close with code {0}")]
    Close(u16),
    /// Not now: the worker requeues the message (with `__retries__` counted, at most 10 times).
    #[error("consume later")]
    ConsumeLater,
    /// The consumer addressed a channel or group by an invalid name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A message could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A reply was asked for but the message has no `reply_channel`.
    #[error("the message on {0:?} has no reply_channel to reply to")]
    NoReplyChannel(String),
    /// Anything else the consumer failed with.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl ConsumerError {
    /// Wraps any error as [`ConsumerError::Other`].
    pub fn other<E: Into<Box<dyn std::error::Error + Send + Sync>>>(e: E) -> Self {
        ConsumerError::Other(e.into())
    }
}

/// One thing a consumer asked for, applied by the worker after the consumer returned `Ok`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Action {
    /// Send a msgpack map to a channel.
    Send {
        /// Target channel.
        channel: String,
        /// The msgpack map.
        payload: Bytes,
    },
    /// Add a channel to a group.
    GroupAdd {
        /// Group name.
        group: String,
        /// Member channel.
        channel: String,
    },
    /// Remove a channel from a group.
    GroupDiscard {
        /// Group name.
        group: String,
        /// Member channel.
        channel: String,
    },
    /// Broadcast a msgpack map to a group.
    GroupSend {
        /// Group name.
        group: String,
        /// The msgpack map.
        payload: Bytes,
    },
    /// Set a key of the channel session of `reply_channel`.
    SessionSet {
        /// The connection.
        reply_channel: String,
        /// Session key.
        key: String,
        /// New value.
        value: Value,
    },
    /// Delete a key of the channel session of `reply_channel`.
    SessionDelete {
        /// The connection.
        reply_channel: String,
        /// Session key.
        key: String,
    },
}

/// The web session (Django's) of the connection, as read from the handshake's cookie.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpSession {
    /// The session key (`sessionid` cookie), when a valid session was found.
    pub session_key: Option<String>,
    /// The session data (empty for an anonymous user).
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl HttpSession {
    /// An anonymous user: no session.
    pub fn anonymous() -> Self {
        HttpSession::default()
    }
    /// `_auth_user_id` of the session, when a user is logged in.
    pub fn user_id(&self) -> Option<String> {
        match self.data.get("_auth_user_id")? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    /// True when no user is logged in.
    pub fn is_anonymous(&self) -> bool {
        self.user_id().is_none()
    }
}

#[derive(Debug, Default)]
struct CtxState {
    outbox: Vec<Action>,
    session: Map,
}

/// A consumer's view of its context: route kwargs, reply channel, sessions, and the outbox.
/// Clones share the outbox (a consumer may hand a clone to a helper).
#[derive(Clone)]
pub struct Ctx {
    /// Named captures of the route's filters.
    pub kwargs: Arc<Kwargs>,
    reply_channel: Option<String>,
    source_channel: String,
    http_session: Option<Arc<HttpSession>>,
    state: Arc<Mutex<CtxState>>,
}

impl fmt::Debug for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx")
            .field("kwargs", &self.kwargs)
            .field("reply_channel", &self.reply_channel)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    /// A context for running one message (used by the worker and the test client).
    pub fn new(message: &Message, kwargs: Kwargs) -> Self {
        Ctx {
            kwargs: Arc::new(kwargs),
            reply_channel: message.reply_channel().map(str::to_owned),
            source_channel: message.channel.clone(),
            http_session: None,
            state: Arc::default(),
        }
    }

    /// Gives the consumer the channel session loaded for its reply channel.
    pub fn with_session(self, session: Map) -> Self {
        self.lock().session = session;
        self
    }

    /// Gives the consumer the connection's web session.
    pub fn with_http_session(mut self, session: HttpSession) -> Self {
        self.http_session = Some(Arc::new(session));
        self
    }

    fn lock(&self) -> MutexGuard<'_, CtxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the queued actions (the worker calls this once the consumer returned `Ok`).
    pub fn take_actions(&self) -> Vec<Action> {
        std::mem::take(&mut self.lock().outbox)
    }

    /// The actions queued so far.
    pub fn actions(&self) -> Vec<Action> {
        self.lock().outbox.clone()
    }

    fn push(&self, action: Action) {
        self.lock().outbox.push(action);
    }

    /// The message's reply channel.
    pub fn reply_channel(&self) -> Option<&str> {
        self.reply_channel.as_deref()
    }

    fn require_reply(&self) -> Result<&str, ConsumerError> {
        self.reply_channel
            .as_deref()
            .ok_or_else(|| ConsumerError::NoReplyChannel(self.source_channel.clone()))
    }

    /// A kwarg of the route (empty when absent).
    pub fn kwarg(&self, name: &str) -> &str {
        self.kwargs.get(name).map_or("", String::as_str)
    }

    /// Queues `message` (anything that serializes to a map) for `channel`.
    pub fn send<M: Serialize + ?Sized>(
        &self,
        channel: &str,
        message: &M,
    ) -> Result<(), ConsumerError> {
        names::validate_channel(channel)?;
        let payload = encode_map(message)?;
        self.push(Action::Send {
            channel: channel.to_owned(),
            payload,
        });
        Ok(())
    }

    /// Queues a reply on the message's reply channel.
    pub fn reply<M: Serialize + ?Sized>(&self, message: &M) -> Result<(), ConsumerError> {
        let reply = self.require_reply()?.to_owned();
        self.send(&reply, message)
    }

    /// Accepts a WebSocket handshake.
    pub fn accept(&self) -> Result<(), ConsumerError> {
        self.reply(&WebsocketSend::accept())
    }

    /// Closes the socket (`None`: normal closure).
    pub fn close(&self, code: Option<u16>) -> Result<(), ConsumerError> {
        self.reply(&WebsocketSend::close(code))
    }

    /// Sends a text frame to the socket.
    pub fn send_text(&self, text: impl Into<String>) -> Result<(), ConsumerError> {
        self.reply(&WebsocketSend::text(text))
    }

    /// Sends a binary frame to the socket.
    pub fn send_bytes(&self, bytes: impl Into<Vec<u8>>) -> Result<(), ConsumerError> {
        self.reply(&WebsocketSend::bytes(bytes.into()))
    }

    /// Sends `value` as a JSON text frame to the socket.
    pub fn send_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), ConsumerError> {
        let text = serde_json::to_string(value).map_err(CodecError::from)?;
        self.send_text(text)
    }

    /// Adds the reply channel to `group`.
    pub fn group_add(&self, group: &str) -> Result<(), ConsumerError> {
        names::validate_group(group)?;
        let channel = self.require_reply()?.to_owned();
        self.push(Action::GroupAdd {
            group: group.to_owned(),
            channel,
        });
        Ok(())
    }

    /// Removes the reply channel from `group`.
    pub fn group_discard(&self, group: &str) -> Result<(), ConsumerError> {
        names::validate_group(group)?;
        let channel = self.require_reply()?.to_owned();
        self.push(Action::GroupDiscard {
            group: group.to_owned(),
            channel,
        });
        Ok(())
    }

    /// Adds any channel to `group`.
    pub fn group_add_channel(&self, group: &str, channel: &str) -> Result<(), ConsumerError> {
        names::validate_group(group)?;
        names::validate_channel(channel)?;
        self.push(Action::GroupAdd {
            group: group.to_owned(),
            channel: channel.to_owned(),
        });
        Ok(())
    }

    /// Broadcasts `message` to every member of `group`.
    pub fn group_send<M: Serialize + ?Sized>(
        &self,
        group: &str,
        message: &M,
    ) -> Result<(), ConsumerError> {
        names::validate_group(group)?;
        let payload = encode_map(message)?;
        self.push(Action::GroupSend {
            group: group.to_owned(),
            payload,
        });
        Ok(())
    }

    /// Broadcasts a text frame to every socket in `group`.
    pub fn group_send_text(
        &self,
        group: &str,
        text: impl Into<String>,
    ) -> Result<(), ConsumerError> {
        self.group_send(group, &WebsocketSend::text(text))
    }

    /// A key of the channel session (as loaded before the consumer ran, plus this run's writes).
    pub fn session_get(&self, key: &str) -> Option<Value> {
        self.lock().session.get(key).cloned()
    }

    /// The whole channel session.
    pub fn session(&self) -> Map {
        self.lock().session.clone()
    }

    /// Sets a key of the channel session (stored after the consumer returns `Ok`).
    pub fn session_set(&self, key: &str, value: impl Into<Value>) -> Result<(), ConsumerError> {
        let reply_channel = self.require_reply()?.to_owned();
        let value = value.into();
        let mut state = self.lock();
        state.session.insert(key, value.clone());
        state.outbox.push(Action::SessionSet {
            reply_channel,
            key: key.to_owned(),
            value,
        });
        Ok(())
    }

    /// Deletes a key of the channel session (after the consumer returns `Ok`).
    pub fn session_delete(&self, key: &str) -> Result<(), ConsumerError> {
        let reply_channel = self.require_reply()?.to_owned();
        let mut state = self.lock();
        state.session.remove(key);
        state.outbox.push(Action::SessionDelete {
            reply_channel,
            key: key.to_owned(),
        });
        Ok(())
    }

    /// The connection's web session, when the route asked for it (anonymous when none was valid).
    pub fn http_session(&self) -> Option<&HttpSession> {
        self.http_session.as_deref()
    }

    /// The logged-in user's id (`_auth_user_id` of the web session).
    pub fn user_id(&self) -> Option<String> {
        self.http_session.as_deref().and_then(HttpSession::user_id)
    }
}

fn encode_map<M: Serialize + ?Sized>(message: &M) -> Result<Bytes, CodecError> {
    let payload = codec::to_msgpack(message)?;
    if !matches!(
        payload.first().map(|&b| rmp::Marker::from_u8(b)),
        Some(rmp::Marker::FixMap(_) | rmp::Marker::Map16 | rmp::Marker::Map32)
    ) {
        return Err(CodecError::NotAMap);
    }
    Ok(Bytes::from(payload))
}

/// A type-erased consumer. Implemented for every `async fn(Message, Ctx) -> Result<(), ConsumerError>`
/// (and closures returning such futures).
pub trait Handler: Send + Sync + 'static {
    /// Runs the consumer on one message.
    fn call(&self, message: Message, ctx: Ctx) -> BoxFuture<Result<(), ConsumerError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Message, Ctx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), ConsumerError>> + Send + 'static,
{
    fn call(&self, message: Message, ctx: Ctx) -> BoxFuture<Result<(), ConsumerError>> {
        Box::pin(self(message, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asgi::WebsocketReceive;

    fn msg() -> Message {
        Message::new(
            "websocket.receive",
            &WebsocketReceive::text("r.x!abc", "/", "hi", 1),
        )
        .unwrap()
    }

    #[test]
    fn outbox_collects_in_order_and_validates_names() {
        let ctx = Ctx::new(&msg(), Kwargs::new());
        ctx.send_text("a").unwrap();
        ctx.group_add("room").unwrap();
        assert!(matches!(
            ctx.group_add("bad group"),
            Err(ConsumerError::InvalidName(_))
        ));
        assert!(matches!(
            ctx.send("bad channel", &Map::new()),
            Err(ConsumerError::InvalidName(_))
        ));
        assert!(matches!(
            ctx.send("x", &"not a map"),
            Err(ConsumerError::Codec(CodecError::NotAMap))
        ));
        let actions = ctx.take_actions();
        assert_eq!(actions.len(), 2);
        match &actions[0] {
            Action::Send { channel, payload } => {
                assert_eq!(channel, "r.x!abc");
                let m: Map = codec::from_msgpack(payload).unwrap();
                assert_eq!(m.get_str("text"), Some("a"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(ctx.take_actions().is_empty());
    }

    #[test]
    fn reply_without_reply_channel_is_an_error() {
        let m = Message::new("thumbnails", &Map::new().with("id", 1)).unwrap();
        let ctx = Ctx::new(&m, Kwargs::new());
        assert!(matches!(
            ctx.send_text("x"),
            Err(ConsumerError::NoReplyChannel(c)) if c == "thumbnails"
        ));
    }

    #[test]
    fn session_writes_are_visible_and_queued() {
        let ctx = Ctx::new(&msg(), Kwargs::new()).with_session(Map::new().with("a", 1));
        ctx.session_set("b", "two").unwrap();
        ctx.session_delete("a").unwrap();
        assert_eq!(ctx.session_get("b"), Some(Value::from("two")));
        assert_eq!(ctx.session_get("a"), None);
        assert_eq!(ctx.take_actions().len(), 2);
    }
}

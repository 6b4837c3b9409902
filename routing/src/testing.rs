//! A test client for consumers, like `channels.test.Client`: it runs the routed consumer on a
//! message with no channel layer at all, applies what the consumer queued to an in-memory model
//! (channels, groups, channel sessions) and lets the test read what was sent. Use it from any
//! async test (`#[tokio::test]`).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use serde::Serialize;

use crate::codec::{self, CodecError};
use crate::consumer::{Action, ConsumerError, Ctx, HttpSession};
use crate::message::Message;
use crate::router::Router;
use crate::settle::{Ended, Settlement, settle};
use crate::value::{Map, Value};

/// Runs consumers against a router, in memory.
#[derive(Debug)]
pub struct Client {
    router: Router,
    reply_channel: String,
    channels: HashMap<String, VecDeque<Bytes>>,
    groups: HashMap<String, Vec<String>>,
    sessions: HashMap<String, Map>,
    http_session: Option<HttpSession>,
}

impl Client {
    /// A client with its own reply channel (`test.reply!<n>`).
    pub fn new(router: Router) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Client {
            router,
            reply_channel: format!("test.reply!{n}"),
            channels: HashMap::new(),
            groups: HashMap::new(),
            sessions: HashMap::new(),
            http_session: None,
        }
    }

    /// This client's reply channel (added to every message sent without one).
    pub fn reply_channel(&self) -> &str {
        &self.reply_channel
    }

    /// Gives consumers this web session (for routes that ask for one).
    pub fn login(&mut self, session: HttpSession) {
        self.http_session = Some(session);
    }

    /// Sends `content` on `channel` and runs the routed consumer at once. Returns the actions
    /// it queued (already applied). On an error, what the worker would leave behind is applied
    /// (a refused handshake's or a `Close`'s close reply, a failed request's 500, a failed
    /// disconnect's group discards), then the error is returned.
    pub async fn send_and_consume<M: Serialize + ?Sized>(
        &mut self,
        channel: &str,
        content: &M,
    ) -> Result<Vec<Action>, ConsumerError> {
        let mut map: Map = codec::from_msgpack(&codec::to_msgpack(content)?)?;
        if !map.contains_key("reply_channel") {
            map.insert("reply_channel", self.reply_channel.clone());
        }
        let message = Message::new(channel, &map)?;
        self.run(message).await
    }

    /// Runs the consumer of the oldest message waiting on `channel` (a background task a consumer
    /// sent). `Ok(None)` when nothing is waiting.
    pub async fn consume(&mut self, channel: &str) -> Result<Option<Vec<Action>>, ConsumerError> {
        let Some(payload) = self.channels.get_mut(channel).and_then(VecDeque::pop_front) else {
            return Ok(None);
        };
        let message = Message::from_payload(channel, payload)?;
        self.run(message).await.map(Some)
    }

    async fn run(&mut self, message: Message) -> Result<Vec<Action>, ConsumerError> {
        let resolved = self.router.resolve(&message).ok_or_else(|| {
            ConsumerError::other(format!(
                "no route for a message on {:?} (path {:?})",
                message.channel,
                message.path()
            ))
        })?;
        let mut ctx = Ctx::new(&message, resolved.kwargs);
        if resolved.options.channel_session
            && let Some(reply) = message.reply_channel()
        {
            ctx = ctx.with_session(self.sessions.get(reply).cloned().unwrap_or_default());
        }
        if resolved.options.http_session {
            ctx = ctx.with_http_session(self.http_session.clone().unwrap_or_default());
        }
        let result = resolved.handler.call(message.clone(), ctx.clone()).await;
        // The worker's own rule for what a run leaves behind: applied sends, a failed
        // request's 500, a refused handshake, a failed disconnect's group discards.
        match settle(&message, Ended::Returned(&result), ctx.take_actions()) {
            Settlement::Apply(actions) => {
                for a in &actions {
                    self.apply(a.clone());
                }
                result.map(|()| actions)
            }
            // `ConsumeLater` goes back to the test as the error it is, for the test to retry.
            Settlement::Requeue => result.map(|()| Vec::new()),
        }
    }

    fn deliver(&mut self, channel: &str, payload: Bytes) {
        self.channels
            .entry(channel.to_owned())
            .or_default()
            .push_back(payload);
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Send { channel, payload } => self.deliver(&channel, payload),
            Action::GroupAdd { group, channel } => {
                let members = self.groups.entry(group).or_default();
                if !members.contains(&channel) {
                    members.push(channel);
                }
            }
            Action::GroupDiscard { group, channel } => {
                if let Some(members) = self.groups.get_mut(&group) {
                    members.retain(|c| *c != channel);
                }
            }
            Action::GroupSend { group, payload } => {
                let members = self.groups.get(&group).cloned().unwrap_or_default();
                for m in members {
                    self.deliver(&m, payload.clone());
                }
            }
            Action::SessionSet {
                reply_channel,
                key,
                value,
            } => {
                self.sessions
                    .entry(reply_channel)
                    .or_default()
                    .insert(&key, value);
            }
            Action::SessionDelete { reply_channel, key } => {
                if let Some(s) = self.sessions.get_mut(&reply_channel) {
                    s.remove(&key);
                }
            }
        }
    }

    /// The oldest message sent to this client's reply channel, decoded.
    pub fn receive(&mut self) -> Result<Option<Map>, CodecError> {
        let reply = self.reply_channel.clone();
        self.receive_on(&reply)
    }

    /// The oldest message sent to `channel`, decoded.
    pub fn receive_on(&mut self, channel: &str) -> Result<Option<Map>, CodecError> {
        match self.channels.get_mut(channel).and_then(VecDeque::pop_front) {
            Some(p) => codec::from_msgpack(&p).map(Some),
            None => Ok(None),
        }
    }

    /// Adds this client's reply channel to `group`, as if a consumer had.
    pub fn join_group(&mut self, group: &str) {
        let channel = self.reply_channel.clone();
        self.apply(Action::GroupAdd {
            group: group.to_owned(),
            channel,
        });
    }

    /// Members of `group`.
    pub fn group_members(&self, group: &str) -> Vec<String> {
        self.groups.get(group).cloned().unwrap_or_default()
    }

    /// The channel session of `reply_channel` (this client's by default).
    pub fn session(&self, reply_channel: Option<&str>) -> Map {
        let reply = reply_channel.unwrap_or(&self.reply_channel);
        self.sessions.get(reply).cloned().unwrap_or_default()
    }

    /// A value of this client's channel session.
    pub fn session_value(&self, key: &str) -> Option<Value> {
        self.sessions.get(&self.reply_channel)?.get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::Kwargs;
    use crate::generic::{JsonWebsocketConsumer, WebsocketConsumer, route_class, route_json};
    use crate::router::route;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        // The consumers here never wait on anything, so polling once completes them.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("test future did not complete"),
        }
    }

    async fn echo(m: Message, ctx: Ctx) -> Result<(), ConsumerError> {
        ctx.send_text(format!("echo:{}", m.text().unwrap_or("")))?;
        ctx.send("thumbnails", &Map::new().with("id", 7))?;
        Ok(())
    }

    async fn thumbnail(m: Message, ctx: Ctx) -> Result<(), ConsumerError> {
        let id = m.get("id").and_then(Value::as_i64).unwrap_or(0);
        ctx.group_send_text("done", format!("thumb {id}"))
    }

    struct Chat;
    impl WebsocketConsumer for Chat {
        fn groups(&self, kw: &Kwargs) -> Vec<String> {
            vec![format!("room-{}", kw["room"])]
        }
        fn channel_session(&self) -> bool {
            true
        }
        async fn connect(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
            if m.get_str("query_string") == Some("deny") {
                return Err(ConsumerError::DenyConnection);
            }
            ctx.session_set("nick", "ann")?;
            ctx.accept()
        }
        async fn receive(&self, m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
            let nick = ctx
                .session_get("nick")
                .and_then(|v| v.as_str().map(str::to_owned));
            ctx.group_send_text(
                &format!("room-{}", ctx.kwarg("room")),
                format!("{}: {}", nick.unwrap_or_default(), m.text().unwrap_or("")),
            )
        }
    }

    struct Calc;
    impl WebsocketConsumer for Calc {}
    impl JsonWebsocketConsumer for Calc {
        async fn receive_json(
            &self,
            content: serde_json::Value,
            _m: &Message,
            ctx: &Ctx,
        ) -> Result<(), ConsumerError> {
            let a = content["a"].as_i64().unwrap_or(0);
            let b = content["b"].as_i64().unwrap_or(0);
            ctx.send_json(&serde_json::json!({ "sum": a + b }))
        }
    }

    fn router() -> Router {
        Router::new([
            route("websocket.receive", echo).path("^/echo/$"),
            route("thumbnails", thumbnail),
            route_class(Chat).path(r"^/chat/(?P<room>\w+)/$"),
            route_json(Calc).path("^/calc/$"),
        ])
        .unwrap()
    }

    fn ws(path: &str) -> Map {
        Map::new().with("path", path).with("order", 0)
    }

    #[test]
    fn function_consumer_and_background_task() {
        let mut c = Client::new(router());
        c.join_group("done");
        let actions =
            block_on(c.send_and_consume("websocket.receive", &ws("/echo/").with("text", "hi")))
                .unwrap();
        assert_eq!(actions.len(), 2);
        assert_eq!(
            c.receive().unwrap().unwrap().get_str("text"),
            Some("echo:hi")
        );
        assert!(c.receive().unwrap().is_none());
        block_on(c.consume("thumbnails")).unwrap().unwrap();
        assert_eq!(
            c.receive().unwrap().unwrap().get_str("text"),
            Some("thumb 7")
        );
        assert!(block_on(c.consume("thumbnails")).unwrap().is_none());
    }

    #[test]
    fn class_consumer_groups_and_session() {
        let mut c = Client::new(router());
        block_on(c.send_and_consume("websocket.connect", &ws("/chat/lobby/"))).unwrap();
        assert_eq!(
            c.receive().unwrap().unwrap().get("accept"),
            Some(&Value::Bool(true))
        );
        assert_eq!(
            c.group_members("room-lobby"),
            [c.reply_channel().to_owned()]
        );
        assert_eq!(c.session_value("nick"), Some(Value::from("ann")));
        block_on(c.send_and_consume("websocket.receive", &ws("/chat/lobby/").with("text", "yo")))
            .unwrap();
        assert_eq!(
            c.receive().unwrap().unwrap().get_str("text"),
            Some("ann: yo")
        );
        block_on(c.send_and_consume(
            "websocket.disconnect",
            &ws("/chat/lobby/").with("code", 1000),
        ))
        .unwrap();
        assert!(c.group_members("room-lobby").is_empty());
    }

    #[test]
    fn deny_sends_close_and_joins_nothing() {
        let mut c = Client::new(router());
        let err = block_on(c.send_and_consume(
            "websocket.connect",
            &ws("/chat/lobby/").with("query_string", "deny"),
        ))
        .unwrap_err();
        assert!(matches!(err, ConsumerError::DenyConnection));
        assert_eq!(
            c.receive().unwrap().unwrap().get("close"),
            Some(&Value::Bool(true))
        );
        assert!(c.group_members("room-lobby").is_empty());
        assert!(c.session_value("nick").is_none());
    }

    async fn fail(_: Message, ctx: Ctx) -> Result<(), ConsumerError> {
        ctx.send_text("half-done")?;
        ctx.group_discard("room-lobby")?;
        Err(ConsumerError::other("database is down"))
    }

    #[test]
    fn failures_leave_what_the_worker_leaves() {
        let mut c = Client::new(
            Router::new([
                crate::route("http.request", fail),
                crate::route("websocket.disconnect", fail),
            ])
            .unwrap(),
        );
        let request = Map::new().with("path", "/").with("method", "GET");
        assert!(block_on(c.send_and_consume("http.request", &request)).is_err());
        let answer = c.receive().unwrap().unwrap();
        assert_eq!(answer.get("status"), Some(&Value::Int(500)));
        assert!(c.receive().unwrap().is_none(), "its own send was discarded");
        c.join_group("room-lobby");
        assert!(block_on(c.send_and_consume("websocket.disconnect", &ws("/"))).is_err());
        assert!(
            c.group_members("room-lobby").is_empty(),
            "left its group anyway"
        );
        assert!(c.receive().unwrap().is_none());
    }

    #[test]
    fn json_consumer() {
        let mut c = Client::new(router());
        block_on(c.send_and_consume("websocket.connect", &ws("/calc/"))).unwrap();
        c.receive().unwrap().unwrap();
        block_on(c.send_and_consume(
            "websocket.receive",
            &ws("/calc/").with("text", r#"{"a": 2, "b": 40}"#),
        ))
        .unwrap();
        assert_eq!(
            c.receive().unwrap().unwrap().get_str("text"),
            Some(r#"{"sum":42}"#)
        );
        let err = block_on(
            c.send_and_consume("websocket.receive", &ws("/calc/").with("text", "not json")),
        )
        .unwrap_err();
        assert!(matches!(err, ConsumerError::Codec(_)));
        assert!(c.receive().unwrap().is_none());
    }

    #[test]
    fn unrouted_is_an_error() {
        let mut c = Client::new(router());
        assert!(block_on(c.send_and_consume("nowhere", &Map::new())).is_err());
    }
}

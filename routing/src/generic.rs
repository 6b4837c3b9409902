//! Class-style WebSocket consumers (Channels' `channels.generic.websockets`): one type handles
//! `websocket.connect`, `websocket.receive` and `websocket.disconnect` of a path, joins its
//! `groups()` on connect and leaves them on disconnect by itself. [`JsonWebsocketConsumer`] adds
//! JSON decoding of text frames. Wire them with [`route_class`] / [`route_json`].

use std::future::Future;
use std::sync::Arc;

use crate::asgi::{WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT, WEBSOCKET_RECEIVE};
use crate::consumer::{BoxFuture, ConsumerError, Ctx, Handler, Kwargs};
use crate::message::Message;
use crate::router::{Route, RouteOptions, route_channels};

/// A WebSocket consumer with connect / receive / disconnect hooks.
pub trait WebsocketConsumer: Send + Sync + 'static {
    /// Groups the connection joins on connect and leaves on disconnect.
    fn groups(&self, _kwargs: &Kwargs) -> Vec<String> {
        Vec::new()
    }
    /// Run this connection's messages strictly in order, across workers and concurrent
    /// consumers. Off by default, as in Channels 1.x (which kept only connect-before-receive):
    /// order costs two steps in the layer per message (a gate before, a done after) and
    /// serialises each connection, which at saturation still costs a relay a large share of its
    /// throughput (measured in BENCHMARKS.md, "Defaults, backpressure and ordering"). Turn it on
    /// for a consumer whose frames must be handled in the order sent (a chat, a relay); without
    /// it one connection's frames may run at once.
    fn strict_ordering(&self) -> bool {
        false
    }
    /// Load the channel session before each hook.
    fn channel_session(&self) -> bool {
        false
    }
    /// Load the web (Django) session of the connection before each hook.
    fn http_session(&self) -> bool {
        false
    }
    /// The handshake. Accepts by default; return `Err(DenyConnection)` to refuse.
    fn connect(
        &self,
        _message: &Message,
        ctx: &Ctx,
    ) -> impl Future<Output = Result<(), ConsumerError>> + Send {
        let accepted = ctx.accept();
        async move { accepted }
    }
    /// A frame (`message.text()` or `message.bytes()`).
    fn receive(
        &self,
        _message: &Message,
        _ctx: &Ctx,
    ) -> impl Future<Output = Result<(), ConsumerError>> + Send {
        async { Ok(()) }
    }
    /// The socket closed.
    fn disconnect(
        &self,
        _message: &Message,
        _ctx: &Ctx,
    ) -> impl Future<Output = Result<(), ConsumerError>> + Send {
        async { Ok(()) }
    }
}

/// A WebSocket consumer speaking JSON text frames: a [`WebsocketConsumer`] (its groups, options,
/// connect and disconnect hooks) whose text frames arrive decoded, as Channels'
/// `JsonWebsocketConsumer` subclasses `WebsocketConsumer`. Route it with [`route_json`]; its
/// `WebsocketConsumer::receive` is not called.
pub trait JsonWebsocketConsumer: WebsocketConsumer {
    /// A JSON text frame, decoded. Reply with [`Ctx::send_json`].
    fn receive_json(
        &self,
        content: serde_json::Value,
        message: &Message,
        ctx: &Ctx,
    ) -> impl Future<Output = Result<(), ConsumerError>> + Send;
}

/// Adapts a [`JsonWebsocketConsumer`] to a [`WebsocketConsumer`]: text frames are parsed as JSON
/// (a frame that is not JSON, or a binary frame, is a consumer error, logged by the worker).
#[derive(Debug)]
pub struct Json<C>(pub C);

impl<C: JsonWebsocketConsumer> WebsocketConsumer for Json<C> {
    fn groups(&self, kwargs: &Kwargs) -> Vec<String> {
        self.0.groups(kwargs)
    }
    fn strict_ordering(&self) -> bool {
        self.0.strict_ordering()
    }
    fn channel_session(&self) -> bool {
        self.0.channel_session()
    }
    fn http_session(&self) -> bool {
        self.0.http_session()
    }
    async fn connect(&self, message: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        self.0.connect(message, ctx).await
    }
    async fn receive(&self, message: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        let text = message
            .text()
            .ok_or_else(|| ConsumerError::other("a JSON consumer received a frame without text"))?;
        let content: serde_json::Value =
            serde_json::from_str(text).map_err(crate::codec::CodecError::from)?;
        self.0.receive_json(content, message, ctx).await
    }
    async fn disconnect(&self, message: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        self.0.disconnect(message, ctx).await
    }
}

struct ClassHandler<C>(Arc<C>);

impl<C: WebsocketConsumer> Handler for ClassHandler<C> {
    fn call(&self, message: Message, ctx: Ctx) -> BoxFuture<Result<(), ConsumerError>> {
        let consumer = self.0.clone();
        Box::pin(async move {
            match message.channel.as_str() {
                WEBSOCKET_CONNECT => {
                    for g in consumer.groups(&ctx.kwargs) {
                        ctx.group_add(&g)?;
                    }
                    consumer.connect(&message, &ctx).await
                }
                WEBSOCKET_RECEIVE => consumer.receive(&message, &ctx).await,
                WEBSOCKET_DISCONNECT => {
                    for g in consumer.groups(&ctx.kwargs) {
                        ctx.group_discard(&g)?;
                    }
                    consumer.disconnect(&message, &ctx).await
                }
                other => Err(ConsumerError::other(format!(
                    "a WebSocket consumer was routed a message on {other:?}"
                ))),
            }
        })
    }
}

/// Routes `websocket.connect`, `websocket.receive` and `websocket.disconnect` to a class consumer.
pub fn route_class<C: WebsocketConsumer>(consumer: C) -> Route {
    let options = RouteOptions {
        strict_ordering: consumer.strict_ordering(),
        channel_session: consumer.channel_session(),
        http_session: consumer.http_session(),
        durable: None,
    };
    route_channels(
        &[WEBSOCKET_CONNECT, WEBSOCKET_RECEIVE, WEBSOCKET_DISCONNECT],
        Arc::new(ClassHandler(Arc::new(consumer))),
    )
    .options(options)
}

/// Routes a [`JsonWebsocketConsumer`] (shorthand for `route_class(Json(consumer))`).
pub fn route_json<C: JsonWebsocketConsumer>(consumer: C) -> Route {
    route_class(Json(consumer))
}

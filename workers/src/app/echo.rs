//! `/ws/echo/` (every frame back unchanged, text or binary) and `/ws/relay/<room>/` (every frame
//! to all members of group `relay-<room>`, sender included): the consumers the benchmarks and the
//! Autobahn run use.

use switchyard_routing::asgi::WebsocketSend;
use switchyard_routing::{ByteString, ConsumerError, Ctx, Kwargs, Message, WebsocketConsumer};

/// Accepts the echo socket.
pub async fn accept(_message: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    ctx.accept()
}

/// Sends the frame back as it came.
pub async fn echo(message: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    if let Some(text) = message.text() {
        ctx.send_text(text)
    } else if let Some(bytes) = message.bytes() {
        ctx.send_bytes(bytes.to_vec())
    } else {
        Ok(())
    }
}

/// The relay consumer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Relay;

impl WebsocketConsumer for Relay {
    fn groups(&self, kwargs: &Kwargs) -> Vec<String> {
        kwargs
            .get("room")
            .map(|r| vec![format!("relay-{r}")])
            .unwrap_or_default()
    }

    async fn receive(&self, message: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        let group = format!("relay-{}", ctx.kwarg("room"));
        if let Some(text) = message.text() {
            ctx.group_send(&group, &WebsocketSend::text(text))
        } else if let Some(bytes) = message.bytes() {
            ctx.group_send(&group, &WebsocketSend::bytes(ByteString::from(bytes)))
        } else {
            Ok(())
        }
    }
}

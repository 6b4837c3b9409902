//! `/ws/echo/` (every frame back unchanged, text or binary) and `/ws/relay/<room>/` (every frame
//! to all members of group `relay-<room>`, sender included): the consumers the benchmarks and the
//! Autobahn run use. The relay keeps each socket's frames in the order sent, with any number of
//! workers (strict ordering); [`Relay::unordered`] (`/ws/relay-unordered/<room>/`) is the same
//! relay without it, for what order costs to be measured. The echo does not keep order: a client
//! with several frames in flight may get them back reordered when workers run them at once.

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
#[derive(Debug, Clone, Copy)]
pub struct Relay {
    ordered: bool,
}

impl Default for Relay {
    fn default() -> Self {
        Relay { ordered: true }
    }
}

impl Relay {
    /// The relay without strict ordering: a socket's frames may be relayed out of order.
    pub fn unordered() -> Self {
        Relay { ordered: false }
    }
}

impl WebsocketConsumer for Relay {
    /// Members see each sender's frames in the order sent (one sender's frames run one after
    /// the other, so its group sends reach each inbox in order).
    fn strict_ordering(&self) -> bool {
        self.ordered
    }

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

//! Replies to sockets, decoded once per payload: a group message listing many local sockets
//! arrives once (its bytes shared by every target's envelope), so the first socket task to see it
//! decodes it into a tungstenite [`Message`] and the others reuse that message, whose payload
//! (`Utf8Bytes` / `Bytes`) is shared, not copied.

use std::sync::Mutex;

use bytes::Bytes;
use switchyard_routing::asgi::WebsocketSend;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;

use crate::layer::Envelope;

/// A decoded reply on a socket's reply channel.
#[derive(Debug, Clone, Default)]
pub(crate) struct SocketReply {
    /// `accept` as sent (`None` when absent).
    pub(crate) accept: Option<bool>,
    /// The frame to send, if any.
    pub(crate) frame: Option<Message>,
    /// Close with this code after the frame, if any (always one that may go on the wire).
    pub(crate) close: Option<u16>,
    /// A close code the worker asked for that may not be sent (replaced by 1011 in `close`).
    pub(crate) refused_close: Option<u16>,
}

impl SocketReply {
    /// During the handshake: does this reply accept the socket?
    pub(crate) fn accepts(&self) -> bool {
        self.accept == Some(true) || self.frame.is_some()
    }
}

/// Why a reply was ignored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplyError {
    /// Not a msgpack map of the expected shape.
    #[error("undecodable socket reply: {0}")]
    Undecodable(String),
    /// Both `text` and `bytes`: the spec says to ignore the message entirely.
    #[error("socket reply has both text and bytes")]
    TextAndBytes,
}

const SLOTS: usize = 8;

/// The few most recent shared payloads and what they decoded to.
#[derive(Debug, Default)]
pub(crate) struct FrameCache {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    entries: [Option<(Bytes, SocketReply)>; SLOTS],
    next: usize,
}

impl FrameCache {
    /// Decodes `envelope`, or reuses the decoding of the same shared payload.
    pub(crate) fn decode(&self, envelope: &Envelope) -> Result<SocketReply, ReplyError> {
        let payload = &envelope.payload;
        if let Some(hit) = self.lookup(payload) {
            return Ok(hit);
        }
        let reply = decode_reply(envelope)?;
        // A payload nobody else holds was sent to this socket alone: no one will ask again.
        if !payload.is_unique()
            && let Ok(mut ring) = self.ring.lock()
        {
            let slot = ring.next;
            ring.entries[slot] = Some((payload.clone(), reply.clone()));
            ring.next = (slot + 1) % SLOTS;
        }
        Ok(reply)
    }

    fn lookup(&self, payload: &Bytes) -> Option<SocketReply> {
        let ring = self.ring.lock().ok()?;
        // The cache holds a clone of every payload it keeps, so an address and length match can
        // only be the same allocation (and so the same bytes).
        ring.entries.iter().flatten().find_map(|(bytes, reply)| {
            (bytes.as_ptr() == payload.as_ptr() && bytes.len() == payload.len())
                .then(|| reply.clone())
        })
    }
}

fn decode_reply(envelope: &Envelope) -> Result<SocketReply, ReplyError> {
    let send: WebsocketSend = envelope
        .decode()
        .map_err(|e| ReplyError::Undecodable(e.to_string()))?;
    let frame = match (send.text, send.bytes) {
        (Some(_), Some(_)) => return Err(ReplyError::TextAndBytes),
        (Some(text), None) => Some(Message::Text(Utf8Bytes::from(text))),
        (None, Some(bytes)) => Some(Message::Binary(Bytes::from(bytes.into_vec()))),
        (None, None) => None,
    };
    let requested = send.close.and_then(|c| c.code());
    let refused_close = requested.filter(|&code| !sendable_close_code(code));
    Ok(SocketReply {
        accept: send.accept,
        frame,
        close: requested.map(|code| if refused_close.is_some() { 1011 } else { code }),
        refused_close,
    })
}

/// May an endpoint put this code in a close frame (RFC 6455 §7.4)? 1004-1006 and 1015 are
/// reserved or only for reporting, the rest of 1000-2999 is unassigned, and nothing outside
/// 1000-4999 exists: browsers fail a connection closed with any of them with 1002.
pub(crate) fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_routing::codec;

    fn envelope(channel: &str, payload: &Bytes) -> Envelope {
        Envelope {
            channel: channel.to_owned(),
            payload: payload.clone(),
        }
    }

    #[test]
    fn shared_payload_is_decoded_once_and_its_frame_shared() {
        let payload =
            Bytes::from(codec::to_msgpack(&WebsocketSend::text("hi all")).expect("packs"));
        let (a, b) = (envelope("x!a", &payload), envelope("x!b", &payload));
        let cache = FrameCache::default();
        let first = cache.decode(&a).expect("decodes");
        let second = cache.decode(&b).expect("decodes");
        let text = |r: &SocketReply| match &r.frame {
            Some(Message::Text(t)) => t.as_str().as_ptr(),
            other => panic!("not text: {other:?}"),
        };
        assert_eq!(
            text(&first),
            text(&second),
            "the frame payload is shared, not rebuilt"
        );
        assert_eq!(first.frame, Some(Message::text("hi all")));
    }

    #[test]
    fn only_sendable_close_codes_pass_the_rest_become_1011() {
        let cache = FrameCache::default();
        for (asked, sent, refused) in [
            (1000, 1000, None),
            (1003, 1003, None),
            (1007, 1007, None),
            (1014, 1014, None),
            (3000, 3000, None),
            (4999, 4999, None),
            (999, 1011, Some(999)),
            (1004, 1011, Some(1004)),
            (1005, 1011, Some(1005)),
            (1006, 1011, Some(1006)),
            (1015, 1011, Some(1015)),
            (1016, 1011, Some(1016)),
            (2999, 1011, Some(2999)),
            (5000, 1011, Some(5000)),
        ] {
            let payload =
                Bytes::from(codec::to_msgpack(&WebsocketSend::close(Some(asked))).expect("packs"));
            let reply = cache.decode(&envelope("x!a", &payload)).expect("decodes");
            assert_eq!(
                (reply.close, reply.refused_close),
                (Some(sent), refused),
                "{asked}"
            );
        }
    }

    #[test]
    fn unshared_payloads_are_not_cached_and_bad_replies_are_refused() {
        let cache = FrameCache::default();
        let own = Bytes::from(codec::to_msgpack(&WebsocketSend::close(Some(4000))).expect("packs"));
        let only = Envelope {
            channel: "x!a".to_owned(),
            payload: own,
        };
        let reply = cache.decode(&only).expect("decodes");
        assert_eq!(
            (reply.close, reply.frame.is_none(), reply.accepts()),
            (Some(4000), true, false)
        );
        assert!(
            cache
                .ring
                .lock()
                .expect("lock")
                .entries
                .iter()
                .all(Option::is_none)
        );
        let mut both = WebsocketSend::text("t");
        both.bytes = Some(b"b".to_vec().into());
        let both = Bytes::from(codec::to_msgpack(&both).expect("packs"));
        assert!(matches!(
            cache.decode(&envelope("x!a", &both)),
            Err(ReplyError::TextAndBytes)
        ));
        let junk = Bytes::from_static(b"\xc1");
        assert!(matches!(
            cache.decode(&envelope("x!a", &junk)),
            Err(ReplyError::Undecodable(_))
        ));
    }
}

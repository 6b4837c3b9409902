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
    /// In an accept: the worker that owns the socket's messages (see [`crate::layer::owner`]).
    pub(crate) owner: Option<String>,
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

/// Shared payloads remembered at most. Only a payload some socket has not taken yet is kept, so
/// this bounds the decoded frames of broadcasts still in flight, not the cache's normal size.
const MAX_ENTRIES: usize = 256;

/// The shared payloads some socket may still ask for, and what they decoded to.
///
/// An entry lives while anyone besides the cache holds its payload (a socket's queue, the inbox
/// pump) and is swept once the cache holds the last clone. A fixed ring of recent payloads is not
/// enough: when sockets fall behind by more broadcasts than the ring has slots, every late
/// socket misses, decodes the whole group message (with its list of target names) and evicts an
/// entry other late sockets still need, so a server that falls behind slows down further.
#[derive(Debug, Default)]
pub(crate) struct FrameCache {
    entries: Mutex<Vec<(Bytes, SocketReply)>>,
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
            && let Ok(mut entries) = self.entries.lock()
        {
            entries.retain(|(bytes, _)| !bytes.is_unique());
            if entries.len() >= MAX_ENTRIES {
                entries.remove(0);
            }
            entries.push((payload.clone(), reply.clone()));
        }
        Ok(reply)
    }

    fn lookup(&self, payload: &Bytes) -> Option<SocketReply> {
        let entries = self.entries.lock().ok()?;
        // The cache holds a clone of every payload it keeps, so an address and length match can
        // only be the same allocation (and so the same bytes).
        entries.iter().rev().find_map(|(bytes, reply)| {
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
        owner: send.owner,
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
    fn a_payload_stays_decoded_while_late_sockets_still_hold_it() {
        let cache = FrameCache::default();
        let text = |r: &SocketReply| match &r.frame {
            Some(Message::Text(t)) => t.as_str().as_ptr(),
            other => panic!("not text: {other:?}"),
        };
        // Three sockets each hold 40 broadcasts in their queues; the first socket takes them all
        // before the others take any (more than a small ring of recent payloads would keep).
        let payloads: Vec<Bytes> = (0..40)
            .map(|i| {
                let send = WebsocketSend::text(format!("broadcast {i}"));
                Bytes::from(codec::to_msgpack(&send).expect("packs"))
            })
            .collect();
        let queues: Vec<Vec<Envelope>> = ["x!a", "x!b", "x!c"]
            .iter()
            .map(|c| payloads.iter().map(|p| envelope(c, p)).collect())
            .collect();
        let first: Vec<SocketReply> = queues[0]
            .iter()
            .map(|e| cache.decode(e).expect("decodes"))
            .collect();
        for queue in &queues[1..] {
            for (e, earlier) in queue.iter().zip(&first) {
                let reply = cache.decode(e).expect("decodes");
                assert_eq!(reply.frame, earlier.frame);
                assert_eq!(text(&reply), text(earlier), "decoded once, frame shared");
            }
        }
        // Once only the cache holds them, the next insertion sweeps them all.
        drop((queues, first, payloads));
        let last = Bytes::from(codec::to_msgpack(&WebsocketSend::text("last")).expect("packs"));
        let (a, _b) = (envelope("x!a", &last), envelope("x!b", &last));
        cache.decode(&a).expect("decodes");
        assert_eq!(cache.entries.lock().expect("lock").len(), 1);
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
        assert!(cache.entries.lock().expect("lock").is_empty());
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

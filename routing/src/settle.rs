//! What happens after a consumer returns: the one rule the worker and the test client share.
//!
//! A consumer that returned `Ok` has its queued actions applied. One that refused a handshake
//! (`DenyConnection`) or closed (`Close`) has its client told so. One that failed (an error, a
//! panic, a timeout) has its actions discarded, because they may be half of what it meant to do,
//! but its client is still answered (`http.request` 500, `websocket.connect` refused) and a
//! `websocket.disconnect` still leaves its groups, or the group would keep sending to a socket
//! that is gone. `ConsumeLater` asks for the message to be run again. A message no route matches
//! is answered the same way at once (404, refused handshake) rather than left to the server's
//! timeout.

use bytes::Bytes;

use crate::asgi::{
    HTTP_REQUEST, HttpResponse, WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT, WebsocketSend,
};
use crate::codec;
use crate::consumer::{Action, ConsumerError};
use crate::message::Message;
use crate::value::ByteString;

/// How a consumer run ended, as far as its settlement goes.
#[derive(Debug)]
pub enum Ended<'a> {
    /// It returned; `Err` holds what it returned.
    Returned(&'a Result<(), ConsumerError>),
    /// It panicked or ran out of time: a failure whose sends are discarded.
    Aborted,
}

/// What to do once a consumer has run.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// Apply these actions, in order.
    Apply(Vec<Action>),
    /// Put the message back on its channel to be run again (`ConsumeLater`).
    Requeue,
}

/// The body of the 500 a failed HTTP consumer's client gets.
pub const INTERNAL_ERROR_BODY: &str = "500 Internal Server Error\n";

/// The settlement of `message`'s consumer, given how it ended and the actions it queued.
pub fn settle(message: &Message, ended: Ended<'_>, actions: Vec<Action>) -> Settlement {
    match ended {
        Ended::Returned(Ok(())) => Settlement::Apply(actions),
        Ended::Returned(Err(ConsumerError::ConsumeLater)) => Settlement::Requeue,
        Ended::Returned(Err(ConsumerError::DenyConnection)) => {
            Settlement::Apply(close_reply(message, None).into_iter().collect())
        }
        Ended::Returned(Err(ConsumerError::Close(code))) => {
            Settlement::Apply(close_reply(message, Some(*code)).into_iter().collect())
        }
        Ended::Returned(Err(_)) | Ended::Aborted => {
            Settlement::Apply(after_failure(message, actions))
        }
    }
}

/// The answer to a message no route matched: a 404 to a request, a refused handshake.
pub fn unrouted(message: &Message) -> Option<Action> {
    match message.channel.as_str() {
        HTTP_REQUEST => http_reply(message, 404, "Not Found"),
        WEBSOCKET_CONNECT => close_reply(message, None),
        _ => None,
    }
}

fn after_failure(message: &Message, actions: Vec<Action>) -> Vec<Action> {
    match message.channel.as_str() {
        HTTP_REQUEST => http_reply(message, 500, INTERNAL_ERROR_BODY)
            .into_iter()
            .collect(),
        WEBSOCKET_CONNECT => close_reply(message, None).into_iter().collect(),
        WEBSOCKET_DISCONNECT => actions
            .into_iter()
            .filter(|a| matches!(a, Action::GroupDiscard { .. }))
            .collect(),
        _ => Vec::new(),
    }
}

/// A plain-text response to `message`'s client.
pub fn http_reply(message: &Message, status: u16, text: &str) -> Option<Action> {
    let response = HttpResponse::new(
        status,
        vec![(
            ByteString::from("content-type"),
            ByteString::from("text/plain; charset=utf-8"),
        )],
        text.as_bytes(),
    );
    reply(message, &response)
}

fn close_reply(message: &Message, code: Option<u16>) -> Option<Action> {
    reply(message, &WebsocketSend::close(code))
}

fn reply<M: serde::Serialize>(message: &Message, content: &M) -> Option<Action> {
    let channel = message.reply_channel()?.to_owned();
    // These replies are fixed shapes of plain fields: encoding them cannot fail.
    let payload = codec::to_msgpack(content).ok()?;
    Some(Action::Send {
        channel,
        payload: Bytes::from(payload),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::value::{Map, Value};

    fn message(channel: &str) -> Message {
        Message::new(channel, &Map::new().with("reply_channel", "r!1")).unwrap()
    }

    fn sent_to(actions: &[Action]) -> Vec<(String, Map)> {
        actions
            .iter()
            .map(|a| match a {
                Action::Send { channel, payload } => {
                    (channel.clone(), codec::from_msgpack(payload).unwrap())
                }
                other => panic!("not a send: {other:?}"),
            })
            .collect()
    }

    fn group_discard() -> Action {
        Action::GroupDiscard {
            group: "room".into(),
            channel: "r!1".into(),
        }
    }

    fn group_send() -> Action {
        Action::GroupSend {
            group: "room".into(),
            payload: Bytes::from_static(b"\x80"),
        }
    }

    #[test]
    fn ok_applies_every_action() {
        let ok = Ok(());
        let s = settle(
            &message("websocket.receive"),
            Ended::Returned(&ok),
            vec![group_send()],
        );
        assert_eq!(s, Settlement::Apply(vec![group_send()]));
    }

    #[test]
    fn a_failed_request_gets_a_500_and_loses_its_sends() {
        let failed = Err(ConsumerError::other("db down"));
        let Settlement::Apply(actions) = settle(
            &message("http.request"),
            Ended::Returned(&failed),
            vec![group_send()],
        ) else {
            panic!("not requeued")
        };
        let sent = sent_to(&actions);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, "r!1");
        assert_eq!(sent[0].1.get("status"), Some(&Value::Int(500)));
        assert_eq!(
            sent[0].1.get("content"),
            Some(&Value::Bytes(
                INTERNAL_ERROR_BODY.as_bytes().to_vec().into()
            ))
        );
    }

    #[test]
    fn a_failed_connect_is_refused_and_a_failed_disconnect_still_leaves_its_groups() {
        let Settlement::Apply(actions) = settle(
            &message("websocket.connect"),
            Ended::Aborted,
            vec![group_send()],
        ) else {
            panic!("not requeued")
        };
        assert_eq!(
            sent_to(&actions),
            [("r!1".to_owned(), Map::new().with("close", true))]
        );
        let s = settle(
            &message("websocket.disconnect"),
            Ended::Aborted,
            vec![group_send(), group_discard()],
        );
        assert_eq!(s, Settlement::Apply(vec![group_discard()]));
    }

    #[test]
    fn deny_close_and_consume_later() {
        let deny = Err(ConsumerError::DenyConnection);
        let Settlement::Apply(a) = settle(
            &message("websocket.connect"),
            Ended::Returned(&deny),
            vec![],
        ) else {
            panic!()
        };
        assert_eq!(
            sent_to(&a),
            [("r!1".to_owned(), Map::new().with("close", true))]
        );
        let close = Err(ConsumerError::Close(4000));
        let Settlement::Apply(a) = settle(
            &message("websocket.receive"),
            Ended::Returned(&close),
            vec![group_send()],
        ) else {
            panic!()
        };
        assert_eq!(
            sent_to(&a),
            [("r!1".to_owned(), Map::new().with("close", 4000i64))]
        );
        let later = Err(ConsumerError::ConsumeLater);
        assert_eq!(
            settle(
                &message("websocket.receive"),
                Ended::Returned(&later),
                vec![]
            ),
            Settlement::Requeue
        );
    }

    #[test]
    fn unrouted_requests_and_handshakes_are_answered() {
        let a = unrouted(&message("http.request")).unwrap();
        let sent = sent_to(&[a]);
        assert_eq!(sent[0].1.get("status"), Some(&Value::Int(404)));
        assert!(unrouted(&message("websocket.connect")).is_some());
        assert!(unrouted(&message("websocket.receive")).is_none());
    }
}

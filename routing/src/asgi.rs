//! The ASGI 1.0 HTTP and WebSocket messages (Channels 1.x `www` spec) as typed serde structs.
//!
//! The channel name carries the message type, so the structs hold no `type` key. Byte-string keys
//! (`query_string`, header names and values, `body`, `content`, `bytes`) are [`ByteString`]s, so
//! msgpack writes them as `bin` (as Python's channels_redis does) and JSON boxes them. Unknown keys
//! are ignored on decode, optional keys are omitted on encode when absent.

use serde::{Deserialize, Serialize};

use crate::value::{ByteString, Map};

/// `http.request`
pub const HTTP_REQUEST: &str = "http.request";
/// `http.disconnect`
pub const HTTP_DISCONNECT: &str = "http.disconnect";
/// `websocket.connect`
pub const WEBSOCKET_CONNECT: &str = "websocket.connect";
/// `websocket.receive`
pub const WEBSOCKET_RECEIVE: &str = "websocket.receive";
/// `websocket.disconnect`
pub const WEBSOCKET_DISCONNECT: &str = "websocket.disconnect";

/// The key of [`WebsocketConnect::owners`] (serde needs the same spelling as a literal).
pub const OWNERS_KEY: &str = "x-switchyard-owners";
/// The key of [`WebsocketSend::owner`] (serde needs the same spelling as a literal).
pub const OWNER_KEY: &str = "x-switchyard-owner";

/// A header: `[name, value]`, both byte strings, the name lowercased.
pub type Header = (ByteString, ByteString);

/// A `[host, port]` pair.
pub type HostPort = (String, u16);

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_scheme() -> String {
    "http".to_owned()
}

/// `http.request`: one HTTP request, with its body (or its start, when `body_channel` is set).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HttpRequest {
    /// Where the response goes.
    pub reply_channel: String,
    /// `1.0`, `1.1` or `2`.
    pub http_version: String,
    /// Uppercased method.
    pub method: String,
    /// `http` or `https`.
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// Percent-decoded path.
    pub path: String,
    /// Raw query string.
    #[serde(default)]
    pub query_string: ByteString,
    /// The mount point (`SCRIPT_NAME`).
    #[serde(default)]
    pub root_path: String,
    /// Request headers in order, names lowercased.
    #[serde(default)]
    pub headers: Vec<Header>,
    /// The body, or its start when `body_channel` is set.
    #[serde(default)]
    pub body: ByteString,
    /// A single-reader channel carrying the rest of the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_channel: Option<String>,
    /// The client's address.
    #[serde(default)]
    pub client: Option<HostPort>,
    /// The server's address.
    #[serde(default)]
    pub server: Option<HostPort>,
    /// Who the interface server authenticated (a verified token's `sub` and configured claims);
    /// absent when anonymous. Set only by the server, never from anything a client sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Map>,
}

impl HttpRequest {
    /// A request with the required keys; the rest take their defaults.
    pub fn new(
        reply_channel: impl Into<String>,
        method: impl Into<String>,
        path: impl Into<String>,
    ) -> Self {
        HttpRequest {
            reply_channel: reply_channel.into(),
            http_version: "1.1".to_owned(),
            method: method.into(),
            scheme: default_scheme(),
            path: path.into(),
            ..Default::default()
        }
    }

    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header_value(&self.headers, name)
    }
}

/// The first value of header `name` (lowercase) in `headers`.
pub fn header_value<'a>(headers: &'a [Header], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.as_slice().eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v.as_slice())
}

/// `http.request.body?…`: one chunk of a request body on its `body_channel`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HttpRequestBodyChunk {
    /// The bytes.
    #[serde(default)]
    pub content: ByteString,
    /// The client went away: abandon the request.
    #[serde(default, skip_serializing_if = "is_false")]
    pub closed: bool,
    /// More chunks follow.
    #[serde(default)]
    pub more_content: bool,
}

/// The response (first message, with `status`) or a further chunk (no `status`) on an HTTP reply
/// channel.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HttpResponse {
    /// The status code; present on the first message only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Response headers in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<Header>,
    /// Body bytes.
    #[serde(default)]
    pub content: ByteString,
    /// More chunks follow.
    #[serde(default)]
    pub more_content: bool,
}

impl HttpResponse {
    /// A complete response.
    pub fn new(status: u16, headers: Vec<Header>, content: impl Into<ByteString>) -> Self {
        HttpResponse {
            status: Some(status),
            headers,
            content: content.into(),
            more_content: false,
        }
    }
    /// A further body chunk.
    pub fn chunk(content: impl Into<ByteString>, more_content: bool) -> Self {
        HttpResponse {
            status: None,
            headers: Vec::new(),
            content: content.into(),
            more_content,
        }
    }
}

/// `http.disconnect`: the client went away before or after its response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HttpDisconnect {
    /// The request's reply channel (identification only).
    pub reply_channel: String,
    /// The request's path.
    pub path: String,
}

impl HttpDisconnect {
    /// A disconnect for a request.
    pub fn new(reply_channel: impl Into<String>, path: impl Into<String>) -> Self {
        HttpDisconnect {
            reply_channel: reply_channel.into(),
            path: path.into(),
        }
    }
}

/// `websocket.connect`: a client asks to open a socket; the reply decides the handshake.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WebsocketConnect {
    /// Where frames for this socket go.
    pub reply_channel: String,
    /// `ws` or `wss`.
    #[serde(default = "default_ws_scheme")]
    pub scheme: String,
    /// Percent-decoded path.
    pub path: String,
    /// Raw query string.
    #[serde(default)]
    pub query_string: ByteString,
    /// The mount point.
    #[serde(default)]
    pub root_path: String,
    /// Handshake headers, names lowercased.
    #[serde(default)]
    pub headers: Vec<Header>,
    /// The client's address.
    #[serde(default)]
    pub client: Option<HostPort>,
    /// The server's address.
    #[serde(default)]
    pub server: Option<HostPort>,
    /// Always 0.
    #[serde(default)]
    pub order: u64,
    /// Who the interface server authenticated (a verified token's `sub` and configured claims);
    /// absent when anonymous. Set only by the server, never from anything a client sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Map>,
    /// Switchyard's extension: this interface server takes the socket's owner from the accept
    /// (`x-switchyard-owner` in [`WebsocketSend`]). Other servers do not send it, so a worker
    /// names itself owner only to a server that will use it (daphne refuses unknown reply keys).
    #[serde(
        rename = "x-switchyard-owners",
        default,
        skip_serializing_if = "is_false"
    )]
    pub owners: bool,
}

fn default_ws_scheme() -> String {
    "ws".to_owned()
}

impl WebsocketConnect {
    /// A connect with the required keys.
    pub fn new(reply_channel: impl Into<String>, path: impl Into<String>) -> Self {
        WebsocketConnect {
            reply_channel: reply_channel.into(),
            scheme: default_ws_scheme(),
            path: path.into(),
            ..Default::default()
        }
    }

    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header_value(&self.headers, name)
    }
}

/// `websocket.receive`: one frame from the client (exactly one of `text` / `bytes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WebsocketReceive {
    /// The socket's reply channel.
    pub reply_channel: String,
    /// The socket's path.
    pub path: String,
    /// A text frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// A binary frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<ByteString>,
    /// 1 for the first frame, then 2, 3, …
    #[serde(default)]
    pub order: u64,
    /// Who the interface server authenticated (a verified token's `sub` and configured claims);
    /// absent when anonymous. Set only by the server, never from anything a client sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Map>,
}

impl WebsocketReceive {
    /// A text frame.
    pub fn text(
        reply_channel: impl Into<String>,
        path: impl Into<String>,
        text: impl Into<String>,
        order: u64,
    ) -> Self {
        Self::frame(
            reply_channel.into(),
            path.into(),
            Some(text.into()),
            None,
            order,
        )
    }
    /// A binary frame.
    pub fn bytes(
        reply_channel: impl Into<String>,
        path: impl Into<String>,
        bytes: impl Into<ByteString>,
        order: u64,
    ) -> Self {
        Self::frame(
            reply_channel.into(),
            path.into(),
            None,
            Some(bytes.into()),
            order,
        )
    }
    fn frame(
        reply_channel: String,
        path: String,
        text: Option<String>,
        bytes: Option<ByteString>,
        order: u64,
    ) -> Self {
        WebsocketReceive {
            reply_channel,
            path,
            text,
            bytes,
            order,
            user: None,
        }
    }
}

/// `websocket.disconnect`: the socket closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WebsocketDisconnect {
    /// The socket's reply channel (identification only).
    pub reply_channel: String,
    /// The socket's path.
    pub path: String,
    /// The close code (1005 when the client sent none, 1006 when the connection dropped).
    pub code: u16,
    /// One more than the last frame's order.
    #[serde(default)]
    pub order: u64,
}

impl WebsocketDisconnect {
    /// A disconnect.
    pub fn new(
        reply_channel: impl Into<String>,
        path: impl Into<String>,
        code: u16,
        order: u64,
    ) -> Self {
        WebsocketDisconnect {
            reply_channel: reply_channel.into(),
            path: path.into(),
            code,
            order,
        }
    }
}

/// The `close` key of a socket reply: `true` (code 1000) or a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Close {
    /// `true` closes with 1000; `false` does not close.
    Flag(bool),
    /// Close with this code.
    Code(u16),
}

impl Close {
    /// The close code this asks for, if any.
    pub fn code(self) -> Option<u16> {
        match self {
            Close::Flag(true) => Some(1000),
            Close::Flag(false) => None,
            Close::Code(c) => Some(c),
        }
    }
}

/// A reply to a socket on its reply channel: accept, a frame, close, or a combination.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WebsocketSend {
    /// Accept (`true`) or reject (`false`) a pending handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept: Option<bool>,
    /// A text frame to send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// A binary frame to send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<ByteString>,
    /// Close the socket (after sending any frame).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close: Option<Close>,
    /// Switchyard's extension, in an accept only: the worker that accepted a strictly ordered
    /// socket names itself its owner, and the interface server sends the socket's frames and
    /// disconnect to that owner's channels instead of the shared ones (servers that do not know
    /// the key ignore it, as ASGI says of unknown keys).
    #[serde(
        rename = "x-switchyard-owner",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub owner: Option<String>,
}

impl WebsocketSend {
    /// `{"accept": true}`
    pub fn accept() -> Self {
        WebsocketSend {
            accept: Some(true),
            ..Default::default()
        }
    }
    /// `{"text": …}`
    pub fn text(text: impl Into<String>) -> Self {
        WebsocketSend {
            text: Some(text.into()),
            ..Default::default()
        }
    }
    /// `{"bytes": …}`
    pub fn bytes(bytes: impl Into<ByteString>) -> Self {
        WebsocketSend {
            bytes: Some(bytes.into()),
            ..Default::default()
        }
    }
    /// `{"close": true}` or `{"close": code}`.
    pub fn close(code: Option<u16>) -> Self {
        WebsocketSend {
            close: Some(code.map_or(Close::Flag(true), Close::Code)),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_encodes_like_daphne() {
        let m = WebsocketReceive::text("r!x", "/p/", "hi", 1);
        let json = serde_json::to_string(&m).expect("encodes");
        assert_eq!(
            json,
            r#"{"reply_channel":"r!x","path":"/p/","text":"hi","order":1}"#
        );
        let packed = rmp_serde::to_vec_named(&WebsocketReceive::bytes("r!x", "/", b"\x00", 2))
            .expect("packs");
        let back: WebsocketReceive = rmp_serde::from_slice(&packed).expect("unpacks");
        assert_eq!(
            back.bytes.as_ref().map(ByteString::as_slice),
            Some(&b"\x00"[..])
        );
        assert_eq!(back.text, None);
    }

    #[test]
    fn close_is_bool_or_code() {
        let a: WebsocketSend = serde_json::from_str(r#"{"close": true}"#).expect("bool");
        let b: WebsocketSend =
            serde_json::from_str(r#"{"close": 4001, "text": "bye"}"#).expect("code");
        assert_eq!(a.close.and_then(Close::code), Some(1000));
        assert_eq!(b.close.and_then(Close::code), Some(4001));
        assert_eq!(b.text.as_deref(), Some("bye"));
        let c: WebsocketSend = serde_json::from_str(r#"{"accept": true}"#).expect("accept");
        assert_eq!(c, WebsocketSend::accept());
    }

    #[test]
    fn request_defaults_and_headers() {
        let packed = rmp_serde::to_vec_named(
            &crate::value::Map::new()
                .with("reply_channel", "x!y")
                .with("http_version", "1.1")
                .with("method", "GET")
                .with("path", "/")
                .with(
                    "headers",
                    vec![crate::value::Value::Array(vec![
                        ByteString::from("host").into(),
                        ByteString::from("a.b").into(),
                    ])],
                ),
        )
        .expect("packs");
        let r: HttpRequest = rmp_serde::from_slice(&packed).expect("unpacks");
        assert_eq!(r.scheme, "http");
        assert_eq!(r.header("host"), Some(&b"a.b"[..]));
        assert_eq!(r.body_channel, None);
    }

    #[test]
    fn owner_keys_are_the_fields_names() {
        let mut connect = WebsocketConnect::new("r!x", "/");
        connect.owners = true;
        let connect = serde_json::to_value(&connect).expect("encodes");
        assert_eq!(connect[OWNERS_KEY], serde_json::json!(true));
        let accept = WebsocketSend {
            owner: Some("o".into()),
            ..WebsocketSend::accept()
        };
        let accept = serde_json::to_value(&accept).expect("encodes");
        assert_eq!(accept[OWNER_KEY], serde_json::json!("o"));
    }
}

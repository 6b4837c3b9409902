//! Encoding messages: msgpack for the wire (as Python's channels_redis writes it) and JSON for
//! people (CLI, logs, HTTP).
//!
//! msgpack uses named maps (`rmp_serde::to_vec_named`), so structs become maps, never arrays, and
//! byte strings become `bin`. JSON boxes byte strings as `{"$bytes": "<base64>"}`.

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// An encode or decode failure, with what was being done.
#[derive(Debug, Error)]
pub enum CodecError {
    /// msgpack encoding failed.
    #[error("cannot encode message as msgpack: {0}")]
    MsgpackEncode(#[from] rmp_serde::encode::Error),
    /// msgpack decoding failed.
    #[error("cannot decode msgpack message: {0}")]
    MsgpackDecode(#[from] rmp_serde::decode::Error),
    /// JSON failed either way.
    #[error("invalid JSON message: {0}")]
    Json(#[from] serde_json::Error),
    /// The top level is not a map.
    #[error("a message must be a map at the top level")]
    NotAMap,
}

/// Encodes a message as msgpack with named fields.
pub fn to_msgpack<T: Serialize + ?Sized>(message: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec_named(message)?)
}

/// Decodes a msgpack message.
pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

/// Encodes a message as JSON.
pub fn to_json<T: Serialize + ?Sized>(message: &T) -> Result<String, CodecError> {
    Ok(serde_json::to_string(message)?)
}

/// Decodes a JSON message.
pub fn from_json<T: DeserializeOwned>(text: &str) -> Result<T, CodecError> {
    Ok(serde_json::from_str(text)?)
}

/// Re-encodes a msgpack message as JSON (for logs and the CLI).
pub fn msgpack_to_json(bytes: &[u8]) -> Result<String, CodecError> {
    let value: crate::value::Value = from_msgpack(bytes)?;
    to_json(&value)
}

/// Re-encodes a JSON message as msgpack; the top level must be a map.
pub fn json_to_msgpack(text: &str) -> Result<Vec<u8>, CodecError> {
    let value: crate::value::Value = from_json(text)?;
    if value.as_map().is_none() {
        return Err(CodecError::NotAMap);
    }
    to_msgpack(&value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asgi::WebsocketReceive;

    #[test]
    fn json_and_msgpack_round_trip_bytes() {
        let m = WebsocketReceive::bytes("a!b", "/", &b"\xff\x00"[..], 3);
        let packed = to_msgpack(&m).expect("packs");
        let json = msgpack_to_json(&packed).expect("to json");
        assert_eq!(
            json,
            r#"{"reply_channel":"a!b","path":"/","bytes":{"$bytes":"/wA="},"order":3}"#
        );
        let back: WebsocketReceive =
            from_msgpack(&json_to_msgpack(&json).expect("to msgpack")).expect("decodes");
        assert_eq!(back, m);
        assert!(matches!(json_to_msgpack("[1]"), Err(CodecError::NotAMap)));
        assert!(matches!(json_to_msgpack("{"), Err(CodecError::Json(_))));
    }
}

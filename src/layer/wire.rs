//! The bytes of a stored message, shared by both backends and compatible with channels_redis 4.x.
//!
//! A stored payload is a msgpack map. A message for a process-local (`!`) channel carries its full
//! target under `__asgi_channel__`: a string for a direct send, a list of names for a group send
//! that reaches several channels behind the same inbox. This module splices that key into an
//! already-encoded map (so a message is encoded once however many inboxes it goes to) and reads it
//! back without decoding the rest. Redis adds 12 random bytes in front of the payload (the sorted
//! set needs unique members); see [`RANDOM_PREFIX_LEN`].

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use switchyard_routing::Map;
use switchyard_routing::codec::{self, CodecError};

/// The key naming a `!` message's target channel(s).
pub const CHANNEL_KEY: &str = "__asgi_channel__";

/// Length of channels_redis' random member prefix.
pub const RANDOM_PREFIX_LEN: usize = 12;

/// Where a payload says it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// No `__asgi_channel__`: the message belongs to the channel it was read from.
    Unnamed,
    /// One full channel name (a direct send).
    One(String),
    /// Several full channel names (a group send).
    Many(Vec<String>),
}

/// Reads the top-level map header: (entry count, header length).
fn map_header(payload: &[u8]) -> Result<(u32, usize), CodecError> {
    let mut rest = payload;
    let count = rmp::decode::read_map_len(&mut rest).map_err(|_| CodecError::NotAMap)?;
    Ok((count, payload.len() - rest.len()))
}

fn write_map_header(out: &mut Vec<u8>, count: u32) {
    // Writing msgpack into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(out, count);
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing msgpack into a Vec cannot fail.
    let _ = rmp::encode::write_str(out, s);
}

/// Copies `payload` (a msgpack map without `__asgi_channel__`) with the target(s) added, after
/// `prefix_len` zero bytes that the caller fills (Redis' random member prefix).
pub fn with_targets(
    payload: &[u8],
    targets: &[&str],
    prefix_len: usize,
) -> Result<Vec<u8>, CodecError> {
    let (count, header_len) = map_header(payload)?;
    let names_len: usize = targets.iter().map(|t| t.len() + 5).sum();
    let mut out = Vec::with_capacity(prefix_len + payload.len() + 24 + names_len);
    out.resize(prefix_len, 0);
    if targets.is_empty() {
        out.extend_from_slice(payload);
        return Ok(out);
    }
    write_map_header(&mut out, count + 1);
    out.extend_from_slice(&payload[header_len..]);
    write_str(&mut out, CHANNEL_KEY);
    if let [one] = targets {
        write_str(&mut out, one);
    } else {
        let _ = rmp::encode::write_array_len(&mut out, targets.len() as u32);
        for t in targets {
            write_str(&mut out, t);
        }
    }
    Ok(out)
}

/// Checks that `payload` is a msgpack map, so that garbage never reaches a channel.
pub fn check_is_map(payload: &[u8]) -> Result<(), CodecError> {
    map_header(payload).map(|_| ())
}

struct TargetsOnly(Targets);

impl<'de> Deserialize<'de> for TargetsOnly {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TargetsOnly;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TargetsOnly, A::Error> {
                let mut found = Targets::Unnamed;
                while let Some(key) = map.next_key::<KeyName>()? {
                    if key.0 {
                        found = map.next_value::<TargetsValue>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(TargetsOnly(found))
            }
        }
        d.deserialize_map(V)
    }
}

/// A map key, reduced to "is it `__asgi_channel__`".
struct KeyName(bool);

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyName, E> {
                Ok(KeyName(v == CHANNEL_KEY))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<KeyName, E> {
                Ok(KeyName(v == CHANNEL_KEY.as_bytes()))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyName, E> {
                Ok(KeyName(false))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyName, E> {
                Ok(KeyName(false))
            }
        }
        d.deserialize_any(V)
    }
}

struct TargetsValue(Targets);

impl<'de> Deserialize<'de> for TargetsValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TargetsValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a channel name or a list of channel names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TargetsValue, E> {
                Ok(TargetsValue(Targets::One(v.to_owned())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TargetsValue, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    names.push(n);
                }
                Ok(TargetsValue(Targets::Many(names)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads `__asgi_channel__` from a payload without decoding the rest.
pub fn read_targets(payload: &[u8]) -> Result<Targets, CodecError> {
    Ok(rmp_serde::from_slice::<TargetsOnly>(payload)?.0)
}

/// Decodes a payload into a typed message (unknown keys, including `__asgi_channel__`, ignored).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    codec::from_msgpack(payload)
}

/// Decodes a payload into a map without `__asgi_channel__`.
pub fn decode_map(payload: &[u8]) -> Result<Map, CodecError> {
    let mut map: Map = codec::from_msgpack(payload)?;
    map.remove(CHANNEL_KEY);
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_routing::{ByteString, Value};

    #[test]
    fn splices_one_target_like_channels_redis() {
        let m = Map::new()
            .with("status", 200)
            .with("content", ByteString::from("hi"));
        let payload = codec::to_msgpack(&m).expect("packs");
        let out =
            with_targets(&payload, &["daphne.response.ABCDEFGHIJ!klmnopqrst"], 0).expect("splices");
        assert_eq!(
            out,
            b"\x83\xa6status\xcc\xc8\xa7content\xc4\x02hi\xb0__asgi_channel__\xd9%daphne.response.ABCDEFGHIJ!klmnopqrst"
        );
        assert_eq!(
            read_targets(&out).expect("reads"),
            Targets::One("daphne.response.ABCDEFGHIJ!klmnopqrst".into())
        );
        assert_eq!(decode_map(&out).expect("decodes"), m);
    }

    #[test]
    fn splices_lists_and_grows_the_header() {
        let m: Map = (0..15).map(|i| (format!("k{i}"), Value::Int(i))).collect();
        let payload = codec::to_msgpack(&m).expect("packs");
        assert_eq!(payload[0], 0x8f);
        let out = with_targets(&payload, &["a!1", "a!2"], 12).expect("splices");
        assert_eq!(&out[..12], &[0u8; 12]);
        assert_eq!(out[12], 0xde);
        assert_eq!(
            read_targets(&out[12..]).expect("reads"),
            Targets::Many(vec!["a!1".into(), "a!2".into()])
        );
        assert_eq!(decode_map(&out[12..]).expect("decodes"), m);
    }

    #[test]
    fn refuses_non_maps() {
        assert!(with_targets(b"\x93\x01\x02\x03", &["a!b"], 0).is_err());
        assert!(check_is_map(b"").is_err());
        assert!(read_targets(b"\xc1garbage").is_err());
        assert_eq!(read_targets(b"\x80").expect("empty map"), Targets::Unnamed);
        // A map16/map32 header cut short is not a map.
        assert!(check_is_map(b"\xde\x00").is_err());
        assert!(check_is_map(b"\xdf\x00\x00\x00").is_err());
    }

    #[test]
    fn headers_take_the_shortest_form() {
        for (count, header) in [
            (0, &b"\x80"[..]),
            (15, b"\x8f"),
            (16, b"\xde\x00\x10"),
            (65_535, b"\xde\xff\xff"),
            (65_536, b"\xdf\x00\x01\x00\x00"),
        ] {
            let mut out = Vec::new();
            write_map_header(&mut out, count);
            assert_eq!(out, header);
            assert_eq!(map_header(&out).expect("a map"), (count, header.len()));
        }
    }
}

//! Encoding `websocket.receive`, the one message built for every client frame. A socket opened
//! with a token repeats the same `user` claims in each of its frames, so they are encoded once
//! per socket (at the handshake and on a token refresh, [`UserEntry`]) and their bytes appended
//! to each frame's message, which counts one more map entry: byte for byte what encoding the
//! claims with every frame gave, without walking the claims map per frame.

use serde::Serialize;
use switchyard_routing::Map;
use switchyard_routing::codec::CodecError;
use thiserror::Error;

/// The key the claims ride under, as msgpack (a fixstr).
const USER_KEY: &[u8] = b"\xa4user";

/// A `websocket.receive` that could not be encoded.
#[derive(Debug, Error)]
pub(crate) enum ReceiveEncodeError {
    /// msgpack encoding failed.
    #[error("cannot encode websocket.receive: {0}")]
    Msgpack(#[from] rmp_serde::encode::Error),
    /// The encoded message is not a msgpack map (cannot happen for a struct encoded with names).
    #[error("websocket.receive is not a msgpack map")]
    NotAMap,
    /// The map already holds the most entries msgpack can count.
    #[error("websocket.receive has too many entries for one more")]
    TooManyEntries,
}

/// `websocket.receive` without `user`, serialized straight from the frame (no owned copies
/// before msgpack). The fields keep the order consumers have always seen; `user` comes last.
#[derive(Serialize)]
pub(crate) struct ReceiveRef<'a> {
    pub(crate) reply_channel: &'a str,
    pub(crate) path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bytes: Option<BinRef<'a>>,
    pub(crate) order: u64,
}

/// A frame's bytes, written as msgpack `bin`.
pub(crate) struct BinRef<'a>(pub(crate) &'a [u8]);

impl Serialize for BinRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// A socket's verified claims and their `user` map entry (key and value) in msgpack.
#[derive(Debug)]
pub(crate) struct UserEntry {
    claims: Map,
    encoded: Box<[u8]>,
}

impl UserEntry {
    /// Encodes the claims once, for every frame of the socket.
    pub(crate) fn new(claims: Map) -> Result<Self, CodecError> {
        let value = switchyard_routing::codec::to_msgpack(&claims)?;
        let mut encoded = Vec::with_capacity(USER_KEY.len() + value.len());
        encoded.extend_from_slice(USER_KEY);
        encoded.extend_from_slice(&value);
        Ok(UserEntry {
            claims,
            encoded: encoded.into_boxed_slice(),
        })
    }

    /// The claims.
    pub(crate) fn claims(&self) -> &Map {
        &self.claims
    }
}

/// Encodes a frame's `websocket.receive`, with the socket's `user` when it has one.
pub(crate) fn encode(
    message: &ReceiveRef<'_>,
    user: Option<&UserEntry>,
) -> Result<Vec<u8>, ReceiveEncodeError> {
    // Sized up front (keys, markers and the order fit in 64 bytes): the message is written
    // without the buffer growing (and being copied) on the way.
    let frame = message.text.map_or(0, str::len) + message.bytes.as_ref().map_or(0, |b| b.0.len());
    let extra = user.map_or(0, |u| u.encoded.len());
    let mut out =
        Vec::with_capacity(64 + message.reply_channel.len() + message.path.len() + frame + extra);
    rmp_serde::encode::write_named(&mut out, message)?;
    if let Some(user) = user {
        append_entry(&mut out, &user.encoded)?;
    }
    Ok(out)
}

/// Appends an encoded entry (key then value) to the msgpack map in `map`, counting it in the
/// map's header (a fixmap of 15 becomes a map16, a map16 of 65,535 a map32).
fn append_entry(map: &mut Vec<u8>, entry: &[u8]) -> Result<(), ReceiveEncodeError> {
    match *map.first().ok_or(ReceiveEncodeError::NotAMap)? {
        fixmap @ 0x80..=0x8e => map[0] = fixmap + 1,
        0x8f => {
            map.splice(0..1, [0xde, 0x00, 0x10]);
        }
        0xde => {
            let count = map
                .get(1..3)
                .and_then(|b| <[u8; 2]>::try_from(b).ok())
                .map(u16::from_be_bytes)
                .ok_or(ReceiveEncodeError::NotAMap)?;
            match count.checked_add(1) {
                Some(n) => map[1..3].copy_from_slice(&n.to_be_bytes()),
                None => {
                    let n = u32::from(count) + 1;
                    let mut header = [0xdf, 0, 0, 0, 0];
                    header[1..].copy_from_slice(&n.to_be_bytes());
                    map.splice(0..3, header);
                }
            }
        }
        0xdf => {
            let count = map
                .get(1..5)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or(ReceiveEncodeError::NotAMap)?;
            let n = count
                .checked_add(1)
                .ok_or(ReceiveEncodeError::TooManyEntries)?;
            map[1..5].copy_from_slice(&n.to_be_bytes());
        }
        _ => return Err(ReceiveEncodeError::NotAMap),
    }
    map.extend_from_slice(entry);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_routing::Value;
    use switchyard_routing::codec::{from_msgpack, to_msgpack};

    /// The message as it was encoded before the claims were cached: `user` serialized with
    /// every frame. The spliced encoding must match it byte for byte.
    #[derive(Serialize)]
    struct FullReceive<'a> {
        reply_channel: &'a str,
        path: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        text: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        bytes: Option<BinRef<'a>>,
        order: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a Map>,
    }

    fn claims() -> Vec<Map> {
        vec![
            Map::new(),
            Map::new().with("sub", "bench"),
            Map::new()
                .with("sub", "alice")
                .with("roles", Value::Array(vec!["admin".into(), "ops".into()]))
                .with("tenant", 42)
                .with("scope", Value::Map(Map::new().with("read", true))),
            // Long enough that the claims themselves need str16 and map16.
            (0..20).fold(Map::new().with("sub", "x".repeat(300)), |m, i| {
                m.with(&format!("claim{i}"), i64::from(i) * 1_000_000)
            }),
        ]
    }

    #[test]
    fn spliced_user_is_byte_identical_to_full_encoding() {
        let long_channel = format!("websocket.send!{}", "c".repeat(200));
        let channels = ["websocket.send!AbCdEf12", long_channel.as_str()];
        // fixstr, str8, str16 and str32 text.
        let (t31, t255, t70k) = ("t".repeat(31), "t".repeat(255), "t".repeat(70_000));
        let texts = [
            None,
            Some(""),
            Some("hello"),
            Some(&*t31),
            Some(&*t255),
            Some(&*t70k),
        ];
        let blobs: [Option<&[u8]>; 4] = [None, Some(b""), Some(b"\x00\xff"), Some(&[7; 300])];
        let mut checked = 0;
        for reply_channel in channels {
            for text in texts {
                for bytes in blobs {
                    for order in [1, 127, 128, 65_536, u64::MAX] {
                        let frame = ReceiveRef {
                            reply_channel,
                            path: "/ws/echo/",
                            text,
                            bytes: bytes.map(BinRef),
                            order,
                        };
                        let anonymous = FullReceive {
                            reply_channel,
                            path: "/ws/echo/",
                            text,
                            bytes: bytes.map(BinRef),
                            order,
                            user: None,
                        };
                        assert_eq!(
                            encode(&frame, None).expect("encodes"),
                            to_msgpack(&anonymous).expect("encodes")
                        );
                        for user in claims() {
                            let entry = UserEntry::new(user.clone()).expect("claims encode");
                            let full = FullReceive {
                                user: Some(&user),
                                bytes: bytes.map(BinRef),
                                ..anonymous
                            };
                            let spliced = encode(&frame, Some(&entry)).expect("encodes");
                            assert_eq!(spliced, to_msgpack(&full).expect("encodes"));
                            let back: Map = from_msgpack(&spliced).expect("decodes");
                            assert_eq!(back.get("user"), Some(&Value::Map(user)));
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 2 * 6 * 4 * 5 * 4);
    }

    /// The struct never has more than six entries, but the header arithmetic is right for any
    /// map: fixmap, fixmap to map16, map16, map16 to map32.
    #[test]
    fn appending_counts_the_entry_in_every_header_size() {
        let entry = UserEntry::new(Map::new().with("sub", "bench")).expect("encodes");
        for entries in [0, 1, 14, 15, 16, 300, 65_534, 65_535, 65_536] {
            let map = Map((0..entries)
                .map(|i| (format!("k{i}"), Value::Int(i)))
                .collect());
            let mut spliced = to_msgpack(&map).expect("encodes");
            append_entry(&mut spliced, &entry.encoded).expect("appends");
            let full = map.with("user", Value::Map(entry.claims().clone()));
            assert_eq!(
                spliced,
                to_msgpack(&full).expect("encodes"),
                "{entries} entries"
            );
        }
    }

    #[test]
    fn appending_to_what_is_not_a_map_fails() {
        for not_a_map in [&b""[..], b"\x90", b"\xa3abc", b"\xde\x00", b"\xdf\x00\x00"] {
            let mut bytes = not_a_map.to_vec();
            assert!(matches!(
                append_entry(&mut bytes, b"\xa1k\x01"),
                Err(ReceiveEncodeError::NotAMap)
            ));
        }
        let mut full = vec![0xdf, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            append_entry(&mut full, b"\xa1k\x01"),
            Err(ReceiveEncodeError::TooManyEntries)
        ));
    }
}

//! Strict ordering per connection, kept in the layer so any worker can take any message.
//!
//! Each connection (reply channel) has a `next` order. A worker asks the [`Gate`] before running
//! a message: `order == next` runs, `order > next` is parked in the layer (the check and the park
//! are one atomic step: one Lua script on Redis, one lock in memory), `order < next` was run
//! already and is dropped. When a message has run, [`Layer::ordering_done`] advances `next` and
//! hands back the parked successor, if any, for the worker to send to its original channel, where
//! it passes the gate. This is Channels 1's `enforce_ordering` without its race (a message parked
//! between a check and a save).
//!
//! On Redis the state is one hash per connection, `{prefix}:order:{reply_channel}`: field `next`,
//! and `p:{order}` = original channel, NUL, msgpack payload for each parked message; every script
//! touches only that key (cluster-safe) and renews its expiry (the group expiry).

use std::sync::LazyLock;

use bytes::Bytes;
use redis::Script;
use switchyard_routing::names;

use super::session::MemoryConnections;
use super::{Layer, LayerError};

/// What the gate decided for a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Its turn: run it, then call [`Layer::ordering_done`].
    Run,
    /// Ahead of its turn: parked in the layer, resumed when its predecessor is done.
    Parked,
    /// Its turn has passed (or it is parked already): a duplicate, drop it.
    Stale,
}

/// KEYS[1] state hash; ARGV: order, parked value, ttl (s). Returns 1 run, 0 parked, 2 stale.
static GATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local nxt = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
local order = tonumber(ARGV[1])
if order < nxt then return 2 end
if order == nxt then return 1 end
if redis.call('HSETNX', KEYS[1], 'p:' .. ARGV[1], ARGV[2]) == 0 then return 2 end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 0
",
    )
});

/// KEYS[1] state hash; ARGV: order done, ttl (s), last (1 after a disconnect).
/// Returns the parked successor's value, or nil.
static DONE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local nxt = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
local order = tonumber(ARGV[1])
if order >= nxt then
  nxt = order + 1
  redis.call('HSET', KEYS[1], 'next', nxt)
end
local field = 'p:' .. nxt
local parked = redis.call('HGET', KEYS[1], field)
if parked then
  redis.call('HDEL', KEYS[1], field)
end
if ARGV[3] == '1' and redis.call('HLEN', KEYS[1]) <= 1 then
  redis.call('DEL', KEYS[1])
else
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return parked
",
    )
});

fn order_key(layer: &Layer, reply_channel: &str) -> String {
    format!("{}:order:{}", layer.settings().prefix, reply_channel)
}

fn pack(channel: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(channel.len() + 1 + payload.len());
    v.extend_from_slice(channel.as_bytes());
    v.push(0);
    v.extend_from_slice(payload);
    v
}

fn unpack(value: &[u8]) -> Result<(String, Bytes), LayerError> {
    let nul = value
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| LayerError::Protocol("parked message without its channel".into()))?;
    let channel = std::str::from_utf8(&value[..nul])
        .map_err(|_| LayerError::Protocol("parked message with a non-UTF-8 channel".into()))?;
    Ok((
        channel.to_owned(),
        Bytes::copy_from_slice(&value[nul + 1..]),
    ))
}

impl Layer {
    /// Decides whether the message `order` of connection `reply_channel`, read from `channel`
    /// as `payload`, runs now; parks it in the layer when it is ahead.
    pub async fn ordering_gate(
        &self,
        reply_channel: &str,
        order: u64,
        channel: &str,
        payload: &[u8],
    ) -> Result<Gate, LayerError> {
        names::validate_channel(reply_channel)?;
        match self {
            Layer::Memory(l) => {
                let expiry = l.settings().group_expiry;
                let sweep = l.connections().sweep_due();
                let mut map = l.connections().lock();
                if sweep {
                    MemoryConnections::sweep(&mut map, expiry);
                }
                let c = MemoryConnections::entry(&mut map, reply_channel, expiry);
                Ok(if order < c.next_order || c.parked.contains_key(&order) {
                    Gate::Stale
                } else if order == c.next_order {
                    Gate::Run
                } else {
                    c.parked
                        .insert(order, (channel.to_owned(), Bytes::copy_from_slice(payload)));
                    Gate::Parked
                })
            }
            Layer::Redis(l) => {
                let key = order_key(self, reply_channel);
                let (shard, mut conn) = l.conn_for(reply_channel);
                let ttl = self.settings().group_expiry.as_secs().max(1);
                let value = pack(channel, payload);
                let verdict: i64 = l
                    .run(shard, async move {
                        GATE_SCRIPT
                            .key(&key)
                            .arg(order)
                            .arg(value)
                            .arg(ttl)
                            .invoke_async(&mut conn)
                            .await
                    })
                    .await?;
                Ok(match verdict {
                    1 => Gate::Run,
                    0 => Gate::Parked,
                    _ => Gate::Stale,
                })
            }
        }
    }

    /// Records that message `order` of the connection has run (`last`: it was the disconnect, so
    /// the state can go) and returns its parked successor, `(original channel, payload)`, which
    /// the caller must send to that channel.
    pub async fn ordering_done(
        &self,
        reply_channel: &str,
        order: u64,
        last: bool,
    ) -> Result<Option<(String, Bytes)>, LayerError> {
        names::validate_channel(reply_channel)?;
        match self {
            Layer::Memory(l) => {
                let expiry = l.settings().group_expiry;
                let mut map = l.connections().lock();
                let c = MemoryConnections::entry(&mut map, reply_channel, expiry);
                if order >= c.next_order {
                    c.next_order = order + 1;
                }
                let next = c.next_order;
                let parked = c.parked.remove(&next);
                if last && c.parked.is_empty() && c.session.is_empty() {
                    map.remove(reply_channel);
                }
                Ok(parked)
            }
            Layer::Redis(l) => {
                let key = order_key(self, reply_channel);
                let (shard, mut conn) = l.conn_for(reply_channel);
                let ttl = self.settings().group_expiry.as_secs().max(1);
                let parked: Option<Vec<u8>> = l
                    .run(shard, async move {
                        DONE_SCRIPT
                            .key(&key)
                            .arg(order)
                            .arg(ttl)
                            .arg(if last { "1" } else { "0" })
                            .invoke_async(&mut conn)
                            .await
                    })
                    .await?;
                parked.map(|p| unpack(&p)).transpose()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::LayerSettings;

    #[tokio::test]
    async fn memory_gate_parks_and_resumes_in_order() {
        let layer = Layer::from_url("memory://", LayerSettings::default())
            .await
            .unwrap();
        let r = "w.x!c1";
        assert_eq!(
            layer.ordering_gate(r, 2, "ch", b"\x80").await.unwrap(),
            Gate::Parked
        );
        assert_eq!(
            layer.ordering_gate(r, 2, "ch", b"\x80").await.unwrap(),
            Gate::Stale
        );
        assert_eq!(
            layer.ordering_gate(r, 1, "ch", b"\x81").await.unwrap(),
            Gate::Parked
        );
        assert_eq!(
            layer.ordering_gate(r, 0, "ch", b"\x82").await.unwrap(),
            Gate::Run
        );
        let next = layer.ordering_done(r, 0, false).await.unwrap();
        assert_eq!(next, Some(("ch".to_owned(), Bytes::from_static(b"\x81"))));
        assert_eq!(
            layer.ordering_gate(r, 0, "ch", b"\x82").await.unwrap(),
            Gate::Stale
        );
        assert_eq!(
            layer.ordering_gate(r, 1, "ch", b"\x81").await.unwrap(),
            Gate::Run
        );
        let next = layer.ordering_done(r, 1, false).await.unwrap();
        assert_eq!(next.map(|n| n.1), Some(Bytes::from_static(b"\x80")));
        assert_eq!(
            layer.ordering_gate(r, 2, "ch", b"\x80").await.unwrap(),
            Gate::Run
        );
        assert_eq!(layer.ordering_done(r, 2, true).await.unwrap(), None);
    }

    #[test]
    fn pack_round_trip() {
        let p = pack("websocket.receive", b"\x81\x00x");
        assert_eq!(
            unpack(&p).unwrap(),
            (
                "websocket.receive".to_owned(),
                Bytes::from_static(b"\x81\x00x")
            )
        );
        assert!(unpack(b"nochannel").is_err());
    }
}

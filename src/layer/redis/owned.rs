//! Connection owners on Redis (see [`crate::layer::owner`]): an owner's lease is a process lease
//! (`lease`), its channel an ordinary channel key, and taking its sockets back is one script
//! that moves the waiting messages and sets the connections' ordering state together.
//!
//! `{prefix}:owner-set:{owner}` is the hash of connections whose ordering state a take-back
//! has set (reply channel → the order it was set to), so that a later take-back (another server,
//! a reaper, the socket's own next message) leaves it alone: an order set from a moved frame is
//! lower than the socket's next one and must not be raised past that frame.

use std::sync::LazyLock;

use bytes::Bytes;
use redis::Script;
use serde::Deserialize;
use serde::de::IgnoredAny;
use switchyard_routing::asgi::{WEBSOCKET_DISCONNECT, WEBSOCKET_RECEIVE};

use super::RedisLayer;
use crate::layer::owner::owner_channel;
use crate::layer::{LayerError, now_ms, wire};

/// KEYS[1] the owner's channel, KEYS[2] `websocket.receive`, KEYS[3] `websocket.disconnect`,
/// KEYS[4] the owner's set record, KEYS[4 + c] the ordering state of connection c.
/// ARGV[1] now (ms), ARGV[2] the state's ttl (s), ARGV[3] the channels' ttl (s), ARGV[4] the
/// number of messages n, ARGV[5] the number of connections; then per message its target (2 or
/// 3), score, member, connection (0 when unknown) and order; then each connection's reply
/// channel; then the seeded connection (0 for none) and its order. Moves each message still in
/// the owner's channel (ZREM then ZADD, score kept), sets the state of every connection moved to
/// its lowest order moved, then the seed, each only when not set before. Returns the messages
/// moved.
const TAKE_BACK_LUA: &str = r"
local now, ttl, chttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local n, c = tonumber(ARGV[4]), tonumber(ARGV[5])
local lowest = {}
local touched = {}
local moved = 0
local i = 6
for _ = 1, n do
  local to = tonumber(ARGV[i])
  if redis.call('ZREM', KEYS[1], ARGV[i + 2]) == 1 then
    redis.call('ZADD', KEYS[to], ARGV[i + 1], ARGV[i + 2])
    touched[to] = true
    moved = moved + 1
    local conn = tonumber(ARGV[i + 3])
    if conn > 0 then
      local order = tonumber(ARGV[i + 4])
      if not lowest[conn] or order < lowest[conn] then lowest[conn] = order end
    end
  end
  i = i + 5
end
for to, _ in pairs(touched) do redis.call('EXPIRE', KEYS[to], chttl) end
local function set(conn, order)
  if redis.call('HSETNX', KEYS[4], ARGV[i + conn - 1], order) == 1 then
    local key = KEYS[4 + conn]
    redis.call('HSET', key, 'next', order, 'run', 0, 'e', now + ttl * 1000)
    redis.call('EXPIRE', key, ttl)
  end
end
for conn = 1, c do
  if lowest[conn] then set(conn, lowest[conn]) end
end
local seed = tonumber(ARGV[i + c])
if seed > 0 then set(seed, tonumber(ARGV[i + c + 1])) end
redis.call('EXPIRE', KEYS[4], ttl)
return moved
";

static TAKE_BACK: LazyLock<Script> = LazyLock::new(|| Script::new(TAKE_BACK_LUA));

/// Most messages one take-back call moves (bounds the script's arguments).
const TAKE_BACK_CHUNK: isize = 500;

/// What a take-back reads of a waiting message.
#[derive(Deserialize)]
struct Addressed {
    reply_channel: String,
    order: u64,
    #[serde(default)]
    code: Option<IgnoredAny>,
}

impl RedisLayer {
    /// True when every key sits on one Redis server (not sharded, not a cluster).
    pub(crate) fn single_server(&self) -> bool {
        !self.is_cluster() && self.inner.shards.len() == 1
    }

    fn owner_set_key(&self, owner: &str) -> String {
        format!("{}:owner-set:{owner}", self.inner.settings.prefix)
    }

    /// True while `owner`'s lease is held and its deadline has not passed.
    pub(crate) async fn owner_alive(&self, owner: &str) -> Result<bool, LayerError> {
        let mut conn = self.inner.shards[0].conn.clone();
        let cmd = redis::cmd("ZSCORE")
            .arg(self.leases_key())
            .arg(owner)
            .to_owned();
        let deadline: Option<f64> = self
            .run(0, async move { cmd.query_async(&mut conn).await })
            .await?;
        Ok(deadline.is_some_and(|d| d as u64 > now_ms()))
    }

    /// See [`crate::layer::Layer::take_back_owned`]. Moves in chunks until the owner's channel
    /// is empty, then sets the seed: a socket's own messages were all there before its call.
    pub(crate) async fn take_back_owned(
        &self,
        owner: &str,
        seed: Option<(&str, u64)>,
    ) -> Result<usize, LayerError> {
        let from = owner_channel_key(self, owner);
        let mut moved = 0usize;
        loop {
            let mut conn = self.inner.shards[0].conn.clone();
            let cmd = redis::cmd("ZRANGE")
                .arg(&from)
                .arg(0)
                .arg(TAKE_BACK_CHUNK - 1)
                .arg("WITHSCORES")
                .to_owned();
            let waiting: Vec<(Vec<u8>, String)> = self
                .run(0, async move { cmd.query_async(&mut conn).await })
                .await?;
            if waiting.is_empty() {
                break;
            }
            let n = self.take_back_call(owner, &waiting, None).await?;
            moved += n;
            // A short read all moved by this call leaves nothing; otherwise (more than a chunk,
            // or another process moving at the same time) read again.
            if (waiting.len() as isize) < TAKE_BACK_CHUNK && n == waiting.len() {
                break;
            }
        }
        if let Some(seed) = seed {
            self.take_back_call(owner, &[], Some(seed)).await?;
        }
        if moved > 0 {
            tracing::info!(
                owner,
                moved,
                "moved the messages waiting for a lapsed owner back to the shared channels"
            );
        }
        Ok(moved)
    }

    /// One call of the take-back script over `waiting` (members with their scores).
    async fn take_back_call(
        &self,
        owner: &str,
        waiting: &[(Vec<u8>, String)],
        seed: Option<(&str, u64)>,
    ) -> Result<usize, LayerError> {
        let mut replies: Vec<String> = Vec::new();
        let mut invocation = TAKE_BACK.prepare_invoke();
        invocation
            .key(owner_channel_key(self, owner))
            .key(self.channel_key(WEBSOCKET_RECEIVE))
            .key(self.channel_key(WEBSOCKET_DISCONNECT))
            .key(self.owner_set_key(owner));
        let mut per_message = Vec::with_capacity(waiting.len());
        for (member, score) in waiting {
            let (to, conn, order) = match self.address_of(member) {
                Some((reply, order, disconnect)) => {
                    let index = match replies.iter().position(|r| *r == reply) {
                        Some(i) => i + 1,
                        None => {
                            replies.push(reply);
                            replies.len()
                        }
                    };
                    (if disconnect { 3 } else { 2 }, index, order)
                }
                // Not ours to read: moved to `websocket.receive`, where a worker counts it.
                None => (2, 0, 0),
            };
            per_message.push((to, score, member, conn, order));
        }
        let seed_index = match seed {
            None => 0,
            Some((reply, _)) => match replies.iter().position(|r| r == reply) {
                Some(i) => i + 1,
                None => {
                    replies.push(reply.to_owned());
                    replies.len()
                }
            },
        };
        for reply in &replies {
            invocation.key(self.order_key(reply));
        }
        let ttl = self.inner.settings.group_expiry.as_secs().max(1);
        let channel_ttl = self.inner.settings.expiry.as_secs_f64().ceil().max(1.0) as u64;
        invocation
            .arg(now_ms())
            .arg(ttl)
            .arg(channel_ttl)
            .arg(per_message.len())
            .arg(replies.len());
        for (to, score, member, conn, order) in per_message {
            invocation
                .arg(to)
                .arg(score.as_str())
                .arg(member.as_slice())
                .arg(conn)
                .arg(order);
        }
        for reply in &replies {
            invocation.arg(reply.as_str());
        }
        invocation
            .arg(seed_index)
            .arg(seed.map_or(0, |(_, order)| order));
        let mut conn = self.inner.shards[0].conn.clone();
        let moved: i64 = self
            .run(0, async move { invocation.invoke_async(&mut conn).await })
            .await?;
        Ok(usize::try_from(moved).unwrap_or(0))
    }

    /// The reply channel, order and kind (true for a disconnect) of a waiting member.
    fn address_of(&self, member: &[u8]) -> Option<(String, u64, bool)> {
        let sealed = member.get(wire::RANDOM_PREFIX_LEN..)?;
        let payload = match &self.inner.crypter {
            None => Bytes::copy_from_slice(sealed),
            Some(crypter) => Bytes::from(crypter.decrypt(sealed, self.inner.crypter_ttl).ok()?),
        };
        let addressed: Addressed = wire::decode(&payload).ok()?;
        Some((
            addressed.reply_channel,
            addressed.order,
            addressed.code.is_some(),
        ))
    }
}

fn owner_channel_key(layer: &RedisLayer, owner: &str) -> String {
    layer.channel_key(&owner_channel(owner))
}

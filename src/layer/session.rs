//! Channel sessions: a small key/value store per reply channel (per connection), kept in the
//! layer so that every consumer of a connection sees it, on any worker, and expiring with the
//! group expiry (a connection is closed by then).
//!
//! On Redis it is the hash `{prefix}:session:{reply_channel}`, one field per key holding the
//! msgpack of the value, with `EXPIRE group_expiry` renewed on every write. In memory it lives
//! in [`MemoryConnections`], beside the per-connection ordering state.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use switchyard_routing::codec;
use switchyard_routing::names;
use switchyard_routing::{Map, Value};
use tokio::time::Instant;

use super::{Layer, LayerError};

/// One connection's state in the in-memory layer.
#[derive(Debug, Default)]
pub(crate) struct Connection {
    /// Last write, for expiry.
    pub(crate) touched: Option<Instant>,
    pub(crate) session: Map,
    pub(crate) next_order: u64,
    /// Until when the message at `next_order` holds its turn against ordering upkeep.
    pub(crate) running_until: Option<Instant>,
    /// Parked messages by order.
    pub(crate) parked: BTreeMap<u64, Parked>,
}

/// A message parked by strict ordering.
#[derive(Debug)]
pub(crate) struct Parked {
    /// The channel it was read from.
    pub(crate) channel: String,
    pub(crate) payload: Bytes,
    /// When it was parked, for expiry.
    pub(crate) at: Instant,
}

/// Per-connection state of the in-memory layer (channel sessions and ordering), one lock.
#[derive(Debug, Default)]
pub struct MemoryConnections {
    inner: Mutex<HashMap<String, Connection>>,
    writes: std::sync::atomic::AtomicU64,
}

/// Every this many writes, expired connections are swept out (connections that never
/// disconnected cleanly would otherwise stay in memory).
const SWEEP_EVERY: u64 = 4096;

impl MemoryConnections {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<String, Connection>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    /// The live entry of `reply`, dropping it first when it expired.
    pub(crate) fn sweep_due(&self) -> bool {
        let n = self
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        n % SWEEP_EVERY == SWEEP_EVERY - 1
    }

    pub(crate) fn sweep(map: &mut HashMap<String, Connection>, expiry: std::time::Duration) {
        let now = Instant::now();
        map.retain(|_, c| c.touched.is_some_and(|t| now.duration_since(t) < expiry));
    }

    pub(crate) fn entry<'a>(
        map: &'a mut HashMap<String, Connection>,
        reply: &str,
        expiry: std::time::Duration,
    ) -> &'a mut Connection {
        let now = Instant::now();
        let expired = map
            .get(reply)
            .and_then(|c| c.touched)
            .is_some_and(|t| now.duration_since(t) >= expiry);
        if expired {
            map.remove(reply);
        }
        let c = map.entry(reply.to_owned()).or_default();
        c.touched = Some(now);
        c
    }
}

fn session_key(layer: &Layer, reply_channel: &str) -> String {
    format!("{}:session:{}", layer.settings().prefix, reply_channel)
}

impl Layer {
    /// The channel session of a connection (empty when none or expired).
    pub async fn session_get(&self, reply_channel: &str) -> Result<Map, LayerError> {
        names::validate_channel(reply_channel)?;
        match self {
            Layer::Memory(l) => {
                let expiry = l.settings().group_expiry;
                let mut map = l.connections().lock();
                let now = Instant::now();
                Ok(match map.get(reply_channel) {
                    Some(c) if c.touched.is_some_and(|t| now.duration_since(t) < expiry) => {
                        c.session.clone()
                    }
                    Some(_) => {
                        map.remove(reply_channel);
                        Map::new()
                    }
                    None => Map::new(),
                })
            }
            Layer::Redis(l) => {
                let key = session_key(self, reply_channel);
                let (shard, mut conn) = l.conn_for(reply_channel);
                let cmd = redis::cmd("HGETALL").arg(&key).to_owned();
                let fields: Vec<(String, Vec<u8>)> = l
                    .run(shard, async move { cmd.query_async(&mut conn).await })
                    .await?;
                let mut out = Map::new();
                for (k, v) in fields {
                    match codec::from_msgpack::<Value>(&v) {
                        Ok(v) => {
                            out.insert(&k, v);
                        }
                        Err(e) => {
                            tracing::warn!(reply_channel, key = %k, error = %e, "skipped an undecodable channel-session value");
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Sets a key of a connection's channel session (renewing its expiry).
    pub async fn session_set(
        &self,
        reply_channel: &str,
        key: &str,
        value: &Value,
    ) -> Result<(), LayerError> {
        names::validate_channel(reply_channel)?;
        match self {
            Layer::Memory(l) => {
                let expiry = l.settings().group_expiry;
                let sweep = l.connections().sweep_due();
                let mut map = l.connections().lock();
                if sweep {
                    MemoryConnections::sweep(&mut map, expiry);
                }
                MemoryConnections::entry(&mut map, reply_channel, expiry)
                    .session
                    .insert(key, value.clone());
                Ok(())
            }
            Layer::Redis(l) => {
                let packed = codec::to_msgpack(value)?;
                let hkey = session_key(self, reply_channel);
                let (shard, mut conn) = l.conn_for(reply_channel);
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("HSET")
                    .arg(&hkey)
                    .arg(key)
                    .arg(packed)
                    .ignore()
                    .cmd("EXPIRE")
                    .arg(&hkey)
                    .arg(self.settings().group_expiry.as_secs().max(1))
                    .ignore();
                l.run(
                    shard,
                    async move { pipe.query_async::<()>(&mut conn).await },
                )
                .await
            }
        }
    }

    /// Deletes a key of a connection's channel session.
    pub async fn session_delete(&self, reply_channel: &str, key: &str) -> Result<(), LayerError> {
        names::validate_channel(reply_channel)?;
        match self {
            Layer::Memory(l) => {
                if let Some(c) = l.connections().lock().get_mut(reply_channel) {
                    c.session.remove(key);
                }
                Ok(())
            }
            Layer::Redis(l) => {
                let hkey = session_key(self, reply_channel);
                let (shard, mut conn) = l.conn_for(reply_channel);
                let cmd = redis::cmd("HDEL").arg(&hkey).arg(key).to_owned();
                l.run(
                    shard,
                    async move { cmd.query_async::<i64>(&mut conn).await },
                )
                .await
                .map(|_| ())
            }
        }
    }

    /// Deletes a connection's whole channel session.
    pub async fn session_clear(&self, reply_channel: &str) -> Result<(), LayerError> {
        names::validate_channel(reply_channel)?;
        match self {
            Layer::Memory(l) => {
                if let Some(c) = l.connections().lock().get_mut(reply_channel) {
                    c.session = Map::new();
                }
                Ok(())
            }
            Layer::Redis(l) => {
                let hkey = session_key(self, reply_channel);
                let (shard, mut conn) = l.conn_for(reply_channel);
                let cmd = redis::cmd("DEL").arg(&hkey).to_owned();
                l.run(
                    shard,
                    async move { cmd.query_async::<i64>(&mut conn).await },
                )
                .await
                .map(|_| ())
            }
        }
    }
}

//! The in-memory layer's per-connection state: each connection's channel session and its
//! strict-ordering state (next order, the running message's hold, parked messages) under one
//! lock, swept of expired connections every few thousand writes. The rules are those of
//! `session.rs` and `ordering.rs`; this is their storage step in one process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use switchyard_routing::asgi::WEBSOCKET_DISCONNECT;
use switchyard_routing::{Map, Value};
use tokio::time::Instant;

use super::backend::{ChannelBackend, StateBackend};
use super::ordering::{Gate, Gated, Upkeep};
use super::{LayerError, MemoryLayer};

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

/// In-memory upkeep of one connection (see the module doc); returns whether `next` moved and
/// whether the parked message at `next` is an old disconnect to run late.
fn memory_upkeep(c: &mut Connection, expiry: Duration, up: &mut Upkeep) -> (bool, bool) {
    let now = Instant::now();
    if c.running_until.is_some_and(|t| t > now) {
        return (false, false);
    }
    let mut changed = false;
    let mut late = false;
    while let Some((&order, parked)) = c.parked.first_key_value() {
        if now.duration_since(parked.at) < expiry {
            break;
        }
        if parked.channel == WEBSOCKET_DISCONNECT {
            if order > c.next_order {
                up.skipped += order - c.next_order;
                c.next_order = order;
                changed = true;
            }
            late = order == c.next_order;
            break;
        }
        c.parked.remove(&order);
        up.expired += 1;
        if order >= c.next_order {
            up.skipped += order - c.next_order;
            c.next_order = order + 1;
            changed = true;
        }
    }
    (changed, late)
}

fn hold_until(hold: Duration) -> Option<Instant> {
    let now = Instant::now();
    Some(
        now.checked_add(hold)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400)),
    )
}

fn parked_at(c: &Connection, order: u64) -> Option<(String, Bytes)> {
    c.parked
        .get(&order)
        .map(|p| (p.channel.clone(), p.payload.clone()))
}

/// In-memory gate of one message (see the module doc), after upkeep.
fn memory_gate(c: &mut Connection, g: Gated<'_>, hold: Duration) -> Gate {
    if g.order < c.next_order || c.parked.contains_key(&g.order) {
        if g.order == c.next_order {
            // Its turn, and this is the parked copy coming back: unpark and run.
            c.parked.remove(&g.order);
            c.running_until = hold_until(hold);
            Gate::Run
        } else {
            Gate::Stale
        }
    } else if g.order == c.next_order {
        c.running_until = hold_until(hold);
        Gate::Run
    } else {
        c.parked.insert(
            g.order,
            Parked {
                channel: g.channel.to_owned(),
                payload: Bytes::copy_from_slice(g.payload),
                at: Instant::now(),
            },
        );
        Gate::Parked
    }
}

impl StateBackend for MemoryLayer {
    async fn session_load(&self, reply_channel: &str) -> Result<Map, LayerError> {
        let expiry = self.settings().group_expiry;
        let mut map = self.connections().lock();
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

    async fn session_set(
        &self,
        reply_channel: &str,
        key: &str,
        value: &Value,
    ) -> Result<(), LayerError> {
        let expiry = self.settings().group_expiry;
        let sweep = self.connections().sweep_due();
        let mut map = self.connections().lock();
        if sweep {
            MemoryConnections::sweep(&mut map, expiry);
        }
        MemoryConnections::entry(&mut map, reply_channel, expiry)
            .session
            .insert(key, value.clone());
        Ok(())
    }

    async fn session_delete(&self, reply_channel: &str, key: &str) -> Result<(), LayerError> {
        if let Some(c) = self.connections().lock().get_mut(reply_channel) {
            c.session.remove(key);
        }
        Ok(())
    }

    async fn session_clear(&self, reply_channel: &str) -> Result<(), LayerError> {
        if let Some(c) = self.connections().lock().get_mut(reply_channel) {
            c.session = Map::new();
        }
        Ok(())
    }

    async fn ordering_step(
        &self,
        reply_channel: &str,
        done: Option<(u64, bool)>,
        gated: Option<Gated<'_>>,
        hold: Duration,
    ) -> Result<(Option<Gate>, Upkeep), LayerError> {
        let expiry = self.settings().expiry;
        let group_expiry = self.settings().group_expiry;
        let sweep = gated.is_some() && self.connections().sweep_due();
        let mut map = self.connections().lock();
        if sweep {
            MemoryConnections::sweep(&mut map, group_expiry);
        }
        if done.is_none() && gated.is_none() && !map.contains_key(reply_channel) {
            return Ok((None, Upkeep::default()));
        }
        let c = MemoryConnections::entry(&mut map, reply_channel, group_expiry);
        let mut advanced = false;
        let mut upkeep = Upkeep::default();
        if let Some(g) = gated
            && done.is_none()
            && g.order > c.next_order
            && g.may_restart()
            && c.next_order == 0
            && c.running_until.is_none()
            && c.parked.is_empty()
        {
            c.next_order = g.order;
            upkeep.restarted = true;
        }
        if let Some((order, _)) = done {
            c.running_until = None;
            if order >= c.next_order {
                c.next_order = order + 1;
                advanced = true;
            }
        }
        let (changed, late) = memory_upkeep(c, expiry, &mut upkeep);
        let gate = gated.map(|g| memory_gate(c, g, hold));
        if (advanced || changed || late) && gated.map(|g| g.order) != Some(c.next_order) {
            upkeep.resume = parked_at(c, c.next_order);
        }
        if let Some((_, true)) = done
            && c.parked.is_empty()
            && c.session.is_empty()
        {
            map.remove(reply_channel);
        }
        Ok((gate, upkeep))
    }

    async fn ordering_hold(
        &self,
        reply_channel: &str,
        order: u64,
        hold: Duration,
    ) -> Result<bool, LayerError> {
        let mut map = self.connections().lock();
        Ok(match map.get_mut(reply_channel) {
            Some(c) if c.next_order == order => {
                c.running_until = hold_until(hold);
                true
            }
            _ => false,
        })
    }
}

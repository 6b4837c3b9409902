//! Strict ordering per connection, kept in the layer so any worker can take any message.
//!
//! Each connection (reply channel) has a `next` order. A worker asks the [`Gate`] before running
//! a message: `order == next` runs, `order > next` is parked in the layer (the check and the park
//! are one atomic step: one Lua script on Redis, one lock in memory), `order < next` was run
//! already and is dropped. When a message has run, [`Layer::ordering_done`] advances `next` and
//! hands back the parked successor, if any, for the worker to run next (it passes the gate
//! again, which is where a parked message is deleted: until its turn actually runs it stays
//! parked, so a worker dying with it in hand loses nothing that upkeep cannot recover). This is
//! Channels 1's `enforce_ordering` without its race (a message parked between a check and a save).
//!
//! A worker that holds the next message of the same connection when one is done records the
//! one and gates the other in a single step ([`Layer::ordering_done_then_gate`]).
//!
//! Upkeep, in the same atomic step of every gate and done call (and of
//! [`Layer::ordering_upkeep`], which a worker calls for connections it parked messages of): a
//! parked message that has waited longer than the layer expiry is dropped (never delivered past
//! expiry) and `next` moves past it, which also skips a gap left by a message that never came
//! (expired in its queue, given up): by then any missing predecessor has expired too. A parked
//! `websocket.disconnect` is never dropped for age: it runs late instead, so the connection
//! still leaves its groups. Upkeep waits while the message at `next` runs (until the hold the
//! gate was given), so a slow consumer is not overtaken. On Redis the gate of the common case
//! (nothing parked, `order == next`) is one HMGET that records no hold: upkeep can act only on
//! a message parked for the whole expiry, so the worker records the hold
//! ([`Layer::ordering_hold`]) once a consumer has run half the expiry. The done of the common
//! case is one MULTI (read the state, write `next`), no script; and a process that recorded
//! message `n` as done with nothing parked knows that `n + 1` is the turn, so when it gets
//! `n + 1` itself (always for the next message in its hand, one time in N workers otherwise)
//! its gate reads nothing at all (see `redis/turns.rs`).
//!
//! State lost: a gate that finds nothing recorded for its connection (no `next`, no running
//! message, nothing parked) for a frame past the connect restarts the order at that frame
//! ([`Upkeep::restarted`]). Only a lost state looks like that (a Redis restart, flush or failover
//! to a replica that missed it; or the state lapsed after the group expiry idle): the connect
//! records the state before the server reads the socket's first frame. Waiting instead would
//! park every frame until the expiry skipped the orders that ran before the loss.
//!
//! On Redis the state is one hash per connection, `{prefix}:order:{reply_channel}`: field `next`,
//! `run` (the hold deadline, ms, of the message running; 0 when none), `u` (present only while
//! messages are parked: when the oldest of them expires, so that upkeep scans only then), `e`
//! (when the key expires) and `p:{order}` = park time (ms, ASCII), space, original channel,
//! NUL, msgpack payload for each parked message. A step touches only that key and renews its
//! expiry (the group expiry) once half of it has passed. Steps run in Lua, several
//! connections' in one script call when a worker has several in flight
//! ([`super::redis`]'s step task; one shard's keys per call). A
//! gate sends the message's payload only when the message must park: the script answers that
//! without writing anything, and the gate is asked again with the payload.

use std::time::Duration;

use bytes::Bytes;
use switchyard_routing::asgi::WEBSOCKET_DISCONNECT;
use switchyard_routing::names;

use super::backend::StateBackend;
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

/// What ordering upkeep did, and the parked message whose turn has come.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upkeep {
    /// Parked messages dropped because they waited longer than the layer expiry.
    pub expired: u64,
    /// Orders given up as missing (a gap `next` was moved across).
    pub skipped: u64,
    /// The parked message whose turn it now is, `(original channel, payload)`: the caller runs
    /// it (through the gate again, which unparks it).
    pub resume: Option<(String, Bytes)>,
    /// The gated message found nothing recorded for its connection (the layer lost the state:
    /// a Redis restart, flush or failover, or it lapsed idle) and restarted the order at itself.
    pub restarted: bool,
}

impl Upkeep {
    /// Adds what a later step of the same call did; its resume, if any, is the current one.
    pub(crate) fn absorb(&mut self, later: Upkeep) {
        self.expired += later.expired;
        self.skipped += later.skipped;
        self.restarted |= later.restarted;
        if later.resume.is_some() {
            self.resume = later.resume;
        }
    }
}

/// The gate's verdict and the upkeep done with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateOutcome {
    /// Run, parked or stale.
    pub gate: Gate,
    /// Upkeep done in the same step; its `resume` is a message other than the one gated.
    pub upkeep: Upkeep,
}

/// The message a step gates: its order, the channel it was read from and its payload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gated<'a> {
    pub(crate) order: u64,
    pub(crate) channel: &'a str,
    pub(crate) payload: &'a [u8],
}

impl Gated<'_> {
    /// Whether this message may restart its connection's order when the layer has nothing
    /// recorded for it. A disconnect may not: it can come before its connect ran (the client
    /// left during the handshake), and it runs late after the expiry anyway.
    pub(crate) fn may_restart(&self) -> bool {
        self.channel != WEBSOCKET_DISCONNECT
    }
}

impl Layer {
    /// Decides whether the message `order` of connection `reply_channel`, read from `channel`
    /// as `payload`, runs now; parks it in the layer when it is ahead. A message that runs holds
    /// its turn against upkeep for `hold` (the caller's limit on running it), except on Redis
    /// when nothing was parked: that gate only reads the state, so a caller still running the
    /// message at half the layer expiry records the hold with [`Layer::ordering_hold`].
    pub async fn ordering_gate(
        &self,
        reply_channel: &str,
        order: u64,
        channel: &str,
        payload: &[u8],
        hold: Duration,
    ) -> Result<GateOutcome, LayerError> {
        self.gate_after(reply_channel, None, order, channel, payload, hold)
            .await
    }

    /// [`Layer::ordering_done`] of `done`, then [`Layer::ordering_gate`] of the next message
    /// of the same connection the caller holds, in one atomic step (one script call on Redis
    /// where it would be two). The outcome's `resume` is a parked message other than the one
    /// gated, whose turn came with `done`.
    pub async fn ordering_done_then_gate(
        &self,
        reply_channel: &str,
        done: u64,
        order: u64,
        channel: &str,
        payload: &[u8],
        hold: Duration,
    ) -> Result<GateOutcome, LayerError> {
        self.gate_after(reply_channel, Some(done), order, channel, payload, hold)
            .await
    }

    /// Records that message `order` of the connection has run (`last`: it was the disconnect, so
    /// the state can go) and returns the upkeep, whose `resume` is the parked successor the
    /// caller must run next. The successor stays parked until it passes the gate.
    pub async fn ordering_done(
        &self,
        reply_channel: &str,
        order: u64,
        last: bool,
    ) -> Result<Upkeep, LayerError> {
        let (_, upkeep) = self
            .ordering_step(reply_channel, Some((order, last)), None, Duration::ZERO)
            .await?;
        Ok(upkeep)
    }

    /// Upkeep alone, for a connection with parked messages and nothing else arriving: drops
    /// parked messages older than the expiry, skips a gap behind them, and returns the parked
    /// message whose turn has come, if any (the caller runs it).
    pub async fn ordering_upkeep(&self, reply_channel: &str) -> Result<Upkeep, LayerError> {
        let (_, upkeep) = self
            .ordering_step(reply_channel, None, None, Duration::ZERO)
            .await?;
        Ok(upkeep)
    }

    /// The gate of message `order`, after recording `done` (a predecessor the caller ran).
    async fn gate_after(
        &self,
        reply_channel: &str,
        done: Option<u64>,
        order: u64,
        channel: &str,
        payload: &[u8],
        hold: Duration,
    ) -> Result<GateOutcome, LayerError> {
        let gated = Gated {
            order,
            channel,
            payload,
        };
        let (gate, upkeep) = self
            .ordering_step(reply_channel, done.map(|d| (d, false)), Some(gated), hold)
            .await?;
        Ok(GateOutcome {
            gate: gate.unwrap_or(Gate::Stale),
            upkeep,
        })
    }

    /// Records that message `order`, which passed the gate and is still running, holds its
    /// turn against upkeep for `hold` from now; false when it is no longer the connection's
    /// turn. Never parks or restarts anything: for a consumer that outlives half the layer
    /// expiry after a gate that recorded no hold (Redis's quick gate).
    pub async fn ordering_hold(
        &self,
        reply_channel: &str,
        order: u64,
        hold: Duration,
    ) -> Result<bool, LayerError> {
        names::validate_channel(reply_channel)?;
        backend!(self, l => l.ordering_hold(reply_channel, order, hold).await)
    }

    /// Done (with `last`), then upkeep, then the gate, as one atomic step; each part optional.
    async fn ordering_step(
        &self,
        reply_channel: &str,
        done: Option<(u64, bool)>,
        gated: Option<Gated<'_>>,
        hold: Duration,
    ) -> Result<(Option<Gate>, Upkeep), LayerError> {
        names::validate_channel(reply_channel)?;
        backend!(self, l => l.ordering_step(reply_channel, done, gated, hold).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::LayerSettings;
    use switchyard_routing::asgi::WEBSOCKET_DISCONNECT;

    const HOLD: Duration = Duration::from_secs(10);

    async fn gate(layer: &Layer, r: &str, order: u64, payload: &'static [u8]) -> Gate {
        layer
            .ordering_gate(r, order, "ch", payload, HOLD)
            .await
            .unwrap()
            .gate
    }

    /// The in-memory layer forgets a connection idle past the group expiry: its next frame
    /// restarts the order instead of parking behind orders that ran long ago. A disconnect
    /// never restarts it (it can come before its connect ran).
    #[tokio::test(start_paused = true)]
    async fn memory_order_restarts_when_the_state_is_gone() {
        let settings = LayerSettings {
            group_expiry: Duration::from_secs(5),
            ..LayerSettings::default()
        };
        let layer = Layer::from_url("memory://", settings).await.unwrap();
        let r = "w.x!lost";
        assert_eq!(gate(&layer, r, 0, b"\x80").await, Gate::Run);
        layer.ordering_done(r, 0, false).await.unwrap();
        assert_eq!(gate(&layer, r, 1, b"\x81").await, Gate::Run);
        layer.ordering_done(r, 1, false).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        let outcome = layer
            .ordering_gate(r, 7, "websocket.receive", b"\x87", HOLD)
            .await
            .unwrap();
        assert_eq!(outcome.gate, Gate::Run);
        assert!(outcome.upkeep.restarted);
        layer.ordering_done(r, 7, false).await.unwrap();
        assert_eq!(gate(&layer, r, 8, b"\x88").await, Gate::Run);
        assert_eq!(gate(&layer, r, 6, b"\x86").await, Gate::Stale);

        let other = "w.x!left";
        let outcome = layer
            .ordering_gate(other, 1, WEBSOCKET_DISCONNECT, b"\x81", HOLD)
            .await
            .unwrap();
        assert_eq!(
            outcome.gate,
            Gate::Parked,
            "a disconnect waits for its connect"
        );
        assert!(!outcome.upkeep.restarted);
    }

    #[tokio::test]
    async fn memory_gate_parks_and_resumes_in_order() {
        let layer = Layer::from_url("memory://", LayerSettings::default())
            .await
            .unwrap();
        let r = "w.x!c1";
        assert_eq!(gate(&layer, r, 0, b"\x82").await, Gate::Run);
        assert_eq!(gate(&layer, r, 2, b"\x80").await, Gate::Parked);
        assert_eq!(gate(&layer, r, 2, b"\x80").await, Gate::Stale);
        assert_eq!(gate(&layer, r, 1, b"\x81").await, Gate::Parked);
        let next = layer.ordering_done(r, 0, false).await.unwrap().resume;
        assert_eq!(next, Some(("ch".to_owned(), Bytes::from_static(b"\x81"))));
        // Handing it out did not unpark it: were it lost, it would be handed out again by upkeep.
        assert_eq!(
            layer.ordering_done(r, 0, false).await.unwrap().resume,
            None,
            "a repeated done does not hand it out twice"
        );
        assert_eq!(gate(&layer, r, 0, b"\x82").await, Gate::Stale);
        assert_eq!(gate(&layer, r, 1, b"\x81").await, Gate::Run);
        assert_eq!(
            gate(&layer, r, 1, b"\x81").await,
            Gate::Run,
            "a ConsumeLater requeue of the running message keeps its turn"
        );
        let next = layer.ordering_done(r, 1, false).await.unwrap().resume;
        assert_eq!(next.map(|n| n.1), Some(Bytes::from_static(b"\x80")));
        assert_eq!(gate(&layer, r, 2, b"\x80").await, Gate::Run);
        assert_eq!(layer.ordering_done(r, 2, true).await.unwrap().resume, None);
    }

    /// A gap (order 1 never comes) is skipped once the message parked behind it has waited
    /// the expiry; parked messages older than the expiry are dropped, a disconnect runs late.
    #[tokio::test(start_paused = true)]
    async fn memory_upkeep_skips_gaps_and_drops_expired() {
        let settings = LayerSettings {
            expiry: Duration::from_secs(60),
            ..LayerSettings::default()
        };
        let layer = Layer::from_url("memory://", settings).await.unwrap();
        let r = "w.x!gap";
        assert_eq!(gate(&layer, r, 0, b"\x80").await, Gate::Run);
        assert_eq!(
            layer.ordering_done(r, 0, false).await.unwrap(),
            Upkeep::default()
        );
        assert_eq!(gate(&layer, r, 2, b"\x82").await, Gate::Parked);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(gate(&layer, r, 3, b"\x83").await, Gate::Parked);
        assert_eq!(layer.ordering_upkeep(r).await.unwrap(), Upkeep::default());
        tokio::time::advance(Duration::from_secs(31)).await;
        // 2 waited 61 s: dropped (past expiry), 1 skipped, 3 (31 s) is next and handed out.
        let up = layer.ordering_upkeep(r).await.unwrap();
        assert_eq!(
            up,
            Upkeep {
                expired: 1,
                skipped: 1,
                resume: Some(("ch".to_owned(), Bytes::from_static(b"\x83"))),
                restarted: false,
            }
        );
        assert_eq!(gate(&layer, r, 2, b"\x82").await, Gate::Stale);
        assert_eq!(gate(&layer, r, 3, b"\x83").await, Gate::Run);
        // While 3 runs (held), upkeep waits even for old parked messages.
        layer
            .ordering_gate(r, 5, WEBSOCKET_DISCONNECT, b"\x85", HOLD)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(gate(&layer, r, 4, b"\x84").await, Gate::Parked);
        tokio::time::advance(Duration::from_secs(61)).await;
        // 3 is done: 4 is too old and dropped, the disconnect runs late.
        let up = layer.ordering_done(r, 3, false).await.unwrap();
        assert_eq!(
            up,
            Upkeep {
                expired: 1,
                skipped: 0,
                resume: Some((WEBSOCKET_DISCONNECT.to_owned(), Bytes::from_static(b"\x85"))),
                restarted: false,
            }
        );
        assert_eq!(gate(&layer, r, 5, b"\x85").await, Gate::Run);
        assert_eq!(
            layer.ordering_done(r, 5, true).await.unwrap(),
            Upkeep::default()
        );
    }
}

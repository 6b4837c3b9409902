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
//! gate was given), so a slow consumer is not overtaken.
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

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use redis::Script;
use switchyard_routing::asgi::WEBSOCKET_DISCONNECT;
use switchyard_routing::names;
use tokio::time::Instant;

use super::redis::Step;
use super::session::{Connection, MemoryConnections, Parked};
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
}

/// The gate's verdict and the upkeep done with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateOutcome {
    /// Run, parked or stale.
    pub gate: Gate,
    /// Upkeep done in the same step; its `resume` is a message other than the one gated.
    pub upkeep: Upkeep,
}

/// Shared Lua: a scan of KEYS[1]'s parked messages given next, now (ms), expiry (ms). Drops
/// those past the expiry (moving next past them), stops at the first one still young or at an
/// old disconnect (which runs late instead). Returns the new next, expired, skipped, changed
/// (next moved), late (p:next is an old disconnect to run late) and the new `u`.
const UPKEEP_LUA: &str = r"
local function upkeep(key, nxt, now, expiry)
  local expired, skipped, changed, late = 0, 0, false, false
  local due = nil
  local orders = {}
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, 2) == 'p:' then orders[#orders + 1] = tonumber(string.sub(f, 3)) end
  end
  table.sort(orders)
  for _, o in ipairs(orders) do
    local v = redis.call('HGET', key, 'p:' .. o)
    local sp = string.find(v, ' ', 1, true)
    local t = sp and tonumber(string.sub(v, 1, sp - 1))
    if not t then
      -- Parked before park times were stored: as old as can be.
      t, sp = 0, 0
    end
    if now - t < expiry then
      due = t + expiry
      break
    end
    if string.sub(v, sp + 1, sp + 21) == 'websocket.disconnect\0' then
      if o > nxt then
        skipped = skipped + (o - nxt)
        nxt = o
        changed = true
      end
      late = (o == nxt)
      -- Stays due, so that upkeep finds it again until it has run.
      due = t + expiry
      break
    end
    redis.call('HDEL', key, 'p:' .. o)
    expired = expired + 1
    if o >= nxt then
      skipped = skipped + (o - nxt)
      nxt = o + 1
      changed = true
    end
  end
  if due then
    redis.call('HSET', key, 'u', due)
  else
    redis.call('HDEL', key, 'u')
  end
  return nxt, expired, skipped, changed, late, due
end
";

/// Ordering steps, one per key. ARGV[1..3]: now (ms), expiry (ms), ttl (s); then for each
/// KEYS[i] a block of 6 from 3 + 6(i-1) + 1: done order or '', last ('1' after a disconnect),
/// gated order or '', hold (ms), '1' when the parked value follows, the parked value (channel
/// NUL payload) or ''.
/// Each step records a message as done, then gates one, atomically; either part may be absent
/// (neither: upkeep alone). Without the value, a message that would park is answered 3 and
/// nothing of it is written: the caller gates it again with its value (the check and the park
/// stay one atomic step; the payload crosses only when it is parked). Returns per key
/// {verdict (1 run, 0 parked, 2 stale, 3 needs its value, -1 nothing gated), expired, skipped,
/// resume value or false}.
///
/// `u` is present only while messages are parked: it is when the oldest of them expires, so
/// the common step (nothing parked) reads the state with one HMGET and writes it with one
/// HSET, and scans only once something could have expired. Upkeep alone always scans. Each
/// `redis.call` costs Redis more than the command itself, so a step makes as few as it can.
static STEP_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{UPKEEP_LUA}
local now = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local function step(key, o)
  local done = nil
  if ARGV[o + 1] ~= '' then done = tonumber(ARGV[o + 1]) end
  local gate = nil
  if ARGV[o + 3] ~= '' then gate = tonumber(ARGV[o + 3]) end
  if not done and not gate and redis.call('EXISTS', key) == 0 then
    return {{-1, 0, 0, false}}
  end
  -- With a done, the successor it would hand out is read in the same HMGET.
  local succ = 'next'
  if done then succ = 'p:' .. (done + 1) end
  local st = redis.call('HMGET', key, 'next', 'run', 'u', 'e', succ)
  local nxt = tonumber(st[1] or '0')
  local run = tonumber(st[2] or '0')
  local u = tonumber(st[3] or '')
  local e = tonumber(st[4] or '')
  local ttl_ms = ttl * 1000
  local advanced = false
  if done then
    run = 0
    if done >= nxt then
      nxt = done + 1
      advanced = true
    end
  end
  local expired, skipped, changed, late = 0, 0, false, false
  if run <= now and ((not done and not gate) or (u and u <= now)) then
    nxt, expired, skipped, changed, late, u = upkeep(key, nxt, now, expiry)
  end
  local verdict = -1
  local hold_until = false
  if gate then
    if gate < nxt then
      verdict = 2
    elseif gate == nxt then
      if u then redis.call('HDEL', key, 'p:' .. gate) end
      hold_until = now + tonumber(ARGV[o + 4])
      verdict = 1
    elseif ARGV[o + 5] ~= '1' then
      verdict = 3
    elseif redis.call('HSETNX', key, 'p:' .. gate, ARGV[1] .. ' ' .. ARGV[o + 6]) == 0 then
      verdict = 2
    else
      verdict = 0
      if not u or now + expiry < u then
        u = now + expiry
        redis.call('HSET', key, 'u', u)
      end
    end
  end
  local fields = {{}}
  if advanced or changed then
    fields[#fields + 1] = 'next'
    fields[#fields + 1] = nxt
  end
  if hold_until then
    fields[#fields + 1] = 'run'
    fields[#fields + 1] = hold_until
  elseif done then
    fields[#fields + 1] = 'run'
    fields[#fields + 1] = 0
  end
  -- The key's expiry is renewed, by a step that writes it, once half of it has passed (`e`
  -- is when it would expire): most steps then cost one HMGET and one HSET.
  local renew = (not e or e - now < ttl_ms / 2) and (#fields > 0 or verdict == 0 or expired > 0)
  if renew then
    fields[#fields + 1] = 'e'
    fields[#fields + 1] = now + ttl_ms
  end
  if #fields > 0 then redis.call('HSET', key, unpack(fields)) end
  local resume = false
  if (advanced or changed or late) and gate ~= nxt then
    if done and nxt == done + 1 then
      resume = st[5]
    else
      resume = redis.call('HGET', key, 'p:' .. nxt)
    end
  end
  if done and ARGV[o + 2] == '1' then
    local parked = redis.call('HLEN', key) - 2
    if u then parked = parked - 1 end
    if e or renew then parked = parked - 1 end
    if parked <= 0 then
      redis.call('DEL', key)
      return {{verdict, expired, skipped, resume}}
    end
  end
  if renew then redis.call('EXPIRE', key, ttl) end
  return {{verdict, expired, skipped, resume}}
end
local out = {{}}
for i, key in ipairs(KEYS) do
  out[i] = step(key, 3 + (i - 1) * 6)
end
return out
"
    ))
});

fn order_key(layer: &Layer, reply_channel: &str) -> String {
    format!("{}:order:{}", layer.settings().prefix, reply_channel)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn pack(channel: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(channel.len() + 1 + payload.len());
    v.extend_from_slice(channel.as_bytes());
    v.push(0);
    v.extend_from_slice(payload);
    v
}

/// Reads a parked value, `park time, space, channel, NUL, payload` (the park time is optional:
/// the format before park times were stored had none).
fn unpack(value: &[u8]) -> Result<(String, Bytes), LayerError> {
    let value = match value.iter().position(|b| *b == b' ') {
        Some(sp) if value[..sp].iter().all(u8::is_ascii_digit) => &value[sp + 1..],
        _ => value,
    };
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

fn unpack_resume(value: Option<Vec<u8>>) -> Result<Option<(String, Bytes)>, LayerError> {
    value.map(|v| unpack(&v)).transpose()
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

/// The message a step gates: its order, the channel it was read from and its payload.
#[derive(Debug, Clone, Copy)]
struct Gated<'a> {
    order: u64,
    channel: &'a str,
    payload: &'a [u8],
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

fn verdict(v: i64) -> Option<Gate> {
    match v {
        1 => Some(Gate::Run),
        0 => Some(Gate::Parked),
        2 => Some(Gate::Stale),
        _ => None,
    }
}

/// Verdict 3 of the step script: the message would park, and its value was not sent.
const NEEDS_VALUE: i64 = 3;

impl Layer {
    /// Decides whether the message `order` of connection `reply_channel`, read from `channel`
    /// as `payload`, runs now; parks it in the layer when it is ahead. A message that runs holds
    /// its turn against upkeep for `hold` (the caller's limit on running it).
    pub async fn ordering_gate(
        &self,
        reply_channel: &str,
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
            .ordering_step(reply_channel, None, Some(gated), hold)
            .await?;
        Ok(GateOutcome {
            gate: gate.unwrap_or(Gate::Stale),
            upkeep,
        })
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
        let gated = Gated {
            order,
            channel,
            payload,
        };
        let (gate, upkeep) = self
            .ordering_step(reply_channel, Some((done, false)), Some(gated), hold)
            .await?;
        Ok(GateOutcome {
            gate: gate.unwrap_or(Gate::Stale),
            upkeep,
        })
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

    /// Done (with `last`), then upkeep, then the gate, as one atomic step; each part optional.
    async fn ordering_step(
        &self,
        reply_channel: &str,
        done: Option<(u64, bool)>,
        gated: Option<Gated<'_>>,
        hold: Duration,
    ) -> Result<(Option<Gate>, Upkeep), LayerError> {
        names::validate_channel(reply_channel)?;
        match self {
            Layer::Memory(l) => {
                let expiry = l.settings().expiry;
                let group_expiry = l.settings().group_expiry;
                let sweep = gated.is_some() && l.connections().sweep_due();
                let mut map = l.connections().lock();
                if sweep {
                    MemoryConnections::sweep(&mut map, group_expiry);
                }
                if done.is_none() && gated.is_none() && !map.contains_key(reply_channel) {
                    return Ok((None, Upkeep::default()));
                }
                let c = MemoryConnections::entry(&mut map, reply_channel, group_expiry);
                let mut advanced = false;
                if let Some((order, _)) = done {
                    c.running_until = None;
                    if order >= c.next_order {
                        c.next_order = order + 1;
                        advanced = true;
                    }
                }
                let mut upkeep = Upkeep::default();
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
            Layer::Redis(_) => {
                let (v, mut upkeep) = self
                    .redis_step(reply_channel, done, gated, hold, false)
                    .await?;
                if v != NEEDS_VALUE {
                    return Ok((verdict(v), upkeep));
                }
                // It would park: gate it again, with its value this time (the done, if any,
                // is recorded already).
                let (v, again) = self
                    .redis_step(reply_channel, None, gated, hold, true)
                    .await?;
                upkeep.expired += again.expired;
                upkeep.skipped += again.skipped;
                if again.resume.is_some() {
                    upkeep.resume = again.resume;
                }
                Ok((verdict(v).or(Some(Gate::Stale)), upkeep))
            }
        }
    }

    async fn redis_step(
        &self,
        reply_channel: &str,
        done: Option<(u64, bool)>,
        gated: Option<Gated<'_>>,
        hold: Duration,
        with_value: bool,
    ) -> Result<(i64, Upkeep), LayerError> {
        let Layer::Redis(l) = self else {
            return Err(LayerError::Protocol("not a Redis layer".into()));
        };
        let key = order_key(self, reply_channel);
        let shard = l.shard_of(reply_channel);
        let mut digits = itoa::Buffer::new();
        let mut num = |n: u64| digits.format(n).as_bytes().to_vec();
        let value = gated
            .filter(|_| with_value)
            .map(|g| pack(g.channel, g.payload));
        let args = vec![
            done.map(|(o, _)| num(o)).unwrap_or_default(),
            if done.is_some_and(|(_, last)| last) {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
            gated.map(|g| num(g.order)).unwrap_or_default(),
            num(millis(hold).min(365 * 86_400_000)),
            if value.is_some() {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
            value.unwrap_or_default(),
        ];
        let (v, expired, skipped, resume) = l
            .ordering_step(shard, &STEP_SCRIPT, Step { key, args })
            .await?;
        Ok((
            v,
            Upkeep {
                expired,
                skipped,
                resume: unpack_resume(resume)?,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::LayerSettings;

    const HOLD: Duration = Duration::from_secs(10);

    async fn gate(layer: &Layer, r: &str, order: u64, payload: &'static [u8]) -> Gate {
        layer
            .ordering_gate(r, order, "ch", payload, HOLD)
            .await
            .unwrap()
            .gate
    }

    #[tokio::test]
    async fn memory_gate_parks_and_resumes_in_order() {
        let layer = Layer::from_url("memory://", LayerSettings::default())
            .await
            .unwrap();
        let r = "w.x!c1";
        assert_eq!(gate(&layer, r, 2, b"\x80").await, Gate::Parked);
        assert_eq!(gate(&layer, r, 2, b"\x80").await, Gate::Stale);
        assert_eq!(gate(&layer, r, 1, b"\x81").await, Gate::Parked);
        assert_eq!(gate(&layer, r, 0, b"\x82").await, Gate::Run);
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
            }
        );
        assert_eq!(gate(&layer, r, 5, b"\x85").await, Gate::Run);
        assert_eq!(
            layer.ordering_done(r, 5, true).await.unwrap(),
            Upkeep::default()
        );
    }

    #[test]
    fn pack_round_trip() {
        let p = pack("websocket.receive", b"\x81\x00x");
        let mut timed = b"1763726400000 ".to_vec();
        timed.extend_from_slice(&p);
        assert_eq!(unpack(&timed).unwrap(), unpack(&p).unwrap());
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

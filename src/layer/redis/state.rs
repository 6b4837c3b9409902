//! The Redis layer's per-connection state: a connection's channel session is the hash
//! `{prefix}:session:{reply_channel}` (one field per key, the msgpack of its value, `EXPIRE`
//! group expiry renewed on every write); its strict-ordering state is the hash
//! `{prefix}:order:{reply_channel}`, stepped by one Lua script (see `ordering.rs` for the
//! rules and the fields). Both live on the shard (or slot) of the reply channel.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use redis::Script;
use switchyard_routing::codec;
use switchyard_routing::{Map, Value};

use super::{RedisLayer, Step};
use crate::layer::backend::{ChannelBackend, StateBackend};
use crate::layer::ordering::{Gate, Gated, Upkeep};
use crate::layer::{LayerError, millis, now_ms};

fn session_key(layer: &RedisLayer, reply_channel: &str) -> String {
    format!("{}:session:{}", layer.settings().prefix, reply_channel)
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
/// KEYS[i] a block of 7 from 3 + 7(i-1) + 1: done order or '', last ('1' after a disconnect),
/// gated order or '', hold (ms), '1' when the parked value follows, the parked value (channel
/// NUL payload) or '', '1' when the gated message may restart a lost order (not a disconnect).
/// Each step records a message as done, then gates one, atomically; either part may be absent
/// (neither: upkeep alone). Without the value, a message that would park is answered 3 and
/// nothing of it is written: the caller gates it again with its value (the check and the park
/// stay one atomic step; the payload crosses only when it is parked). Returns per key
/// {verdict (1 run, 0 parked, 2 stale, 3 needs its value, 4 run and the order restarted at it,
/// -1 nothing gated), expired, skipped, resume value or false}.
///
/// A step that finds nothing recorded (no `next`, no running hold, nothing parked) for a gated
/// frame past the connect means Redis lost the state (a restart, a flush, a failover to a
/// replica that had not seen it) or it lapsed idle: the frame restarts the connection's order
/// at itself. Waiting instead would park every frame until the expiry skipped the orders that
/// ran before the loss (a minute of silence on every ordered socket after a Redis restart).
///
/// `u` is present only while messages are parked: it is when the oldest of them expires, so
/// the common step (nothing parked) reads the state with one HMGET and writes it with one
/// HSET, and scans only once something could have expired. Upkeep alone always scans. Each
/// `redis.call` costs Redis more than the command itself, so a step makes as few as it can,
/// and the common done and gate do not come here at all ([`RedisLayer::quick_done`],
/// [`RedisLayer::quick_gate`]).
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
  -- A field that is not a number (garbage written by something else) counts as absent.
  local nxt = tonumber(st[1] or '')
  local run = tonumber(st[2] or '')
  local u = tonumber(st[3] or '')
  local e = tonumber(st[4] or '')
  local ttl_ms = ttl * 1000
  local advanced = false
  local restarted = false
  if gate and not done and gate > 0 and ARGV[o + 7] == '1'
      and not nxt and not run and not u then
    nxt = gate
    advanced = true
    restarted = true
  end
  nxt = nxt or 0
  run = run or 0
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
      if u then
        redis.call('HDEL', key, 'p:' .. gate)
        -- The last parked message unparked: drop `u`, so that the connection's next steps
        -- take the quick paths again instead of until the expiry.
        local others = 1
        if st[1] then others = others + 1 end
        if st[2] then others = others + 1 end
        if st[4] then others = others + 1 end
        if redis.call('HLEN', key) <= others then
          redis.call('HDEL', key, 'u')
          u = nil
        end
      end
      hold_until = now + tonumber(ARGV[o + 4])
      verdict = 1
      if restarted then verdict = 4 end
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
  out[i] = step(key, 3 + (i - 1) * 7)
end
return out
"
    ))
});

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

/// Verdict 4 of the step script: the gated message runs, its connection's order restarted at it.
const RESTARTED: i64 = 4;

fn verdict(v: i64) -> Option<Gate> {
    match v {
        1 | RESTARTED => Some(Gate::Run),
        0 => Some(Gate::Parked),
        2 => Some(Gate::Stale),
        _ => None,
    }
}

/// What the quick gate found.
enum QuickGate {
    /// Decided without the script.
    Decided(Gate),
    /// Ahead of `next`: the script decides, most likely parking it.
    Ahead,
    /// The script decides (something is parked, or the state is missing or not a number).
    Ask,
}

/// A state field as a number; absent, or anything but digits (garbage written by something
/// else), is `None`.
fn field_number(field: Option<Vec<u8>>) -> Option<u64> {
    field.and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
}

/// Verdict 3 of the step script: the message would park, and its value was not sent.
const NEEDS_VALUE: i64 = 3;

impl RedisLayer {
    /// The key of a connection's ordering state.
    pub(super) fn order_key(&self, reply_channel: &str) -> String {
        format!("{}:order:{}", self.settings().prefix, reply_channel)
    }

    /// How long a turn this process handed on is trusted without asking Redis (see
    /// [`super::turns`]): half the expiry, well inside the time upkeep needs to skip it.
    fn turn_trust(&self) -> Duration {
        self.settings().expiry / 2
    }

    /// The done of the common case without the script: one MULTI that reads `next`, `u`, `e`
    /// and the parked successor and writes `next = order + 1`, `run = 0`. What the script
    /// would have done differently is mended after, from what was read: a `next` already past
    /// `order + 1` (the order restarted at a later frame after a state loss, which ran first)
    /// is put back with a script step; due upkeep runs as a script step; the key's expiry is
    /// renewed once half of it has passed, and set where the state was lost. Meanwhile a gate
    /// sees either the old `next` (and parks, to be handed out here) or the new one, as with the
    /// script. Returns the upkeep and whether the turn passed on cleanly (`next` was `order`
    /// or nothing, and nothing is parked): then `order + 1` is the connection's turn.
    async fn quick_done(
        &self,
        reply_channel: &str,
        order: u64,
    ) -> Result<(Upkeep, bool), LayerError> {
        let successor = order.saturating_add(1);
        let shard = self.shard_of(reply_channel);
        let step = Step {
            key: self.order_key(reply_channel),
            args: vec![itoa::Buffer::new().format(successor).as_bytes().to_vec()],
        };
        let [next, parked_until, expires, parked_successor] =
            self.run_done_step(shard, step).await?;
        let next = field_number(next);
        let parked_until = field_number(parked_until);
        let now = now_ms();
        let ttl = self.settings().group_expiry.as_secs().max(1);
        if field_number(expires).is_none_or(|e| e.saturating_sub(now) < ttl * 1000 / 2) {
            let key = self.order_key(reply_channel);
            let mut renew = redis::pipe();
            renew
                .cmd("HSET")
                .arg(&key)
                .arg("e")
                .arg(now + ttl * 1000)
                .ignore()
                .cmd("EXPIRE")
                .arg(&key)
                .arg(ttl)
                .ignore();
            let mut conn = self.inner.shards[shard].conn.clone();
            self.run(
                shard,
                async move { renew.query_async::<()>(&mut conn).await },
            )
            .await?;
        }
        if let Some(ahead) = next.filter(|n| *n > successor) {
            let (_, upkeep) = self
                .redis_step(
                    reply_channel,
                    Some((ahead - 1, false)),
                    None,
                    Duration::ZERO,
                    false,
                    false,
                )
                .await?;
            return Ok((upkeep, false));
        }
        // A repeated done (`next` is past `order` already) hands nothing out: the first did.
        let advanced = next.is_none_or(|n| n <= order);
        let mut upkeep = Upkeep {
            resume: unpack_resume(parked_successor.filter(|_| advanced))?,
            ..Upkeep::default()
        };
        if parked_until.is_some_and(|u| u <= now) {
            let (_, due) = self
                .redis_step(reply_channel, None, None, Duration::ZERO, false, false)
                .await?;
            upkeep.absorb(due);
        }
        let clean = advanced && parked_until.is_none() && upkeep.resume.is_none();
        Ok((upkeep, clean))
    }

    /// The gate of the common case without the script: one HMGET of `next` and `u`. With
    /// nothing parked (`u` absent) and `next` recorded, `order == next` runs and `order < next`
    /// is stale, as the script would say; anything else goes to the script, which parks,
    /// restarts a lost order or runs upkeep ([`QuickGate::Ahead`] when `order > next`: it will
    /// most likely park, so the script gets its value at once). Unlike the script this records
    /// no hold: upkeep acts only on a message parked for the layer expiry, so a successor
    /// parked from now on cannot overtake this one before the worker records a hold for a
    /// consumer still running at half the expiry (`Worker`'s ordered run does).
    async fn quick_gate(&self, reply_channel: &str, order: u64) -> Result<QuickGate, LayerError> {
        if self
            .inner
            .handed_turns
            .take(reply_channel, order, self.turn_trust())
        {
            return Ok(QuickGate::Decided(Gate::Run));
        }
        let [next, parked] = self
            .run_gate_step(self.shard_of(reply_channel), self.order_key(reply_channel))
            .await?;
        // Anything but digits (garbage written by something else) is the script's to judge.
        Ok(match (field_number(next), parked) {
            (Some(next), None) if order == next => QuickGate::Decided(Gate::Run),
            (Some(next), None) if order < next => QuickGate::Decided(Gate::Stale),
            (Some(next), _) if order > next => QuickGate::Ahead,
            _ => QuickGate::Ask,
        })
    }

    async fn redis_step(
        &self,
        reply_channel: &str,
        done: Option<(u64, bool)>,
        gated: Option<Gated<'_>>,
        hold: Duration,
        with_value: bool,
        may_restart: bool,
    ) -> Result<(i64, Upkeep), LayerError> {
        let key = self.order_key(reply_channel);
        let shard = self.shard_of(reply_channel);
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
            if may_restart {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
        ];
        let (v, expired, skipped, resume) = self
            .run_script_step(shard, &STEP_SCRIPT, Step { key, args })
            .await?;
        Ok((
            v,
            Upkeep {
                expired,
                skipped,
                resume: unpack_resume(resume)?,
                restarted: v == RESTARTED,
            },
        ))
    }
}

impl StateBackend for RedisLayer {
    async fn session_load(&self, reply_channel: &str) -> Result<Map, LayerError> {
        let key = session_key(self, reply_channel);
        let cmd = redis::cmd("HGETALL").arg(&key).to_owned();
        let fields: Vec<(String, Vec<u8>)> = self.query_for(reply_channel, cmd).await?;
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

    async fn session_set(
        &self,
        reply_channel: &str,
        key: &str,
        value: &Value,
    ) -> Result<(), LayerError> {
        let packed = codec::to_msgpack(value)?;
        let hkey = session_key(self, reply_channel);
        let (shard, mut conn) = self.conn_for(reply_channel);
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
        self.run(
            shard,
            async move { pipe.query_async::<()>(&mut conn).await },
        )
        .await
    }

    async fn session_delete(&self, reply_channel: &str, key: &str) -> Result<(), LayerError> {
        let hkey = session_key(self, reply_channel);
        let cmd = redis::cmd("HDEL").arg(&hkey).arg(key).to_owned();
        self.query_for::<i64>(reply_channel, cmd).await.map(|_| ())
    }

    async fn session_clear(&self, reply_channel: &str) -> Result<(), LayerError> {
        let hkey = session_key(self, reply_channel);
        let cmd = redis::cmd("DEL").arg(&hkey).to_owned();
        self.query_for::<i64>(reply_channel, cmd).await.map(|_| ())
    }

    async fn ordering_hold(
        &self,
        reply_channel: &str,
        order: u64,
        hold: Duration,
    ) -> Result<bool, LayerError> {
        // The step's gate without the value: it records the hold when `order == next`, and
        // where it would park it answers "needs the value" and writes nothing.
        let gated = Gated {
            order,
            channel: "",
            payload: &[],
        };
        let (v, _) = self
            .redis_step(reply_channel, None, Some(gated), hold, false, false)
            .await?;
        Ok(verdict(v) == Some(Gate::Run))
    }

    async fn ordering_step(
        &self,
        reply_channel: &str,
        done: Option<(u64, bool)>,
        gated: Option<Gated<'_>>,
        hold: Duration,
    ) -> Result<(Option<Gate>, Upkeep), LayerError> {
        match (done, gated) {
            (Some((order, false)), gated) => {
                let (mut upkeep, clean) = self.quick_done(reply_channel, order).await?;
                let successor = order.saturating_add(1);
                let Some(g) = gated else {
                    if clean {
                        let trust = self.turn_trust();
                        self.inner
                            .handed_turns
                            .remember(reply_channel, successor, trust);
                    }
                    return Ok((None, upkeep));
                };
                if g.order == successor {
                    if clean {
                        return Ok((Some(Gate::Run), upkeep));
                    }
                    // The successor parked is a copy of the one gated here: the gate decides
                    // (and unparks it), as the script's done-and-gate would.
                    upkeep.resume = None;
                }
                let (gate, more) = self.gate_step(reply_channel, g, hold).await?;
                upkeep.absorb(more);
                Ok((gate, upkeep))
            }
            (None, Some(g)) => self.gate_step(reply_channel, g, hold).await,
            (Some((_, true)), _) => {
                self.inner.handed_turns.forget(reply_channel);
                self.script_step(reply_channel, done, gated, hold, false)
                    .await
            }
            (None, None) => {
                self.script_step(reply_channel, None, None, hold, false)
                    .await
            }
        }
    }
}

impl RedisLayer {
    /// The gate alone: the quick gate, else the script.
    async fn gate_step(
        &self,
        reply_channel: &str,
        gated: Gated<'_>,
        hold: Duration,
    ) -> Result<(Option<Gate>, Upkeep), LayerError> {
        let with_value = match self.quick_gate(reply_channel, gated.order).await? {
            QuickGate::Decided(gate) => return Ok((Some(gate), Upkeep::default())),
            QuickGate::Ahead => true,
            QuickGate::Ask => false,
        };
        self.script_step(reply_channel, None, Some(gated), hold, with_value)
            .await
    }

    /// A step by the script, with the gated message's value or without (then a gated message
    /// that would park is gated again with its value).
    async fn script_step(
        &self,
        reply_channel: &str,
        done: Option<(u64, bool)>,
        gated: Option<Gated<'_>>,
        hold: Duration,
        with_value: bool,
    ) -> Result<(Option<Gate>, Upkeep), LayerError> {
        let may_restart = gated.is_some_and(|g| g.may_restart());
        let (v, mut upkeep) = self
            .redis_step(reply_channel, done, gated, hold, with_value, may_restart)
            .await?;
        if v != NEEDS_VALUE {
            return Ok((verdict(v), upkeep));
        }
        // It would park: gate it again, with its value this time (the done, if any,
        // is recorded already).
        let (v, again) = self
            .redis_step(reply_channel, None, gated, hold, true, may_restart)
            .await?;
        upkeep.absorb(again);
        Ok((verdict(v).or(Some(Gate::Stale)), upkeep))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! Durable channels on Redis Streams: the storage half of `switchyard::jobs`.
//!
//! A durable channel `c` keeps its jobs in the stream `{prefix}:jobs:{c}`, read through one
//! consumer group ([`GROUP`]) by every worker, so each entry goes to one worker and stays in the
//! group's pending list until that worker acknowledges it (XACK, then XDEL: the stream holds only
//! jobs not yet done). A failed job is moved atomically (one script) from the stream either to
//! the sorted set `{prefix}:jobs:{c}:retry`, scored by when it may run again, or, after its last
//! attempt, to the dead-letter stream `{prefix}:jobs:{c}:dead` with its error and attempt count.
//! A job whose worker died stays pending and is taken over by another worker with XAUTOCLAIM
//! once it has been idle for the job timeout. Sends that did not know the channel is durable
//! (a Django process's `channel_layer.send`, an older Switchyard) land in the channels_redis
//! sorted set `{prefix}{c}`; a worker moves them into the stream with one script (ZPOPMIN and
//! XADD in the same atomic call, so nothing is lost between the two). Every key of a channel
//! lives on the shard of the channel's name. Channel names hold no `:`, so these keys never
//! collide with channels and are skipped by `switchyard stats` like other app data.
//!
//! Entry fields: `p` the message (msgpack map, as on any channel), `t` when it was first sent
//! (ms since the epoch), `a` runs already made (absent: 0), `j` the job's stable id (absent: the
//! entry id, i.e. the first one), `e` the last error, `d` an optional deadline (ms since the
//! epoch), `f` (dead letters) when it died.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use rand::seq::SliceRandom;
use redis::{FromRedisValue, Script, ScriptInvocation, Value};

use super::RedisLayer;
use crate::layer::{LayerError, now_ms};

/// The consumer group every worker reads a durable channel's stream through.
pub const GROUP: &str = "switchyard";

/// Most dead letters a channel keeps (approximately: trimmed with `MAXLEN ~`).
pub const DEAD_LETTERS_KEPT: usize = 100_000;

/// Most jobs one maintenance call moves (from the channels_redis set or the retry set).
const MAINTENANCE_BATCH: usize = 500;

/// KEYS: stream, retry set, [idempotency key]; ARGV: capacity, payload, now (ms), deadline (ms
/// or ""), idempotency window (ms). Returns {0} when full, {1, id} when added, {2, id} when the
/// idempotency key was seen within the window (nothing added).
const SEND_SCRIPT: &str = r"
if #KEYS == 3 then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {2, seen} end
end
local held = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if held >= tonumber(ARGV[1]) then return {0} end
local id
if ARGV[4] == '' then
  id = redis.call('XADD', KEYS[1], '*', 'p', ARGV[2], 't', ARGV[3])
else
  id = redis.call('XADD', KEYS[1], '*', 'p', ARGV[2], 't', ARGV[3], 'd', ARGV[4])
end
if #KEYS == 3 then redis.call('SET', KEYS[3], id, 'PX', ARGV[5]) end
return {1, id}
";

/// KEYS: channels_redis set, stream, retry set; ARGV: now (ms), batch. Moves what plain
/// channel-layer sends left in the set into the stream (dropping the 12 random bytes that
/// prefix a channels_redis member), then the retries now due. Returns {moved, promoted}.
const MAINTAIN_SCRIPT: &str = r"
local moved = 0
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[2])
for i = 1, #popped, 2 do
  local sent = math.floor(tonumber(popped[i + 1]) * 1000)
  redis.call('XADD', KEYS[2], '*', 'p', string.sub(popped[i], 13), 't', tostring(sent))
  moved = moved + 1
end
local promoted = 0
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', unpack(cmsgpack.unpack(m)))
  redis.call('ZREM', KEYS[3], m)
  promoted = promoted + 1
end
return {moved, promoted}
";

/// KEYS: stream, retry set, dead stream; ARGV: entry id, group, error, runs made, retry at (ms,
/// or "" for dead), now (ms), dead letters kept. Takes the entry out of the stream (ack +
/// delete) and into the retry set or the dead-letter stream, in one step. Returns 0 when the
/// entry was gone (another worker finished it), 1 when scheduled, 2 when dead.
const FAIL_SCRIPT: &str = r"
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 0 end
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
local fields = found[1][2]
local out = {}
local job = ARGV[1]
for i = 1, #fields, 2 do
  local k = fields[i]
  if k == 'j' then job = fields[i + 1]
  elseif k ~= 'a' and k ~= 'e' and k ~= 'f' then
    out[#out + 1] = k
    out[#out + 1] = fields[i + 1]
  end
end
for _, v in ipairs({'j', job, 'a', ARGV[4], 'e', ARGV[3]}) do out[#out + 1] = v end
if ARGV[5] == '' then
  out[#out + 1] = 'f'
  out[#out + 1] = ARGV[6]
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', unpack(out))
  return 2
end
redis.call('ZADD', KEYS[2], ARGV[5], cmsgpack.pack(out))
return 1
";

/// KEYS: dead stream, stream; ARGV: entry id ("" for all), now (ms), batch. Puts dead letters
/// back on the stream as fresh jobs (attempts from zero, sent now, no deadline; same job id).
/// Returns how many.
const RETRY_DEAD_SCRIPT: &str = r"
local entries
if ARGV[1] == '' then
  entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[3])
else
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
end
for _, e in ipairs(entries) do
  local f = e[2]
  local out = {}
  local job = e[1]
  for i = 1, #f, 2 do
    local k = f[i]
    if k == 'j' then job = f[i + 1]
    elseif k == 'p' then out[#out + 1] = 'p'; out[#out + 1] = f[i + 1] end
  end
  for _, v in ipairs({'t', ARGV[2], 'j', job}) do out[#out + 1] = v end
  redis.call('XADD', KEYS[2], '*', unpack(out))
  redis.call('XDEL', KEYS[1], e[1])
end
return #entries
";

/// Per-send options of a durable channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobOptions {
    /// Drops this send if another with the same key went to the same channel within
    /// `idempotency_window`.
    pub idempotency_key: Option<String>,
    /// How long the key is remembered (default 24 h).
    pub idempotency_window: Option<Duration>,
    /// Dead-letter the job instead of running it if it has not started this long after the send.
    pub deadline: Option<Duration>,
}

/// What a durable send did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSent {
    /// Added; the job's id.
    Queued(String),
    /// Dropped: the idempotency key was seen within its window; the first send's job id.
    Duplicate(String),
}

impl JobSent {
    /// The job id (of this send, or of the first one for a duplicate).
    pub fn id(&self) -> &str {
        match self {
            JobSent::Queued(id) | JobSent::Duplicate(id) => id,
        }
    }
}

/// One job read from a durable channel.
#[derive(Debug, Clone)]
pub struct StreamJob {
    /// The durable channel.
    pub channel: String,
    /// The stream entry id (changes when a retry re-adds the job).
    pub entry_id: String,
    /// The job's stable id.
    pub job_id: String,
    /// Which run this is (1 for the first).
    pub attempt: u32,
    /// When it was first sent (ms since the epoch).
    pub sent_ms: u64,
    /// Its per-send deadline, if any (ms since the epoch).
    pub deadline_ms: Option<u64>,
    /// The previous run's error, if it failed.
    pub last_error: Option<String>,
    /// The message (msgpack map).
    pub payload: Bytes,
}

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadJob {
    /// The durable channel.
    pub channel: String,
    /// Its id in the dead-letter stream (what `dead retry` takes).
    pub entry_id: String,
    /// The job's stable id.
    pub job_id: String,
    /// Runs made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// When it was first sent (ms since the epoch).
    pub sent_ms: u64,
    /// When it died (ms since the epoch).
    pub failed_ms: u64,
    /// The message as JSON (or a note when it cannot be shown as JSON).
    pub message: String,
}

/// One durable channel's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct JobStats {
    /// The durable channel.
    pub channel: String,
    /// Jobs waiting to start (in the stream, not yet handed to a worker), plus plain sends not
    /// yet moved into the stream.
    pub pending: u64,
    /// Jobs handed to a worker and not yet acknowledged (running, or on a lost worker).
    pub in_progress: u64,
    /// Failed jobs waiting for their next run.
    pub scheduled_retries: u64,
    /// Dead letters.
    pub dead: u64,
    /// Age of the oldest job not yet done, in ms (0 when none).
    pub oldest_age_ms: u64,
}

/// What Redis says about persistence (CONFIG GET), for the startup warning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Persistence {
    /// `appendonly` (`yes`/`no`).
    pub appendonly: String,
    /// `appendfsync` (`always`/`everysec`/`no`).
    pub appendfsync: String,
    /// `save` (RDB snapshot rules; empty: none).
    pub save: String,
}

impl Persistence {
    /// True when neither the append-only file nor RDB snapshots are on: a restart loses every
    /// job.
    pub fn is_off(&self) -> bool {
        self.appendonly != "yes" && self.save.trim().is_empty()
    }
}

/// Scripts, loaded once per layer.
pub(super) struct DurableScripts {
    send: Script,
    maintain: Script,
    fail: Script,
    retry_dead: Script,
}

impl Default for DurableScripts {
    fn default() -> Self {
        DurableScripts {
            send: Script::new(SEND_SCRIPT),
            maintain: Script::new(MAINTAIN_SCRIPT),
            fail: Script::new(FAIL_SCRIPT),
            retry_dead: Script::new(RETRY_DEAD_SCRIPT),
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> u64 {
    match v {
        Value::Int(i) => u64::try_from(*i).unwrap_or(0),
        other => text(other).and_then(|t| t.parse().ok()).unwrap_or(0),
    }
}

/// An entry `[id, [k, v, k, v…]]` as its id and fields (values as raw bytes).
fn entry(v: Value) -> Option<(String, HashMap<String, Vec<u8>>)> {
    let Value::Array(mut parts) = v else {
        return None;
    };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.pop()?;
    let id = text(&parts.pop()?)?;
    let mut map = HashMap::new();
    if let Value::Array(kv) = fields {
        let mut it = kv.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let (Some(k), Value::BulkString(v)) = (text(&k), v) else {
                continue;
            };
            map.insert(k, v);
        }
    }
    // A deleted entry comes back with nil fields (XAUTOCLAIM, XREADGROUP of history).
    Some((id, map))
}

fn field_u64(fields: &HashMap<String, Vec<u8>>, k: &str) -> Option<u64> {
    fields
        .get(k)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
}

fn field_text(fields: &HashMap<String, Vec<u8>>, k: &str) -> Option<String> {
    fields
        .get(k)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn is_busygroup(e: &redis::RedisError) -> bool {
    e.code() == Some("BUSYGROUP")
}

/// True for the error XREADGROUP gives when the stream or its group is gone (FLUSHALL, a
/// restart without persistence, `switchyard flush`): the group must be created again.
pub fn is_nogroup(e: &LayerError) -> bool {
    matches!(e, LayerError::Protocol(m) if m.contains("NOGROUP"))
}

/// A dedicated connection for blocking reads of durable channels ([`RedisLayer::job_reader`]).
pub struct JobReader(super::PopConn);

impl std::fmt::Debug for JobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobReader")
    }
}

impl RedisLayer {
    /// The stream of durable channel `channel`; in a Redis Cluster the channel's name is its
    /// hash tag, as for the channel's own key, so every script of the channel runs in one slot.
    pub(crate) fn job_stream_key(&self, channel: &str) -> String {
        if self.is_cluster() {
            format!("{}:jobs:{{{channel}}}", self.inner.settings.prefix)
        } else {
            format!("{}:jobs:{channel}", self.inner.settings.prefix)
        }
    }

    fn job_keys(&self, channel: &str) -> [String; 3] {
        let stream = self.job_stream_key(channel);
        [format!("{stream}:retry"), format!("{stream}:dead"), stream]
    }

    /// Runs one of the durable scripts on the shard (or slot) that holds `channel`'s jobs.
    async fn invoke_for<T: FromRedisValue>(
        &self,
        channel: &str,
        invocation: ScriptInvocation<'_>,
    ) -> Result<T, LayerError> {
        let (shard, mut conn) = self.conn_for(channel);
        self.run(
            shard,
            async move { invocation.invoke_async(&mut conn).await },
        )
        .await
    }

    /// True when plain sends to `channel` go to its stream (`--durable-channels`).
    pub fn is_durable(&self, channel: &str) -> bool {
        !self.inner.durable.is_empty()
            && !channel.contains(['!', '?'])
            && self.inner.durable.is_match(channel)
    }

    /// Sends a job to durable channel `channel` (XADD), unless the stream already holds
    /// `capacity` jobs not yet done (`ChannelFull`) or the idempotency key was seen.
    pub async fn job_send(
        &self,
        channel: &str,
        payload: &[u8],
        options: &JobOptions,
    ) -> Result<JobSent, LayerError> {
        let [retry, _, stream] = self.job_keys(channel);
        let capacity = self.inner.rules.capacity(channel);
        let now = now_ms();
        let deadline = options
            .deadline
            .map(|d| (now + d.as_millis() as u64).to_string())
            .unwrap_or_default();
        let window = options
            .idempotency_window
            .unwrap_or(Duration::from_secs(86_400))
            .as_millis()
            .max(1) as u64;
        let mut invocation = self.inner.durable_scripts.send.prepare_invoke();
        invocation.key(&stream).key(&retry);
        if let Some(k) = &options.idempotency_key {
            invocation.key(format!("{stream}:idem:{k}"));
        }
        invocation
            .arg(capacity)
            .arg(payload)
            .arg(now)
            .arg(deadline)
            .arg(window);
        let (shard, conn) = self.conn_for(channel);
        // A job send must not run twice: retried only when it provably never reached Redis.
        let mut conn = conn.for_sends();
        let reply: Vec<Value> = self
            .run(
                shard,
                async move { invocation.invoke_async(&mut conn).await },
            )
            .await?;
        let code = reply.first().map_or(0, int);
        let id = reply.get(1).and_then(text).unwrap_or_default();
        match code {
            1 => {
                super::LayerMetrics::add(&self.inner.metrics.sent, 1);
                Ok(JobSent::Queued(id))
            }
            2 => Ok(JobSent::Duplicate(id)),
            _ => {
                super::LayerMetrics::add(&self.inner.metrics.channel_full, 1);
                Err(LayerError::ChannelFull {
                    channel: channel.to_owned(),
                    capacity,
                })
            }
        }
    }

    /// Creates the consumer group of `channel` (and its stream) if missing, reading from the
    /// start so jobs sent before any worker ran are not skipped.
    pub async fn job_group_create(&self, channel: &str) -> Result<(), LayerError> {
        let stream = self.job_stream_key(channel);
        let (shard, mut conn) = self.conn_for(channel);
        let cmd = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .to_owned();
        self.run(shard, async move {
            match cmd.query_async::<()>(&mut conn).await {
                Err(e) if is_busygroup(&e) => Ok(()),
                other => other,
            }
        })
        .await
    }

    /// Moves plain sends and due retries into the stream; returns `(moved, promoted)`.
    pub async fn job_maintain(&self, channel: &str) -> Result<(u64, u64), LayerError> {
        let [retry, _, stream] = self.job_keys(channel);
        let mut invocation = self.inner.durable_scripts.maintain.prepare_invoke();
        invocation
            .key(self.channel_key(channel))
            .key(&stream)
            .key(&retry)
            .arg(now_ms())
            .arg(MAINTENANCE_BATCH);
        let (moved, promoted): (u64, u64) = self.invoke_for(channel, invocation).await?;
        Ok((moved, promoted))
    }

    /// Acknowledges (and deletes) done jobs of one channel.
    pub async fn job_ack(&self, channel: &str, entry_ids: &[String]) -> Result<(), LayerError> {
        if entry_ids.is_empty() {
            return Ok(());
        }
        let stream = self.job_stream_key(channel);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XACK")
            .arg(&stream)
            .arg(GROUP)
            .arg(entry_ids)
            .ignore()
            .cmd("XDEL")
            .arg(&stream)
            .arg(entry_ids)
            .ignore();
        let (shard, mut conn) = self.conn_for(channel);
        self.run(
            shard,
            async move { pipe.query_async::<()>(&mut conn).await },
        )
        .await
    }

    /// Takes a failed job out of the stream: to the retry set, due at `retry_at_ms`, or (when
    /// `None`) to the dead-letter stream. Returns false when the entry was already gone.
    pub async fn job_fail(
        &self,
        channel: &str,
        entry_id: &str,
        error: &str,
        attempts: u32,
        retry_at_ms: Option<u64>,
    ) -> Result<bool, LayerError> {
        let [retry, dead, stream] = self.job_keys(channel);
        let mut invocation = self.inner.durable_scripts.fail.prepare_invoke();
        invocation
            .key(&stream)
            .key(&retry)
            .key(&dead)
            .arg(entry_id)
            .arg(GROUP)
            .arg(error)
            .arg(attempts)
            .arg(retry_at_ms.map(|t| t.to_string()).unwrap_or_default())
            .arg(now_ms())
            .arg(DEAD_LETTERS_KEPT);
        let done: i64 = self.invoke_for(channel, invocation).await?;
        Ok(done != 0)
    }

    /// Resets the idle time of jobs this consumer is running, so no other worker claims them
    /// (XCLAIM … JUSTID: the delivery count is left alone).
    pub async fn job_extend(
        &self,
        channel: &str,
        consumer: &str,
        entry_ids: &[String],
    ) -> Result<(), LayerError> {
        if entry_ids.is_empty() {
            return Ok(());
        }
        let cmd = redis::cmd("XCLAIM")
            .arg(self.job_stream_key(channel))
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg(entry_ids)
            .arg("JUSTID")
            .to_owned();
        self.query_for::<Value>(channel, cmd).await.map(|_| ())
    }

    /// Claims up to `count` jobs idle for `min_idle` (their worker is gone) for `consumer`, with
    /// the runs made so far (XAUTOCLAIM, then XPENDING for their delivery counts).
    pub async fn job_claim(
        &self,
        channel: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<StreamJob>, LayerError> {
        let stream = self.job_stream_key(channel);
        let cmd = redis::cmd("XAUTOCLAIM")
            .arg(&stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count.max(1))
            .to_owned();
        let reply: Value = self.query_for(channel, cmd).await?;
        let Value::Array(mut parts) = reply else {
            return Ok(Vec::new());
        };
        if parts.len() < 2 {
            return Ok(Vec::new());
        }
        let Value::Array(entries) = parts.swap_remove(1) else {
            return Ok(Vec::new());
        };
        let mut jobs = Vec::new();
        for e in entries {
            if let Some((id, fields)) = entry(e)
                && let Some(job) = stream_job(channel, id, &fields, 1)
            {
                jobs.push(job);
            }
        }
        if jobs.is_empty() {
            return Ok(jobs);
        }
        // Each claim counts as a delivery: the runs made so far include those lost with a worker.
        let first = jobs
            .iter()
            .map(|j| j.entry_id.as_str())
            .min()
            .unwrap_or("-");
        let last = jobs
            .iter()
            .map(|j| j.entry_id.as_str())
            .max()
            .unwrap_or("+");
        let pending = redis::cmd("XPENDING")
            .arg(&stream)
            .arg(GROUP)
            .arg(first)
            .arg(last)
            .arg(jobs.len() * 4 + 16)
            .arg(consumer)
            .to_owned();
        let rows: Vec<(String, String, u64, u64)> = self.query_for(channel, pending).await?;
        let deliveries: HashMap<String, u64> =
            rows.into_iter().map(|(id, _, _, n)| (id, n)).collect();
        for job in &mut jobs {
            if let Some(n) = deliveries.get(&job.entry_id) {
                // `attempt` holds the runs recorded by failures plus 1; deliveries since the
                // last re-add count every handover, this one included.
                job.attempt = job.attempt - 1 + (*n as u32).max(1);
            }
        }
        Ok(jobs)
    }

    /// Changes when `shard` follows a new master (Sentinel): a [`RedisLayer::job_reader`]
    /// connection opened under another generation must be replaced.
    pub(crate) fn job_reader_generation(&self, shard: usize) -> u64 {
        self.inner.shards[shard].conn.generation()
    }

    /// A dedicated connection for blocking reads of durable channels on `shard` (no client-side
    /// response timeout: the read is bounded by its BLOCK and a margin instead).
    pub async fn job_reader(&self, shard: usize) -> Result<JobReader, LayerError> {
        let s = &self.inner.shards[shard];
        super::open_pop_conn(&s.conn)
            .await
            .map(JobReader)
            .map_err(|e| {
                s.conn.failed_with(&e);
                LayerError::Unavailable(format!("Redis at {}: {e}", s.addr))
            })
    }

    /// Reads up to `count` new jobs from `channels` (all on `shard`) for `consumer`, blocking up
    /// to `block` (XREADGROUP). A read cut short loses nothing: what Redis handed over stays
    /// pending and is claimed again after the job timeout.
    pub async fn job_read(
        &self,
        reader: &mut JobReader,
        shard: usize,
        channels: &[String],
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<StreamJob>, LayerError> {
        // In a Redis Cluster one read takes streams of one slot: the channels' slots take
        // turns, each with its share of the block, in a random order so none starves.
        if self.is_cluster() {
            let mut lanes: Vec<(redis::cluster_routing::Slot, Vec<String>)> = Vec::new();
            for c in channels {
                let slot = super::cluster::slot_of(&self.job_stream_key(c));
                match lanes.iter_mut().find(|(s, _)| *s == slot) {
                    Some((_, lane)) => lane.push(c.clone()),
                    None => lanes.push((slot, vec![c.clone()])),
                }
            }
            if lanes.len() > 1 {
                lanes.shuffle(&mut rand::rng());
                let share = (block / lanes.len() as u32).max(Duration::from_millis(1));
                for (_, lane) in &lanes {
                    let jobs = self
                        .job_read_streams(reader, shard, lane, consumer, count, share)
                        .await?;
                    if !jobs.is_empty() {
                        return Ok(jobs);
                    }
                }
                return Ok(Vec::new());
            }
        }
        self.job_read_streams(reader, shard, channels, consumer, count, block)
            .await
    }

    /// One XREADGROUP over the streams of `channels`.
    async fn job_read_streams(
        &self,
        reader: &mut JobReader,
        shard: usize,
        channels: &[String],
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<StreamJob>, LayerError> {
        let conn = &mut reader.0;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS");
        let mut by_key = HashMap::new();
        for c in channels {
            let key = self.job_stream_key(c);
            cmd.arg(&key);
            by_key.insert(key, c.clone());
        }
        for _ in channels {
            cmd.arg(">");
        }
        let addr = self.inner.shards[shard].addr.clone();
        let reply = match tokio::time::timeout(
            block + super::DEAD_CONNECTION_MARGIN,
            cmd.query_async::<Value>(conn),
        )
        .await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) if e.code() == Some("NOGROUP") => {
                return Err(LayerError::Protocol(format!("Redis at {addr}: {e}")));
            }
            Ok(Err(e)) => {
                self.inner.shards[shard].conn.failed_with(&e);
                return Err(LayerError::Unavailable(format!("Redis at {addr}: {e}")));
            }
            Err(_) => {
                self.inner.shards[shard].conn.suspect();
                return Err(LayerError::Unavailable(format!(
                    "Redis at {addr}: no answer to a blocking read"
                )));
            }
        };
        let mut jobs = Vec::new();
        let streams = match reply {
            Value::Array(streams) => streams,
            Value::Map(pairs) => pairs
                .into_iter()
                .map(|(k, v)| Value::Array(vec![k, v]))
                .collect(),
            _ => return Ok(jobs),
        };
        for s in streams {
            let Value::Array(mut kv) = s else { continue };
            if kv.len() != 2 {
                continue;
            }
            let entries = kv.pop();
            let Some(channel) = kv.pop().and_then(|k| text(&k)).and_then(|k| by_key.get(&k)) else {
                continue;
            };
            let Some(Value::Array(entries)) = entries else {
                continue;
            };
            for e in entries {
                if let Some((id, fields)) = entry(e)
                    && let Some(job) = stream_job(channel, id, &fields, 1)
                {
                    jobs.push(job);
                }
            }
        }
        Ok(jobs)
    }

    /// Every durable channel with jobs, retries or dead letters under the prefix (SCAN).
    pub async fn job_channels(&self) -> Result<Vec<String>, LayerError> {
        let prefix = format!("{}:jobs:", self.inner.settings.prefix);
        let mut out = Vec::new();
        for shard in 0..self.inner.shards.len() {
            for key in self.scan(shard, &format!("{prefix}*")).await? {
                let Ok(key) = String::from_utf8(key) else {
                    continue;
                };
                let Some(rest) = key.strip_prefix(&prefix) else {
                    continue;
                };
                let channel = rest.split(':').next().unwrap_or(rest);
                let channel = channel
                    .strip_prefix('{')
                    .and_then(|c| c.strip_suffix('}'))
                    .unwrap_or(channel);
                if !channel.is_empty() && !out.iter().any(|c| c == channel) {
                    out.push(channel.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The figures of one durable channel.
    pub async fn job_stats(&self, channel: &str) -> Result<JobStats, LayerError> {
        let [retry, dead, stream] = self.job_keys(channel);
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN")
            .arg(&stream)
            .cmd("ZCARD")
            .arg(&retry)
            .cmd("XLEN")
            .arg(&dead)
            .cmd("ZCOUNT")
            .arg(self.channel_key(channel))
            .arg("-inf")
            .arg("+inf")
            .cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("ZRANGE")
            .arg(&retry)
            .arg(0)
            .arg(0);
        // The pending summary fails on a stream without the group: asked apart.
        let pending = redis::cmd("XPENDING").arg(&stream).arg(GROUP).to_owned();
        let (shard, mut conn) = self.conn_for(channel);
        let mut conn2 = conn.clone();
        let (len, retries, dead, unmoved, first, _): (u64, u64, u64, u64, Value, Value) = self
            .run(shard, async move { pipe.query_async(&mut conn).await })
            .await?;
        let in_progress = match self
            .run(shard, async move {
                pending.query_async::<Value>(&mut conn2).await
            })
            .await
        {
            Ok(Value::Array(summary)) => summary.first().map_or(0, int),
            _ => 0,
        };
        let oldest_sent = match first {
            Value::Array(mut entries) if !entries.is_empty() => {
                entry(entries.swap_remove(0)).and_then(|(_, f)| field_u64(&f, "t"))
            }
            _ => None,
        };
        Ok(JobStats {
            channel: channel.to_owned(),
            pending: len.saturating_sub(in_progress) + unmoved,
            in_progress,
            scheduled_retries: retries,
            dead,
            oldest_age_ms: oldest_sent.map_or(0, |t| now_ms().saturating_sub(t)),
        })
    }

    /// Up to `limit` dead letters of `channel`, oldest first.
    pub async fn dead_list(&self, channel: &str, limit: usize) -> Result<Vec<DeadJob>, LayerError> {
        let [_, dead, _] = self.job_keys(channel);
        let cmd = redis::cmd("XRANGE")
            .arg(&dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .to_owned();
        let reply: Value = self.query_for(channel, cmd).await?;
        let Value::Array(entries) = reply else {
            return Ok(Vec::new());
        };
        Ok(entries
            .into_iter()
            .filter_map(entry)
            .map(|(id, f)| DeadJob {
                channel: channel.to_owned(),
                job_id: field_text(&f, "j").unwrap_or_else(|| id.clone()),
                entry_id: id,
                attempts: field_u64(&f, "a").unwrap_or(0) as u32,
                error: field_text(&f, "e").unwrap_or_default(),
                sent_ms: field_u64(&f, "t").unwrap_or(0),
                failed_ms: field_u64(&f, "f").unwrap_or(0),
                message: f
                    .get("p")
                    .and_then(|p| crate::layer::wire::decode_map(p).ok())
                    .and_then(|m| switchyard_routing::codec::to_json(&m).ok())
                    .unwrap_or_else(|| "(not a msgpack map)".to_owned()),
            })
            .collect())
    }

    /// Puts dead letters back on the stream: one (`Some(entry id)`) or all. Returns how many.
    pub async fn dead_retry(
        &self,
        channel: &str,
        entry_id: Option<&str>,
    ) -> Result<u64, LayerError> {
        let [_, dead, stream] = self.job_keys(channel);
        let mut total = 0;
        loop {
            let mut invocation = self.inner.durable_scripts.retry_dead.prepare_invoke();
            invocation
                .key(&dead)
                .key(&stream)
                .arg(entry_id.unwrap_or_default())
                .arg(now_ms())
                .arg(MAINTENANCE_BATCH);
            let n: u64 = self.invoke_for(channel, invocation).await?;
            total += n;
            if entry_id.is_some() || n < MAINTENANCE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Deletes every dead letter of `channel`; returns how many there were.
    pub async fn dead_purge(&self, channel: &str) -> Result<u64, LayerError> {
        let [_, dead, _] = self.job_keys(channel);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XLEN")
            .arg(&dead)
            .cmd("DEL")
            .arg(&dead)
            .ignore();
        let (shard, mut conn) = self.conn_for(channel);
        let (n,): (u64,) = self
            .run(shard, async move { pipe.query_async(&mut conn).await })
            .await?;
        Ok(n)
    }

    /// Each shard's persistence settings (`None` where CONFIG is refused, as on some managed
    /// Redis services).
    pub async fn persistence(&self) -> Vec<(String, Option<Persistence>)> {
        let mut out = Vec::new();
        for shard in 0..self.inner.shards.len() {
            let mut conn = self.inner.shards[shard].conn.clone();
            let mut pipe = redis::pipe();
            for name in ["appendonly", "appendfsync", "save"] {
                pipe.cmd("CONFIG").arg("GET").arg(name);
            }
            // CONFIG GET answers a flat [name, value] list on RESP2 and a map on RESP3.
            type Answer = HashMap<String, String>;
            let got: Result<(Answer, Answer, Answer), _> = self
                .run(shard, async move { pipe.query_async(&mut conn).await })
                .await;
            let value = |v: Answer| v.into_values().next().unwrap_or_default();
            let p = got.ok().map(|(a, f, s)| Persistence {
                appendonly: value(a),
                appendfsync: value(f),
                save: value(s),
            });
            out.push((self.inner.shards[shard].addr.clone(), p));
        }
        out
    }
}

/// A stream entry as a job; `None` for a deleted entry (nil fields) or one without a message.
fn stream_job(
    channel: &str,
    entry_id: String,
    fields: &HashMap<String, Vec<u8>>,
    this_run: u32,
) -> Option<StreamJob> {
    let payload = Bytes::from(fields.get("p")?.clone());
    let made = field_u64(fields, "a").unwrap_or(0) as u32;
    Some(StreamJob {
        channel: channel.to_owned(),
        job_id: field_text(fields, "j").unwrap_or_else(|| entry_id.clone()),
        entry_id,
        attempt: made.saturating_add(this_run),
        sent_ms: field_u64(fields, "t").unwrap_or(0),
        deadline_ms: field_u64(fields, "d"),
        last_error: field_text(fields, "e"),
        payload,
    })
}

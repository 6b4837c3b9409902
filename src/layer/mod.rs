//! The channel layer: named FIFO channels with expiry and capacity, groups, and process inboxes,
//! over two backends (in-memory for `dev` and tests, Redis for production: one server, shards,
//! Sentinel or Redis Cluster), each implementing the traits of `backend.rs`. On top of the
//! channels, per connection: channel sessions (`session.rs`) and strict ordering
//! (`ordering.rs`); beside them, the app's small store (lists, indexes).
//!
//! [`Layer`] is the cheap-to-clone sending half (send, groups, flush); [`Receiver`] is the
//! receiving half, one blocking receive at a time (`&mut self`), with its own connection on Redis.
//! [`ProcessInbox`] is the one receive loop of a process on its `!` inbox, demultiplexing messages
//! into bounded per-local-channel buffers. Both backends store the same bytes (msgpack maps, with
//! `__asgi_channel__` for `!` targets; see [`wire`]), so they share the codec and its tests.

/// Dispatches a call to the backend.
macro_rules! backend {
    ($self:expr, $layer:ident => $call:expr) => {
        match $self {
            Layer::Memory($layer) => $call,
            Layer::Redis($layer) => $call,
        }
    };
}

pub(crate) mod backend;
pub mod crypto;
pub mod full_retry;
mod inbox;
pub mod membership;
pub mod memory;
mod memory_state;
pub mod metrics;
mod ordering;
pub mod owner;
pub mod redis;
mod session;
mod settings;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use switchyard_routing::Map;
use switchyard_routing::codec::{self, CodecError};
use switchyard_routing::names::{self, NameError};
use thiserror::Error;

pub use crypto::{CryptoError, MessageCrypter};
pub use full_retry::{DEFAULT_BACKPRESSURE_TIMEOUT, FullRetry};
pub use inbox::{LocalChannel, ProcessInbox};
pub use memory::MemoryLayer;
pub use metrics::{LayerMetrics, MetricsSnapshot};
pub use ordering::{Gate, GateOutcome, Upkeep};
pub use redis::RedisLayer;
pub use settings::{
    DEFAULT_CAPACITY, DEFAULT_SERVER_CAPACITY, LayerLossPolicy, LayerSettings, SERVER_FED_CHANNELS,
    glob_matches, parse_channel_capacity,
};
pub(crate) use settings::{glob, glob_set};

/// What a channel-layer operation can fail with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LayerError {
    /// A channel or group name outside the grammar.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// The channel (or, for `!` channels, its process inbox) holds `capacity` messages already.
    #[error("channel {channel:?} is full ({capacity} messages waiting)")]
    ChannelFull {
        /// The channel sent to.
        channel: String,
        /// Its capacity.
        capacity: usize,
    },
    /// The message could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The backend cannot be reached now (Redis down or restarting); the operation was not done.
    #[error("channel layer unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something unexpected.
    #[error("channel layer protocol error: {0}")]
    Protocol(String),
    /// A layer URL or setting that makes no sense.
    #[error("invalid channel layer configuration: {0}")]
    Config(String),
    /// The backend answers but is a kind this layer cannot use as configured (a Redis Cluster
    /// node behind a plain `redis://` URL, a Sentinel where a Redis was expected): retrying
    /// cannot help, the URL must change.
    #[error("channel layer unusable: {0}")]
    Unsupported(String),
}

impl LayerError {
    /// True for `ChannelFull`.
    pub fn is_full(&self) -> bool {
        matches!(self, LayerError::ChannelFull { .. })
    }
    /// True when the backend was unreachable.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, LayerError::Unavailable(_))
    }
}

/// One message as read from a channel: the full channel name it was sent to, and its stored bytes
/// (a msgpack map, shared cheaply between the targets of a group message).
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The full channel name (for `!` messages, including the local part).
    pub channel: String,
    /// The msgpack map as stored.
    pub payload: Bytes,
}

impl Envelope {
    /// Decodes into a typed message.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        wire::decode(&self.payload)
    }
    /// Decodes into a map, without the layer's `__asgi_channel__` key.
    pub fn to_map(&self) -> Result<Map, CodecError> {
        wire::decode_map(&self.payload)
    }
    /// The message as JSON (for logs and the CLI).
    pub fn to_json(&self) -> Result<String, CodecError> {
        codec::to_json(&self.to_map()?)
    }
}

/// What a group send did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupSendReport {
    /// Member channels the group had (after expiry).
    pub members: usize,
    /// Members that missed the message because their channel (or inbox) was full.
    pub full: usize,
}

/// Every channel and group the layer holds now, for `switchyard stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Overview {
    /// Channels with waiting messages (expired ones excluded); process inboxes end with `!`.
    pub channels: Vec<Count>,
    /// Groups with their live members.
    pub groups: Vec<Count>,
}

/// A name and how many messages (channel) or members (group) it has.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Count {
    /// The channel or group name.
    pub name: String,
    /// Messages waiting, or members.
    pub count: usize,
}

impl Count {
    pub(crate) fn new(name: impl Into<String>, count: usize) -> Self {
        Count {
            name: name.into(),
            count,
        }
    }
}

/// A channel layer: memory or Redis, chosen by URL.
#[derive(Clone, Debug)]
pub enum Layer {
    /// One process, in memory.
    Memory(MemoryLayer),
    /// Redis (one or several shards).
    Redis(RedisLayer),
}

use backend::{AppStore, BackendReceiver, ChannelBackend};

impl Layer {
    /// Opens a layer from a URL: `memory://`, `redis://host:port/db`, `rediss://…`, `unix:///path`,
    /// or several comma-separated Redis URLs (shards).
    pub async fn from_url(url: &str, settings: LayerSettings) -> Result<Layer, LayerError> {
        let url = url.trim();
        if url == "memory://" || url == "memory" {
            return Ok(Layer::Memory(MemoryLayer::new(settings)?));
        }
        let urls: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(LayerError::Config("empty channel layer URL".into()));
        }
        if url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://") {
            // One URL lists the sentinels of one master: its commas are not shards.
            return Ok(Layer::Redis(
                RedisLayer::connect_sentinel(url, settings).await?,
            ));
        }
        if url.starts_with("redis+cluster://") || url.starts_with("rediss+cluster://") {
            // One URL lists seed nodes of one cluster: its commas are not shards.
            return Ok(Layer::Redis(
                RedisLayer::connect_cluster(url, settings).await?,
            ));
        }
        for u in &urls {
            if !(u.starts_with("redis://")
                || u.starts_with("rediss://")
                || u.starts_with("unix://")
                || u.starts_with("redis+unix://"))
            {
                return Err(LayerError::Config(format!(
                    "unsupported channel layer URL {u:?}: use memory://, redis://host:port/db, rediss://…, unix:///path, several redis URLs separated by commas, redis+sentinel://host:port[,host:port…]/<master-name>[/<db>], or redis+cluster://host:port[,host:port…]"
                )));
            }
        }
        Ok(Layer::Redis(RedisLayer::connect(&urls, settings).await?))
    }

    /// The settings in force.
    pub fn settings(&self) -> &LayerSettings {
        backend!(self, l => l.settings())
    }

    /// Counters: sends, refusals, drops, expiries, reconnects.
    pub fn metrics(&self) -> &Arc<LayerMetrics> {
        backend!(self, l => l.metrics())
    }

    /// False while the backend is known to be unreachable (a command failed and none has
    /// succeeded since; the Redis backend checks an idle connection every second).
    pub fn available(&self) -> bool {
        match self {
            Layer::Memory(_) => true,
            Layer::Redis(l) => l.available(),
        }
    }

    /// A short description for logs (`memory://` or the Redis addresses, without passwords).
    pub fn describe(&self) -> String {
        backend!(self, l => l.describe())
    }

    /// How the backend is deployed, for the startup line and `/healthz`: `memory`, `single`
    /// (one Redis), `shards` (several, client-side sharded), `sentinel` (the master Sentinel
    /// names, followed across failovers) or `cluster` (a Redis Cluster).
    pub fn mode(&self) -> &'static str {
        match self {
            Layer::Memory(_) => "memory",
            Layer::Redis(l) => l.mode(),
        }
    }

    /// Sends a message (anything that serializes to a map) to a channel.
    pub async fn send<M: Serialize + ?Sized>(
        &self,
        channel: &str,
        message: &M,
    ) -> Result<(), LayerError> {
        let payload = codec::to_msgpack(message)?;
        self.send_encoded(channel, &payload).await
    }

    /// Sends an already msgpack-encoded map.
    pub async fn send_encoded(&self, channel: &str, payload: &[u8]) -> Result<(), LayerError> {
        names::validate_channel(channel)?;
        wire::check_is_map(payload)?;
        backend!(self, l => l.send_encoded(channel, payload).await)
    }

    /// Sends a job to a durable channel (`--durable-channels` or not: the channel is made
    /// durable by this send), with per-send options: an idempotency key, a deadline. Redis only.
    pub async fn send_job(
        &self,
        channel: &str,
        payload: &[u8],
        options: &crate::jobs::JobOptions,
    ) -> Result<crate::jobs::JobSent, LayerError> {
        names::validate_channel(channel)?;
        wire::check_is_map(payload)?;
        if channel.contains(['!', '?']) {
            return Err(LayerError::Config(format!(
                "{channel:?} is a single-reader channel; only plain channel names can be durable"
            )));
        }
        match self {
            Layer::Memory(_) => Err(LayerError::Config(memory::DURABLE_NEEDS_REDIS.into())),
            Layer::Redis(l) => l.job_send(channel, payload, options).await,
        }
    }

    /// Adds a channel to a group (idempotent; renews its membership).
    pub async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        names::validate_group(group)?;
        names::validate_channel(channel)?;
        backend!(self, l => l.group_add(group, channel).await)
    }

    /// Removes a channel from a group (no-op when absent).
    pub async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        names::validate_group(group)?;
        names::validate_channel(channel)?;
        backend!(self, l => l.group_discard(group, channel).await)
    }

    /// The group's current members (expired memberships left out).
    pub async fn group_channels(&self, group: &str) -> Result<Vec<String>, LayerError> {
        names::validate_group(group)?;
        backend!(self, l => l.group_channels(group).await)
    }

    /// Sends a message to every member of a group. Never fails because a member is full: that
    /// member misses the message, and it is counted in the report and the metrics.
    pub async fn group_send<M: Serialize + ?Sized>(
        &self,
        group: &str,
        message: &M,
    ) -> Result<GroupSendReport, LayerError> {
        let payload = codec::to_msgpack(message)?;
        self.group_send_encoded(group, &payload).await
    }

    /// Group send of an already msgpack-encoded map.
    pub async fn group_send_encoded(
        &self,
        group: &str,
        payload: &[u8],
    ) -> Result<GroupSendReport, LayerError> {
        names::validate_group(group)?;
        wire::check_is_map(payload)?;
        backend!(self, l => l.group_send_encoded(group, payload).await)
    }

    /// A new single-reader channel name: `pattern` must end with `?`, and a random part is added.
    /// Process-local (`!`) names are minted by a [`ProcessInbox`], which owns their inbox.
    pub fn new_channel(&self, pattern: &str) -> Result<String, LayerError> {
        if !pattern.ends_with('?') || pattern.matches('?').count() != 1 || pattern.contains('!') {
            return Err(NameError::BadPattern(pattern.to_owned()).into());
        }
        let name = with_random_local_part(pattern);
        names::validate_channel(&name)?;
        Ok(name)
    }

    /// A receiver: one blocking receive at a time, with its own connection on Redis.
    pub async fn receiver(&self) -> Result<Receiver, LayerError> {
        let backend = match self {
            Layer::Memory(l) => ReceiverBackend::Memory(l.receiver()),
            Layer::Redis(l) => ReceiverBackend::Redis(l.receiver()),
        };
        Ok(Receiver {
            backend,
            pending: Pending::default(),
        })
    }

    /// Starts this process's inbox: a `!` channel named `{prefix}.{random}!`, read by one loop
    /// that hands each message to the local channel it names.
    pub async fn inbox(&self, prefix: &str) -> Result<ProcessInbox, LayerError> {
        ProcessInbox::start(self.clone(), prefix).await
    }

    /// Empties the layer: every channel and group under the prefix (SCAN + UNLINK on Redis).
    pub async fn flush(&self) -> Result<(), LayerError> {
        backend!(self, l => l.flush().await)
    }

    /// Every channel and group under the prefix with its depth or size, sorted by name.
    pub async fn overview(&self) -> Result<Overview, LayerError> {
        let mut o = backend!(self, l => l.overview().await)?;
        o.channels.sort();
        o.groups.sort();
        Ok(o)
    }

    /// Appends `item` to the capped list `key` (app data such as a chat room's history), keeping
    /// the newest `keep` items; the list lapses `ttl` after its last append.
    pub async fn list_push(
        &self,
        key: &str,
        item: &[u8],
        keep: usize,
        ttl: Duration,
    ) -> Result<(), LayerError> {
        names::validate_group(key)?;
        backend!(self, l => l.list_push(key, item, keep.max(1), ttl).await)
    }

    /// The items of list `key`, oldest first.
    pub async fn list_items(&self, key: &str) -> Result<Vec<Bytes>, LayerError> {
        names::validate_group(key)?;
        backend!(self, l => l.list_items(key).await)
    }

    /// Marks `member` of index `key` as active now (app data such as the list of chat rooms),
    /// keeping only the `keep` most recently touched members; the index lapses `ttl` after its
    /// last touch.
    pub async fn index_touch(
        &self,
        key: &str,
        member: &str,
        keep: usize,
        ttl: Duration,
    ) -> Result<(), LayerError> {
        names::validate_group(key)?;
        backend!(self, l => l.index_touch(key, member, keep.max(1), ttl).await)
    }

    /// Up to `limit` members of index `key`, most recently touched first.
    pub async fn index_recent(&self, key: &str, limit: usize) -> Result<Vec<String>, LayerError> {
        names::validate_group(key)?;
        backend!(self, l => l.index_recent(key, limit).await)
    }

    /// Messages waiting on a channel (for `!` channels: on their inbox), expired ones excluded.
    pub async fn channel_depth(&self, channel: &str) -> Result<usize, LayerError> {
        names::validate_channel(channel)?;
        backend!(self, l => l.channel_depth(channel).await)
    }
}

/// The receiving half of a layer.
#[derive(Debug)]
pub struct Receiver {
    backend: ReceiverBackend,
    /// Envelopes popped but not handed out yet: the further targets of a group message past
    /// what one call returns. Served before anything new is popped.
    pending: Pending,
}

#[derive(Debug)]
enum ReceiverBackend {
    Memory(memory::MemoryReceiver),
    /// With its own connection per shard.
    Redis(redis::RedisReceiver),
}

impl Receiver {
    /// Waits up to `timeout` for one message on any of `channels` (normal names, `?` names, or
    /// `!` inboxes ending at the `!`), in a random order across channels so none starves.
    /// `Ok(None)` when nothing arrived in time.
    pub async fn receive(
        &mut self,
        channels: &[String],
        timeout: Duration,
    ) -> Result<Option<Envelope>, LayerError> {
        let mut got = self.receive_many(channels, timeout, 1).await?.into_iter();
        let first = got.next();
        self.pending.extend(got);
        Ok(first)
    }

    /// Waits up to `timeout` for messages on one channel (typically a process inbox) and returns
    /// every message then available, up to `max`. A group message naming several local channels
    /// counts once and comes back once per target, sharing its bytes.
    pub async fn receive_batch(
        &mut self,
        channel: &str,
        timeout: Duration,
        max: usize,
    ) -> Result<Vec<Envelope>, LayerError> {
        self.receive_many(std::slice::from_ref(&channel.to_owned()), timeout, max)
            .await
    }

    /// Waits up to `timeout` for messages on any of `channels` and returns those then waiting on
    /// the first channel found non-empty, up to `max` (a worker takes one batch for all its idle
    /// consumers in one Redis command). Empty when nothing arrived in time. A group message
    /// naming several local channels counts once and comes back once per target.
    pub async fn receive_many(
        &mut self,
        channels: &[String],
        timeout: Duration,
        max: usize,
    ) -> Result<Vec<Envelope>, LayerError> {
        for c in channels {
            names::validate_receive_channel(c)?;
        }
        if channels.is_empty() {
            return Err(LayerError::Config(
                "receive needs at least one channel".into(),
            ));
        }
        let max = max.max(1);
        let mut out = Vec::new();
        while out.len() < max
            && let Some(e) = self.pending.take(channels)
        {
            out.push(e);
        }
        if !out.is_empty() {
            return Ok(out);
        }
        match &mut self.backend {
            ReceiverBackend::Memory(r) => r.receive_many(channels, timeout, max).await,
            ReceiverBackend::Redis(r) => r.receive_many(channels, timeout, max).await,
        }
    }
}

/// Group members bucketed by the Redis key (inbox) they live in, in first-seen order: a group
/// send writes one message per bucket, naming its members.
pub(crate) fn by_inbox(members: &[String]) -> Vec<(&str, Vec<&str>)> {
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut buckets: Vec<(&str, Vec<&str>)> = Vec::new();
    // The bucket of the member before: runs of one inbox are the usual case (one interface
    // server holds every member, or members joined in runs), and need no hashing.
    let mut previous: Option<usize> = None;
    for m in members {
        let key = names::non_local_name(m);
        let bucket = match previous {
            Some(i) if buckets[i].0 == key => i,
            _ => *index.entry(key).or_insert_with(|| {
                buckets.push((key, Vec::new()));
                buckets.len() - 1
            }),
        };
        buckets[bucket].1.push(m);
        previous = Some(bucket);
    }
    buckets
}

/// Envelopes already popped but not yet handed out: the further targets of a group message
/// read through [`Receiver::receive`], which returns one envelope per call.
#[derive(Debug, Default)]
struct Pending(std::collections::VecDeque<Envelope>);

impl Pending {
    /// The first pending envelope for any of `channels` (an inbox name or a full name).
    fn take(&mut self, channels: &[String]) -> Option<Envelope> {
        let i = self.0.iter().position(|e| {
            channels
                .iter()
                .any(|c| c == names::non_local_name(&e.channel) || *c == e.channel)
        })?;
        self.0.remove(i)
    }

    fn extend(&mut self, envelopes: impl IntoIterator<Item = Envelope>) {
        self.0.extend(envelopes);
    }
}

/// Characters in a random local part: 16 alphanumerics carry 95 random bits, as unguessable as
/// a reply channel needs, in half the bytes of a uuid's 32 hex digits. A name is paid for per
/// member of a group on every group send (read from the group, listed in the message, hashed and
/// looked up by the interface server), so its length is part of a broadcast's cost.
const LOCAL_PART_LEN: usize = 16;

/// A random, unguessable local part of [`LOCAL_PART_LEN`] alphanumeric characters.
pub(crate) fn random_local_part() -> String {
    with_random_local_part("")
}

/// `prefix` followed by a random local part, built in one allocation (a name is minted per
/// connection and per HTTP request).
pub(crate) fn with_random_local_part(prefix: &str) -> String {
    use rand::Rng;
    let mut name = String::with_capacity(prefix.len() + LOCAL_PART_LEN);
    name.push_str(prefix);
    name.extend(
        rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(LOCAL_PART_LEN)
            .map(char::from),
    );
    name
}

/// Turns one stored payload read from `read_from` into envelopes, one per target.
pub(crate) fn envelopes_for(
    read_from: &str,
    payload: Bytes,
    out: &mut Vec<Envelope>,
) -> Result<(), CodecError> {
    match wire::read_targets(&payload)? {
        wire::Targets::Unnamed => out.push(Envelope {
            channel: read_from.to_owned(),
            payload,
        }),
        wire::Targets::One(name) => out.push(Envelope {
            channel: name,
            payload,
        }),
        wire::Targets::Many(list) => {
            if list.is_empty() {
                out.push(Envelope {
                    channel: read_from.to_owned(),
                    payload,
                });
                return Ok(());
            }
            for name in list {
                out.push(Envelope {
                    channel: name,
                    payload: payload.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch: lease deadlines, ordering and job times.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, millis)
}

/// A duration in whole milliseconds (saturating).
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Seconds since the Unix epoch, as channels_redis scores messages.
pub(crate) fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_members_are_bucketed_by_inbox_in_first_seen_order() {
        let members: Vec<String> = [
            "a.x!1", "a.x!2", "b.y!1", "a.x!3", "a.x!4", "plain", "b.y!2", "b.y!3",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            by_inbox(&members),
            vec![
                ("a.x!", vec!["a.x!1", "a.x!2", "a.x!3", "a.x!4"]),
                ("b.y!", vec!["b.y!1", "b.y!2", "b.y!3"]),
                ("plain", vec!["plain"]),
            ]
        );
    }

    #[test]
    fn random_local_parts_are_sixteen_alphanumerics_and_differ() {
        let a = random_local_part();
        let b = random_local_part();
        assert_eq!(a.len(), LOCAL_PART_LEN);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_ne!(a, b);
        // A minted reply channel stays a valid name.
        names::validate_channel(&format!("switchyard.response.{a}!{b}")).unwrap();
    }
}

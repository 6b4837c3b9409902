//! The Redis backend, wire-compatible with Python's channels_redis 4.x.
//!
//! A channel is the sorted set `{prefix}{non-local name}`; a member is 12 random bytes followed by
//! the msgpack map, scored by send time in seconds; a group is the sorted set
//! `{prefix}:group:{name}` of channel names scored by add time. Where channels_redis is slow or
//! wrong we keep the format and do better: sends are one atomic Lua script per key (check
//! capacity, trimming expired members only when full, add, expire), and the sends a process makes
//! meanwhile are coalesced into one such call per key (see [`batch`]); expiry is checked again at
//! receive; `!` channels are sharded by their non-local name on send and receive alike
//! (channels_redis#221 loses them); flush uses SCAN; a group send writes one message per inbox
//! key with the same one-key script, so the model stays groupable by hash slot for Redis Cluster.
//!
//! Sends and group operations share one auto-reconnecting multiplexed connection per shard, each
//! command bounded by `command_timeout` so an outage fails fast. Blocking pops (BZPOPMIN for one
//! message, BZMPOP for a batch, BZPOPMIN + ZPOPMIN before Redis 7) run on a dedicated
//! connection per receiver and shard with no client-side response timeout (a timed-out or
//! cancelled BZPOPMIN loses the message Redis pops for it after the client gave up: the pop
//! happens on the server whether or not anyone still reads the reply).
//!
//! Behind Sentinel (`redis+sentinel://`) the one shard is the master the sentinels name, and
//! [`conn`] follows it across failovers.
//!
//! In a Redis Cluster (`redis+cluster://`) the one shard is the cluster, reached through
//! redis-rs's cluster connection; [`cluster`] says what changes in the model (hash tags,
//! pipelines split by slot, pops grouped by slot, SCAN on every master).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rand::RngCore;
use rand::seq::SliceRandom;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script};
use switchyard_routing::names::non_local_name;
use tokio::time::Instant;

use super::backend::{BackendReceiver, ChannelBackend};
use super::crypto::MessageCrypter;
use super::metrics::LayerMetrics;
use super::settings::CapacityRules;
use super::{
    Envelope, GroupSendReport, LayerError, LayerSettings, envelopes_for, membership, now_secs, wire,
};

mod batch;
mod channels;
mod cluster;
mod conn;
mod lanes;
mod lease;
mod owned;
mod registry;
mod sentinel_url;
mod state;
mod steps;
mod store;
mod turns;

pub(crate) use lease::LeaseState;

pub(crate) use conn::SharedConn;
pub(crate) use steps::Step;

/// How long a shard's connection may sit without a successful command before the keepalive
/// checks it, so a restart or a dead peer is noticed before traffic meets it.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// The keepalive's period while a shard is unreachable: how soon a recovery is noticed.
const KEEPALIVE_WHILE_DOWN: Duration = Duration::from_millis(250);
pub mod durable;

/// How much longer than its own block time a pop may take before its connection is deemed dead.
const DEAD_CONNECTION_MARGIN: Duration = Duration::from_secs(5);

impl Shard {
    fn new(addr: String, conn: SharedConn) -> Self {
        Shard {
            addr,
            conn,
            healthy: AtomicBool::new(true),
            last_ok_ms: AtomicU64::new(0),
            has_bzmpop: AtomicBool::new(true),
            sends: batch::SendQueue::default(),
            in_flight: Arc::default(),
            steps: steps::StepQueue::default(),
        }
    }
}

/// One Redis server of the shard ring.
struct Shard {
    /// Address for logs and errors (no password); behind Sentinel, the master's name.
    addr: String,
    conn: SharedConn,
    /// False after a failed command, until one succeeds (to count reconnects once).
    healthy: AtomicBool,
    /// When a command last succeeded, in ms since the layer was made (the keepalive's clock).
    last_ok_ms: AtomicU64,
    /// False once the server refused BZMPOP (Redis before 7.0): batches then take BZPOPMIN and
    /// a ZPOPMIN.
    has_bzmpop: AtomicBool,
    /// This process's sends to the shard that came while others were in flight, coalesced by
    /// one task.
    sends: batch::SendQueue,
    /// Sends in flight on this shard: a direct write, or messages queued for the send task
    /// until written.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// This process's ordering steps on the shard, coalesced while others are in flight.
    steps: steps::StepQueue,
}

struct Inner {
    settings: LayerSettings,
    /// Set when the one shard is the master a Sentinel names.
    sentinel: Option<SentinelInfo>,
    /// Set when the one shard is a Redis Cluster (its seed nodes, for logs): keys carry hash
    /// tags (see [`cluster`]).
    cluster: Option<String>,
    rules: CapacityRules,
    metrics: Arc<LayerMetrics>,
    shards: Vec<Shard>,
    batch_script: Script,
    /// Set when `symmetric_encryption_keys` are: payloads are stored as Fernet tokens.
    crypter: Option<MessageCrypter>,
    /// Oldest token the crypter accepts (channels_redis: expiry + 10 s).
    crypter_ttl: u64,
    /// The last message score given (µs since the epoch); see [`RedisLayer::next_score`].
    last_score: AtomicU64,
    /// The origin of the shards' `last_ok_ms` clocks.
    born: Instant,
    /// Channels this process has entered in the channel registry (see [`registry`]).
    registered: dashmap::DashSet<String, rustc_hash::FxBuildHasher>,
    /// Channels whose sends go to a stream (`--durable-channels`).
    durable: globset::GlobSet,
    durable_scripts: durable::DurableScripts,
    /// The connections' next turns this process knows from recording their last message as
    /// run (see [`turns`]).
    handed_turns: turns::HandedTurns,
}

/// What a Sentinel-managed layer says of itself in logs.
struct SentinelInfo {
    master: String,
    sentinels: String,
}

/// The Redis channel layer. Clones share connections.
#[derive(Clone)]
pub struct RedisLayer {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLayer")
            .field("shards", &self.describe())
            .finish()
    }
}

/// channels_redis' ring: `crc32(name) & 0xFFF` over 4096 slots split evenly between shards.
pub fn consistent_hash(name: &str, ring_size: usize) -> usize {
    if ring_size <= 1 {
        return 0;
    }
    let bigval = crc32fast::hash(name.as_bytes()) & 0xFFF;
    let ring_divisor = 4096.0 / ring_size as f64;
    ((f64::from(bigval) / ring_divisor) as usize).min(ring_size - 1)
}

/// Why the nodes of a `redis+cluster://` URL could not be used: not in cluster mode (a
/// configuration error, exit 3) or not reachable.
fn cluster_refusal(hosts: &[String], e: &RedisError) -> LayerError {
    let text = e.to_string().to_ascii_lowercase();
    if text.contains("cluster support disabled") || text.contains("cluster mode") {
        LayerError::Unsupported(format!(
            "Redis at {} is not in cluster mode: use redis://{}/0",
            hosts.join(","),
            hosts.first().map_or("host:port", String::as_str)
        ))
    } else {
        LayerError::Unavailable(format!("no Redis Cluster at {}: {e}", hosts.join(",")))
    }
}

fn is_outage(e: &RedisError) -> bool {
    conn::refused_unrun(e)
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

impl RedisLayer {
    /// Connects to every shard (one URL each) and checks each answers PING.
    pub async fn connect(urls: &[&str], settings: LayerSettings) -> Result<Self, LayerError> {
        let mut shards = Vec::with_capacity(urls.len());
        for url in urls {
            let client = Client::open(*url)
                .map_err(|e| LayerError::Config(format!("invalid Redis URL {url:?}: {e}")))?;
            let addr = client.get_connection_info().addr().to_string();
            let conn = SharedConn::new(conn::prefer_resp3(client, url), settings.command_timeout)
                .map_err(|e| {
                LayerError::Config(format!("cannot set up Redis at {addr}: {e}"))
            })?;
            shards.push(Shard::new(addr, conn));
        }
        Self::start(shards, None, None, settings).await
    }

    /// Connects to the master that the sentinels of `url`
    /// (`redis+sentinel://[user:password@]host:port[,host:port…]/<master-name>[/<db>]`) name,
    /// and follows it across failovers.
    pub async fn connect_sentinel(url: &str, settings: LayerSettings) -> Result<Self, LayerError> {
        let target = sentinel_url::parse(url)?;
        let info = SentinelInfo {
            master: target.master.clone(),
            sentinels: target
                .sentinels
                .iter()
                .map(|s| s.trim_start_matches("redis://"))
                .collect::<Vec<_>>()
                .join(","),
        };
        let label = format!("sentinel master {}", target.master);
        let conn = SharedConn::via_sentinel(target, settings.command_timeout)
            .await
            .map_err(|e| {
                LayerError::Unavailable(format!(
                    "no master {:?} from the sentinels at {}: {e}",
                    info.master, info.sentinels
                ))
            })?;
        Self::start(vec![Shard::new(label, conn)], Some(info), None, settings).await
    }

    /// Connects to the Redis Cluster whose nodes `url`
    /// (`redis+cluster://[user:password@]host:port[,host:port…]`) names (any of them is enough:
    /// the others are learnt from the cluster), through redis-rs's cluster connection.
    pub async fn connect_cluster(url: &str, settings: LayerSettings) -> Result<Self, LayerError> {
        let seeds = cluster::seed_urls(url)?;
        let seed = Client::open(seeds[0].as_str())
            .map_err(|e| LayerError::Config(format!("invalid Redis Cluster URL {url:?}: {e}")))?;
        let timeout = settings.command_timeout;
        let client = redis::cluster::ClusterClient::builder(seeds.iter().map(String::as_str))
            .connection_timeout(timeout.min(Duration::from_secs(1)))
            .response_timeout(timeout)
            .retries(6)
            .min_retry_wait(10)
            .max_retry_wait(400)
            .build()
            .map_err(|e| LayerError::Config(format!("invalid Redis Cluster URL {url:?}: {e}")))?;
        let hosts: Vec<String> = seeds
            .iter()
            .map(|s| {
                Client::open(s.as_str())
                    .map(|c| c.get_connection_info().addr().to_string())
                    .unwrap_or_default()
            })
            .collect();
        let label = format!("cluster {}", hosts.join(","));
        let conn = match tokio::time::timeout(
            timeout.max(Duration::from_secs(2)),
            SharedConn::to_cluster(client, seed),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                return Err(cluster_refusal(&hosts, &e));
            }
            Err(_) => {
                return Err(LayerError::Unavailable(format!(
                    "no Redis Cluster node at {} answered in time",
                    hosts.join(",")
                )));
            }
        };
        Self::start(
            vec![Shard::new(label, conn)],
            None,
            Some(hosts.join(",")),
            settings,
        )
        .await
    }

    async fn start(
        shards: Vec<Shard>,
        sentinel: Option<SentinelInfo>,
        cluster: Option<String>,
        settings: LayerSettings,
    ) -> Result<Self, LayerError> {
        let rules = settings.compile()?;
        let durable = settings.durable_rules()?;
        let crypter = if settings.symmetric_encryption_keys.is_empty() {
            None
        } else {
            Some(
                MessageCrypter::new(&settings.symmetric_encryption_keys)
                    .map_err(|e| LayerError::Config(e.to_string()))?,
            )
        };
        let crypter_ttl = settings.expiry.as_secs().saturating_add(10);
        let layer = RedisLayer {
            inner: Arc::new(Inner {
                crypter,
                crypter_ttl,
                settings,
                sentinel,
                cluster,
                rules,
                metrics: Arc::default(),
                shards,
                batch_script: Script::new(batch::BATCH_SEND_SCRIPT),
                last_score: AtomicU64::new(0),
                born: Instant::now(),
                registered: dashmap::DashSet::with_hasher(rustc_hash::FxBuildHasher),
                durable,
                durable_scripts: durable::DurableScripts::default(),
                handed_turns: turns::HandedTurns::default(),
            }),
        };
        for i in 0..layer.inner.shards.len() {
            let mut conn = layer.inner.shards[i].conn.clone();
            let ping = redis::cmd("PING");
            layer
                .run(
                    i,
                    async move { ping.query_async::<String>(&mut conn).await },
                )
                .await?;
            layer.check_server_mode(i).await?;
        }
        for shard in 0..layer.inner.shards.len() {
            tokio::spawn(keepalive(Arc::downgrade(&layer.inner), shard));
        }
        Ok(layer)
    }

    /// Refuses a server this layer cannot use through a plain URL, before any request meets
    /// it: a Redis Cluster node answers PING but then refuses multi-key scripts (`CROSSSLOT`)
    /// and keys of other slots (`MOVED`), and a Sentinel answers PING but stores nothing.
    async fn check_server_mode(&self, i: usize) -> Result<(), LayerError> {
        if self.inner.cluster.is_some() {
            // The cluster connection only opens to nodes in cluster mode.
            return Ok(());
        }
        let mut conn = self.inner.shards[i].conn.clone();
        let info = redis::cmd("INFO");
        // Default sections: `server` (redis_mode) and `cluster` (cluster_enabled).
        let info = match self
            .run(
                i,
                async move { info.query_async::<String>(&mut conn).await },
            )
            .await
        {
            Ok(info) => info,
            // Some managed services rename or restrict INFO: then nothing can be told here.
            Err(LayerError::Protocol(e)) => {
                tracing::debug!(error = %e, "INFO refused; cannot check the server's mode");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let addr = &self.inner.shards[i].addr;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let cluster_node =
            field("cluster_enabled") == Some("1") || field("redis_mode") == Some("cluster");
        if cluster_node {
            return Err(LayerError::Unsupported(format!(
                "Redis at {addr} is a Redis Cluster node (cluster_enabled:1): use redis+cluster://{addr} (any node of the cluster; several comma-separated ride over a node that is down)"
            )));
        }
        if field("redis_mode") == Some("sentinel") {
            return Err(LayerError::Unsupported(format!(
                "{addr} is a Redis Sentinel, not a Redis: use redis+sentinel://{addr}/<master-name>[/<db>]"
            )));
        }
        Ok(())
    }

    /// Milliseconds on the layer's clock.
    fn clock_ms(&self) -> u64 {
        self.inner.born.elapsed().as_millis() as u64
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// The shard a channel (by its non-local name) or group lives on.
    pub fn shard_of(&self, name: &str) -> usize {
        consistent_hash(non_local_name(name), self.inner.shards.len())
    }

    /// The key of a channel (of its inbox, for a `!` name): `{prefix}{name}`, or in a Redis
    /// Cluster `{prefix}{{name}}`, the name its hash tag. Built by hand: `format!` costs ten
    /// times the copy on a path every send takes.
    fn channel_key(&self, channel: &str) -> String {
        let prefix = &self.inner.settings.prefix;
        let name = non_local_name(channel);
        let mut key = String::with_capacity(prefix.len() + name.len() + 2);
        key.push_str(prefix);
        if self.inner.cluster.is_some() {
            key.push('{');
            key.push_str(name);
            key.push('}');
        } else {
            key.push_str(name);
        }
        key
    }

    /// True in front of a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.inner.cluster.is_some()
    }

    fn group_key(&self, group: &str) -> String {
        format!("{}:group:{}", self.inner.settings.prefix, group)
    }

    /// The shard holding `name` (by its non-local name) and its shared connection, for the
    /// per-connection state kept beside the channels (sessions, ordering).
    pub(crate) fn conn_for(&self, name: &str) -> (usize, SharedConn) {
        let shard = self.shard_of(name);
        (shard, self.inner.shards[shard].conn.clone())
    }

    /// Runs one command on the shard (or slot) that holds `name` (a channel or reply channel,
    /// whose keys live where the name does).
    pub(crate) async fn query_for<T: redis::FromRedisValue>(
        &self,
        name: &str,
        cmd: redis::Cmd,
    ) -> Result<T, LayerError> {
        let (shard, mut conn) = self.conn_for(name);
        self.run(shard, async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs one command future on shard `i` with the command timeout, mapping failures.
    pub(crate) async fn run<T, F>(&self, i: usize, fut: F) -> Result<T, LayerError>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        let shard = &self.inner.shards[i];
        let result = match tokio::time::timeout(self.inner.settings.command_timeout, fut).await {
            Ok(r) => r.map_err(|e| {
                if is_outage(&e) {
                    LayerError::Unavailable(format!("Redis at {}: {e}", shard.addr))
                } else {
                    LayerError::Protocol(format!("Redis at {}: {e}", shard.addr))
                }
            }),
            Err(_) => Err(LayerError::Unavailable(format!(
                "Redis at {} did not answer within {:?}",
                shard.addr, self.inner.settings.command_timeout
            ))),
        };
        match &result {
            Err(LayerError::Unavailable(msg)) => {
                LayerMetrics::add(&self.inner.metrics.unavailable, 1);
                if shard.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(redis = %shard.addr, error = %msg, "lost the Redis connection; retrying on next use");
                }
            }
            _ => {
                shard.last_ok_ms.store(self.clock_ms(), Ordering::Relaxed);
                if !shard.healthy.swap(true, Ordering::Relaxed) {
                    LayerMetrics::add(&self.inner.metrics.reconnects, 1);
                    tracing::info!(redis = %shard.addr, "Redis connection restored");
                }
            }
        }
        result
    }

    fn member(&self, payload: &[u8], targets: &[&str]) -> Result<Vec<u8>, LayerError> {
        let mut member = wire::with_targets(payload, targets, wire::RANDOM_PREFIX_LEN)?;
        if let Some(crypter) = &self.inner.crypter {
            // channels_redis encrypts the whole map, `__asgi_channel__` included.
            let mut sealed =
                Vec::with_capacity(wire::RANDOM_PREFIX_LEN + member.len() * 4 / 3 + 96);
            sealed.resize(wire::RANDOM_PREFIX_LEN, 0);
            crypter.encrypt_into(&member[wire::RANDOM_PREFIX_LEN..], &mut sealed);
            member = sealed;
        }
        rand::rng().fill_bytes(&mut member[..wire::RANDOM_PREFIX_LEN]);
        Ok(member)
    }

    /// Tells the process holding `channel` of a membership change, through its inbox. Never
    /// refused for capacity: a full inbox must not make the server forget a membership.
    async fn notify_membership(
        &self,
        op: membership::MembershipOp,
        group: &str,
        channel: &str,
        notice_channel: &str,
    ) -> Result<(), LayerError> {
        let payload = membership::MembershipNotice {
            op,
            group: group.to_owned(),
            channel: channel.to_owned(),
        }
        .encode()?;
        let member = self.member(&payload, &[notice_channel])?;
        let key = self.channel_key(notice_channel);
        let shard = self.shard_of(notice_channel);
        self.send_coalesced(shard, key, member, usize::MAX).await?;
        Ok(())
    }

    /// Keys under the prefix on one shard (SCAN, never KEYS); in a Redis Cluster, on every
    /// master.
    async fn scan(&self, shard: usize, pattern: &str) -> Result<Vec<Vec<u8>>, LayerError> {
        if let Some(conn) = self.inner.shards[shard].conn.cluster_connection() {
            return self.scan_cluster(shard, conn, pattern).await;
        }
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let mut conn = self.inner.shards[shard].conn.clone();
            let scan = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .to_owned();
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .run(shard, async move { scan.query_async(&mut conn).await })
                .await?;
            out.extend(keys);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// [`RedisLayer::scan`] on every master of a Redis Cluster.
    async fn scan_cluster(
        &self,
        shard: usize,
        conn: redis::cluster_async::ClusterConnection,
        pattern: &str,
    ) -> Result<Vec<Vec<u8>>, LayerError> {
        let mut ask = conn.clone();
        let masters = self
            .run(shard, async move { cluster::masters(&mut ask).await })
            .await?;
        let mut out = Vec::new();
        for (host, port) in masters {
            let mut cursor: u64 = 0;
            loop {
                let mut conn = conn.clone();
                let (host, pattern) = (host.clone(), pattern.to_owned());
                let (next, keys) = self
                    .run(shard, async move {
                        cluster::scan_page(&mut conn, &host, port, cursor, &pattern).await
                    })
                    .await?;
                out.extend(keys);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(out)
    }
}

/// The receiving half: one dedicated connection per shard, opened on first use and reopened
/// with backoff after a failure. Never put a receive in a `select!` that can drop it mid-pop.
pub struct RedisReceiver {
    layer: RedisLayer,
    /// Each shard's pop connection and the generation of the master it was opened to.
    conns: Vec<Option<(PopConn, u64)>>,
    backoff: Duration,
    /// Blocking pops in flight when the channels span several lanes, and what they brought.
    lane_pops: lanes::LanePops,
}

impl fmt::Debug for RedisReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisReceiver")
            .field("layer", &self.layer.describe())
            .finish()
    }
}

/// A receiver's own connection for blocking pops: to one server, or (a cluster connection of
/// its own) to a Redis Cluster, where each pop goes to the node of its keys' slot.
#[derive(Clone)]
pub(crate) enum PopConn {
    Server(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for PopConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            PopConn::Server(c) => c.req_packed_command(cmd),
            PopConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            PopConn::Server(c) => c.req_packed_commands(cmd, offset, count),
            PopConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            PopConn::Server(c) => c.get_db(),
            PopConn::Cluster(_) => 0,
        }
    }
}

/// Opens a dedicated connection for blocking commands to what `shared` reaches: the server
/// (its master now, behind Sentinel) or the cluster. No response timeout: a blocking pop must
/// never be cut short by the client (callers bound it by its block time and a margin).
pub(crate) async fn open_pop_conn(shared: &SharedConn) -> Result<PopConn, RedisError> {
    match shared.cluster_client() {
        Some(cluster) => cluster
            .get_async_connection_with_config(
                redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(Duration::from_secs(1))
                    .set_response_timeout(Duration::from_secs(24 * 3600)),
            )
            .await
            .map(PopConn::Cluster),
        None => {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(None);
            shared
                .client()
                .0
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map(PopConn::Server)
        }
    }
}

/// A popped member: key it came from, bytes, score.
type Popped = (String, Vec<u8>, f64);

/// Popped members of one key: the key, then each member's bytes and score.
type PoppedBatch = (String, Vec<(Vec<u8>, f64)>);

impl RedisReceiver {
    async fn conn(&mut self, shard: usize) -> Result<PopConn, LayerError> {
        let s = &self.layer.inner.shards[shard];
        if let Some((c, generation)) = &self.conns[shard] {
            // Behind Sentinel, a pop connection to a replaced master would go on popping from
            // a server nobody sends to until Sentinel demotes it.
            if *generation == s.conn.generation() {
                return Ok(c.clone());
            }
            self.conns[shard] = None;
        }
        let generation = s.conn.generation();
        match open_pop_conn(&s.conn).await {
            Ok(c) => {
                if !self.backoff.is_zero() {
                    LayerMetrics::add(&self.layer.inner.metrics.reconnects, 1);
                    tracing::info!(redis = %s.addr, "receiver reconnected to Redis");
                }
                self.backoff = Duration::ZERO;
                self.conns[shard] = Some((c.clone(), generation));
                Ok(c)
            }
            Err(e) => Err(self.failed(shard, &e)),
        }
    }

    /// The connection to `shard` did not answer in `waited`: forget it and report an outage.
    fn dead(&mut self, shard: usize, waited: Duration) -> LayerError {
        self.conns[shard] = None;
        self.layer.inner.shards[shard].conn.suspect();
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
        LayerMetrics::add(&self.layer.inner.metrics.unavailable, 1);
        let addr = &self.layer.inner.shards[shard].addr;
        tracing::warn!(redis = %addr, ?waited, "a blocking pop got no answer; reconnecting");
        LayerError::Unavailable(format!(
            "Redis at {addr} did not answer a pop within {waited:?}"
        ))
    }

    fn failed(&mut self, shard: usize, e: &RedisError) -> LayerError {
        self.conns[shard] = None;
        self.layer.inner.shards[shard].conn.failed_with(e);
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
        LayerMetrics::add(&self.layer.inner.metrics.unavailable, 1);
        let addr = &self.layer.inner.shards[shard].addr;
        if is_outage(e) {
            LayerError::Unavailable(format!("Redis at {addr}: {e}"))
        } else {
            LayerError::Protocol(format!("Redis at {addr}: {e}"))
        }
    }

    /// After a failure, waits out the backoff (bounded by the caller's deadline).
    async fn pause_after_failure(&self, deadline: Instant) {
        let wake = (Instant::now() + self.backoff).min(deadline);
        tokio::time::sleep_until(wake).await;
    }

    /// One BZPOPMIN over `keys` on `shard`, blocking at most `block`.
    async fn bzpopmin(
        &mut self,
        shard: usize,
        keys: &[String],
        block: Duration,
    ) -> Result<Option<Popped>, LayerError> {
        let mut conn = self.conn(shard).await?;
        // Redis treats 0 as "forever"; never ask for less than a millisecond.
        let secs = block.as_secs_f64().max(0.001);
        let cmd = redis::cmd("BZPOPMIN")
            .arg(keys)
            .arg(format!("{secs:.3}"))
            .to_owned();
        let pop = cmd.query_async::<Option<(String, Vec<u8>, f64)>>(&mut conn);
        // The server answers within `block`; an answer this late means the connection is dead
        // (a half-open TCP connection after a host failure never errors by itself). Dropping
        // this connection can only lose a message the dead server popped, which is already lost.
        match tokio::time::timeout(block + DEAD_CONNECTION_MARGIN, pop).await {
            Ok(result) => result.map_err(|e| self.failed(shard, &e)),
            Err(_) => Err(self.dead(shard, block + DEAD_CONNECTION_MARGIN)),
        }
    }

    /// Up to `count` members of the first non-empty of `keys` on `shard`, blocking at most
    /// `block`: one BZMPOP, or on a server without it (before 7.0) BZPOPMIN then ZPOPMIN.
    async fn pop_batch(
        &mut self,
        shard: usize,
        keys: &[String],
        block: Duration,
        count: usize,
    ) -> Result<Option<PoppedBatch>, LayerError> {
        if count > 1
            && self.layer.inner.shards[shard]
                .has_bzmpop
                .load(Ordering::Relaxed)
        {
            let mut conn = self.conn(shard).await?;
            let secs = block.as_secs_f64().max(0.001);
            let cmd = redis::cmd("BZMPOP")
                .arg(format!("{secs:.3}"))
                .arg(keys.len())
                .arg(keys)
                .arg("MIN")
                .arg("COUNT")
                .arg(count)
                .to_owned();
            let pop = cmd.query_async::<redis::Value>(&mut conn);
            match tokio::time::timeout(block + DEAD_CONNECTION_MARGIN, pop).await {
                Ok(Ok(value)) => return Ok(parse_bzmpop(value)),
                Ok(Err(e)) if is_unknown_command(&e) => {
                    let s = &self.layer.inner.shards[shard];
                    s.has_bzmpop.store(false, Ordering::Relaxed);
                    tracing::info!(redis = %s.addr, "Redis has no BZMPOP (before 7.0); popping batches with BZPOPMIN + ZPOPMIN");
                }
                Ok(Err(e)) => return Err(self.failed(shard, &e)),
                Err(_) => return Err(self.dead(shard, block + DEAD_CONNECTION_MARGIN)),
            }
        }
        let Some((key, member, score)) = self.bzpopmin(shard, keys, block).await? else {
            return Ok(None);
        };
        let mut members = vec![(member, score)];
        if count > 1 {
            match self.zpopmin(shard, &key, count - 1).await {
                Ok(more) => members.extend(more),
                // Keep what was popped; the next call reconnects.
                Err(e) => {
                    tracing::warn!(error = %e, "batch pop failed after the first message");
                }
            }
        }
        Ok(Some((key, members)))
    }

    /// Up to `count` members of the first non-empty of `keys`, without waiting (ZPOPMIN per key:
    /// a blocking pop with a short timeout may wait for the server's next timer tick instead).
    async fn pop_now(
        &mut self,
        shard: usize,
        keys: &[String],
        count: usize,
    ) -> Result<Option<PoppedBatch>, LayerError> {
        for key in keys {
            let members = self.zpopmin(shard, key, count).await?;
            if !members.is_empty() {
                return Ok(Some((key.clone(), members)));
            }
        }
        Ok(None)
    }

    /// ZPOPMIN `count` more from `key` (non-blocking).
    async fn zpopmin(
        &mut self,
        shard: usize,
        key: &str,
        count: usize,
    ) -> Result<Vec<(Vec<u8>, f64)>, LayerError> {
        let mut conn = self.conn(shard).await?;
        let cmd = redis::cmd("ZPOPMIN").arg(key).arg(count).to_owned();
        let pop = cmd.query_async::<redis::Value>(&mut conn);
        let value = match tokio::time::timeout(DEAD_CONNECTION_MARGIN, pop).await {
            Ok(result) => result.map_err(|e| self.failed(shard, &e))?,
            Err(_) => return Err(self.dead(shard, DEAD_CONNECTION_MARGIN)),
        };
        Ok(parse_zpop(value))
    }

    /// Turns popped members into envelopes, dropping expired and undecodable ones (counted).
    fn unpack(&self, key: &str, members: Vec<(Vec<u8>, f64)>, out: &mut Vec<Envelope>) {
        let prefix_len = self.layer.inner.settings.prefix.len();
        let read_from = key.get(prefix_len..).unwrap_or(key);
        let read_from = read_from
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .unwrap_or(read_from);
        let expiry = self.layer.inner.settings.expiry.as_secs_f64();
        let now = now_secs();
        let metrics = &self.layer.inner.metrics;
        let before = out.len();
        for (member, score) in members {
            if now - score >= expiry {
                LayerMetrics::add(&metrics.expired, 1);
                continue;
            }
            if member.len() < wire::RANDOM_PREFIX_LEN {
                LayerMetrics::add(&metrics.garbage, 1);
                tracing::warn!(
                    channel = read_from,
                    "dropped a message shorter than its random prefix"
                );
                continue;
            }
            let payload = match &self.layer.inner.crypter {
                None => Bytes::from(member).slice(wire::RANDOM_PREFIX_LEN..),
                Some(crypter) => match crypter.decrypt(
                    &member[wire::RANDOM_PREFIX_LEN..],
                    self.layer.inner.crypter_ttl,
                ) {
                    Ok(plain) => Bytes::from(plain),
                    Err(e) => {
                        LayerMetrics::add(&metrics.garbage, 1);
                        tracing::warn!(channel = read_from, error = %e, "dropped a message");
                        continue;
                    }
                },
            };
            if let Err(e) = envelopes_for(read_from, payload, out) {
                LayerMetrics::add(&metrics.garbage, 1);
                tracing::warn!(channel = read_from, error = %e, "dropped an undecodable message");
            }
        }
        LayerMetrics::add(&metrics.received, (out.len() - before) as u64);
    }
}

impl RedisReceiver {
    /// [`BackendReceiver::receive_many`] over several lanes (see [`lanes`]): what a pop in
    /// flight brought first, then every lane without a pop in flight swept without waiting, then
    /// a blocking pop on each of those, all at once, until one brings something or `deadline`.
    async fn receive_lanes(
        &mut self,
        mut lanes: Vec<(usize, Vec<String>)>,
        deadline: Instant,
        max: usize,
    ) -> Result<Vec<Envelope>, LayerError> {
        let mut out = Vec::new();
        lanes.shuffle(&mut rand::rng());
        let all_keys: Vec<String> = lanes.iter().flat_map(|(_, k)| k.iter().cloned()).collect();
        let key_refs: Vec<&str> = all_keys.iter().map(String::as_str).collect();
        loop {
            if let Err((shard, e)) = self.lane_pops.harvest().await {
                let e = self.failed(shard, &e);
                self.pause_after_failure(deadline).await;
                return Err(e);
            }
            while let Some((key, members)) = self.lane_pops.take_held(&key_refs) {
                self.unpack(&key, members, &mut out);
                if !out.is_empty() {
                    return Ok(out);
                }
            }
            for (shard, keys) in &lanes {
                if self.lane_pops.in_flight(keys) {
                    continue;
                }
                match self.pop_now(*shard, keys, max).await {
                    Ok(Some((key, members))) => {
                        self.unpack(&key, members, &mut out);
                        if !out.is_empty() {
                            return Ok(out);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.pause_after_failure(deadline).await;
                        return Err(e);
                    }
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(out);
            }
            // A pop may outlive this call (what it brings is held for the next): bound it so
            // a receiver that stops asking does not keep connections blocked for long.
            let block = remaining.clamp(Duration::from_millis(1), Duration::from_secs(5));
            for (shard, keys) in &lanes {
                if self.lane_pops.in_flight(keys) {
                    continue;
                }
                let conn = match self.lane_pops.idle_conn(*shard) {
                    Some(c) => c,
                    None => match open_pop_conn(&self.layer.inner.shards[*shard].conn).await {
                        Ok(c) => c,
                        Err(e) => {
                            let e = self.failed(*shard, &e);
                            self.pause_after_failure(deadline).await;
                            return Err(e);
                        }
                    },
                };
                self.lane_pops.start(*shard, conn, keys.clone(), block, max);
            }
            self.lane_pops.wait(deadline).await;
        }
    }
}

impl BackendReceiver for RedisReceiver {
    /// Up to `max` messages from one of `channels` in one blocking BZMPOP, so a busy channel
    /// costs one command per batch instead of one per message. Every envelope of a group
    /// message comes back, even past `max`.
    async fn receive_many(
        &mut self,
        channels: &[String],
        timeout: Duration,
        max: usize,
    ) -> Result<Vec<Envelope>, LayerError> {
        let mut out = Vec::new();
        // Lanes: the keys one pop can cover, with their shard. A pop takes keys of one shard,
        // and in a Redis Cluster of one slot.
        let mut lanes: Vec<(usize, Vec<String>)> = Vec::new();
        let mut lane_slots: Vec<Option<redis::cluster_routing::Slot>> = Vec::new();
        let cluster = self.layer.is_cluster();
        for c in channels {
            if !c.ends_with('!') {
                self.layer.ensure_registered(c).await;
            }
            let key = self.layer.channel_key(c);
            let shard = self.layer.shard_of(c);
            let slot = cluster.then(|| cluster::slot_of(&key));
            match (0..lanes.len()).find(|&i| lanes[i].0 == shard && lane_slots[i] == slot) {
                Some(i) => lanes[i].1.push(key),
                None => {
                    lanes.push((shard, vec![key]));
                    lane_slots.push(slot);
                }
            }
        }
        let deadline = Instant::now() + timeout;
        if lanes.len() > 1 {
            return self.receive_lanes(lanes, deadline, max).await;
        }
        loop {
            let now = Instant::now();
            if now >= deadline && !timeout.is_zero() {
                return Ok(out);
            }
            let (shard, keys) = &mut lanes[0];
            if keys.len() > 1 {
                keys.shuffle(&mut rand::rng());
            }
            let block = deadline.saturating_duration_since(now);
            match self.pop_batch(*shard, keys, block, max).await {
                Ok(Some((key, members))) => {
                    self.unpack(&key, members, &mut out);
                    if !out.is_empty() {
                        return Ok(out);
                    }
                }
                Ok(None) => {
                    if timeout.is_zero() {
                        return Ok(out);
                    }
                }
                Err(e) => {
                    self.pause_after_failure(deadline).await;
                    return Err(e);
                }
            }
        }
    }
}

/// Pings shard `shard` whenever it sat idle for [`KEEPALIVE`] (more often while it is down), so
/// a restarted or vanished Redis is noticed (and the connection replaced, and the outage shown in
/// health) before a request meets it. Ends with the layer.
async fn keepalive(layer: std::sync::Weak<Inner>, shard: usize) {
    loop {
        let period = match layer.upgrade() {
            Some(inner) if inner.shards[shard].healthy.load(Ordering::Relaxed) => KEEPALIVE,
            Some(_) => KEEPALIVE_WHILE_DOWN,
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(inner) = layer.upgrade() else {
            return;
        };
        let layer_now = RedisLayer { inner };
        let s = &layer_now.inner.shards[shard];
        let idle = layer_now
            .clock_ms()
            .saturating_sub(s.last_ok_ms.load(Ordering::Relaxed));
        if idle >= period.as_millis() as u64 || !s.healthy.load(Ordering::Relaxed) {
            let mut conn = s.conn.clone();
            let ping = redis::cmd("PING");
            let _ = layer_now
                .run(
                    shard,
                    async move { ping.query_async::<String>(&mut conn).await },
                )
                .await;
        }
    }
}

fn is_unknown_command(e: &RedisError) -> bool {
    e.to_string()
        .to_ascii_lowercase()
        .contains("unknown command")
}

/// BZMPOP answers nil (timed out) or `[key, [[member, score], …]]`.
fn parse_bzmpop(value: redis::Value) -> Option<PoppedBatch> {
    use redis::Value as V;
    let V::Array(items) = value else {
        return None;
    };
    let mut items = items.into_iter();
    let key = match items.next()? {
        V::BulkString(k) => String::from_utf8(k).ok()?,
        V::SimpleString(k) => k,
        _ => return None,
    };
    Some((key, parse_zpop(items.next()?)))
}

/// ZPOPMIN answers a flat `[member, score, …]` (RESP2) or `[[member, score], …]` (RESP3).
fn parse_zpop(value: redis::Value) -> Vec<(Vec<u8>, f64)> {
    use redis::Value as V;
    fn score(v: &V) -> Option<f64> {
        match v {
            V::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            V::Double(d) => Some(*d),
            V::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    fn member(v: V) -> Option<Vec<u8>> {
        match v {
            V::BulkString(b) => Some(b),
            _ => None,
        }
    }
    let V::Array(items) = value else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut iter = items.into_iter();
    while let Some(item) = iter.next() {
        match item {
            V::Array(pair) if pair.len() == 2 => {
                let mut p = pair.into_iter();
                if let (Some(m), Some(s)) = (p.next(), p.next())
                    && let (Some(s), Some(m)) = (score(&s), member(m))
                {
                    out.push((m, s));
                }
            }
            m => {
                if let Some(s) = iter.next()
                    && let (Some(s), Some(m)) = (score(&s), member(m))
                {
                    out.push((m, s));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_matches_channels_redis() {
        // Values from Python: binascii.crc32(b"...") & 0xFFF, then int(bigval / (4096 / n)).
        assert_eq!(consistent_hash("anything", 1), 0);
        let h = crc32fast::hash(b"specific.abc!") & 0xFFF;
        assert_eq!(consistent_hash("specific.abc!", 2), (h / 2048) as usize);
        assert!((0..3).contains(&consistent_hash("x", 3)));
    }

    #[test]
    fn parses_both_zpop_shapes() {
        use redis::Value as V;
        let flat = V::Array(vec![
            V::BulkString(b"a".to_vec()),
            V::BulkString(b"1.5".to_vec()),
        ]);
        let nested = V::Array(vec![V::Array(vec![
            V::BulkString(b"b".to_vec()),
            V::Double(2.0),
        ])]);
        assert_eq!(parse_zpop(flat), vec![(b"a".to_vec(), 1.5)]);
        assert_eq!(parse_zpop(nested), vec![(b"b".to_vec(), 2.0)]);
        assert_eq!(parse_zpop(V::Nil), vec![]);
    }

    #[test]
    fn parses_bzmpop() {
        use redis::Value as V;
        let reply = V::Array(vec![
            V::BulkString(b"asgi:k".to_vec()),
            V::Array(vec![
                V::Array(vec![
                    V::BulkString(b"m1".to_vec()),
                    V::BulkString(b"1.25".to_vec()),
                ]),
                V::Array(vec![V::BulkString(b"m2".to_vec()), V::Double(2.5)]),
            ]),
        ]);
        assert_eq!(
            parse_bzmpop(reply),
            Some((
                "asgi:k".to_owned(),
                vec![(b"m1".to_vec(), 1.25), (b"m2".to_vec(), 2.5)]
            ))
        );
        assert_eq!(parse_bzmpop(V::Nil), None);
    }
}

//! The shared command connection of one shard, and what keeps it honest across Redis restarts
//! and Sentinel failovers.
//!
//! A [`SharedConn`] wraps redis-rs's `ConnectionManager` (one multiplexed connection, replaced
//! after a failure) and adds the one retry that is always safe: a command whose connection could
//! not even be opened (refused while Redis restarts), or that Redis refused without running it
//! (`READONLY` from a demoted master, `MASTERDOWN`), was never carried out, so it is tried again
//! on a fresh connection for up to [`UNWRITTEN_RETRY_WINDOW`]. A command that may have been
//! written before its connection died is retried only when running it twice is harmless (reads,
//! group and registry `ZADD`s, lease scripts); a message send must not be duplicated, so its
//! error reaches the caller and is counted ([`SharedConn::for_sends`]).
//!
//! The connection speaks RESP3 unless the URL chose a protocol: on RESP3 the manager learns that
//! its connection closed the moment Redis closes it (a restart, `CLIENT KILL`) and opens a new one
//! before the next command, so the first command after a restart does not meet the dead
//! connection. On RESP2 (or a half-open connection, where no close ever arrives) the per-shard
//! keepalive finds the dead connection within a second of idleness instead.
//!
//! Behind Sentinel the address is not fixed: a `ConnectionManager` reconnects to one address
//! only, so the shard keeps the manager of the master Sentinel named last, and any failure that
//! can mean a failover (a refused or dropped connection, `READONLY`, a pop unblocked because the
//! server became a replica) wakes a task that asks the sentinels again and, when they name
//! another master, swaps in a manager for it. Commands in their retry window pick it up. The
//! task also asks a sentinel for the master's address every second, for a master replaced
//! while it stayed up and still accepts writes.
//!
//! In front of a Redis Cluster the connection is redis-rs's cluster connection (slot map,
//! `MOVED`/`ASK`, topology refresh), and a pipeline is sent as one pipeline per hash slot (see
//! [`super::cluster`]).

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{Client, Cmd, Pipeline, ProtocolVersion, RedisError, RedisFuture, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a command that found no connection keeps trying to open one. Long enough to ride
/// over the reconnect a restart forces, short enough that an outage still answers quickly
/// (HTTP 503 at once, not after the command timeout).
pub(super) const UNWRITTEN_RETRY_WINDOW: Duration = Duration::from_millis(300);

/// The least time between two master lookups through the sentinels: during a failover every
/// command and pop fails, and one lookup answers them all.
const MIN_LOOKUP_INTERVAL: Duration = Duration::from_millis(100);

/// One shard's command connection; clones share it.
#[derive(Clone)]
pub(crate) struct SharedConn {
    node: Arc<Node>,
    /// The commands sent through this handle may run twice without harm (reads, `ZADD` of a
    /// name, lease scripts): one that failed with its connection is tried again on a fresh one
    /// even when it may have reached Redis. Off for message sends ([`SharedConn::for_sends`]).
    idempotent: bool,
}

/// What the clones of one shard's connection share.
struct Node {
    /// Swapped whole after a failover; read (one reference count) by every command.
    current: RwLock<Arc<Current>>,
    /// Wakes the task that asks the sentinels for the master; `None` for a fixed address.
    rediscover: Option<Arc<Notify>>,
    /// In front of a Redis Cluster: the client that opens dedicated (blocking) connections.
    cluster: Option<ClusterClient>,
}

/// The Redis commands go to now.
struct Current {
    /// Counts the masters followed: a dedicated connection opened under an older one is to a
    /// server that is no longer the master.
    generation: u64,
    client: Client,
    commands: Commands,
    /// `host:port`, for logs.
    addr: String,
}

/// Where commands go: one server (a manager that reconnects to it), or a Redis Cluster.
#[derive(Clone)]
enum Commands {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Drop for Node {
    fn drop(&mut self) {
        // Lets the lookup task see that the shard is gone and end.
        if let Some(n) = &self.rediscover {
            n.notify_one();
        }
    }
}

impl std::fmt::Debug for SharedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedConn")
    }
}

/// True when `e` proves the command never reached Redis: the connection it needed could not be
/// opened.
pub(super) fn never_written(e: &RedisError) -> bool {
    e.is_connection_refusal()
}

/// True when Redis refused the command without running any of it because it is not (or no
/// longer) a master that accepts writes: a demoted master (`READONLY`), a replica cut off from
/// its master (`MASTERDOWN`), a pop unblocked by a role change (`UNBLOCKED`), a server loading
/// its data after a restart (`LOADING`).
pub(super) fn refused_unrun(e: &RedisError) -> bool {
    matches!(
        e.code(),
        Some("READONLY" | "MASTERDOWN" | "UNBLOCKED" | "LOADING")
    ) || {
        // A script's write refused on a replica comes back inside the script's error.
        let text = e.to_string().to_ascii_lowercase();
        text.contains("readonly")
            || text.contains("read only replica")
            || text.contains("unblocked")
    }
}

/// True when `e` may mean the master moved: worth asking the sentinels again.
fn may_be_failover(e: &RedisError) -> bool {
    e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_io_error()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || refused_unrun(e)
}

/// `client` speaking RESP3 unless its URL asked for a protocol (`?protocol=resp2`).
pub(super) fn prefer_resp3(client: Client, url: &str) -> Client {
    if url.contains("protocol=") {
        return client;
    }
    let info = client.get_connection_info().clone();
    let redis = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Client::open(info.set_redis_settings(redis)).unwrap_or(client)
}

fn manager_config(command_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(command_timeout.min(Duration::from_secs(1))))
        .set_response_timeout(Some(command_timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(200))
}

fn current_for(
    generation: u64,
    client: Client,
    config: ConnectionManagerConfig,
) -> Result<Arc<Current>, RedisError> {
    Ok(Arc::new(Current {
        generation,
        addr: client.get_connection_info().addr().to_string(),
        commands: Commands::Server(ConnectionManager::new_lazy_with_config(
            client.clone(),
            config,
        )?),
        client,
    }))
}

/// Where a Sentinel-managed master is found: the sentinels' URLs (`redis://host:port`), the
/// master's name, and how to log in to the master (database, credentials, protocol).
#[derive(Debug, Clone)]
pub(crate) struct SentinelTarget {
    pub(crate) sentinels: Vec<String>,
    pub(crate) master: String,
    pub(crate) node: SentinelNodeConnectionInfo,
}

/// Asks the sentinels for `target`'s master (and checks it says it is one), within `limit`.
async fn lookup_master(
    sentinel: &mut Sentinel,
    target: &SentinelTarget,
    limit: Duration,
) -> Result<Client, RedisError> {
    match tokio::time::timeout(
        limit,
        sentinel.async_master_for(&target.master, Some(&target.node)),
    )
    .await
    {
        Ok(found) => found,
        Err(_) => Err(RedisError::from((
            redis::ErrorKind::Io,
            "no sentinel named a reachable master in time",
        ))),
    }
}

impl SharedConn {
    pub(super) fn new(client: Client, command_timeout: Duration) -> Result<Self, RedisError> {
        Ok(SharedConn {
            node: Arc::new(Node {
                current: RwLock::new(current_for(0, client, manager_config(command_timeout))?),
                rediscover: None,
                cluster: None,
            }),
            idempotent: true,
        })
    }

    /// A connection to the Redis Cluster that `cluster` names (its seed nodes): `seed` is one
    /// of them as a plain client, kept for [`SharedConn::client`]'s callers' logs.
    pub(super) async fn to_cluster(
        cluster: ClusterClient,
        seed: Client,
    ) -> Result<Self, RedisError> {
        let conn = cluster.get_async_connection().await?;
        Ok(SharedConn {
            node: Arc::new(Node {
                current: RwLock::new(Arc::new(Current {
                    generation: 0,
                    addr: seed.get_connection_info().addr().to_string(),
                    commands: Commands::Cluster(conn),
                    client: seed,
                })),
                rediscover: None,
                cluster: Some(cluster),
            }),
            idempotent: true,
        })
    }

    /// In front of a Redis Cluster: the client for dedicated connections.
    pub(super) fn cluster_client(&self) -> Option<&ClusterClient> {
        self.node.cluster.as_ref()
    }

    /// In front of a Redis Cluster: the shared cluster connection, for commands routed to one
    /// node by address (`SCAN`).
    pub(super) fn cluster_connection(&self) -> Option<ClusterConnection> {
        match &self.current().commands {
            Commands::Cluster(c) => Some(c.clone()),
            Commands::Server(_) => None,
        }
    }

    /// A connection to the master the sentinels of `target` name, following it across
    /// failovers. Fails when no sentinel names a reachable master within `command_timeout`.
    pub(super) async fn via_sentinel(
        target: SentinelTarget,
        command_timeout: Duration,
    ) -> Result<Self, RedisError> {
        let mut sentinel = Sentinel::build(target.sentinels.clone())?;
        let config = manager_config(command_timeout);
        let client = lookup_master(&mut sentinel, &target, command_timeout).await?;
        let notify = Arc::new(Notify::new());
        let node = Arc::new(Node {
            current: RwLock::new(current_for(0, client, config.clone())?),
            rediscover: Some(Arc::clone(&notify)),
            cluster: None,
        });
        tokio::spawn(follow_master(
            Arc::downgrade(&node),
            notify,
            sentinel,
            target,
            config,
            command_timeout,
        ));
        Ok(SharedConn {
            node,
            idempotent: true,
        })
    }

    /// The same connection for commands that must not run twice (message sends): retried only
    /// when they provably never reached Redis.
    pub(crate) fn for_sends(&self) -> SharedConn {
        SharedConn {
            node: Arc::clone(&self.node),
            idempotent: false,
        }
    }

    fn current(&self) -> Arc<Current> {
        // Never held across an await: the Arc is cloned out.
        match self.node.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// A client for the Redis commands go to now, for dedicated (blocking) connections, and
    /// its [`SharedConn::generation`].
    pub(super) fn client(&self) -> (Client, u64) {
        let c = self.current();
        (c.client.clone(), c.generation)
    }

    /// Changes each time the shard follows a new master: a dedicated connection opened under
    /// another generation must be replaced (its server may still be up, and still answer).
    pub(super) fn generation(&self) -> u64 {
        self.current().generation
    }

    /// `host:port` of the Redis commands go to now.
    pub(super) fn addr(&self) -> String {
        self.current().addr.clone()
    }

    /// Reports a failure met on this shard (by a command, or a dedicated connection): behind
    /// Sentinel, one that may mean a failover has the sentinels asked again.
    pub(super) fn failed_with(&self, e: &RedisError) {
        if may_be_failover(e) {
            self.suspect();
        }
    }

    /// Behind Sentinel, asks the sentinels for the master again (soon, once for many callers).
    pub(super) fn suspect(&self) {
        if let Some(n) = &self.node.rediscover {
            n.notify_one();
        }
    }
}

/// How often the sentinels are asked which address the master has, failure or not. A master
/// that Sentinel replaced while it stayed up (a manual failover, a partition) keeps accepting
/// writes until Sentinel demotes it, up to ten seconds later (its INFO period); whatever is
/// written there meanwhile is lost when it resyncs as a replica. One cheap question a second
/// keeps that window near a second.
const SENTINEL_POLL: Duration = Duration::from_secs(1);

/// The address of the master the sentinels name now, asked of one sentinel at a time over a
/// connection kept between questions (the next sentinel after a failure).
struct SentinelPoll {
    sentinels: Vec<String>,
    next: usize,
    conn: Option<redis::aio::MultiplexedConnection>,
}

impl SentinelPoll {
    async fn master_addr(&mut self, master: &str, limit: Duration) -> Option<String> {
        if self.conn.is_none() {
            let url = &self.sentinels[self.next % self.sentinels.len()];
            self.next = self.next.wrapping_add(1);
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(limit))
                .set_response_timeout(Some(limit));
            let client = Client::open(url.as_str()).ok()?;
            self.conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .ok();
        }
        let conn = self.conn.as_mut()?;
        let asked: Result<Option<(String, String)>, RedisError> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(master)
            .query_async(conn)
            .await;
        match asked {
            Ok(Some((ip, port))) => Some(format!("{ip}:{port}")),
            Ok(None) => None,
            Err(_) => {
                self.conn = None;
                None
            }
        }
    }
}

fn known(node: &Node) -> (String, u64) {
    let c = match node.current.read() {
        Ok(c) => Arc::clone(&c),
        Err(p) => Arc::clone(&p.into_inner()),
    };
    (c.addr.clone(), c.generation)
}

/// Asks the sentinels for the master whenever a failure suggests it moved (and which address
/// it has every [`SENTINEL_POLL`]), and swaps in a connection to a new one. Ends with the shard.
async fn follow_master(
    node: Weak<Node>,
    notify: Arc<Notify>,
    mut sentinel: Sentinel,
    target: SentinelTarget,
    config: ConnectionManagerConfig,
    limit: Duration,
) {
    let mut poll = SentinelPoll {
        sentinels: target.sentinels.clone(),
        next: 0,
        conn: None,
    };
    loop {
        let woken = tokio::select! {
            () = notify.notified() => true,
            () = tokio::time::sleep(SENTINEL_POLL) => false,
        };
        let Some(strong) = node.upgrade() else { return };
        let (known, generation) = known(&strong);
        // The Arc is not kept across the lookups: the shard may end meanwhile.
        drop(strong);
        if !woken {
            match poll.master_addr(&target.master, limit).await {
                Some(named) if named != known => {}
                _ => continue,
            }
        }
        let asked = Instant::now();
        // The full lookup checks that the master the sentinels name says it is one.
        match lookup_master(&mut sentinel, &target, limit).await {
            Ok(client) => {
                let addr = client.get_connection_info().addr().to_string();
                let Some(node) = node.upgrade() else { return };
                if addr != known {
                    match current_for(generation + 1, client, config.clone()) {
                        Ok(next) => {
                            tracing::warn!(master = %target.master, from = %known, to = %addr, "Sentinel names a new master; following it");
                            match node.current.write() {
                                Ok(mut c) => *c = next,
                                Err(p) => *p.into_inner() = next,
                            }
                        }
                        Err(e) => {
                            tracing::warn!(master = %target.master, error = %e, "cannot set up a connection to the new master")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(master = %target.master, error = %e, "no master from the sentinels yet");
            }
        }
        tokio::time::sleep_until(asked + MIN_LOOKUP_INTERVAL).await;
    }
}

/// Retries `attempt` while it fails with a connection that could not be opened, a refusal that
/// ran nothing (or, for `idempotent` commands, with any lost connection), within
/// [`UNWRITTEN_RETRY_WINDOW`].
async fn retry_unwritten<T, F, Fut>(
    conn: &SharedConn,
    idempotent: bool,
    mut attempt: F,
) -> Result<T, RedisError>
where
    F: FnMut(Commands) -> Fut,
    Fut: Future<Output = Result<T, RedisError>>,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        match attempt(conn.current().commands.clone()).await {
            Err(e) => {
                conn.failed_with(&e);
                let retry = never_written(&e)
                    || refused_unrun(&e)
                    || (idempotent && e.is_connection_dropped());
                if !(retry && started.elapsed() + pause < UNWRITTEN_RETRY_WINDOW) {
                    return Err(e);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            ok => return ok,
        }
    }
}

impl ConnectionLike for SharedConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let idempotent = self.idempotent;
            retry_unwritten(self, idempotent, |commands| async move {
                match commands {
                    Commands::Server(mut m) => m.send_packed_command(cmd).await,
                    Commands::Cluster(mut c) => c.req_packed_command(cmd).await,
                }
            })
            .await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let idempotent = self.idempotent;
            retry_unwritten(self, idempotent, |commands| async move {
                match commands {
                    Commands::Server(mut m) => m.send_packed_commands(cmd, offset, count).await,
                    Commands::Cluster(c) => super::cluster::pipeline(c, cmd, offset, count).await,
                }
            })
            .await
        })
    }

    fn get_db(&self) -> i64 {
        match &self.current().commands {
            Commands::Server(m) => m.get_db(),
            Commands::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::{ErrorKind, ServerErrorKind};

    #[test]
    fn refusals_that_ran_nothing_are_told_apart() {
        let readonly = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(refused_unrun(&readonly) && may_be_failover(&readonly));
        let master_down = RedisError::from((
            ErrorKind::Server(ServerErrorKind::MasterDown),
            "Link with MASTER is down",
        ));
        assert!(refused_unrun(&master_down));
        // A script error is not a failover: it would fail on any master.
        let script = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "Error running script: attempt to compare nil with number",
        ));
        assert!(!refused_unrun(&script) && !may_be_failover(&script));
    }
}

//! The shared command connection of one shard, and what keeps it honest across Redis restarts.
//!
//! A [`SharedConn`] wraps redis-rs's `ConnectionManager` (one multiplexed connection, replaced
//! after a failure) and adds the one retry that is always safe: a command whose connection could
//! not even be opened (refused while Redis restarts) was never written, so it is tried again on a
//! fresh connection for up to [`UNWRITTEN_RETRY_WINDOW`]. A command that may have been written
//! before its connection died is retried only when running it twice is harmless (reads, group
//! and registry `ZADD`s, lease scripts); a message send must not be duplicated, so its error
//! reaches the caller and is counted ([`SharedConn::for_sends`]).
//!
//! The connection speaks RESP3 unless the URL chose a protocol: on RESP3 the manager learns that
//! its connection closed the moment Redis closes it (a restart, `CLIENT KILL`) and opens a new one
//! before the next command, so the first command after a restart does not meet the dead
//! connection. On RESP2 (or a half-open connection, where no close ever arrives) the per-shard
//! keepalive finds the dead connection within a second of idleness instead.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Cmd, Pipeline, ProtocolVersion, RedisError, RedisFuture, Value};
use tokio::time::Instant;

/// How long a command that found no connection keeps trying to open one. Long enough to ride
/// over the reconnect a restart forces, short enough that an outage still answers quickly
/// (HTTP 503 at once, not after the command timeout).
pub(super) const UNWRITTEN_RETRY_WINDOW: Duration = Duration::from_millis(300);

/// One shard's command connection; clones share it.
#[derive(Clone)]
pub(crate) struct SharedConn {
    manager: ConnectionManager,
    /// The commands sent through this handle may run twice without harm (reads, `ZADD` of a
    /// name, lease scripts): one that failed with its connection is tried again on a fresh one
    /// even when it may have reached Redis. Off for message sends ([`SharedConn::for_sends`]).
    idempotent: bool,
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

impl SharedConn {
    pub(super) fn new(client: Client, command_timeout: Duration) -> Result<Self, RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(command_timeout.min(Duration::from_secs(1))))
            .set_response_timeout(Some(command_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        Ok(SharedConn {
            manager: ConnectionManager::new_lazy_with_config(client, config)?,
            idempotent: true,
        })
    }

    /// The same connection for commands that must not run twice (message sends): retried only
    /// when they provably never reached Redis.
    pub(crate) fn for_sends(&self) -> SharedConn {
        SharedConn {
            manager: self.manager.clone(),
            idempotent: false,
        }
    }
}

/// Retries `attempt` while it fails with a connection that could not be opened (or, for
/// `idempotent` commands, with any lost connection), within [`UNWRITTEN_RETRY_WINDOW`].
async fn retry_unwritten<T, F, Fut>(idempotent: bool, mut attempt: F) -> Result<T, RedisError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RedisError>>,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        match attempt().await {
            Err(e)
                if (never_written(&e) || (idempotent && e.is_connection_dropped()))
                    && started.elapsed() + pause < UNWRITTEN_RETRY_WINDOW =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

impl ConnectionLike for SharedConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let manager = &self.manager;
            retry_unwritten(self.idempotent, || {
                let mut m = manager.clone();
                async move { m.send_packed_command(cmd).await }
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
            let manager = &self.manager;
            retry_unwritten(self.idempotent, || {
                let mut m = manager.clone();
                async move { m.send_packed_commands(cmd, offset, count).await }
            })
            .await
        })
    }

    fn get_db(&self) -> i64 {
        self.manager.get_db()
    }
}

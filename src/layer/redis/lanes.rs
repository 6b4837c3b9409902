//! Receiving from channels that no single pop can cover (on several shards, or in several slots
//! of a Redis Cluster): one blocking pop per lane at once, each on a connection of its own, so a
//! message is taken the moment it arrives on any lane instead of when its lane's turn comes.
//!
//! A pop is never cancelled (the server pops whether or not anyone still reads the reply): a
//! pop still in flight when a receive returns stays in flight, and what it brings is held for
//! the next receive. Whatever a dropped receiver still had in flight or held is put back on its
//! channel with its original score (its place in the queue), not lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::{RedisError, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{DEAD_CONNECTION_MARGIN, PopConn, PoppedBatch, RedisLayer, parse_bzmpop};
use crate::layer::backend::ChannelBackend;

/// The pops in flight of one receiver, and what they brought that no receive took yet.
pub(super) struct LanePops {
    inflight: Vec<LanePop>,
    held: Vec<PoppedBatch>,
    /// Connections back from finished pops, by shard, for the next ones.
    idle: Vec<(usize, PopConn)>,
    /// Woken by every pop that finishes.
    finished: Arc<Notify>,
    layer: RedisLayer,
}

/// What a pop hands back: its connection (unless it failed), and what it popped.
type PopResult = (Option<PopConn>, Result<Option<PoppedBatch>, RedisError>);

struct LanePop {
    shard: usize,
    /// Its keys, sorted.
    keys: Vec<String>,
    handle: JoinHandle<PopResult>,
    /// Set by the pop's task just before it wakes the waiting receive: the task may not have
    /// finished yet when the receive looks (`is_finished` still false on a loaded machine), and a
    /// pop skipped then would wait for a wake-up that already came, until the receive's deadline.
    answered: Arc<AtomicBool>,
}

/// One blocking pop of up to `count` members of the first non-empty of `keys`.
async fn blocking_pop(
    mut conn: PopConn,
    keys: Vec<String>,
    block: Duration,
    count: usize,
    bzmpop: bool,
) -> PopResult {
    let secs = format!("{:.3}", block.as_secs_f64().max(0.001));
    let cmd = if bzmpop {
        redis::cmd("BZMPOP")
            .arg(&secs)
            .arg(keys.len())
            .arg(&keys)
            .arg("MIN")
            .arg("COUNT")
            .arg(count.max(1))
            .to_owned()
    } else {
        redis::cmd("BZPOPMIN").arg(&keys).arg(&secs).to_owned()
    };
    let reply = tokio::time::timeout(
        block + DEAD_CONNECTION_MARGIN,
        cmd.query_async::<Value>(&mut conn),
    )
    .await;
    match reply {
        Ok(Ok(value)) if bzmpop => (Some(conn), Ok(parse_bzmpop(value))),
        Ok(Ok(value)) => {
            let popped = redis::from_redis_value::<Option<(String, Vec<u8>, f64)>>(value)
                .ok()
                .flatten()
                .map(|(key, member, score)| (key, vec![(member, score)]));
            (Some(conn), Ok(popped))
        }
        Ok(Err(e)) => (None, Err(e)),
        Err(_) => (
            None,
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "a blocking pop got no answer",
            ))),
        ),
    }
}

impl LanePops {
    pub(super) fn new(layer: RedisLayer) -> Self {
        LanePops {
            inflight: Vec::new(),
            held: Vec::new(),
            idle: Vec::new(),
            finished: Arc::default(),
            layer,
        }
    }

    /// Takes the finished pops: their connections go back to the pool, their batches are held.
    /// The first failure is returned (after every finished pop is taken).
    pub(super) async fn harvest(&mut self) -> Result<(), (usize, RedisError)> {
        let mut failure = None;
        let mut i = 0;
        while i < self.inflight.len() {
            let pop = &self.inflight[i];
            if !pop.handle.is_finished() && !pop.answered.load(Ordering::Acquire) {
                i += 1;
                continue;
            }
            // Answered: the task is returning, so this await is short.
            let pop = self.inflight.swap_remove(i);
            match pop.handle.await {
                Ok((conn, result)) => {
                    if let Some(conn) = conn {
                        self.idle.push((pop.shard, conn));
                    }
                    match result {
                        Ok(Some(batch)) => self.held.push(batch),
                        Ok(None) => {}
                        Err(e) => {
                            failure.get_or_insert((pop.shard, e));
                        }
                    }
                }
                Err(join) => {
                    failure.get_or_insert((
                        pop.shard,
                        RedisError::from(std::io::Error::other(join.to_string())),
                    ));
                }
            }
        }
        match failure {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// A held batch popped from one of `keys`, if any.
    pub(super) fn take_held(&mut self, keys: &[&str]) -> Option<PoppedBatch> {
        let i = self
            .held
            .iter()
            .position(|(key, _)| keys.contains(&key.as_str()))?;
        Some(self.held.swap_remove(i))
    }

    /// True while a pop on these keys (in any order) is in flight.
    pub(super) fn in_flight(&self, keys: &[String]) -> bool {
        let mut sorted = keys.to_vec();
        sorted.sort();
        self.inflight.iter().any(|p| p.keys == sorted)
    }

    /// An idle connection to `shard`, if one came back from an earlier pop.
    pub(super) fn idle_conn(&mut self, shard: usize) -> Option<PopConn> {
        let i = self.idle.iter().position(|(s, _)| *s == shard)?;
        Some(self.idle.swap_remove(i).1)
    }

    /// Starts a blocking pop on `keys` of `shard`.
    pub(super) fn start(
        &mut self,
        shard: usize,
        conn: PopConn,
        keys: Vec<String>,
        block: Duration,
        count: usize,
    ) {
        let bzmpop = self.layer.inner.shards[shard]
            .has_bzmpop
            .load(std::sync::atomic::Ordering::Relaxed);
        let finished = Arc::clone(&self.finished);
        let answered = Arc::new(AtomicBool::new(false));
        let answered_in_task = Arc::clone(&answered);
        let mut sorted = keys.clone();
        sorted.sort();
        let handle = tokio::spawn(async move {
            let out = blocking_pop(conn, keys, block, count, bzmpop).await;
            answered_in_task.store(true, Ordering::Release);
            finished.notify_one();
            out
        });
        self.inflight.push(LanePop {
            shard,
            keys: sorted,
            handle,
            answered,
        });
    }

    /// Waits until a pop finishes, or `deadline`.
    pub(super) async fn wait(&self, deadline: tokio::time::Instant) {
        let _ = tokio::time::timeout_at(deadline, self.finished.notified()).await;
    }
}

impl RedisLayer {
    /// Puts popped members back on `key` with their scores (their places in the queue).
    async fn put_back(
        &self,
        key: &str,
        members: Vec<(Vec<u8>, f64)>,
    ) -> Result<(), crate::layer::LayerError> {
        let name = key.get(self.settings().prefix.len()..).unwrap_or(key);
        let name = name
            .strip_prefix('{')
            .and_then(|n| n.strip_suffix('}'))
            .unwrap_or(name);
        let shard = self.shard_of(name);
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(key);
        for (member, score) in &members {
            zadd.arg(*score).arg(member.as_slice());
        }
        let mut conn = self.inner.shards[shard].conn.clone();
        self.run(
            shard,
            async move { zadd.query_async::<i64>(&mut conn).await },
        )
        .await
        .map(|_| ())
    }
}

impl Drop for LanePops {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inflight = std::mem::take(&mut self.inflight);
        let mut held = std::mem::take(&mut self.held);
        if inflight.is_empty() && held.is_empty() {
            return;
        }
        let layer = self.layer.clone();
        runtime.spawn(async move {
            for pop in inflight {
                if let Ok((_, Ok(Some(batch)))) = pop.handle.await {
                    held.push(batch);
                }
            }
            for (key, members) in held {
                if let Err(e) = layer.put_back(&key, members).await {
                    tracing::warn!(%key, error = %e, "could not put back messages a dropped receiver had popped");
                }
            }
        });
    }
}

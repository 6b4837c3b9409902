//! Process leases: memberships live as long as the interface server holding them, and Redis
//! losing its data is noticed and repaired.
//!
//! Each process inbox holds a lease, the member `{inbox}` of the sorted set `{prefix}:leases` on
//! every shard, scored by its deadline (ms since the epoch) and renewed every second. Beside it,
//! on the inbox's own shard, `{prefix}:inbox-groups:{inbox}` is the set of groups that ever
//! had a member of that inbox (written by `group_add`). Any live process that finds a lease past
//! its deadline removes the lapsed process's members from those groups, its inbox and its index
//! (one process wins each lease: the `ZREM` that returns 1). channels_redis never reads these
//! keys; they all sit under `{prefix}:`, where no channel name can be.
//!
//! A renewal returns the deadline Redis held before. Nothing (the key or the member is gone:
//! restart without persistence, `FLUSHALL`, our lease reaped after a stall) or an older deadline
//! than the last one this process wrote (a failover to a replica that missed writes) means Redis
//! lost state, and the inbox puts its memberships back ([`RedisLayer::reassert`]).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use switchyard_routing::names::non_local_name;

use super::{RedisLayer, consistent_hash};
use crate::layer::metrics::LayerMetrics;
use crate::layer::owner::is_owner_name;
use crate::layer::{LayerError, now_ms};

/// KEYS[1] the leases set; ARGV[1] the inbox, ARGV[2] its new deadline. Returns the old deadline
/// or false.
const RENEW_SCRIPT: &str = r"
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return old
";

/// KEYS[1] the leases set, KEYS[2] an inbox's group index; ARGV[1] the inbox, ARGV[2] a group,
/// ARGV[3] the index's ttl. Records the group in the index when a live Switchyard process holds
/// the inbox (a lease) and returns 1; returns 0 for any other inbox (a channels_redis process's,
/// which would not understand a membership notice).
const INDEX_SCRIPT: &str = r"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
";

/// KEYS[1] a group; ARGV[1] an inbox name. Removes every member of that inbox; returns how many.
const REAP_GROUP_SCRIPT: &str = r"
local removed = 0
local prefix = ARGV[1]
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(m, 1, #prefix) == prefix then
    redis.call('ZREM', KEYS[1], m)
    removed = removed + 1
  end
end
return removed
";

// Hashed once: a lease renewal runs every second and the index script on every group_add.
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_SCRIPT));
static INDEX: LazyLock<Script> = LazyLock::new(|| Script::new(INDEX_SCRIPT));
static REAP_GROUP: LazyLock<Script> = LazyLock::new(|| Script::new(REAP_GROUP_SCRIPT));

/// Most lapsed leases one shard's check takes at once.
const REAP_BATCH: usize = 16;
/// Commands per pipeline when memberships are put back.
const REASSERT_CHUNK: usize = 1000;

/// What this process last wrote as its deadline on each shard.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaseState {
    written: Vec<Option<u64>>,
}

impl RedisLayer {
    pub(super) fn leases_key(&self) -> String {
        format!("{}:leases", self.inner.settings.prefix)
    }

    pub(crate) fn inbox_groups_key(&self, inbox: &str) -> String {
        format!("{}:inbox-groups:{inbox}", self.inner.settings.prefix)
    }

    /// Records that `group` has a member of `channel`'s inbox, when a Switchyard process holds
    /// that inbox. True when one does (and should hear of the membership).
    pub(crate) async fn index_membership(
        &self,
        group: &str,
        channel: &str,
    ) -> Result<bool, LayerError> {
        let inbox = non_local_name(channel);
        let home = self.shard_of(inbox);
        if self.is_cluster() {
            return self.index_membership_across_slots(home, group, inbox).await;
        }
        let mut conn = self.inner.shards[home].conn.clone();
        let invocation: &Script = &INDEX;
        let (leases, index) = (self.leases_key(), self.inbox_groups_key(inbox));
        let ttl = self.inner.settings.group_expiry.as_secs().max(1);
        let (inbox, group) = (inbox.to_owned(), group.to_owned());
        let held: i64 = self
            .run(home, async move {
                invocation
                    .key(leases)
                    .key(index)
                    .arg(inbox)
                    .arg(group)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(held == 1)
    }

    /// [`RedisLayer::index_membership`] in a Redis Cluster, where the leases set and the index
    /// live in different slots: the lease is checked first, then the index written (one slot).
    /// A lease reaped in between leaves an index entry that lapses with the index's ttl.
    async fn index_membership_across_slots(
        &self,
        home: usize,
        group: &str,
        inbox: &str,
    ) -> Result<bool, LayerError> {
        if !self.holds_lease(inbox).await? {
            return Ok(false);
        }
        let index = self.inbox_groups_key(inbox);
        let ttl = self.inner.settings.group_expiry.as_secs().max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("SADD")
            .arg(&index)
            .arg(group)
            .ignore()
            .cmd("EXPIRE")
            .arg(&index)
            .arg(ttl)
            .ignore();
        let mut conn = self.inner.shards[home].conn.clone();
        self.run(home, async move { pipe.query_async::<()>(&mut conn).await })
            .await?;
        Ok(true)
    }

    /// True when a Switchyard process holds a lease on `inbox`.
    pub(crate) async fn holds_lease(&self, inbox: &str) -> Result<bool, LayerError> {
        let home = self.shard_of(inbox);
        let mut conn = self.inner.shards[home].conn.clone();
        let cmd = redis::cmd("ZSCORE")
            .arg(self.leases_key())
            .arg(inbox)
            .to_owned();
        let score: Option<f64> = self
            .run(home, async move { cmd.query_async(&mut conn).await })
            .await?;
        Ok(score.is_some())
    }

    /// Renews `inbox`'s lease on every shard for `ttl`. True when any shard had lost it since
    /// the last renewal (or held an older one): Redis lost state there.
    pub(crate) async fn renew_lease(
        &self,
        inbox: &str,
        ttl: Duration,
        state: &mut LeaseState,
    ) -> Result<bool, LayerError> {
        let shards = self.inner.shards.len();
        state.written.resize(shards, None);
        let key = self.leases_key();
        let deadline = now_ms() + ttl.as_millis() as u64;
        let mut lost = false;
        for shard in 0..shards {
            let mut conn = self.inner.shards[shard].conn.clone();
            let invocation: &Script = &RENEW;
            let (key, inbox) = (key.clone(), inbox.to_owned());
            let old: Option<f64> = self
                .run(shard, async move {
                    invocation
                        .key(key)
                        .arg(inbox)
                        .arg(deadline)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            if let Some(last) = state.written[shard] {
                match old {
                    None => lost = true,
                    Some(old) if (old as u64) < last => lost = true,
                    Some(_) => {}
                }
            }
            state.written[shard] = Some(deadline);
        }
        Ok(lost)
    }

    /// Gives up `inbox`'s lease and removes its memberships and inbox now (a graceful stop); for
    /// a connection owner, moves what waits for it back to the shared channels.
    pub(crate) async fn release_lease(&self, inbox: &str) -> Result<(), LayerError> {
        let key = self.leases_key();
        for shard in 0..self.inner.shards.len() {
            let mut conn = self.inner.shards[shard].conn.clone();
            let cmd = redis::cmd("ZREM").arg(&key).arg(inbox).to_owned();
            self.run(
                shard,
                async move { cmd.query_async::<i64>(&mut conn).await },
            )
            .await?;
        }
        self.reap_inbox(inbox).await.map(|_| ())
    }

    /// Removes the processes whose lease lapsed (each taken by one live process), with their
    /// memberships and inboxes. Returns how many processes this call removed.
    pub(crate) async fn reap_lapsed(&self) -> Result<usize, LayerError> {
        let key = self.leases_key();
        let now = now_ms();
        let mut reaped = 0;
        for shard in 0..self.inner.shards.len() {
            let mut conn = self.inner.shards[shard].conn.clone();
            let cmd = redis::cmd("ZRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(now)
                .arg("LIMIT")
                .arg(0)
                .arg(REAP_BATCH)
                .to_owned();
            let lapsed: Vec<String> = self
                .run(shard, async move { cmd.query_async(&mut conn).await })
                .await?;
            for inbox in lapsed {
                let mut conn = self.inner.shards[shard].conn.clone();
                let claim = redis::cmd("ZREM").arg(&key).arg(&inbox).to_owned();
                let won: i64 = self
                    .run(shard, async move { claim.query_async(&mut conn).await })
                    .await?;
                if won == 1 && self.shard_of(&inbox) == shard {
                    let members = self.reap_inbox(&inbox).await?;
                    reaped += 1;
                    LayerMetrics::add(&self.inner.metrics.reaped_processes, 1);
                    LayerMetrics::add(&self.inner.metrics.reaped_memberships, members as u64);
                    tracing::info!(%inbox, members, "removed a lapsed process's memberships and inbox");
                }
            }
        }
        Ok(reaped)
    }

    /// Removes `inbox`'s members from every group its index names, then its inbox and index.
    /// Returns the memberships removed.
    async fn reap_inbox(&self, inbox: &str) -> Result<usize, LayerError> {
        if is_owner_name(inbox) {
            // A lapsed connection owner: its sockets' waiting messages go back to the shared
            // channels (it has no memberships of its own).
            return self.take_back_owned(inbox, None).await.map(|_| 0);
        }
        let index = self.inbox_groups_key(inbox);
        let home = self.shard_of(inbox);
        let mut conn = self.inner.shards[home].conn.clone();
        let cmd = redis::cmd("SMEMBERS").arg(&index).to_owned();
        let groups: Vec<String> = self
            .run(home, async move { cmd.query_async(&mut conn).await })
            .await?;
        let mut removed = 0usize;
        for group in groups {
            let shard = self.shard_of(&group);
            let mut conn = self.inner.shards[shard].conn.clone();
            let invocation: &Script = &REAP_GROUP;
            let group_key = self.group_key(&group);
            let inbox = inbox.to_owned();
            let n: i64 = self
                .run(shard, async move {
                    invocation
                        .key(group_key)
                        .arg(inbox)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            removed += n.max(0) as usize;
        }
        let mut conn = self.inner.shards[home].conn.clone();
        // One key per DEL: in a Redis Cluster the two live in different slots.
        let mut del = redis::pipe();
        del.cmd("DEL")
            .arg(&index)
            .ignore()
            .cmd("DEL")
            .arg(self.channel_key(inbox))
            .ignore();
        self.run(home, async move { del.query_async::<()>(&mut conn).await })
            .await?;
        Ok(removed)
    }

    /// Puts `inbox`'s memberships back: every `(group, members)` re-added (scored now, with the
    /// group's expiry renewed) and the inbox's group index rebuilt, in pipelines of
    /// [`REASSERT_CHUNK`] commands per shard. Returns the memberships written.
    pub(crate) async fn reassert(
        &self,
        inbox: &str,
        by_group: &[(String, Vec<String>)],
    ) -> Result<usize, LayerError> {
        let shards = self.inner.shards.len();
        let score = format!("{:.6}", super::now_secs());
        let group_ttl = self.inner.settings.group_expiry.as_secs().max(1);
        let mut per_shard: Vec<Vec<redis::Cmd>> = vec![Vec::new(); shards];
        let mut written = 0;
        for (group, members) in by_group {
            let key = self.group_key(group);
            for chunk in members.chunks(REASSERT_CHUNK) {
                let mut zadd = redis::cmd("ZADD");
                zadd.arg(&key);
                for m in chunk {
                    zadd.arg(&score).arg(m);
                }
                per_shard[consistent_hash(group, shards)].push(zadd);
                written += chunk.len();
            }
            per_shard[consistent_hash(group, shards)]
                .push(redis::cmd("EXPIRE").arg(&key).arg(group_ttl).to_owned());
        }
        let index = self.inbox_groups_key(inbox);
        let home = self.shard_of(inbox);
        for groups in by_group.chunks(REASSERT_CHUNK) {
            let mut sadd = redis::cmd("SADD");
            sadd.arg(&index);
            for (g, _) in groups {
                sadd.arg(g);
            }
            per_shard[home].push(sadd);
        }
        if !by_group.is_empty() {
            per_shard[home].push(redis::cmd("EXPIRE").arg(&index).arg(group_ttl).to_owned());
        }
        for (shard, cmds) in per_shard.into_iter().enumerate() {
            let mut cmds = cmds.into_iter().peekable();
            while cmds.peek().is_some() {
                let mut pipe = redis::pipe();
                for c in cmds.by_ref().take(REASSERT_CHUNK) {
                    pipe.add_command(c).ignore();
                }
                let mut conn = self.inner.shards[shard].conn.clone();
                self.run(
                    shard,
                    async move { pipe.query_async::<()>(&mut conn).await },
                )
                .await?;
            }
        }
        LayerMetrics::add(&self.inner.metrics.reasserted_memberships, written as u64);
        Ok(written)
    }
}

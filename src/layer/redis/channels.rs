//! The channel layer on Redis: sends, groups and group sends, depth, and the receiving half
//! (see the parent module for the data model; `registry` for what flush and stats visit).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::*;
use crate::layer::Overview;
use crate::layer::backend::ChannelBackend;

impl ChannelBackend for RedisLayer {
    type Receiver = RedisReceiver;

    fn settings(&self) -> &LayerSettings {
        &self.inner.settings
    }

    fn metrics(&self) -> &Arc<LayerMetrics> {
        &self.inner.metrics
    }

    /// True while every shard answered its last command.
    fn available(&self) -> bool {
        self.inner
            .shards
            .iter()
            .all(|s| s.healthy.load(Ordering::Relaxed))
    }

    fn describe(&self) -> String {
        if let Some(s) = &self.inner.sentinel {
            return format!(
                "redis sentinel {} via {} (master at {})",
                s.master,
                s.sentinels,
                self.inner.shards[0].conn.addr()
            );
        }
        if let Some(seeds) = &self.inner.cluster {
            return format!("redis cluster via {seeds}");
        }
        let addrs: Vec<&str> = self.inner.shards.iter().map(|s| s.addr.as_str()).collect();
        format!("redis {}", addrs.join(","))
    }

    /// `single`, `shards` or `sentinel` (see [`super::Layer::mode`]).
    fn mode(&self) -> &'static str {
        if self.inner.cluster.is_some() {
            "cluster"
        } else if self.inner.sentinel.is_some() {
            "sentinel"
        } else if self.inner.shards.len() > 1 {
            "shards"
        } else {
            "single"
        }
    }

    async fn send_encoded(&self, channel: &str, payload: &[u8]) -> Result<(), LayerError> {
        if self.is_durable(channel) {
            return self
                .job_send(channel, payload, &durable::JobOptions::default())
                .await
                .map(|_| ());
        }
        let key_name = non_local_name(channel);
        let targets: &[&str] = if key_name.len() == channel.len() {
            &[]
        } else {
            &[channel]
        };
        let member = self.member(payload, targets)?;
        let key = self.channel_key(channel);
        let capacity = self.inner.rules.capacity(channel);
        let shard = self.shard_of(channel);
        let added = self.send_coalesced(shard, key, member, capacity).await?;
        self.ensure_registered(key_name).await;
        if added {
            LayerMetrics::add(&self.inner.metrics.sent, 1);
            Ok(())
        } else {
            LayerMetrics::add(&self.inner.metrics.channel_full, 1);
            Err(LayerError::ChannelFull {
                channel: channel.to_owned(),
                capacity,
            })
        }
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        let key = self.group_key(group);
        let shard = self.shard_of(group);
        let mut conn = self.inner.shards[shard].conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZADD")
            .arg(&key)
            .arg(format!("{:.6}", now_secs()))
            .arg(channel)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(self.inner.settings.group_expiry.as_secs().max(1))
            .ignore();
        self.run(
            shard,
            async move { pipe.query_async::<()>(&mut conn).await },
        )
        .await?;
        if let Some(notice_channel) = membership::notice_channel(channel)
            && self.index_membership(group, channel).await?
        {
            self.notify_membership(
                membership::MembershipOp::Add,
                group,
                channel,
                &notice_channel,
            )
            .await?;
        }
        Ok(())
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        let key = self.group_key(group);
        let shard = self.shard_of(group);
        let mut conn = self.inner.shards[shard].conn.clone();
        let cmd = redis::cmd("ZREM").arg(&key).arg(channel).to_owned();
        self.run(
            shard,
            async move { cmd.query_async::<i64>(&mut conn).await },
        )
        .await?;
        if let Some(notice_channel) = membership::notice_channel(channel)
            && self.holds_lease(non_local_name(channel)).await?
        {
            self.notify_membership(
                membership::MembershipOp::Discard,
                group,
                channel,
                &notice_channel,
            )
            .await?;
        }
        Ok(())
    }

    async fn group_channels(&self, group: &str) -> Result<Vec<String>, LayerError> {
        let key = self.group_key(group);
        let shard = self.shard_of(group);
        let mut conn = self.inner.shards[shard].conn.clone();
        let cutoff = now_secs() - self.inner.settings.group_expiry.as_secs_f64();
        let mut pipe = redis::pipe();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("{cutoff:.6}"))
            .ignore()
            .cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1);
        let (members,): (Vec<String>,) = self
            .run(shard, async move { pipe.query_async(&mut conn).await })
            .await?;
        Ok(members)
    }

    async fn group_send_encoded(
        &self,
        group: &str,
        payload: &[u8],
    ) -> Result<GroupSendReport, LayerError> {
        let members = self.group_channels(group).await?;
        // One message per Redis key: every member behind one inbox shares it (`__asgi_channel__`
        // is then a list), so the cost grows with the number of inboxes, not members.
        let by_key = crate::layer::by_inbox(&members);
        let shard_count = self.inner.shards.len();
        let mut per_shard: Vec<(Vec<batch::KeyBatch>, Vec<usize>)> =
            (0..shard_count).map(|_| (Vec::new(), Vec::new())).collect();
        for (key, targets) in &by_key {
            let (batches, counts) = &mut per_shard[consistent_hash(key, shard_count)];
            batches.push(batch::KeyBatch {
                key: self.channel_key(key),
                capacity: self.inner.rules.capacity(targets[0]),
                messages: vec![(self.next_score(), self.member(payload, targets)?)],
            });
            counts.push(targets.len());
        }
        let mut report = GroupSendReport {
            members: members.len(),
            full: 0,
        };
        let mut written = 0u64;
        let mut first_error = None;
        for (shard, (batches, counts)) in per_shard.into_iter().enumerate() {
            if batches.is_empty() {
                continue;
            }
            let outcomes = self.write_key_batches(shard, &batches).await;
            for (outcome, n) in outcomes.into_iter().zip(counts) {
                match outcome {
                    Ok(1..) => written += 1,
                    Ok(0) => report.full += n,
                    Err(e) => {
                        // Members on an unreachable shard miss the message, like full ones;
                        // the caller still learns of it when no shard could be written.
                        report.full += n;
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        for (key, _) in &by_key {
            self.ensure_registered(key).await;
        }
        let m = &self.inner.metrics;
        LayerMetrics::add(&m.group_sends, 1);
        LayerMetrics::add(&m.sent, written);
        LayerMetrics::add(&m.group_member_full, report.full as u64);
        match first_error {
            Some(e) if written == 0 => Err(e),
            _ => Ok(report),
        }
    }

    async fn flush(&self) -> Result<(), LayerError> {
        self.flush_own_keys().await
    }

    async fn overview(&self) -> Result<Overview, LayerError> {
        self.own_overview().await
    }

    async fn channel_depth(&self, channel: &str) -> Result<usize, LayerError> {
        let key = self.channel_key(channel);
        let shard = self.shard_of(channel);
        let mut conn = self.inner.shards[shard].conn.clone();
        let cutoff = now_secs() - self.inner.settings.expiry.as_secs_f64();
        let cmd = redis::cmd("ZCOUNT")
            .arg(&key)
            .arg(format!("({cutoff:.6}"))
            .arg("+inf")
            .to_owned();
        self.run(
            shard,
            async move { cmd.query_async::<usize>(&mut conn).await },
        )
        .await
    }

    fn receiver(&self) -> RedisReceiver {
        RedisReceiver {
            layer: self.clone(),
            conns: (0..self.inner.shards.len()).map(|_| None).collect(),
            backoff: Duration::ZERO,
            lane_pops: super::lanes::LanePops::new(self.clone()),
        }
    }
}

//! Which keys under the prefix are this layer's: what `flush` deletes and `stats` lists.
//!
//! A bare prefix match cannot tell: with the prefix `asgi`, the key `asgi_stagingtasks` is both
//! the channel `_stagingtasks` and the channel `tasks` of a project using the prefix
//! `asgi_staging`. So the layer keeps a registry, the sorted set `{prefix}:channels` on each
//! shard, of the channel names it has sent to or received from (each process enters a name once),
//! and a key is taken as one of its own only by the key grammar:
//! - `{prefix}:group:{group}`, and `{prefix}:{kind}:…` for the layer's own kinds of data
//!   (sessions, ordering state, app lists and indexes, leases, the registry);
//! - `{prefix}{channel}` for a registered channel;
//! - `{prefix}{inbox}` for the inbox of a process holding a lease.
//!
//! Anything else under the same characters belongs to someone else and is neither listed nor
//! deleted. A channel only ever written by another program (a Django project's own channel
//! that no Switchyard process sends to or receives from) is not listed either.

use std::collections::HashSet;

use super::{RedisLayer, now_secs};
use crate::layer::{Count, LayerError, Overview};

/// The kinds of `{prefix}:{kind}:…` keys the layer writes besides groups.
const DATA_KINDS: &[&str] = &[
    "session",
    "order",
    "list",
    "index",
    "inbox-groups",
    "owner-set",
    "jobs",
];

/// The registry and the leases: what makes the rest recognisable, kept by `flush` (live
/// processes hold those leases; a flushed registry would hide channels that processes here
/// already registered).
const BOOKKEEPING_KINDS: &[&str] = &["leases", "channels"];

/// What a key under the prefix is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyKind<'a> {
    /// A group, by name.
    Group(&'a str),
    /// A registered channel, by name.
    Channel(&'a str),
    /// A live process's inbox (ends with `!`).
    Inbox(&'a str),
    /// The layer's per-connection state or app data.
    Data,
    /// The registry or the leases.
    Bookkeeping,
    /// Not ours: another prefix's key, or a channel nobody here registered.
    Foreign,
}

/// Classifies `key` by the key grammar (see the module docs).
pub(crate) fn classify<'a>(
    key: &'a str,
    prefix: &str,
    channels: &HashSet<String>,
    inboxes: &HashSet<String>,
) -> KeyKind<'a> {
    let Some(rest) = key.strip_prefix(prefix) else {
        return KeyKind::Foreign;
    };
    // A Redis Cluster's channel keys carry the name as hash tag; no name holds a brace.
    let rest = rest
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or(rest);
    if let Some(data) = rest.strip_prefix(':') {
        if let Some(group) = data.strip_prefix("group:") {
            return KeyKind::Group(group);
        }
        let kind = data.split(':').next().unwrap_or_default();
        return if DATA_KINDS.contains(&kind) {
            KeyKind::Data
        } else if BOOKKEEPING_KINDS.contains(&kind) && data == kind {
            KeyKind::Bookkeeping
        } else {
            KeyKind::Foreign
        };
    }
    if inboxes.contains(rest) {
        KeyKind::Inbox(rest)
    } else if channels.contains(rest) {
        KeyKind::Channel(rest)
    } else {
        KeyKind::Foreign
    }
}

impl RedisLayer {
    fn registry_key(&self) -> String {
        format!("{}:channels", self.inner.settings.prefix)
    }

    /// Enters `channel` in the registry once per process. Best effort: a failure is logged
    /// and tried again by the next call, never returned (the registry only serves `flush` and
    /// `stats`). Senders call it after their send, so a first send is never overtaken by a
    /// later one of the same sender while it registers.
    pub(crate) async fn ensure_registered(&self, channel: &str) {
        if self.inner.registered.contains(channel) {
            return;
        }
        self.inner.registered.insert(channel.to_owned());
        if let Err(e) = self.register_channel(channel).await {
            self.inner.registered.remove(channel);
            tracing::debug!(%channel, error = %e, "channel not registered yet; the next send tries again");
        }
    }

    /// Enters `channel` in the registry of the shard holding it.
    async fn register_channel(&self, channel: &str) -> Result<(), LayerError> {
        let shard = self.shard_of(channel);
        let mut conn = self.inner.shards[shard].conn.clone();
        let cmd = redis::cmd("ZADD")
            .arg(self.registry_key())
            .arg(format!("{:.0}", now_secs()))
            .arg(channel)
            .to_owned();
        self.run(
            shard,
            async move { cmd.query_async::<i64>(&mut conn).await },
        )
        .await?;
        Ok(())
    }

    /// The registered channels and leased inboxes of one shard.
    async fn known_names(
        &self,
        shard: usize,
    ) -> Result<(HashSet<String>, HashSet<String>), LayerError> {
        let mut conn = self.inner.shards[shard].conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(self.registry_key())
            .arg(0)
            .arg(-1)
            .cmd("ZRANGE")
            .arg(format!("{}:leases", self.inner.settings.prefix))
            .arg(0)
            .arg(-1);
        let (channels, inboxes): (Vec<String>, Vec<String>) = self
            .run(shard, async move { pipe.query_async(&mut conn).await })
            .await?;
        Ok((
            channels.into_iter().collect(),
            inboxes.into_iter().collect(),
        ))
    }

    /// The keys of one shard that are this layer's.
    async fn own_keys(&self, shard: usize) -> Result<Vec<String>, LayerError> {
        let prefix = &self.inner.settings.prefix;
        let (channels, inboxes) = self.known_names(shard).await?;
        let keys = self.scan(shard, &format!("{prefix}*")).await?;
        Ok(keys
            .into_iter()
            .filter_map(|k| String::from_utf8(k).ok())
            .filter(|k| {
                !matches!(
                    classify(k, prefix, &channels, &inboxes),
                    KeyKind::Foreign | KeyKind::Bookkeeping
                )
            })
            .collect())
    }

    /// Deletes every channel, inbox, group and piece of data of this layer (see the module
    /// docs), leaving other prefixes' keys and the registry and leases.
    pub(crate) async fn flush_own_keys(&self) -> Result<(), LayerError> {
        for shard in 0..self.inner.shards.len() {
            let keys = self.own_keys(shard).await?;
            for batch in keys.chunks(1000) {
                let mut conn = self.inner.shards[shard].conn.clone();
                // One key per UNLINK: a Redis Cluster splits the pipeline by slot.
                let mut unlink = redis::pipe();
                for key in batch {
                    unlink.cmd("UNLINK").arg(key).ignore();
                }
                self.run(
                    shard,
                    async move { unlink.query_async::<()>(&mut conn).await },
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Every channel (with waiting messages), inbox and group of this layer, with its size.
    pub(crate) async fn own_overview(&self) -> Result<Overview, LayerError> {
        let prefix = self.inner.settings.prefix.clone();
        let channel_cutoff = format!(
            "({:.6}",
            now_secs() - self.inner.settings.expiry.as_secs_f64()
        );
        let group_cutoff = format!(
            "({:.6}",
            now_secs() - self.inner.settings.group_expiry.as_secs_f64()
        );
        let mut overview = Overview::default();
        for shard in 0..self.inner.shards.len() {
            let (channels, inboxes) = self.known_names(shard).await?;
            let keys = self.scan(shard, &format!("{prefix}*")).await?;
            let mut names: Vec<(String, bool)> = Vec::new();
            for k in keys.iter().filter_map(|k| std::str::from_utf8(k).ok()) {
                match classify(k, &prefix, &channels, &inboxes) {
                    KeyKind::Group(g) => names.push((g.to_owned(), true)),
                    KeyKind::Channel(c) | KeyKind::Inbox(c) => names.push((c.to_owned(), false)),
                    KeyKind::Data | KeyKind::Bookkeeping | KeyKind::Foreign => {}
                }
            }
            if names.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for (name, is_group) in &names {
                if *is_group {
                    pipe.cmd("ZCOUNT")
                        .arg(format!("{prefix}:group:{name}"))
                        .arg(&group_cutoff)
                        .arg("+inf");
                } else {
                    pipe.cmd("ZCOUNT")
                        .arg(self.channel_key(name))
                        .arg(&channel_cutoff)
                        .arg("+inf");
                }
            }
            let mut conn = self.inner.shards[shard].conn.clone();
            let counts: Vec<redis::Value> = self
                .run(shard, async move { pipe.query_async(&mut conn).await })
                .await?;
            for ((name, is_group), count) in names.into_iter().zip(counts) {
                let redis::Value::Int(n) = count else {
                    continue;
                };
                if n <= 0 {
                    continue;
                }
                if is_group {
                    overview.groups.push(Count::new(name, n as usize));
                } else {
                    overview.channels.push(Count::new(name, n as usize));
                }
            }
        }
        Ok(overview)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_classified_by_the_grammar_not_a_bare_prefix() {
        let channels: HashSet<String> = ["tasks".to_owned(), "http.request".to_owned()].into();
        let inboxes: HashSet<String> = ["switchyard.response.AbC!".to_owned()].into();
        let c = |k| classify(k, "asgi", &channels, &inboxes);
        assert_eq!(c("asgitasks"), KeyKind::Channel("tasks"));
        assert_eq!(c("asgihttp.request"), KeyKind::Channel("http.request"));
        // A Redis Cluster's keys: the name is the hash tag.
        assert_eq!(c("asgi{tasks}"), KeyKind::Channel("tasks"));
        assert_eq!(
            c("asgi{switchyard.response.AbC!}"),
            KeyKind::Inbox("switchyard.response.AbC!")
        );
        assert_eq!(
            c("asgiswitchyard.response.AbC!"),
            KeyKind::Inbox("switchyard.response.AbC!")
        );
        assert_eq!(c("asgi:group:chat-lobby"), KeyKind::Group("chat-lobby"));
        assert_eq!(c("asgi:session:x!y"), KeyKind::Data);
        assert_eq!(c("asgi:owner-set:switchyard.owner.AbC"), KeyKind::Data);
        assert_eq!(c("asgi:leases"), KeyKind::Bookkeeping);
        assert_eq!(c("asgi:channels"), KeyKind::Bookkeeping);
        // Neighbouring prefixes' keys are never ours.
        assert_eq!(c("asgi_stagingtasks"), KeyKind::Foreign);
        assert_eq!(c("asgi_staging:group:chat-lobby"), KeyKind::Foreign);
        assert_eq!(c("asgixtasks"), KeyKind::Foreign);
        assert_eq!(c("asgix:group:room"), KeyKind::Foreign);
        assert_eq!(c("asgi:unknown:thing"), KeyKind::Foreign);
        assert_eq!(c("asgiswitchyard.response.Other!"), KeyKind::Foreign);
        assert_eq!(c("other"), KeyKind::Foreign);
    }
}

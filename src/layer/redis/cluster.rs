//! Redis Cluster: the URL, the hash-slot rules the layer's keys follow, pipelines split by slot,
//! and the commands that must visit every master.
//!
//! Routing stays redis-rs's: its cluster connection keeps the slot map, follows `MOVED` and
//! `ASK` and refreshes the topology. What it refuses is a pipeline whose commands live in
//! several slots, and the layer pipelines freely (a group send writes one message per inbox key,
//! a flush one `UNLINK` per key): [`pipeline`] sends such a pipeline as one pipeline per slot,
//! all at once (redis-rs puts those for one node on its connection together), and puts the
//! replies back in order. A command without a key (`SCRIPT LOAD`) goes first in every part.
//!
//! Keys: every script touches keys of one slot. A channel's keys carry its name as hash tag
//! (`{prefix}{<name>}`, and a durable channel's `{prefix}:jobs:{<name>}`, `…:retry`, `…:dead`,
//! `…:idem:*`), so a durable channel's scripts stay in one slot and channels spread over the
//! slots. The lease index script, which reads the leases set and writes an inbox's group index,
//! becomes a `ZSCORE` then a one-slot write; coalesced ordering steps are coalesced per slot;
//! a receiver's blocking pops take the keys of one slot each, one pop per slot at once (see
//! [`super::lanes`]); durable-job reads take turns over the slots. Everything else is one key per command already.

use std::collections::HashMap;

use futures_util::future::join_all;
use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{Cmd, Pipeline, RedisError, RedisResult, Value};

use crate::layer::LayerError;

/// The seed nodes of `redis+cluster://[user:password@]host:port[,host:port…][?query]` (or
/// `rediss+cluster://`), each as a `redis://` (`rediss://`) URL with the credentials and query.
pub(crate) fn seed_urls(url: &str) -> Result<Vec<String>, LayerError> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Err(LayerError::Config(format!(
            "{url:?} is not a redis+cluster:// URL"
        )));
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((c, h)) => (format!("{c}@"), h),
        None => (String::new(), rest),
    };
    let hosts = hosts.trim_end_matches('/');
    if hosts.contains('/') {
        return Err(LayerError::Config(format!(
            "{url:?}: a Redis Cluster has only database 0; drop the /<db>"
        )));
    }
    let seeds: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{credentials}{h}{query}"))
        .collect();
    if seeds.is_empty() {
        return Err(LayerError::Config(format!(
            "{url:?} names no node: use redis+cluster://host:port[,host:port…]"
        )));
    }
    Ok(seeds)
}

/// The key a command of the layer's reads or writes, which decides its slot: the script's first
/// key for `EVAL`/`EVALSHA`, none for commands about the server, else the first argument.
fn key_of(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()?;
    if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        let _script = args.next()?;
        let numkeys = args.next()?;
        return (numkeys != b"0").then(|| args.next()).flatten();
    }
    const KEYLESS: [&[u8]; 6] = [b"SCRIPT", b"PING", b"INFO", b"CLUSTER", b"MULTI", b"EXEC"];
    if KEYLESS.iter().any(|k| name.eq_ignore_ascii_case(k)) {
        return None;
    }
    args.next()
}

/// The slot of each command (`None`: no key).
fn slots(pipe: &Pipeline) -> Vec<Option<Slot>> {
    pipe.cmd_iter()
        .map(|c| key_of(c).map(Slot::for_key))
        .collect()
}

/// A reply standing for a command whose part of the pipeline failed as a whole.
fn failed_part(e: &RedisError) -> Value {
    let text = format!("-ERR this command's part of the pipeline failed: {e}\r\n")
        .replace(['\r', '\n'], " ");
    redis::parse_redis_value(format!("{}\r\n", text.trim_end()).as_bytes()).unwrap_or(Value::Nil)
}

/// Sends `pipe` (`count` replies from `offset`) through `conn`: whole when it is a
/// transaction or all its keys share a slot, else one pipeline per slot at once, the replies
/// put back in the order of the commands. When every part fails the first failure is the
/// answer; when some do, their commands answer with an error each (the others ran).
pub(super) async fn pipeline(
    mut conn: ClusterConnection,
    pipe: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let slots = slots(pipe);
    let first = slots.iter().flatten().next().copied();
    if pipe.is_transaction() || slots.iter().flatten().all(|s| Some(*s) == first) {
        return conn.req_packed_commands(pipe, offset, count).await;
    }
    // One part per slot, in the order the slots first appear, each with the indices in `pipe`
    // of its commands. A keyless command (`SCRIPT LOAD`) goes first in every part.
    let commands: Vec<&Cmd> = pipe.cmd_iter().collect();
    let keyless: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_none()).collect();
    let mut part_of: HashMap<Slot, usize> = HashMap::new();
    let mut parts: Vec<(Pipeline, Vec<usize>)> = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let Some(slot) = slot else { continue };
        let at = *part_of.entry(*slot).or_insert_with(|| {
            let mut part = redis::pipe();
            for &k in &keyless {
                part.add_command(commands[k].clone());
            }
            parts.push((part, keyless.clone()));
            parts.len() - 1
        });
        parts[at].0.add_command(commands[i].clone());
        parts[at].1.push(i);
    }
    let replies = join_all(parts.iter().map(|(part, _)| {
        let mut conn = conn.clone();
        async move { conn.req_packed_commands(part, 0, part.len()).await }
    }))
    .await;
    if let Some(Err(first)) = replies.iter().find(|r| r.is_err())
        && replies.iter().all(Result::is_err)
    {
        return Err(first.clone());
    }
    let mut out: Vec<Option<Value>> = vec![None; slots.len()];
    for ((_, indices), reply) in parts.iter().zip(replies) {
        match reply {
            Ok(values) => {
                for (i, v) in indices.iter().zip(values) {
                    if out[*i].is_none() {
                        out[*i] = Some(v);
                    }
                }
            }
            Err(e) => {
                for i in indices {
                    if out[*i].is_none() && slots[*i].is_some() {
                        out[*i] = Some(failed_part(&e));
                    }
                }
            }
        }
    }
    Ok(out
        .into_iter()
        .skip(offset)
        .take(count)
        .map(|v| v.unwrap_or(Value::Nil))
        .collect())
}

/// `host:port` of every master, from `CLUSTER SHARDS` (Redis 7) or `CLUSTER SLOTS`.
pub(super) async fn masters(conn: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let slots: Value = conn
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let mut out: Vec<(String, u16)> = Vec::new();
    // [[start, end, [host, port, id, …], replicas…], …]
    if let Value::Array(ranges) = slots {
        for range in ranges {
            let Value::Array(fields) = range else {
                continue;
            };
            let Some(Value::Array(master)) = fields.get(2) else {
                continue;
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => continue,
            };
            let Some(Value::Int(port)) = master.get(1) else {
                continue;
            };
            let Ok(port) = u16::try_from(*port) else {
                continue;
            };
            if !out.iter().any(|(h, p)| *h == host && *p == port) {
                out.push((host, port));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// One `SCAN` page on the master at `host:port`.
pub(super) async fn scan_page(
    conn: &mut ClusterConnection,
    host: &str,
    port: u16,
    cursor: u64,
    pattern: &str,
) -> RedisResult<(u64, Vec<Vec<u8>>)> {
    let value = conn
        .route_command(
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .to_owned(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.to_owned(),
                port,
            }),
        )
        .await?;
    Ok(redis::from_redis_value(value)?)
}

/// The slot of a key, for grouping a receiver's channels.
pub(super) fn slot_of(key: &str) -> Slot {
    Slot::for_key(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_keep_credentials_and_query() {
        assert_eq!(
            seed_urls("redis+cluster://u:p@a:7000,b:7001?protocol=resp2").unwrap(),
            vec![
                "redis://u:p@a:7000?protocol=resp2",
                "redis://u:p@b:7001?protocol=resp2"
            ]
        );
        assert_eq!(
            seed_urls("rediss+cluster://a:7000/").unwrap(),
            vec!["rediss://a:7000"]
        );
        assert!(seed_urls("redis+cluster://a:7000/3").is_err());
        assert!(seed_urls("redis+cluster://").is_err());
    }

    #[test]
    fn the_key_of_a_script_is_its_first_key() {
        let eval = redis::cmd("EVALSHA")
            .arg("abc")
            .arg(2)
            .arg("k1")
            .arg("k2")
            .to_owned();
        assert_eq!(key_of(&eval), Some(&b"k1"[..]));
        let none = redis::cmd("EVALSHA").arg("abc").arg(0).arg("x").to_owned();
        assert_eq!(key_of(&none), None);
        let load = redis::cmd("SCRIPT").arg("LOAD").arg("return 1").to_owned();
        assert_eq!(key_of(&load), None);
        let zadd = redis::cmd("ZADD").arg("k").arg(1).arg("m").to_owned();
        assert_eq!(key_of(&zadd), Some(&b"k"[..]));
    }

    #[test]
    fn a_failed_part_reads_as_a_server_error() {
        let e = RedisError::from(std::io::Error::other("gone\r\naway"));
        assert!(matches!(failed_part(&e), Value::ServerError(_)));
    }
}

//! `redis+sentinel://` URLs: which sentinels to ask, for which master, and how to log in to it.
//!
//! `redis+sentinel://[user:password@]host[:port][,host[:port]…]/<master-name>[/<db>][?protocol=resp2]`
//! (the sentinels' default port is 26379). The credentials, database and protocol are the
//! master's (and, after a failover, the promoted replica's); the sentinels are asked without
//! credentials. redis-rs has no URL form for Sentinel, so this one follows the scheme redis-py,
//! Celery and Sidekiq users know, with every sentinel in one URL (it is a list of the same
//! service's sentinels, not shards: several masters behind Sentinel are not sharded).

use redis::sentinel::SentinelNodeConnectionInfo;
use redis::{Client, ProtocolVersion};

use super::conn::SentinelTarget;
use crate::layer::LayerError;

/// The sentinels' port when the URL names none.
const DEFAULT_SENTINEL_PORT: u16 = 26379;

const SCHEME: &str = "redis+sentinel://";

fn bad(url: &str, why: &str) -> LayerError {
    LayerError::Config(format!(
        "invalid Sentinel URL {:?}: {why} (use redis+sentinel://host:port[,host:port…]/<master-name>[/<db>])",
        redacted(url)
    ))
}

/// `url` with any password replaced, for error messages.
fn redacted(url: &str) -> String {
    let Some(rest) = url.strip_prefix(SCHEME) else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{SCHEME}***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Parses a `redis+sentinel://` URL.
pub(crate) fn parse(url: &str) -> Result<SentinelTarget, LayerError> {
    if url.starts_with("rediss+sentinel://") {
        return Err(LayerError::Config(
            "TLS to Sentinel (rediss+sentinel://) is not supported yet".into(),
        ));
    }
    let rest = url
        .strip_prefix(SCHEME)
        .ok_or_else(|| bad(url, "it must start with redis+sentinel://"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = rest
        .split_once('/')
        .ok_or_else(|| bad(url, "no master name"))?;
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        let has_port = match host.rsplit_once(':') {
            // `[::1]` alone has colons but no port.
            Some((h, p)) => {
                !h.is_empty()
                    && !p.is_empty()
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && !host.ends_with(']')
            }
            None => false,
        };
        let hostport = if has_port {
            host.to_owned()
        } else {
            format!("{host}:{DEFAULT_SENTINEL_PORT}")
        };
        let sentinel_url = format!("redis://{hostport}");
        // Checked here so a typo fails at startup with the URL in the message.
        Client::open(sentinel_url.as_str())
            .map_err(|e| bad(url, &format!("sentinel {host:?}: {e}")))?;
        sentinels.push(sentinel_url);
    }
    if sentinels.is_empty() {
        return Err(bad(url, "no sentinel address"));
    }
    let mut segments = path.split('/');
    let master = segments.next().unwrap_or_default();
    if master.is_empty() {
        return Err(bad(url, "no master name"));
    }
    let db = match segments.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse::<i64>()
            .map_err(|_| bad(url, &format!("database {db:?} is not a number")))?,
    };
    if segments.any(|s| !s.is_empty()) {
        return Err(bad(url, "more path segments than <master-name>/<db>"));
    }
    // The master's login is parsed by redis-rs itself (percent-decoding, `protocol=`), from a
    // plain URL carrying the same credentials, database and query.
    let login = format!(
        "redis://{}127.0.0.1/{db}{}",
        userinfo.map(|u| format!("{u}@")).unwrap_or_default(),
        query.map(|q| format!("?{q}")).unwrap_or_default()
    );
    let client = Client::open(login.as_str()).map_err(|e| bad(url, &e.to_string()))?;
    let mut redis = client.get_connection_info().redis_settings().clone();
    if !query.is_some_and(|q| q.contains("protocol=")) {
        // As for plain URLs: RESP3 tells the connection at once that Redis closed it.
        redis = redis.set_protocol(ProtocolVersion::RESP3);
    }
    Ok(SentinelTarget {
        sentinels,
        master: master.to_owned(),
        node: SentinelNodeConnectionInfo::default().set_redis_connection_info(redis),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_master_and_db() {
        let t = parse("redis+sentinel://s1:26380,s2,127.0.0.1:5000/mymaster/3").expect("parses");
        assert_eq!(
            t.sentinels,
            vec![
                "redis://s1:26380".to_owned(),
                "redis://s2:26379".to_owned(),
                "redis://127.0.0.1:5000".to_owned()
            ]
        );
        assert_eq!(t.master, "mymaster");
        let t = parse("redis+sentinel://:p%40ss@s1/m").expect("parses");
        assert_eq!(t.master, "m");
        assert_eq!(t.sentinels, vec!["redis://s1:26379".to_owned()]);
    }

    #[test]
    fn refuses_nonsense_without_leaking_the_password() {
        for url in [
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1:26379/",
            "redis+sentinel:///m",
            "redis+sentinel://s1/m/x",
            "redis+sentinel://s1/m/0/extra",
        ] {
            assert!(parse(url).is_err(), "{url}");
        }
        let e = parse("redis+sentinel://u:secret@s1/m/nan").expect_err("bad db");
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(parse("rediss+sentinel://s1/m").is_err());
    }
}

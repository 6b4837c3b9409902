//! The edge's admission rules, decided by the interface server before any worker sees a message:
//! which `Host` a request may name (Django's `ALLOWED_HOSTS`, plus RFC 9112's
//! missing / repeated / malformed Host → 400), which `Origin` may open a WebSocket (same origin by
//! default, as Phoenix does), how many connections one client address may hold, and how fast one
//! socket may send (a token bucket per socket). Everything here is pure or owns its own small
//! state, so the request path calls one function per rule.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use globset::{GlobSet, GlobSetBuilder};
use hyper::HeaderMap;
use hyper::header::{HOST, ORIGIN};

/// Who may open a WebSocket, by its `Origin` header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    /// Origins allowed besides the request's own: `https://app.example.com` (exact; the port
    /// defaults to the scheme's), `https://*.example.com` (any subdomain, that scheme),
    /// `*.example.com` or `example.com` (that host or its subdomains for `*.`, any scheme and
    /// port), or `*` (every origin). Empty: same origin only.
    pub allowed: Vec<String>,
    /// Also allow `localhost`, `127.0.0.1` and `[::1]` origins on any port (`dev` sets it).
    pub allow_localhost: bool,
    /// Refuse handshakes without an `Origin` header (by default they pass: browsers always send
    /// one, so a handshake without it comes from a non-browser client, which CSRF cannot drive).
    pub refuse_missing: bool,
    /// Request paths (globs, `*` matches anything, `/` included) whose handshakes skip the
    /// origin check: public APIs meant to be opened from any page.
    pub public_paths: Vec<String>,
}

/// Limits on one socket's inbound frames: two token buckets, messages and bytes. A frame over
/// either limit waits (its socket is not read meanwhile, so TCP pushes back on the client); a
/// socket kept over its limit for `close_after` is closed with 1008.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameRateLimit {
    /// Sustained messages per second (0 = no message limit).
    pub messages_per_second: f64,
    /// Messages a socket may send at once after being quiet.
    pub message_burst: f64,
    /// Sustained payload bytes per second (0 = no byte limit).
    pub bytes_per_second: f64,
    /// Bytes a socket may send at once after being quiet. A single frame larger than this
    /// costs the whole burst (so it passes after a full refill instead of never).
    pub byte_burst: f64,
    /// How long a socket may stay over its limit (each frame delayed) before 1008.
    pub close_after: Duration,
}

impl Default for FrameRateLimit {
    /// Sane for a chat: 20 messages/s (bursts of 50, a paste of several lines or a reconnect's
    /// catch-up), 64 KiB/s (bursts of 1 MiB, one message of the default maximum size), and 10 s
    /// of sustained excess before the close.
    fn default() -> Self {
        FrameRateLimit {
            messages_per_second: 20.0,
            message_burst: 50.0,
            bytes_per_second: 65_536.0,
            byte_burst: 1_048_576.0,
            close_after: Duration::from_secs(10),
        }
    }
}

/// Why a `Host` header is refused (each → 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostError {
    /// HTTP/1.1 without a Host header (RFC 9112 §3.2).
    Missing,
    /// More than one Host header (RFC 9112 §3.2).
    Several,
    /// Not `host[:port]` with a DNS name, IPv4 or bracketed IPv6 host.
    Invalid,
    /// Well formed, but not in `allowed_hosts`.
    NotAllowed,
}

impl HostError {
    pub(crate) fn text(self) -> &'static str {
        match self {
            HostError::Missing => "Missing Host header\n",
            HostError::Several => "Several Host headers\n",
            HostError::Invalid => "Invalid Host header\n",
            HostError::NotAllowed => "Host not allowed\n",
        }
    }
}

/// A request's host, lowercased and split: `domain` without brackets' removal (an IPv6 host
/// keeps them, as Django does), `port` when one was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHost {
    pub(crate) domain: String,
    pub(crate) port: Option<u16>,
}

/// Splits and validates `host[:port]` as Django's `split_domain_port` + `host_validation_re` do:
/// a name of letters, digits, `.` and `-` (a trailing dot dropped), or a bracketed IPv6 address;
/// `None` when it is neither.
pub(crate) fn parse_host(raw: &str) -> Option<RequestHost> {
    let lower = raw.to_ascii_lowercase();
    let (domain, port) = if lower.starts_with('[') {
        let close = lower.find(']')?;
        let (domain, rest) = lower.split_at(close + 1);
        let inner = &domain[1..domain.len() - 1];
        let ipv6_chars = |c: char| c.is_ascii_hexdigit() || c == ':' || c == '.';
        if !inner.contains(':') || !inner.chars().all(ipv6_chars) {
            return None;
        }
        match rest {
            "" => (domain.to_owned(), None),
            _ => (domain.to_owned(), Some(rest.strip_prefix(':')?)),
        }
    } else {
        match lower.rsplit_once(':') {
            Some((domain, port)) => (domain.to_owned(), Some(port)),
            None => (lower.clone(), None),
        }
    };
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
        None => None,
    };
    let domain = domain.strip_suffix('.').unwrap_or(&domain).to_owned();
    let name_chars = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
    if domain.is_empty() || (!domain.starts_with('[') && !domain.bytes().all(name_chars)) {
        return None;
    }
    Some(RequestHost { domain, port })
}

/// Django's `ALLOWED_HOSTS` match: `*` anything, `.example.com` the domain and its subdomains,
/// anything else exactly (ports are not compared, as in Django).
pub(crate) fn host_allowed(allowed: &[String], domain: &str) -> bool {
    allowed.iter().any(|pattern| {
        let pattern = pattern.trim();
        if pattern == "*" {
            return true;
        }
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix('.') {
            Some(parent) => domain == parent || domain.ends_with(&pattern),
            None => domain == pattern,
        }
    })
}

/// The host a request names: `X-Forwarded-Host` when proxy headers are trusted and it is set,
/// else the one `Host` header. RFC 9112's rules (missing on HTTP/1.1, repeated, malformed) apply
/// whatever `allowed_hosts` says.
pub(crate) fn request_host(
    headers: &HeaderMap,
    http11: bool,
    proxy_headers: bool,
) -> Result<Option<RequestHost>, HostError> {
    let mut hosts = headers.get_all(HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(HostError::Several),
        (None, _) if http11 => return Err(HostError::Missing),
        (None, _) => None,
        (Some(value), None) => Some(
            value
                .to_str()
                .ok()
                .and_then(parse_host)
                .ok_or(HostError::Invalid)?,
        ),
    };
    if proxy_headers
        && let Some(forwarded) = headers
            .get("x-forwarded-host")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    {
        return parse_host(forwarded).map(Some).ok_or(HostError::Invalid);
    }
    Ok(host)
}

/// An origin, `scheme://host[:port]`, lowercased, with the scheme's default port filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

fn parse_origin(raw: &str) -> Option<Origin> {
    let (scheme, rest) = raw.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return None;
    }
    let host = parse_host(authority)?;
    let port = match host.port {
        Some(p) => p,
        None => default_port(&scheme)?,
    };
    Some(Origin {
        scheme,
        host: host.domain,
        port,
    })
}

/// One `allowed_origins` entry, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginPattern {
    Any,
    /// `scheme://host[:port]`, or with `*.` before the host: its subdomains (not the host).
    Exact {
        scheme: String,
        host: String,
        port: u16,
        subdomains: bool,
    },
    /// A bare host: that host, or with `*.` its subdomains; any scheme and port.
    Host {
        host: String,
        subdomains: bool,
    },
}

impl OriginPattern {
    fn parse(raw: &str) -> Result<OriginPattern, String> {
        let raw = raw.trim();
        if raw == "*" {
            return Ok(OriginPattern::Any);
        }
        let bad = || {
            format!(
                "allowed origin {raw:?} must be `*`, scheme://host[:port], scheme://*.domain, *.domain or a host"
            )
        };
        if let Some((scheme, rest)) = raw.split_once("://") {
            let (subdomains, rest) = match rest.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, rest),
            };
            let origin = parse_origin(&format!("{scheme}://{rest}")).ok_or_else(bad)?;
            return Ok(OriginPattern::Exact {
                scheme: origin.scheme,
                host: origin.host,
                port: origin.port,
                subdomains,
            });
        }
        let (subdomains, host) = match raw.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, raw),
        };
        let parsed = parse_host(host)
            .filter(|h| h.port.is_none())
            .ok_or_else(bad)?;
        Ok(OriginPattern::Host {
            host: parsed.domain,
            subdomains,
        })
    }

    fn matches(&self, origin: &Origin) -> bool {
        let host_matches = |host: &str, subdomains: bool| {
            if subdomains {
                origin
                    .host
                    .strip_suffix(host)
                    .is_some_and(|label| label.len() > 1 && label.ends_with('.'))
            } else {
                origin.host == host
            }
        };
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact {
                scheme,
                host,
                port,
                subdomains,
            } => {
                *scheme == origin.scheme && *port == origin.port && host_matches(host, *subdomains)
            }
            OriginPattern::Host { host, subdomains } => host_matches(host, *subdomains),
        }
    }
}

/// Why a handshake's origin is refused (each → 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OriginRefusal {
    /// No Origin header, and the policy refuses those.
    Missing,
    /// An Origin that is not the request's own and not allowed.
    NotAllowed,
}

/// An [`OriginPolicy`], compiled.
#[derive(Debug, Clone)]
pub(crate) struct OriginRules {
    allowed: Vec<OriginPattern>,
    allow_localhost: bool,
    refuse_missing: bool,
    public_paths: GlobSet,
}

impl OriginRules {
    pub(crate) fn new(policy: &OriginPolicy) -> Result<OriginRules, String> {
        let allowed = policy
            .allowed
            .iter()
            .filter(|p| !p.trim().is_empty())
            .map(|p| OriginPattern::parse(p))
            .collect::<Result<_, _>>()?;
        let mut public_paths = GlobSetBuilder::new();
        for path in &policy.public_paths {
            if !path.starts_with('/') {
                return Err(format!("public path {path:?} must start with /"));
            }
            public_paths
                .add(path_glob(path).map_err(|e| format!("invalid public path {path:?}: {e}"))?);
        }
        Ok(OriginRules {
            allowed,
            allow_localhost: policy.allow_localhost,
            refuse_missing: policy.refuse_missing,
            public_paths: public_paths
                .build()
                .map_err(|e| format!("invalid public paths: {e}"))?,
        })
    }

    /// Checks a handshake for `path` (percent-decoded, as routing sees it). Same origin means
    /// the Origin's host and port are the request's (`host`, the port defaulting to the
    /// Origin scheme's); its scheme must be the request's when the server knows it
    /// (`secure`: TLS, or a trusted `X-Forwarded-Proto`), and may be http or https when it
    /// does not (a proxy that terminates TLS and does not say so).
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        path: &str,
        host: Option<&RequestHost>,
        secure: Option<bool>,
    ) -> Result<(), OriginRefusal> {
        if self.public_paths.is_match(path) {
            return Ok(());
        }
        let mut values = headers.get_all(ORIGIN).iter();
        let raw = match (values.next(), values.next()) {
            (None, _) if self.refuse_missing => return Err(OriginRefusal::Missing),
            (None, _) => return Ok(()),
            (Some(_), Some(_)) => return Err(OriginRefusal::NotAllowed),
            (Some(v), None) => v.to_str().map_err(|_| OriginRefusal::NotAllowed)?,
        };
        // `null` (sandboxed frames, file: pages) is an opaque origin: never the request's own.
        let Some(origin) = parse_origin(raw) else {
            return if self.allowed.contains(&OriginPattern::Any) {
                Ok(())
            } else {
                Err(OriginRefusal::NotAllowed)
            };
        };
        if host.is_some_and(|h| same_origin(&origin, h, secure))
            || (self.allow_localhost && is_localhost(&origin.host))
            || self.allowed.iter().any(|p| p.matches(&origin))
        {
            Ok(())
        } else {
            Err(OriginRefusal::NotAllowed)
        }
    }
}

fn same_origin(origin: &Origin, host: &RequestHost, secure: Option<bool>) -> bool {
    let scheme_ok = match (secure, origin.scheme.as_str()) {
        (Some(true), s) => s == "https",
        (Some(false), s) => s == "http",
        (None, s) => s == "http" || s == "https",
    };
    let port = host.port.or_else(|| default_port(&origin.scheme));
    scheme_ok && origin.host == host.domain && Some(origin.port) == port
}

fn is_localhost(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "[::1]") || host.ends_with(".localhost")
}

/// A public path: `*` matches any run of characters (including `/`); everything else, `?` and
/// `[` included, matches itself.
fn path_glob(path: &str) -> Result<globset::Glob, globset::Error> {
    let literal_parts: Vec<String> = path.split('*').map(globset::escape).collect();
    crate::layer::glob(&literal_parts.join("*"))
}

/// The scheme the server knows a request came over: `Some(true)` for TLS (a trusted
/// `X-Forwarded-Proto: https`), `Some(false)` for a trusted plain one, `None` when unknown.
pub(crate) fn known_scheme(headers: &HeaderMap, proxy_headers: bool) -> Option<bool> {
    if !proxy_headers {
        return None;
    }
    let proto = headers
        .get("x-forwarded-proto")?
        .to_str()
        .ok()?
        .split(',')
        .next()?
        .trim()
        .to_ascii_lowercase();
    match proto.as_str() {
        "https" | "wss" => Some(true),
        "http" | "ws" => Some(false),
        _ => None,
    }
}

/// Open connections per client address, bounded by `limit`. Loopback clients are not counted
/// unless `limit_loopback` (a local proxy without `--proxy-headers`, or a load test on the same
/// machine, would otherwise share one address and one limit).
#[derive(Debug)]
pub(crate) struct ClientSlots {
    open: DashMap<IpAddr, usize>,
    limit: usize,
    limit_loopback: bool,
}

/// One counted connection of a client address; released when dropped.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    slots: Arc<ClientSlots>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        // The guard is dropped before `remove_if` takes the shard lock again.
        if let Some(mut n) = self.slots.open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
        }
        self.slots.open.remove_if(&self.ip, |_, n| *n == 0);
    }
}

impl ClientSlots {
    /// `limit` 0 means no limit.
    pub(crate) fn new(limit: usize, limit_loopback: bool) -> ClientSlots {
        ClientSlots {
            open: DashMap::new(),
            limit,
            limit_loopback,
        }
    }

    /// Takes a slot for `ip`: `Ok(None)` when the address is not limited, `Err(())` when it
    /// already holds `limit` connections.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Option<ClientSlot>, ()> {
        if self.limit == 0 || (ip.is_loopback() && !self.limit_loopback) {
            return Ok(None);
        }
        let mut open = self.open.entry(ip).or_insert(0);
        if *open >= self.limit {
            return Err(());
        }
        *open += 1;
        drop(open);
        Ok(Some(ClientSlot {
            slots: Arc::clone(self),
            ip,
        }))
    }

    /// Addresses holding at least one slot now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.open.len()
    }
}

/// What a socket's limiter says about one inbound frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Admit {
    /// Forward it now.
    Now,
    /// Forward it after this long (reading nothing more meanwhile).
    After(Duration),
    /// The socket stayed over its limit past `close_after`: close with 1008.
    Close,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Option<Bucket> {
        (rate > 0.0).then(|| {
            let burst = burst.max(1.0);
            Bucket {
                rate,
                burst,
                tokens: burst,
            }
        })
    }

    /// Refills for `elapsed` seconds and takes `cost`; the seconds until the balance is back to
    /// zero when it went negative.
    fn take(&mut self, elapsed: f64, cost: f64) -> f64 {
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - cost.min(self.burst);
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate
        }
    }
}

/// One socket's token buckets.
#[derive(Debug, Clone)]
pub(crate) struct FrameLimiter {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    close_after: Duration,
    last: Instant,
    /// When the current run of delayed frames began (cleared by a frame that passes at once).
    throttled_since: Option<Instant>,
}

impl FrameLimiter {
    /// `None` when the limit limits nothing.
    pub(crate) fn new(limit: &FrameRateLimit, now: Instant) -> Option<FrameLimiter> {
        let messages = Bucket::new(limit.messages_per_second, limit.message_burst);
        let bytes = Bucket::new(limit.bytes_per_second, limit.byte_burst);
        (messages.is_some() || bytes.is_some()).then_some(FrameLimiter {
            messages,
            bytes,
            close_after: limit.close_after,
            last: now,
            throttled_since: None,
        })
    }

    /// Charges one frame of `len` payload bytes arriving at `now`.
    pub(crate) fn admit(&mut self, now: Instant, len: usize) -> Admit {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let wait_messages = self.messages.as_mut().map_or(0.0, |b| b.take(elapsed, 1.0));
        let wait_bytes = self
            .bytes
            .as_mut()
            .map_or(0.0, |b| b.take(elapsed, len as f64));
        let wait = wait_messages.max(wait_bytes);
        if wait <= 0.0 {
            self.throttled_since = None;
            return Admit::Now;
        }
        let wait = Duration::from_secs_f64(wait.min(86_400.0));
        let since = *self.throttled_since.get_or_insert(now);
        if now.saturating_duration_since(since) + wait > self.close_after {
            Admit::Close
        } else {
            Admit::After(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn host(raw: &str) -> Option<(String, Option<u16>)> {
        parse_host(raw).map(|h| (h.domain, h.port))
    }

    #[test]
    fn hosts_parse_as_django_splits_them() {
        assert_eq!(host("Example.COM"), Some(("example.com".into(), None)));
        assert_eq!(
            host("example.com:8000"),
            Some(("example.com".into(), Some(8000)))
        );
        assert_eq!(host("example.com."), Some(("example.com".into(), None)));
        assert_eq!(host("127.0.0.1:80"), Some(("127.0.0.1".into(), Some(80))));
        assert_eq!(host("[::1]:8000"), Some(("[::1]".into(), Some(8000))));
        assert_eq!(host("[2001:DB8::1]"), Some(("[2001:db8::1]".into(), None)));
        for bad in [
            "",
            ":80",
            "exa mple.com",
            "example.com:",
            "example.com:99999",
            "example.com:8x",
            "ex@mple.com",
            "[::1",
            "[zz::1]",
            "[::1]x",
            "a/b",
            "évil.com",
            "host:1:2",
        ] {
            assert_eq!(host(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn allowed_hosts_follow_django() {
        let allowed: Vec<String> = vec![".example.com".into(), "api.test".into()];
        assert!(host_allowed(&allowed, "example.com"));
        assert!(host_allowed(&allowed, "a.b.example.com"));
        assert!(host_allowed(&allowed, "api.test"));
        assert!(!host_allowed(&allowed, "badexample.com"));
        assert!(!host_allowed(&allowed, "x.api.test"));
        assert!(!host_allowed(&allowed, "evil.example"));
        assert!(host_allowed(&["*".into()], "anything"));
        assert!(!host_allowed(&[], "anything"));
    }

    #[test]
    fn host_headers_missing_repeated_or_forwarded() {
        let mut h = HeaderMap::new();
        assert_eq!(request_host(&h, true, false), Err(HostError::Missing));
        assert_eq!(request_host(&h, false, false), Ok(None));
        h.append(HOST, HeaderValue::from_static("a.test"));
        assert_eq!(
            request_host(&h, true, false).unwrap().unwrap().domain,
            "a.test"
        );
        h.append(
            "x-forwarded-host",
            HeaderValue::from_static("b.test, c.test"),
        );
        assert_eq!(
            request_host(&h, true, false).unwrap().unwrap().domain,
            "a.test"
        );
        assert_eq!(
            request_host(&h, true, true).unwrap().unwrap().domain,
            "b.test"
        );
        h.append(HOST, HeaderValue::from_static("a.test"));
        assert_eq!(request_host(&h, true, false), Err(HostError::Several));
    }

    fn rules(allowed: &[&str], localhost: bool, refuse_missing: bool) -> OriginRules {
        OriginRules::new(&OriginPolicy {
            allowed: allowed.iter().map(|s| (*s).to_owned()).collect(),
            allow_localhost: localhost,
            refuse_missing,
            public_paths: vec!["/ws/public/*".into()],
        })
        .unwrap()
    }

    fn check(rules: &OriginRules, origin: Option<&str>, host: &str, secure: Option<bool>) -> bool {
        check_path(rules, origin, host, secure, "/ws/chat/")
    }

    fn check_path(
        rules: &OriginRules,
        origin: Option<&str>,
        host: &str,
        secure: Option<bool>,
        path: &str,
    ) -> bool {
        let mut h = HeaderMap::new();
        if let Some(o) = origin {
            h.append(ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        rules
            .check(&h, path, parse_host(host).as_ref(), secure)
            .is_ok()
    }

    #[test]
    fn same_origin_compares_scheme_host_and_port() {
        let r = rules(&[], false, false);
        assert!(check(&r, Some("http://chat.test"), "chat.test", None));
        assert!(check(&r, Some("http://chat.test:80"), "chat.test", None));
        assert!(check(&r, Some("https://chat.test"), "chat.test", None));
        assert!(check(
            &r,
            Some("http://CHAT.test:8000"),
            "chat.test:8000",
            None
        ));
        assert!(!check(
            &r,
            Some("http://chat.test:8001"),
            "chat.test:8000",
            None
        ));
        assert!(!check(&r, Some("http://chat.test:8000"), "chat.test", None));
        assert!(!check(&r, Some("http://evil.test"), "chat.test", None));
        assert!(!check(
            &r,
            Some("http://chat.test.evil.test"),
            "chat.test",
            None
        ));
        // A known scheme must match.
        assert!(check(
            &r,
            Some("https://chat.test"),
            "chat.test",
            Some(true)
        ));
        assert!(!check(
            &r,
            Some("http://chat.test"),
            "chat.test",
            Some(true)
        ));
        assert!(!check(
            &r,
            Some("https://chat.test"),
            "chat.test",
            Some(false)
        ));
        // Opaque, malformed and repeated origins.
        assert!(!check(&r, Some("null"), "chat.test", None));
        assert!(!check(&r, Some("http://chat.test/path"), "chat.test", None));
        // No Origin passes by default; localhost only when asked.
        assert!(check(&r, None, "chat.test", None));
        assert!(!check(&r, Some("http://localhost:3000"), "chat.test", None));
        assert!(check(
            &rules(&[], true, false),
            Some("http://localhost:3000"),
            "chat.test",
            None
        ));
        assert!(!check(&rules(&[], false, true), None, "chat.test", None));
        // Public paths skip the check, and only they do.
        assert!(check_path(
            &r,
            Some("http://evil.test"),
            "chat.test",
            None,
            "/ws/public/feed/"
        ));
        assert!(!check_path(
            &r,
            Some("http://evil.test"),
            "chat.test",
            None,
            "/ws/publicx"
        ));
    }

    #[test]
    fn allowed_origin_patterns() {
        let r = rules(
            &[
                "https://app.test",
                "https://*.example.com",
                "*.partner.test",
                "other.test",
            ],
            false,
            false,
        );
        assert!(check(&r, Some("https://app.test"), "chat.test", None));
        assert!(check(&r, Some("https://app.test:443"), "chat.test", None));
        assert!(!check(&r, Some("http://app.test"), "chat.test", None));
        assert!(!check(&r, Some("https://app.test:8443"), "chat.test", None));
        assert!(check(&r, Some("https://a.example.com"), "chat.test", None));
        assert!(check(
            &r,
            Some("https://a.b.example.com"),
            "chat.test",
            None
        ));
        assert!(!check(&r, Some("https://example.com"), "chat.test", None));
        assert!(!check(
            &r,
            Some("https://badexample.com"),
            "chat.test",
            None
        ));
        assert!(!check(&r, Some("http://a.example.com"), "chat.test", None));
        assert!(check(
            &r,
            Some("http://x.partner.test:9000"),
            "chat.test",
            None
        ));
        assert!(!check(&r, Some("http://partner.test"), "chat.test", None));
        assert!(check(&r, Some("https://other.test:1"), "chat.test", None));
        let any = rules(&["*"], false, false);
        assert!(check(&any, Some("http://evil.test"), "chat.test", None));
        assert!(check(&any, Some("null"), "chat.test", None));
        for bad in ["https://", "ftp//x", "https://a.test/path", "a.test:80"] {
            let policy = OriginPolicy {
                allowed: vec![bad.into()],
                ..OriginPolicy::default()
            };
            assert!(OriginRules::new(&policy).is_err(), "{bad:?}");
        }
    }

    fn wildcard_match(glob: &str, path: &str) -> bool {
        path_glob(glob).unwrap().compile_matcher().is_match(path)
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("/ws/public/*", "/ws/public/a/b"));
        assert!(wildcard_match("/ws/*/feed", "/ws/x/y/feed"));
        assert!(wildcard_match("/exact", "/exact"));
        assert!(!wildcard_match("/exact", "/exact/"));
        assert!(!wildcard_match("/a*b*c", "/abx"));
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("/a/**/b", "/a/x/b"));
        assert!(!wildcard_match("/a/**/b", "/a/b"));
        // Only `*` is special.
        assert!(wildcard_match("/q?[x]{a,b}\\", "/q?[x]{a,b}\\"));
        assert!(!wildcard_match("/q?", "/qa"));
        assert!(!wildcard_match("/[ab]", "/a"));
        assert!(wildcard_match("/f*", "/f\nx"));
    }

    #[test]
    fn client_slots_count_and_release() {
        let slots = Arc::new(ClientSlots::new(2, false));
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let a = slots.acquire(ip).unwrap();
        let b = slots.acquire(ip).unwrap();
        assert!(a.is_some() && b.is_some());
        assert!(slots.acquire(ip).is_err());
        assert!(
            slots
                .acquire("203.0.113.8".parse().unwrap())
                .unwrap()
                .is_some()
        );
        // Loopback is not counted unless asked.
        assert!(
            slots
                .acquire("127.0.0.1".parse().unwrap())
                .unwrap()
                .is_none()
        );
        drop(a);
        let c = slots.acquire(ip).unwrap();
        assert!(c.is_some());
        drop((b, c));
        assert_eq!(slots.tracked(), 0, "released addresses are forgotten");
        let strict = Arc::new(ClientSlots::new(1, true));
        let held = strict.acquire("127.0.0.1".parse().unwrap()).unwrap();
        assert!(held.is_some());
        assert!(strict.acquire("127.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn limiter_passes_bursts_then_delays_then_closes() {
        let start = Instant::now();
        let limit = FrameRateLimit {
            messages_per_second: 10.0,
            message_burst: 3.0,
            bytes_per_second: 0.0,
            byte_burst: 0.0,
            close_after: Duration::from_secs(1),
        };
        let mut l = FrameLimiter::new(&limit, start).unwrap();
        for _ in 0..3 {
            assert_eq!(l.admit(start, 10), Admit::Now);
        }
        // The fourth waits a tenth of a second; after waiting it, the next one waits again.
        let mut now = start;
        let mut delayed = 0;
        loop {
            match l.admit(now, 10) {
                Admit::After(wait) => {
                    assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
                    now += wait;
                    delayed += 1;
                }
                Admit::Close => break,
                Admit::Now => panic!("a flood passed at once"),
            }
        }
        // A second of sustained excess at 10/s: about ten frames were delayed, then the close.
        assert!((9..=11).contains(&delayed), "{delayed}");
        // A quiet spell refills the bucket and forgives.
        let later = now + Duration::from_secs(5);
        assert_eq!(l.admit(later, 10), Admit::Now);
        assert!(
            FrameLimiter::new(
                &FrameRateLimit {
                    messages_per_second: 0.0,
                    bytes_per_second: 0.0,
                    ..limit
                },
                start
            )
            .is_none()
        );
    }

    #[test]
    fn byte_limit_charges_payload_and_caps_big_frames() {
        let start = Instant::now();
        let limit = FrameRateLimit {
            messages_per_second: 0.0,
            message_burst: 0.0,
            bytes_per_second: 1000.0,
            byte_burst: 2000.0,
            close_after: Duration::from_secs(60),
        };
        let mut l = FrameLimiter::new(&limit, start).unwrap();
        assert_eq!(l.admit(start, 1500), Admit::Now);
        assert_eq!(
            l.admit(start, 1000),
            Admit::After(Duration::from_millis(500))
        );
        // A frame larger than the burst costs the burst, so it can pass after a refill.
        let later = start + Duration::from_secs(10);
        assert_eq!(l.admit(later, 1 << 20), Admit::Now);
    }
}

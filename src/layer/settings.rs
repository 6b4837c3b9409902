//! Channel-layer settings: one struct that the CLI fills from flags and environment, plus the
//! compiled per-channel capacity rules (globs, first match wins, as asgiref's `channel_capacity`),
//! and the one definition of what a glob means, shared by every option that takes globs
//! (capacity, durable channels, the worker's channel filters, the server's authenticated paths).

use std::time::Duration;

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};

use super::LayerError;

/// Capacity of a channel no rule names (100, as channels_redis).
pub const DEFAULT_CAPACITY: usize = 100;

/// Capacity of the channels an interface server's connections share (10,000): room for one
/// in-flight message of every connection a server accepts by default (`--max-connections`
/// 10,000). With channels_redis's 100, 1,000 sockets with one frame each in flight filled
/// `websocket.receive` ten times over, and sockets were closed 1013 under a load the workers
/// kept up with.
pub const DEFAULT_SERVER_CAPACITY: usize = 10_000;

/// The channels every connection of an interface server feeds (one shared queue for all of them).
pub const SERVER_FED_CHANNELS: [&str; 5] = [
    "http.request",
    "http.disconnect",
    "websocket.connect",
    "websocket.receive",
    "websocket.disconnect",
];

/// Everything a channel layer can be tuned by. [`Default`] gives the ASGI 1.0 defaults.
#[derive(Debug, Clone)]
pub struct LayerSettings {
    /// Key prefix in Redis (`asgi`, as channels_redis); also namespaces the in-memory layer's inbox
    /// names.
    pub prefix: String,
    /// A message older than this is never delivered (60 s).
    pub expiry: Duration,
    /// Group membership lapses this long after the last `group_add` (86400 s).
    pub group_expiry: Duration,
    /// Messages a channel holds before `send` fails with `ChannelFull` (100), unless a rule below
    /// or `server_capacity` applies.
    pub capacity: usize,
    /// Capacity of the [`SERVER_FED_CHANNELS`] and of process inboxes (`…!`, where every
    /// socket's replies queue), which all connections of a server share ([`DEFAULT_SERVER_CAPACITY`]).
    /// A `channel_capacity` glob naming one of them wins.
    pub server_capacity: usize,
    /// Per-channel capacity overrides: `(glob, capacity)`, first match wins (`*`, `?`, `[...]`).
    pub channel_capacity: Vec<(String, usize)>,
    /// Messages buffered per local (`!`) channel in a process inbox before newer ones are dropped
    /// and counted (defaults to `capacity`).
    pub local_buffer: Option<usize>,
    /// Messages popped at once from a process inbox (512). One loop pops for every socket of an
    /// interface server, one round trip at a time, on a runtime busy with those sockets: small
    /// pops leave the replies of many busy sockets queued in Redis behind them, and cost Redis
    /// more per message. A pop can hold more messages for
    /// one socket than its buffer: the inbox then lets the readers run before it drops any.
    pub inbox_batch: usize,
    /// Bound on every non-blocking Redis command, so that sends during an outage fail fast (2 s).
    pub command_timeout: Duration,
    /// How long an interface server's lease on its memberships outlives its last renewal (it
    /// renews every second): after a `kill -9`, its memberships and inbox are removed by a live
    /// process within this plus a second (15 s).
    pub lease_ttl: Duration,
    /// What an interface server does when it finds that Redis lost its state.
    pub on_layer_loss: LayerLossPolicy,
    /// channels_redis' `symmetric_encryption_keys`: when non-empty, every message is stored in
    /// Redis as a Fernet token (the first key encrypts, all decrypt); see [`super::crypto`].
    /// The in-memory layer never leaves the process and ignores them.
    pub symmetric_encryption_keys: Vec<String>,
    /// Globs of durable channels (`--durable-channels`): sends to them go to a Redis stream and
    /// are kept until a worker ran them successfully (see `switchyard::jobs`). Redis only.
    pub durable_channels: Vec<String>,
}

/// What an interface server does when Redis lost its state (restart without persistence,
/// `FLUSHALL`, failover to a replica that missed writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerLossPolicy {
    /// Put every membership of its sockets back (they keep receiving broadcasts).
    #[default]
    Resubscribe,
    /// Close every socket with 1012 ("service restart") so clients reconnect and rebuild state
    /// the server cannot (for apps that keep more than group memberships in the layer).
    Close,
}

impl std::str::FromStr for LayerLossPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "resubscribe" => Ok(LayerLossPolicy::Resubscribe),
            "close" => Ok(LayerLossPolicy::Close),
            other => Err(format!(
                "unknown layer-loss policy {other:?}: use resubscribe or close"
            )),
        }
    }
}

impl Default for LayerSettings {
    fn default() -> Self {
        LayerSettings {
            prefix: "asgi".to_owned(),
            expiry: Duration::from_secs(60),
            group_expiry: Duration::from_secs(86_400),
            capacity: DEFAULT_CAPACITY,
            server_capacity: DEFAULT_SERVER_CAPACITY,
            channel_capacity: Vec::new(),
            local_buffer: None,
            inbox_batch: 512,
            command_timeout: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(15),
            on_layer_loss: LayerLossPolicy::Resubscribe,
            symmetric_encryption_keys: Vec::new(),
            durable_channels: Vec::new(),
        }
    }
}

impl LayerSettings {
    /// Checks the numbers and compiles the capacity globs.
    pub(crate) fn compile(&self) -> Result<CapacityRules, LayerError> {
        if self.capacity == 0 || self.server_capacity == 0 {
            return Err(LayerError::Config("capacity must be at least 1".into()));
        }
        if self.expiry.is_zero() {
            return Err(LayerError::Config("expiry must be positive".into()));
        }
        if self.group_expiry.is_zero() {
            return Err(LayerError::Config("group expiry must be positive".into()));
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return Err(LayerError::Config(
                "lease ttl must be at least 2 s (leases are renewed every second)".into(),
            ));
        }
        if self.inbox_batch == 0 {
            return Err(LayerError::Config("inbox batch must be at least 1".into()));
        }
        if self.prefix.is_empty() || self.prefix.contains(['*', '?', '[', ']']) {
            return Err(LayerError::Config(format!(
                "prefix {:?} must be non-empty and free of glob characters",
                self.prefix
            )));
        }
        let mut rules = Vec::with_capacity(self.channel_capacity.len());
        for (pattern, cap) in &self.channel_capacity {
            if *cap == 0 {
                return Err(LayerError::Config(format!(
                    "capacity for {pattern:?} must be at least 1"
                )));
            }
            let matcher = glob(pattern)
                .map_err(|e| LayerError::Config(format!("invalid capacity glob {pattern:?}: {e}")))?
                .compile_matcher();
            rules.push((matcher, *cap));
        }
        Ok(CapacityRules {
            default: self.capacity,
            server: self.server_capacity,
            rules,
        })
    }

    /// The durable-channel globs, compiled.
    pub(crate) fn durable_rules(&self) -> Result<GlobSet, LayerError> {
        if let Some(glob) = self
            .durable_channels
            .iter()
            .find(|g| g.contains(['!', ':']))
        {
            return Err(LayerError::Config(format!(
                "durable channel glob {glob:?}: process-local (!) channels cannot be durable"
            )));
        }
        glob_set(&self.durable_channels)
            .map_err(|e| LayerError::Config(format!("invalid durable channel glob: {e}")))
    }

    /// The per-local-channel buffer size.
    pub fn local_buffer(&self) -> usize {
        self.local_buffer.unwrap_or(self.capacity).max(1)
    }
}

/// Parses `glob=N,glob=N` (the `--channel-capacity` flag).
pub fn parse_channel_capacity(spec: &str) -> Result<Vec<(String, usize)>, LayerError> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (glob, n) = item.rsplit_once('=').ok_or_else(|| {
                LayerError::Config(format!(
                    "channel capacity {item:?} must look like GLOB=NUMBER"
                ))
            })?;
            let n: usize = n.trim().parse().map_err(|_| {
                LayerError::Config(format!("channel capacity {item:?}: {n:?} is not a number"))
            })?;
            Ok((glob.trim().to_owned(), n))
        })
        .collect()
}

/// An fnmatch-style glob, as asgiref and Python's `fnmatch` read one: `*` matches any run of
/// characters (`/` and `.` included; `**` is the same as `*`), `?` any one character, `[abc]`,
/// `[a-z]` and `[!abc]` (or `[^abc]`) one character of (not of) a set; an unclosed `[` and a
/// backslash are themselves. Beyond fnmatch, `{a,b}` matches either alternative. Matching is on
/// the bytes of the name, so `?` and a set stand for one byte: outside ASCII, use `*`.
pub(crate) fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    // globset reads `**` next to a `/` as "any number of path segments", which may be none:
    // runs of stars are folded into one so that `/a/**/b` keeps needing a segment, as fnmatch.
    let mut folded = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        if !(c == '*' && folded.ends_with('*')) {
            folded.push(c);
        }
    }
    GlobBuilder::new(&folded)
        .literal_separator(false)
        .backslash_escape(false)
        .allow_unclosed_class(true)
        .build()
}

/// Several [`glob`]s compiled into one set (matches when any does).
pub(crate) fn glob_set<S: AsRef<str>>(patterns: &[S]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(glob(pattern.as_ref())?);
    }
    set.build()
}

/// True when `name` matches the fnmatch-style `glob` (see [`LayerSettings::channel_capacity`]
/// for the syntax); an invalid glob matches nothing. Compiles the glob on every call: for a glob
/// checked against many names, the worker and the layer compile theirs once.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    glob(pattern).is_ok_and(|g| g.compile_matcher().is_match(name))
}

/// Compiled capacity rules.
#[derive(Debug, Clone)]
pub(crate) struct CapacityRules {
    default: usize,
    server: usize,
    rules: Vec<(GlobMatcher, usize)>,
}

impl CapacityRules {
    /// Capacity of `channel` (matched on the full name, as asgiref does): the first rule that
    /// matches, else the server capacity for a channel every connection shares, else the default.
    pub(crate) fn capacity(&self, channel: &str) -> usize {
        match self.rules.iter().find(|(glob, _)| glob.is_match(channel)) {
            Some((_, cap)) => *cap,
            None if is_server_fed(channel) => self.server,
            None => self.default,
        }
    }
}

/// True for the channels all connections of a server share: the server-fed ones, process
/// inboxes (a `!` channel's capacity counts its whole inbox) and connection owners' channels
/// (each takes the frames of every socket its worker accepted).
fn is_server_fed(channel: &str) -> bool {
    channel.contains('!')
        || SERVER_FED_CHANNELS.contains(&channel)
        || super::owner::is_owner_channel(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_first_match_wins() {
        let s = LayerSettings {
            channel_capacity: vec![
                ("http.*".into(), 5),
                ("http.request".into(), 9),
                ("ws.[!a]x".into(), 3),
            ],
            ..Default::default()
        };
        let rules = s.compile().expect("compiles");
        assert_eq!(rules.capacity("http.request"), 5);
        assert_eq!(rules.capacity("websocket.receive"), DEFAULT_SERVER_CAPACITY);
        assert_eq!(rules.capacity("ws.bx"), 3);
        assert_eq!(rules.capacity("ws.ax"), 100);
        // Shared by every connection: the server capacity, unless a rule names them.
        assert_eq!(
            rules.capacity("switchyard.response.ab!cd"),
            DEFAULT_SERVER_CAPACITY
        );
        assert_eq!(rules.capacity("http.request.body?xy"), 5);
        assert_eq!(rules.capacity("jobs.digest"), 100);
        assert!(glob_matches("a?c", "abc"));
        assert!(!glob_matches("a.c", "abc"));
    }

    #[test]
    fn globs_read_as_fnmatch() {
        for (glob, name, matches) in [
            ("*", "", true),
            ("http.*", "http.request", true),
            ("http.*", "http", false),
            ("*.receive", "websocket.receive", true),
            ("chat.?", "chat.a", true),
            ("chat.?", "chat.ab", false),
            ("chat.[ab]", "chat.b", true),
            ("chat.[a-c]x", "chat.cx", true),
            ("chat.[!a]", "chat.a", false),
            ("chat.[^a]", "chat.b", true),
            ("chat.[]]", "chat.]", true),
            // An unclosed set and a backslash are literal.
            ("chat.[ab", "chat.[ab", true),
            ("chat.[ab", "chat.a", false),
            (r"a\b", r"a\b", true),
            (r"a\*", "a*", false),
            // Dots, slashes and newlines are ordinary characters to `*`.
            ("a*z", "a.b/c\nz", true),
            ("/p/*", "/p/a\nb", true),
            // Runs of stars are one star: a segment is still needed between the slashes.
            ("/a/**/b", "/a/b", false),
            ("/a/**/b", "/a/x/y/b", true),
            ("a**b", "ab", true),
            ("jobs.*", "Jobs.x", false),
            ("{chat,jobs}.*", "jobs.x", true),
        ] {
            assert_eq!(glob_matches(glob, name), matches, "{glob:?} on {name:?}");
        }
        // Invalid globs are refused where they are configured.
        let bad = LayerSettings {
            channel_capacity: vec![("chat.{a".into(), 5)],
            ..Default::default()
        };
        assert!(bad.compile().is_err());
        let durable = LayerSettings {
            durable_channels: vec!["jobs.*".into(), "mail.[^x]".into()],
            ..Default::default()
        };
        let set = durable.durable_rules().expect("compiles");
        assert!(set.is_match("jobs.a") && set.is_match("mail.y") && !set.is_match("mail.x"));
        let local = LayerSettings {
            durable_channels: vec!["jobs!*".into()],
            ..Default::default()
        };
        assert!(local.durable_rules().is_err());
    }

    #[test]
    fn parses_capacity_flag_and_refuses_nonsense() {
        assert_eq!(
            parse_channel_capacity("http.*=50, tasks=1000").expect("parses"),
            vec![("http.*".to_owned(), 50), ("tasks".to_owned(), 1000)]
        );
        assert!(parse_channel_capacity("http.*").is_err());
        assert!(parse_channel_capacity("x=ten").is_err());
        let zero = LayerSettings {
            capacity: 0,
            ..Default::default()
        };
        assert!(zero.compile().is_err());
        let zero = LayerSettings {
            server_capacity: 0,
            ..Default::default()
        };
        assert!(zero.compile().is_err());
    }
}

//! The `switchyard` command line: flags and environment for every subcommand, logging set-up,
//! and the small commands that only talk to the channel layer (`send`, `flush`, `stats`).
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration, 3 channel layer
//! unreachable or of a kind it cannot use (a Redis Cluster node), 4 the channel was full.

use std::io::Write;
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::Duration;

use crate::layer::{
    DEFAULT_CAPACITY, DEFAULT_SERVER_CAPACITY, Layer, LayerError, LayerLossPolicy, LayerSettings,
    parse_channel_capacity,
};
use anyhow::Context;
use clap::{Args, ValueEnum};

/// Exit code: bad usage or configuration.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the channel layer could not be reached, or is a deployment it cannot use.
pub const EXIT_UNAVAILABLE: u8 = 3;
/// Exit code: the channel was full.
pub const EXIT_FULL: u8 = 4;

/// A command line or configuration that cannot work (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The layer's own defaults, which the layer flags' defaults are read from.
static LAYER_DEFAULTS: LazyLock<LayerSettings> = LazyLock::new(LayerSettings::default);

fn layer_default() -> &'static LayerSettings {
    &LAYER_DEFAULTS
}

/// Where the channel layer is and how it behaves (shared by every subcommand).
#[derive(Debug, Clone, Args)]
pub struct LayerArgs {
    /// Channel layer URL: memory://, redis://host:port/db, rediss://…, unix:///path, several
    /// comma-separated Redis URLs (shards), redis+sentinel://host:port,…/<master>[/<db>] or
    /// redis+cluster://host:port,… . Falls back to $REDIS_URL, then to the command's default
    /// (redis://127.0.0.1:6379/0; memory:// for `dev`).
    #[arg(long, env = "SWITCHYARD_LAYER")]
    pub layer: Option<String>,
    /// Key prefix in Redis (channels_redis' default is `asgi`; share it to talk to Django).
    #[arg(long, env = "SWITCHYARD_PREFIX", default_value_t = layer_default().prefix.clone())]
    pub prefix: String,
    /// Seconds a message may wait in a channel before it is dropped unread.
    #[arg(long, env = "SWITCHYARD_EXPIRY", default_value_t = layer_default().expiry.as_secs_f64())]
    pub expiry: f64,
    /// Seconds a group membership lasts after its last group_add (also the WebSocket lifetime).
    #[arg(long, env = "SWITCHYARD_GROUP_EXPIRY", default_value_t = layer_default().group_expiry.as_secs())]
    pub group_expiry: u64,
    /// Messages a channel holds before sends fail with ChannelFull (channels_redis's 100), except
    /// the channels all of a server's connections share (see --server-capacity).
    #[arg(long, env = "SWITCHYARD_CAPACITY", default_value_t = DEFAULT_CAPACITY)]
    pub capacity: usize,
    /// Capacity of the channels all of a server's connections share: http.request,
    /// websocket.connect/receive/disconnect, http.disconnect and each process inbox (…!):
    /// room for one in-flight message of every connection. A --channel-capacity glob wins.
    #[arg(long, env = "SWITCHYARD_SERVER_CAPACITY", default_value_t = DEFAULT_SERVER_CAPACITY)]
    pub server_capacity: usize,
    /// Per-channel capacities as GLOB=N pairs, comma-separated, first match wins
    /// (e.g. "http.request=500,tasks.*=10000").
    #[arg(long, env = "SWITCHYARD_CHANNEL_CAPACITY")]
    pub channel_capacity: Option<String>,
    /// What an interface server does when Redis lost its state (restart without persistence,
    /// FLUSHALL, failover to a stale replica): `resubscribe` puts its sockets' group
    /// memberships back; `close` closes every socket with 1012 so clients reconnect.
    #[arg(long, env = "SWITCHYARD_ON_LAYER_LOSS", default_value = "resubscribe")]
    pub on_layer_loss: LayerLossPolicy,
    /// Seconds an interface server's lease outlives its last renewal (renewed every second):
    /// after a crash, its memberships and inbox are removed within this plus a second.
    #[arg(long, env = "SWITCHYARD_LEASE_TTL", default_value_t = layer_default().lease_ttl.as_secs_f64())]
    pub lease_ttl: f64,
    /// channels_redis' `symmetric_encryption_keys`: encrypt every message stored in Redis (Fernet).
    /// Repeat the flag (or comma-separate in the variable) to rotate keys: the first encrypts,
    /// all decrypt. Every process sharing the Redis (Django included) needs the same keys.
    #[arg(
        long = "symmetric-encryption-key",
        env = "SWITCHYARD_SYMMETRIC_ENCRYPTION_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub symmetric_encryption_keys: Vec<String>,
    /// Durable channels: globs, comma-separated (e.g. "jobs.*"). Their messages are kept in a
    /// Redis stream until a worker ran them successfully, retried on failure and dead-lettered
    /// after the last attempt (Redis only; see "Background jobs" in the README).
    #[arg(long, env = "SWITCHYARD_DURABLE_CHANNELS")]
    pub durable_channels: Option<String>,
}

impl LayerArgs {
    /// The URL to use: the flag or $SWITCHYARD_LAYER, else $REDIS_URL, else `default`.
    pub fn url(&self, default: &str) -> String {
        self.layer
            .clone()
            .or_else(|| std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| default.to_owned())
    }

    /// The layer settings these flags describe.
    pub fn settings(&self) -> Result<LayerSettings, LayerError> {
        if !(self.expiry.is_finite() && self.expiry > 0.0 && self.expiry <= 315_360_000.0) {
            return Err(LayerError::Config(format!(
                "--expiry must be a positive number of seconds, got {}",
                self.expiry
            )));
        }
        Ok(LayerSettings {
            prefix: self.prefix.clone(),
            expiry: Duration::from_secs_f64(self.expiry),
            group_expiry: Duration::from_secs(self.group_expiry),
            capacity: self.capacity,
            server_capacity: self.server_capacity,
            channel_capacity: match &self.channel_capacity {
                Some(spec) => parse_channel_capacity(spec)?,
                None => Vec::new(),
            },
            on_layer_loss: self.on_layer_loss,
            lease_ttl: if self.lease_ttl.is_finite() && (2.0..=86_400.0).contains(&self.lease_ttl) {
                Duration::from_secs_f64(self.lease_ttl)
            } else {
                return Err(LayerError::Config(format!(
                    "--lease-ttl must be between 2 and 86400 seconds, got {}",
                    self.lease_ttl
                )));
            },
            symmetric_encryption_keys: self.symmetric_encryption_keys.clone(),
            durable_channels: self
                .durable_channels
                .iter()
                .flat_map(|spec| spec.split(','))
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect(),
            ..LayerSettings::default()
        })
    }

    /// Opens the layer (checking Redis answers).
    pub async fn open(&self, default_url: &str) -> Result<Layer, LayerError> {
        let url = self.url(default_url);
        let layer = Layer::from_url(&url, self.settings()?).await?;
        tracing::debug!(layer = %layer.describe(), "channel layer ready");
        Ok(layer)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging flags (global).
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. "info,crate::access=warn"); $RUST_LOG wins.
    #[arg(long, env = "SWITCHYARD_LOG", default_value = "info", global = true)]
    pub log: String,
}

impl LogArgs {
    /// Installs the global subscriber (logs go to stderr).
    pub fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .or_else(|_| tracing_subscriber::EnvFilter::try_new(&self.log))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        match self.log_format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().flatten_event(true).init(),
        }
    }
}

/// `switchyard send`
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub layer: LayerArgs,
    /// Send to every member of this group instead of to a channel.
    #[arg(long)]
    pub group: bool,
    /// Durable channels: drop this send if one with the same key reached the channel in the
    /// last 24 hours.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Durable channels: seconds after which the job is dead-lettered instead of started.
    #[arg(long)]
    pub deadline: Option<f64>,
    /// The channel (or group, with --group) to send to.
    pub target: String,
    /// The message: a JSON object. Byte strings are written {"$bytes": "<base64>"}.
    pub message: String,
}

/// `switchyard flush`
#[derive(Debug, Clone, Args)]
pub struct FlushArgs {
    #[command(flatten)]
    pub layer: LayerArgs,
}

/// `switchyard stats`
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub layer: LayerArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The exit code for a layer error.
pub fn exit_code_for(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<UsageError>().is_some() {
        return ExitCode::from(EXIT_USAGE);
    }
    match e.downcast_ref::<LayerError>() {
        Some(LayerError::Unavailable(_) | LayerError::Unsupported(_)) => {
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Some(LayerError::ChannelFull { .. }) => ExitCode::from(EXIT_FULL),
        Some(LayerError::InvalidName(_) | LayerError::Config(_) | LayerError::Codec(_)) => {
            ExitCode::from(EXIT_USAGE)
        }
        _ => ExitCode::FAILURE,
    }
}

/// Sends one message from the command line.
pub async fn send(args: SendArgs) -> anyhow::Result<()> {
    let payload = crate::codec::json_to_msgpack(&args.message)
        .map_err(LayerError::Codec)
        .with_context(|| format!("the message must be a JSON object, got {:?}", args.message))?;
    let layer = args.layer.open("redis://127.0.0.1:6379/0").await?;
    if args.group {
        let report = layer.group_send_encoded(&args.target, &payload).await?;
        println!(
            "sent to group {} ({} members, {} full)",
            args.target, report.members, report.full
        );
    } else if args.idempotency_key.is_some() || args.deadline.is_some() {
        let deadline = match args.deadline {
            Some(d) if d.is_finite() && d > 0.0 => Some(Duration::from_secs_f64(d)),
            Some(d) => {
                return Err(LayerError::Config(format!(
                    "--deadline must be a positive number of seconds, got {d}"
                ))
                .into());
            }
            None => None,
        };
        let options = crate::jobs::JobOptions {
            idempotency_key: args.idempotency_key.clone(),
            deadline,
            ..Default::default()
        };
        match layer.send_job(&args.target, &payload, &options).await? {
            crate::jobs::JobSent::Queued(id) => {
                println!("sent to {} (job {id})", args.target);
            }
            crate::jobs::JobSent::Duplicate(id) => println!(
                "not sent: duplicate of job {id} on {} (same idempotency key)",
                args.target
            ),
        }
    } else {
        layer.send_encoded(&args.target, &payload).await?;
        println!("sent to {}", args.target);
    }
    Ok(())
}

/// Empties the channel layer.
pub async fn flush(args: FlushArgs) -> anyhow::Result<()> {
    let layer = args.layer.open("redis://127.0.0.1:6379/0").await?;
    layer.flush().await?;
    println!(
        "flushed {} (prefix {:?})",
        layer.describe(),
        layer.settings().prefix
    );
    Ok(())
}

/// Prints channel depths, inbox depths and group sizes.
pub async fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let layer = args.layer.open("redis://127.0.0.1:6379/0").await?;
    let overview = layer.overview().await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&overview)?)?;
        return Ok(());
    }
    let width = overview
        .channels
        .iter()
        .map(|c| c.name.len())
        .chain(overview.groups.iter().map(|c| c.name.len()))
        .chain([7])
        .max()
        .unwrap_or(7);
    writeln!(out, "{:<width$}  {:>8}  KIND", "NAME", "COUNT")?;
    for c in &overview.channels {
        let kind = if c.name.ends_with('!') {
            "inbox"
        } else {
            "channel"
        };
        writeln!(out, "{:<width$}  {:>8}  {kind}", c.name, c.count)?;
    }
    for c in &overview.groups {
        writeln!(out, "{:<width$}  {:>8}  group", c.name, c.count)?;
    }
    if overview.channels.is_empty() && overview.groups.is_empty() {
        writeln!(
            out,
            "(no channels or groups under prefix {:?})",
            layer.settings().prefix
        )?;
    }
    Ok(())
}

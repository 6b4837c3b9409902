//! The long-running roles of an app's binary: `serve` (the interface server), `worker` (the routed
//! consumers) and `dev` (both in one process on the in-memory layer), with their flags, signal
//! handling (SIGTERM/SIGINT stop gracefully) and Prometheus metrics on `--metrics-bind`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::jobs::JobMetrics;
use crate::layer::Layer;
use crate::prometheus;
use crate::server::{
    FrameRateLimit, OriginPolicy, Server, ServerConfig, ServerMetrics, SlowClientPolicy,
};
use anyhow::Context;
use clap::{Args, ValueEnum};

#[cfg(feature = "django")]
use crate::django::{DjangoSessionConfig, DjangoSessions};
use crate::worker::{self, Worker, WorkerMetrics};
use tokio_util::sync::CancellationToken;

use super::App;
use super::cli::LayerArgs;

/// The server's own defaults: every `serve`/`dev` flag's default is read from here, so the
/// library and the command line cannot drift apart.
static SERVER_DEFAULTS: LazyLock<ServerConfig> = LazyLock::new(ServerConfig::default);

fn server_default() -> &'static ServerConfig {
    &SERVER_DEFAULTS
}

fn rate_default() -> FrameRateLimit {
    server_default().ws_rate_limit.unwrap_or_default()
}

/// Default layer for `serve` and `worker`.
pub const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379/0";

/// The commands, as far as their default runtime threads go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `serve`: every socket of the process on one runtime.
    Serve,
    /// `dev`: server and workers in one process.
    Dev,
    /// `worker`.
    Worker,
    /// The small commands and `bench` (a multi-thread runtime, as before).
    Tool,
}

/// Machines with at most this many CPUs run `serve` and `dev` on one runtime thread by default.
const SHARED_CORES: usize = 2;

/// Default runtime threads of `role` on a machine with `cpus` CPUs (0 = one per CPU).
///
/// A worker's work is Redis round trips: one thread per process carries as much as two and
/// wakes no other thread per message, and more workers are more processes (runworker's way).
/// `serve` holds every socket of its process, so on a bigger machine it gets every core; on
/// 2 cores shared with Redis and the workers, a second thread per process only adds
/// cross-thread wake-ups (BENCHMARKS.md compares these defaults with one thread per CPU).
pub fn default_threads(role: Role, cpus: usize) -> usize {
    match role {
        Role::Worker => 1,
        Role::Serve | Role::Dev if cpus <= SHARED_CORES => 1,
        Role::Serve | Role::Dev | Role::Tool => 0,
    }
}

/// What to do with a client too slow to read its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlowClient {
    /// Drop the messages that do not fit; keep the socket.
    Drop,
    /// Close the socket with 1013 so the client reconnects and resynchronises.
    Close,
}

impl From<SlowClientPolicy> for SlowClient {
    fn from(policy: SlowClientPolicy) -> Self {
        match policy {
            SlowClientPolicy::Drop => SlowClient::Drop,
            SlowClientPolicy::Close1013 => SlowClient::Close,
        }
    }
}

/// Interface-server flags (shared by `serve` and `dev`).
#[derive(Debug, Clone, Args)]
pub struct ServerFlags {
    /// Address to listen on.
    #[arg(long, env = "SWITCHYARD_BIND", default_value_t = server_default().bind.ip())]
    pub bind: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = server_default().bind.port())]
    pub port: u16,
    /// ASGI root_path (SCRIPT_NAME) put into every request, for mounting under a prefix.
    #[arg(long, env = "SWITCHYARD_ROOT_PATH", default_value_t = server_default().root_path.clone())]
    pub root_path: String,
    /// Seconds an HTTP request waits for a worker's response before 504.
    #[arg(long, default_value_t = server_default().http_timeout.as_secs_f64())]
    pub http_timeout: f64,
    /// Seconds a WebSocket handshake waits for a worker's accept before 503.
    #[arg(long, default_value_t = server_default().websocket_connect_timeout.as_secs_f64())]
    pub websocket_connect_timeout: f64,
    /// Largest request body in bytes that rides whole in http.request; larger ones are
    /// streamed (see --max-request-body) or get 413.
    #[arg(long, default_value_t = server_default().max_body_size)]
    pub max_body_size: usize,
    /// Hard limit on a request body in bytes: larger gets 413. Bodies over --max-body-size up to
    /// this are streamed to the worker in chunks through the request's body_channel. Default:
    /// --max-body-size (no streaming).
    #[arg(long)]
    pub max_request_body: Option<usize>,
    /// Largest WebSocket message in bytes; larger closes with 1009.
    #[arg(long, default_value_t = server_default().ws_max_message_size)]
    pub ws_max_message_size: usize,
    /// Largest WebSocket frame in bytes; larger closes with 1009.
    #[arg(long, default_value_t = server_default().ws_max_frame_size)]
    pub ws_max_frame_size: usize,
    /// Seconds without client data before a keepalive ping.
    #[arg(long, default_value_t = server_default().ping_interval.as_secs_f64())]
    pub ping_interval: f64,
    /// Seconds a ping may go unanswered before the connection is dropped.
    #[arg(long, default_value_t = server_default().ping_timeout.as_secs_f64())]
    pub ping_timeout: f64,
    /// Close sockets with no frame either way for this many seconds (default: never).
    #[arg(long)]
    pub idle_timeout: Option<f64>,
    /// Close sockets open this many seconds (default: the group expiry, so memberships never
    /// lapse under a live socket).
    #[arg(long)]
    pub websocket_lifetime: Option<f64>,
    /// Open connections allowed; more get 503.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = server_default().max_connections)]
    pub max_connections: usize,
    /// Messages buffered per connection on their way to the socket.
    #[arg(long, default_value_t = server_default().outbound_queue)]
    pub outbound_queue: usize,
    /// Seconds a client's message waits for room in a full server-fed channel (its reading
    /// paused, so TCP pushes back) before the socket is closed 1013 or the request answered 503.
    #[arg(long, env = "SWITCHYARD_BACKPRESSURE_TIMEOUT", default_value_t = server_default().backpressure_timeout.as_secs_f64())]
    pub backpressure_timeout: f64,
    /// What to do when a client reads too slowly for its outbound queue.
    #[arg(long, value_enum, default_value_t = SlowClient::from(server_default().slow_client))]
    pub slow_client: SlowClient,
    /// Trust X-Forwarded-For/-Port/-Proto (only behind a proxy that sets them).
    #[arg(long, env = "SWITCHYARD_PROXY_HEADERS")]
    pub proxy_headers: bool,
    /// WebSocket subprotocols the server may select, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub ws_protocols: Vec<String>,
    /// Seconds in-flight responses and socket closes get on shutdown.
    #[arg(long, default_value_t = server_default().shutdown_grace.as_secs_f64())]
    pub shutdown_grace: f64,
    /// Seconds a socket may keep losing every frame to an unreachable channel layer before it
    /// is closed with 1011 (so its client reconnects).
    #[arg(long, default_value_t = server_default().layer_outage_close.as_secs_f64())]
    pub layer_outage_close: f64,
    /// Hosts requests may name, comma-separated, as Django's ALLOWED_HOSTS: `example.com`,
    /// `.example.com` (and its subdomains), `*` (any). Missing, repeated or malformed Host
    /// headers get 400 whatever this says.
    #[arg(
        long,
        env = "SWITCHYARD_ALLOWED_HOSTS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub allowed_hosts: Vec<String>,
    /// Origins allowed to open WebSockets besides the page's own, comma-separated:
    /// `https://app.example.com`, `https://*.example.com`, `*.example.com`, or `*` (any).
    #[arg(long, env = "SWITCHYARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Refuse WebSocket handshakes that carry no Origin header (non-browser clients).
    #[arg(long, env = "SWITCHYARD_REFUSE_MISSING_ORIGIN")]
    pub refuse_missing_origin: bool,
    /// WebSocket paths any origin may open (public APIs), comma-separated globs (`*` matches
    /// anything, e.g. `/ws/public/*`).
    #[arg(long, env = "SWITCHYARD_PUBLIC_WS_PATHS", value_delimiter = ',')]
    pub public_ws_paths: Vec<String>,
    /// Connections one client address may hold open (0 = no limit); behind --proxy-headers,
    /// WebSockets per forwarded address.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_CONNECTIONS_PER_IP",
        default_value_t = server_default().max_connections_per_ip
    )]
    pub max_connections_per_ip: usize,
    /// WebSocket messages per second a socket may sustain (0 = no limit).
    #[arg(
        long,
        env = "SWITCHYARD_WS_MESSAGES_PER_SECOND",
        default_value_t = rate_default().messages_per_second
    )]
    pub ws_messages_per_second: f64,
    /// WebSocket messages a quiet socket may send at once.
    #[arg(long, env = "SWITCHYARD_WS_MESSAGE_BURST", default_value_t = rate_default().message_burst)]
    pub ws_message_burst: f64,
    /// WebSocket payload bytes per second a socket may sustain (0 = no limit).
    #[arg(
        long,
        env = "SWITCHYARD_WS_BYTES_PER_SECOND",
        default_value_t = rate_default().bytes_per_second
    )]
    pub ws_bytes_per_second: f64,
    /// WebSocket payload bytes a quiet socket may send at once.
    #[arg(long, env = "SWITCHYARD_WS_BYTE_BURST", default_value_t = rate_default().byte_burst)]
    pub ws_byte_burst: f64,
    /// Seconds a socket may stay over its rate limit (its frames delayed) before close 1008.
    #[arg(
        long,
        env = "SWITCHYARD_WS_RATE_LIMIT_CLOSE_AFTER",
        default_value_t = rate_default().close_after.as_secs_f64()
    )]
    pub ws_rate_limit_close_after: f64,
    /// Apply the per-client limits to loopback clients too (off: a local proxy without
    /// --proxy-headers, or a load test, puts every client on one loopback address).
    #[arg(long, env = "SWITCHYARD_LIMIT_LOOPBACK")]
    pub limit_loopback: bool,
    /// Groups one socket may be in (0 = no limit): a worker's group_add past it is discarded
    /// and the socket closed with 1008.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_GROUPS_PER_SOCKET",
        default_value_t = server_default().max_groups_per_socket
    )]
    pub max_groups_per_socket: usize,
    #[command(flatten)]
    pub edge: super::edge::EdgeArgs,
}

/// Longest duration a flag accepts (ten years): beyond it deadlines overflow and mean nothing.
const MAX_FLAG_SECONDS: f64 = 315_360_000.0;

fn secs(name: &str, v: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        v.is_finite() && v > 0.0 && v <= MAX_FLAG_SECONDS,
        "--{name} must be a positive number of seconds up to {MAX_FLAG_SECONDS}, got {v}"
    );
    Ok(Duration::from_secs_f64(v))
}

impl ServerFlags {
    /// The server configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<ServerConfig> {
        Ok(ServerConfig {
            bind: SocketAddr::new(self.bind, self.port),
            root_path: self.root_path.clone(),
            http_timeout: secs("http-timeout", self.http_timeout)?,
            websocket_connect_timeout: secs(
                "websocket-connect-timeout",
                self.websocket_connect_timeout,
            )?,
            max_body_size: self.max_body_size,
            max_request_body: self.max_request_body,
            ws_max_message_size: self.ws_max_message_size,
            ws_max_frame_size: self.ws_max_frame_size.min(self.ws_max_message_size),
            ping_interval: secs("ping-interval", self.ping_interval)?,
            ping_timeout: secs("ping-timeout", self.ping_timeout)?,
            idle_timeout: self
                .idle_timeout
                .map(|v| secs("idle-timeout", v))
                .transpose()?,
            websocket_lifetime: self
                .websocket_lifetime
                .map(|v| secs("websocket-lifetime", v))
                .transpose()?,
            max_connections: self.max_connections,
            outbound_queue: self.outbound_queue.max(1),
            slow_client: match self.slow_client {
                SlowClient::Drop => SlowClientPolicy::Drop,
                SlowClient::Close => SlowClientPolicy::Close1013,
            },
            proxy_headers: self.proxy_headers,
            backpressure_timeout: secs("backpressure-timeout", self.backpressure_timeout)?,
            ws_protocols: self.ws_protocols.clone(),
            shutdown_grace: secs("shutdown-grace", self.shutdown_grace)?,
            layer_outage_close: secs("layer-outage-close", self.layer_outage_close)?,
            allowed_hosts: self.allowed_hosts.clone(),
            origins: OriginPolicy {
                allowed: self.allowed_origins.clone(),
                allow_localhost: false,
                refuse_missing: self.refuse_missing_origin,
                public_paths: self.public_ws_paths.clone(),
            },
            max_connections_per_ip: self.max_connections_per_ip,
            limit_loopback: self.limit_loopback,
            ws_rate_limit: self.rate_limit()?,
            max_groups_per_socket: self.max_groups_per_socket,
            auth: self.edge.auth()?,
            tls: self.edge.tls(),
            ..ServerConfig::default()
        })
    }

    /// The per-socket frame limit; `None` when both rates are 0.
    fn rate_limit(&self) -> anyhow::Result<Option<FrameRateLimit>> {
        let rates = [
            ("ws-messages-per-second", self.ws_messages_per_second),
            ("ws-message-burst", self.ws_message_burst),
            ("ws-bytes-per-second", self.ws_bytes_per_second),
            ("ws-byte-burst", self.ws_byte_burst),
        ];
        for (name, v) in rates {
            anyhow::ensure!(
                v.is_finite() && v >= 0.0,
                "--{name} must be a number >= 0, got {v}"
            );
        }
        if self.ws_messages_per_second == 0.0 && self.ws_bytes_per_second == 0.0 {
            return Ok(None);
        }
        Ok(Some(FrameRateLimit {
            messages_per_second: self.ws_messages_per_second,
            message_burst: self.ws_message_burst,
            bytes_per_second: self.ws_bytes_per_second,
            byte_burst: self.ws_byte_burst,
            close_after: secs("ws-rate-limit-close-after", self.ws_rate_limit_close_after)?,
        }))
    }
}

/// Worker flags (shared by `worker` and `dev`).
#[derive(Debug, Clone, Args)]
pub struct WorkerFlags {
    /// Messages this process runs at once; one receive loop pops at most 64 per batch. A message
    /// holds its slot until its replies are written to Redis, so one process carries at most
    /// this many per Redis round trip or two: too few slots leave busy sockets waiting on round
    /// trips, and strictly ordered connections waiting their turn hold slots too.
    #[arg(long, env = "SWITCHYARD_CONCURRENCY", default_value_t = worker::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// Do not own sockets: strictly ordered sockets this worker accepts keep the shared
    /// channels, and their order is kept in Redis (any worker takes any frame, at a Redis
    /// write per message) instead of by this worker.
    #[arg(long, env = "SWITCHYARD_NO_OWNERS")]
    pub no_owners: bool,
    /// Only listen on channels matching these globs (repeatable, e.g. 'websocket.*').
    #[arg(long = "only-channels", value_name = "GLOB")]
    pub only_channels: Vec<String>,
    /// Do not listen on channels matching these globs (repeatable).
    #[arg(long = "exclude-channels", value_name = "GLOB")]
    pub exclude_channels: Vec<String>,
    /// Django SECRET_KEY: enables HTTP sessions (sessionid cookie → user) for consumers asking
    /// for them.
    #[cfg(feature = "django")]
    #[arg(long, env = "DJANGO_SECRET_KEY", hide_env_values = true)]
    pub django_secret_key: Option<String>,
    /// Redis of the Django session cache (default: the channel layer's first Redis URL).
    #[cfg(feature = "django")]
    #[arg(long, env = "DJANGO_SESSION_REDIS")]
    pub django_session_redis: Option<String>,
    /// Seconds to wait for each chunk of a streamed request body before answering 408.
    #[arg(long, default_value_t = worker::BODY_RECEIVE_TIMEOUT.as_secs_f64())]
    pub body_receive_timeout: f64,
    /// Largest streamed request body in bytes a worker assembles; larger gets 413.
    #[arg(long, default_value_t = worker::MAX_REQUEST_BODY)]
    pub max_assembled_body: usize,
    /// Seconds a consumer may run before it is aborted (and its client answered as on an error).
    #[arg(long, env = "SWITCHYARD_CONSUMER_TIMEOUT", default_value_t = worker::CONSUMER_TIMEOUT.as_secs_f64())]
    pub consumer_timeout: f64,
    /// Seconds a stopping worker waits for the messages in hand before aborting them.
    #[arg(long, default_value_t = worker::STOP_GRACE.as_secs_f64())]
    pub stop_grace: f64,
    /// Seconds a durable job may go without its worker renewing its lease before another
    /// worker runs it (a worker renews the jobs it runs every third of this).
    #[arg(long, env = "SWITCHYARD_JOB_TIMEOUT", default_value_t = crate::jobs::JOB_TIMEOUT.as_secs_f64())]
    pub job_timeout: f64,
}

/// `switchyard serve`
#[derive(Debug, Clone, Args)]
pub struct ServeCommand {
    #[command(flatten)]
    pub layer: LayerArgs,
    #[command(flatten)]
    pub server: ServerFlags,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9100).
    #[arg(long, env = "SWITCHYARD_METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,
}

/// `switchyard worker`
#[derive(Debug, Clone, Args)]
pub struct WorkerCommand {
    #[command(flatten)]
    pub layer: LayerArgs,
    #[command(flatten)]
    pub worker: WorkerFlags,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9101); `/healthz` is served
    /// there too.
    #[arg(long, env = "SWITCHYARD_METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,
    /// Serve `GET /healthz` (200 while the worker receives from a reachable layer, 503 while it
    /// cannot) and `/metrics` on this address, for an orchestrator's probes.
    #[arg(long, env = "SWITCHYARD_HEALTH_BIND")]
    pub health_bind: Option<SocketAddr>,
    /// Bearer token /metrics requires (Authorization: Bearer <token>).
    #[arg(long, env = "SWITCHYARD_OPS_TOKEN", hide_env_values = true)]
    pub ops_token: Option<String>,
}

/// `switchyard dev`
#[derive(Debug, Clone, Args)]
pub struct DevCommand {
    #[command(flatten)]
    pub layer: LayerArgs,
    #[command(flatten)]
    pub server: ServerFlags,
    #[command(flatten)]
    pub worker: WorkerFlags,
    /// Serve Prometheus metrics on this address.
    #[arg(long, env = "SWITCHYARD_METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,
    /// Do not try to open the app's page in a browser.
    #[arg(long)]
    pub no_open: bool,
}

/// Cancels the token on SIGTERM or SIGINT (a second signal exits at once).
pub fn stop_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping gracefully (again to exit now)"),
            _ = term.recv() => tracing::info!("SIGTERM: stopping gracefully (again to exit now)"),
        }
        token.cancel();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

/// What `/healthz` on the metrics (or health) address says: the layer is reachable and, for a
/// worker, its receive loop is receiving.
fn health_check(
    layer: &Layer,
    worker: Option<(Arc<WorkerMetrics>, Arc<JobMetrics>)>,
) -> prometheus::Health {
    let layer = layer.clone();
    Arc::new(move || {
        let layer_ok = layer.available();
        let receive_failures = worker.as_ref().map_or(0, |(w, _)| {
            w.receive_failures_in_a_row
                .load(std::sync::atomic::Ordering::Relaxed)
        });
        let healthy = layer_ok && receive_failures == 0;
        let body = serde_json::json!({
            "status": if healthy { "ok" } else { "failing" },
            "layer": if layer_ok { "ok" } else { "unavailable" },
            "layer_mode": layer.mode(),
            "receive_failures_in_a_row": receive_failures,
        })
        .to_string();
        (healthy, body)
    })
}

async fn start_metrics(
    bind: Option<SocketAddr>,
    ops_token: Option<String>,
    layer: &Layer,
    server: Option<Arc<ServerMetrics>>,
    worker: Option<(Arc<WorkerMetrics>, Arc<JobMetrics>)>,
    token: &CancellationToken,
) -> anyhow::Result<()> {
    let Some(bind) = bind else { return Ok(()) };
    let health = health_check(layer, worker.clone());
    let layer_metrics = Arc::clone(layer.metrics());
    let render = prometheus::render(move |e| {
        layer_metrics.expose(e);
        if let Some(s) = &server {
            s.expose(e);
        }
        if let Some((w, jobs)) = &worker {
            w.expose(e);
            jobs.expose(e);
        }
    });
    let addr = prometheus::spawn_guarded(bind, render, Some(health), ops_token, token.clone())
        .await
        .with_context(|| format!("cannot serve metrics on {bind}"))?;
    tracing::info!(%addr, "Prometheus metrics on http://{addr}/metrics");
    Ok(())
}

/// The Redis of the Django session cache: the flag, else the layer's first URL when it is Redis.
#[cfg(feature = "django")]
fn django_session_redis(args: &WorkerFlags, layer_url: &str) -> anyhow::Result<String> {
    if let Some(url) = &args.django_session_redis {
        return Ok(url.clone());
    }
    let first = layer_url.split(',').next().unwrap_or_default().trim();
    anyhow::ensure!(
        ["redis://", "rediss://", "unix://", "redis+unix://"]
            .iter()
            .any(|p| first.starts_with(p)),
        "--django-session-redis is needed when the channel layer is not one plain Redis URL ({first})"
    );
    Ok(first.to_owned())
}

fn build_worker(
    app: &App,
    layer: &Layer,
    layer_url: &str,
    args: &WorkerFlags,
) -> anyhow::Result<Worker> {
    let router = app
        .routes(layer.clone())
        .context("the app's routes are invalid")?;
    let worker = Worker::new(layer.clone(), Arc::new(router))
        .concurrency(args.concurrency.max(1))
        .owners(!args.no_owners)
        .only_channels(&args.only_channels)
        .exclude_channels(&args.exclude_channels)
        .body_receive_timeout(secs("body-receive-timeout", args.body_receive_timeout)?)
        .max_request_body(args.max_assembled_body)
        .consumer_timeout(secs("consumer-timeout", args.consumer_timeout)?)
        .stop_grace(secs("stop-grace", args.stop_grace)?)
        .job_timeout(secs("job-timeout", args.job_timeout)?);
    #[cfg(feature = "django")]
    let worker = match &args.django_secret_key {
        Some(secret) => {
            let redis = django_session_redis(args, layer_url)?;
            worker.http_sessions(DjangoSessions::new(DjangoSessionConfig::new(
                redis,
                secret.clone(),
            ))?)
        }
        None => worker,
    };
    #[cfg(not(feature = "django"))]
    let _ = layer_url;
    if worker.channels().is_empty() {
        return Err(super::cli::UsageError(format!(
            "the channel globs leave this worker nothing to listen on (routes cover: {})",
            app.routes(layer.clone())
                .map(|r| r.channels().join(", "))
                .unwrap_or_default()
        ))
        .into());
    }
    Ok(worker)
}

/// `switchyard serve`: the interface server.
pub async fn serve(args: ServeCommand) -> anyhow::Result<()> {
    let layer = args.layer.open(DEFAULT_REDIS).await?;
    let server = Server::bind(args.server.config()?).await?;
    if let Layer::Redis(redis) = &layer
        && !layer.settings().durable_channels.is_empty()
    {
        crate::jobs::warn_if_not_persistent(redis).await;
    }
    let token = CancellationToken::new();
    stop_on_signals(token.clone());
    start_metrics(
        args.metrics_bind,
        args.server.edge.ops_token.clone(),
        &layer,
        Some(server.metrics()),
        None,
        &token,
    )
    .await?;
    println!(
        "Switchyard serve: listening on http://{}/ (layer {}, mode {})",
        server.local_addr(),
        layer.describe(),
        layer.mode()
    );
    server.serve(layer, token).await?;
    tracing::info!("server stopped");
    Ok(())
}

/// `switchyard worker`: runs the app's consumers.
pub async fn worker(app: &App, args: WorkerCommand) -> anyhow::Result<()> {
    let layer = args.layer.open(DEFAULT_REDIS).await?;
    let layer_url = args.layer.url(DEFAULT_REDIS);
    anyhow::ensure!(
        !matches!(layer, Layer::Memory(_)),
        "a worker on memory:// would share nothing with any server; use `switchyard dev`, or point --layer at Redis"
    );
    let worker = build_worker(app, &layer, &layer_url, &args.worker)?;
    let token = CancellationToken::new();
    stop_on_signals(token.clone());
    for bind in [args.metrics_bind, args.health_bind] {
        start_metrics(
            bind,
            args.ops_token.clone(),
            &layer,
            None,
            Some((worker.metrics(), worker.job_metrics())),
            &token,
        )
        .await?;
    }
    tracing::info!(channels = ?worker.channels(), concurrency = args.worker.concurrency, layer = %layer.describe(), mode = layer.mode(), "worker listening");
    worker.run(token).await?;
    tracing::info!("worker stopped");
    Ok(())
}

/// `switchyard dev`: server and workers in one process, in-memory layer by default.
pub async fn dev(app: &App, args: DevCommand) -> anyhow::Result<()> {
    let layer = args.layer.open("memory://").await?;
    let worker = build_worker(app, &layer, &args.layer.url("memory://"), &args.worker)?;
    let mut config = args.server.config()?;
    // A front end on its own dev server (another port of localhost) may open sockets here.
    config.origins.allow_localhost = true;
    let server = Server::bind(config).await?;
    let token = CancellationToken::new();
    stop_on_signals(token.clone());
    start_metrics(
        args.metrics_bind,
        args.server.edge.ops_token.clone(),
        &layer,
        Some(server.metrics()),
        Some((worker.metrics(), worker.job_metrics())),
        &token,
    )
    .await?;
    let addr = server.local_addr();
    // Workers stop only after the server has drained, so in-flight requests still get answers.
    let worker_token = CancellationToken::new();
    let worker_stop = worker_token.clone();
    let worker_task = tokio::spawn(async move { worker.run(worker_token).await });
    let url = format!("http://{addr}{}", app.dev_page_path());
    println!(
        "Switchyard dev: serving {url} (layer {}); Ctrl-C stops",
        layer.describe()
    );
    if !args.no_open {
        open_browser(&url);
    }
    let served = server.serve(layer, token.clone()).await;
    token.cancel();
    worker_stop.cancel();
    let worked = worker_task.await.context("the worker task failed")?;
    served?;
    worked?;
    Ok(())
}

/// Opens `url` in the desktop's browser when there is a desktop; otherwise does nothing.
fn open_browser(url: &str) {
    let has_display =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    if !(has_display || cfg!(target_os = "macos")) {
        return;
    }
    match std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(_) => tracing::info!(%url, "opened the app's page"),
        Err(e) => tracing::debug!(error = %e, "could not open a browser"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "django")]
    fn worker_args(session_redis: Option<&str>) -> WorkerFlags {
        WorkerFlags {
            concurrency: 1,
            no_owners: false,
            only_channels: Vec::new(),
            exclude_channels: Vec::new(),
            #[cfg(feature = "django")]
            django_secret_key: Some("s".into()),
            #[cfg(feature = "django")]
            django_session_redis: session_redis.map(str::to_owned),
            body_receive_timeout: 60.0,
            job_timeout: 300.0,
            max_assembled_body: 1,
            consumer_timeout: 300.0,
            stop_grace: 30.0,
        }
    }

    #[cfg(feature = "django")]
    #[test]
    fn django_sessions_use_the_layer_url_as_given() {
        let args = worker_args(None);
        assert_eq!(
            django_session_redis(&args, "rediss://:secret@host:6380/3,redis://other/0").unwrap(),
            "rediss://:secret@host:6380/3"
        );
        assert!(django_session_redis(&args, "memory://").is_err());
        let explicit = worker_args(Some("redis://cache/1"));
        assert_eq!(
            django_session_redis(&explicit, "memory://").unwrap(),
            "redis://cache/1"
        );
    }

    #[test]
    fn default_threads_per_role() {
        assert_eq!(default_threads(Role::Worker, 2), 1);
        assert_eq!(default_threads(Role::Worker, 64), 1);
        assert_eq!(default_threads(Role::Serve, 2), 1);
        assert_eq!(default_threads(Role::Dev, 1), 1);
        assert_eq!(default_threads(Role::Serve, 8), 0);
        assert_eq!(default_threads(Role::Tool, 2), 0);
    }

    #[test]
    fn durations_are_bounded() {
        assert!(secs("x", 1e19).is_err());
        assert!(secs("x", f64::NAN).is_err());
        assert!(secs("x", 0.0).is_err());
        assert_eq!(secs("x", 2.5).unwrap(), Duration::from_millis(2500));
    }
}

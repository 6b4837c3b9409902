//! The interface server (daphne's job): HTTP/1.1 and WebSocket on one port, translated to and
//! from channel-layer messages. It runs no application code.
//!
//! Every HTTP request becomes an `http.request` message and every WebSocket a `websocket.connect`,
//! `websocket.receive`… `websocket.disconnect` sequence, each with a reply channel that is a local
//! channel of the server's one [`ProcessInbox`](crate::layer::ProcessInbox); whatever a worker sends
//! there is written back to the client. hyper 1.x serves HTTP and the paused handshake (the 101
//! waits for the worker's answer to `websocket.connect`), tokio-tungstenite runs the upgraded
//! sockets, one task per socket owning its stream.
//!
//! Choices a user sees (all in [`ServerConfig`]):
//! - request bodies: up to `max_body_size` (1 MiB) ride in `http.request`'s `body`; over
//!   `max_request_body` → 413. `max_request_body` defaults to `max_body_size`, so by default a
//!   larger body is simply refused; set it higher and a body between the two is streamed: the
//!   first `max_body_size` bytes in `body`, the rest as `http.request.body?` chunks of
//!   `body_chunk_size` (64 KiB) on the message's `body_channel`, read from the client as they
//!   arrive (the server holds one chunk, not the body). A chunk refused as full is retried for
//!   `backpressure_timeout`, then the request is abandoned (`closed: true` chunk) with 503; a client
//!   that goes away or stalls past `http_timeout` mid-body also gets a `closed: true` chunk (and
//!   408 when it merely stalled). The response timeout starts once the whole body is sent.
//! - request headers over `max_header_size`
//!   (16 KiB) or `max_headers` (100) → 431; headers not read within `header_read_timeout` (10 s)
//!   → connection closed; malformed HTTP → 400 (hyper).
//! - backpressure: a message for a full server-fed channel (`http.request`, `websocket.connect`,
//!   `websocket.receive`, a body chunk) waits for room with the layer's one retry policy
//!   ([`FullRetry`](crate::layer::FullRetry): growing, jittered pauses) for `backpressure_timeout`
//!   (10 s). Meanwhile nothing more is read from that client (a socket's reader pauses, so TCP
//!   pushes back on the sender; replies keep going out). Past the bound: 503 with `Retry-After: 1`
//!   (requests, handshakes) or close 1013 (sockets). Both are counted (`backpressure_waits`,
//!   `backpressure_refusals`).
//! - no worker reply within `http_timeout` (60 s) → 504; layer unreachable → 503 at once.
//! - handshake: accept (or a frame) → 101, close or `accept: false` → 403, layer full past the
//!   backpressure bound or unreachable → 503, no answer within `websocket_connect_timeout` (5 s,
//!   counted from when `websocket.connect` was sent) → 503 (the worker pool, not the client, is
//!   at fault, and 503 tells a client it may retry).
//! - frames over `ws_max_frame_size` / `ws_max_message_size` (1 MiB) → close 1009, invalid UTF-8
//!   → 1007, protocol violations → 1002; `websocket.receive` still full after
//!   `backpressure_timeout` → 1013; a client frame arriving while the layer is unreachable is
//!   dropped and counted, and the socket stays open.
//! - no pong within `ping_timeout` after a ping (sent after `ping_interval` without client data)
//!   → the connection is dropped (disconnect code 1006); `idle_timeout` without frames either way
//!   → close 1000; open longer than the layer's group expiry (or `websocket_lifetime`) → close 1000,
//!   as daphne's `--websocket_timeout`; server shutdown → close 1001.
//! - the process inbox stops delivering replies (its loop found dead by probes, or stopped after
//!   the shutdown grace) → sockets close with 1011, requests and handshakes get 503 at once, and
//!   `/healthz` answers 503.
//! - slow readers: each socket's outbound queue holds `outbound_queue` messages; on overflow the
//!   [`SlowClientPolicy`] applies (default: close 1013), and every drop is counted; a write stalled
//!   past `write_timeout` drops the connection. A streamed HTTP response whose chunks overflow the
//!   queue is cut (the client sees an incomplete body, never a silently corrupted one).
//! - `/healthz` (under `root_path` too) is answered by the server itself (401 without the ops
//!   token when [`AuthConfig::ops_token`] is set).
//! - the edge's rules ([`edge`]): a missing (HTTP/1.1), repeated or malformed `Host`, or one
//!   outside `allowed_hosts` → 400 (`/healthz` skips only the `allowed_hosts` list); a
//!   handshake whose `Origin` the [`OriginPolicy`] refuses → 403 before any worker hears of it;
//!   a client address over `max_connections_per_ip` → 429; a socket sending faster than its
//!   [`FrameRateLimit`] is read more slowly, then closed with 1008 if it keeps on; a socket that
//!   workers add to more than `max_groups_per_socket` groups is closed with 1008 and the group
//!   that went over discarded (the inbox hears of every `group_add` on its sockets).
//! - authentication ([`auth`]): a verified token's claims ride under `user`; a bad token, or none
//!   on a required path → 401 / 403 before any worker hears of it; expiry closes a socket (4001)
//!   unless a refresh frame renewed its token.
//! - TLS ([`tls`]): HTTPS and WSS on `bind` when [`ServerConfig::tls`] is set, reloaded on SIGHUP.

pub mod auth;
mod dispatch;
mod edge;
mod feed;
mod http;
mod metrics;
mod outbound;
mod owners;
mod receive;
mod request;
mod response;
pub mod tls;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::layer::{DEFAULT_BACKPRESSURE_TIMEOUT, Layer, LayerError, ProcessInbox};

pub use auth::{AuthConfig, JwtConfig, JwtKey, TOKEN_EXPIRED_CLOSE};
pub use edge::{FrameRateLimit, OriginPolicy};
pub use metrics::{ServerMetrics, ServerMetricsSnapshot};
pub use tls::{TlsConfig, TlsError, TlsReloader};

/// Default cap on groups per socket. A chat socket is in a handful of groups (its rooms, its
/// user, presence); a client showing many rooms at once stays in the tens. Every membership
/// costs Redis a sorted-set entry, the server a notice and a row in its record, and the
/// re-assert after Redis lost its data a write, so the cap bounds that work at
/// `max_connections` × this. Centrifugo's equivalent (`client_channel_limit`) defaults to 128.
pub const DEFAULT_MAX_GROUPS_PER_SOCKET: usize = 100;

/// What the server does when a client reads too slowly to keep up with its outbound queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowClientPolicy {
    /// Drop the messages that do not fit (ASGI delivery is at most once) and keep the socket.
    Drop,
    /// Close the socket with 1013 ("try again later") at the first message that does not fit,
    /// so the client knows it missed something and can reconnect and resynchronise.
    #[default]
    Close1013,
}

/// Everything the interface server can be tuned by. [`Default`] binds `127.0.0.1:8000`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks a free port; see [`Server::local_addr`]).
    pub bind: SocketAddr,
    /// The ASGI `root_path` (`SCRIPT_NAME`) put in every request and connect message.
    pub root_path: String,
    /// How long an HTTP request waits for the worker's response, and then for each further chunk,
    /// before 504 (or, once streaming, before the response is cut).
    pub http_timeout: Duration,
    /// How long a WebSocket handshake waits for the worker's answer to `websocket.connect`.
    pub websocket_connect_timeout: Duration,
    /// Largest request body carried whole in `http.request`'s `body` (1 MiB). A larger body is
    /// refused with 413, or streamed through `body_channel` when `max_request_body` allows it.
    pub max_body_size: usize,
    /// Hard limit on a request body: larger → 413 always. `None` (the default) means
    /// `max_body_size`, so nothing is streamed; a value above `max_body_size` turns on streaming
    /// of the bodies in between (see the module docs). A value below it is a configuration error.
    pub max_request_body: Option<usize>,
    /// Content bytes per `http.request.body?` chunk of a streamed body (64 KiB).
    pub body_chunk_size: usize,
    /// Largest request head (request line and headers) in bytes; larger → 431.
    pub max_header_size: usize,
    /// Most request headers; more → 431.
    pub max_headers: usize,
    /// Time allowed to send the whole request head (slowloris guard).
    pub header_read_timeout: Duration,
    /// Largest WebSocket frame payload accepted; larger → close 1009.
    pub ws_max_frame_size: usize,
    /// Largest WebSocket message (all fragments) accepted; larger → close 1009.
    pub ws_max_message_size: usize,
    /// A ping is sent after this long without data from the client.
    pub ping_interval: Duration,
    /// A ping unanswered this long drops the connection.
    pub ping_timeout: Duration,
    /// Close (1000) a socket with no frame in either direction for this long; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Close (1000) a socket open this long; `None` = the layer's group expiry (a socket outliving
    /// it would be dropped from its groups while still open).
    pub websocket_lifetime: Option<Duration>,
    /// Open TCP connections allowed; beyond, new connections get a 503 and are closed.
    pub max_connections: usize,
    /// Messages buffered per connection between the inbox and the socket.
    pub outbound_queue: usize,
    /// What to do when a connection's outbound queue overflows.
    pub slow_client: SlowClientPolicy,
    /// A write to a socket that does not complete within this long drops the connection (no
    /// close frame can get through a stalled socket; counted as a slow-client close, and the
    /// `websocket.disconnect` says 1006).
    pub write_timeout: Duration,
    /// How long a message for a full server-fed channel waits for room (the client's reading
    /// paused) before the socket is closed with 1013, or the request or handshake answered 503
    /// ([`DEFAULT_BACKPRESSURE_TIMEOUT`], 10 s). Also bounds a body chunk's wait, after which the
    /// request is abandoned with a `closed: true` chunk.
    pub backpressure_timeout: Duration,
    /// A socket whose frames have all been lost to an unreachable channel layer for this long
    /// is closed with 1011, so its client reconnects instead of talking to nobody (10 s).
    pub layer_outage_close: Duration,
    /// Honour `X-Forwarded-For`, `X-Forwarded-Port` and `X-Forwarded-Proto` (behind a proxy only).
    pub proxy_headers: bool,
    /// On shutdown, how long in-flight HTTP responses and socket closes may take.
    pub shutdown_grace: Duration,
    /// Prefix of the process inbox name.
    pub inbox_prefix: String,
    /// WebSocket subprotocols the server agrees to (daphne's `--ws-protocol`): the first one the
    /// client offers that is listed here is echoed in `Sec-WebSocket-Protocol` (browsers fail a
    /// handshake that offered protocols and got none back). Empty: none is ever selected.
    pub ws_protocols: Vec<String>,
    /// Hosts requests may name, with Django's `ALLOWED_HOSTS` semantics: `example.com` exactly,
    /// `.example.com` that domain and its subdomains, `*` any (the default: a reverse proxy
    /// usually picks the host; set the list when clients reach the server directly). Missing,
    /// repeated and malformed `Host` headers are refused whatever the list says.
    pub allowed_hosts: Vec<String>,
    /// Which origins may open a WebSocket (default: the request's own only).
    pub origins: OriginPolicy,
    /// Connections one client address may hold open (0 = no limit). Without `proxy_headers` it
    /// counts TCP connections per peer address; with them, open WebSockets per forwarded
    /// client address (the proxy holds the TCP connections).
    pub max_connections_per_ip: usize,
    /// Apply the per-client limits (`max_connections_per_ip`, `ws_rate_limit`) to loopback
    /// clients too. Off by default: a local proxy without `proxy_headers`, or a load test,
    /// would put every client behind one loopback address.
    pub limit_loopback: bool,
    /// Inbound frame limits per socket; `None` = unlimited.
    pub ws_rate_limit: Option<FrameRateLimit>,
    /// Groups one socket may be in (0 = no limit; default [`DEFAULT_MAX_GROUPS_PER_SOCKET`]). A
    /// worker's `group_add` past it is discarded and the socket closed with 1008. Loopback
    /// clients are not exempt: the groups are chosen by the application, not by the network.
    pub max_groups_per_socket: usize,
    /// Authentication at the edge (signed tokens, paths that require one, the `/healthz` token);
    /// the default checks nothing. See [`auth`].
    pub auth: AuthConfig,
    /// Terminate TLS (HTTPS and WSS on `bind`); `None`, the default: plain TCP. See [`tls`].
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            root_path: String::new(),
            http_timeout: Duration::from_secs(60),
            websocket_connect_timeout: Duration::from_secs(5),
            max_body_size: 1 << 20,
            max_request_body: None,
            body_chunk_size: 64 << 10,
            max_header_size: 16 << 10,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            ws_max_frame_size: 1 << 20,
            ws_max_message_size: 1 << 20,
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(30),
            idle_timeout: None,
            websocket_lifetime: None,
            max_connections: 10_000,
            outbound_queue: 64,
            slow_client: SlowClientPolicy::Close1013,
            write_timeout: Duration::from_secs(30),
            backpressure_timeout: DEFAULT_BACKPRESSURE_TIMEOUT,
            layer_outage_close: Duration::from_secs(10),
            proxy_headers: false,
            shutdown_grace: Duration::from_secs(10),
            inbox_prefix: "switchyard.response".to_owned(),
            ws_protocols: Vec::new(),
            allowed_hosts: vec!["*".to_owned()],
            origins: OriginPolicy::default(),
            max_connections_per_ip: 1000,
            limit_loopback: false,
            ws_rate_limit: Some(FrameRateLimit::default()),
            max_groups_per_socket: DEFAULT_MAX_GROUPS_PER_SOCKET,
            auth: AuthConfig::default(),
            tls: None,
        }
    }
}

/// What the server can fail with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The address could not be bound or read.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The layer could not start the process inbox.
    #[error("cannot start the process inbox: {0}")]
    Layer(#[from] LayerError),
    /// A setting that makes no sense.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What every connection of one server shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) layer: Layer,
    pub(crate) inbox: ProcessInbox,
    pub(crate) metrics: Arc<ServerMetrics>,
    pub(crate) frames: outbound::FrameCache,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when no reply can reach a connection any more: the inbox loop was found dead
    /// (its loop ended) or the server stopped it. Handshakes and requests waiting for a reply get
    /// 503; open sockets learn it from their local channel, which the ended loop closed (1011).
    pub(crate) inbox_gone: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) auth: auth::Authenticator,
    pub(crate) local_addr: SocketAddr,
    pub(crate) lifetime: Duration,
    pub(crate) started: Instant,
    /// When the shutdown was first noticed (by `serve` or a socket, whichever came first).
    pub(crate) shutdown_at: std::sync::OnceLock<tokio::time::Instant>,
    /// Bounds the log lines for frames lost to an unreachable layer (one per second).
    pub(crate) lost_frame_log: LogLimiter,
    /// The compiled origin policy.
    pub(crate) origins: edge::OriginRules,
    /// Open connections per client address.
    pub(crate) client_slots: Arc<edge::ClientSlots>,
    /// The workers that own strictly ordered sockets of this server, and their leases' state.
    pub(crate) owners: Arc<owners::Owners>,
}

/// Lets through at most one log line per second (a Redis outage loses every frame of every
/// socket; one line per frame would bury the log).
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    last_second: std::sync::atomic::AtomicU64,
}

impl LogLimiter {
    pub(crate) fn allow(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_second
            .swap(now, std::sync::atomic::Ordering::Relaxed)
            != now
    }
}

/// What holds one of the server's connection slots: the `max_connections` permit and, when the
/// peer address is limited, its per-address slot. Shared by a connection and the socket it
/// upgrades to; released when the last holder ends.
#[derive(Debug)]
pub(crate) struct ConnectionPermit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _client: Option<edge::ClientSlot>,
}

impl Shared {
    /// The end of the shutdown grace, once shutdown has begun.
    pub(crate) fn shutdown_deadline(&self) -> Option<tokio::time::Instant> {
        if !self.shutdown.is_cancelled() {
            return None;
        }
        let began = *self.shutdown_at.get_or_init(tokio::time::Instant::now);
        Some(
            began
                .checked_add(self.config.shutdown_grace)
                .unwrap_or_else(|| deadline_after(self.config.shutdown_grace)),
        )
    }
}

/// A bound interface server, ready to [`serve`](Server::serve).
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics: Arc<ServerMetrics>,
    auth: auth::Authenticator,
    tls: Option<TlsReloader>,
}

impl Server {
    /// Checks the configuration and binds the listening socket.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        check_config(&config)?;
        edge::OriginRules::new(&config.origins).map_err(ServerError::Config)?;
        let auth = auth::Authenticator::new(&config.auth).map_err(ServerError::Config)?;
        let tls = config.tls.clone().map(TlsReloader::new).transpose()?;
        let listener =
            TcpListener::bind(config.bind)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.bind,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.bind,
            source,
        })?;
        Ok(Server {
            config,
            listener,
            local_addr,
            metrics: Arc::new(ServerMetrics::default()),
            auth,
            tls,
        })
    }

    /// The TLS certificate reloader (what SIGHUP triggers), when TLS is on.
    pub fn tls_reloader(&self) -> Option<TlsReloader> {
        self.tls.clone()
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's counters (shared: keep the `Arc` and read it while the server runs).
    pub fn metrics(&self) -> Arc<ServerMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets in-flight HTTP responses
    /// finish and closes every socket with 1001 (sending its `websocket.disconnect`), all within
    /// `shutdown_grace`, and stops the inbox last.
    pub async fn serve(self, layer: Layer, shutdown: CancellationToken) -> Result<(), ServerError> {
        let inbox = layer.inbox(&self.config.inbox_prefix).await?;
        if self.config.max_groups_per_socket > 0 {
            inbox.cap_groups_per_socket(
                self.config.max_groups_per_socket,
                Arc::clone(&self.metrics.ws_group_cap_closes),
            );
        }
        let lifetime = self
            .config
            .websocket_lifetime
            .unwrap_or(layer.settings().group_expiry);
        let shared = Arc::new(Shared {
            frames: outbound::FrameCache::default(),
            lifetime,
            local_addr: self.local_addr,
            metrics: Arc::clone(&self.metrics),
            shutdown: shutdown.clone(),
            inbox_gone: CancellationToken::new(),
            tracker: TaskTracker::new(),
            started: Instant::now(),
            shutdown_at: std::sync::OnceLock::new(),
            lost_frame_log: LogLimiter::default(),
            origins: edge::OriginRules::new(&self.config.origins).map_err(ServerError::Config)?,
            client_slots: Arc::new(edge::ClientSlots::new(
                self.config.max_connections_per_ip,
                self.config.limit_loopback,
            )),
            auth: self.auth,
            config: self.config,
            owners: Arc::default(),
            layer,
            inbox,
        });
        if shared.layer.supports_owners() {
            let owners = Arc::clone(&shared.owners);
            tokio::spawn(owners.watch(
                shared.layer.clone(),
                Arc::clone(&shared.metrics),
                shutdown.clone(),
            ));
        }
        let permits = Arc::new(Semaphore::new(shared.config.max_connections));
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(shared.config.header_read_timeout)
            .max_header_size(shared.config.max_header_size)
            .max_headers(shared.config.max_headers)
            .max_buf_size(shared.config.max_header_size.max(8192) * 2)
            .keep_alive(true);
        {
            // The inbox says when its loop has ended; replies cannot arrive after that.
            let (inbox, gone) = (shared.inbox.clone(), shared.inbox_gone.clone());
            tokio::spawn(async move {
                inbox.ended().await;
                gone.cancel();
            });
        }
        if let Some(tls) = &self.tls {
            spawn_reload_on_hangup(tls.clone(), shutdown.clone());
        }
        tracing::info!(addr = %self.local_addr, tls = self.tls.is_some(), layer = %shared.layer.describe(), mode = shared.layer.mode(), inbox = %shared.inbox.name(), "interface server listening");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            ServerMetrics::inc(&shared.metrics.connections_accepted);
            // Behind a trusted proxy every connection comes from the proxy: the per-client limit
            // then counts sockets per forwarded address, at the handshake.
            let client = if shared.config.proxy_headers {
                None
            } else {
                match shared.client_slots.acquire(peer.ip()) {
                    Ok(slot) => slot,
                    Err(()) => {
                        ServerMetrics::inc(&shared.metrics.per_ip_refused);
                        tracing::info!(%peer, limit = shared.config.max_connections_per_ip, "connection refused: too many from this address");
                        shared.tracker.spawn(refuse_connection(tcp, REFUSED_PER_IP));
                        continue;
                    }
                }
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                ServerMetrics::inc(&shared.metrics.connections_refused);
                ServerMetrics::inc(&shared.metrics.http_503);
                shared.tracker.spawn(refuse_connection(tcp, REFUSED_FULL));
                continue;
            };
            let permit = ConnectionPermit {
                _permit: permit,
                _client: client,
            };
            let shared = Arc::clone(&shared);
            let builder = builder.clone();
            let acceptor = self.tls.as_ref().map(TlsReloader::acceptor);
            shared.tracker.clone().spawn(async move {
                ServerMetrics::inc(&shared.metrics.open_connections);
                let permit = Arc::new(permit);
                match acceptor {
                    None => serve_connection(&builder, tcp, peer, false, &shared, &permit).await,
                    Some(acceptor) => {
                        // The TLS handshake counts against the header read timeout: a client
                        // that opens a connection and says nothing is dropped as in plain HTTP.
                        let handshake = tokio::time::timeout(
                            shared.config.header_read_timeout,
                            acceptor.accept(tcp),
                        );
                        match handshake.await {
                            Ok(Ok(stream)) => {
                                serve_connection(&builder, stream, peer, true, &shared, &permit)
                                    .await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
                drop(permit);
                ServerMetrics::dec(&shared.metrics.open_connections);
            });
        }
        drop(self.listener);
        tracing::info!("interface server stopping: no new connections");
        shared.tracker.close();
        let grace_ends = shared
            .shutdown_deadline()
            .unwrap_or_else(|| deadline_after(shared.config.shutdown_grace));
        if tokio::time::timeout_at(grace_ends, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = shared.tracker.len(),
                "shutdown grace elapsed with connections still open"
            );
        }
        // From here no reply can arrive: whatever outlived the grace stops waiting for one.
        shared.inbox_gone.cancel();
        shared.inbox.shutdown(Duration::from_secs(2)).await;
        tracing::info!("interface server stopped");
        Ok(())
    }
}

/// Serves one TCP connection: HTTP requests until it closes, or a handshake whose upgraded
/// socket then runs in its own tracked task (holding a clone of `permit`).
async fn serve_connection<S>(
    builder: &http1::Builder,
    stream: S,
    peer: SocketAddr,
    tls: bool,
    shared: &Arc<Shared>,
    permit: &Arc<ConnectionPermit>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service_shared = Arc::clone(shared);
    let service_permit = Arc::clone(permit);
    let service = hyper::service::service_fn(move |req| {
        dispatch::handle(
            Arc::clone(&service_shared),
            peer,
            tls,
            Arc::clone(&service_permit),
            req,
        )
    });
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

/// Re-reads the TLS certificate and key on every SIGHUP until shutdown.
fn spawn_reload_on_hangup(tls: TlsReloader, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS certificates will not reload");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    got = hangups.recv() => if got.is_none() { return },
                }
                match tls.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; the previous one stays in service");
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    {
        let _ = (tls, shutdown);
    }
}

/// The answer to a connection over `max_connections`.
const REFUSED_FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 26\r\nretry-after: 1\r\nconnection: close\r\n\r\ntoo many open connections\n";
/// The answer to a connection over `max_connections_per_ip`.
const REFUSED_PER_IP: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\ncontent-length: 39\r\nretry-after: 1\r\nconnection: close\r\n\r\ntoo many open connections from this IP\n";

/// Answers a refused connection with a bare response and closes it.
async fn refuse_connection(mut tcp: TcpStream, response: &'static [u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tcp.write_all(response).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// `now + after`, or a deadline decades away when that overflows: a configured duration may be
/// anything up to `Duration::MAX` (`--http-timeout 1e19`), and `Instant + Duration` panics.
pub(crate) use crate::layer::full_retry::deadline_after;

fn check_config(c: &ServerConfig) -> Result<(), ServerError> {
    let bad = |what: &str| Err(ServerError::Config(what.to_owned()));
    if c.max_connections == 0 {
        return bad("max_connections must be at least 1");
    }
    if c.outbound_queue == 0 {
        return bad("outbound_queue must be at least 1");
    }
    if c.ws_max_frame_size == 0 || c.ws_max_message_size == 0 {
        return bad("WebSocket frame and message limits must be positive");
    }
    if c.ping_interval.is_zero() || c.ping_timeout.is_zero() {
        return bad("ping interval and timeout must be positive");
    }
    if c.http_timeout.is_zero() || c.websocket_connect_timeout.is_zero() {
        return bad("HTTP and WebSocket connect timeouts must be positive");
    }
    if c.header_read_timeout.is_zero() || c.write_timeout.is_zero() {
        return bad("header read and write timeouts must be positive");
    }
    if c.max_request_body
        .is_some_and(|hard| hard < c.max_body_size)
    {
        return bad("max_request_body must be at least max_body_size");
    }
    if c.body_chunk_size == 0 {
        return bad("body_chunk_size must be positive");
    }
    if !c.root_path.is_empty() && (!c.root_path.starts_with('/') || c.root_path.ends_with('/')) {
        return bad("root_path must be empty or start with / and not end with /");
    }
    if c.allowed_hosts.iter().all(|h| h.trim().is_empty()) {
        return bad("allowed_hosts must name at least one host (or `*`)");
    }
    if let Some(limit) = &c.ws_rate_limit {
        let rates = [
            limit.messages_per_second,
            limit.message_burst,
            limit.bytes_per_second,
            limit.byte_burst,
        ];
        if rates.iter().any(|r| !r.is_finite() || *r < 0.0) || limit.close_after.is_zero() {
            return bad(
                "WebSocket rate limits must be finite and non-negative, and close_after positive",
            );
        }
    }
    Ok(())
}

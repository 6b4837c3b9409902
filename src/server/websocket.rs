//! WebSockets: the paused handshake (the 101 waits for the worker's answer to
//! `websocket.connect`), then one task per socket that owns its stream and loops over three
//! sources: client frames (→ `websocket.receive` with `order` 1, 2, …), the socket's reply channel
//! (→ frames and closes), and one timer (ping, pong timeout, idle, lifetime). Writes happen
//! outside the wait for the next event (feed a batch, flush once, under a write timeout), so no
//! send is ever lost to a cancelled wait, and the stream is read continuously so pongs and close
//! replies go out. Whatever ends the socket, its `websocket.disconnect` carries the close code and
//! the next order.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use switchyard_routing::asgi::{
    WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT, WEBSOCKET_RECEIVE, WebsocketConnect,
    WebsocketDisconnect,
};
use switchyard_routing::codec;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::edge::{self, Admit, ClientSlot, FrameLimiter, RequestHost};
use super::feed::send_server_fed;
use super::metrics::ServerMetrics;
use super::outbound::SocketReply;
use super::owners::OwnedBy;
use super::receive::{self, BinRef, ReceiveRef, UserEntry};
use super::request::{HostPortText, RequestHead};
use super::response::{ACCESS_LOG, Body, empty, plain, unavailable};
use super::{ConnectionPermit, Shared, SlowClientPolicy, auth};
use crate::layer::owner::is_owner_name;
use crate::layer::{Envelope, FullRetry, LayerError, LocalChannel};

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Outbound messages written per flush at most (the rest wait for the next round).
const WRITE_BATCH: usize = 32;
/// Frames of one batch are gathered up to this many bytes and written with one syscall at the
/// flush (tungstenite writes each frame at once when this is 0).
const WRITE_BUFFER: usize = 8 << 10;
/// How long a closing socket waits for the client's close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// True for a request asking to become a WebSocket.
pub(crate) fn is_upgrade(req: &Request<Incoming>) -> bool {
    let has_token = |name, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has_token(UPGRADE, "websocket") && has_token(CONNECTION, "upgrade")
}

/// Sends `websocket.disconnect` (code 1006, order 1) when dropped while armed: the handshake
/// never completed after the worker was told about it (client gone, rejected, timed out).
struct ConnectGuard {
    shared: Arc<Shared>,
    message: Option<WebsocketDisconnect>,
}

impl Drop for ConnectGuard {
    fn drop(&mut self) {
        if let Some(message) = self.message.take() {
            let shared = Arc::clone(&self.shared);
            if tokio::runtime::Handle::try_current().is_ok() {
                shared.tracker.clone().spawn(async move {
                    send_disconnect(&shared, WEBSOCKET_DISCONNECT, &message).await;
                });
            }
        }
    }
}

/// How long a `websocket.disconnect` the layer refuses (full, or unreachable) is retried after a
/// socket closes while the server runs. During a shutdown the retries last until its grace ends.
const DISCONNECT_RETRY: Duration = Duration::from_secs(5);
/// Longest pause between two tries of a refused `websocket.disconnect`.
const DISCONNECT_MAX_PAUSE: Duration = Duration::from_millis(250);
/// On shutdown each socket waits a random part of this per open socket (at most a quarter of
/// the grace) before closing, so their disconnects reach the layer spread out, not all at once.
const SHUTDOWN_SPREAD_PER_SOCKET: Duration = Duration::from_micros(200);

/// Sends `websocket.disconnect`, retrying while the layer refuses it as full or unreachable.
/// ASGI 1.0 says to give up on `ChannelFull`, but a lost disconnect means the consumer's
/// disconnect handler never runs and the reply channel stays in its groups for the group
/// expiry (a day by default), so retries go on (with jittered backoff) for `DISCONNECT_RETRY`,
/// or to the end of the shutdown grace; a disconnect lost even so is counted and logged.
async fn send_disconnect(shared: &Shared, channel: &str, message: &WebsocketDisconnect) {
    let mut retry = FullRetry::until(
        shared
            .shutdown_deadline()
            .unwrap_or_else(|| super::deadline_after(DISCONNECT_RETRY)),
    )
    .or_unavailable()
    .max_pause(DISCONNECT_MAX_PAUSE);
    loop {
        let error = match shared.layer.send(channel, message).await {
            Ok(()) => return,
            Err(e) => e,
        };
        if let Some(deadline) = shared.shutdown_deadline() {
            retry.shorten_to(deadline);
        }
        if retry.wait(&error).await {
            continue;
        }
        ServerMetrics::inc(&shared.metrics.ws_disconnects_lost);
        tracing::warn!(
            channel = %message.reply_channel,
            path = %message.path,
            code = message.code,
            error = %error,
            "websocket.disconnect lost: its consumer will not run and the channel stays in its groups until they expire"
        );
        return;
    }
}

fn ws_log(client: &str, what: &str, path: &str, code: Option<u16>) {
    match code {
        Some(code) => {
            tracing::info!(target: ACCESS_LOG, client = %client, event = %what, path = %path, code, "{what} {path} {code}")
        }
        None => {
            tracing::info!(target: ACCESS_LOG, client = %client, event = %what, path = %path, "{what} {path}")
        }
    }
}

/// Runs the handshake: `websocket.connect`, wait for the worker, answer 101 / 403 / 503.
pub(crate) async fn handshake(
    shared: Arc<Shared>,
    peer: SocketAddr,
    tls: bool,
    permit: Arc<ConnectionPermit>,
    host: Option<RequestHost>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let key = match upgrade_key(&req) {
        Ok(key) => key,
        Err(refused) => return *refused,
    };
    let mut subprotocol = choose_subprotocol(&shared.config.ws_protocols, &req);
    let mut head = match RequestHead::from_parts(
        req.uri(),
        req.headers(),
        peer,
        shared.local_addr,
        shared.config.proxy_headers,
    ) {
        Ok(head) => head,
        Err(_) => return plain(StatusCode::BAD_REQUEST, "Invalid characters in path\n"),
    };
    head.secure |= tls;
    let client = HostPortText(&head.client).to_string();
    let path = head.path.clone();
    let Admitted {
        slot: client_slot,
        limiter,
    } = match admit_client(&shared, &req, &head, peer, host.as_ref()) {
        Ok(admitted) => admitted,
        Err(refused) => {
            ws_log(&client, "WSREJECT", &path, Some(refused.status().as_u16()));
            return *refused;
        }
    };
    let identity = if shared.auth.is_off() {
        None
    } else {
        match shared.auth.check(&path, req.headers(), req.uri().query()) {
            Ok(identity) => identity,
            Err(refusal) => {
                ServerMetrics::inc(&shared.metrics.auth_refused);
                tracing::debug!(client = %client, path = %path, ?refusal, "handshake refused by authentication");
                ws_log(&client, "WSREJECT", &path, Some(403));
                return plain(StatusCode::FORBIDDEN, refusal.text());
            }
        }
    };
    if subprotocol.is_none() && identity.is_some() && auth::offers_bearer_protocol(req.headers()) {
        subprotocol = Some(HeaderValue::from_static("bearer"));
    }
    if shared.inbox_gone.is_cancelled() {
        ws_log(&client, "WSREJECT", &path, Some(503));
        return unavailable(&shared, "Replies cannot be received\n");
    }
    let mut local = shared
        .inbox
        .socket_channel_with_buffer(shared.config.outbound_queue);
    let reply_channel = local.name().to_owned();
    let mut connect = WebsocketConnect::new(reply_channel.clone(), path.clone());
    connect.scheme = if head.secure { "wss" } else { "ws" }.to_owned();
    connect.query_string = head.query_string;
    connect.root_path = shared.config.root_path.clone();
    connect.headers = head.headers;
    connect.client = Some(head.client);
    connect.server = Some(head.server);
    let (claims, token_expires) = match identity {
        Some(identity) => (Some(identity.user), Some(identity.expires_at)),
        None => (None, None),
    };
    // Encoded once for every frame of the socket. Claims the connect can carry always encode,
    // so a failure here is the connect's own.
    let user = match claims.clone().map(UserEntry::new).transpose() {
        Ok(user) => user,
        Err(e) => {
            ws_log(&client, "WSREJECT", &path, Some(500));
            tracing::error!(error = %e, "websocket.connect not sent");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error\n");
        }
    };
    connect.user = claims;
    connect.owners = shared.layer.supports_owners();
    ws_log(&client, "WSCONNECTING", &path, None);
    ServerMetrics::inc(&shared.metrics.ws_connects);
    let sent = match codec::to_msgpack(&connect) {
        Ok(payload) => send_server_fed(&shared, WEBSOCKET_CONNECT, &payload, None).await,
        Err(e) => Err(e.into()),
    };
    if let Err(e) = sent {
        ws_log(&client, "WSREJECT", &path, Some(503));
        return if e.is_full() || e.is_unavailable() {
            tracing::warn!(error = %e, "websocket.connect not sent");
            unavailable(&shared, "Connection queue unavailable\n")
        } else {
            tracing::error!(error = %e, "websocket.connect not sent");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error\n")
        };
    }
    drop(connect);
    let guard = ConnectGuard {
        shared: Arc::clone(&shared),
        message: Some(WebsocketDisconnect::new(
            reply_channel.clone(),
            path.clone(),
            1006,
            1,
        )),
    };
    let first = match worker_verdict(&shared, &mut local, &client, &path).await {
        Ok(first) => first,
        Err(refused) => return *refused,
    };
    let owner = owned_by(&shared, first.owner.as_deref());
    let upgrade = hyper::upgrade::on(&mut req);
    let task_shared = Arc::clone(&shared);
    shared.tracker.spawn(async move {
        let upgraded = match tokio::time::timeout(Duration::from_secs(10), upgrade).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
            Err(_) => return,
        };
        let config = ws_config(&task_shared);
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let mut guard = guard;
        guard.message = None;
        let socket = Socket {
            shared: Arc::clone(&task_shared),
            local,
            controls: Controls::new(),
            path,
            client,
            order: 0,
            opened: Instant::now(),
            last_client_data: Instant::now(),
            last_activity: Instant::now(),
            ping_sent: None,
            dropped_seen: 0,
            losing_since: None,
            limiter,
            user,
            token_expires: token_expires.map(instant_at),
            owner,
        };
        socket.run(ws, first).await;
        drop(client_slot);
        drop(permit);
    });
    ServerMetrics::inc(&shared.metrics.ws_accepted);
    switching_protocols(&key, subprotocol)
}

/// The `Sec-WebSocket-Key` of a well-formed upgrade request (a GET of WebSocket version 13),
/// or the answer to one that is not.
fn upgrade_key(req: &Request<Incoming>) -> Result<Vec<u8>, Box<Response<Body>>> {
    if req.method() != Method::GET {
        return Err(Box::new(plain(
            StatusCode::BAD_REQUEST,
            "WebSocket handshake must be a GET\n",
        )));
    }
    if req
        .headers()
        .get(SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut resp = plain(
            StatusCode::UPGRADE_REQUIRED,
            "Unsupported WebSocket version\n",
        );
        resp.headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return Err(Box::new(resp));
    }
    req.headers()
        .get(SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().to_vec())
        .ok_or_else(|| {
            Box::new(plain(
                StatusCode::BAD_REQUEST,
                "Missing Sec-WebSocket-Key\n",
            ))
        })
}

/// Waits (up to the connect timeout) for the worker's answer to `websocket.connect` on the
/// socket's channel: its accepting reply, or the handshake's answer when it refused (403), did
/// not answer in time (503) or replies cannot be received (503). Undecodable replies are
/// counted and skipped.
async fn worker_verdict(
    shared: &Arc<Shared>,
    local: &mut LocalChannel,
    client: &str,
    path: &str,
) -> Result<SocketReply, Box<Response<Body>>> {
    let deadline = super::deadline_after(shared.config.websocket_connect_timeout);
    loop {
        let reply = tokio::select! {
            _ = shared.inbox_gone.cancelled() => Ok(None),
            reply = tokio::time::timeout_at(deadline, local.recv()) => reply,
        };
        match reply {
            Ok(Some(envelope)) => match shared.frames.decode(&envelope) {
                Ok(reply) if reply.accepts() => return Ok(reply),
                Ok(reply) if reply.accept == Some(false) || reply.close.is_some() => {
                    ServerMetrics::inc(&shared.metrics.ws_rejected);
                    ws_log(client, "WSREJECT", path, Some(403));
                    return Err(Box::new(plain(StatusCode::FORBIDDEN, "Access denied\n")));
                }
                Ok(_) => {}
                Err(e) => {
                    ServerMetrics::inc(&shared.metrics.bad_replies);
                    tracing::warn!(channel = %local.name(), error = %e, "socket reply ignored");
                }
            },
            Ok(None) => {
                ws_log(client, "WSREJECT", path, Some(503));
                return Err(Box::new(unavailable(
                    shared,
                    "Replies cannot be received\n",
                )));
            }
            Err(_) => {
                ServerMetrics::inc(&shared.metrics.ws_connect_timeouts);
                ws_log(client, "WSREJECT", path, Some(503));
                return Err(Box::new(unavailable(
                    shared,
                    "Worker did not answer the connection in time\n",
                )));
            }
        }
    }
}

/// The socket's owner, when the accept named a well-formed one and this layer has owners.
fn owned_by(shared: &Arc<Shared>, owner: Option<&str>) -> Option<OwnedBy> {
    let owner = owner?;
    if !is_owner_name(owner) || !shared.layer.supports_owners() {
        ServerMetrics::inc(&shared.metrics.bad_replies);
        tracing::warn!(
            owner,
            "an accept named an owner this server cannot use; the socket keeps the shared channels"
        );
        return None;
    }
    Some(shared.owners.attach(owner))
}

/// The 101 that completes a handshake.
fn switching_protocols(key: &[u8], subprotocol: Option<HeaderValue>) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key)) {
        headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(protocol) = subprotocol {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    resp
}

/// The edge's checks on a handshake, before any worker hears of it: its origin (403), its
/// client address's open sockets when a proxy holds the TCP connections (429); and the frame
/// limiter the socket will run with (none for a loopback client unless `limit_loopback`).
fn admit_client(
    shared: &Shared,
    req: &Request<Incoming>,
    head: &RequestHead,
    peer: SocketAddr,
    host: Option<&RequestHost>,
) -> Result<Admitted, Box<Response<Body>>> {
    let config = &shared.config;
    let secure = edge::known_scheme(req.headers(), config.proxy_headers);
    if let Err(refusal) = shared
        .origins
        .check(req.headers(), &head.path, host, secure)
    {
        ServerMetrics::inc(&shared.metrics.origin_rejected);
        tracing::info!(client = %HostPortText(&head.client), path = %head.path, origin = ?req.headers().get(hyper::header::ORIGIN), reason = ?refusal, "handshake refused by the origin policy");
        return Err(Box::new(plain(
            StatusCode::FORBIDDEN,
            "Origin not allowed\n",
        )));
    }
    // The forwarded address when proxy headers are trusted (the peer is then the proxy); one
    // that is not an IP address counts as the peer's.
    let client_ip = head.client.0.parse().unwrap_or(peer.ip());
    let slot = if config.proxy_headers {
        match shared.client_slots.acquire(client_ip) {
            Ok(slot) => slot,
            Err(()) => {
                ServerMetrics::inc(&shared.metrics.per_ip_refused);
                tracing::info!(client = %client_ip, limit = config.max_connections_per_ip, "handshake refused: too many sockets from this address");
                let mut resp = plain(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many open connections from this IP\n",
                );
                resp.headers_mut()
                    .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
                return Err(Box::new(resp));
            }
        }
    } else {
        None
    };
    let limiter = config
        .ws_rate_limit
        .filter(|_| config.limit_loopback || !client_ip.is_loopback())
        .and_then(|limit| FrameLimiter::new(&limit, Instant::now()));
    Ok(Admitted { slot, limiter })
}

/// What a handshake the edge admitted carries into its socket.
struct Admitted {
    /// Its forwarded client address's slot (behind a proxy), held while the socket is open.
    slot: Option<ClientSlot>,
    limiter: Option<FrameLimiter>,
}

/// The first subprotocol the client offers that the server agrees to.
fn choose_subprotocol(allowed: &[String], req: &Request<Incoming>) -> Option<HeaderValue> {
    if allowed.is_empty() {
        return None;
    }
    req.headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|offered| allowed.iter().any(|a| a == offered))
        .and_then(|p| HeaderValue::from_str(p).ok())
}

/// Small buffers: an idle socket should cost a few KB, not tungstenite's 2 × 128 KiB defaults.
fn ws_config(shared: &Shared) -> WebSocketConfig {
    let c = &shared.config;
    WebSocketConfig::default()
        // 1 KiB: a small frame still arrives in one read, and the read buffer is most of what
        // an idle socket costs (BENCHMARKS.md measures the RSS per idle socket).
        .read_buffer_size(1024)
        .write_buffer_size(WRITE_BUFFER)
        // Must hold one whole outgoing message; workers' messages are bounded by the layer and
        // the outbound queue, this bound only stops the buffer growing when writes stall.
        .max_write_buffer_size((c.ws_max_message_size.saturating_mul(2)).max(16 << 20))
        .max_frame_size(Some(c.ws_max_frame_size))
        .max_message_size(Some(c.ws_max_message_size))
}

/// How a socket ended.
#[derive(Debug, Clone, Copy)]
enum End {
    /// The client sent a close frame with this code (1005 when it had none).
    ClientClosed(u16),
    /// We close with this code.
    ServerClosed(u16),
    /// The connection is gone or stuck, no close handshake (1006).
    Dropped,
}

enum Event {
    Shutdown,
    Incoming(Option<Result<Message, WsError>>),
    /// A reply, or `None`: no reply can come any more (the inbox is gone).
    Outgoing(Option<Envelope>),
    Tick,
}

/// Whether any of a socket's sources other than its reply channel (the stream, the timer, the
/// shutdown) has woken its task since the loop last found them all pending. A busy socket is
/// woken mostly by replies to write, and polling the others on each of those wakes cost more
/// than the write itself in user time: tungstenite's read path (two waker registrations and a
/// readiness check), the timer's entry, and the shutdown token's lock. The loop polls them only
/// after one of them woke the task.
struct ControlWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ControlWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Polls a socket's control sources through its [`ControlWake`].
struct Controls {
    wake: Arc<ControlWake>,
    waker: Waker,
}

impl Controls {
    fn new() -> Self {
        // Woken at first: the sources have not registered yet, and tungstenite may already hold
        // frames read with the handshake.
        let wake = Arc::new(ControlWake {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&wake));
        Self { wake, waker }
    }

    /// Makes the next [`Controls::poll`] poll the sources, after one of them changed (a timer
    /// reset): it then registers its new state with this waker, whatever it kept across the
    /// change.
    fn open(&self) {
        self.wake.woken.store(true, Ordering::Release);
    }

    /// Polls the sources with `poll_sources` if one of them woke the task since they were last
    /// all pending. The task's waker is registered on every poll, before the flag is read: a
    /// wake sets the flag and then takes the waker, so one that lands between the two steps of
    /// another thread's wake-up (flag seen and cleared here, waker taken there) still finds a
    /// waker and a later wake is not lost; registering only when the flag was set left the slot
    /// empty after such a wake-up, and the socket deaf to its stream, timer and shutdown.
    fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll_sources: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.wake.task.register(cx.waker());
        if !self.wake.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let polled = poll_sources(&mut Context::from_waker(&self.waker));
        if polled.is_ready() {
            // A ready source may be ready again at once (tungstenite may hold further whole
            // frames) without a wake to say so.
            self.open();
        }
        polled
    }
}

/// The first event of a socket's control sources. The shutdown and the timer come first: each
/// fires once per deadline, so it cannot hold back a flood of frames, and a flood of frames
/// cannot hold it back (the lifetime close).
fn poll_controls(
    cx: &mut Context<'_>,
    shutdown: Pin<&mut impl Future<Output = ()>>,
    timer: Pin<&mut tokio::time::Sleep>,
    ws: &mut Ws,
) -> Poll<Event> {
    if shutdown.poll(cx).is_ready() {
        return Poll::Ready(Event::Shutdown);
    }
    if timer.poll(cx).is_ready() {
        return Poll::Ready(Event::Tick);
    }
    ws.poll_next_unpin(cx).map(Event::Incoming)
}

/// One open socket.
struct Socket {
    shared: Arc<Shared>,
    local: LocalChannel,
    controls: Controls,
    path: String,
    client: String,
    order: u64,
    opened: Instant,
    last_client_data: Instant,
    last_activity: Instant,
    ping_sent: Option<Instant>,
    dropped_seen: u64,
    /// Since when every frame of this socket was lost to an unreachable layer.
    losing_since: Option<Instant>,
    /// The socket's inbound rate limit, when it has one.
    limiter: Option<FrameLimiter>,
    /// The verified token's claims, repeated in every `websocket.receive` (encoded once).
    user: Option<UserEntry>,
    /// When the token stops being valid: the socket closes then (auth close code).
    token_expires: Option<Instant>,
    /// The worker that owns this socket's messages, until its lease lapses.
    owner: Option<OwnedBy>,
}

/// The monotonic instant of a wall-clock time (now, when it has passed).
fn instant_at(at: std::time::SystemTime) -> Instant {
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let now = Instant::now();
    now.checked_add(left)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

impl Socket {
    /// The loop. Handlers run boxed: an idle socket's task then holds only the wait for the next
    /// event, not the largest handler's (a layer send is the biggest), which halves its size.
    async fn run(mut self, mut ws: Ws, first: SocketReply) {
        let metrics = Arc::clone(&self.shared.metrics);
        ServerMetrics::inc(&metrics.open_websockets);
        ServerMetrics::inc(&metrics.open_connections);
        ws_log(&self.client, "WSCONNECT", &self.path, None);
        let mut end = Box::pin(self.write_replies(&mut ws, [first])).await;
        let mut deadline = self.next_deadline();
        let timer = tokio::time::sleep_until(deadline.into());
        tokio::pin!(timer);
        // Registered once, not per event: each `cancelled()` future takes the token's lock to
        // enqueue its waker, twice per message otherwise. The inbox's end needs no branch of its
        // own: when its loop ends it closes every local channel, so `recv` ends once drained.
        let shared = Arc::clone(&self.shared);
        let shutdown = shared.shutdown.cancelled();
        tokio::pin!(shutdown);
        let mut replies_first = false;
        while end.is_none() {
            let next = self.next_deadline();
            // A later deadline waits for the armed one: the tick then finds nothing due and the
            // timer moves on, instead of being filed again on every message that moves it.
            if next < deadline || timer.is_elapsed() {
                deadline = next;
                timer.as_mut().reset(deadline.into());
                self.controls.open();
            }
            // The two sources take turns at being polled first: a worker flooding the reply
            // channel must not starve reading (pongs, close replies) or the timers, and a client
            // flooding frames must not starve its replies.
            replies_first = !replies_first;
            let event = std::future::poll_fn(|cx| {
                let mut replies =
                    |cx: &mut Context<'_>| self.local.poll_recv(cx).map(Event::Outgoing);
                let mut others = |cx: &mut Context<'_>| {
                    self.controls.poll(cx, |cx| {
                        poll_controls(cx, shutdown.as_mut(), timer.as_mut(), &mut ws)
                    })
                };
                let first = if replies_first {
                    replies(cx)
                } else {
                    others(cx)
                };
                if first.is_ready() {
                    return first;
                }
                if replies_first {
                    others(cx)
                } else {
                    replies(cx)
                }
            })
            .await;
            end = match event {
                Event::Shutdown => {
                    self.shutdown_stagger().await;
                    Some(End::ServerClosed(1001))
                }
                Event::Outgoing(None) => {
                    tracing::warn!(client = %self.client, path = %self.path, "replies cannot reach this socket any more; closing with 1011");
                    Some(End::ServerClosed(1011))
                }
                Event::Incoming(incoming) => Box::pin(self.on_incoming(&mut ws, incoming)).await,
                Event::Outgoing(Some(envelope)) => {
                    Box::pin(self.write_outgoing(&mut ws, envelope)).await
                }
                Event::Tick => Box::pin(self.on_tick(&mut ws)).await,
            };
        }
        let code = Box::pin(self.finish(&mut ws, end.unwrap_or(End::Dropped))).await;
        ws_log(&self.client, "WSDISCONNECT", &self.path, Some(code));
        ServerMetrics::dec(&metrics.open_websockets);
        ServerMetrics::dec(&metrics.open_connections);
    }

    /// A random pause before a shutdown close, growing with the number of open sockets.
    async fn shutdown_stagger(&self) {
        let open = self
            .shared
            .metrics
            .open_websockets
            .load(std::sync::atomic::Ordering::Relaxed);
        let spread = SHUTDOWN_SPREAD_PER_SOCKET
            .saturating_mul(u32::try_from(open).unwrap_or(u32::MAX))
            .min(self.shared.config.shutdown_grace / 4);
        tokio::time::sleep(spread.mul_f64(rand::random::<f64>())).await;
    }

    /// Writes `first` and whatever else is queued behind it (up to a batch), after applying the
    /// slow-client policy to what the queue dropped.
    async fn write_outgoing(&mut self, ws: &mut Ws, first: Envelope) -> Option<End> {
        let first = self.decode_reply(&first);
        // Empty until a second message waits: the usual case, one message (a broadcast reaches
        // each member once), allocates nothing.
        let mut rest = Vec::new();
        while rest.len() + 1 < WRITE_BATCH {
            match self.local.try_recv() {
                Some(envelope) => rest.extend(self.decode_reply(&envelope)),
                None => break,
            }
        }
        match self.check_overflow() {
            Some(end) => Some(end),
            None => self.write_replies(ws, first.into_iter().chain(rest)).await,
        }
    }

    /// The reply `envelope` carries, or `None` (counted and logged) if it is not one.
    fn decode_reply(&self, envelope: &Envelope) -> Option<SocketReply> {
        match self.shared.frames.decode(envelope) {
            Ok(reply) => Some(reply),
            Err(e) => {
                ServerMetrics::inc(&self.shared.metrics.bad_replies);
                tracing::warn!(channel = %envelope.channel, error = %e, "socket reply ignored");
                None
            }
        }
    }

    /// Applies the slow-client policy to messages the outbound queue dropped.
    fn check_overflow(&mut self) -> Option<End> {
        let dropped = self.local.dropped();
        if dropped == self.dropped_seen {
            return None;
        }
        ServerMetrics::add(
            &self.shared.metrics.slow_client_drops,
            dropped - self.dropped_seen,
        );
        self.dropped_seen = dropped;
        match self.shared.config.slow_client {
            SlowClientPolicy::Drop => None,
            SlowClientPolicy::Close1013 => {
                ServerMetrics::inc(&self.shared.metrics.slow_client_closes);
                tracing::info!(client = %self.client, path = %self.path, "slow client: outbound queue overflowed, closing with 1013");
                Some(End::ServerClosed(1013))
            }
        }
    }

    /// Writes the frames of `replies` (feed each, flush once) and reports a requested close.
    async fn write_replies(
        &mut self,
        ws: &mut Ws,
        replies: impl IntoIterator<Item = SocketReply>,
    ) -> Option<End> {
        let mut close = None;
        let mut frames = 0u64;
        let result = {
            let write = async {
                for reply in replies {
                    if let Some(frame) = reply.frame {
                        ws.feed(frame).await?;
                        frames += 1;
                    }
                    if let Some(code) = reply.close {
                        if let Some(refused) = reply.refused_close {
                            ServerMetrics::inc(&self.shared.metrics.bad_replies);
                            tracing::warn!(client = %self.client, path = %self.path, code = refused, "worker asked for a close code that may not be sent; closing with 1011");
                        }
                        close = Some(code);
                        break;
                    }
                }
                ws.flush().await
            };
            let mut write = std::pin::pin!(write);
            // A write with room in the socket buffer completes on its first poll; only one that has
            // to wait arms the write timeout (a clock read and a timer built per message otherwise).
            match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
                Poll::Ready(written) => Ok(written),
                Poll::Pending => {
                    tokio::time::timeout(self.shared.config.write_timeout, write).await
                }
            }
        };
        ServerMetrics::add(&self.shared.metrics.ws_frames_out, frames);
        if frames > 0 {
            self.last_activity = Instant::now();
        }
        match result {
            Ok(Ok(())) => close.map(End::ServerClosed),
            Ok(Err(WsError::WriteBufferFull(_))) => {
                ServerMetrics::inc(&self.shared.metrics.slow_client_closes);
                Some(End::Dropped)
            }
            Ok(Err(e)) => {
                tracing::debug!(client = %self.client, error = %e, "socket write failed");
                Some(End::Dropped)
            }
            Err(_) => {
                ServerMetrics::inc(&self.shared.metrics.slow_client_closes);
                tracing::info!(client = %self.client, path = %self.path, "slow client: write stalled past the write timeout, dropping");
                Some(End::Dropped)
            }
        }
    }

    async fn on_incoming(
        &mut self,
        ws: &mut Ws,
        incoming: Option<Result<Message, WsError>>,
    ) -> Option<End> {
        let now = Instant::now();
        match incoming {
            None => Some(End::Dropped),
            Some(Ok(message)) => {
                self.last_client_data = now;
                self.ping_sent = None;
                match message {
                    Message::Text(text) => {
                        self.last_activity = now;
                        if let Some(end) = self.throttle(ws, now, text.len()).await {
                            return Some(end);
                        }
                        if let Some(token) = self.shared.auth.refresh_token(text.as_str()) {
                            return self.refresh(token);
                        }
                        self.forward(ws, Some(text.as_str()), None).await
                    }
                    Message::Binary(bytes) => {
                        self.last_activity = now;
                        if let Some(end) = self.throttle(ws, now, bytes.len()).await {
                            return Some(end);
                        }
                        self.forward(ws, None, Some(&bytes)).await
                    }
                    Message::Close(frame) => {
                        Some(End::ClientClosed(frame.map_or(1005, |f| u16::from(f.code))))
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
                }
            }
            Some(Err(e)) => {
                let end = match &e {
                    WsError::Capacity(_) => End::ServerClosed(1009),
                    WsError::Utf8(_) => End::ServerClosed(1007),
                    WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Dropped,
                    WsError::Protocol(_) => End::ServerClosed(1002),
                    _ => End::Dropped,
                };
                tracing::debug!(client = %self.client, error = %e, ?end, "socket read failed");
                Some(end)
            }
        }
    }

    /// A refresh frame's token: a valid one for the socket's `sub` moves its expiry and replaces
    /// its `user`; any other closes the socket with the expiry close code (a client must not
    /// keep a socket on a token it could not renew).
    fn refresh(&mut self, token: &str) -> Option<End> {
        let refused = match self.shared.auth.verify(token) {
            Ok(identity) => {
                let same = self
                    .user
                    .as_ref()
                    .and_then(|u| u.claims().get("sub"))
                    .is_some_and(|sub| identity.user.get("sub") == Some(sub));
                if same {
                    match UserEntry::new(identity.user) {
                        Ok(user) => {
                            ServerMetrics::inc(&self.shared.metrics.token_refreshes);
                            self.token_expires = Some(instant_at(identity.expires_at));
                            self.user = Some(user);
                            return None;
                        }
                        Err(e) => e.to_string(),
                    }
                } else {
                    "not the socket's sub (or the socket has no token)".to_owned()
                }
            }
            Err(refusal) => format!("{refusal:?}"),
        };
        ServerMetrics::inc(&self.shared.metrics.token_refreshes_refused);
        tracing::info!(client = %self.client, path = %self.path, reason = %refused, "token refresh refused; closing");
        Some(End::ServerClosed(self.shared.auth.expired_close_code))
    }

    /// Applies the socket's rate limit to a frame of `len` bytes read at `now`: returns at once
    /// when it is within the limit; otherwise waits as long as the limit says, reading nothing
    /// (TCP pushes back on the client) while replies keep going out; or, for a socket over its
    /// limit longer than `close_after`, ends it with 1008 (the frame is not forwarded).
    async fn throttle(&mut self, ws: &mut Ws, now: Instant, len: usize) -> Option<End> {
        let wait = match self.limiter.as_mut()?.admit(now, len) {
            Admit::Now => return None,
            Admit::After(wait) => wait,
            Admit::Close => {
                ServerMetrics::inc(&self.shared.metrics.ws_rate_limit_closes);
                tracing::info!(client = %self.client, path = %self.path, "client stayed over its rate limit; closing with 1008");
                return Some(End::ServerClosed(1008));
            }
        };
        ServerMetrics::inc(&self.shared.metrics.ws_frames_throttled);
        let pause = tokio::time::sleep(wait);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                biased;
                _ = &mut pause => return None,
                Some(envelope) = self.local.recv() => {
                    if let Some(end) = self.write_outgoing(ws, envelope).await {
                        return Some(end);
                    }
                }
            }
        }
    }

    /// Sends one client frame as `websocket.receive`. A full layer is retried for
    /// `backpressure_timeout` (reading nothing meanwhile, so TCP pushes back), then the socket is
    /// closed with 1013; an unreachable layer loses the frame (counted) but keeps the socket. The
    /// `order` only advances for frames that were sent, so a consumer enforcing order never waits
    /// for a frame that cannot come. Replies keep going out while the send waits: a room member
    /// that also sends would otherwise let its own queue overflow behind a slow send and be
    /// closed as a slow client. A reply that ends the socket stops the writing, not the send: a
    /// send already written to Redis may land, so it is awaited (no more retries) and its outcome
    /// counted before the disconnect takes the next `order`.
    async fn forward(
        &mut self,
        ws: &mut Ws,
        text: Option<&str>,
        bytes: Option<&[u8]>,
    ) -> Option<End> {
        let message = ReceiveRef {
            reply_channel: self.local.name(),
            path: &self.path,
            text,
            bytes: bytes.map(BinRef),
            order: self.order + 1,
        };
        let payload = match receive::encode(&message, self.user.as_ref()) {
            Ok(payload) => payload,
            Err(e) => {
                ServerMetrics::inc(&self.shared.metrics.ws_frames_lost);
                tracing::warn!(client = %self.client, path = %self.path, error = %e, "websocket.receive not encoded; frame dropped");
                return None;
            }
        };
        let give_up = AtomicBool::new(false);
        let shared = Arc::clone(&self.shared);
        let destination = self.destination().await;
        let send = async {
            let channel = destination?;
            let channel = channel.as_deref().unwrap_or(WEBSOCKET_RECEIVE);
            send_server_fed(&shared, channel, &payload, Some(&give_up)).await
        };
        tokio::pin!(send);
        let mut ended_meanwhile = None;
        let outcome = loop {
            // The send first: one that completes at once never registers for replies.
            tokio::select! {
                biased;
                outcome = &mut send => break outcome,
                Some(envelope) = self.local.recv(), if ended_meanwhile.is_none() => {
                    ended_meanwhile = self.write_outgoing(ws, envelope).await;
                    if ended_meanwhile.is_some() {
                        give_up.store(true, Ordering::Relaxed);
                    }
                }
            }
        };
        if outcome.is_ok() {
            self.losing_since = None;
        }
        match outcome {
            Ok(()) => {
                self.order += 1;
                ServerMetrics::inc(&self.shared.metrics.ws_frames_in);
                self.after_owned_send().await;
                ended_meanwhile
            }
            Err(_) if ended_meanwhile.is_some() => {
                ServerMetrics::inc(&self.shared.metrics.ws_frames_lost);
                ended_meanwhile
            }
            Err(e) if e.is_full() => {
                ServerMetrics::inc(&self.shared.metrics.ws_receive_full_closes);
                tracing::warn!(client = %self.client, path = %self.path, "websocket.receive full; closing with 1013");
                Some(End::ServerClosed(1013))
            }
            Err(e) => {
                ServerMetrics::inc(&self.shared.metrics.ws_frames_lost);
                if self.shared.lost_frame_log.allow() {
                    tracing::warn!(client = %self.client, path = %self.path, error = %e, "websocket.receive not sent; frame dropped (logged at most once a second)");
                }
                let since = *self.losing_since.get_or_insert_with(Instant::now);
                // A client whose frames have gone nowhere for this long is told so: 1011 lets
                // it reconnect (to a healthy server, or this one once Redis is back).
                if since.elapsed() >= self.shared.config.layer_outage_close {
                    ServerMetrics::inc(&self.shared.metrics.ws_outage_closes);
                    tracing::warn!(client = %self.client, path = %self.path, "the channel layer has been unreachable too long; closing with 1011");
                    return Some(End::ServerClosed(1011));
                }
                None
            }
        }
    }

    /// Where the socket's next message goes: its owner's channel, or (`None`) the shared one.
    /// A socket whose owner's lease lapsed is first taken back: what waits in the owner's
    /// channel is moved to the shared ones and the layer's ordering state set to continue from
    /// there (or from the order this message takes), before anything is sent past it.
    async fn destination(&mut self) -> Result<Option<Arc<str>>, LayerError> {
        let Some(owner) = &self.owner else {
            return Ok(None);
        };
        if !owner.lapsed() {
            return Ok(Some(owner.channel()));
        }
        self.shared
            .layer
            .take_back_owned(owner.name(), Some((self.local.name(), self.order + 1)))
            .await?;
        ServerMetrics::inc(&self.shared.metrics.ws_owner_takebacks);
        self.owner = None;
        Ok(None)
    }

    /// A frame sent to an owner found lapsed meanwhile may have landed after the take-back that
    /// emptied the owner's channel: the socket is taken back now, which moves it too, instead
    /// of leaving it there until the socket's next message.
    async fn after_owned_send(&mut self) {
        if self.owner.as_ref().is_some_and(OwnedBy::lapsed)
            && let Err(e) = self.destination().await
        {
            tracing::debug!(client = %self.client, error = %e, "could not take the socket back yet; it is before its next message");
        }
    }

    fn next_deadline(&self) -> Instant {
        let c = &self.shared.config;
        let far = |from: Instant, d: Duration| {
            from.checked_add(d)
                .unwrap_or_else(|| from + Duration::from_secs(365 * 86_400))
        };
        let mut next = match self.ping_sent {
            Some(sent) => far(sent, c.ping_timeout),
            None => far(self.last_client_data, c.ping_interval),
        };
        if let Some(idle) = c.idle_timeout {
            next = next.min(far(self.last_activity, idle));
        }
        if let Some(expires) = self.token_expires {
            next = next.min(expires);
        }
        next.min(far(self.opened, self.shared.lifetime))
    }

    async fn on_tick(&mut self, ws: &mut Ws) -> Option<End> {
        let now = Instant::now();
        let c = &self.shared.config;
        if now.duration_since(self.opened) >= self.shared.lifetime {
            return Some(End::ServerClosed(1000));
        }
        if self.token_expires.is_some_and(|expires| now >= expires) {
            ServerMetrics::inc(&self.shared.metrics.token_expired_closes);
            tracing::info!(client = %self.client, path = %self.path, "token expired; closing");
            return Some(End::ServerClosed(self.shared.auth.expired_close_code));
        }
        if c.idle_timeout
            .is_some_and(|idle| now.duration_since(self.last_activity) >= idle)
        {
            return Some(End::ServerClosed(1000));
        }
        match self.ping_sent {
            Some(sent) if now.duration_since(sent) >= c.ping_timeout => {
                ServerMetrics::inc(&self.shared.metrics.ping_timeouts);
                tracing::info!(client = %self.client, path = %self.path, "no pong within the ping timeout; dropping");
                Some(End::Dropped)
            }
            None if now.duration_since(self.last_client_data) >= c.ping_interval => {
                self.ping_sent = Some(now);
                let ping = async {
                    ws.feed(Message::Ping(Default::default())).await?;
                    ws.flush().await
                };
                match tokio::time::timeout(c.write_timeout, ping).await {
                    Ok(Ok(())) => None,
                    _ => Some(End::Dropped),
                }
            }
            _ => None,
        }
    }

    /// Closes the socket as `end` says and sends `websocket.disconnect`; returns its code.
    async fn finish(&mut self, ws: &mut Ws, end: End) -> u16 {
        let code = match end {
            End::ClientClosed(code) => {
                // tungstenite queued the close reply; reading on flushes it and ends the stream.
                let _ =
                    tokio::time::timeout(CLOSE_WAIT, async { while ws.next().await.is_some() {} })
                        .await;
                code
            }
            End::ServerClosed(code) => {
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: "".into(),
                };
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    if ws.close(Some(frame)).await.is_ok() {
                        while ws.next().await.is_some() {}
                    }
                })
                .await;
                code
            }
            End::Dropped => 1006,
        };
        let message =
            WebsocketDisconnect::new(self.local.name(), self.path.clone(), code, self.order + 1);
        let channel = match self.destination().await {
            Ok(channel) => channel,
            Err(e) => {
                // The layer's ordering runs a disconnect late rather than never.
                tracing::warn!(client = %self.client, path = %self.path, error = %e, "could not take the socket back from its lapsed owner; its disconnect goes to the shared channel");
                self.owner = None;
                None
            }
        };
        send_disconnect(
            &self.shared,
            channel.as_deref().unwrap_or(WEBSOCKET_DISCONNECT),
            &message,
        )
        .await;
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its wakes.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A source's wake on another thread is two steps (set the flag, take the task's waker); a
    /// poll can run between them. Replayed step by step: the wake after it must still reach the
    /// task.
    #[test]
    fn a_wake_split_by_a_poll_leaves_the_task_wakeable() {
        let controls = Controls::new();
        let task = Arc::new(CountingWaker::default());
        let task_waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&task_waker);
        let pending = |_: &mut Context<'_>| Poll::<()>::Pending;
        // First poll: the sources register (the flag starts set).
        assert!(controls.poll(&mut cx, pending).is_pending());
        // A source wakes: its first step sets the flag...
        controls.wake.woken.store(true, Ordering::Release);
        // ...the task, woken by a reply meanwhile, polls: it sees the flag and the sources are
        // pending again...
        assert!(controls.poll(&mut cx, pending).is_pending());
        // ...and the wake's second step takes the waker and wakes the task.
        controls.wake.task.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        // The task runs once more, finds nothing new and parks.
        assert!(controls.poll(&mut cx, pending).is_pending());
        // A later wake of a source must reach it.
        controls.waker.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 2, "the later wake was lost");
        // And the poll it causes polls the sources.
        let mut polled = false;
        let _ = controls.poll(&mut cx, |_| {
            polled = true;
            Poll::<()>::Pending
        });
        assert!(polled);
    }
}

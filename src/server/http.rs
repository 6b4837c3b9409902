//! Plain HTTP requests, each sent as one `http.request` whose response (status and headers, then body
//! chunks while `more_content`) streams back from the request's reply channel. A request body too
//! large for the message (when streaming is configured) follows it as `http.request.body?` chunks
//! from a [`BodyPump`] task, read from the client as they arrive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body_util::{BodyExt, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use switchyard_routing::ByteString;
use switchyard_routing::asgi::{
    HTTP_DISCONNECT, HTTP_REQUEST, HttpDisconnect, HttpRequest, HttpRequestBodyChunk, HttpResponse,
};
use switchyard_routing::codec;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::feed::send_server_fed;
use super::metrics::ServerMetrics;
use super::request::{HostPortText, RequestHead};
use super::response::{ACCESS_LOG, Body, full, plain, unauthorized, unavailable};
use crate::layer::{FullRetry, LayerError, LocalChannel};

/// Sends `http.disconnect` when dropped while armed: the client went away (or the response was
/// cut) before the response completed.
pub(crate) struct DisconnectGuard {
    shared: Arc<Shared>,
    reply_channel: String,
    path: String,
    armed: bool,
}

impl std::fmt::Debug for DisconnectGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DisconnectGuard")
            .field("reply_channel", &self.reply_channel)
            .field("armed", &self.armed)
            .finish()
    }
}

impl DisconnectGuard {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let message = HttpDisconnect::new(
            std::mem::take(&mut self.reply_channel),
            std::mem::take(&mut self.path),
        );
        if tokio::runtime::Handle::try_current().is_ok() {
            shared.tracker.clone().spawn(async move {
                ServerMetrics::inc(&shared.metrics.http_disconnects);
                // "If ChannelFull is raised, then give up" (ASGI 1.0).
                if let Err(e) = shared.layer.send(HTTP_DISCONNECT, &message).await {
                    tracing::debug!(error = %e, "http.disconnect not sent");
                }
            });
        }
    }
}

pub(crate) async fn http_request(
    shared: Arc<Shared>,
    peer: SocketAddr,
    tls: bool,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    ServerMetrics::inc(&shared.metrics.http_requests);
    let method = req.method().as_str().to_owned();
    let (parts, body) = req.into_parts();
    let mut head = match RequestHead::from_parts(
        &parts.uri,
        &parts.headers,
        peer,
        shared.local_addr,
        shared.config.proxy_headers,
    ) {
        Ok(head) => head,
        Err(_) => {
            let resp = plain(StatusCode::BAD_REQUEST, "Invalid characters in path\n");
            access_log(&peer, &method, parts.uri.path(), resp.status(), started);
            return resp;
        }
    };
    head.secure |= tls;
    let user = if shared.auth.is_off() {
        None
    } else {
        match shared
            .auth
            .check(&head.path, &parts.headers, parts.uri.query())
        {
            Ok(identity) => identity.map(|i| i.user),
            Err(refusal) => {
                ServerMetrics::inc(&shared.metrics.auth_refused);
                tracing::debug!(path = %head.path, ?refusal, "request refused by authentication");
                let resp = unauthorized(refusal.text());
                access_log(&peer, &method, &head.path, resp.status(), started);
                return resp;
            }
        }
    };
    // The access log is usually off (`--log warn`): then nothing is kept or formatted for it.
    let logged = tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO)
        .then(|| (head.client.clone(), head.path.clone()));
    let resp = respond(&shared, parts, body, head, user, &method).await;
    if let Some((client, path)) = logged {
        access_log(
            &HostPortText(&client),
            &method,
            &path,
            resp.status(),
            started,
        );
    }
    resp
}

fn access_log(
    client: &dyn std::fmt::Display,
    method: &str,
    path: &str,
    status: StatusCode,
    started: Instant,
) {
    tracing::info!(
        target: ACCESS_LOG,
        client = %client,
        method = %method,
        path = %path,
        status = status.as_u16(),
        duration_ms = started.elapsed().as_millis() as u64,
        "{method} {path} {}",
        status.as_u16()
    );
}

async fn respond(
    shared: &Arc<Shared>,
    parts: hyper::http::request::Parts,
    body: Incoming,
    head: RequestHead,
    user: Option<switchyard_routing::Map>,
    method: &str,
) -> Response<Body> {
    let config = &shared.config;
    let hard_limit = request_body_limit(config);
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > hard_limit as u64) {
        return too_large(shared);
    }
    let start = if hard_limit > config.max_body_size {
        read_body_start(config, body, declared).await
    } else {
        read_whole_body(config, body).await
    };
    let (in_message, rest) = match start {
        Ok(BodyStart::Whole(bytes)) => (bytes, None),
        Ok(BodyStart::Partial(head, rest)) => (head, Some(rest)),
        Err(BodyError::TooLarge) => return too_large(shared),
        Err(BodyError::Unreadable) => {
            return plain(StatusCode::BAD_REQUEST, "Request body unreadable\n");
        }
        Err(BodyError::TooSlow) => {
            return plain(StatusCode::REQUEST_TIMEOUT, "Request body too slow\n");
        }
    };
    if shared.inbox_gone.is_cancelled() {
        return unavailable(shared, "Replies cannot be received\n");
    }
    let mut local = shared.inbox.channel_with_buffer(config.outbound_queue);
    let path = head.path.clone();
    let mut message = request_message(config, parts.version, head, &in_message, user, method);
    message.reply_channel = local.name().to_owned();
    let body_channel = if rest.is_some() {
        match shared.layer.new_channel(BODY_CHANNEL_PATTERN) {
            Ok(name) => Some(name),
            Err(e) => {
                tracing::error!(error = %e, "cannot name a request body channel");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error\n");
            }
        }
    } else {
        None
    };
    message.body_channel = body_channel.clone();
    let sent = match codec::to_msgpack(&message) {
        Ok(payload) => send_server_fed(shared, HTTP_REQUEST, &payload, None).await,
        Err(e) => Err(e.into()),
    };
    if let Err(e) = sent {
        return send_failed(shared, &e);
    }
    drop(message);
    drop(in_message);
    let mut guard = DisconnectGuard {
        shared: Arc::clone(shared),
        reply_channel: local.name().to_owned(),
        path,
        armed: true,
    };
    // The rest of the body goes out from its own task, so the worker's response (which may come
    // before the body is complete) is still awaited here. Whenever this request ends first
    // (answered, or dropped because the connection died), the pump stops and says `closed`.
    let stop_pump = CancellationToken::new();
    let _stop_pump_on_exit = stop_pump.clone().drop_guard();
    let mut pump_end = match (rest, body_channel) {
        (Some(rest), Some(channel)) => {
            let (tx, rx) = oneshot::channel();
            let pump = BodyPump {
                shared: Arc::clone(shared),
                channel,
                stop: stop_pump.clone(),
                hard_limit: hard_limit as u64,
                declared,
            };
            shared.tracker.spawn(async move {
                let _ = tx.send(pump.run(rest).await);
            });
            Some(rx)
        }
        _ => None,
    };
    // While the body is still going out, the worker cannot be expected to answer yet.
    let deadline = pump_end
        .is_none()
        .then(|| super::deadline_after(config.http_timeout));
    let first = match first_reply(shared, &mut local, &mut guard, &mut pump_end, deadline).await {
        Ok(first) => first,
        Err(refusal) => return refusal,
    };
    let builder = response_head(shared, &first);
    let content = Bytes::from(first.content.into_vec());
    let body = if first.more_content {
        streaming_body(Arc::clone(shared), local, guard, content)
    } else {
        guard.disarm();
        full(content)
    };
    builder
        .body(body)
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "Invalid response\n"))
}

/// The `http.request` for a request whose body starts with `in_message` (its reply channel is
/// set by the caller).
fn request_message(
    config: &super::ServerConfig,
    version: hyper::Version,
    head: RequestHead,
    in_message: &[u8],
    user: Option<switchyard_routing::Map>,
    method: &str,
) -> HttpRequest {
    let mut message = HttpRequest::new(String::new(), method, head.path);
    message.http_version = match version {
        hyper::Version::HTTP_10 => "1.0",
        hyper::Version::HTTP_2 => "2",
        _ => "1.1",
    }
    .to_owned();
    message.scheme = if head.secure { "https" } else { "http" }.to_owned();
    message.query_string = head.query_string;
    message.root_path = config.root_path.clone();
    message.headers = head.headers;
    message.body = ByteString::from(in_message.to_vec());
    message.client = Some(head.client);
    message.server = Some(head.server);
    message.user = user;
    message
}

/// Waits for the worker's first response message (status and headers), while the rest of the
/// body may still be going out; `Err` is the answer the server gives instead (400, 503, 504, or
/// the pump's failure). No deadline runs until the body is out.
async fn first_reply(
    shared: &Arc<Shared>,
    local: &mut LocalChannel,
    guard: &mut DisconnectGuard,
    pump_end: &mut Option<oneshot::Receiver<PumpEnd>>,
    mut deadline: Option<tokio::time::Instant>,
) -> Result<HttpResponse, Response<Body>> {
    loop {
        let reply = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, local.recv()).await.ok(),
                None => Some(local.recv().await),
            }
        };
        let pumped = async {
            match pump_end.as_mut() {
                Some(rx) => rx.await.unwrap_or(PumpEnd::Lost),
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            _ = shared.inbox_gone.cancelled() => Some(None),
            next = reply => next.map(|n| n.map(Ok)),
            end = pumped => Some(Some(Err(end))),
        };
        let next = match next {
            Some(Some(Err(end))) => {
                *pump_end = None;
                match end {
                    PumpEnd::Complete => {
                        deadline = Some(super::deadline_after(shared.config.http_timeout));
                        continue;
                    }
                    PumpEnd::ClientGone => {
                        // The connection is most likely dead; the guard's drop says so.
                        return Err(plain(StatusCode::BAD_REQUEST, "Request body incomplete\n"));
                    }
                    other => {
                        guard.disarm();
                        return Err(pump_failed(shared, other));
                    }
                }
            }
            Some(Some(Ok(envelope))) => Some(Some(envelope)),
            Some(None) => Some(None),
            None => None,
        };
        match next {
            Some(Some(envelope)) => match envelope.decode::<HttpResponse>() {
                Ok(r) if r.status.is_some() => return Ok(r),
                Ok(_) => {
                    ServerMetrics::inc(&shared.metrics.bad_replies);
                    tracing::warn!(channel = %envelope.channel, "HTTP response without a status ignored");
                }
                Err(e) => {
                    ServerMetrics::inc(&shared.metrics.bad_replies);
                    tracing::warn!(channel = %envelope.channel, error = %e, "undecodable HTTP response ignored");
                }
            },
            Some(None) => {
                tracing::warn!(channel = %local.name(), "replies cannot be received; answering 503");
                return Err(unavailable(shared, "Replies cannot be received\n"));
            }
            None => {
                // The guard stays armed: a consumer still working on the request (or about to
                // stream it) learns from `http.disconnect` that nobody waits for it any more.
                ServerMetrics::inc(&shared.metrics.http_504);
                return Err(plain(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Worker failed to respond within time limit\n",
                ));
            }
        }
    }
}

/// The response's status and headers from the worker's first message; an invalid header is
/// dropped and counted.
fn response_head(shared: &Shared, first: &HttpResponse) -> hyper::http::response::Builder {
    ServerMetrics::inc(&shared.metrics.http_responses);
    let status = first
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut builder = Response::builder().status(status);
    for (name, value) in &first.headers {
        match (
            HeaderName::from_bytes(name.as_slice()),
            HeaderValue::from_bytes(value.as_slice()),
        ) {
            (Ok(n), Ok(v)) => builder = builder.header(n, v),
            _ => {
                ServerMetrics::inc(&shared.metrics.bad_replies);
                tracing::warn!(header = ?name, "invalid response header from worker dropped");
            }
        }
    }
    builder
}

/// The rest of a response: chunks from the reply channel until one says `more_content: false`.
/// A chunk that does not come within `http_timeout`, or one dropped because the client reads too
/// slowly, cuts the response (the connection is closed mid-body, so the client sees it is
/// incomplete) and sends `http.disconnect`.
fn streaming_body(
    shared: Arc<Shared>,
    local: LocalChannel,
    guard: DisconnectGuard,
    first: Bytes,
) -> Body {
    struct State {
        shared: Arc<Shared>,
        local: LocalChannel,
        guard: DisconnectGuard,
        first: Option<Bytes>,
        done: bool,
    }
    let state = State {
        shared,
        local,
        guard,
        first: Some(first),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if let Some(first) = s.first.take() {
            return Some((Ok(Frame::data(first)), s));
        }
        if s.done {
            return None;
        }
        loop {
            let next = tokio::select! {
                _ = s.shared.inbox_gone.cancelled() => Ok(None),
                next = tokio::time::timeout(s.shared.config.http_timeout, s.local.recv()) => next,
            };
            let failure = match next {
                Ok(Some(envelope)) => {
                    if s.local.dropped() > 0 {
                        "response chunks dropped: client reads too slowly"
                    } else {
                        match envelope.decode::<HttpResponse>() {
                            Ok(chunk) => {
                                if !chunk.more_content {
                                    s.done = true;
                                    s.guard.disarm();
                                }
                                let data = Bytes::from(chunk.content.into_vec());
                                return Some((Ok(Frame::data(data)), s));
                            }
                            Err(e) => {
                                ServerMetrics::inc(&s.shared.metrics.bad_replies);
                                tracing::warn!(error = %e, "undecodable response chunk ignored");
                                continue;
                            }
                        }
                    }
                }
                Ok(None) => "replies cannot be received",
                Err(_) => "no response chunk within the HTTP timeout",
            };
            ServerMetrics::inc(&s.shared.metrics.http_aborted_streams);
            tracing::warn!(channel = %s.local.name(), "streaming response cut: {failure}");
            s.done = true;
            return Some((Err(std::io::Error::other(failure)), s));
        }
    });
    StreamBody::new(stream.boxed()).boxed_unsync()
}

/// The response when the layer refused `http.request`.
fn send_failed(shared: &Shared, e: &LayerError) -> Response<Body> {
    if e.is_full() {
        tracing::warn!(error = %e, "http.request refused: layer full");
        unavailable(shared, "Request queue full\n")
    } else if e.is_unavailable() {
        tracing::warn!(error = %e, "http.request not sent: layer unavailable");
        unavailable(shared, "Channel layer unavailable\n")
    } else {
        tracing::error!(error = %e, "http.request not sent");
        plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error\n")
    }
}

/// Pattern of the single-reader channels carrying streamed request bodies.
const BODY_CHANNEL_PATTERN: &str = "http.request.body?";

/// The hard limit on a request body: `max_request_body`, never below `max_body_size`.
fn request_body_limit(config: &super::ServerConfig) -> usize {
    config
        .max_request_body
        .unwrap_or(config.max_body_size)
        .max(config.max_body_size)
}

fn too_large(shared: &Shared) -> Response<Body> {
    ServerMetrics::inc(&shared.metrics.http_413);
    plain(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large\n")
}

/// What was read of a request body before `http.request` is sent.
enum BodyStart {
    /// The whole body (at most `max_body_size`).
    Whole(Bytes),
    /// Its first `max_body_size` bytes, and the rest still to stream.
    Partial(Bytes, BodyRest),
}

/// The unread part of a streamed body: bytes read past the in-message part, and the body.
struct BodyRest {
    pending: BytesMut,
    received: u64,
    body: Incoming,
}

/// Why a request body could not be read.
enum BodyError {
    TooLarge,
    Unreadable,
    TooSlow,
}

/// The whole body, at most `max_body_size`, within `http_timeout` (no streaming configured).
async fn read_whole_body(
    config: &super::ServerConfig,
    body: Incoming,
) -> Result<BodyStart, BodyError> {
    match tokio::time::timeout(
        config.http_timeout,
        Limited::new(body, config.max_body_size).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => Ok(BodyStart::Whole(collected.to_bytes())),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Ok(Err(_)) => Err(BodyError::Unreadable),
        Err(_) => Err(BodyError::TooSlow),
    }
}

/// Reads up to `max_body_size` bytes within `http_timeout`; stops as soon as there is more, so a
/// body to stream is never held whole.
async fn read_body_start(
    config: &super::ServerConfig,
    mut body: Incoming,
    declared: Option<u64>,
) -> Result<BodyStart, BodyError> {
    let limit = config.max_body_size;
    let read = async {
        let mut buf = BytesMut::new();
        let mut received = 0u64;
        loop {
            match body.frame().await {
                None => {
                    if declared.is_some_and(|n| received < n) {
                        return Err(BodyError::Unreadable);
                    }
                    return Ok(BodyStart::Whole(buf.freeze()));
                }
                Some(Err(_)) => return Err(BodyError::Unreadable),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        received += data.len() as u64;
                        buf.extend_from_slice(&data);
                        if buf.len() > limit {
                            let head = buf.split_to(limit).freeze();
                            return Ok(BodyStart::Partial(
                                head,
                                BodyRest {
                                    pending: buf,
                                    received,
                                    body,
                                },
                            ));
                        }
                    }
                }
            }
        }
    };
    tokio::time::timeout(config.http_timeout, read)
        .await
        .unwrap_or(Err(BodyError::TooSlow))
}

/// How the streaming of a body's rest ended.
#[derive(Debug)]
enum PumpEnd {
    /// Every chunk sent, the last with `more_content: false`.
    Complete,
    /// The client went away (or sent a broken body) mid-upload.
    ClientGone,
    /// The body grew past the hard limit (no or a false `Content-Length`).
    TooLarge,
    /// No body bytes from the client within `http_timeout`.
    TooSlow,
    /// The layer refused a chunk (full past `backpressure_timeout`, or unavailable).
    Refused(LayerError),
    /// The request ended first (answered, or its connection dropped).
    Stopped,
    /// The pump task died without a word.
    Lost,
}

/// Streams the rest of one request body to its `body_channel`.
struct BodyPump {
    shared: Arc<Shared>,
    channel: String,
    stop: CancellationToken,
    hard_limit: u64,
    declared: Option<u64>,
}

impl BodyPump {
    /// Sends chunks as the client's bytes arrive (holding at most one chunk plus one read), the
    /// last with `more_content: false`; any other end is told to the reader with `closed: true`.
    async fn run(self, rest: BodyRest) -> PumpEnd {
        let BodyRest {
            mut pending,
            mut received,
            mut body,
        } = rest;
        let chunk_size = self.shared.config.body_chunk_size;
        let read_timeout = self.shared.config.http_timeout;
        let end = 'pump: loop {
            // Strictly more than a chunk: the last chunk is never empty.
            while pending.len() > chunk_size {
                let piece = pending.split_to(chunk_size).freeze();
                if let Err(end) = self.send(piece, true).await {
                    break 'pump end;
                }
            }
            let frame = tokio::select! {
                _ = self.stop.cancelled() => break 'pump PumpEnd::Stopped,
                frame = tokio::time::timeout(read_timeout, body.frame()) => frame,
            };
            match frame {
                Err(_) => break PumpEnd::TooSlow,
                Ok(None) => {
                    if self.declared.is_some_and(|n| received < n) {
                        break PumpEnd::ClientGone;
                    }
                    let last = pending.split().freeze();
                    break match self.send(last, false).await {
                        Ok(()) => PumpEnd::Complete,
                        Err(end) => end,
                    };
                }
                Ok(Some(Err(e))) => {
                    tracing::debug!(channel = %self.channel, error = %e, "request body cut");
                    break PumpEnd::ClientGone;
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        received += data.len() as u64;
                        if received > self.hard_limit {
                            break PumpEnd::TooLarge;
                        }
                        pending.extend_from_slice(&data);
                    }
                }
            }
        };
        if !matches!(end, PumpEnd::Complete) {
            self.close().await;
            tracing::info!(channel = %self.channel, end = ?end, received, "streamed request body abandoned");
        }
        end
    }

    /// One chunk, waiting for room while the channel is full with the layer's retry policy for
    /// `backpressure_timeout` ("wait and try again until it is accepted", bounded so a dead
    /// worker cannot pin us); the client's body is not read meanwhile.
    async fn send(&self, content: Bytes, more_content: bool) -> Result<(), PumpEnd> {
        let mut chunk = HttpRequestBodyChunk::default();
        chunk.content = ByteString::from(content.to_vec());
        chunk.more_content = more_content;
        let payload = codec::to_msgpack(&chunk).map_err(|e| PumpEnd::Refused(e.into()))?;
        let metrics = &self.shared.metrics;
        let mut retry = FullRetry::new(self.shared.config.backpressure_timeout);
        loop {
            if self.stop.is_cancelled() {
                return Err(PumpEnd::Stopped);
            }
            let error = match self
                .shared
                .layer
                .send_encoded(&self.channel, &payload)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if error.is_full() && retry.refusals() == 0 {
                ServerMetrics::inc(&metrics.backpressure_waits);
            }
            match retry.next_pause(&error) {
                Some(pause) => tokio::select! {
                    _ = self.stop.cancelled() => return Err(PumpEnd::Stopped),
                    _ = tokio::time::sleep(pause) => {}
                },
                None => {
                    if error.is_full() {
                        ServerMetrics::inc(&metrics.backpressure_refusals);
                    }
                    return Err(PumpEnd::Refused(error));
                }
            }
        }
    }

    /// Tells the body's reader to abandon the request (one try: the channel may be full or the
    /// layer down, and the reader's own timeout covers that).
    async fn close(&self) {
        let mut chunk = HttpRequestBodyChunk::default();
        chunk.closed = true;
        if let Err(e) = self.shared.layer.send(&self.channel, &chunk).await {
            tracing::debug!(channel = %self.channel, error = %e, "closed body chunk not sent");
        }
    }
}

/// The response when a streamed body could not be delivered.
fn pump_failed(shared: &Shared, end: PumpEnd) -> Response<Body> {
    match end {
        PumpEnd::TooLarge => too_large(shared),
        PumpEnd::TooSlow => plain(StatusCode::REQUEST_TIMEOUT, "Request body too slow\n"),
        PumpEnd::Refused(e) if e.is_full() => {
            tracing::warn!(error = %e, "request body chunk refused: layer full");
            unavailable(shared, "Request body queue full\n")
        }
        PumpEnd::Refused(e) if e.is_unavailable() => {
            tracing::warn!(error = %e, "request body chunk not sent: layer unavailable");
            unavailable(shared, "Channel layer unavailable\n")
        }
        other => {
            tracing::error!(end = ?other, "streamed request body failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error\n")
        }
    }
}

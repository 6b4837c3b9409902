//! The hyper service: `/healthz`, WebSocket handshakes (handed to [`super::websocket`]), and plain
//! HTTP requests, each sent as one `http.request` whose response (status and headers, then body
//! chunks while `more_content`) streams back from the request's reply channel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use switchyard_routing::ByteString;
use switchyard_routing::asgi::{
    HTTP_DISCONNECT, HTTP_REQUEST, HttpDisconnect, HttpRequest, HttpResponse,
};
use tokio::sync::OwnedSemaphorePermit;

use super::metrics::ServerMetrics;
use super::request::RequestHead;
use super::{Shared, websocket};
use crate::layer::{LayerError, LocalChannel};

/// Every response body the server produces.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Target of the access log lines.
pub(crate) const ACCESS_LOG: &str = "switchyard::access";

/// Entry point for every request on every connection.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    permit: Arc<OwnedSemaphorePermit>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if path == "/healthz" || path.strip_prefix(shared.config.root_path.as_str()) == Some("/healthz")
    {
        return Ok(healthz(&shared).await);
    }
    if websocket::is_upgrade(&req) {
        return Ok(websocket::handshake(shared, peer, permit, req).await);
    }
    Ok(http_request(shared, peer, req).await)
}

/// A small plain-text response.
pub(crate) fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A 503 telling the client when to come back.
pub(crate) fn unavailable(shared: &Shared, text: &'static str) -> Response<Body> {
    ServerMetrics::inc(&shared.metrics.http_503);
    let mut resp = plain(StatusCode::SERVICE_UNAVAILABLE, text);
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// `/healthz`: answered here, never by a worker. 200 while the server runs; `layer` says whether
/// the channel layer answered within a second (a liveness probe should not restart the server
/// because Redis is down, a readiness probe can look at the field).
async fn healthz(shared: &Shared) -> Response<Body> {
    let layer_ok = matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            shared.layer.channel_depth(HTTP_REQUEST)
        )
        .await,
        Ok(Ok(_))
    );
    let m = shared.metrics.snapshot();
    let body = serde_json::json!({
        "status": "ok",
        "layer": if layer_ok { "ok" } else { "unavailable" },
        "open_connections": m.open_connections,
        "open_websockets": m.open_websockets,
        "uptime_seconds": shared.started.elapsed().as_secs(),
    })
    .to_string();
    let mut resp = Response::new(full(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

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

async fn http_request(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    ServerMetrics::inc(&shared.metrics.http_requests);
    let method = req.method().as_str().to_owned();
    let (parts, body) = req.into_parts();
    let head = match RequestHead::from_parts(
        &parts.uri,
        &parts.headers,
        peer,
        shared.local_addr,
        shared.config.proxy_headers,
    ) {
        Ok(head) => head,
        Err(_) => {
            let resp = plain(StatusCode::BAD_REQUEST, "Invalid characters in path\n");
            access_log(
                &peer.to_string(),
                &method,
                parts.uri.path(),
                resp.status(),
                started,
            );
            return resp;
        }
    };
    let client = format!("{}:{}", head.client.0, head.client.1);
    let path = head.path.clone();
    let resp = respond(&shared, parts, body, head, &method).await;
    access_log(&client, &method, &path, resp.status(), started);
    resp
}

fn access_log(client: &str, method: &str, path: &str, status: StatusCode, started: Instant) {
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
    method: &str,
) -> Response<Body> {
    let config = &shared.config;
    let too_large = || {
        ServerMetrics::inc(&shared.metrics.http_413);
        plain(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large\n")
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > config.max_body_size as u64) {
        return too_large();
    }
    let body = match tokio::time::timeout(
        config.http_timeout,
        Limited::new(body, config.max_body_size).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Ok(Err(_)) => return plain(StatusCode::BAD_REQUEST, "Request body unreadable\n"),
        Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "Request body too slow\n"),
    };
    let mut local = shared.inbox.channel_with_buffer(config.outbound_queue);
    let mut message = HttpRequest::new(local.name(), method, head.path.clone());
    message.http_version = match parts.version {
        hyper::Version::HTTP_10 => "1.0",
        hyper::Version::HTTP_2 => "2",
        _ => "1.1",
    }
    .to_owned();
    message.scheme = if head.secure { "https" } else { "http" }.to_owned();
    message.query_string = head.query_string;
    message.root_path = config.root_path.clone();
    message.headers = head.headers;
    message.body = ByteString::from(body.to_vec());
    message.client = Some(head.client);
    message.server = Some(head.server);
    if let Err(e) = shared.layer.send(HTTP_REQUEST, &message).await {
        return send_failed(shared, &e);
    }
    drop(message);
    let mut guard = DisconnectGuard {
        shared: Arc::clone(shared),
        reply_channel: local.name().to_owned(),
        path: head.path,
        armed: true,
    };
    let deadline = tokio::time::Instant::now() + config.http_timeout;
    let first = loop {
        match tokio::time::timeout_at(deadline, local.recv()).await {
            Ok(Some(envelope)) => match envelope.decode::<HttpResponse>() {
                Ok(r) if r.status.is_some() => break r,
                Ok(_) => {
                    ServerMetrics::inc(&shared.metrics.bad_replies);
                    tracing::warn!(channel = %envelope.channel, "HTTP response without a status ignored");
                }
                Err(e) => {
                    ServerMetrics::inc(&shared.metrics.bad_replies);
                    tracing::warn!(channel = %envelope.channel, error = %e, "undecodable HTTP response ignored");
                }
            },
            Ok(None) => return unavailable(shared, "Server shutting down\n"),
            Err(_) => {
                ServerMetrics::inc(&shared.metrics.http_504);
                guard.disarm();
                return plain(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Worker failed to respond within time limit\n",
                );
            }
        }
    };
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
            let next = tokio::time::timeout(s.shared.config.http_timeout, s.local.recv()).await;
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
                Ok(None) => "server shutting down",
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

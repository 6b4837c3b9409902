//! Interface-server counters: connections, requests, frames, and every refusal or drop the server
//! decides on (503s, 504s, 413s, slow-client drops and closes), so that nothing is refused or lost
//! without a number going up. Plain atomics, read through [`ServerMetrics::snapshot`] (the CLI can
//! export them to Prometheus).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every connection of one [`super::Server`].
#[derive(Debug, Default)]
pub struct ServerMetrics {
    pub(crate) open_connections: AtomicU64,
    pub(crate) open_websockets: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) http_requests: AtomicU64,
    pub(crate) http_responses: AtomicU64,
    pub(crate) http_413: AtomicU64,
    pub(crate) http_503: AtomicU64,
    pub(crate) http_504: AtomicU64,
    pub(crate) http_disconnects: AtomicU64,
    pub(crate) http_aborted_streams: AtomicU64,
    pub(crate) ws_connects: AtomicU64,
    pub(crate) ws_accepted: AtomicU64,
    pub(crate) ws_rejected: AtomicU64,
    pub(crate) ws_connect_timeouts: AtomicU64,
    pub(crate) ws_frames_in: AtomicU64,
    pub(crate) ws_frames_out: AtomicU64,
    pub(crate) ws_frames_lost: AtomicU64,
    pub(crate) ws_receive_full_closes: AtomicU64,
    pub(crate) slow_client_drops: AtomicU64,
    pub(crate) slow_client_closes: AtomicU64,
    pub(crate) ping_timeouts: AtomicU64,
    pub(crate) bad_replies: AtomicU64,
    pub(crate) ws_disconnects_lost: AtomicU64,
    pub(crate) ws_outage_closes: AtomicU64,
    pub(crate) host_rejected: AtomicU64,
    pub(crate) origin_rejected: AtomicU64,
    pub(crate) per_ip_refused: AtomicU64,
    pub(crate) ws_frames_throttled: AtomicU64,
    pub(crate) ws_rate_limit_closes: AtomicU64,
    pub(crate) backpressure_waits: AtomicU64,
    pub(crate) backpressure_refusals: AtomicU64,
    pub(crate) auth_refused: AtomicU64,
    pub(crate) token_expired_closes: AtomicU64,
    pub(crate) token_refreshes: AtomicU64,
    pub(crate) token_refreshes_refused: AtomicU64,
    /// Shared with the process inbox, which enforces the cap on groups per socket.
    pub(crate) ws_group_cap_closes: Arc<AtomicU64>,
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerMetricsSnapshot {
    /// TCP connections open now (HTTP and WebSocket).
    pub open_connections: u64,
    /// WebSockets open now.
    pub open_websockets: u64,
    /// TCP connections accepted since start.
    pub connections_accepted: u64,
    /// TCP connections refused with 503 because `max_connections` were open.
    pub connections_refused: u64,
    /// HTTP requests received (WebSocket handshakes and `/healthz` excluded).
    pub http_requests: u64,
    /// HTTP responses started from a worker's reply.
    pub http_responses: u64,
    /// Requests refused with 413 (body over `max_body_size`).
    pub http_413: u64,
    /// Requests and handshakes answered 503 (layer full or unavailable, worker silent on connect).
    pub http_503: u64,
    /// Requests answered 504 (no worker reply within `http_timeout`).
    pub http_504: u64,
    /// `http.disconnect` messages sent (client gone before its response completed).
    pub http_disconnects: u64,
    /// Streaming responses cut because a chunk did not come in time or was dropped.
    pub http_aborted_streams: u64,
    /// `websocket.connect` messages sent.
    pub ws_connects: u64,
    /// Handshakes accepted (101).
    pub ws_accepted: u64,
    /// Handshakes rejected by a worker (403).
    pub ws_rejected: u64,
    /// Handshakes with no worker answer within `websocket_connect_timeout` (503).
    pub ws_connect_timeouts: u64,
    /// Frames received from clients and sent as `websocket.receive`.
    pub ws_frames_in: u64,
    /// Frames written to clients.
    pub ws_frames_out: u64,
    /// Client frames dropped because the layer was unavailable (the socket stays open).
    pub ws_frames_lost: u64,
    /// Sockets closed with 1013 because `websocket.receive` stayed full.
    pub ws_receive_full_closes: u64,
    /// Outbound messages dropped because a client's queue was full.
    pub slow_client_drops: u64,
    /// Sockets closed with 1013 because their outbound queue overflowed or a write stalled.
    pub slow_client_closes: u64,
    /// Sockets dropped because a ping got no pong within `ping_timeout`.
    pub ping_timeouts: u64,
    /// Replies from workers that could not be decoded or made no sense (ignored, or for a close
    /// code that may not be sent, replaced by 1011).
    pub bad_replies: u64,
    /// `websocket.disconnect` messages still refused by the layer (full or unreachable) when
    /// their retries ran out: those consumers never learn the socket closed.
    pub ws_disconnects_lost: u64,
    /// Sockets closed with 1011 because the layer stayed unreachable past `layer_outage_close`.
    pub ws_outage_closes: u64,
    /// Requests and handshakes refused with 400 for their `Host` (missing, repeated, malformed
    /// or not in `allowed_hosts`).
    pub host_rejected: u64,
    /// Handshakes refused with 403 by the origin policy (no worker saw them).
    pub origin_rejected: u64,
    /// Connections or handshakes refused with 429: their client address held
    /// `max_connections_per_ip` already.
    pub per_ip_refused: u64,
    /// Client frames delayed by their socket's rate limit.
    pub ws_frames_throttled: u64,
    /// Sockets closed with 1008 for staying over their rate limit.
    pub ws_rate_limit_closes: u64,
    /// Messages for a server-fed channel (`http.request`, `websocket.connect`,
    /// `websocket.receive`, a body chunk) that found it full and waited for room (the socket's
    /// reader paused meanwhile).
    pub backpressure_waits: u64,
    /// Of those, the ones still refused when `backpressure_timeout` ran out: the socket was
    /// closed with 1013 or the request or handshake answered 503.
    pub backpressure_refusals: u64,
    /// Requests (401) and handshakes (403) refused at the edge by authentication: a missing
    /// token on a path that requires one, or an invalid or expired token; `/healthz` without the
    /// ops token too.
    pub auth_refused: u64,
    /// Sockets closed (with the auth close code, 4001) because their token expired.
    pub token_expired_closes: u64,
    /// Refresh frames whose token was taken (the socket's expiry moved).
    pub token_refreshes: u64,
    /// Refresh frames refused (invalid, expired, another `sub`): the socket was closed with the
    /// auth close code.
    pub token_refreshes_refused: u64,
    /// Sockets closed with 1008 because workers added them to more than
    /// `max_groups_per_socket` groups (the membership over the cap discarded).
    pub ws_group_cap_closes: u64,
}

impl ServerMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> ServerMetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServerMetricsSnapshot {
            open_connections: r(&self.open_connections),
            open_websockets: r(&self.open_websockets),
            connections_accepted: r(&self.connections_accepted),
            connections_refused: r(&self.connections_refused),
            http_requests: r(&self.http_requests),
            http_responses: r(&self.http_responses),
            http_413: r(&self.http_413),
            http_503: r(&self.http_503),
            http_504: r(&self.http_504),
            http_disconnects: r(&self.http_disconnects),
            http_aborted_streams: r(&self.http_aborted_streams),
            ws_connects: r(&self.ws_connects),
            ws_accepted: r(&self.ws_accepted),
            ws_rejected: r(&self.ws_rejected),
            ws_connect_timeouts: r(&self.ws_connect_timeouts),
            ws_frames_in: r(&self.ws_frames_in),
            ws_frames_out: r(&self.ws_frames_out),
            ws_frames_lost: r(&self.ws_frames_lost),
            ws_receive_full_closes: r(&self.ws_receive_full_closes),
            slow_client_drops: r(&self.slow_client_drops),
            slow_client_closes: r(&self.slow_client_closes),
            ping_timeouts: r(&self.ping_timeouts),
            bad_replies: r(&self.bad_replies),
            ws_disconnects_lost: r(&self.ws_disconnects_lost),
            ws_outage_closes: r(&self.ws_outage_closes),
            host_rejected: r(&self.host_rejected),
            origin_rejected: r(&self.origin_rejected),
            per_ip_refused: r(&self.per_ip_refused),
            ws_frames_throttled: r(&self.ws_frames_throttled),
            ws_rate_limit_closes: r(&self.ws_rate_limit_closes),
            backpressure_waits: r(&self.backpressure_waits),
            backpressure_refusals: r(&self.backpressure_refusals),
            auth_refused: r(&self.auth_refused),
            token_expired_closes: r(&self.token_expired_closes),
            token_refreshes: r(&self.token_refreshes),
            token_refreshes_refused: r(&self.token_refreshes_refused),
            ws_group_cap_closes: r(&self.ws_group_cap_closes),
        }
    }
}

//! Interface-server counters: connections, requests, frames, and every refusal or drop the server
//! decides on (503s, 504s, 413s, slow-client drops and closes), so that nothing is refused or lost
//! without a number going up. Plain atomics, each defined once with its Prometheus name, read
//! through [`ServerMetrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

use crate::prometheus::metric_set;

metric_set! {
    /// Counters shared by every connection of one [`super::Server`].
    pub struct ServerMetrics => ServerMetricsSnapshot {
        /// TCP connections open now (HTTP and WebSocket).
        open_connections: gauge "switchyard_open_connections";
        /// WebSockets open now.
        open_websockets: gauge "switchyard_open_websockets";
        /// TCP connections accepted since start.
        connections_accepted: counter "switchyard_connections_accepted_total";
        /// TCP connections refused with 503 because `max_connections` were open.
        connections_refused: counter "switchyard_connections_refused_total";
        /// HTTP requests received (WebSocket handshakes and `/healthz` excluded).
        http_requests: counter "switchyard_server_messages_in_total" ["channel" = "http.request"]
            help "Messages the interface server put on the layer, by channel.";
        /// `websocket.connect` messages sent.
        ws_connects: counter "switchyard_server_messages_in_total" ["channel" = "websocket.connect"];
        /// Frames received from clients and sent as `websocket.receive`.
        ws_frames_in: counter "switchyard_server_messages_in_total" ["channel" = "websocket.receive"];
        /// `http.disconnect` messages sent (client gone before its response completed).
        http_disconnects: counter "switchyard_server_messages_in_total" ["channel" = "http.disconnect"];
        /// HTTP responses started from a worker's reply.
        http_responses: counter "switchyard_server_messages_out_total" ["kind" = "http.response"]
            help "Replies the interface server wrote to clients, by kind.";
        /// Frames written to clients.
        ws_frames_out: counter "switchyard_server_messages_out_total" ["kind" = "websocket.frame"];
        /// Requests refused with 413 (body over `max_body_size`).
        http_413: counter "switchyard_http_errors_total" ["status" = "413"]
            help "HTTP requests answered by the server itself with an error, by status.";
        /// Requests and handshakes answered 503 (layer full or unavailable, worker silent on connect).
        http_503: counter "switchyard_http_errors_total" ["status" = "503"];
        /// Requests answered 504 (no worker reply within `http_timeout`).
        http_504: counter "switchyard_http_errors_total" ["status" = "504"];
        /// Streaming responses cut because a chunk did not come in time or was dropped.
        http_aborted_streams: counter "switchyard_http_aborted_streams_total";
        /// Handshakes accepted (101).
        ws_accepted: counter "switchyard_ws_handshakes_total" ["outcome" = "accepted"]
            help "WebSocket handshakes a worker answered or left unanswered, by outcome.";
        /// Handshakes rejected by a worker (403).
        ws_rejected: counter "switchyard_ws_handshakes_total" ["outcome" = "rejected"];
        /// Handshakes with no worker answer within `websocket_connect_timeout` (503).
        ws_connect_timeouts: counter "switchyard_ws_handshakes_total" ["outcome" = "timed_out"];
        /// Client frames dropped because the layer was unavailable (the socket stays open).
        ws_frames_lost: counter "switchyard_ws_frames_lost_total";
        /// Connection owners (workers that took a strictly ordered socket's messages) whose
        /// lease lapsed: their sockets went back to the shared channels.
        ws_owners_lapsed: counter "switchyard_ws_owners_lapsed_total";
        /// Sockets taken back from a lapsed owner to the shared channels.
        ws_owner_takebacks: counter "switchyard_ws_owner_takebacks_total";
        /// Sockets closed with 1013 because `websocket.receive` stayed full.
        ws_receive_full_closes: counter "switchyard_ws_receive_full_closes_total";
        /// Outbound messages dropped because a client's queue was full.
        slow_client_drops: counter "switchyard_slow_client_drops_total";
        /// Sockets closed with 1013 because their outbound queue overflowed or a write stalled.
        slow_client_closes: counter "switchyard_slow_client_closes_total";
        /// Sockets dropped because a ping got no pong within `ping_timeout`.
        ping_timeouts: counter "switchyard_ping_timeouts_total";
        /// Replies from workers that could not be decoded or made no sense (ignored, or for a close
        /// code that may not be sent, replaced by 1011).
        bad_replies: counter "switchyard_bad_replies_total";
        /// `websocket.disconnect` messages still refused by the layer (full or unreachable) when
        /// their retries ran out: those consumers never learn the socket closed.
        ws_disconnects_lost: counter "switchyard_ws_disconnects_lost_total";
        /// Sockets closed with 1011 because the layer stayed unreachable past `layer_outage_close`.
        ws_outage_closes: counter "switchyard_ws_outage_closes_total";
        /// Requests and handshakes refused with 400 for their `Host` (missing, repeated, malformed
        /// or not in `allowed_hosts`).
        host_rejected: counter "switchyard_edge_refusals_total" ["rule" = "host"]
            help "Requests, handshakes and sockets the edge rules refused, by rule.";
        /// Handshakes refused with 403 by the origin policy (no worker saw them).
        origin_rejected: counter "switchyard_edge_refusals_total" ["rule" = "origin"];
        /// Connections or handshakes refused with 429: their client address held
        /// `max_connections_per_ip` already.
        per_ip_refused: counter "switchyard_edge_refusals_total" ["rule" = "per_ip"];
        /// Sockets closed with 1008 for staying over their rate limit.
        ws_rate_limit_closes: counter "switchyard_edge_refusals_total" ["rule" = "rate_limit"];
        /// Sockets closed with 1008 because workers added them to more than
        /// `max_groups_per_socket` groups (the membership over the cap discarded). Shared with
        /// the process inbox, which enforces the cap.
        @shared ws_group_cap_closes: counter "switchyard_edge_refusals_total" ["rule" = "groups_per_socket"];
        /// Client frames delayed by their socket's rate limit.
        ws_frames_throttled: counter "switchyard_ws_frames_throttled_total";
        /// Messages for a server-fed channel (`http.request`, `websocket.connect`,
        /// `websocket.receive`, a body chunk) that found it full and waited for room (the socket's
        /// reader paused meanwhile).
        backpressure_waits: counter "switchyard_backpressure_total" ["outcome" = "waited"]
            help "Client messages that found a server-fed channel full: waited for room (reading paused), and refused past --backpressure-timeout (1013 or 503).";
        /// Of those, the ones still refused when `backpressure_timeout` ran out: the socket was
        /// closed with 1013 or the request or handshake answered 503.
        backpressure_refusals: counter "switchyard_backpressure_total" ["outcome" = "refused"];
        /// Requests (401) and handshakes (403) refused at the edge by authentication: a missing
        /// token on a path that requires one, or an invalid or expired token; `/healthz` without the
        /// ops token too.
        auth_refused: counter "switchyard_auth_refused_total";
        /// Sockets closed (with the auth close code, 4001) because their token expired.
        token_expired_closes: counter "switchyard_token_expired_closes_total";
        /// Refresh frames whose token was taken (the socket's expiry moved).
        token_refreshes: counter "switchyard_token_refreshes_total" ["outcome" = "accepted"]
            help "Token refresh frames, by outcome (a refused one closes its socket).";
        /// Refresh frames refused (invalid, expired, another `sub`): the socket was closed with the
        /// auth close code.
        token_refreshes_refused: counter "switchyard_token_refreshes_total" ["outcome" = "refused"];
    }
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
}

//! The hyper service's entry: the edge's Host rules, `/healthz` (answered here, never by a
//! worker), then a WebSocket handshake to [`super::websocket`] or a request to [`super::http`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use switchyard_routing::asgi::HTTP_REQUEST;

use super::metrics::ServerMetrics;
use super::response::{Body, full, plain, unauthorized};
use super::{ConnectionPermit, Shared, edge, http, websocket};

/// Entry point for every request on every connection.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    tls: bool,
    permit: Arc<ConnectionPermit>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let host = edge::request_host(
        req.headers(),
        req.version() >= hyper::Version::HTTP_11,
        shared.config.proxy_headers,
    );
    let path = req.uri().path();
    let health = path == "/healthz"
        || path.strip_prefix(shared.config.root_path.as_str()) == Some("/healthz");
    // Probes name the pod's address, not the site's: `/healthz` skips only the allowed list.
    let host = match host {
        Ok(Some(host))
            if !health && !edge::host_allowed(&shared.config.allowed_hosts, &host.domain) =>
        {
            Err(edge::HostError::NotAllowed)
        }
        Ok(None) if !health && !edge::host_allowed(&shared.config.allowed_hosts, "") => {
            Err(edge::HostError::NotAllowed)
        }
        other => other,
    };
    let host = match host {
        Ok(host) => host,
        Err(refusal) => {
            ServerMetrics::inc(&shared.metrics.host_rejected);
            tracing::info!(%peer, host = ?req.headers().get(hyper::header::HOST), reason = ?refusal, "request refused for its Host");
            return Ok(plain(StatusCode::BAD_REQUEST, refusal.text()));
        }
    };
    if health {
        if !shared.auth.ops_allowed(req.headers()) {
            ServerMetrics::inc(&shared.metrics.auth_refused);
            return Ok(unauthorized("Authentication required\n"));
        }
        return Ok(healthz(&shared).await);
    }
    if websocket::is_upgrade(&req) {
        return Ok(websocket::handshake(shared, peer, tls, permit, host, req).await);
    }
    Ok(http::http_request(shared, peer, tls, req).await)
}

/// `/healthz`: answered here, never by a worker. 200 while the server can serve: its inbox runs,
/// the channel layer answered within a second, and no loss of Redis state is being repaired;
/// 503 otherwise (a load balancer should send traffic elsewhere meanwhile), with `status`
/// saying which: `failing` (the inbox is gone: a restart is the cure), `layer_unavailable`,
/// `reasserting` (memberships being put back after Redis lost them).
async fn healthz(shared: &Shared) -> Response<Body> {
    let layer_ok = shared.layer.available()
        && matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                shared.layer.channel_depth(HTTP_REQUEST)
            )
            .await,
            Ok(Ok(_))
        );
    let m = shared.metrics.snapshot();
    let inbox_ok = !shared.inbox_gone.is_cancelled();
    let reasserting = shared.inbox.reasserting();
    let status = if !inbox_ok {
        "failing"
    } else if !layer_ok {
        "layer_unavailable"
    } else if reasserting {
        "reasserting"
    } else {
        "ok"
    };
    let body = serde_json::json!({
        "status": status,
        "inbox": if inbox_ok { "ok" } else { "gone" },
        "layer": if layer_ok { "ok" } else { "unavailable" },
        "layer_mode": shared.layer.mode(),
        "reasserting": reasserting,
        "memberships": shared.inbox.memberships(),
        "open_connections": m.open_connections,
        "open_websockets": m.open_websockets,
        "uptime_seconds": shared.started.elapsed().as_secs(),
    })
    .to_string();
    let mut resp = Response::new(full(Bytes::from(body)));
    if status != "ok" {
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

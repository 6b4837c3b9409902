//! The responses the server writes itself (plain text, 401, 503 with `Retry-After`), the body
//! type every response has, and the access log's target: shared by the HTTP and WebSocket
//! sides, which do not depend on each other.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};

use super::Shared;
use super::metrics::ServerMetrics;

/// Every response body the server produces.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Target of the access log lines.
pub(crate) const ACCESS_LOG: &str = "switchyard::access";

/// 401 with the challenge RFC 6750 asks for.
pub(crate) fn unauthorized(text: &'static str) -> Response<Body> {
    let mut resp = plain(StatusCode::UNAUTHORIZED, text);
    resp.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    resp
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

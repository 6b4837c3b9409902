//! What the HTTP request head becomes in ASGI terms: the percent-decoded path, the raw query
//! string, headers as lowercased byte pairs in order, the client and server addresses (from
//! `X-Forwarded-*` only when the server is told it sits behind a proxy), and the scheme.

use std::net::{IpAddr, SocketAddr};

use hyper::HeaderMap;
use hyper::Uri;
use switchyard_routing::ByteString;
use switchyard_routing::asgi::{Header, HostPort};

/// The ASGI view of a request head, shared by `http.request` and `websocket.connect`.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) path: String,
    pub(crate) query_string: ByteString,
    pub(crate) headers: Vec<Header>,
    pub(crate) client: HostPort,
    pub(crate) server: HostPort,
    /// `true` when the client reached the proxy over TLS (`X-Forwarded-Proto: https`).
    pub(crate) secure: bool,
}

/// Why a request head cannot be translated.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// The path does not decode to UTF-8.
    InvalidPath,
}

impl RequestHead {
    pub(crate) fn from_parts(
        uri: &Uri,
        header_map: &HeaderMap,
        peer: SocketAddr,
        local: SocketAddr,
        proxy_headers: bool,
    ) -> Result<RequestHead, HeadError> {
        let raw_path = uri.path();
        let path = percent_decode(raw_path.as_bytes()).ok_or(HeadError::InvalidPath)?;
        let query_string = ByteString::from(uri.query().unwrap_or("").as_bytes());
        let mut headers = Vec::with_capacity(header_map.len());
        for (name, value) in header_map {
            // Underscored names could impersonate dashed ones in CGI-style environments
            // (CVE-2015-0219); daphne drops them, and so do we.
            if name.as_str().contains('_') {
                continue;
            }
            // `HeaderName`s are already lowercase.
            headers.push((
                ByteString::from(name.as_str().as_bytes()),
                ByteString::from(value.as_bytes()),
            ));
        }
        let mut client: HostPort = (ip_text(peer.ip()), peer.port());
        let mut secure = false;
        if proxy_headers {
            let first = |name: &str| {
                header_map
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split(',').next())
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
            };
            if let Some(host) = first("x-forwarded-for") {
                let port = first("x-forwarded-port")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                client = (host, port);
                secure = first("x-forwarded-proto").is_some_and(|p| {
                    p.eq_ignore_ascii_case("https") || p.eq_ignore_ascii_case("wss")
                });
            }
        }
        Ok(RequestHead {
            path,
            query_string,
            headers,
            client,
            server: (ip_text(local.ip()), local.port()),
            secure,
        })
    }
}

/// A client or server address as the logs write it, `host:port`; formatted only when a line
/// that holds it is.
pub(crate) struct HostPortText<'a>(pub(crate) &'a HostPort);

impl std::fmt::Display for HostPortText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.0.0, self.0.1)
    }
}

/// An address as text, as `Display` writes it. Every request carries two; `Display` for an IPv4
/// address cost ~1,300 instructions each, a tenth of the request's own work in `serve`, so IPv4
/// is written by hand.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut text = String::with_capacity(15);
    let mut digits = itoa::Buffer::new();
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        text.push_str(digits.format(octet));
    }
    text
}

/// Decodes `%XX` escapes (a `%` not followed by two hex digits stays as it is; `+` is not a
/// space in a path), then UTF-8; `None` when the bytes are not UTF-8.
pub(crate) fn percent_decode(raw: &[u8]) -> Option<String> {
    percent_encoding::percent_decode(raw)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        // Every value in every octet, then addresses that only Display writes.
        for position in 0..4 {
            for value in 0..=255u8 {
                let mut octets = [10, 0, 7, 255];
                octets[position] = value;
                let ip = IpAddr::from(octets);
                assert_eq!(ip_text(ip), ip.to_string());
            }
        }
        for ip in ["::1", "2001:db8::7", "::ffff:192.0.2.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn decodes_escapes_and_refuses_bad_utf8() {
        assert_eq!(percent_decode(b"/a%20b/").as_deref(), Some("/a b/"));
        assert_eq!(percent_decode(b"/caf%C3%A9").as_deref(), Some("/café"));
        assert_eq!(percent_decode(b"/100%").as_deref(), Some("/100%"));
        assert_eq!(percent_decode(b"/%zz%4").as_deref(), Some("/%zz%4"));
        assert_eq!(percent_decode(b"/%ff"), None);
        assert_eq!(percent_decode(b"/a+b%2B").as_deref(), Some("/a+b+"));
        assert_eq!(percent_decode(b"%41").as_deref(), Some("A"));
    }
}

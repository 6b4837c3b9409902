//! Cross-site request forgery protection for HTTP consumers, by origin as Django's
//! `CsrfViewMiddleware` checks it (no token: a browser tells us where a request comes from).
//! [`check`] decides for one `http.request`; [`csrf_protect`] wraps a consumer so that an unsafe
//! request (anything but GET, HEAD, OPTIONS, TRACE) from another origin is answered 403 and never
//! reaches it.
//!
//! The rules, in order: a safe method passes. An `Origin` header must be the request's own origin
//! (its `scheme` and `Host`) or a trusted one (`null` never is). Without `Origin`, a
//! `Sec-Fetch-Site` header must say `same-origin` or `none`. Without either, a `Referer` must be
//! same-origin or trusted; an https request without any of the three is refused (Django refuses
//! a Referer-less https POST). A plain-http request with none of them comes from a non-browser
//! client (browsers send `Origin` on every POST) and passes: CSRF needs a victim's browser.

use thiserror::Error;

use crate::asgi::{HttpRequest, HttpResponse};
use crate::consumer::{BoxFuture, ConsumerError, Ctx, Handler};
use crate::message::Message;
use crate::value::ByteString;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CsrfRefusal {
    /// `Origin` names another origin (or `null`).
    #[error("origin {0:?} does not match the request's host or a trusted origin")]
    CrossOrigin(String),
    /// No `Origin`, and `Sec-Fetch-Site` says the request came from another site.
    #[error("Sec-Fetch-Site is {0:?}")]
    CrossSite(String),
    /// No `Origin`, and the `Referer` names another origin.
    #[error("referer {0:?} does not match the request's host or a trusted origin")]
    CrossReferer(String),
    /// An https request with no `Origin`, `Sec-Fetch-Site` or `Referer`.
    #[error("https request without an Origin or Referer")]
    NoReferer,
}

/// Scheme, lowercased host and port (the scheme's default when absent).
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// `scheme://host[:port]`, with anything after the authority (a Referer's path) ignored.
fn parse_origin(raw: &str) -> Option<Origin> {
    let (scheme, rest) = raw.trim().split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    origin_of(scheme, authority)
}

fn origin_of(scheme: &str, authority: &str) -> Option<Origin> {
    let scheme = scheme.to_ascii_lowercase();
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !authority.ends_with(']') => (host, Some(port.parse().ok()?)),
        _ => (authority.as_str(), None),
    };
    let port = port.or_else(|| default_port(&scheme));
    Some(Origin {
        host: host.strip_suffix('.').unwrap_or(host).to_owned(),
        scheme,
        port,
    })
}

/// `trusted` as Django's `CSRF_TRUSTED_ORIGINS`: `https://app.example.com`, or
/// `https://*.example.com` for any subdomain.
fn trusted_match(trusted: &str, origin: &Origin) -> bool {
    let (subdomains, pattern) = match trusted.split_once("://*.") {
        Some((scheme, rest)) => (true, format!("{scheme}://{rest}")),
        None => (false, trusted.to_owned()),
    };
    let Some(pattern) = parse_origin(&pattern) else {
        return false;
    };
    let host_ok = if subdomains {
        origin
            .host
            .strip_suffix(&pattern.host)
            .is_some_and(|label| label.len() > 1 && label.ends_with('.'))
    } else {
        origin.host == pattern.host
    };
    host_ok && pattern.scheme == origin.scheme && pattern.port == origin.port
}

/// Whether `request` may change state: `Ok` for safe methods and same-origin (or trusted)
/// requests, the reason otherwise. `trusted_origins` as Django's `CSRF_TRUSTED_ORIGINS`.
pub fn check(request: &HttpRequest, trusted_origins: &[String]) -> Result<(), CsrfRefusal> {
    if matches!(
        request.method.as_str(),
        "GET" | "HEAD" | "OPTIONS" | "TRACE"
    ) {
        return Ok(());
    }
    let text = |name: &str| {
        request
            .header(name)
            .map(|v| String::from_utf8_lossy(v).trim().to_owned())
    };
    let own = text("host").and_then(|host| origin_of(&request.scheme, &host));
    let allowed = |origin: &Origin| {
        own.as_ref() == Some(origin) || trusted_origins.iter().any(|t| trusted_match(t, origin))
    };
    if let Some(origin) = text("origin") {
        return match parse_origin(&origin) {
            Some(parsed) if allowed(&parsed) => Ok(()),
            _ => Err(CsrfRefusal::CrossOrigin(origin)),
        };
    }
    if let Some(site) = text("sec-fetch-site") {
        return match site.as_str() {
            "same-origin" | "none" => Ok(()),
            _ => Err(CsrfRefusal::CrossSite(site)),
        };
    }
    if let Some(referer) = text("referer") {
        return match parse_origin(&referer) {
            Some(parsed) if allowed(&parsed) => Ok(()),
            _ => Err(CsrfRefusal::CrossReferer(referer)),
        };
    }
    if request.scheme.eq_ignore_ascii_case("https") {
        return Err(CsrfRefusal::NoReferer);
    }
    Ok(())
}

/// The 403 a refused request gets.
fn refuse(ctx: &Ctx, refusal: &CsrfRefusal) -> Result<(), ConsumerError> {
    let headers = vec![(
        ByteString::from("content-type"),
        ByteString::from("text/plain; charset=utf-8"),
    )];
    let body = format!("Forbidden (CSRF check failed): {refusal}\n");
    ctx.reply(&HttpResponse::new(403, headers, body.into_bytes()))
}

/// A consumer wrapped by [`csrf_protect`].
#[derive(Debug, Clone)]
pub struct CsrfProtected<H> {
    handler: H,
    trusted_origins: Vec<String>,
}

impl<H> CsrfProtected<H> {
    /// Also accepts requests from these origins (`https://app.example.com`,
    /// `https://*.example.com`), as Django's `CSRF_TRUSTED_ORIGINS`.
    pub fn trusting(mut self, origins: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.trusted_origins
            .extend(origins.into_iter().map(Into::into));
        self
    }
}

/// Wraps an HTTP consumer: unsafe requests that fail [`check`] are answered 403 (the body says
/// why) and `handler` never runs. Use it on every route that changes state:
/// `route(HTTP_REQUEST, csrf_protect(jobs::start)).path("^/jobs/$").method("^POST$")`.
pub fn csrf_protect<H: Handler>(handler: H) -> CsrfProtected<H> {
    CsrfProtected {
        handler,
        trusted_origins: Vec::new(),
    }
}

impl<H: Handler> Handler for CsrfProtected<H> {
    fn call(&self, message: Message, ctx: Ctx) -> BoxFuture<Result<(), ConsumerError>> {
        let verdict = message
            .decode::<HttpRequest>()
            .map(|request| check(&request, &self.trusted_origins));
        match verdict {
            Ok(Ok(())) => self.handler.call(message, ctx),
            Ok(Err(refusal)) => {
                let result = refuse(&ctx, &refusal);
                Box::pin(async move { result })
            }
            Err(e) => {
                let error = ConsumerError::other(e);
                Box::pin(async move { Err(error) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, scheme: &str, headers: &[(&str, &str)]) -> HttpRequest {
        let mut r = HttpRequest::new("http.response!x", method, "/jobs/");
        r.scheme = scheme.to_owned();
        r.headers = headers
            .iter()
            .map(|(n, v)| (ByteString::from(*n), ByteString::from(*v)))
            .collect();
        r
    }

    fn post(headers: &[(&str, &str)]) -> Result<(), CsrfRefusal> {
        check(&request("POST", "http", headers), &[])
    }

    #[test]
    fn origin_must_be_the_requests_own() {
        let host = ("host", "chat.test:8000");
        assert_eq!(post(&[host, ("origin", "http://chat.test:8000")]), Ok(()));
        assert_eq!(post(&[host, ("origin", "http://CHAT.test:8000")]), Ok(()));
        for evil in [
            "http://evil.test",
            "https://chat.test:8000",
            "http://chat.test:8001",
            "http://chat.test",
            "null",
            "garbage",
        ] {
            assert_eq!(
                post(&[host, ("origin", evil)]),
                Err(CsrfRefusal::CrossOrigin(evil.into())),
                "{evil}"
            );
        }
        // Default ports are the same origin as none.
        assert_eq!(
            post(&[("host", "chat.test"), ("origin", "http://chat.test:80")]),
            Ok(())
        );
        // Safe methods are not checked.
        assert_eq!(
            check(
                &request("GET", "http", &[host, ("origin", "http://evil.test")]),
                &[]
            ),
            Ok(())
        );
    }

    #[test]
    fn without_origin_sec_fetch_site_then_referer_decide() {
        let host = ("host", "chat.test");
        assert_eq!(post(&[host, ("sec-fetch-site", "same-origin")]), Ok(()));
        assert_eq!(
            post(&[host, ("sec-fetch-site", "cross-site")]),
            Err(CsrfRefusal::CrossSite("cross-site".into()))
        );
        assert_eq!(
            post(&[host, ("referer", "http://chat.test/jobs/?a=1")]),
            Ok(())
        );
        assert_eq!(
            post(&[host, ("referer", "http://evil.test/chat.test")]),
            Err(CsrfRefusal::CrossReferer(
                "http://evil.test/chat.test".into()
            ))
        );
        // A non-browser client over plain http passes; over https it needs a Referer.
        assert_eq!(post(&[host]), Ok(()));
        assert_eq!(
            check(&request("POST", "https", &[host]), &[]),
            Err(CsrfRefusal::NoReferer)
        );
        assert_eq!(
            check(
                &request("POST", "https", &[host, ("referer", "https://chat.test/x")]),
                &[]
            ),
            Ok(())
        );
    }

    #[test]
    fn trusted_origins_as_django_writes_them() {
        let trusted = vec![
            "https://app.test".to_owned(),
            "https://*.example.com".to_owned(),
        ];
        let from = |origin: &str| {
            check(
                &request("POST", "https", &[("host", "api.test"), ("origin", origin)]),
                &trusted,
            )
        };
        assert_eq!(from("https://app.test"), Ok(()));
        assert_eq!(from("https://a.example.com"), Ok(()));
        assert!(from("https://example.com").is_err());
        assert!(from("http://app.test").is_err());
        assert!(from("https://badexample.com").is_err());
    }
}

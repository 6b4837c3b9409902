//! Authentication at the edge: signed tokens (JWT) verified by the interface server before any
//! worker hears of a request or socket, paths that require a token, and the bearer token that
//! guards the operational endpoints (`/healthz`, `/metrics`).
//!
//! A token is looked for in `Authorization: Bearer …`, then in a `Sec-WebSocket-Protocol` entry
//! `bearer.<token>` (browsers cannot set headers on a WebSocket; offer `["bearer",
//! "bearer.<token>"]` and the server answers `bearer`), then in a `token` query parameter. It is
//! verified with one configured key (HS256 secret, RS256 or ES256 public key): any other
//! algorithm (`none`, HS256 signed with the RSA public key as secret…) is refused, and `exp` and
//! `sub` are required. The claims a worker sees, `sub` plus the configured ones, ride under the
//! key `user` of `http.request`, `websocket.connect` and `websocket.receive`; the server builds
//! those messages itself, so a client can never supply `user`.
//!
//! Refusals: an invalid or expired token, or none on a path listed in `required_paths` → 401
//! (with `WWW-Authenticate: Bearer`) on HTTP, 403 at a handshake. A socket whose token expires
//! while open is closed with [`TOKEN_EXPIRED_CLOSE`] (4001) by default.
//!
//! Refresh (off by default, as Centrifugo's): with [`AuthConfig::refresh_prefix`] set, a text
//! frame that starts with it carries a new token (the rest of the frame). The server takes that
//! frame itself, no worker sees it: a valid token for the same `sub` moves the socket's expiry
//! and replaces its `user` from the next frame on; anything else (invalid, expired, another
//! `sub`, a socket opened without a token) closes the socket with the expiry close code. The
//! application picks a prefix its own frames never start with.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use subtle::ConstantTimeEq;
use switchyard_routing::{Map, Value};

use crate::layer::glob;
use globset::{GlobSet, GlobSetBuilder};

/// The close code of a socket whose token expired (application range, like Centrifugo's 3xxx
/// "token expired" family; 4001 is free in the WebSocket registry).
pub const TOKEN_EXPIRED_CLOSE: u16 = 4001;

/// The subprotocol prefix that carries a token (`bearer.<token>`).
const PROTOCOL_PREFIX: &str = "bearer.";

/// The key a JWT is verified with; the kind fixes the one algorithm accepted.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 shared secret (the raw bytes).
    Secret(Vec<u8>),
    /// RS256 public key, PEM (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC KEY`).
    RsaPem(Vec<u8>),
    /// ES256 public key (P-256), PEM.
    EcPem(Vec<u8>),
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A secret is never printed.
        f.write_str(match self {
            JwtKey::Secret(_) => "JwtKey::Secret(..)",
            JwtKey::RsaPem(_) => "JwtKey::RsaPem(..)",
            JwtKey::EcPem(_) => "JwtKey::EcPem(..)",
        })
    }
}

/// How JWTs are verified.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The verification key.
    pub key: JwtKey,
    /// Claims copied into `user` besides `sub` (when the token has them).
    pub claims: Vec<String>,
    /// Clock skew allowed on `exp`/`nbf`; a socket is closed at `exp + leeway`.
    pub leeway: Duration,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
}

/// Edge authentication settings (part of [`super::ServerConfig`]); the default checks nothing.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// Verify signed tokens; `None`: tokens are not looked at (and passed on as any header).
    pub jwt: Option<JwtConfig>,
    /// Path globs (`*`, `?`, `[…]`, matched on the percent-decoded path, `root_path` included)
    /// where a request or socket without a valid token is refused at the edge. Needs `jwt`.
    pub required_paths: Vec<String>,
    /// Bearer token `/healthz` requires (`Authorization: Bearer <it>`); `None`: open.
    pub ops_token: Option<String>,
    /// Close code for a socket whose token expired (4000–4999; default 4001).
    pub expired_close_code: Option<u16>,
    /// A text frame starting with this carries a new token for its socket (token refresh, see
    /// the module docs); `None`, the default: no frame is taken. Needs `jwt`.
    pub refresh_prefix: Option<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt", &self.jwt)
            .field("required_paths", &self.required_paths)
            .field("ops_token", &self.ops_token.as_ref().map(|_| ".."))
            .field("expired_close_code", &self.expired_close_code)
            .field("refresh_prefix", &self.refresh_prefix)
            .finish()
    }
}

/// Who a verified token says is calling.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// What rides under `user`: `sub` and the configured claims.
    pub(crate) user: Map,
    /// When the socket must close (`exp + leeway`).
    pub(crate) expires_at: SystemTime,
}

/// Why a request or socket is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The path requires a token and there is none.
    Missing,
    /// A token that does not verify (bad signature, algorithm, expired, malformed…).
    Invalid(String),
}

impl Refusal {
    /// The body of the refusal (no detail about the key).
    pub(crate) fn text(&self) -> &'static str {
        match self {
            Refusal::Missing => "Authentication required\n",
            Refusal::Invalid(_) => "Invalid or expired token\n",
        }
    }
}

/// The compiled [`AuthConfig`].
pub(crate) struct Authenticator {
    jwt: Option<(DecodingKey, Validation, Vec<String>, Duration)>,
    required: GlobSet,
    ops_token: Option<String>,
    pub(crate) expired_close_code: u16,
    refresh_prefix: Option<String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt", &self.jwt.is_some())
            .field("required", &self.required)
            .finish()
    }
}

impl Authenticator {
    /// Checks and compiles the settings; the error says what is wrong.
    pub(crate) fn new(config: &AuthConfig) -> Result<Self, String> {
        let jwt = match &config.jwt {
            None => None,
            Some(jwt) => {
                let (key, algorithm) = match &jwt.key {
                    JwtKey::Secret(secret) if secret.is_empty() => {
                        return Err("the JWT secret is empty".into());
                    }
                    JwtKey::Secret(secret) => (
                        DecodingKey::from_secret(secret)
                            .map_err(|e| format!("the JWT secret cannot be used: {e}"))?,
                        Algorithm::HS256,
                    ),
                    JwtKey::RsaPem(pem) => (
                        DecodingKey::from_rsa_pem(pem)
                            .map_err(|e| format!("the JWT public key is not an RSA PEM: {e}"))?,
                        Algorithm::RS256,
                    ),
                    JwtKey::EcPem(pem) => (
                        DecodingKey::from_ec_pem(pem)
                            .map_err(|e| format!("the JWT public key is not an EC PEM: {e}"))?,
                        Algorithm::ES256,
                    ),
                };
                let mut validation = Validation::new(algorithm);
                validation.leeway = jwt.leeway.as_secs();
                validation.validate_nbf = true;
                validation.set_required_spec_claims(&["exp", "sub"]);
                match &jwt.audience {
                    Some(aud) => validation.set_audience(&[aud]),
                    None => validation.validate_aud = false,
                }
                if let Some(iss) = &jwt.issuer {
                    validation.set_issuer(&[iss]);
                }
                Some((key, validation, jwt.claims.clone(), jwt.leeway))
            }
        };
        if jwt.is_none() && !config.required_paths.is_empty() {
            return Err("required authentication paths need a JWT key".into());
        }
        for glob in &config.required_paths {
            if !glob.starts_with('/') && glob != "*" {
                return Err(format!(
                    "authentication path {glob:?} must start with / (or be *)"
                ));
            }
        }
        let code = config.expired_close_code.unwrap_or(TOKEN_EXPIRED_CLOSE);
        if !(4000..=4999).contains(&code) {
            return Err(format!(
                "the token-expired close code must be 4000-4999, got {code}"
            ));
        }
        if config.ops_token.as_deref() == Some("") {
            return Err("the ops token is empty".into());
        }
        match (&config.refresh_prefix, &jwt) {
            (Some(p), _) if p.is_empty() => return Err("the token refresh prefix is empty".into()),
            (Some(_), None) => return Err("token refresh needs a JWT key".into()),
            _ => {}
        }
        // Compiled once here so a bad glob is a startup error, not a per-request surprise.
        let mut required = GlobSetBuilder::new();
        for pattern in &config.required_paths {
            required.add(
                glob(pattern)
                    .map_err(|e| format!("invalid authentication path {pattern:?}: {e}"))?,
            );
        }
        let required = required
            .build()
            .map_err(|e| format!("invalid authentication paths: {e}"))?;
        Ok(Authenticator {
            jwt,
            required,
            ops_token: config.ops_token.clone(),
            expired_close_code: code,
            refresh_prefix: config.refresh_prefix.clone(),
        })
    }

    /// The token a refresh frame carries, when `text` is one.
    pub(crate) fn refresh_token<'a>(&self, text: &'a str) -> Option<&'a str> {
        text.strip_prefix(self.refresh_prefix.as_deref()?)
    }

    /// True when nothing is configured: the entry points skip the check entirely.
    pub(crate) fn is_off(&self) -> bool {
        self.jwt.is_none() && self.ops_token.is_none()
    }

    /// The identity for a request or handshake to `path`, `None` when anonymous is allowed.
    pub(crate) fn check(
        &self,
        path: &str,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<Identity>, Refusal> {
        if self.jwt.is_none() {
            return Ok(None);
        }
        let Some(token) = find_token(headers, query) else {
            return if self.requires(path) {
                Err(Refusal::Missing)
            } else {
                Ok(None)
            };
        };
        self.verify(&token).map(Some)
    }

    /// Verifies `token` (whatever carried it); `Missing` when no JWT key is configured.
    pub(crate) fn verify(&self, token: &str) -> Result<Identity, Refusal> {
        let Some((key, validation, claims, leeway)) = &self.jwt else {
            return Err(Refusal::Missing);
        };
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token.as_bytes(),
            key,
            validation,
        )
        .map_err(|e| Refusal::Invalid(e.to_string()))?;
        let all = data.claims;
        let mut user = Map::new();
        for name in std::iter::once("sub").chain(claims.iter().map(String::as_str)) {
            if let Some(value) = all.get(name) {
                user = user.with(name, Value::from(value.clone()));
            }
        }
        // `exp` is required and checked by `decode`; a float or huge value still bounds here.
        let exp = all
            .get("exp")
            .and_then(serde_json::Value::as_f64)
            .filter(|e| e.is_finite() && *e >= 0.0)
            .ok_or_else(|| Refusal::Invalid("exp is not a number".into()))?;
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs_f64(exp.min(1e11)))
            .and_then(|t| t.checked_add(*leeway))
            .unwrap_or(SystemTime::now());
        Ok(Identity { user, expires_at })
    }

    fn requires(&self, path: &str) -> bool {
        self.required.is_match(path)
    }

    /// Whether a request to an ops endpoint may see it.
    pub(crate) fn ops_allowed(&self, headers: &HeaderMap) -> bool {
        match &self.ops_token {
            None => true,
            Some(expected) => headers
                .get_all(AUTHORIZATION)
                .iter()
                .any(|v| bearer_matches(expected, v.as_bytes())),
        }
    }
}

/// True when `header` is `Bearer <expected>`, compared in constant time.
pub fn bearer_matches(expected: &str, header: &[u8]) -> bool {
    let Some(given) = strip_bearer(header) else {
        return false;
    };
    given.ct_eq(expected.as_bytes()).into()
}

fn strip_bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// The token a client presented, by the order of precedence in the module docs.
fn find_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<String> {
    if let Some(token) = headers
        .get_all(AUTHORIZATION)
        .iter()
        .find_map(|v| strip_bearer(v.as_bytes()))
        .and_then(|t| std::str::from_utf8(t).ok())
        .filter(|t| !t.is_empty())
    {
        return Some(token.to_owned());
    }
    if let Some(token) = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(PROTOCOL_PREFIX))
        .filter(|t| !t.is_empty())
    {
        return Some(token.to_owned());
    }
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .and_then(|raw| super::request::percent_decode(raw.as_bytes()))
        .filter(|t| !t.is_empty())
}

/// Whether the client offered the `bearer` subprotocol (echoed when nothing else is chosen, so
/// a browser that carried its token as a subprotocol accepts the handshake).
pub(crate) fn offers_bearer_protocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "bearer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn finds_the_token_in_each_place_in_order() {
        let h = headers(&[
            ("authorization", "Bearer aaa"),
            ("sec-websocket-protocol", "bearer, bearer.bbb"),
        ]);
        assert_eq!(find_token(&h, Some("token=ccc")).as_deref(), Some("aaa"));
        let h = headers(&[("sec-websocket-protocol", "chat, bearer.bbb")]);
        assert_eq!(find_token(&h, Some("token=ccc")).as_deref(), Some("bbb"));
        assert!(offers_bearer_protocol(&headers(&[(
            "sec-websocket-protocol",
            "bearer, bearer.x"
        )])));
        assert_eq!(
            find_token(&HeaderMap::new(), Some("a=1&token=c%2Ec")).as_deref(),
            Some("c.c")
        );
        let basic = headers(&[("authorization", "Basic eDp5")]);
        assert_eq!(find_token(&basic, None), None);
        assert_eq!(find_token(&HeaderMap::new(), Some("token=")), None);
    }

    #[test]
    fn bearer_comparison() {
        assert!(bearer_matches("s3cret", b"Bearer s3cret"));
        assert!(bearer_matches("s3cret", b"bearer  s3cret "));
        assert!(!bearer_matches("s3cret", b"Bearer s3cres"));
        assert!(!bearer_matches("s3cret", b"Bearer s3cret2"));
        assert!(!bearer_matches("s3cret", b"Basic s3cret"));
        assert!(!bearer_matches("s3cret", b"Bear"));
    }

    #[test]
    fn bad_settings_are_refused() {
        let required_without_key = AuthConfig {
            required_paths: vec!["/private/*".into()],
            ..AuthConfig::default()
        };
        assert!(Authenticator::new(&required_without_key).is_err());
        let refresh_without_key = AuthConfig {
            refresh_prefix: Some("token:".into()),
            ..AuthConfig::default()
        };
        assert!(Authenticator::new(&refresh_without_key).is_err());
        let jwt = JwtConfig {
            key: JwtKey::Secret(b"k".to_vec()),
            claims: vec![],
            leeway: Duration::ZERO,
            audience: None,
            issuer: None,
        };
        let bad_code = AuthConfig {
            jwt: Some(jwt.clone()),
            expired_close_code: Some(1000),
            ..AuthConfig::default()
        };
        assert!(Authenticator::new(&bad_code).is_err());
        let empty_prefix = AuthConfig {
            jwt: Some(jwt.clone()),
            refresh_prefix: Some(String::new()),
            ..AuthConfig::default()
        };
        assert!(Authenticator::new(&empty_prefix).is_err());
        let not_pem = AuthConfig {
            jwt: Some(JwtConfig {
                key: JwtKey::RsaPem(b"not a key".to_vec()),
                ..jwt
            }),
            ..AuthConfig::default()
        };
        assert!(
            Authenticator::new(&not_pem)
                .unwrap_err()
                .contains("RSA PEM")
        );
    }

    #[test]
    fn required_paths_match_any_character() {
        let config = AuthConfig {
            jwt: Some(JwtConfig {
                key: JwtKey::Secret(b"k".to_vec()),
                claims: vec![],
                leeway: Duration::ZERO,
                audience: None,
                issuer: None,
            }),
            required_paths: vec!["/private/*".into(), "/api/v?/admin".into()],
            ..AuthConfig::default()
        };
        let auth = Authenticator::new(&config).unwrap();
        assert!(auth.requires("/private/a/b"));
        // A percent-decoded newline is one more character, not the end of the path.
        assert!(auth.requires("/private/a\nb"));
        assert!(auth.requires("/api/v2/admin"));
        assert!(!auth.requires("/api/v10/admin"));
        assert!(!auth.requires("/public"));
        assert!(matches!(
            auth.check("/private/x", &HeaderMap::new(), None),
            Err(Refusal::Missing)
        ));
        let bad = AuthConfig {
            required_paths: vec!["/a/{b".into()],
            ..config
        };
        assert!(Authenticator::new(&bad).unwrap_err().contains("/a/{b"));
    }
}

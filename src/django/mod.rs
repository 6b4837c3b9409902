//! Web sessions of a Django app, read from where Django keeps them, so a consumer knows who is
//! on the other end of a WebSocket (Channels' `http_session` / `http_session_user`).
//!
//! The session key comes from the handshake's `sessionid` cookie (or a `session_key` query
//! parameter). Two Django set-ups are read:
//! - **cache-backed sessions in Redis** (`SESSION_ENGINE = "django.contrib.sessions.backends.cache"`
//!   or `cached_db`, with Django's `RedisCache` or django-redis): the key
//!   `{KEY_PREFIX}:{VERSION}:django.contrib.sessions.cache{session_key}` holds the session dict,
//!   pickled. We decode a safe subset of pickle (dicts, lists, strings, numbers, booleans, None)
//!   and execute nothing: anything else (a class, a reducer) makes the session anonymous. When the
//!   stored value is a signed string (stores that keep `SessionBase.encode()`), it is verified
//!   with `SECRET_KEY` (and `SECRET_KEY_FALLBACKS`) like `django.core.signing.loads`.
//! - **signed-cookie sessions** (`signed_cookies`): the cookie is the session, verified with
//!   `SECRET_KEY` and refused after `SESSION_COOKIE_AGE`.
//!
//! Missing, expired, malformed or tampered sessions are an anonymous user, never an error: the
//! reasons ([`DjangoError`]) are logged. [`pickle`] and [`signing`] are the two formats, on their
//! own; the worker uses this module through [`DjangoSessions`] (`Worker::http_sessions`).

use std::time::Duration;

use cookie::Cookie;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::{Map as JsonMap, Value as Json};
use switchyard_routing::{HttpSession, Message, Value};
use thiserror::Error;

pub mod pickle;
pub mod signing;

pub use pickle::{MAX_PICKLE_DECODED, MAX_PICKLE_DEPTH, unpickle};
pub use signing::verify_signed;

/// Why the session reader cannot be set up, or why one stored or signed session is not used
/// (its user is then anonymous).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DjangoError {
    /// The session Redis URL does not parse.
    #[error("invalid Django session Redis URL: {0}")]
    InvalidRedisUrl(#[source] redis::RedisError),
    /// The session Redis connection cannot be configured.
    #[error("cannot set up the Django session Redis: {0}")]
    RedisSetup(#[source] redis::RedisError),
    /// A value expected to be signed has no signature.
    #[error("not a signed value")]
    NotSigned,
    /// No secret (`SECRET_KEY` or a fallback) produced the signature.
    #[error("bad signature")]
    BadSignature,
    /// The signature is older than `SESSION_COOKIE_AGE`.
    #[error("signature expired")]
    Expired,
    /// A correctly signed value whose timestamp or payload does not decode.
    #[error("malformed signed value: {0}")]
    MalformedSigned(&'static str),
    /// The stored session is JSON (django-redis' JSON serializer) that does not parse.
    #[error("the stored session is not valid JSON: {0}")]
    StoredJson(#[source] serde_json::Error),
    /// The stored session is neither pickle, JSON nor UTF-8 text.
    #[error("the stored session is not UTF-8 text")]
    StoredNotText,
    /// The session decodes to something other than a dict.
    #[error("the session is not a dict")]
    NotADict,
    /// A pickle that is truncated or inconsistent.
    #[error("malformed pickle: {0}")]
    Pickle(&'static str),
    /// A pickle opcode outside plain data (a class, a reducer…): never executed.
    #[error("pickle opcode 0x{0:02x} is not plain data; refusing to load")]
    PickleNotPlainData(u8),
    /// A pickle nested deeper than [`MAX_PICKLE_DEPTH`].
    #[error(
        "pickle nested deeper than {} levels; refusing to load",
        MAX_PICKLE_DEPTH
    )]
    PickleTooDeep,
    /// A pickle that decodes to more than [`MAX_PICKLE_DECODED`] bytes.
    #[error(
        "pickle decodes to more than {} bytes; refusing to load",
        MAX_PICKLE_DECODED
    )]
    PickleTooLarge,
}

/// Largest stored session [`DjangoSessions`] decodes; a larger one is refused (anonymous).
pub const MAX_STORED_SESSION: usize = 1 << 20;

/// Where and how the Django app keeps its sessions.
#[derive(Debug, Clone)]
pub struct DjangoSessionConfig {
    /// The Redis of the Django cache (`CACHES["default"]["LOCATION"]`).
    pub redis_url: String,
    /// `SECRET_KEY`.
    pub secret_key: String,
    /// `SECRET_KEY_FALLBACKS`.
    pub secret_key_fallbacks: Vec<String>,
    /// `CACHES[...]["KEY_PREFIX"]` (empty by default).
    pub cache_key_prefix: String,
    /// `CACHES[...]["VERSION"]` (1).
    pub cache_version: u32,
    /// The session backend's cache-key prefix: `django.contrib.sessions.cache` for the `cache`
    /// engine, `django.contrib.sessions.cached_db` for `cached_db`.
    pub session_key_prefix: String,
    /// `SESSION_COOKIE_NAME` (`sessionid`).
    pub cookie_name: String,
    /// `SESSION_COOKIE_AGE`, the limit for signed-cookie sessions (two weeks).
    pub signed_cookie_max_age: Duration,
    /// Bound on one Redis read (2 s).
    pub timeout: Duration,
}

impl DjangoSessionConfig {
    /// Django's defaults for cache-backed sessions in the Redis at `redis_url`.
    pub fn new(redis_url: impl Into<String>, secret_key: impl Into<String>) -> Self {
        DjangoSessionConfig {
            redis_url: redis_url.into(),
            secret_key: secret_key.into(),
            secret_key_fallbacks: Vec::new(),
            cache_key_prefix: String::new(),
            cache_version: 1,
            session_key_prefix: "django.contrib.sessions.cache".to_owned(),
            cookie_name: "sessionid".to_owned(),
            signed_cookie_max_age: Duration::from_secs(1_209_600),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Reads Django sessions; cheap to share between worker loops.
#[derive(Clone)]
pub struct DjangoSessions {
    config: DjangoSessionConfig,
    conn: ConnectionManager,
}

impl std::fmt::Debug for DjangoSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DjangoSessions")
            .field("cookie_name", &self.config.cookie_name)
            .field("session_key_prefix", &self.config.session_key_prefix)
            .finish_non_exhaustive()
    }
}

/// The salt of `SessionBase.encode()` (`"django.contrib.sessions." + "SessionStore"`).
pub(crate) const STORE_SALT: &str = "django.contrib.sessions.SessionStore";
/// The salt of signed-cookie sessions.
const SIGNED_COOKIE_SALT: &str = "django.contrib.sessions.backends.signed_cookies";

impl DjangoSessions {
    /// Sets up the reader (the Redis connection is made on first use).
    pub fn new(config: DjangoSessionConfig) -> Result<Self, DjangoError> {
        let client =
            redis::Client::open(config.redis_url.as_str()).map_err(DjangoError::InvalidRedisUrl)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(DjangoError::RedisSetup)?;
        Ok(DjangoSessions { config, conn })
    }

    /// The cookie carrying the session key.
    pub fn cookie_name(&self) -> &str {
        &self.config.cookie_name
    }

    /// The session of the connection `message` belongs to (anonymous when there is none).
    pub async fn load(&self, message: &Message) -> HttpSession {
        match session_key_of(message, &self.config.cookie_name) {
            Some(key) => self.load_key(&key).await,
            None => HttpSession::anonymous(),
        }
    }

    /// The session stored under `session_key` (anonymous when missing, expired or invalid).
    pub async fn load_key(&self, session_key: &str) -> HttpSession {
        if session_key.contains(':') {
            return match verify_signed(
                session_key,
                SIGNED_COOKIE_SALT,
                &self.secrets(),
                Some(self.config.signed_cookie_max_age),
            ) {
                Ok(data) => HttpSession {
                    session_key: Some(session_key.to_owned()),
                    data,
                },
                Err(why) => {
                    tracing::info!(reason = %why, "signed-cookie session refused; anonymous");
                    HttpSession::anonymous()
                }
            };
        }
        if !valid_session_key(session_key) {
            tracing::info!("malformed session key; anonymous");
            return HttpSession::anonymous();
        }
        let cache_key = format!(
            "{}:{}:{}{}",
            self.config.cache_key_prefix,
            self.config.cache_version,
            self.config.session_key_prefix,
            session_key
        );
        let mut conn = self.conn.clone();
        let get = redis::cmd("GET").arg(&cache_key).to_owned();
        let stored: Option<Vec<u8>> =
            match tokio::time::timeout(self.config.timeout, get.query_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the Django session; anonymous");
                    return HttpSession::anonymous();
                }
                Err(_) => {
                    tracing::warn!("reading the Django session timed out; anonymous");
                    return HttpSession::anonymous();
                }
            };
        let Some(stored) = stored else {
            return HttpSession::anonymous();
        };
        if stored.len() > MAX_STORED_SESSION {
            tracing::warn!(
                size = stored.len(),
                limit = MAX_STORED_SESSION,
                "stored Django session too large; anonymous"
            );
            return HttpSession::anonymous();
        }
        match self.decode_stored(&stored) {
            Ok(data) => HttpSession {
                session_key: Some(session_key.to_owned()),
                data,
            },
            Err(why) => {
                tracing::warn!(reason = %why, "undecodable or tampered Django session; anonymous");
                HttpSession::anonymous()
            }
        }
    }

    fn secrets(&self) -> Vec<&str> {
        std::iter::once(self.config.secret_key.as_str())
            .chain(self.config.secret_key_fallbacks.iter().map(String::as_str))
            .collect()
    }

    fn decode_stored(&self, stored: &[u8]) -> Result<JsonMap<String, Json>, DjangoError> {
        let value = if stored.first() == Some(&0x80) {
            unpickle(stored)?
        } else if stored.first() == Some(&b'{') {
            // django-redis with its JSON serializer.
            serde_json::from_slice(stored).map_err(DjangoError::StoredJson)?
        } else {
            Json::String(
                String::from_utf8(stored.to_vec()).map_err(|_| DjangoError::StoredNotText)?,
            )
        };
        match value {
            Json::Object(m) => Ok(m),
            // A store that keeps `SessionBase.encode()` output: a signed string.
            Json::String(s) => verify_signed(&s, STORE_SALT, &self.secrets(), None),
            _ => Err(DjangoError::NotADict),
        }
    }
}

/// Django session keys: 32 lowercase letters and digits (accept 8..=64 ASCII alphanumerics).
fn valid_session_key(key: &str) -> bool {
    (8..=64).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn header_values<'a>(message: &'a Message, name: &str) -> Vec<&'a [u8]> {
    let Some(headers) = message.get("headers").and_then(Value::as_array) else {
        return Vec::new();
    };
    headers
        .iter()
        .filter_map(|h| {
            let pair = h.as_array()?;
            let (n, v) = (pair.first()?, pair.get(1)?);
            let n = n.as_bytes().or_else(|| n.as_str().map(str::as_bytes))?;
            let v = v.as_bytes().or_else(|| v.as_str().map(str::as_bytes))?;
            n.eq_ignore_ascii_case(name.as_bytes()).then_some(v)
        })
        .collect()
}

/// The session key from the `Cookie` header, else from a `session_key` query parameter.
pub fn session_key_of(message: &Message, cookie_name: &str) -> Option<String> {
    for header in header_values(message, "cookie") {
        let Ok(text) = std::str::from_utf8(header) else {
            continue;
        };
        // A malformed pair (no `=`, no name) is skipped, as browsers and Django skip it.
        let found = Cookie::split_parse(text)
            .flatten()
            .find(|c| c.name() == cookie_name && !c.value_trimmed().is_empty());
        if let Some(cookie) = found {
            return Some(cookie.value_trimmed().to_owned());
        }
    }
    let query: &[u8] = match message.get("query_string")? {
        Value::Bytes(b) => b.as_slice(),
        Value::Str(s) => s.as_bytes(),
        _ => return None,
    };
    form_urlencoded::parse(query)
        .find_map(|(k, v)| (k == "session_key" && !v.is_empty()).then(|| v.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_key_from_cookie_or_query() {
        let m = Message::new(
            "websocket.connect",
            &switchyard_routing::Map::new()
                .with(
                    "headers",
                    vec![Value::Array(vec![
                        switchyard_routing::ByteString::from("cookie").into(),
                        switchyard_routing::ByteString::from("csrftoken=x; sessionid=abc123def456")
                            .into(),
                    ])],
                )
                .with(
                    "query_string",
                    switchyard_routing::ByteString::from("session_key=zzz"),
                ),
        )
        .unwrap();
        assert_eq!(
            session_key_of(&m, "sessionid").as_deref(),
            Some("abc123def456")
        );
        let q = Message::new(
            "websocket.connect",
            &switchyard_routing::Map::new().with(
                "query_string",
                switchyard_routing::ByteString::from("a=1&session_key=k%3Ay"),
            ),
        )
        .unwrap();
        assert_eq!(session_key_of(&q, "sessionid").as_deref(), Some("k:y"));
        assert!(!valid_session_key("../../etc"));
        assert!(valid_session_key("abcdefgh12345678"));
    }

    fn with_cookie(header: &str, query: &str) -> Message {
        Message::new(
            "websocket.connect",
            &switchyard_routing::Map::new()
                .with(
                    "headers",
                    vec![Value::Array(vec![
                        switchyard_routing::ByteString::from("Cookie").into(),
                        switchyard_routing::ByteString::from(header).into(),
                    ])],
                )
                .with("query_string", switchyard_routing::ByteString::from(query)),
        )
        .unwrap()
    }

    #[test]
    fn cookie_edge_cases() {
        let key =
            |header: &str, query: &str| session_key_of(&with_cookie(header, query), "sessionid");
        assert_eq!(key("sessionid=\"abc\"", "").as_deref(), Some("abc"));
        assert_eq!(key("  sessionid = abc ;x=1", "").as_deref(), Some("abc"));
        assert_eq!(
            key("xsessionid=no; sessionid=yes", "").as_deref(),
            Some("yes")
        );
        // An empty value, a piece without `=` or without a name: the next cookie is looked at.
        assert_eq!(
            key("sessionid=; junk; =v; sessionid=k2", "").as_deref(),
            Some("k2")
        );
        assert_eq!(key("sessionid=\"\"", "").as_deref(), None);
        // Signed-cookie sessions keep their colons and base64.
        assert_eq!(
            key("sessionid=eyJh:1aBcDe:x-Y_z", "").as_deref(),
            Some("eyJh:1aBcDe:x-Y_z")
        );
        // No cookie: the query, form-decoded (`+` is a space), empty values skipped.
        assert_eq!(
            key("other=1", "session_key=&session_key=a+b%2B").as_deref(),
            Some("a b+")
        );
        assert_eq!(key("other=1", "session%5Fkey=v").as_deref(), Some("v"));
        assert_eq!(key("other=1", "session_key").as_deref(), None);
        assert_eq!(key("", "").as_deref(), None);
    }
}

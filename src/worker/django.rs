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
//! Missing, expired, malformed or tampered sessions are an anonymous user, never an error.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::{Map as JsonMap, Value as Json};
use sha2::{Digest, Sha256};
use switchyard_routing::{HttpSession, Message, Value};

use crate::layer::LayerError;

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
const STORE_SALT: &str = "django.contrib.sessions.SessionStore";
/// The salt of signed-cookie sessions.
const SIGNED_COOKIE_SALT: &str = "django.contrib.sessions.backends.signed_cookies";

impl DjangoSessions {
    /// Sets up the reader (the Redis connection is made on first use).
    pub fn new(config: DjangoSessionConfig) -> Result<Self, LayerError> {
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| LayerError::Config(format!("invalid Django session Redis URL: {e}")))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client, manager).map_err(|e| {
            LayerError::Config(format!("cannot set up the Django session Redis: {e}"))
        })?;
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
                    tracing::info!(reason = why, "signed-cookie session refused; anonymous");
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

    fn decode_stored(&self, stored: &[u8]) -> Result<JsonMap<String, Json>, String> {
        let value = if stored.first() == Some(&0x80) {
            unpickle(stored)?
        } else if stored.first() == Some(&b'{') {
            // django-redis with its JSON serializer.
            serde_json::from_slice(stored).map_err(|e| e.to_string())?
        } else {
            Json::String(String::from_utf8(stored.to_vec()).map_err(|e| e.to_string())?)
        };
        match value {
            Json::Object(m) => Ok(m),
            // A store that keeps `SessionBase.encode()` output: a signed string.
            Json::String(s) => {
                verify_signed(&s, STORE_SALT, &self.secrets(), None).map_err(str::to_owned)
            }
            _ => Err("the stored session is not a dict".to_owned()),
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

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The session key from the `Cookie` header, else from a `session_key` query parameter.
pub fn session_key_of(message: &Message, cookie_name: &str) -> Option<String> {
    for header in header_values(message, "cookie") {
        let Ok(text) = std::str::from_utf8(header) else {
            continue;
        };
        for part in text.split(';') {
            if let Some((k, v)) = part.trim().split_once('=')
                && k.trim() == cookie_name
            {
                let v = v.trim().trim_matches('"');
                if !v.is_empty() {
                    return Some(v.to_owned());
                }
            }
        }
    }
    let query = match message.get("query_string")? {
        Value::Bytes(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        Value::Str(s) => s.clone(),
        _ => return None,
    };
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (percent_decode(k) == "session_key" && !v.is_empty()).then(|| percent_decode(v))
    })
}

fn salted_hmac(salt: &str, secret: &str, value: &[u8]) -> Vec<u8> {
    let key = Sha256::digest(format!("{salt}{secret}").as_bytes());
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
        return Vec::new();
    };
    mac.update(value);
    mac.finalize().into_bytes().to_vec()
}

fn b62_decode(s: &str) -> Option<i64> {
    const DIGITS: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let (sign, digits) = match s.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, s),
    };
    let mut n: i64 = 0;
    for c in digits.chars() {
        let d = i64::try_from(DIGITS.find(c)?).ok()?;
        n = n.checked_mul(62)?.checked_add(d)?;
    }
    Some(sign * n)
}

/// `django.core.signing.loads` for a `TimestampSigner` with SHA-256 (Django 3.1+): checks the
/// signature against each secret, the age when `max_age` is given, then decodes (and inflates)
/// the JSON payload.
pub fn verify_signed(
    signed: &str,
    salt: &str,
    secrets: &[&str],
    max_age: Option<Duration>,
) -> Result<JsonMap<String, Json>, &'static str> {
    let (value, signature) = signed.rsplit_once(':').ok_or("not a signed value")?;
    let signer_salt = format!("{salt}signer");
    let ok = secrets.iter().any(|secret| {
        let expected = URL_SAFE_NO_PAD.encode(salted_hmac(&signer_salt, secret, value.as_bytes()));
        constant_time_eq(expected.as_bytes(), signature.as_bytes())
    });
    if !ok {
        return Err("bad signature");
    }
    let (payload, timestamp) = value.rsplit_once(':').ok_or("no timestamp")?;
    if let Some(max_age) = max_age {
        let ts = b62_decode(timestamp).ok_or("bad timestamp")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let age = i64::try_from(now).unwrap_or(i64::MAX).saturating_sub(ts);
        if age > i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX) {
            return Err("signature expired");
        }
    }
    let (compressed, b64) = match payload.strip_prefix('.') {
        Some(rest) => (true, rest),
        None => (false, payload),
    };
    let mut data = URL_SAFE_NO_PAD
        .decode(b64.trim_end_matches('='))
        .map_err(|_| "bad base64")?;
    if compressed {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(&data[..])
            .take(16 * 1024 * 1024)
            .read_to_end(&mut out)
            .map_err(|_| "bad zlib data")?;
        data = out;
    }
    match serde_json::from_slice(&data).map_err(|_| "bad JSON")? {
        Json::Object(m) => Ok(m),
        _ => Err("the session is not a dict"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

enum Item {
    Mark,
    /// A value and its nesting depth (0 for a scalar, 1 + its deepest child for a container).
    Value(Json, u32),
}

/// Deepest nesting [`unpickle`] accepts. Dropping a `serde_json::Value` recurses once per level,
/// so a crafted pickle of lists 20 000 deep would overflow a worker's stack and abort the process.
pub const MAX_PICKLE_DEPTH: u32 = 100;

/// Most decoded data [`unpickle`] builds (string bytes plus a word per opcode): memo references
/// copy their string, so a small pickle could otherwise allocate gigabytes.
pub const MAX_PICKLE_DECODED: usize = 1 << 20;

/// Largest stored session [`DjangoSessions`] decodes; a larger one is refused (anonymous).
pub const MAX_STORED_SESSION: usize = 1 << 20;

/// Decodes a pickle holding only plain data (protocols 2–5). Never executes anything: classes,
/// reducers and other object opcodes are refused.
pub fn unpickle(data: &[u8]) -> Result<Json, String> {
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: std::collections::HashMap<u64, Option<Json>> = std::collections::HashMap::new();
    let mut pos = 0usize;
    let mut decoded = 0usize;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8], String> {
        let end = pos.checked_add(n).ok_or("length overflow")?;
        let s = data.get(*pos..end).ok_or("truncated pickle")?;
        *pos = end;
        Ok(s)
    };
    fn uint(b: &[u8]) -> u64 {
        b.iter()
            .rev()
            .fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
    }
    fn pop(stack: &mut Vec<Item>) -> Result<(Json, u32), String> {
        match stack.pop() {
            Some(Item::Value(v, d)) => Ok((v, d)),
            _ => Err("stack underflow".into()),
        }
    }
    fn pop_mark(stack: &mut Vec<Item>) -> Result<(Vec<Json>, u32), String> {
        let mut items = Vec::new();
        let mut deepest = 0;
        loop {
            match stack.pop() {
                Some(Item::Mark) => break,
                Some(Item::Value(v, d)) => {
                    deepest = deepest.max(d);
                    items.push(v);
                }
                None => return Err("missing mark".into()),
            }
        }
        items.reverse();
        Ok((items, deepest))
    }
    /// Records that the container on top of the stack now holds a child `child_depth` deep.
    fn deepen(stack: &mut [Item], child_depth: u32) -> Result<(), String> {
        if let Some(Item::Value(_, d)) = stack.last_mut() {
            *d = (*d).max(child_depth + 1);
            if *d > MAX_PICKLE_DEPTH {
                return Err(format!(
                    "pickle nested deeper than {MAX_PICKLE_DEPTH} levels; refusing to load"
                ));
            }
        }
        Ok(())
    }
    fn container(items: Vec<Json>, deepest: u32) -> Result<Item, String> {
        let depth = if items.is_empty() { 1 } else { deepest + 1 };
        if depth > MAX_PICKLE_DEPTH {
            return Err(format!(
                "pickle nested deeper than {MAX_PICKLE_DEPTH} levels; refusing to load"
            ));
        }
        Ok(Item::Value(Json::Array(items), depth))
    }
    fn set_items(stack: &mut [Item], kv: Vec<Json>) -> Result<(), String> {
        let Some(Item::Value(Json::Object(map), _)) = stack.last_mut() else {
            return Err("SETITEM on a non-dict".into());
        };
        let mut it = kv.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let key = match k {
                Json::String(s) => s,
                Json::Number(n) => n.to_string(),
                _ => return Err("a dict key that is not a string".into()),
            };
            map.insert(key, v);
        }
        Ok(())
    }
    fn append(stack: &mut [Item], items: Vec<Json>) -> Result<(), String> {
        let Some(Item::Value(Json::Array(list), _)) = stack.last_mut() else {
            return Err("APPEND on a non-list".into());
        };
        list.extend(items);
        Ok(())
    }
    fn text(b: &[u8]) -> Result<Json, String> {
        Ok(Json::String(
            std::str::from_utf8(b)
                .map_err(|e| e.to_string())?
                .to_owned(),
        ))
    }
    fn int(n: i64) -> Json {
        Json::Number(n.into())
    }
    loop {
        let op = *take(&mut pos, 1)?.first().ok_or("truncated pickle")?;
        match op {
            0x80 => {
                take(&mut pos, 1)?;
            }
            0x95 => {
                take(&mut pos, 8)?;
            }
            b'.' => return pop(&mut stack).map(|(v, _)| v),
            b'}' => stack.push(Item::Value(Json::Object(JsonMap::new()), 1)),
            b']' | b')' | 0x8f => stack.push(Item::Value(Json::Array(Vec::new()), 1)),
            b'(' => stack.push(Item::Mark),
            b'N' => stack.push(Item::Value(Json::Null, 0)),
            0x88 => stack.push(Item::Value(Json::Bool(true), 0)),
            0x89 => stack.push(Item::Value(Json::Bool(false), 0)),
            b'K' => {
                let b = take(&mut pos, 1)?;
                stack.push(Item::Value(int(i64::from(b[0])), 0));
            }
            b'M' => {
                let b = take(&mut pos, 2)?;
                stack.push(Item::Value(
                    int(i64::from(u16::from_le_bytes([b[0], b[1]]))),
                    0,
                ));
            }
            b'J' => {
                let b = take(&mut pos, 4)?;
                stack.push(Item::Value(
                    int(i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                    0,
                ));
            }
            0x8a => {
                let n = usize::from(take(&mut pos, 1)?[0]);
                let b = take(&mut pos, n)?;
                if n > 8 {
                    return Err("integer too large".into());
                }
                let mut v = uint(b) as i64;
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Item::Value(int(v), 0));
            }
            b'G' => {
                let b = take(&mut pos, 8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                let f = f64::from_be_bytes(a);
                stack.push(Item::Value(
                    serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
                    0,
                ));
            }
            0x8c | b'X' | 0x8d | b'C' | b'B' | 0x8e => {
                let width = match op {
                    0x8c | b'C' => 1,
                    b'X' | b'B' => 4,
                    _ => 8,
                };
                let n = usize::try_from(uint(take(&mut pos, width)?)).map_err(|e| e.to_string())?;
                let b = take(&mut pos, n)?;
                let v = if matches!(op, b'C' | b'B' | 0x8e) {
                    Json::String(String::from_utf8_lossy(b).into_owned())
                } else {
                    text(b)?
                };
                decoded = decoded.saturating_add(n);
                stack.push(Item::Value(v, 0));
            }
            0x94 | b'q' | b'r' => {
                let idx = match op {
                    0x94 => memo.len() as u64,
                    b'q' => uint(take(&mut pos, 1)?),
                    _ => uint(take(&mut pos, 4)?),
                };
                // Containers may still change after being memoized; a later reference to one
                // would need shared objects, which plain session data never has.
                let snapshot = match stack.last() {
                    Some(Item::Value(Json::Object(_) | Json::Array(_), _)) => None,
                    Some(Item::Value(v, _)) => Some(v.clone()),
                    _ => return Err("memoize with an empty stack".into()),
                };
                memo.insert(idx, snapshot);
            }
            b'h' | b'j' => {
                let idx = if op == b'h' {
                    uint(take(&mut pos, 1)?)
                } else {
                    uint(take(&mut pos, 4)?)
                };
                match memo.get(&idx) {
                    Some(Some(v)) => {
                        decoded = decoded.saturating_add(match v {
                            Json::String(s) => s.len(),
                            _ => 0,
                        });
                        if decoded > MAX_PICKLE_DECODED {
                            return Err(format!(
                                "pickle decodes to more than {MAX_PICKLE_DECODED} bytes; refusing to load"
                            ));
                        }
                        stack.push(Item::Value(v.clone(), 0));
                    }
                    Some(None) => {
                        return Err("shared container references are not supported".into());
                    }
                    None => return Err("unknown memo reference".into()),
                }
            }
            b's' => {
                let (v, depth) = pop(&mut stack)?;
                let (k, _) = pop(&mut stack)?;
                deepen(&mut stack, depth)?;
                set_items(&mut stack, vec![k, v])?;
            }
            b'u' => {
                let (items, depth) = pop_mark(&mut stack)?;
                deepen(&mut stack, depth)?;
                set_items(&mut stack, items)?;
            }
            b'a' => {
                let (v, depth) = pop(&mut stack)?;
                deepen(&mut stack, depth)?;
                append(&mut stack, vec![v])?;
            }
            b'e' | 0x90 => {
                let (items, depth) = pop_mark(&mut stack)?;
                deepen(&mut stack, depth)?;
                append(&mut stack, items)?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    return Err("stack underflow".into());
                }
                let mut items = Vec::with_capacity(n);
                let mut deepest = 0;
                for _ in 0..n {
                    let (v, d) = pop(&mut stack)?;
                    deepest = deepest.max(d);
                    items.push(v);
                }
                items.reverse();
                stack.push(container(items, deepest)?);
            }
            b't' | 0x91 => {
                let (items, deepest) = pop_mark(&mut stack)?;
                stack.push(container(items, deepest)?);
            }
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} is not plain data; refusing to load"
                ));
            }
        }
        decoded = decoded.saturating_add(8);
        if decoded > MAX_PICKLE_DECODED {
            return Err(format!(
                "pickle decodes to more than {MAX_PICKLE_DECODED} bytes; refusing to load"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpickles_python_session_dict() {
        // pickle.dumps({'_auth_user_id': '42', 'n': 3, 'neg': -5, 'big': 70000, 'f': 1.5,
        //   'ok': True, 'no': None, 'l': [1, 'a'], 't': (1, 2), 'huge': 2**40, 'u': 'é'},
        //   protocol=5), as printed by CPython 3.
        let data: &[u8] = b"\x80\x05\x95\x7f\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\r_auth_user_id\x94\x8c\x0242\x94\x8c\x01n\x94K\x03\x8c\x03neg\x94J\xfb\xff\xff\xff\x8c\x03big\x94Jp\x11\x01\x00\x8c\x01f\x94G?\xf8\x00\x00\x00\x00\x00\x00\x8c\x02ok\x94\x88\x8c\x02no\x94N\x8c\x01l\x94]\x94(K\x01\x8c\x01a\x94e\x8c\x01t\x94K\x01K\x02\x86\x94\x8c\x04huge\x94\x8a\x06\x00\x00\x00\x00\x00\x01\x8c\x01u\x94\x8c\x02\xc3\xa9\x94u.";
        let v = unpickle(data).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"_auth_user_id": "42", "n": 3, "neg": -5, "big": 70000, "f": 1.5,
                               "ok": true, "no": null, "l": [1, "a"], "t": [1, 2],
                               "huge": 1_099_511_627_776_i64, "u": "é"})
        );
    }

    #[test]
    fn refuses_objects() {
        // pickle.dumps(datetime.date(2020, 1, 1), protocol=2)
        let data: &[u8] = b"\x80\x02cdatetime\ndate\nq\x00c_codecs\nencode\nq\x01X\x05\x00\x00\x00\x07\xc3\xa4\x01\x01q\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05\x85q\x06Rq\x07.";
        assert!(unpickle(data).unwrap_err().contains("not plain data"));
        assert!(unpickle(b"\x80\x05}").is_err());
        assert!(unpickle(b"").is_err());
    }

    #[test]
    fn refuses_deep_nesting_without_overflowing_the_stack() {
        // `]` x 20000, `a` x 19999: lists 20 000 deep. Built and dropped, that overflowed a
        // 2 MiB stack; run on one so the test fails the way the worker would.
        let mut data = b"\x80\x02".to_vec();
        data.extend(std::iter::repeat_n(b']', 20_000));
        data.extend(std::iter::repeat_n(b'a', 19_999));
        data.push(b'.');
        let err = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || unpickle(&data).map(|_| ()))
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert!(err.unwrap_err().contains("deeper than"));
        // Tuples too; 100 levels are fine.
        let mut ok = b"\x80\x02".to_vec();
        ok.extend(std::iter::repeat_n(b']', 100));
        ok.extend(std::iter::repeat_n(b'a', 99));
        ok.push(b'.');
        assert!(unpickle(&ok).is_ok());
        let mut tuples = b"\x80\x02K\x01".to_vec();
        tuples.extend(std::iter::repeat_n(0x85, 200));
        tuples.push(b'.');
        assert!(unpickle(&tuples).unwrap_err().contains("deeper than"));
    }

    #[test]
    fn refuses_memo_amplification() {
        // A 64 KiB string memoized once, then referenced 100 000 times (`h\x00`, 2 bytes each):
        // 200 KB of pickle that would decode to 6.5 GB.
        let mut data = b"\x80\x02]".to_vec();
        data.push(b'X');
        data.extend_from_slice(&(65_536u32).to_le_bytes());
        data.extend(std::iter::repeat_n(b'x', 65_536));
        data.extend_from_slice(b"q\x00a");
        for _ in 0..100_000 {
            data.extend_from_slice(b"h\x00a");
        }
        data.push(b'.');
        assert!(unpickle(&data).unwrap_err().contains("more than"));
    }

    #[test]
    fn signed_values_verify_with_the_secret() {
        // signing.dumps({"a": 1}, key="s3cret", salt="django.contrib.sessions.SessionStore")
        // computed here the way Django does, then checked and tampered with.
        let payload = URL_SAFE_NO_PAD.encode(br#"{"a":1}"#);
        let value = format!("{payload}:1aBcDe");
        let sig = URL_SAFE_NO_PAD.encode(salted_hmac(
            &format!("{STORE_SALT}signer"),
            "s3cret",
            value.as_bytes(),
        ));
        let signed = format!("{value}:{sig}");
        let m = verify_signed(&signed, STORE_SALT, &["s3cret"], None).unwrap();
        assert_eq!(m.get("a"), Some(&Json::from(1)));
        assert!(verify_signed(&signed, STORE_SALT, &["other", "s3cret"], None).is_ok());
        assert_eq!(
            verify_signed(&signed, STORE_SALT, &["wrong"], None),
            Err("bad signature")
        );
        let tampered = signed.replacen(&payload[..2], "ZZ", 1);
        assert!(verify_signed(&tampered, STORE_SALT, &["s3cret"], None).is_err());
        assert_eq!(
            verify_signed(
                &signed,
                STORE_SALT,
                &["s3cret"],
                Some(Duration::from_secs(60))
            ),
            Err("signature expired")
        );
    }

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
}

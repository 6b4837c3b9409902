//! HTTP sessions from Django: sessions written into a real redis-server by real Django (the
//! project's Python venv, `tests/python/django_sessions.py`) are read by a worker from the
//! handshake's `sessionid` cookie or `session_key` query parameter; missing, expired, tampered,
//! corrupt or unsafe sessions are an anonymous user, never an error.
//!
//! Needs `.venv/bin/python` (from `scripts/setup-python.sh`) or `SWITCHYARD_PYTHON` with Django
//! and redis installed. Without it the test fails when `CI` is set and is skipped otherwise.
#![cfg(feature = "django")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::{RedisServer, eventually, next_text};
use switchyard::django::{DjangoSessionConfig, DjangoSessions};
use switchyard::layer::{Layer, LayerSettings, LocalChannel};
use switchyard::routing::asgi::{WebsocketConnect, WebsocketReceive};
use switchyard::routing::{
    ByteString, ConsumerError, Ctx, Map, Message, Router, WebsocketConsumer, route_class,
};
use switchyard::worker::Worker;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "django-insecure-switchyard-test-secret";
const WAIT: Duration = Duration::from_secs(10);

fn python() -> Result<PathBuf, String> {
    let path = std::env::var("SWITCHYARD_PYTHON").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
        PathBuf::from,
    );
    let ok = Command::new(&path)
        .args(["-c", "import django, redis"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if !ok.status.success() {
        return Err(format!(
            "{} cannot import django and redis: {}",
            path.display(),
            String::from_utf8_lossy(&ok.stderr)
        ));
    }
    Ok(path)
}

struct Who;

impl WebsocketConsumer for Who {
    fn http_session(&self) -> bool {
        true
    }
    fn channel_session(&self) -> bool {
        true
    }
    async fn connect(&self, _m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        let session = ctx.http_session().cloned().unwrap_or_default();
        ctx.accept()?;
        ctx.send_json(&serde_json::json!({
            "user": ctx.user_id(),
            "name": session.data.get("name"),
            "cart": session.data.get("cart"),
            "visits": session.data.get("visits"),
        }))
    }
    async fn receive(&self, _m: &Message, ctx: &Ctx) -> Result<(), ConsumerError> {
        ctx.send_text(format!(
            "user={}",
            ctx.user_id().unwrap_or_else(|| "anonymous".into())
        ))
    }
}

/// Connects with a cookie or query string, returns what the consumer saw.
async fn who(
    layer: &Layer,
    ch: &mut LocalChannel,
    cookie: Option<&str>,
    query: &str,
) -> serde_json::Value {
    let mut connect = WebsocketConnect::new(ch.name(), "/who/");
    if let Some(c) = cookie {
        connect
            .headers
            .push((ByteString::from("cookie"), ByteString::from(c)));
    }
    connect.query_string = ByteString::from(query);
    layer.send("websocket.connect", &connect).await.unwrap();
    let accept: Map = ch
        .recv_timeout(WAIT)
        .await
        .expect("accept")
        .to_map()
        .unwrap();
    assert_eq!(accept, Map::new().with("accept", true));
    serde_json::from_str(&next_text(ch).await).unwrap()
}

#[tokio::test]
async fn reads_sessions_written_by_django() {
    let python = match python() {
        Ok(p) => p,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "Django is needed for this test: {why} (run scripts/setup-python.sh)"
            );
            eprintln!("SKIP reads_sessions_written_by_django: {why}");
            return;
        }
    };
    let redis = RedisServer::start();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/django_sessions.py");
    let out = Command::new(&python)
        .arg(&script)
        .args([redis.url().as_str(), SECRET])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "django_sessions.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = |k: &str| made[k].as_str().unwrap().to_owned();
    eprintln!("sessions written by Django {}", made["django"]);

    let layer = Layer::from_url(&redis.url(), LayerSettings::default())
        .await
        .unwrap();
    let router = Arc::new(Router::new([route_class(Who).path("^/who/")]).unwrap());
    let sessions = DjangoSessions::new(DjangoSessionConfig::new(redis.url(), SECRET)).unwrap();
    let wrong_secret =
        DjangoSessions::new(DjangoSessionConfig::new(redis.url(), "another-secret")).unwrap();
    let token = CancellationToken::new();
    let worker = Worker::new(layer.clone(), router.clone())
        .http_sessions(sessions)
        .receive_timeout(Duration::from_millis(200));
    let metrics = worker.metrics();
    let handle = tokio::spawn(worker.run(token.clone()));

    let inbox = layer.inbox("test.django").await.unwrap();
    let mut ch = inbox.new_channel();

    // A logged-in user, from the sessionid cookie.
    let user = key("user");
    let seen = who(
        &layer,
        &mut ch,
        Some(&format!("csrftoken=abc; sessionid={user}")),
        "",
    )
    .await;
    assert_eq!(
        seen,
        serde_json::json!({"user": "42", "name": "Ann", "cart": [1, 2, 3], "visits": 5})
    );
    // Frames carry no headers: the key remembered in the channel session at connect is used.
    layer
        .send(
            "websocket.receive",
            &WebsocketReceive::text(ch.name(), "/who/", "hi", 1),
        )
        .await
        .unwrap();
    assert_eq!(next_text(&mut ch).await, "user=42");

    // The same session from a session_key query parameter.
    let mut ch2 = inbox.new_channel();
    let seen = who(&layer, &mut ch2, None, &format!("x=1&session_key={user}")).await;
    assert_eq!(seen["user"], "42");

    // An anonymous visitor's session: data, no user.
    let mut ch3 = inbox.new_channel();
    let seen = who(
        &layer,
        &mut ch3,
        Some(&format!("sessionid={}", key("anon"))),
        "",
    )
    .await;
    assert_eq!(seen["user"], serde_json::Value::Null);
    assert_eq!(seen["visits"], 1);

    // A signed-cookie session (the cookie is the session), verified with SECRET_KEY.
    let signed = key("signed_cookie");
    let mut ch4 = inbox.new_channel();
    let seen = who(&layer, &mut ch4, Some(&format!("sessionid={signed}")), "").await;
    assert_eq!(seen["user"], "7");
    assert_eq!(seen["name"], "Bo".repeat(40));

    // Anonymous: tampered signed cookie, unknown key, malformed key, no cookie at all.
    let mut tampered = signed.clone().into_bytes();
    let i = tampered
        .iter()
        .position(|b| b.is_ascii_alphabetic())
        .unwrap()
        + 3;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for cookie in [
        Some(format!("sessionid={tampered}")),
        Some("sessionid=abcdefgh12345678abcdefgh12345678".to_owned()),
        Some("sessionid=../../etc/passwd".to_owned()),
        None,
    ] {
        let mut c = inbox.new_channel();
        let seen = who(&layer, &mut c, cookie.as_deref(), "").await;
        assert_eq!(seen["user"], serde_json::Value::Null, "cookie {cookie:?}");
    }

    // Another app's secret refuses the signed cookie.
    let probe = Message::new(
        "websocket.connect",
        &Map::new().with(
            "query_string",
            ByteString::from(format!("session_key={signed}").as_str()),
        ),
    )
    .unwrap();
    assert!(wrong_secret.load(&probe).await.is_anonymous());

    // Expired: Django set a 1 s expiry; once Redis dropped it, the user is anonymous.
    let expiring_key = format!(":1:{}", key("expiring_cache_key"));
    let r = &redis;
    eventually(
        Duration::from_secs(5),
        "Django's 1 s session expired in Redis",
        || r.cmd::<i64>(&[b"EXISTS", expiring_key.as_bytes()]) == 0,
    )
    .await;
    let mut c = inbox.new_channel();
    let seen = who(
        &layer,
        &mut c,
        Some(&format!("sessionid={}", key("expiring"))),
        "",
    )
    .await;
    assert_eq!(seen["user"], serde_json::Value::Null);

    // Corrupt data and an unsafe pickle (os.system) in place of a session: anonymous, and
    // nothing executed.
    let corrupt = "corruptcorruptcorrupt0123456789a";
    redis.cmd::<String>(&[
        b"SET",
        format!(":1:django.contrib.sessions.cache{corrupt}").as_bytes(),
        b"\x80\x05\x95garbage",
    ]);
    let evil = "evilevilevilevilevil0123456789ab";
    redis.cmd::<String>(&[
        b"SET",
        format!(":1:django.contrib.sessions.cache{evil}").as_bytes(),
        // pickle.dumps(E(), protocol=5) where E.__reduce__ returns (os.system, ("true",))
        b"\x80\x05\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94.",
    ]);
    for k in [corrupt, evil] {
        let mut c = inbox.new_channel();
        let seen = who(&layer, &mut c, Some(&format!("sessionid={k}")), "").await;
        assert_eq!(seen["user"], serde_json::Value::Null, "session {k}");
    }

    let s = metrics.snapshot();
    assert_eq!(
        (s.errors, s.panics),
        (0, 0),
        "no session problem was a consumer error"
    );
    token.cancel();
    tokio::time::timeout(WAIT, handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Hostile stored sessions (a pickle nested 20 000 deep, a memo-reference bomb, a value over
/// the size limit) are an anonymous user: no stack overflow, no huge allocation. Runs on the
/// test thread's 2 MiB stack, where the deep pickle used to abort the process.
#[tokio::test]
async fn hostile_stored_sessions_are_anonymous() {
    let redis = RedisServer::start();
    let sessions = DjangoSessions::new(DjangoSessionConfig::new(redis.url(), SECRET)).unwrap();
    let store = |key: &str, value: &[u8]| {
        let cache_key = format!(":1:django.contrib.sessions.cache{key}");
        let _: () = redis.cmd(&[b"SET", cache_key.as_bytes(), value]);
    };

    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat_n(b']', 20_000));
    deep.extend(std::iter::repeat_n(b'a', 19_999));
    deep.push(b'.');
    store("deepdeepdeepdeepdeepdeepdeep0001", &deep);

    let mut bomb = b"\x80\x02}X\x01\x00\x00\x00k]".to_vec();
    bomb.push(b'X');
    bomb.extend_from_slice(&(65_536u32).to_le_bytes());
    bomb.extend(std::iter::repeat_n(b'x', 65_536));
    bomb.extend_from_slice(b"q\x00a");
    for _ in 0..100_000 {
        bomb.extend_from_slice(b"h\x00a");
    }
    bomb.extend_from_slice(b"s.");
    store("bombbombbombbombbombbombbomb0001", &bomb);

    // Plain data, but over the 1 MiB limit.
    let mut big = b"\x80\x02}X\x01\x00\x00\x00kX".to_vec();
    big.extend_from_slice(&((1u32 << 20) + 1).to_le_bytes());
    big.extend(std::iter::repeat_n(b'x', (1 << 20) + 1));
    big.extend_from_slice(b"s.");
    store("bigbigbigbigbigbigbigbigbigb0001", &big);

    // A small session in the same layout loads, so the refusals above are not a setup error.
    store(
        "finefinefinefinefinefinefine0001",
        b"\x80\x02}X\x0d\x00\x00\x00_auth_user_idX\x02\x00\x00\x0042s.",
    );
    let fine = sessions.load_key("finefinefinefinefinefinefine0001").await;
    assert_eq!(fine.user_id().as_deref(), Some("42"));

    for key in [
        "deepdeepdeepdeepdeepdeepdeep0001",
        "bombbombbombbombbombbombbomb0001",
        "bigbigbigbigbigbigbigbigbigb0001",
    ] {
        let s = sessions.load_key(key).await;
        assert_eq!(s.session_key, None, "{key} is anonymous");
        assert!(s.data.is_empty(), "{key} has no data");
    }
}

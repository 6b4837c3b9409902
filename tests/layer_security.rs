//! The Redis layer's security options against a real redis-server: an ACL user and password in
//! the URL (`redis://user:pass@…`), `rediss://` with a certificate the test generates, and
//! `symmetric_encryption_keys` (what Redis holds is a Fernet token; a reader with another key,
//! or none, drops and counts it). Interop of the encryption with Python's channels_redis is in
//! tests/python_interop.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use switchyard::layer::{Layer, LayerSettings};
use switchyard::{ByteString, Map};

use support::RedisServer;

const WAIT: Duration = Duration::from_secs(5);

fn msg(text: &str) -> Map {
    Map::new()
        .with("text", text)
        .with("raw", ByteString::from(&b"\x00\xffsecret-bytes"[..]))
}

fn keys(keys: &[&str]) -> LayerSettings {
    LayerSettings {
        symmetric_encryption_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        ..LayerSettings::default()
    }
}

/// Adds ACL user `alice` (password `s3cret`, every command and key) and turns the default user
/// off, so only an authenticated client gets in.
fn lock_down(redis: &RedisServer) {
    let mut conn = redis.client().get_connection().unwrap();
    redis::cmd("ACL")
        .arg(&["SETUSER", "alice", "on", ">s3cret", "~*", "&*", "+@all"][..])
        .exec(&mut conn)
        .unwrap();
    redis::cmd("ACL")
        .arg(&["SETUSER", "default", "off"][..])
        .exec(&mut conn)
        .unwrap();
}

fn members(redis: &RedisServer, key: &str) -> Vec<Vec<u8>> {
    let mut conn = redis
        .client()
        .get_connection()
        .and_then(|mut c| {
            redis::cmd("AUTH")
                .arg(&["alice", "s3cret"][..])
                .exec(&mut c)?;
            Ok(c)
        })
        .unwrap();
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_and_password_in_the_url_authenticate_and_wrong_ones_are_clear_errors() {
    let redis = RedisServer::start();
    lock_down(&redis);
    let port = redis.port();
    let layer = Layer::from_url(
        &format!("redis://alice:s3cret@127.0.0.1:{port}/0"),
        LayerSettings::default(),
    )
    .await
    .unwrap();
    let mut rx = layer.receiver().await.unwrap();
    layer.send("acl.chan", &msg("hi")).await.unwrap();
    let got = rx
        .receive(&["acl.chan".to_owned()], WAIT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.to_map().unwrap(), msg("hi"));
    for url in [
        format!("redis://alice:wrong@127.0.0.1:{port}/0"),
        format!("redis://127.0.0.1:{port}/0"),
    ] {
        let err = Layer::from_url(&url, LayerSettings::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("WRONGPASS") || err.contains("NOAUTH") || err.contains("auth"),
            "{url}: {err}"
        );
        assert!(
            !err.contains("s3cret") && !err.contains("wrong@"),
            "password leaked: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_messages_are_tokens_in_redis_and_need_the_key() {
    let redis = RedisServer::start();
    let sealed = Layer::from_url(&redis.url(), keys(&["k-new", "k-old"]))
        .await
        .unwrap();
    let old_writer = Layer::from_url(&redis.url(), keys(&["k-old"]))
        .await
        .unwrap();
    let mut rx = sealed.receiver().await.unwrap();

    sealed.send("sealed", &msg("one")).await.unwrap();
    let mut conn = redis.client().get_connection().unwrap();
    let stored: Vec<Vec<u8>> = redis::cmd("ZRANGE")
        .arg("asgisealed")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert!(stored[0][12..].starts_with(b"gAAAAA"));
    assert!(!stored[0].windows(6).any(|w| w == b"secret"));
    let got = rx
        .receive(&["sealed".to_owned()], WAIT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.to_map().unwrap(), msg("one"));

    // Rotation: a message written with the old key is still read.
    old_writer.send("sealed", &msg("old key")).await.unwrap();
    let got = rx
        .receive(&["sealed".to_owned()], WAIT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.to_map().unwrap(), msg("old key"));

    // A reader with no key or another key drops the message and counts it.
    for reader_settings in [LayerSettings::default(), keys(&["k-other"])] {
        let reader = Layer::from_url(&redis.url(), reader_settings)
            .await
            .unwrap();
        let mut reader_rx = reader.receiver().await.unwrap();
        sealed.send("sealed.other", &msg("two")).await.unwrap();
        let got = reader_rx
            .receive(&["sealed.other".to_owned()], Duration::from_millis(300))
            .await
            .unwrap();
        assert!(got.is_none(), "read without the key: {got:?}");
        assert_eq!(reader.metrics().snapshot().garbage, 1);
    }
    // Local (`!`) channels, whose target name is inside the token.
    let inbox = sealed.inbox("sealedinbox").await.unwrap();
    let mut local = inbox.new_channel();
    sealed
        .group_add("sealed-group", local.name())
        .await
        .unwrap();
    sealed
        .group_send("sealed-group", &msg("group"))
        .await
        .unwrap();
    assert_eq!(
        local.recv_timeout(WAIT).await.unwrap().to_map().unwrap(),
        msg("group")
    );
    inbox.shutdown(WAIT).await;
    assert_eq!(sealed.metrics().snapshot().garbage, 0);
}

#[test]
fn an_empty_key_list_entry_is_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let redis = RedisServer::start();
    let err = rt
        .block_on(Layer::from_url(&redis.url(), keys(&[""])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least one non-empty key"), "{err}");
}

/// `rediss://` with an ACL user and encryption together, on a certificate made by rcgen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_an_acl_user_and_encryption() {
    let dir = std::env::temp_dir().join(format!("switchyard-sec-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let (redis, tls_port) = RedisServer::start_tls(&cert, &key);
    lock_down(&redis);
    let layer = Layer::from_url(
        &format!("rediss://alice:s3cret@127.0.0.1:{tls_port}/0#insecure"),
        keys(&["tls-and-fernet"]),
    )
    .await
    .unwrap();
    let mut rx = layer.receiver().await.unwrap();
    layer.send("tls.chan", &msg("over tls")).await.unwrap();
    let stored = members(&redis, "asgitls.chan");
    assert!(stored[0][12..].starts_with(b"gAAAAA"));
    let got = rx
        .receive(&["tls.chan".to_owned()], WAIT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.to_map().unwrap(), msg("over tls"));
    let _ = std::fs::remove_dir_all(&dir);
}

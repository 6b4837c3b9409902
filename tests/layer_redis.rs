//! Redis-only channel-layer tests: the blocking-pop traps (a client-side
//! timeout or a cancelled BZPOPMIN losing the message Redis pops anyway, a shared connection
//! blocked behind a pop) as regression tests, sharding over two redis-servers, expiry enforced at receive, garbage in
//! Redis, the stored wire format, an inbox pop bigger than a local buffer, and Redis stopped and
//! restarted under a live layer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use switchyard::layer::redis::consistent_hash;
use switchyard::layer::{Layer, LayerSettings};
use switchyard::{ByteString, Map, codec};

use support::{RedisServer, eventually};

const WAIT: Duration = Duration::from_secs(5);

fn msg(text: &str) -> Map {
    Map::new().with("text", text)
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn layer_on(servers: &[&RedisServer], settings: LayerSettings) -> Layer {
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    Layer::from_url(&urls.join(","), settings).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap1_a_blocked_pop_does_not_hold_up_sends() {
    let redis = RedisServer::start();
    let layer = layer_on(&[&redis], LayerSettings::default()).await;
    let blocked_layer = layer.clone();
    let blocked = tokio::spawn(async move {
        let mut rx = blocked_layer.receiver().await.unwrap();
        rx.receive(&["never.sent".to_owned()], Duration::from_secs(4))
            .await
            .unwrap()
    });
    // Give the pop time to reach Redis; the point is what happens while it blocks.
    eventually(WAIT, "the pop to be blocked in Redis", || {
        redis
            .cmd::<String>(&[b"CLIENT", b"LIST"])
            .contains("cmd=bzpopmin")
    })
    .await;
    // Sends and a full round trip on other channels complete while the pop is still blocked.
    layer.send("side", &msg("through")).await.unwrap();
    let mut rx = layer.receiver().await.unwrap();
    let got = rx
        .receive(&["side".to_owned()], WAIT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.to_map().unwrap(), msg("through"));
    assert!(
        !blocked.is_finished(),
        "the blocked pop is still waiting: nothing queued behind it"
    );
    layer.send("never.sent", &msg("wakes it")).await.unwrap();
    assert_eq!(
        blocked.await.unwrap().unwrap().to_map().unwrap(),
        msg("wakes it")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap2_a_pop_longer_than_the_client_default_timeout_is_not_cut_short() {
    let redis = RedisServer::start();
    let layer = layer_on(&[&redis], LayerSettings::default()).await;
    let mut rx = layer.receiver().await.unwrap();
    let started = Instant::now();
    // redis-rs 1.x cuts responses at 500 ms by default; a 1.5 s pop must run its course.
    let got = rx
        .receive(&["empty".to_owned()], Duration::from_millis(1500))
        .await;
    assert!(matches!(got, Ok(None)), "{got:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "returned after {:?}",
        started.elapsed()
    );
    layer.send("empty", &msg("after")).await.unwrap();
    assert_eq!(
        rx.receive(&["empty".to_owned()], WAIT)
            .await
            .unwrap()
            .unwrap()
            .to_map()
            .unwrap(),
        msg("after")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap3_messages_sent_after_timed_out_pops_are_never_lost() {
    let redis = RedisServer::start();
    let layer = layer_on(&[&redis], LayerSettings::default()).await;
    let mut rx = layer.receiver().await.unwrap();
    let chans = vec!["t3".to_owned()];
    for i in 0..10 {
        assert!(
            rx.receive(&chans, Duration::from_millis(20))
                .await
                .unwrap()
                .is_none()
        );
        layer.send("t3", &msg(&i.to_string())).await.unwrap();
        // With a client-side timeout the server would still be popping for the old request, and
        // this message would vanish into a reply nobody reads.
        let zcard: i64 = redis.cmd(&[b"ZCARD", b"asgit3"]);
        assert_eq!(
            zcard, 1,
            "message {i} is still stored after the timed-out pop"
        );
        let got = rx.receive(&chans, WAIT).await.unwrap().unwrap();
        assert_eq!(got.to_map().unwrap(), msg(&i.to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_sends_to_process_local_channels_are_never_lost_across_shards() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let layer = layer_on(&[&a, &b], LayerSettings::default()).await;
    let mut on_each = [0, 0];
    for i in 0..40 {
        let inbox = format!("specific.{i}!");
        let full = format!("{inbox}{}", "f".repeat(i % 7 + 1));
        layer.send(&full, &msg(&full)).await.unwrap();
        // Stored on the shard of the non-local name, where its reader looks.
        let shard = consistent_hash(&inbox, 2);
        on_each[shard] += 1;
        let key = format!("asgi{inbox}");
        let on: [i64; 2] = [
            a.cmd(&[b"ZCARD", key.as_bytes()]),
            b.cmd(&[b"ZCARD", key.as_bytes()]),
        ];
        assert_eq!(on[shard], 1, "{full} stored on shard {shard}");
        assert_eq!(on[1 - shard], 0);
        let mut rx = layer.receiver().await.unwrap();
        let got = rx.receive(&[inbox], WAIT).await.unwrap().unwrap();
        assert_eq!(got.channel, full);
    }
    assert!(
        on_each[0] > 0 && on_each[1] > 0,
        "both shards used: {on_each:?}"
    );

    // A process inbox on two shards: 100 local channels, every message arrives.
    let inbox = layer.inbox("daphne.response").await.unwrap();
    let mut locals: Vec<_> = (0..100).map(|_| inbox.new_channel()).collect();
    let sender = layer_on(&[&a, &b], LayerSettings::default()).await;
    for l in &locals {
        sender.send(l.name(), &msg(l.name())).await.unwrap();
    }
    for l in &mut locals {
        let got = l.recv_timeout(WAIT).await.expect("delivered");
        assert_eq!(got.to_map().unwrap(), msg(l.name()));
    }
    inbox.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_receive_covers_channels_on_both_shards() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let layer = layer_on(&[&a, &b], LayerSettings::default()).await;
    let names: Vec<String> = (0..12).map(|i| format!("tasks.{i}")).collect();
    let shards: Vec<usize> = names.iter().map(|n| consistent_hash(n, 2)).collect();
    assert!(shards.contains(&0) && shards.contains(&1));
    for n in &names {
        layer.send(n, &msg(n)).await.unwrap();
    }
    let mut rx = layer.receiver().await.unwrap();
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..names.len() {
        seen.push(rx.receive(&names, WAIT).await.unwrap().unwrap().channel);
    }
    seen.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_enforced_at_receive_not_only_at_send() {
    let redis = RedisServer::start();
    let layer = layer_on(
        &[&redis],
        LayerSettings {
            expiry: Duration::from_secs(60),
            ..Default::default()
        },
    )
    .await;
    // A sender that never trims (an old channels_redis, or a send long ago): a 2-minute-old member.
    let stale = [&[0u8; 12][..], &codec::to_msgpack(&msg("stale")).unwrap()].concat();
    let old = format!("{}", now_secs() - 120.0);
    redis.cmd::<i64>(&[b"ZADD", b"asgiexp", old.as_bytes(), &stale]);
    let mut rx = layer.receiver().await.unwrap();
    assert!(
        rx.receive(&["exp".to_owned()], Duration::from_millis(200))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(layer.metrics().snapshot().expired, 1);
    layer.send("exp", &msg("fresh")).await.unwrap();
    assert_eq!(
        rx.receive(&["exp".to_owned()], WAIT)
            .await
            .unwrap()
            .unwrap()
            .to_map()
            .unwrap(),
        msg("fresh")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_redis_is_dropped_counted_and_does_not_block_the_channel() {
    let redis = RedisServer::start();
    let layer = layer_on(&[&redis], LayerSettings::default()).await;
    let now = format!("{}", now_secs());
    let not_a_map = [&[1u8; 12][..], &codec::to_msgpack(&vec![1, 2, 3]).unwrap()].concat();
    for junk in [
        &b"short"[..],
        &[b"123456789012".as_slice(), b"\xc1\xc1\xc1"].concat(),
        &not_a_map,
    ] {
        redis.cmd::<i64>(&[b"ZADD", b"asgijunk", now.as_bytes(), junk]);
    }
    layer.send("junk", &msg("good")).await.unwrap();
    let mut rx = layer.receiver().await.unwrap();
    let got = rx
        .receive(&["junk".to_owned()], WAIT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.to_map().unwrap(), msg("good"));
    assert_eq!(layer.metrics().snapshot().garbage, 3);
    // Garbage in an inbox does not stop its loop either.
    let inbox = layer.inbox("gi").await.unwrap();
    let mut local = inbox.new_channel();
    let key = format!("asgi{}", inbox.name());
    redis.cmd::<i64>(&[b"ZADD", key.as_bytes(), now.as_bytes(), b"123456789012\xff"]);
    layer.send(local.name(), &msg("still flows")).await.unwrap();
    assert_eq!(
        local.recv_timeout(WAIT).await.unwrap().to_map().unwrap(),
        msg("still flows")
    );
    inbox.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_survive_redis_forgetting_the_send_script() {
    let redis = RedisServer::start();
    let layer = layer_on(&[&redis], LayerSettings::default()).await;
    layer.send("sf_test", &msg("before")).await.unwrap();
    layer.group_add("sf_group", "sf_member").await.unwrap();
    // What a restart without persistence or an operator's SCRIPT FLUSH does to the script cache.
    redis.cmd::<String>(&[b"SCRIPT", b"FLUSH"]);
    layer.send("sf_test", &msg("after")).await.unwrap();
    let report = layer
        .group_send("sf_group", &msg("to the group"))
        .await
        .unwrap();
    assert_eq!(report.full, 0);
    let mut rx = layer.receiver().await.unwrap();
    for (channel, expected) in [
        ("sf_test", "before"),
        ("sf_test", "after"),
        ("sf_member", "to the group"),
    ] {
        let got = rx
            .receive(&[channel.to_owned()], WAIT)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.to_map().unwrap(), msg(expected));
    }
    assert!(
        rx.receive(&["sf_test".to_owned()], Duration::from_millis(100))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_format_is_channels_redis_4() {
    let redis = RedisServer::start();
    let layer = layer_on(&[&redis], LayerSettings::default()).await;
    let m = Map::new()
        .with("type", "a.b")
        .with("n", 1)
        .with("b", ByteString::from(b"\x00\x01"));
    layer.send("normal.chan", &m).await.unwrap();
    let stored: Vec<(Vec<u8>, f64)> =
        redis.cmd(&[b"ZRANGE", b"asginormal.chan", b"0", b"-1", b"WITHSCORES"]);
    assert_eq!(stored.len(), 1);
    let (member, score) = &stored[0];
    assert_eq!(
        &member[12..],
        b"\x83\xa4type\xa3a.b\xa1n\x01\xa1b\xc4\x02\x00\x01"
    );
    assert!(
        (now_secs() - score).abs() < 5.0,
        "scored by send time in seconds"
    );
    let ttl: i64 = redis.cmd(&[b"TTL", b"asginormal.chan"]);
    assert!(
        (1..=60).contains(&ttl),
        "channel key expires with the message expiry: {ttl}"
    );

    layer.send("specific.abc!xyz", &msg("hi")).await.unwrap();
    let stored: Vec<Vec<u8>> = redis.cmd(&[b"ZRANGE", b"asgispecific.abc!", b"0", b"-1"]);
    assert_eq!(
        &stored[0][12..],
        b"\x82\xa4text\xa2hi\xb0__asgi_channel__\xb0specific.abc!xyz"
    );

    layer.group_add("room", "specific.abc!xyz").await.unwrap();
    let members: Vec<String> = redis.cmd(&[b"ZRANGE", b"asgi:group:room", b"0", b"-1"]);
    assert_eq!(members, ["specific.abc!xyz"]);
    let ttl: i64 = redis.cmd(&[b"TTL", b"asgi:group:room"]);
    assert!((86_300..=86_400).contains(&ttl), "{ttl}");

    // flush removes our keys and nothing else; the registry of our channel names stays, so
    // running processes' channels are still recognised as ours afterwards.
    redis.cmd::<String>(&[b"SET", b"other:key", b"kept"]);
    layer.flush().await.unwrap();
    let mut keys: Vec<String> = redis.cmd(&[b"KEYS", b"*"]);
    keys.sort();
    assert_eq!(keys, ["asgi:channels", "other:key"]);
}

/// Stores messages "0", "1", … for `local` (a local channel of the inbox whose key is `key`)
/// with one ZADD; their 12-byte prefixes sort in the order of `texts`. Returns how many it added.
fn zadd_for_local_channel(
    redis: &RedisServer,
    key: &str,
    local: &str,
    texts: std::ops::Range<u32>,
) -> i64 {
    let score = format!("{}", now_secs());
    let members: Vec<Vec<u8>> = texts
        .map(|i| {
            let mut prefix = [0u8; 12];
            prefix[..4].copy_from_slice(&i.to_be_bytes());
            let m = msg(&i.to_string()).with("__asgi_channel__", local);
            [&prefix[..], &codec::to_msgpack(&m).unwrap()].concat()
        })
        .collect();
    let mut zadd: Vec<&[u8]> = vec![b"ZADD", key.as_bytes()];
    for m in &members {
        zadd.extend([score.as_bytes(), m.as_slice()]);
    }
    redis.cmd(&zadd)
}

/// One inbox pop takes up to 512 messages, more than a local buffer holds (100): handing them all
/// out before the readers run would drop 200 of these 300 although their reader keeps its buffer
/// empty. On one thread the reader runs only when the inbox loop lets it.
#[tokio::test(flavor = "current_thread")]
async fn a_big_inbox_pop_lets_local_channels_drain_while_it_is_handed_out() {
    let redis = RedisServer::start();
    let layer = layer_on(
        &[&redis],
        LayerSettings {
            local_buffer: Some(100),
            ..Default::default()
        },
    )
    .await;
    let inbox = layer.inbox("specific").await.unwrap();
    let mut local = inbox.new_channel();
    let target = local.name().to_owned();
    // One ZADD, so that a single pop finds all 300.
    let key = format!("asgi{}", inbox.name());
    assert_eq!(zadd_for_local_channel(&redis, &key, &target, 0..300), 300);
    for i in 0..300 {
        let got = local
            .recv_timeout(WAIT)
            .await
            .unwrap_or_else(|| panic!("message {i} never came; {} dropped", local.dropped()));
        assert_eq!(got.to_map().unwrap(), msg(&i.to_string()));
    }
    assert_eq!(local.dropped(), 0);
    assert_eq!(layer.metrics().snapshot().local_full, 0);

    // A reader that does not read: its buffer fills, and each message beyond it is dropped and
    // counted once, whether or not the loop waited for the reader first.
    assert_eq!(zadd_for_local_channel(&redis, &key, &target, 300..450), 150);
    eventually(WAIT, "50 messages refused", || local.dropped() == 50).await;
    for i in 300..400 {
        let got = local.try_recv().expect("the first 100 kept");
        assert_eq!(got.to_map().unwrap(), msg(&i.to_string()));
    }
    assert!(local.try_recv().is_none());
    assert_eq!(local.dropped(), 50);
    assert_eq!(layer.metrics().snapshot().local_full, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_restarted_under_a_live_layer() {
    let mut redis = RedisServer::start();
    let settings = LayerSettings {
        command_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let layer = layer_on(&[&redis], settings.clone()).await;
    let inbox = layer.inbox("restart").await.unwrap();
    let mut local = inbox.new_channel();
    layer.send(local.name(), &msg("before")).await.unwrap();
    assert_eq!(
        local.recv_timeout(WAIT).await.unwrap().to_map().unwrap(),
        msg("before")
    );

    redis.stop();
    // Sends during the outage fail fast with a clear error instead of hanging.
    let started = Instant::now();
    let err = tokio::time::timeout(WAIT, layer.send("anything", &msg("x")))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", redis.port())),
        "{err}"
    );
    assert!(started.elapsed() < WAIT);
    let err = tokio::time::timeout(WAIT, layer.group_send("g", &msg("x")))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    let mut rx = layer.receiver().await.unwrap();
    let err = tokio::time::timeout(
        WAIT,
        rx.receive(&["q".to_owned()], Duration::from_millis(300)),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert!(err.is_unavailable(), "{err}");

    redis.restart();
    // The shared connection comes back on its own; retry until the first send gets through.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match layer.send(local.name(), &msg("after")).await {
            Ok(()) => break,
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("layer did not recover after the restart: {e}"),
        }
    }
    // The inbox loop reconnected too and delivers to the same local channel.
    assert_eq!(
        local
            .recv_timeout(Duration::from_secs(10))
            .await
            .unwrap()
            .to_map()
            .unwrap(),
        msg("after")
    );
    layer.send("q", &msg("q")).await.unwrap();
    assert_eq!(
        rx.receive(&["q".to_owned()], WAIT)
            .await
            .unwrap()
            .unwrap()
            .to_map()
            .unwrap(),
        msg("q")
    );
    let snap = layer.metrics().snapshot();
    assert!(snap.reconnects >= 1, "{snap:?}");
    assert!(snap.unavailable >= 3, "{snap:?}");
    inbox.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_urls_work() {
    let dir = std::env::temp_dir().join(format!("switchyard-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("redis.sock");
    let _redis = RedisServer::start_with(&[
        "--unixsocket",
        socket.to_str().unwrap(),
        "--unixsocketperm",
        "700",
    ]);
    let layer = Layer::from_url(
        &format!("unix://{}", socket.display()),
        LayerSettings::default(),
    )
    .await
    .unwrap();
    assert!(
        layer.describe().contains("redis.sock"),
        "{}",
        layer.describe()
    );
    layer.send("over.unix", &msg("hi")).await.unwrap();
    let mut rx = layer.receiver().await.unwrap();
    let got = rx
        .receive(&["over.unix".to_owned()], WAIT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.to_map().unwrap(), msg("hi"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_urls_work_and_an_untrusted_certificate_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("switchyard-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(made.status.success(), "{made:?}");
    let (_redis, tls_port) = RedisServer::start_tls(&cert, &key);
    // A self-signed certificate is refused unless the URL says `#insecure`.
    let err = Layer::from_url(
        &format!("rediss://127.0.0.1:{tls_port}/0"),
        LayerSettings::default(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    let layer = Layer::from_url(
        &format!("rediss://127.0.0.1:{tls_port}/0#insecure"),
        LayerSettings::default(),
    )
    .await
    .unwrap();
    let inbox = layer.inbox("tls").await.unwrap();
    let mut local = inbox.new_channel();
    layer.send(local.name(), &msg("encrypted")).await.unwrap();
    assert_eq!(
        local.recv_timeout(WAIT).await.unwrap().to_map().unwrap(),
        msg("encrypted")
    );
    inbox.shutdown(WAIT).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_does_not_hang_a_receiver_forever() {
    let redis = RedisServer::start();
    let layer = layer_on(&[&redis], LayerSettings::default()).await;
    let mut rx = layer.receiver().await.unwrap();
    let chans = vec!["frozen".to_owned()];
    assert!(
        rx.receive(&chans, Duration::from_millis(50))
            .await
            .unwrap()
            .is_none()
    );
    // A frozen server keeps its TCP connections open and never answers: what a host failure
    // without a reset looks like to the client.
    redis.signal("STOP");
    let started = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(20),
        rx.receive(&chans, Duration::from_millis(200)),
    )
    .await
    .expect("the receive gave up by itself");
    redis.signal("CONT");
    let err = got.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // It reconnects and goes on.
    layer.send("frozen", &msg("thawed")).await.unwrap();
    let got = rx.receive(&chans, WAIT).await.unwrap().unwrap();
    assert_eq!(got.to_map().unwrap(), msg("thawed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_sends_to_a_frozen_redis_fail_within_the_command_timeout() {
    let redis = RedisServer::start();
    let timeout = Duration::from_millis(500);
    let settings = LayerSettings {
        command_timeout: timeout,
        ..LayerSettings::default()
    };
    let layer = layer_on(&[&redis], settings).await;
    layer.send("fq_test", &msg("warm")).await.unwrap();
    redis.signal("STOP");
    let started = Instant::now();
    // Far more sends than one coalesced batch takes: the ones queued behind failing batches
    // must not wait for each batch's timeout in turn (4 batches would take 4 timeouts).
    let sends = (0..1000).map(|i| {
        let layer = layer.clone();
        tokio::spawn(async move { layer.send("fq_test", &msg(&i.to_string())).await })
    });
    let outcomes = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join_all(sends),
    )
    .await
    .expect("the sends gave up by themselves");
    let elapsed = started.elapsed();
    redis.signal("CONT");
    for outcome in outcomes {
        let err = outcome.unwrap().unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }
    assert!(elapsed < timeout * 3, "{elapsed:?}");
    // (Calls already written run once Redis thaws: a timed-out send's outcome is unknown, so
    // this checks recovery on another channel.)
    layer.send("fq_after", &msg("thawed")).await.unwrap();
}

/// A batch from `receive_many`, as texts.
async fn batch_texts(
    rx: &mut switchyard::layer::Receiver,
    channels: &[String],
    max: usize,
) -> Vec<String> {
    rx.receive_many(channels, WAIT, max)
        .await
        .unwrap()
        .iter()
        .map(|e| {
            let m = e.to_map().unwrap();
            match m.get("text") {
                Some(switchyard::Value::Str(s)) => s.to_string(),
                other => panic!("unexpected text {other:?}"),
            }
        })
        .collect()
}

async fn batches_in_order_none_lost(redis: &RedisServer) {
    let layer = layer_on(&[redis], LayerSettings::default()).await;
    for i in 0..10 {
        layer.send("batch", &msg(&format!("m{i}"))).await.unwrap();
    }
    let mut rx = layer.receiver().await.unwrap();
    let channels = ["batch".to_owned(), "other".to_owned()];
    assert_eq!(
        batch_texts(&mut rx, &channels, 4).await,
        ["m0", "m1", "m2", "m3"]
    );
    assert_eq!(
        batch_texts(&mut rx, &channels, 100).await,
        ["m4", "m5", "m6", "m7", "m8", "m9"]
    );
    // Nothing left: an empty batch once the timeout passes.
    let started = Instant::now();
    assert!(
        rx.receive_many(&channels, Duration::from_millis(200), 8)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(150));
    // A blocked batch pop wakes for a message sent while it waits.
    let sender = layer.clone();
    let send = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sender.send("other", &msg("late")).await.unwrap();
    });
    assert_eq!(batch_texts(&mut rx, &channels, 8).await, ["late"]);
    send.await.unwrap();
    assert_eq!(layer.metrics().snapshot().received, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_receive_takes_up_to_max_in_order_with_bzmpop() {
    let redis = RedisServer::start();
    batches_in_order_none_lost(&redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_receive_falls_back_to_bzpopmin_and_zpopmin_without_bzmpop() {
    // Redis before 7.0 has no BZMPOP: the same server with the command removed.
    let redis = RedisServer::start_with(&["--rename-command", "BZMPOP", ""]);
    let err = redis.try_cmd::<redis::Value>(&[b"BZMPOP", b"0.01", b"1", b"x", b"MIN"]);
    assert!(err.is_err(), "BZMPOP should be gone: {err:?}");
    batches_in_order_none_lost(&redis).await;
}

//! The channel-layer conformance suite (asgiref 1.x `conformance.py`, plus Switchyard's own
//! guarantees), instantiated once per backend: every test name appears under `memory::`,
//! `redis::`, `sentinel::` and `cluster::`: the Redis tests each run against a fresh
//! redis-server, the Sentinel ones through a `redis+sentinel://` URL to a fresh master and
//! sentinel, the Cluster ones through `redis+cluster://` to a fresh 3-master cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use switchyard::layer::{Layer, LayerError, LayerSettings};
use switchyard::names::NameError;
use switchyard::{ByteString, Map, Value};

use support::{Backend, Fixture};

const SHORT: Duration = Duration::from_millis(200);
const WAIT: Duration = Duration::from_secs(5);

fn msg(text: &str) -> Map {
    Map::new().with("text", text)
}

async fn recv_one(layer: &Layer, channels: &[&str]) -> Option<(String, Map)> {
    let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
    let mut rx = layer.receiver().await.unwrap();
    rx.receive(&channels, WAIT).await.unwrap().map(|e| {
        let m = e.to_map().unwrap();
        (e.channel, m)
    })
}

async fn recv_none(layer: &Layer, channels: &[&str]) {
    let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
    let mut rx = layer.receiver().await.unwrap();
    let got = rx.receive(&channels, SHORT).await.unwrap();
    assert!(
        got.is_none(),
        "expected nothing on {channels:?}, got {got:?}"
    );
}

async fn send_recv(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    f.layer.send("sr_test", &msg("one")).await.unwrap();
    f.layer.send("sr_test", &msg("two")).await.unwrap();
    let mut rx = f.layer.receiver().await.unwrap();
    let chans = vec!["sr_test".to_owned()];
    let first = rx.receive(&chans, WAIT).await.unwrap().unwrap();
    let second = rx.receive(&chans, WAIT).await.unwrap().unwrap();
    // FIFO per channel as seen by the layer.
    assert_eq!(first.channel, "sr_test");
    assert_eq!(first.to_map().unwrap(), msg("one"));
    assert_eq!(second.to_map().unwrap(), msg("two"));
    recv_none(&f.layer, &["sr_test"]).await;
}

async fn single_process_receive(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    f.layer.send("spr_test!a", &msg("local")).await.unwrap();
    let (channel, m) = recv_one(&f.layer, &["spr_test!"]).await.unwrap();
    assert_eq!(channel, "spr_test!a");
    assert_eq!(
        m,
        msg("local"),
        "the layer's __asgi_channel__ key is not part of the message"
    );
}

async fn single_process_receive_error(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    let mut rx = f.layer.receiver().await.unwrap();
    let err = rx
        .receive(&["spr_test!a".to_owned()], SHORT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::InvalidName(NameError::LocalPartInReceive(_))
        ),
        "{err}"
    );
}

async fn message_expiry(b: Backend) {
    let settings = LayerSettings {
        expiry: Duration::from_millis(300),
        ..Default::default()
    };
    let f = Fixture::new(b, settings).await;
    f.layer.send("me_test", &msg("stale")).await.unwrap();
    // The message must age past its expiry: time passing is the point here, not a wait for an event.
    tokio::time::sleep(Duration::from_millis(450)).await;
    recv_none(&f.layer, &["me_test"]).await;
    f.layer.send("me_test", &msg("fresh")).await.unwrap();
    assert_eq!(
        recv_one(&f.layer, &["me_test"]).await.unwrap().1,
        msg("fresh")
    );
}

async fn new_channel_single_reader(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    let name = f.layer.new_channel("test.body?").unwrap();
    assert!(name.starts_with("test.body?") && name.len() > "test.body?".len());
    assert_ne!(
        name,
        f.layer.new_channel("test.body?").unwrap(),
        "names are unique"
    );
    f.layer.send(&name, &msg("chunk")).await.unwrap();
    let (channel, m) = recv_one(&f.layer, &[&name]).await.unwrap();
    assert_eq!((channel.as_str(), m), (name.as_str(), msg("chunk")));
}

async fn new_channel_failures(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    for bad in ["test!", "test", "a?b?", ""] {
        let err = f.layer.new_channel(bad).unwrap_err();
        assert!(
            matches!(err, LayerError::InvalidName(NameError::BadPattern(_))),
            "{bad}: {err}"
        );
    }
}

async fn strings(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    let m = Map::new()
        .with("bytes", ByteString::from(b"\x01\x00\x03\x21"))
        .with("unicode", "\u{00a3}")
        .with("int", -7)
        .with("float", 1.5)
        .with("none", Value::Nil)
        .with("list", vec![Value::from(true), Value::from("x")]);
    f.layer.send("str_test", &m).await.unwrap();
    let got = recv_one(&f.layer, &["str_test"]).await.unwrap().1;
    assert_eq!(got, m);
    assert_eq!(
        got.get("bytes").and_then(Value::as_bytes),
        Some(&b"\x01\x00\x03\x21"[..])
    );
    assert_eq!(got.get_str("unicode"), Some("£"));
}

async fn groups(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    f.layer.group_add("tgroup", "tg_test").await.unwrap();
    f.layer.group_add("tgroup", "tg_test2").await.unwrap();
    f.layer.group_add("tgroup", "tg_test3").await.unwrap();
    f.layer.group_add("tgroup", "tg_test").await.unwrap(); // idempotent
    f.layer.group_discard("tgroup", "tg_test3").await.unwrap();
    f.layer
        .group_discard("tgroup", "never_added")
        .await
        .unwrap(); // no-op
    let report = f.layer.group_send("tgroup", &msg("to all")).await.unwrap();
    assert_eq!((report.members, report.full), (2, 0));
    assert_eq!(
        recv_one(&f.layer, &["tg_test"]).await.unwrap(),
        ("tg_test".into(), msg("to all"))
    );
    assert_eq!(
        recv_one(&f.layer, &["tg_test2"]).await.unwrap(),
        ("tg_test2".into(), msg("to all"))
    );
    recv_none(&f.layer, &["tg_test3"]).await;
}

async fn groups_process(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    for c in ["tgp!a", "tgp!b", "tgp!c"] {
        f.layer.group_add("tgroup", c).await.unwrap();
    }
    f.layer.group_discard("tgroup", "tgp!c").await.unwrap();
    f.layer.group_send("tgroup", &msg("inbox")).await.unwrap();
    // One stored message for the inbox, handed out once per local target.
    assert_eq!(f.layer.channel_depth("tgp!").await.unwrap(), 1);
    let mut rx = f.layer.receiver().await.unwrap();
    let chans = vec!["tgp!".to_owned()];
    let mut seen = Vec::new();
    for _ in 0..2 {
        let e = rx.receive(&chans, WAIT).await.unwrap().unwrap();
        assert_eq!(e.to_map().unwrap(), msg("inbox"));
        seen.push(e.channel);
    }
    seen.sort();
    assert_eq!(seen, ["tgp!a", "tgp!b"]);
    assert!(rx.receive(&chans, SHORT).await.unwrap().is_none());
}

async fn group_channels(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    f.layer.group_add("tgc", "a").await.unwrap();
    f.layer.group_add("tgc", "b!x").await.unwrap();
    let mut members = f.layer.group_channels("tgc").await.unwrap();
    members.sort();
    assert_eq!(members, ["a", "b!x"]);
    assert!(f.layer.group_channels("empty").await.unwrap().is_empty());
}

async fn flush(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    f.layer.send("fl_test", &msg("gone")).await.unwrap();
    f.layer.send("fl_test!x", &msg("gone")).await.unwrap();
    f.layer.flush().await.unwrap();
    recv_none(&f.layer, &["fl_test", "fl_test!"]).await;
}

async fn flush_groups(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    f.layer.group_add("tfg", "fg_test").await.unwrap();
    f.layer.flush().await.unwrap();
    assert!(f.layer.group_channels("tfg").await.unwrap().is_empty());
    assert_eq!(
        f.layer.group_send("tfg", &msg("x")).await.unwrap().members,
        0
    );
    recv_none(&f.layer, &["fg_test"]).await;
}

async fn group_expiry(b: Backend) {
    let settings = LayerSettings {
        group_expiry: Duration::from_millis(300),
        ..Default::default()
    };
    let f = Fixture::new(b, settings).await;
    f.layer.group_add("tge", "ge_test").await.unwrap();
    f.layer.group_add("tge", "ge_test2").await.unwrap();
    // Membership must age past the group expiry.
    tokio::time::sleep(Duration::from_millis(450)).await;
    f.layer.group_add("tge", "ge_test2").await.unwrap(); // renewed
    assert_eq!(f.layer.group_channels("tge").await.unwrap(), ["ge_test2"]);
    f.layer.group_send("tge", &msg("late")).await.unwrap();
    recv_none(&f.layer, &["ge_test"]).await;
    assert_eq!(
        recv_one(&f.layer, &["ge_test2"]).await.unwrap().1,
        msg("late")
    );
}

async fn capacity(b: Backend) {
    let settings = LayerSettings {
        capacity: 5,
        channel_capacity: vec![("cap.big*".into(), 8), ("cap.*".into(), 2)],
        ..Default::default()
    };
    let f = Fixture::new(b, settings).await;
    for i in 0..5 {
        f.layer
            .send("cap_test", &msg(&i.to_string()))
            .await
            .unwrap();
    }
    let err = f
        .layer
        .send("cap_test", &msg("one too many"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LayerError::ChannelFull { channel, capacity: 5 } if channel == "cap_test"),
        "{err}"
    );
    assert_eq!(recv_one(&f.layer, &["cap_test"]).await.unwrap().1, msg("0"));
    f.layer.send("cap_test", &msg("room again")).await.unwrap();
    // Per-channel overrides, first match wins.
    for _ in 0..2 {
        f.layer.send("cap.small", &msg("x")).await.unwrap();
    }
    assert!(
        f.layer
            .send("cap.small", &msg("x"))
            .await
            .unwrap_err()
            .is_full()
    );
    for _ in 0..8 {
        f.layer.send("cap.bigger", &msg("x")).await.unwrap();
    }
    assert!(
        f.layer
            .send("cap.bigger", &msg("x"))
            .await
            .unwrap_err()
            .is_full()
    );
    assert_eq!(f.layer.metrics().snapshot().channel_full, 3);
}

async fn expired_messages_free_a_full_channel(b: Backend) {
    let settings = LayerSettings {
        capacity: 2,
        expiry: Duration::from_millis(300),
        ..Default::default()
    };
    let f = Fixture::new(b, settings).await;
    f.layer.send("cx_test", &msg("old 1")).await.unwrap();
    f.layer.send("cx_test", &msg("old 2")).await.unwrap();
    assert!(
        f.layer
            .send("cx_test", &msg("refused"))
            .await
            .unwrap_err()
            .is_full()
    );
    // Both stored messages must age past their expiry: time passing is the point here.
    tokio::time::sleep(Duration::from_millis(450)).await;
    f.layer.send("cx_test", &msg("fresh 1")).await.unwrap();
    f.layer.send("cx_test", &msg("fresh 2")).await.unwrap();
    assert_eq!(
        recv_one(&f.layer, &["cx_test"]).await.unwrap().1,
        msg("fresh 1")
    );
    assert_eq!(
        recv_one(&f.layer, &["cx_test"]).await.unwrap().1,
        msg("fresh 2")
    );
    recv_none(&f.layer, &["cx_test"]).await;
}

/// Sends issued together (one task's futures polled in order, and several tasks at once) keep
/// each sender's order, and capacity holds exactly however the backend groups them.
async fn concurrent_sends_keep_order_and_capacity(b: Backend) {
    let f = Fixture::new(
        b,
        LayerSettings {
            capacity: 100,
            ..Default::default()
        },
    )
    .await;
    let messages: Vec<Map> = (0..60).map(|i| msg(&format!("a{i}"))).collect();
    let in_one_go = messages.iter().map(|m| f.layer.send("co_test", m));
    let outcomes = futures_util::future::join_all(in_one_go).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let mut senders = Vec::new();
    for s in 0..4 {
        let layer = f.layer.clone();
        senders.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for i in 0..20 {
                match layer.send("co_test", &msg(&format!("s{s}-{i}"))).await {
                    Ok(()) => accepted.push(format!("s{s}-{i}")),
                    Err(e) => assert!(e.is_full(), "{e}"),
                }
            }
            accepted
        }));
    }
    let mut accepted = Vec::new();
    for s in senders {
        accepted.push(s.await.unwrap());
    }
    assert_eq!(accepted.iter().map(Vec::len).sum::<usize>(), 40);
    let mut got = Vec::new();
    let mut rx = f.layer.receiver().await.unwrap();
    while let Some(e) = rx.receive(&["co_test".to_owned()], SHORT).await.unwrap() {
        let m = e.to_map().unwrap();
        got.push(m.get_str("text").expect("a text message").to_owned());
    }
    let first: Vec<String> = (0..60).map(|i| format!("a{i}")).collect();
    assert_eq!(got[..60], first[..]);
    for (s, accepted) in accepted.iter().enumerate() {
        let from_sender: Vec<&String> = got[60..]
            .iter()
            .filter(|t| t.starts_with(&format!("s{s}-")))
            .collect();
        assert_eq!(
            from_sender,
            accepted.iter().collect::<Vec<_>>(),
            "sender {s}"
        );
    }
    assert_eq!(got.len(), 100);
}

async fn capacity_process(b: Backend) {
    // A process inbox is shared by every connection of its server: it takes the server capacity.
    let f = Fixture::new(
        b,
        LayerSettings {
            server_capacity: 5,
            ..Default::default()
        },
    )
    .await;
    for i in 0..5 {
        let target = if i % 2 == 0 { "cpt!a" } else { "cpt!b" };
        f.layer.send(target, &msg("x")).await.unwrap();
    }
    // Capacity counts the whole process inbox, not each local channel.
    assert!(
        f.layer
            .send("cpt!c", &msg("x"))
            .await
            .unwrap_err()
            .is_full()
    );
}

async fn capacity_group(b: Backend) {
    let f = Fixture::new(
        b,
        LayerSettings {
            capacity: 2,
            ..Default::default()
        },
    )
    .await;
    f.layer.group_add("tcg", "cg_full").await.unwrap();
    f.layer.group_add("tcg", "cg_free").await.unwrap();
    f.layer.send("cg_full", &msg("1")).await.unwrap();
    f.layer.send("cg_full", &msg("2")).await.unwrap();
    let report = f.layer.group_send("tcg", &msg("g")).await.unwrap();
    assert_eq!(
        (report.members, report.full),
        (2, 1),
        "a full member never fails the group send"
    );
    assert_eq!(f.layer.metrics().snapshot().group_member_full, 1);
    assert_eq!(recv_one(&f.layer, &["cg_free"]).await.unwrap().1, msg("g"));
}

async fn exceptions(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    let too_long = "a".repeat(100);
    for bad in ["white space", "", too_long.as_str(), "bad!!name", "ends?"] {
        let err = f.layer.send(bad, &msg("x")).await.unwrap_err();
        assert!(matches!(err, LayerError::InvalidName(_)), "{bad:?}: {err}");
    }
    assert!(matches!(
        f.layer.group_add("bad group", "ok").await.unwrap_err(),
        LayerError::InvalidName(_)
    ));
    assert!(matches!(
        f.layer.group_add("g", "bad chan").await.unwrap_err(),
        LayerError::InvalidName(_)
    ));
    assert!(matches!(
        f.layer.group_send("g!x", &msg("x")).await.unwrap_err(),
        LayerError::InvalidName(_)
    ));
    // A payload that is not a msgpack map never reaches a channel.
    assert!(matches!(
        f.layer
            .send_encoded("ok", b"\x93\x01\x02\x03")
            .await
            .unwrap_err(),
        LayerError::Codec(_)
    ));
    assert!(matches!(
        f.layer.send("ok", &vec![1, 2]).await.unwrap_err(),
        LayerError::Codec(_)
    ));
    recv_none(&f.layer, &["ok"]).await;
}

async fn message_alteration_after_send(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    let mut m = msg("original");
    f.layer.send("mas_test", &m).await.unwrap();
    m.insert("text", "altered");
    assert_eq!(
        recv_one(&f.layer, &["mas_test"]).await.unwrap().1,
        msg("original")
    );
}

async fn receive_several_channels_and_timeout(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    f.layer.send("multi_b", &msg("b")).await.unwrap();
    let (channel, m) = recv_one(&f.layer, &["multi_a", "multi_b", "multi_c!"])
        .await
        .unwrap();
    assert_eq!((channel.as_str(), m), ("multi_b", msg("b")));
    let mut rx = f.layer.receiver().await.unwrap();
    let started = std::time::Instant::now();
    assert!(
        rx.receive(&["multi_a".to_owned()], SHORT)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        started.elapsed() < WAIT,
        "an empty receive returns at its timeout"
    );
    // A receive already waiting wakes up for a message sent after it started.
    let layer = f.layer.clone();
    let waiting = tokio::spawn(async move {
        let mut rx = layer.receiver().await.unwrap();
        rx.receive(&["late".to_owned()], WAIT).await.unwrap()
    });
    tokio::task::yield_now().await;
    f.layer.send("late", &msg("arrived")).await.unwrap();
    let e = waiting.await.unwrap().expect("woken by the send");
    assert_eq!(e.to_map().unwrap(), msg("arrived"));
}

async fn no_channel_starves(b: Backend) {
    let f = Fixture::new(
        b,
        LayerSettings {
            capacity: 1000,
            ..Default::default()
        },
    )
    .await;
    for i in 0..200 {
        f.layer.send("busy", &msg(&i.to_string())).await.unwrap();
    }
    f.layer.send("quiet", &msg("q")).await.unwrap();
    let mut rx = f.layer.receiver().await.unwrap();
    let chans = vec!["busy".to_owned(), "quiet".to_owned()];
    let mut quiet_at = None;
    for i in 0..200 {
        let e = rx.receive(&chans, WAIT).await.unwrap().unwrap();
        if e.channel == "quiet" {
            quiet_at = Some(i);
            break;
        }
    }
    let at = quiet_at.expect("the quiet channel was served while the busy one had messages");
    assert!(
        at < 100,
        "quiet channel served only after {at} busy messages"
    );
}

async fn inbox_demultiplexes(b: Backend) {
    let f = Fixture::new(
        b,
        LayerSettings {
            local_buffer: Some(3),
            ..Default::default()
        },
    )
    .await;
    let inbox = f.layer.inbox("specific").await.unwrap();
    assert!(inbox.name().starts_with("specific.") && inbox.name().ends_with('!'));
    let mut a = inbox.new_channel();
    let mut b2 = inbox.new_channel();
    assert!(a.name().starts_with(inbox.name()));
    let sender = f.peer(LayerSettings::default()).await;
    sender.send(a.name(), &msg("for a")).await.unwrap();
    sender.send(b2.name(), &msg("for b")).await.unwrap();
    assert_eq!(
        a.recv_timeout(WAIT).await.unwrap().to_map().unwrap(),
        msg("for a")
    );
    assert_eq!(
        b2.recv_timeout(WAIT).await.unwrap().to_map().unwrap(),
        msg("for b")
    );

    // A group message for both local channels is stored once and shared.
    sender.group_add("room", a.name()).await.unwrap();
    sender.group_add("room", b2.name()).await.unwrap();
    sender.group_send("room", &msg("both")).await.unwrap();
    let ea = a.recv_timeout(WAIT).await.unwrap();
    let eb = b2.recv_timeout(WAIT).await.unwrap();
    assert_eq!(ea.channel, a.name());
    assert_eq!(eb.channel, b2.name());
    assert_eq!(ea.to_map().unwrap(), msg("both"));
    assert_eq!(
        ea.payload.as_ptr(),
        eb.payload.as_ptr(),
        "one decode, same bytes for every local target"
    );

    // A full local buffer drops newer messages and counts them; the others still flow.
    for i in 0..5 {
        sender.send(a.name(), &msg(&i.to_string())).await.unwrap();
    }
    sender.send(b2.name(), &msg("after")).await.unwrap();
    assert_eq!(
        b2.recv_timeout(WAIT).await.unwrap().to_map().unwrap(),
        msg("after")
    );
    assert_eq!(a.dropped(), 2);
    for i in 0..3 {
        assert_eq!(
            a.recv_timeout(WAIT).await.unwrap().to_map().unwrap(),
            msg(&i.to_string())
        );
    }
    assert!(a.try_recv().is_none());

    // A message for a local channel nobody holds is dropped and counted.
    let gone = a.name().to_owned();
    drop(a);
    let before = f.layer.metrics().snapshot().local_unknown;
    sender.send(&gone, &msg("nobody")).await.unwrap();
    sender.send(b2.name(), &msg("marker")).await.unwrap();
    assert_eq!(
        b2.recv_timeout(WAIT).await.unwrap().to_map().unwrap(),
        msg("marker")
    );
    assert_eq!(f.layer.metrics().snapshot().local_unknown, before + 1);
    let snap = f.layer.metrics().snapshot();
    assert_eq!(snap.local_full, 2);
    inbox.shutdown(WAIT).await;
    // Once the inbox loop has stopped, it says so, and its local channels end instead of
    // waiting forever.
    tokio::time::timeout(WAIT, inbox.ended())
        .await
        .expect("the inbox reports its end");
    let ended = tokio::time::timeout(WAIT, b2.recv())
        .await
        .expect("recv returns");
    assert!(ended.is_none());
    // So does a local channel made after the end: nothing could ever reach it.
    let mut late = inbox.new_channel();
    let late_end = tokio::time::timeout(WAIT, late.recv())
        .await
        .expect("a channel made after the end ends too");
    assert!(late_end.is_none());
}

async fn overview_lists_channels_and_groups(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    assert_eq!(
        f.layer.overview().await.unwrap(),
        Default::default(),
        "an empty layer has an empty overview"
    );
    f.layer.send("ov.a", &msg("1")).await.unwrap();
    f.layer.send("ov.a", &msg("2")).await.unwrap();
    f.layer.send("ov.inbox!x", &msg("3")).await.unwrap();
    f.layer.group_add("ov-room", "ov.a").await.unwrap();
    f.layer.group_add("ov-room", "ov.inbox!x").await.unwrap();
    // App data under the prefix is not a channel.
    f.layer
        .list_push("ov-history", b"x", 5, Duration::from_secs(60))
        .await
        .unwrap();
    f.layer
        .index_touch("ov-index", "x", 10, Duration::from_secs(60))
        .await
        .unwrap();
    let o = f.layer.overview().await.unwrap();
    let channels: Vec<(&str, usize)> = o
        .channels
        .iter()
        .map(|c| (c.name.as_str(), c.count))
        .collect();
    let groups: Vec<(&str, usize)> = o
        .groups
        .iter()
        .map(|c| (c.name.as_str(), c.count))
        .collect();
    assert_eq!(channels, [("ov.a", 2), ("ov.inbox!", 1)]);
    assert_eq!(groups, [("ov-room", 2)]);
}

async fn app_lists_and_indexes(b: Backend) {
    let f = Fixture::new(b, LayerSettings::default()).await;
    let day = Duration::from_secs(86_400);
    for i in 0..7 {
        f.layer
            .list_push("chat-history.lobby", format!("m{i}").as_bytes(), 5, day)
            .await
            .unwrap();
    }
    let items: Vec<Vec<u8>> = f
        .layer
        .list_items("chat-history.lobby")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.to_vec())
        .collect();
    assert_eq!(
        items,
        [b"m2", b"m3", b"m4", b"m5", b"m6"].map(|b| b.to_vec()),
        "newest kept, oldest first"
    );
    assert!(
        f.layer
            .list_items("chat-history.none")
            .await
            .unwrap()
            .is_empty()
    );
    for room in ["a", "b", "c", "a"] {
        f.layer
            .index_touch("chat-rooms", room, 10, day)
            .await
            .unwrap();
        // Recency is by touch time; let the clock move between touches.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        f.layer.index_recent("chat-rooms", 10).await.unwrap(),
        ["a", "c", "b"]
    );
    assert_eq!(f.layer.index_recent("chat-rooms", 1).await.unwrap(), ["a"]);
    // The index keeps only the most recently touched members.
    for room in ["d", "e"] {
        tokio::time::sleep(Duration::from_millis(5)).await;
        f.layer
            .index_touch("chat-rooms", room, 3, day)
            .await
            .unwrap();
    }
    assert_eq!(
        f.layer.index_recent("chat-rooms", 10).await.unwrap(),
        ["e", "d", "a"]
    );
    assert!(matches!(
        f.layer
            .list_push("bad key", b"x", 5, day)
            .await
            .unwrap_err(),
        LayerError::InvalidName(_)
    ));
    f.layer.flush().await.unwrap();
    assert!(
        f.layer
            .list_items("chat-history.lobby")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        f.layer
            .index_recent("chat-rooms", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Redis).await;
                }
            )*
        }
        // The same layer reached through the master a sentinel names (its failover is tested
        // with the real binary in workers/tests/redis_topologies.rs).
        mod sentinel {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sentinel).await;
                }
            )*
        }
        // The same again on a Redis Cluster of three masters, through `redis+cluster://`
        // (failover and resharding under load: workers/tests/redis_topologies.rs).
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Cluster).await;
                }
            )*
        }
    };
}

conformance!(
    send_recv,
    single_process_receive,
    single_process_receive_error,
    message_expiry,
    new_channel_single_reader,
    new_channel_failures,
    strings,
    groups,
    groups_process,
    group_channels,
    flush,
    flush_groups,
    group_expiry,
    capacity,
    capacity_process,
    concurrent_sends_keep_order_and_capacity,
    expired_messages_free_a_full_channel,
    capacity_group,
    exceptions,
    message_alteration_after_send,
    receive_several_channels_and_timeout,
    no_channel_starves,
    inbox_demultiplexes,
    overview_lists_channels_and_groups,
    app_lists_and_indexes,
);

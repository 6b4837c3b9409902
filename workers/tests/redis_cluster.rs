//! A Redis Cluster under the real binary: `redis+cluster://` runs `serve`, `worker`, `send`,
//! `stats` and `flush`; a mode mismatch stops at startup with exit 3; and under a live
//! broadcast and echo load the layer rides over a slot migrated between masters, a node added
//! and the slots rebalanced onto it, and a master killed with `kill -9` (its replica promoted):
//! no socket closes, broadcasts and echoes resume, and the deliveries lost in each event are
//! counted and printed (BENCHMARKS.md reports them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::redis_support::{RedisCluster, RedisServer};
use support::{Proc, Ws, connect, http, run_to_end};
use switchyard::layer::{Layer, LayerSettings};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

fn cli(args: &[&str]) -> String {
    let out = Command::new(std::env::var("REDIS_CLI_BIN").unwrap_or_else(|_| "redis-cli".into()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_mode_mismatch_stops_every_command_at_startup_with_exit_3() {
    let cluster = RedisCluster::start(3, 0);
    let plain = RedisServer::start();
    // A cluster node behind a plain URL, as a user who set REDIS_URL to one node.
    for args in [
        vec!["serve", "--port", "0"],
        vec!["worker"],
        vec!["send", "jobs.x", r#"{"a": 1}"#],
        vec!["stats"],
        vec!["flush"],
    ] {
        let mut args = args.clone();
        let url = cluster.node_url();
        args.extend(["--layer", &url]);
        let ran = run_to_end(&args, &[]);
        assert_eq!(ran.code, Some(3), "{args:?}: {}", ran.stderr);
        assert!(
            ran.stderr.contains("is a Redis Cluster node")
                && ran.stderr.contains("redis+cluster://"),
            "{args:?}: {}",
            ran.stderr
        );
        assert!(!ran.stdout.contains("listening"), "{}", ran.stdout);
    }
    // The cluster scheme in front of a Redis without cluster mode.
    let url = format!("redis+cluster://127.0.0.1:{}", plain.port());
    let ran = run_to_end(&["serve", "--port", "0", "--layer", &url], &[]);
    assert_eq!(ran.code, Some(3), "{}", ran.stderr);
    assert!(ran.stderr.contains("not in cluster mode"), "{}", ran.stderr);
    // A database other than 0 does not exist in a cluster: a configuration error (exit 2).
    let ran = run_to_end(&["stats", "--layer", &format!("{}/2", cluster.url())], &[]);
    assert_eq!(ran.code, Some(2), "{}", ran.stderr);
    assert!(ran.stderr.contains("database 0"), "{}", ran.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_stats_flush_and_the_startup_line_work_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
        .await
        .unwrap();
    let url = cluster.url();
    for n in 0..5 {
        let channel = format!("jobs.cluster{n}");
        let ran = run_to_end(&["send", "--layer", &url, &channel, r#"{"n": 1}"#], &[]);
        assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    }
    // The channels spread over the masters: their keys carry the channel's name as hash tag.
    let mut holders = HashSet::new();
    for n in 0..5 {
        let key = format!("asgi{{jobs.cluster{n}}}");
        let held: Vec<usize> = (0..3)
            .filter(|&i| {
                cluster.nodes[i]
                    .try_cmd::<usize>(&[b"EXISTS", key.as_bytes()])
                    .unwrap_or(0)
                    == 1
            })
            .collect();
        assert_eq!(held.len(), 1, "{key} on {held:?}");
        holders.insert(held[0]);
    }
    assert!(holders.len() > 1, "all five channels on one master");
    let ran = run_to_end(&["stats", "--json", "--layer", &url], &[]);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let stats: serde_json::Value = serde_json::from_str(ran.stdout.trim()).unwrap();
    let listed: HashSet<String> = stats["channels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["count"] == 1)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    for n in 0..5 {
        assert!(listed.contains(&format!("jobs.cluster{n}")), "{stats}");
    }
    let ran = run_to_end(&["flush", "--layer", &url], &[]);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    for node in &cluster.nodes {
        assert_eq!(
            node.cmd::<Vec<String>>(&[b"KEYS", b"asgi{jobs.cluster*"]),
            Vec::<String>::new()
        );
    }
    let server = Proc::start(&["serve", "--port", "0", "--layer", &url], true);
    let line = server.announcement.clone().unwrap();
    assert!(line.contains("mode cluster"), "{line}");
    let (status, body) = http(server.base.as_ref().unwrap(), "GET", "/healthz", "").await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["layer_mode"], "cluster", "{body}");
}

/// One command to the node on `port`.
fn at<T: redis::FromRedisValue>(port: u16, args: &[&[u8]]) -> T {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).unwrap());
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn)
        .unwrap_or_else(|e| panic!("{port}: {e}"))
}

/// The port of the master that serves `slot` now, as the node on `ask` sees it; and every
/// master it knows to be up.
fn owner_of(ask: u16, slot: u16) -> (u16, Vec<u16>) {
    let (owner, masters) = masters_of(ask, slot);
    (
        owner.unwrap_or_else(|| panic!("no master serves slot {slot}")),
        masters,
    )
}

/// The master serving `slot` (if one does), and every master up, as the node on `ask` sees it.
fn masters_of(ask: u16, slot: u16) -> (Option<u16>, Vec<u16>) {
    let nodes: String = at(ask, &[b"CLUSTER", b"NODES"]);
    let mut owner = None;
    let mut masters = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 8 || !fields[2].contains("master") || fields[2].contains("fail") {
            continue;
        }
        let port: u16 = fields[1]
            .split(['@', ':'])
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap();
        masters.push(port);
        for range in fields.iter().skip(8) {
            if range.starts_with('[') {
                continue;
            }
            let (lo, hi) = match range.split_once('-') {
                Some((lo, hi)) => (lo.parse::<u16>().unwrap(), hi.parse::<u16>().unwrap()),
                None => (range.parse().unwrap(), range.parse().unwrap()),
            };
            if (lo..=hi).contains(&slot) {
                owner = Some(port);
            }
        }
    }
    (owner, masters)
}

fn slot_of(port: u16, key: &str) -> u16 {
    at(port, &[b"CLUSTER", b"KEYSLOT", key.as_bytes()])
}

/// Moves `slot` from the master on `from` to the master on `to` the way `redis-cli --cluster
/// reshard` does: IMPORTING/MIGRATING, MIGRATE of its keys in batches, then the new owner
/// announced to every master.
fn migrate_slot(slot: u16, from: u16, to: u16, masters: &[u16]) {
    let slot_s = slot.to_string();
    let src_id: String = at(from, &[b"CLUSTER", b"MYID"]);
    let dst_id: String = at(to, &[b"CLUSTER", b"MYID"]);
    at::<()>(
        to,
        &[
            b"CLUSTER",
            b"SETSLOT",
            slot_s.as_bytes(),
            b"IMPORTING",
            src_id.as_bytes(),
        ],
    );
    at::<()>(
        from,
        &[
            b"CLUSTER",
            b"SETSLOT",
            slot_s.as_bytes(),
            b"MIGRATING",
            dst_id.as_bytes(),
        ],
    );
    let port = to.to_string();
    loop {
        let keys: Vec<Vec<u8>> = at(
            from,
            &[b"CLUSTER", b"GETKEYSINSLOT", slot_s.as_bytes(), b"100"],
        );
        if keys.is_empty() {
            break;
        }
        let mut args: Vec<&[u8]> = vec![
            b"MIGRATE",
            b"127.0.0.1",
            port.as_bytes(),
            b"",
            b"0",
            b"5000",
            b"REPLACE",
            b"KEYS",
        ];
        args.extend(keys.iter().map(Vec::as_slice));
        at::<()>(from, &args);
    }
    for &m in masters {
        at::<()>(
            m,
            &[
                b"CLUSTER",
                b"SETSLOT",
                slot_s.as_bytes(),
                b"NODE",
                dst_id.as_bytes(),
            ],
        );
    }
}

/// Counts, per socket, the broadcast frames it received.
#[derive(Default)]
struct Tally {
    received: HashMap<usize, HashSet<u64>>,
}

/// What one event cost: frames the broadcaster could send, sends refused, deliveries lost
/// (sent but never received by some socket), and the time until every socket heard a frame
/// sent after the event began.
struct EventCost {
    sent: u64,
    refused: u64,
    lost: u64,
    recovered: Duration,
}

/// Broadcasts a numbered frame every 20 ms from `layer` while `event` runs and until every
/// socket has heard a frame sent after the event began; then waits for stragglers and counts.
async fn under_load(
    layer: &Layer,
    tally: &Arc<Mutex<Tally>>,
    sockets: usize,
    next: &AtomicU64,
    event: impl FnOnce() + Send + 'static,
) -> EventCost {
    let started = Instant::now();
    let first = next.load(Ordering::SeqCst);
    let done = Arc::new(AtomicBool::new(false));
    let event_done = Arc::clone(&done);
    let event = tokio::task::spawn_blocking(move || {
        event();
        event_done.store(true, Ordering::SeqCst);
    });
    let (mut sent, mut refused) = (Vec::new(), 0u64);
    let mut recovered = None;
    loop {
        let n = next.fetch_add(1, Ordering::SeqCst);
        match layer
            .group_send(
                "relay-cluster",
                &serde_json::json!({ "text": n.to_string() }),
            )
            .await
        {
            Ok(_) => sent.push(n),
            Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if recovered.is_none() {
            let t = tally.lock().await;
            if (0..sockets).all(|i| {
                t.received
                    .get(&i)
                    .is_some_and(|got| got.iter().any(|&m| m >= first))
            }) {
                recovered = Some(started.elapsed());
            }
        }
        // Two seconds at least, so each event meets a steady stream of broadcasts.
        if done.load(Ordering::SeqCst)
            && recovered.is_some()
            && started.elapsed() >= Duration::from_secs(2)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no recovery within 90 s (event done: {})",
            done.load(Ordering::SeqCst)
        );
    }
    event.await.unwrap();
    // Stragglers: what was sent arrives within a second or not at all.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = tally.lock().await;
    let lost = sent
        .iter()
        .map(|n| {
            (0..sockets)
                .filter(|i| !t.received.get(i).is_some_and(|got| got.contains(n)))
                .count() as u64
        })
        .sum();
    EventCost {
        sent: sent.len() as u64,
        refused,
        lost,
        recovered: recovered.unwrap_or_default(),
    }
}

/// Prints what an event cost (the figures BENCHMARKS.md reports).
fn report(event: &str, cost: &EventCost, sockets: usize) {
    eprintln!(
        "cluster {event}: {} broadcasts sent, {} refused, {} of {} deliveries lost, every socket heard one again after {:.2} s",
        cost.sent,
        cost.refused,
        cost.lost,
        cost.sent * sockets as u64,
        cost.recovered.as_secs_f64()
    );
}

async fn echo_works(echo: &mut Ws, tag: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        assert!(Instant::now() < deadline, "no echo within 30 s ({tag})");
        n += 1;
        let text = format!("{tag}-{n}");
        echo.send(Message::text(text.clone())).await.unwrap();
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(until, echo.next()).await {
            match msg {
                Message::Text(t) if t.as_str() == text => return,
                Message::Text(_) | Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("echo socket: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_load_rides_over_a_migrated_slot_a_new_node_and_a_killed_master() {
    const SOCKETS: usize = 40;
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 1))
        .await
        .unwrap();
    let url = cluster.url();
    let server = Proc::start(&["serve", "--port", "0", "--layer", &url], true);
    let _worker = Proc::start(&["worker", "--concurrency", "32", "--layer", &url], false);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut readers = Vec::new();
    for i in 0..SOCKETS {
        let mut ws = connect(&format!("{}/ws/relay/cluster/", server.ws())).await;
        let tally = Arc::clone(&tally);
        readers.push(tokio::spawn(async move {
            // Ends when the socket does: the test checks no reader ended before its teardown.
            while let Some(Ok(msg)) = ws.next().await {
                match msg {
                    Message::Text(t) => {
                        if let Ok(n) = t.parse::<u64>() {
                            tally.lock().await.received.entry(i).or_default().insert(n);
                        }
                    }
                    Message::Ping(_) | Message::Pong(_) => {}
                    other => panic!("socket {i} got {other:?}: no socket may close"),
                }
            }
        }));
    }
    let mut echo = connect(&format!("{}/ws/echo/", server.ws())).await;
    echo_works(&mut echo, "before").await;
    let layer = Layer::from_url(&url, LayerSettings::default())
        .await
        .unwrap();
    let next = AtomicU64::new(0);
    let warmup = under_load(&layer, &tally, SOCKETS, &next, || {}).await;
    assert_eq!(warmup.lost, 0, "lost deliveries before any event");

    // (a) The group's slot and the server inbox's slot migrated to another master.
    let seed = cluster.nodes[0].port();
    let inbox: String = {
        let (leases_at, _) = owner_of(seed, slot_of(seed, "asgi:leases"));
        let leases: Vec<String> = at(leases_at, &[b"ZRANGE", b"asgi:leases", b"0", b"-1"]);
        leases
            .into_iter()
            .find(|l| l.starts_with("switchyard.response."))
            .expect("the server's lease")
    };
    let slots = [
        slot_of(seed, "asgi:group:relay-cluster"),
        slot_of(seed, &format!("asgi{{{inbox}}}")),
    ];
    let migrated = under_load(&layer, &tally, SOCKETS, &next, move || {
        for slot in slots {
            let (from, masters) = owner_of(seed, slot);
            let to = *masters.iter().find(|&&m| m != from).unwrap();
            migrate_slot(slot, from, to, &masters);
        }
    })
    .await;
    echo_works(&mut echo, "migrated").await;
    report("slot migrated", &migrated, SOCKETS);

    // (b) A fourth master added and the slots rebalanced onto it.
    let others: Vec<u16> = cluster.nodes.iter().map(RedisServer::port).collect();
    let added = cluster.add_node();
    let rebalanced = under_load(&layer, &tally, SOCKETS, &next, move || {
        let (seed_addr, new_addr) = (format!("127.0.0.1:{seed}"), format!("127.0.0.1:{added}"));
        cli(&["--cluster", "add-node", &new_addr, &seed_addr]);
        // The new node must have met every other, and every other it, before slots move to
        // it: a node that has not heard of it yet refuses a slot migration to it ("ERR I
        // don't know about node", seen when gossip was slow on a loaded machine).
        let id: String = at(added, &[b"CLUSTER", b"MYID"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !at::<String>(added, &[b"CLUSTER", b"INFO"]).contains("cluster_state:ok")
            || others
                .iter()
                .any(|&p| !at::<String>(p, &[b"CLUSTER", b"NODES"]).contains(&id))
        {
            assert!(Instant::now() < deadline, "the added node never joined");
            std::thread::sleep(Duration::from_millis(100));
        }
        cli(&[
            "--cluster",
            "rebalance",
            &seed_addr,
            "--cluster-use-empty-masters",
            "--cluster-yes",
        ]);
    })
    .await;
    echo_works(&mut echo, "rebalanced").await;
    report("node added + rebalance", &rebalanced, SOCKETS);

    // (c) kill -9 the master holding the group, its replica promoted.
    // The added master has no replica: the group's slot goes back to a first master (one with
    // a replica) before that master is killed.
    let group_slot = slot_of(seed, "asgi:group:relay-cluster");
    let (owner, masters) = owner_of(seed, group_slot);
    let first_masters: Vec<u16> = cluster.nodes[..3].iter().map(|n| n.port()).collect();
    let victim = if first_masters.contains(&owner) {
        owner
    } else {
        migrate_slot(group_slot, owner, first_masters[0], &masters);
        first_masters[0]
    };
    let ask = *first_masters.iter().find(|&&p| p != victim).unwrap();
    cluster
        .nodes
        .iter()
        .find(|n| n.port() == victim)
        .unwrap()
        .signal("KILL");
    let killed_at = Instant::now();
    let promoted_at = Arc::new(std::sync::Mutex::new(None::<Duration>));
    let promoted = Arc::clone(&promoted_at);
    let failed_over = under_load(&layer, &tally, SOCKETS, &next, move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes: String = at(ask, &[b"CLUSTER", b"NODES"]);
            let replaced = nodes
                .lines()
                .any(|l| l.contains(&format!(":{victim}@")) && l.contains("fail"))
                && masters_of(ask, group_slot)
                    .0
                    .is_some_and(|owner| owner != victim);
            if replaced {
                *promoted.lock().unwrap() = Some(killed_at.elapsed());
                return;
            }
            assert!(Instant::now() < deadline, "no replica promoted within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await;
    echo_works(&mut echo, "failed-over").await;
    report("master kill -9", &failed_over, SOCKETS);
    let promoted = promoted_at.lock().unwrap().unwrap_or_default();
    eprintln!(
        "cluster master kill -9: replica promoted after {:.2} s",
        promoted.as_secs_f64()
    );
    // No socket closed: every reader is still reading.
    for r in &readers {
        assert!(!r.is_finished(), "a socket closed");
    }
    // Moving a slot and adding a node lose nothing; a master's death loses at most what was
    // written to it between its death and the promotion.
    assert_eq!(migrated.lost, 0, "lost deliveries during a slot migration");
    assert_eq!(rebalanced.lost, 0, "lost deliveries during a rebalance");
    drop(cluster);
}

//! Interoperability with Python's channels_redis 4.3.0 on one real redis-server: a Django
//! project's `channel_layer` and Switchyard share the Redis (prefix `asgi`) and hand each other
//! messages in both directions, directly and through groups, with `bytes` and unicode intact.
//!
//! The Python side is `tests/python/peer.py`, one `RedisChannelLayer` with every default, driven
//! over its stdin/stdout one JSON object per line (bytes as `{"$hex": ...}`). The interpreter is
//! `$SWITCHYARD_PYTHON`, else `<repo>/.venv/bin/python` (made by `scripts/setup-python.sh`).
//! Without it, or without channels_redis in it, the tests fail under `CI` and skip elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::layer::{Layer, LayerSettings};
use switchyard_routing::{ByteString, Map, Value};
use tokio::sync::mpsc;

use support::RedisServer;

/// The peer kills itself after this long, whatever the test does.
const PEER_LIFETIME: Duration = Duration::from_secs(20);
/// Longest wait for any one reply from the peer, or any one message on either side.
const STEP: Duration = Duration::from_secs(10);

/// The Python interpreter to use, or `None` (after saying why) when the test should be skipped.
fn python_or_skip() -> Option<PathBuf> {
    let python = std::env::var_os("SWITCHYARD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let problem = if python.exists() {
        match run_bounded(
            Command::new(&python).args(["-c", "import channels_redis.core, msgpack, redis"]),
            Duration::from_secs(20),
        ) {
            Ok(()) => return Some(python),
            Err(e) => format!("{} cannot import channels_redis: {e}", python.display()),
        }
    } else {
        format!("no Python interpreter at {}", python.display())
    };
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !in_ci,
        "python interop cannot run under CI: {problem}; run scripts/setup-python.sh (or set SWITCHYARD_PYTHON)"
    );
    eprintln!("skipping python interop: run scripts/setup-python.sh ({problem})");
    None
}

/// Runs a command to completion within `limit`, killing it past that.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<(), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return Err(format!("{status}: {}", err.trim()));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("did not finish within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `peer.py`, killed on drop.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
    next_id: u64,
    early: HashMap<u64, serde_json::Value>,
    /// The layer's `client_prefix`: every `new_channel()` of this peer is `specific.{it}!…`.
    client_prefix: String,
}

impl Peer {
    async fn start(python: &PathBuf, redis_url: &str) -> Peer {
        Self::start_with_keys(python, redis_url, &[]).await
    }

    /// A peer whose layer has these `symmetric_encryption_keys` (none: no encryption).
    async fn start_with_keys(python: &PathBuf, redis_url: &str, keys: &[&str]) -> Peer {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/peer.py");
        let mut child = Command::new(python)
            .arg(&script)
            .arg(redis_url)
            .arg(PEER_LIFETIME.as_secs().to_string())
            .env("PYTHONUNBUFFERED", "1")
            .env(
                "SWITCHYARD_PEER_KEYS",
                if keys.is_empty() {
                    String::new()
                } else {
                    json!(keys).to_string()
                },
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let mut pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut peer = Peer {
            child,
            stdin,
            lines,
            stderr,
            next_id: 1,
            early: HashMap::new(),
            client_prefix: String::new(),
        };
        // The first start imports Django and redis-py: allow more than one step.
        let ready = peer.next_line(STEP * 2, "the ready line").await;
        assert_eq!(ready["ready"], true, "unexpected first line {ready}");
        assert_eq!(ready["prefix"], "asgi");
        assert_eq!(ready["encrypted"], !keys.is_empty(), "{ready}");
        let version = ready["versions"]["channels-redis"].as_str().unwrap_or("");
        assert!(
            version.starts_with("4."),
            "need channels_redis 4.x, found {version:?}"
        );
        peer.client_prefix = ready["client_prefix"].as_str().unwrap().to_owned();
        peer
    }

    async fn next_line(&mut self, limit: Duration, what: &str) -> serde_json::Value {
        match tokio::time::timeout(limit, self.lines.recv()).await {
            Ok(Some(line)) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("peer printed non-JSON {line:?}: {e}")),
            Ok(None) => panic!(
                "peer exited while the test waited for {what}; its stderr:\n{}",
                self.stderr()
            ),
            Err(_) => panic!(
                "peer gave no {what} within {limit:?}; its stderr:\n{}",
                self.stderr()
            ),
        }
    }

    fn stderr(&self) -> String {
        // Give the reader thread a moment to collect a dying peer's traceback.
        std::thread::sleep(Duration::from_millis(200));
        self.stderr.lock().unwrap().clone()
    }

    /// Sends a request and returns its id; collect the answer with [`Peer::reply`].
    fn request(&mut self, mut request: serde_json::Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        let mut line = request.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("cannot write to peer: {e}; stderr:\n{}", self.stderr()));
        id
    }

    /// The result of request `id`; panics with the Python error and traceback if it failed.
    async fn reply(&mut self, id: u64) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + STEP;
        let answer = loop {
            if let Some(a) = self.early.remove(&id) {
                break a;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let a = self
                .next_line(left, &format!("reply to request {id}"))
                .await;
            let got = a["id"].as_u64().unwrap_or(0);
            if got == id {
                break a;
            }
            self.early.insert(got, a);
        };
        assert_eq!(
            answer["ok"],
            true,
            "peer request {id} failed: {}\n{}",
            answer["error"],
            answer["traceback"].as_str().unwrap_or("")
        );
        answer["result"].clone()
    }

    async fn call(&mut self, request: serde_json::Value) -> serde_json::Value {
        let id = self.request(request);
        self.reply(id).await
    }

    async fn new_channel(&mut self) -> String {
        let name = self.call(json!({"op": "new_channel"})).await;
        let name = name.as_str().unwrap().to_owned();
        assert!(
            name.starts_with(&format!("specific.{}!", self.client_prefix)),
            "{name}"
        );
        name
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A message value as the peer's JSON (bytes as `{"$hex": ...}`).
fn to_peer_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Nil => serde_json::Value::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Str(s) => json!(s),
        Value::Bytes(b) => json!({ "$hex": hex(b.as_slice()) }),
        Value::Array(items) => items.iter().map(to_peer_json).collect(),
        Value::Map(map) => serde_json::Value::Object(
            map.iter()
                .map(|(k, v)| (k.to_owned(), to_peer_json(v)))
                .collect(),
        ),
    }
}

/// The peer's JSON back to a message value, keys sorted (JSON objects do not keep order).
fn from_peer_json(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap()),
        },
        serde_json::Value::String(s) => Value::Str(s.clone()),
        serde_json::Value::Array(items) => Value::Array(items.iter().map(from_peer_json).collect()),
        serde_json::Value::Object(o) => {
            if let (1, Some(serde_json::Value::String(h))) = (o.len(), o.get("$hex")) {
                return Value::Bytes(ByteString(unhex(h)));
            }
            sorted(Value::Map(
                o.iter()
                    .map(|(k, v)| (k.clone(), from_peer_json(v)))
                    .collect(),
            ))
        }
    }
}

/// The value with every map's keys in order, for comparisons that ignore key order.
fn sorted(value: Value) -> Value {
    match value {
        Value::Map(Map(mut pairs)) => {
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Map(Map(pairs
                .into_iter()
                .map(|(k, v)| (k, sorted(v)))
                .collect()))
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// The fields that must survive the trip: text outside ASCII, bytes that are not UTF-8 (0xff),
/// and every other msgpack kind a Django message carries.
fn chat_message(text: &str) -> Map {
    Map::new()
        .with("type", "chat.message")
        .with("text", text)
        .with("bytes", ByteString(vec![0x00, 0x01, 0xff]))
        .with("count", 42i64)
        .with("negative", -7i64)
        .with("big", 1i64 << 40)
        .with("ratio", 1.5f64)
        .with("nothing", Value::Nil)
        .with("flag", true)
        .with(
            "list",
            Value::Array(vec![
                Value::Int(1),
                Value::from("two"),
                Value::Bytes(ByteString(vec![3])),
            ]),
        )
        .with("nested", Map::new().with("emoji", "✓ 🚂").with("empty", ""))
}

/// Asserts a received map equals `expected`, and checks the two fields that matter most by
/// kind and byte: `text` is a str, `bytes` a byte string `00 01 ff`.
fn assert_same_message(received: &Map, expected: &Map) {
    assert_eq!(
        received.get("text"),
        Some(&Value::Str(expected.get_str("text").unwrap().to_owned())),
        "text must arrive as a msgpack str, byte for byte"
    );
    assert_eq!(
        received.get("bytes"),
        Some(&Value::Bytes(ByteString(vec![0x00, 0x01, 0xff]))),
        "bytes must arrive as a msgpack bin, byte for byte"
    );
    assert!(
        !received.contains_key("__asgi_channel__"),
        "the layer's routing key leaked into the message"
    );
    assert_eq!(
        sorted(Value::Map(received.clone())),
        sorted(Value::Map(expected.clone()))
    );
}

async fn switchyard(redis: &RedisServer) -> Layer {
    Layer::from_url(&redis.url(), LayerSettings::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn python_send_is_received_by_switchyard_receiver() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let redis = RedisServer::start();
    let layer = switchyard(&redis).await;
    let mut peer = Peer::start(&python, &redis.url()).await;
    let sent = chat_message("from python £ ✓");

    peer.call(json!({"op": "send", "channel": "py.to.rust", "message": to_peer_json(&Value::Map(sent.clone()))}))
        .await;

    let mut receiver = layer.receiver().await.unwrap();
    let envelope = receiver
        .receive(&["py.to.rust".to_owned()], STEP)
        .await
        .unwrap()
        .expect("Python's message did not reach Switchyard");
    assert_eq!(envelope.channel, "py.to.rust");
    assert_same_message(&envelope.to_map().unwrap(), &sent);
    // Nothing else was queued: exactly one message crossed.
    assert_eq!(layer.channel_depth("py.to.rust").await.unwrap(), 0);
}

#[tokio::test]
async fn switchyard_send_is_received_by_python_receive() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let redis = RedisServer::start();
    let layer = switchyard(&redis).await;
    let mut peer = Peer::start(&python, &redis.url()).await;
    let sent = chat_message("from rust £ ✓");

    let waiting =
        peer.request(json!({"op": "receive", "channel": "rust.to.py", "timeout": STEP.as_secs()}));
    layer.send("rust.to.py", &sent).await.unwrap();

    let received = peer.reply(waiting).await;
    assert_same_message(from_peer_json(&received).as_map().unwrap(), &sent);
}

#[tokio::test]
async fn python_group_send_reaches_switchyard_local_channels_with_bytes_and_unicode_intact() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let redis = RedisServer::start();
    let layer = switchyard(&redis).await;
    let inbox = layer.inbox("specific").await.unwrap();
    let mut member = inbox.new_channel();
    let mut second_member = inbox.new_channel();
    let mut bystander = inbox.new_channel();
    layer.group_add("room", member.name()).await.unwrap();
    layer.group_add("room", second_member.name()).await.unwrap();
    let mut peer = Peer::start(&python, &redis.url()).await;
    let sent = chat_message("£ unicode ✓");

    peer.call(json!({"op": "group_send", "group": "room", "message": to_peer_json(&Value::Map(sent.clone()))}))
        .await;

    // channels_redis writes one message to our inbox naming both members (a list), which the
    // inbox hands to each of them.
    for local in [&mut member, &mut second_member] {
        let envelope = local
            .recv_timeout(STEP)
            .await
            .unwrap_or_else(|| panic!("{} got nothing from Python's group_send", local.name()));
        assert_eq!(envelope.channel, local.name());
        assert_same_message(&envelope.to_map().unwrap(), &sent);
    }
    assert!(member.try_recv().is_none(), "delivered twice");
    assert!(
        bystander.try_recv().is_none(),
        "a non-member got the group message"
    );
    inbox.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn switchyard_group_send_reaches_python_consumer_channel() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let redis = RedisServer::start();
    let layer = switchyard(&redis).await;
    let mut peer = Peer::start(&python, &redis.url()).await;
    let consumer = peer.new_channel().await;
    peer.call(json!({"op": "group_add", "group": "g", "channel": consumer}))
        .await;
    assert_eq!(
        layer.group_channels("g").await.unwrap(),
        vec![consumer.clone()]
    );
    let sent = chat_message("group from rust £ ✓");

    let waiting =
        peer.request(json!({"op": "receive", "channel": consumer, "timeout": STEP.as_secs()}));
    let report = layer.group_send("g", &sent).await.unwrap();
    assert_eq!((report.members, report.full), (1, 0));

    let received = peer.reply(waiting).await;
    assert_same_message(from_peer_json(&received).as_map().unwrap(), &sent);
}

#[tokio::test]
async fn switchyard_send_reaches_python_new_channel() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let redis = RedisServer::start();
    let layer = switchyard(&redis).await;
    let mut peer = Peer::start(&python, &redis.url()).await;
    let consumer = peer.new_channel().await;
    let sent = chat_message("direct from rust £ ✓");

    let waiting =
        peer.request(json!({"op": "receive", "channel": consumer, "timeout": STEP.as_secs()}));
    layer.send(&consumer, &sent).await.unwrap();

    let received = peer.reply(waiting).await;
    assert_same_message(from_peer_json(&received).as_map().unwrap(), &sent);
}

/// One group holding a Python consumer, a Switchyard local channel and a plain channel read by
/// a Switchyard worker: a group send from either side reaches all three, once each.
#[tokio::test]
async fn group_send_from_either_side_reaches_a_mixed_group() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let redis = RedisServer::start();
    let layer = switchyard(&redis).await;
    let inbox = layer.inbox("specific").await.unwrap();
    let mut local = inbox.new_channel();
    let mut worker = layer.receiver().await.unwrap();
    let mut peer = Peer::start(&python, &redis.url()).await;
    let python_channel = peer.new_channel().await;
    layer.group_add("mixed", local.name()).await.unwrap();
    layer.group_add("mixed", "worker.jobs").await.unwrap();
    peer.call(json!({"op": "group_add", "group": "mixed", "channel": python_channel}))
        .await;

    for (sender, text) in [("rust", "from rust ✓"), ("python", "from python ✓")] {
        let sent = chat_message(text);
        let waiting = peer.request(
            json!({"op": "receive", "channel": python_channel, "timeout": STEP.as_secs()}),
        );
        if sender == "rust" {
            let report = layer.group_send("mixed", &sent).await.unwrap();
            assert_eq!((report.members, report.full), (3, 0));
        } else {
            peer.call(json!({"op": "group_send", "group": "mixed", "message": to_peer_json(&Value::Map(sent.clone()))}))
                .await;
        }
        let received = peer.reply(waiting).await;
        assert_same_message(from_peer_json(&received).as_map().unwrap(), &sent);
        let envelope = local
            .recv_timeout(STEP)
            .await
            .expect("local member missed it");
        assert_same_message(&envelope.to_map().unwrap(), &sent);
        let envelope = worker
            .receive(&["worker.jobs".to_owned()], STEP)
            .await
            .unwrap()
            .expect("worker channel missed it");
        assert_eq!(envelope.channel, "worker.jobs");
        assert_same_message(&envelope.to_map().unwrap(), &sent);
    }
    assert!(local.try_recv().is_none(), "local member got a duplicate");
    assert_eq!(layer.channel_depth("worker.jobs").await.unwrap(), 0);
    inbox.shutdown(Duration::from_secs(2)).await;
}

/// A Django consumer replying straight to a socket's reply channel: Python `send` to a
/// Switchyard local (`!`) channel lands in our inbox with `__asgi_channel__` as a string.
#[tokio::test]
async fn python_send_to_a_switchyard_local_channel_reaches_it() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let redis = RedisServer::start();
    let layer = switchyard(&redis).await;
    let inbox = layer.inbox("specific").await.unwrap();
    let mut local = inbox.new_channel();
    let mut other = inbox.new_channel();
    let mut peer = Peer::start(&python, &redis.url()).await;
    let sent = chat_message("reply from python £ ✓");

    peer.call(json!({"op": "send", "channel": local.name(), "message": to_peer_json(&Value::Map(sent.clone()))}))
        .await;

    let envelope = local
        .recv_timeout(STEP)
        .await
        .expect("Python's direct send did not reach the local channel");
    assert_eq!(envelope.channel, local.name());
    assert_same_message(&envelope.to_map().unwrap(), &sent);
    assert!(
        other.try_recv().is_none(),
        "delivered to the wrong local channel"
    );
    inbox.shutdown(Duration::from_secs(2)).await;
}

/// Every member stored under `key`, random prefix and all.
fn stored_members(redis: &RedisServer, key: &str) -> Vec<Vec<u8>> {
    let mut conn = redis.client().get_connection().unwrap();
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap()
}

/// `symmetric_encryption_keys` on both sides: Python's encrypted messages reach Switchyard (a
/// plain channel and, through a group, a local channel whose `__asgi_channel__` is inside the
/// token), Switchyard's reach Python, and what sits in Redis is a Fernet token, not msgpack. The
/// Switchyard side has a newer key first (rotation): it still reads Python's older-key messages,
/// and Python, configured the other way round, reads the newer key's.
#[tokio::test]
async fn encrypted_messages_cross_both_ways_with_channels_redis_keys() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let redis = RedisServer::start();
    let settings = LayerSettings {
        symmetric_encryption_keys: vec!["key-2026".to_owned(), "key-2025".to_owned()],
        ..LayerSettings::default()
    };
    let layer = Layer::from_url(&redis.url(), settings).await.unwrap();
    let mut peer = Peer::start_with_keys(&python, &redis.url(), &["key-2025", "key-2026"]).await;

    // Python -> Switchyard, a plain channel; held in Redis first to look at the stored bytes.
    let sent = chat_message("secret from python £ ✓");
    peer.call(json!({"op": "send", "channel": "py.sealed", "message": to_peer_json(&Value::Map(sent.clone()))}))
        .await;
    let stored = stored_members(&redis, "asgipy.sealed");
    assert_eq!(stored.len(), 1);
    let token = &stored[0][12..];
    assert!(
        token.starts_with(b"gAAAAA"),
        "not a Fernet token: {token:?}"
    );
    assert!(
        !token.windows(6).any(|w| w == b"secret"),
        "plaintext visible in Redis"
    );
    let mut receiver = layer.receiver().await.unwrap();
    let envelope = receiver
        .receive(&["py.sealed".to_owned()], STEP)
        .await
        .unwrap()
        .expect("Python's encrypted message did not reach Switchyard");
    assert_same_message(&envelope.to_map().unwrap(), &sent);

    // Switchyard -> Python.
    let sent = chat_message("secret from rust £ ✓");
    let waiting =
        peer.request(json!({"op": "receive", "channel": "rust.sealed", "timeout": STEP.as_secs()}));
    layer.send("rust.sealed", &sent).await.unwrap();
    let received = peer.reply(waiting).await;
    assert_same_message(from_peer_json(&received).as_map().unwrap(), &sent);

    // Python group_send -> a Switchyard local channel (the target list is encrypted too).
    let inbox = layer.inbox("specific").await.unwrap();
    let mut member = inbox.new_channel();
    layer.group_add("sealed-room", member.name()).await.unwrap();
    let sent = chat_message("room secret");
    peer.call(json!({"op": "group_send", "group": "sealed-room", "message": to_peer_json(&Value::Map(sent.clone()))}))
        .await;
    let envelope = member
        .recv_timeout(STEP)
        .await
        .expect("Python's encrypted group_send did not reach the local channel");
    assert_eq!(envelope.channel, member.name());
    assert_same_message(&envelope.to_map().unwrap(), &sent);

    // Switchyard group_send -> a Python consumer channel.
    let consumer = peer.new_channel().await;
    peer.call(json!({"op": "group_add", "group": "sealed-room", "channel": consumer}))
        .await;
    let sent = chat_message("room secret from rust");
    let waiting =
        peer.request(json!({"op": "receive", "channel": consumer, "timeout": STEP.as_secs()}));
    layer.group_send("sealed-room", &sent).await.unwrap();
    let received = peer.reply(waiting).await;
    assert_same_message(from_peer_json(&received).as_map().unwrap(), &sent);
    let envelope = member
        .recv_timeout(STEP)
        .await
        .expect("local member missed it");
    assert_same_message(&envelope.to_map().unwrap(), &sent);
    assert_eq!(layer.metrics().snapshot().garbage, 0);
    inbox.shutdown(Duration::from_secs(2)).await;
}

/// A Switchyard without the key cannot read what an encrypting Django wrote: the message is
/// dropped and counted, never delivered as garbage.
#[tokio::test]
async fn encrypted_python_messages_are_unreadable_without_the_key() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let redis = RedisServer::start();
    let wrong = LayerSettings {
        symmetric_encryption_keys: vec!["not-the-key".to_owned()],
        ..LayerSettings::default()
    };
    let mut peer = Peer::start_with_keys(&python, &redis.url(), &["the-key"]).await;
    for (settings, channel) in [
        (LayerSettings::default(), "plain.reader"),
        (wrong, "wrong.reader"),
    ] {
        let layer = Layer::from_url(&redis.url(), settings).await.unwrap();
        peer.call(json!({"op": "send", "channel": channel, "message": to_peer_json(&Value::Map(chat_message("x")))}))
            .await;
        let mut receiver = layer.receiver().await.unwrap();
        let got = receiver
            .receive(&[channel.to_owned()], Duration::from_millis(500))
            .await
            .unwrap();
        assert!(got.is_none(), "{channel}: read without the key: {got:?}");
        assert_eq!(layer.metrics().snapshot().garbage, 1, "{channel}");
        assert_eq!(layer.channel_depth(channel).await.unwrap(), 0);
    }
}

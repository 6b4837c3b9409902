//! Channel-layer micro-benchmark: send + receive throughput through the Redis backend (against a
//! redis-server this binary starts on a free 127.0.0.1 port) and the in-memory backend.
//!
//! Scenarios: 1 sender + 1 receiver, and 8 senders + 8 receivers (each its own `Receiver`, each
//! pair on its own channel), receiving one message per call; 8 + 8 with `receive_batch` (one
//! blocking pop followed by a non-blocking pop of up to 64, as the process inbox reads); and
//! 32 + 32, to see whether more sends in flight raise the rate.
//! A fixed number of messages of about 100 bytes crosses in each scenario; the clock runs from
//! the first send to the last receive. Prints a table and a final JSON line.
//!
//! Run: `cargo bench --bench layer` (release). `SWITCHYARD_BENCH_MESSAGES` changes the count
//! (default 100000; 2000 when run without `--bench`, as `cargo test --all-targets` does);
//! `REDIS_SERVER_BIN` the server binary. Every wait is bounded, so a stuck scenario fails
//! instead of hanging.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use switchyard::layer::{Layer, LayerSettings};
use switchyard_routing::Map;
use switchyard_routing::codec;

/// Longest wait for one message before the scenario is declared stuck.
const RECEIVE_LIMIT: Duration = Duration::from_secs(10);
/// Longest a whole scenario may take.
const SCENARIO_LIMIT: Duration = Duration::from_secs(180);
/// Messages popped at once by the batch scenario (the process inbox's default).
const BATCH: usize = 64;
/// The commands a send or receive sends over the wire (the send script's own ZADD, ZCARD, ...
/// run inside Redis).
const CLIENT_COMMANDS: [&str; 5] = ["evalsha", "eval", "bzpopmin", "zpopmin", "bzmpop"];

/// A `redis-server` child on 127.0.0.1, killed on drop (a small copy of tests/support).
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned());
        let child = Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {bin} (apt-get install -y redis-server)"))?;
        let server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return Ok(server);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("redis-server on port {port} did not answer PING within 10 s")
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReceiveMode {
    /// `Receiver::receive`, one message per call.
    Single,
    /// `Receiver::receive_batch(.., BATCH)`.
    Batch,
}

#[derive(Debug, Clone, Copy)]
struct Scenario {
    pairs: usize,
    mode: ReceiveMode,
}

struct Outcome {
    backend: &'static str,
    scenario: Scenario,
    messages: usize,
    elapsed: Duration,
    full_retries: u64,
    /// CPU time (user + system) of this process over the scenario, when /proc tells it.
    client_cpu_secs: Option<f64>,
    /// What redis-server did meanwhile (Redis scenarios only).
    server: Option<ServerStats>,
}

/// redis-server's own view of a scenario: its CPU time, and per command the calls and the
/// server-side microseconds per call (`INFO cpu`, `INFO commandstats` after `CONFIG RESETSTAT`).
#[derive(Debug, Default)]
struct ServerStats {
    cpu_secs: f64,
    commands: Vec<(String, u64, f64)>,
}

/// Reads `INFO cpu` and `INFO commandstats`; with `reset`, then zeroes the command counters.
async fn server_stats(url: &str, reset: bool) -> Result<ServerStats> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let cpu: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
    let commandstats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    if reset {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut conn)
            .await?;
    }
    let field = |name: &str| -> f64 {
        cpu.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let mut commands = Vec::new();
    for line in commandstats.lines() {
        // cmdstat_evalsha:calls=100000,usec=812345,usec_per_call=8.12,...
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let value = |key: &str| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        commands.push((
            name.to_owned(),
            value("calls") as u64,
            value("usec_per_call"),
        ));
    }
    commands.sort_by_key(|c| std::cmp::Reverse(c.1));
    Ok(ServerStats {
        cpu_secs: field("used_cpu_sys") + field("used_cpu_user"),
        commands,
    })
}

impl ServerStats {
    /// Commands the layer issued (the benchmark's own INFO/CONFIG left out).
    fn layer_commands(&self) -> impl Iterator<Item = &(String, u64, f64)> {
        self.commands
            .iter()
            .filter(|(name, _, _)| name != "info" && name != "config|resetstat")
    }
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU seconds per million messages: comparable across machines and load, unlike msg/s.
    fn per_million(&self, cpu_secs: f64) -> f64 {
        cpu_secs * 1e6 / self.messages as f64
    }

    /// Commands the client sent per message, i.e. round trips unless pipelined (the commands a
    /// script runs inside Redis are counted by Redis too, but cost no round trip).
    fn client_commands_per_message(&self) -> Option<f64> {
        let server = self.server.as_ref()?;
        let calls: u64 = server
            .layer_commands()
            .filter(|(name, _, _)| CLIENT_COMMANDS.contains(&name.as_str()))
            .map(|c| c.1)
            .sum();
        Some(calls as f64 / self.messages as f64)
    }
}

/// This process's CPU time (user + system, all threads) from /proc/self/stat, in seconds.
/// Linux reports it in clock ticks of 1/100 s (USER_HZ), so it is coarse but fine over seconds.
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is the first, utime the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// About 100 bytes of msgpack, like a small chat message.
fn message(seq: usize) -> Map {
    Map::new()
        .with("type", "chat.message")
        .with("room", "lobby")
        .with("seq", seq as u64)
        .with(
            "text",
            "the quick brown fox jumps over the lazy dog, 0123456789",
        )
}

async fn run(
    layer: &Layer,
    backend: &'static str,
    redis_url: Option<&str>,
    scenario: Scenario,
    total: usize,
) -> Result<Outcome> {
    layer.flush().await?;
    let before = match redis_url {
        Some(url) => Some(server_stats(url, true).await?),
        None => None,
    };
    let per_pair = total / scenario.pairs;
    let mut receivers = Vec::with_capacity(scenario.pairs);
    for _ in 0..scenario.pairs {
        receivers.push(layer.receiver().await?);
    }
    let cpu_before = process_cpu_secs();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (pair, mut receiver) in receivers.into_iter().enumerate() {
        let channel = format!("bench.pair{pair}");
        let sender_layer = layer.clone();
        let sender_channel = channel.clone();
        let mode = scenario.mode;
        tasks.push(tokio::spawn(async move {
            let mut full_retries = 0u64;
            for seq in 0..per_pair {
                let payload = codec::to_msgpack(&message(seq))?;
                loop {
                    match sender_layer.send_encoded(&sender_channel, &payload).await {
                        Ok(()) => break,
                        // The receiver is behind: back off briefly, as an interface server would.
                        Err(e) if e.is_full() => {
                            full_retries += 1;
                            tokio::time::sleep(Duration::from_micros(200)).await;
                        }
                        Err(e) => return Err(anyhow::Error::from(e)),
                    }
                }
            }
            Ok::<u64, anyhow::Error>(full_retries)
        }));
        tasks.push(tokio::spawn(async move {
            let channels = [channel];
            let mut got = 0usize;
            while got < per_pair {
                let n = match mode {
                    ReceiveMode::Single => receiver
                        .receive(&channels, RECEIVE_LIMIT)
                        .await?
                        .map_or(0, |_| 1),
                    ReceiveMode::Batch => receiver
                        .receive_batch(&channels[0], RECEIVE_LIMIT, BATCH)
                        .await?
                        .len(),
                };
                if n == 0 {
                    bail!(
                        "{}: nothing received for {RECEIVE_LIMIT:?} after {got} messages",
                        channels[0]
                    );
                }
                got += n;
            }
            Ok(0)
        }));
    }
    let mut full_retries = 0;
    let joined = tokio::time::timeout(SCENARIO_LIMIT, futures_util::future::join_all(tasks))
        .await
        .with_context(|| format!("{backend} {scenario:?} took longer than {SCENARIO_LIMIT:?}"))?;
    let elapsed = start.elapsed();
    let client_cpu_secs = match (cpu_before, process_cpu_secs()) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    for result in joined {
        full_retries += result??;
    }
    let server = match (redis_url, before) {
        (Some(url), Some(before)) => {
            let mut after = server_stats(url, false).await?;
            after.cpu_secs -= before.cpu_secs;
            Some(after)
        }
        _ => None,
    };
    Ok(Outcome {
        backend,
        scenario,
        messages: per_pair * scenario.pairs,
        elapsed,
        full_retries,
        client_cpu_secs,
        server,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Test runners list a target's tests first (nextest, `--list`): this binary has none.
    if args.iter().any(|a| a == "--list") {
        return Ok(());
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` (or `--all-targets`) does not, and
    // then a short smoke run checks that the benchmark still works without taking its time.
    let full = args.iter().any(|a| a == "--bench");
    let total: usize = match std::env::var("SWITCHYARD_BENCH_MESSAGES") {
        Ok(v) => v
            .parse()
            .context("SWITCHYARD_BENCH_MESSAGES must be a number")?,
        Err(_) if full => 100_000,
        Err(_) => 2_000,
    };
    if !full {
        eprintln!(
            "smoke run of {total} messages per scenario (`cargo bench --bench layer` measures)"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let payload_bytes = codec::to_msgpack(&message(total))?.len();
    let redis = RedisServer::start()?;
    let scenarios = [
        Scenario {
            pairs: 1,
            mode: ReceiveMode::Single,
        },
        Scenario {
            pairs: 8,
            mode: ReceiveMode::Single,
        },
        Scenario {
            pairs: 8,
            mode: ReceiveMode::Batch,
        },
        // More senders in flight: shows whether a rate is bound by round trips or by CPU.
        Scenario {
            pairs: 32,
            mode: ReceiveMode::Single,
        },
    ];
    let outcomes = runtime.block_on(async {
        // Capacity above the whole run, so the figure is throughput, not backpressure.
        let settings = LayerSettings {
            capacity: total + 1,
            ..LayerSettings::default()
        };
        let memory = Layer::from_url("memory://", settings.clone()).await?;
        let redis_layer = Layer::from_url(&redis.url(), settings).await?;
        let mut outcomes = Vec::new();
        let url = redis.url();
        for (name, layer, stats_url) in [
            ("redis", &redis_layer, Some(url.as_str())),
            ("memory", &memory, None),
        ] {
            for scenario in scenarios {
                let outcome = run(layer, name, stats_url, scenario, total).await?;
                eprintln!(
                    "  {name:<6} {}x{} {:?}: {:.0} msg/s",
                    scenario.pairs,
                    scenario.pairs,
                    scenario.mode,
                    outcome.rate()
                );
                outcomes.push(outcome);
            }
        }
        redis_layer.flush().await?;
        Ok::<_, anyhow::Error>(outcomes)
    })?;

    println!("\nchannel layer send+receive, {total} messages of {payload_bytes} B msgpack each");
    println!(
        "{:<8} {:>6} {:>8} {:>10} {:>10} {:>14} {:>14} {:>10} {:>6}",
        "backend",
        "pairs",
        "receive",
        "time (ms)",
        "msg/s",
        "client CPU-s/M",
        "redis CPU-s/M",
        "cmds/msg",
        "full"
    );
    let or_dash =
        |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    for o in &outcomes {
        println!(
            "{:<8} {:>6} {:>8} {:>10.0} {:>10.0} {:>14} {:>14} {:>10} {:>6}",
            o.backend,
            format!("{}x{}", o.scenario.pairs, o.scenario.pairs),
            format!("{:?}", o.scenario.mode).to_lowercase(),
            o.elapsed.as_secs_f64() * 1000.0,
            o.rate(),
            or_dash(o.client_cpu_secs.map(|c| o.per_million(c)), 1),
            or_dash(o.server.as_ref().map(|s| o.per_million(s.cpu_secs)), 1),
            or_dash(o.client_commands_per_message(), 2),
            o.full_retries
        );
    }
    println!(
        "\nredis-server during each Redis scenario (server CPU / wall time; calls, server usec per call)"
    );
    for o in &outcomes {
        let Some(server) = &o.server else { continue };
        let commands: Vec<String> = server
            .layer_commands()
            .map(|(name, calls, usec)| format!("{name} {calls} x {usec:.1} us"))
            .collect();
        println!(
            "{}x{} {:<6} cpu {:.2} s / {:.2} s ({:.0}%): {}",
            o.scenario.pairs,
            o.scenario.pairs,
            format!("{:?}", o.scenario.mode).to_lowercase(),
            server.cpu_secs,
            o.elapsed.as_secs_f64(),
            100.0 * server.cpu_secs / o.elapsed.as_secs_f64(),
            commands.join(", ")
        );
    }
    let results: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            serde_json::json!({
                "backend": o.backend,
                "senders": o.scenario.pairs,
                "receivers": o.scenario.pairs,
                "receive": format!("{:?}", o.scenario.mode).to_lowercase(),
                "messages": o.messages,
                "elapsed_ms": (o.elapsed.as_secs_f64() * 1000.0).round(),
                "msgs_per_sec": o.rate().round(),
                "client_cpu_secs": o.client_cpu_secs.map(|c| (c * 1000.0).round() / 1000.0),
                "redis_cpu_secs": o.server.as_ref().map(|s| (s.cpu_secs * 1000.0).round() / 1000.0),
                "client_commands_per_message": o.client_commands_per_message().map(|c| (c * 100.0).round() / 100.0),
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({"bench": "layer", "payload_bytes": payload_bytes, "results": results})
    );
    Ok(())
}

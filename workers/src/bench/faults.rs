//! `switchyard bench faults`: what a live broadcast goes through when Redis or a process fails.
//!
//! For each fault the bench starts a fresh stack of its own on loopback (a `redis-server` it
//! can restart, two `serve` and two `worker` processes of this same binary), opens sockets in one
//! relay room split over the two servers, and has one socket send numbered frames at a steady
//! rate, so every frame crosses serve, Redis, a worker, Redis and both servers. After a steady
//! start it applies the fault, keeps sending, and then counts per fault: sockets dropped (those
//! of a killed server counted apart), deliveries lost, and how long after the fault (and after
//! it ended, for a restart or a stall) every live socket heard a frame again. The run stops by
//! itself; every process it started is killed at the end.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::BenchError;
use super::report::{self, Report};

/// A fault the bench can apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    /// Redis killed (its data gone: it keeps nothing on disk) and started again on its port.
    Restart,
    /// `FLUSHALL` with Redis up.
    Flushall,
    /// `CLIENT KILL TYPE normal`: every client connection cut.
    ClientKill,
    /// Redis frozen (SIGSTOP) for 3 s, then resumed.
    Stall,
    /// One of the two workers killed with SIGKILL.
    WorkerKill,
    /// One of the two servers killed with SIGKILL (its own sockets drop with it).
    ServeKill,
}

/// `switchyard bench faults`
#[derive(Debug, Clone, Args)]
pub struct FaultsArgs {
    /// Faults to apply, each on a fresh stack, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "restart,flushall,client-kill,stall,worker-kill,serve-kill"
    )]
    pub faults: Vec<Fault>,
    /// Sockets in the room, split evenly over the two servers (the sender is one of them).
    #[arg(long, short = 'c', default_value_t = 200)]
    pub connections: usize,
    /// Frames per second the sender sends.
    #[arg(long, short = 'r', default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds of steady broadcast before the fault, and after deliveries resumed.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
    /// Seconds after the fault within which deliveries must resume.
    #[arg(long, default_value_t = 20.0)]
    pub resume_limit: f64,
    /// The redis-server program.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// Extra flags for the serve processes (e.g. "--lease-ttl 5").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub serve_flags: String,
    /// No progress lines on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// What one socket heard.
#[derive(Debug, Default)]
struct Heard {
    seqs: HashSet<u64>,
    closed: bool,
}

/// A child process killed when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One command to Redis over a fresh connection, answer's first line returned.
fn redis_command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut s = StdTcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes())?;
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

fn start_redis(program: &str, port: u16) -> anyhow::Result<Owned> {
    let child = Command::new(program)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {program}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_command(port, &["PING"]).map_or(true, |r| r != "+PONG") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "redis-server did not answer within 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Owned(child))
}

/// Starts `switchyard ARGS` (this binary); for `serve`, returns the address it announced.
fn start_switchyard(args: &[String], announces: bool) -> anyhow::Result<(Owned, Option<String>)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(args)
        .env("SWITCHYARD_LOG", "error")
        .env_remove("REDIS_URL")
        .env_remove("SWITCHYARD_LAYER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdout = child.stdout.take();
    let owned = Owned(child);
    if !announces {
        return Ok((owned, None));
    }
    let mut line = String::new();
    if let Some(out) = stdout.as_mut() {
        let mut byte = [0u8; 1];
        while out.read(&mut byte)? == 1 && byte[0] != b'\n' {
            line.push(char::from(byte[0]));
        }
    }
    let start = line
        .find("http://")
        .ok_or_else(|| anyhow::anyhow!("serve announced no address: {line:?}"))?;
    let rest = &line[start + 7..];
    let host = rest.split('/').next().unwrap_or_default().to_owned();
    Ok((owned, Some(host)))
}

/// The result of one fault.
#[derive(Debug)]
struct Outcome {
    fault: Fault,
    sent: u64,
    expected: u64,
    lost: u64,
    dropped: u64,
    killed_server_sockets: u64,
    resumed_after_fault: Option<Duration>,
    resumed_after_end: Option<Duration>,
}

fn progress(quiet: bool, text: &str) {
    if !quiet {
        eprintln!("faults: {text}");
    }
}

async fn run_fault(args: &FaultsArgs, fault: Fault) -> anyhow::Result<Outcome> {
    let port = free_port()?;
    let mut redis = start_redis(&args.redis_server, port)?;
    let url = format!("redis://127.0.0.1:{port}/0");
    let mut serve_args = vec![
        "serve".to_owned(),
        "--port".to_owned(),
        "0".to_owned(),
        "--layer".to_owned(),
        url.clone(),
    ];
    serve_args.extend(args.serve_flags.split_whitespace().map(str::to_owned));
    let (serve_a, addr_a) = start_switchyard(&serve_args, true)?;
    let (serve_b, addr_b) = start_switchyard(&serve_args, true)?;
    let worker_args: Vec<String> = ["worker", "--layer", &url]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let (worker_a, _) = start_switchyard(&worker_args, false)?;
    let (_worker_b, _) = start_switchyard(&worker_args, false)?;
    let addrs = [addr_a.unwrap_or_default(), addr_b.unwrap_or_default()];
    let room = "faults";
    let n = args.connections.max(2);
    let heard: Arc<Vec<Mutex<Heard>>> = Arc::new((0..n).map(|_| Mutex::default()).collect());
    let mut sender = None;
    let mut readers = Vec::new();
    for i in 0..n {
        let target = format!("ws://{}/ws/relay/{room}/", addrs[i % 2]);
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(&target),
        )
        .await
        .map_err(|_| anyhow::anyhow!("socket {i} did not open in 10 s"))??;
        let (write, mut read) = ws.split();
        if i == 0 {
            sender = Some(write);
        } else {
            drop(write);
        }
        let heard = Arc::clone(&heard);
        readers.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = read.next().await {
                if let Message::Text(t) = msg
                    && let Ok(seq) = t.parse::<u64>()
                    && let Ok(mut h) = heard[i].lock()
                {
                    h.seqs.insert(seq);
                }
            }
            if let Ok(mut h) = heard[i].lock() {
                h.closed = true;
            }
        }));
    }
    let group_key = format!("asgi:group:relay-{room}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis_command(port, &["ZCARD", &group_key]).ok() != Some(format!(":{n}")) {
        anyhow::ensure!(Instant::now() < deadline, "the room never had {n} members");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sender = sender.ok_or_else(|| anyhow::anyhow!("no sender"))?;
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let sent_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let sending = {
        let sent_at = Arc::clone(&sent_at);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Ok(mut s) = sent_at.lock() {
                    s.push(Instant::now());
                }
                if sender.send(Message::text(seq.to_string())).await.is_err() {
                    break;
                }
                seq += 1;
            }
        })
    };
    let settle = Duration::from_secs_f64(args.settle);
    tokio::time::sleep(settle).await;
    progress(args.quiet, &format!("{fault:?}: applying"));
    let fault_at = Instant::now();
    let mut killed_server = None;
    let mut procs = (serve_a, serve_b, worker_a);
    match fault {
        Fault::Restart => {
            drop(redis);
            redis = start_redis(&args.redis_server, port)?;
        }
        Fault::Flushall => {
            redis_command(port, &["FLUSHALL"])?;
        }
        Fault::ClientKill => {
            let _ = redis_command(port, &["CLIENT", "KILL", "TYPE", "normal"]);
        }
        Fault::Stall => {
            let pid = redis.0.id().to_string();
            Command::new("kill").args(["-STOP", &pid]).status()?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            Command::new("kill").args(["-CONT", &pid]).status()?;
        }
        Fault::WorkerKill => {
            let _ = procs.2.0.kill();
        }
        Fault::ServeKill => {
            let _ = procs.1.0.kill();
            killed_server = Some(1usize);
        }
    }
    let fault_end = Instant::now();
    // Sockets of a killed server are not expected to hear anything more.
    let live = |i: usize| killed_server != Some(i % 2);
    let limit = Duration::from_secs_f64(args.resume_limit);
    let mut resumed_seq = None;
    while fault_end.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let times = sent_at.lock().map(|s| s.clone()).unwrap_or_default();
        let first_after = times
            .iter()
            .position(|t| *t >= fault_end)
            .unwrap_or(times.len());
        // The first frame sent after the fault ended that every live, open socket heard.
        let found = (first_after..times.len()).find(|&seq| {
            (0..n).filter(|&i| live(i)).all(|i| {
                heard[i]
                    .lock()
                    .is_ok_and(|h| h.closed || h.seqs.contains(&(seq as u64)))
            })
        });
        if let Some(seq) = found {
            resumed_seq = Some(seq);
            break;
        }
    }
    tokio::time::sleep(settle).await;
    stop.cancel();
    let _ = sending.await;
    // Let the last frames arrive before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let times = sent_at.lock().map(|s| s.clone()).unwrap_or_default();
    let sent = times.len() as u64;
    let mut expected = 0u64;
    let mut lost = 0u64;
    let mut dropped = 0u64;
    let mut killed_server_sockets = 0u64;
    for (i, h) in heard.iter().enumerate() {
        let Ok(h) = h.lock() else { continue };
        if !live(i) {
            killed_server_sockets += 1;
            continue;
        }
        if h.closed {
            dropped += 1;
        }
        expected += sent;
        lost += (0..sent).filter(|s| !h.seqs.contains(s)).count() as u64;
    }
    for r in readers {
        r.abort();
    }
    drop(redis);
    Ok(Outcome {
        fault,
        sent,
        expected,
        lost,
        dropped,
        killed_server_sockets,
        resumed_after_fault: resumed_seq.map(|s| times[s].saturating_duration_since(fault_at)),
        resumed_after_end: resumed_seq.map(|s| times[s].saturating_duration_since(fault_end)),
    })
}

/// Runs every fault in turn and reports them.
pub async fn run(args: FaultsArgs) -> anyhow::Result<Report> {
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 10_000.0) {
        return Err(
            BenchError::Usage(format!("--rate must be in (0, 10000], got {}", args.rate)).into(),
        );
    }
    let mut r = Report::new("faults");
    r.line(format!(
        "faults: {} sockets over 2 servers, 2 workers, 1 sender at {}/s, settle {} s",
        args.connections, args.rate, args.settle
    ));
    r.line(format!(
        "{:<12} {:>8} {:>10} {:>10} {:>8} {:>14} {:>14}",
        "fault", "sent", "expected", "lost", "dropped", "resumed (s)", "after end (s)"
    ));
    let mut rows = Vec::new();
    for fault in &args.faults {
        let o = run_fault(&args, *fault).await?;
        let secs = |d: Option<Duration>| {
            d.map_or("never".to_owned(), |d| format!("{:.2}", d.as_secs_f64()))
        };
        let name = format!("{:?}", o.fault);
        r.line(format!(
            "{:<12} {:>8} {:>10} {:>10} {:>8} {:>14} {:>14}{}",
            name,
            o.sent,
            o.expected,
            o.lost,
            o.dropped,
            secs(o.resumed_after_fault),
            secs(o.resumed_after_end),
            if o.killed_server_sockets > 0 {
                format!(
                    "  ({} sockets went with the killed server)",
                    o.killed_server_sockets
                )
            } else {
                String::new()
            }
        ));
        if o.resumed_after_fault.is_none() {
            r.must_be_zero(
                &format!("faults after which deliveries never resumed ({name})"),
                1,
            );
        }
        rows.push(serde_json::json!({
            "fault": name,
            "sent": o.sent,
            "expected": o.expected,
            "lost": o.lost,
            "dropped": o.dropped,
            "killed_server_sockets": o.killed_server_sockets,
            "resumed_after_fault_s": o.resumed_after_fault.map(report::seconds),
            "resumed_after_end_s": o.resumed_after_end.map(report::seconds),
        }));
    }
    r.field("faults", serde_json::Value::Array(rows));
    Ok(r)
}

//! `switchyard bench`: a load generator shipped in the binary (as redis-benchmark ships with
//! Redis). It owns the four load modes (`echo`, `broadcast`, `connect`, `http`), their flags, and
//! the rules every mode follows: loopback targets only, a run that stops by itself, a progress
//! line per second on stderr, a readable summary and a final JSON line on stdout.
//!
//! Exit codes: 0 when every correctness counter is clean, 1 when some message was lost,
//! corrupted, duplicated or reordered (or a request failed), 2 for bad usage, including a
//! target that is not on the loopback interface.

mod broadcast;
mod client;
mod connect;
mod echo;
mod faults;
mod http;
mod jobs;
pub mod net;
pub mod payload;
pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::sync::Semaphore;

pub use broadcast::BroadcastArgs;
pub use connect::ConnectArgs;
pub use echo::EchoArgs;
pub use faults::{Fault, FaultsArgs};
pub use http::HttpArgs;
pub use report::Report;

use net::{ConnectFailure, Target, Ws};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// `switchyard bench`
#[derive(Debug, Clone, Args)]
#[command(after_help = AFTER_HELP)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Mode,
}

const AFTER_HELP: &str = "\
Every mode stops by itself (--duration / --count, or --hold for connect), prints a progress \
line per second on stderr (-q to silence), then a readable summary and one JSON line on \
stdout. Latencies are in microseconds (HDR histogram: p50, p90, p99, p99.9, max). With --rate \
(open loop), latency counts from each message's scheduled send time, so a stalled server or \
socket shows up as latency; senders wake up to 1 ms early for the runtime's timer wheel, and a \
message sent early counts from its actual send time. `send lag` shows how late sends went out.

Targets must be on this machine: 127.0.0.0/8, ::1 or localhost; anything else is refused.

Exit codes: 0 all messages accounted for; 1 loss, corruption, duplicates, reordering, failed \
connections or requests; 2 bad usage or a non-loopback target.";

/// The load to generate.
#[derive(Debug, Clone, Subcommand)]
pub enum Mode {
    /// WebSocket echo: C connections, closed loop (--in-flight) or fixed rate (--rate); RTT,
    /// echoes/s, lost and corrupted messages.
    Echo(EchoArgs),
    /// WebSocket room broadcast: C connections over R rooms, S senders at a fixed rate;
    /// per-delivery latency, deliveries/s, expected vs received, duplicates, reordering.
    Broadcast(BroadcastArgs),
    /// Connection avalanche: open C WebSockets with a concurrency cap, hold them, close them.
    Connect(ConnectArgs),
    /// HTTP/1.1 keep-alive GET (or POST with --body-size) load, closed loop or fixed rate.
    Http(HttpArgs),
    /// Redis and process faults under a live broadcast, each on a fresh stack this command
    /// starts itself (redis-server, 2 serve, 2 worker): sockets dropped, deliveries lost,
    /// seconds until deliveries resumed.
    Faults(FaultsArgs),
    /// Background jobs through Redis: at-most-once vs durable (jobs/s, send-to-start latency,
    /// CPU per job), or with --soak a run where worker processes are killed at random.
    Jobs(jobs::JobsArgs),
    /// A soak worker process (started by `bench jobs --soak`).
    #[command(hide = true)]
    JobsWorker(jobs::JobsWorkerArgs),
}

/// Flags every mode has.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Spread connections over this many source addresses 127.0.0.1..=127.0.0.N (IPv4 targets),
    /// each with its own ephemeral port range; 1 disables the spreading.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub source_addrs: u8,
    /// Connections (TCP + handshake) in progress at once while opening them.
    #[arg(long, visible_alias = "concurrency", default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Seconds allowed for one connection to open (TCP + handshake).
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// No progress line on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// A header every WebSocket handshake carries, `Name: value` (repeatable), e.g.
    /// `--header 'Origin: https://app.example'` or `--header 'Authorization: Bearer <token>'`.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
}

/// How long a load mode runs.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Seconds of load after the connections are open.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many messages (or requests) in total, if that comes before --duration.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// Seconds to wait after the last send for outstanding replies before counting them lost.
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,
}

impl LoadArgs {
    /// What the `index`-th of `parts` senders may send: its share of --count, else no limit.
    fn quota(&self, parts: usize, index: usize) -> u64 {
        self.count
            .map(|n| share(n, parts, index))
            .unwrap_or(u64::MAX)
    }
}

/// Errors that stop a bench run before or after the load (bad usage, refused target, failed
/// correctness counters).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The target host is not a loopback address.
    #[error(
        "refusing to load {0}: bench only targets this machine (127.0.0.0/8, ::1 or localhost)"
    )]
    NotLoopback(String),
    /// The URL cannot be used.
    #[error("bad target URL {0}")]
    BadUrl(String),
    /// A flag value makes no sense.
    #[error("{0}")]
    Usage(String),
    /// Nothing could be connected.
    #[error("no connection could be opened ({0})")]
    NoConnection(String),
    /// The run completed but a correctness counter is not zero.
    #[error("bench failed: {0}")]
    Failed(String),
}

/// The exit code for a bench error, or `None` when the error is not the bench's own.
pub fn exit_code_for(e: &anyhow::Error) -> Option<ExitCode> {
    match e.downcast_ref::<BenchError>()? {
        BenchError::NotLoopback(_) | BenchError::BadUrl(_) | BenchError::Usage(_) => {
            Some(ExitCode::from(2))
        }
        BenchError::NoConnection(_) | BenchError::Failed(_) => Some(ExitCode::FAILURE),
    }
}

/// Parses bench flags as if given after `switchyard bench` (the first item is the program
/// name, as for clap's `parse_from`).
pub fn parse_args<I, T>(args: I) -> Result<BenchArgs, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    #[derive(Debug, Parser)]
    #[command(name = "switchyard-bench")]
    struct Wrapper {
        #[command(flatten)]
        bench: BenchArgs,
    }
    Wrapper::try_parse_from(args).map(|w| w.bench)
}

/// Waits until `active` reaches zero (each task decrements it and notifies `done` when it
/// finishes) or `deadline` passes, whichever comes first.
pub(crate) async fn wait_until_idle(
    active: &std::sync::atomic::AtomicUsize,
    done: &tokio::sync::Notify,
    deadline: tokio::time::Instant,
) {
    loop {
        // Registered before the check, so a notification between the two is not missed.
        let notified = done.notified();
        if active.load(Ordering::Acquire) == 0 {
            return;
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// Ends the load phase the same way in every mode that has one: when each of the `active`
/// senders has sent its quota or `duration` after `start`, whichever comes first, tells them to
/// stop, and returns how long the load ran.
async fn end_load(
    active: &std::sync::atomic::AtomicUsize,
    done: &tokio::sync::Notify,
    stop_sending: &tokio_util::sync::CancellationToken,
    start: std::time::Instant,
    duration: Duration,
) -> Duration {
    let deadline = tokio::time::Instant::from_std(start + duration);
    wait_until_idle(active, done, deadline).await;
    stop_sending.cancel();
    start.elapsed()
}

/// Waits for every connection task, in order; a task that panicked or was cancelled gives the
/// outcome `failed` makes of its error, so that it is reported instead of ending the run.
async fn join_all<T>(
    tasks: Vec<tokio::task::JoinHandle<T>>,
    failed: impl Fn(tokio::task::JoinError) -> T,
) -> Vec<T> {
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.unwrap_or_else(&failed));
    }
    outcomes
}

/// Runs the bench, prints its report on stdout, and fails when a correctness counter is not
/// zero.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let report = execute(args).await?;
    report.write_to(&mut std::io::stdout().lock())?;
    if !report.ok {
        return Err(BenchError::Failed(report.problems.join(", ")).into());
    }
    Ok(())
}

/// Runs the bench and returns its report without printing it (progress still goes to stderr).
pub async fn execute(args: BenchArgs) -> anyhow::Result<Report> {
    let cpu_before = report::process_cpu();
    let started = std::time::Instant::now();
    let mut report = match args.mode {
        Mode::Echo(a) => echo::run(a).await,
        Mode::Broadcast(a) => broadcast::run(a).await,
        Mode::Connect(a) => connect::run(a).await,
        Mode::Http(a) => http::run(a).await,
        Mode::Faults(a) => faults::run(a).await,
        Mode::Jobs(a) => jobs::run(a).await,
        Mode::JobsWorker(a) => jobs::worker(a).await,
    }?;
    report.add_client_cpu(cpu_before, started.elapsed());
    Ok(report)
}

/// A positive finite number of seconds, or a usage error naming the flag.
fn seconds(flag: &str, value: f64) -> Result<Duration, BenchError> {
    if value.is_finite() && value >= 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(BenchError::Usage(format!(
            "--{flag} must be a number of seconds >= 0, got {value}"
        )))
    }
}

fn at_least_one(flag: &str, value: usize) -> Result<(), BenchError> {
    if value == 0 {
        return Err(BenchError::Usage(format!("--{flag} must be at least 1")));
    }
    Ok(())
}

fn positive_rate(flag: &str, value: f64) -> Result<f64, BenchError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(BenchError::Usage(format!(
            "--{flag} must be a positive number, got {value}"
        )))
    }
}

/// The share of `total` that the `index`-th of `parts` gets (shares differ by at most one).
fn share(total: u64, parts: usize, index: usize) -> u64 {
    let parts = parts.max(1) as u64;
    let index = index as u64;
    total / parts + u64::from(index < total % parts)
}

/// Opened WebSockets, in index order (`None` where opening failed), the failures by kind, and
/// how long opening them all took.
struct Opened {
    sockets: Vec<Option<Ws>>,
    failures: BTreeMap<String, u64>,
    first_failure: Option<String>,
    setup: Duration,
}

impl Opened {
    /// How many sockets opened.
    fn connected(&self) -> usize {
        self.sockets.iter().filter(|s| s.is_some()).count()
    }

    /// The report's connect line (and first failure), `connect_failures` field and check.
    fn report_to(&self, r: &mut Report) {
        r.line(format!(
            "connect     {:.2} s, failures: {}",
            self.setup.as_secs_f64(),
            report::kinds_text(&self.failures)
        ));
        if let Some(first) = &self.first_failure {
            r.line(format!("first connect failure: {first}"));
        }
        r.field("connect_failures", report::kinds_json(&self.failures));
        r.must_be_zero("connect failures", self.failures.values().sum());
    }
}

/// Opens `count` WebSockets to the targets `url_for(i)` picks, at most `concurrency` at once.
async fn open_websockets(
    targets: Arc<Vec<Target>>,
    target_of: impl Fn(usize) -> usize,
    count: usize,
    common: &CommonArgs,
    config: WebSocketConfig,
) -> Result<Opened, BenchError> {
    let setup_start = std::time::Instant::now();
    at_least_one("connect-concurrency", common.connect_concurrency)?;
    let timeout = seconds("connect-timeout", common.connect_timeout)?;
    let headers = Arc::new(net::parse_headers(&common.headers)?);
    let limit = Arc::new(Semaphore::new(common.connect_concurrency));
    let opened = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let limit = limit.clone();
        let targets = targets.clone();
        let target = target_of(index);
        let spread = common.source_addrs;
        let opened = opened.clone();
        let headers = headers.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.ok();
            let result =
                net::connect_ws(&targets[target], index, spread, config, timeout, &headers).await;
            if result.is_ok() {
                opened.fetch_add(1, Ordering::Relaxed);
            }
            result
        }));
    }
    let mut sockets = Vec::with_capacity(count);
    let mut failures = BTreeMap::new();
    let mut first_failure = None;
    for task in tasks {
        let result = task.await.unwrap_or_else(|e| {
            Err(ConnectFailure {
                kind: "panic".to_owned(),
                detail: e.to_string(),
            })
        });
        match result {
            Ok(ws) => sockets.push(Some(ws)),
            Err(f) => {
                *failures.entry(f.kind).or_insert(0) += 1;
                first_failure.get_or_insert(f.detail);
                sockets.push(None);
            }
        }
    }
    if sockets.iter().all(Option::is_none) {
        return Err(BenchError::NoConnection(
            first_failure.unwrap_or_else(|| "no connection requested".to_owned()),
        ));
    }
    Ok(Opened {
        sockets,
        failures,
        first_failure,
        setup: setup_start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for (total, parts) in [(10, 3), (0, 4), (7, 7), (5, 9)] {
            let sum: u64 = (0..parts).map(|i| share(total, parts, i)).sum();
            assert_eq!(sum, total);
        }
        assert_eq!(share(10, 3, 0), 4);
        assert_eq!(share(10, 3, 2), 3);
    }

    #[test]
    fn flags_parse_per_mode() {
        let args = parse_args([
            "bench",
            "echo",
            "-c",
            "3",
            "--in-flight",
            "2",
            "--size",
            "100",
            "--binary",
            "-d",
            "1.5",
        ])
        .unwrap();
        match args.mode {
            Mode::Echo(e) => {
                assert_eq!(e.connections, 3);
                assert_eq!(e.in_flight, 2);
                assert!(e.binary);
                assert_eq!(e.load.duration, 1.5);
                assert_eq!(e.common.source_addrs, 250);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_args(["bench", "echo", "--source-addrs", "0"]).is_err());
        assert!(parse_args(["bench", "nope"]).is_err());
    }

    #[test]
    fn bad_numbers_are_usage_errors() {
        assert!(seconds("drain", -1.0).is_err());
        assert!(seconds("drain", f64::NAN).is_err());
        assert!(positive_rate("rate", 0.0).is_err());
        assert!(at_least_one("connections", 0).is_err());
        let e = anyhow::Error::from(BenchError::Usage("x".into()));
        assert_eq!(exit_code_for(&e), Some(ExitCode::from(2)));
        let e = anyhow::Error::from(BenchError::NotLoopback("10.0.0.1".into()));
        assert_eq!(exit_code_for(&e), Some(ExitCode::from(2)));
        assert_eq!(exit_code_for(&anyhow::anyhow!("other")), None);
    }
}

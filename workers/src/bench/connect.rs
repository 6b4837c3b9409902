//! `bench connect`: a connection avalanche. Opens C WebSockets as fast as a concurrency cap
//! allows, times each (TCP connect + handshake), counts failures by kind, holds the open ones
//! for a while (answering pings, noticing server-side drops), then closes them cleanly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::report::{self, Live, Report};
use super::stats::{LatencyRecorder, LocalLatency, Percentiles};
use super::{CommonArgs, net};

/// `switchyard bench connect`
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// WebSocket endpoint (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws/echo/")]
    pub url: String,
    /// WebSockets to open.
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub connections: usize,
    /// Seconds to hold the connections open once they are all attempted.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// How one connection ended.
#[derive(Debug)]
enum Outcome {
    Failed(net::ConnectFailure),
    /// Held to the end; whether the close handshake completed.
    Held {
        clean_close: bool,
    },
    /// The server closed or broke it during the hold.
    Dropped(String),
}

pub(super) async fn run(args: ConnectArgs) -> anyhow::Result<Report> {
    super::at_least_one("connections", args.connections)?;
    super::at_least_one("concurrency", args.common.connect_concurrency)?;
    let hold = super::seconds("hold", args.hold)?;
    let timeout = super::seconds("connect-timeout", args.common.connect_timeout)?;
    let target = Arc::new(net::parse_target(&args.url, &["ws"])?);
    let headers = Arc::new(net::parse_headers(&args.common.headers)?);
    let fd_limit = net::raise_fd_limit(args.connections as u64 + 64);

    let latency = Arc::new(LatencyRecorder::default());
    let live = Arc::new(Live::default());
    let limit = Arc::new(Semaphore::new(args.common.connect_concurrency));
    let release = CancellationToken::new();
    let attempted_all = Arc::new(AtomicU64::new(0));
    let progress =
        report::Progress::start("connect", "connected", &live, &latency, args.common.quiet);
    if !args.common.quiet {
        eprintln!(
            "bench connect: {} connections to {}, {} at once (open-file limit {fd_limit})",
            args.connections, target.url, args.common.connect_concurrency
        );
    }

    let start = Instant::now();
    let (attempts_done_tx, mut attempts_done) = tokio::sync::mpsc::channel::<()>(1);
    let last_attempt_ns = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(args.connections);
    for index in 0..args.connections {
        let (limit, target, latency, live, release) = (
            limit.clone(),
            target.clone(),
            latency.clone(),
            live.clone(),
            release.clone(),
        );
        let (attempted_all, done_tx, last_attempt_ns) = (
            attempted_all.clone(),
            attempts_done_tx.clone(),
            last_attempt_ns.clone(),
        );
        let (spread, total) = (args.common.source_addrs, args.connections as u64);
        let headers = headers.clone();
        tasks.push(tokio::spawn(async move {
            let permit = limit.acquire_owned().await.ok();
            live.sent.fetch_add(1, Ordering::Relaxed);
            let began = Instant::now();
            let result =
                net::connect_ws(&target, index, spread, net::ws_config(0), timeout, &headers).await;
            let finished = Instant::now();
            drop(permit);
            let finished_ns = finished.saturating_duration_since(start).as_nanos() as u64;
            last_attempt_ns.fetch_max(finished_ns, Ordering::Relaxed);
            match &result {
                Ok(_) => {
                    let mut local = LocalLatency::default();
                    let us = finished.saturating_duration_since(began).as_micros() as u64;
                    local.record(&latency, us, finished);
                    local.flush(&latency);
                    live.done.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    live.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if attempted_all.fetch_add(1, Ordering::AcqRel) + 1 == total {
                let _ = done_tx.try_send(());
            }
            drop(done_tx);
            match result {
                Err(f) => Outcome::Failed(f),
                Ok(ws) => hold_then_close(ws, release).await,
            }
        }));
    }
    drop(attempts_done_tx);
    let _ = attempts_done.recv().await;
    let open_phase = Duration::from_nanos(last_attempt_ns.load(Ordering::Relaxed));
    let connected_now = live.done.load(Ordering::Relaxed);
    if !args.common.quiet {
        eprintln!(
            "bench connect: {connected_now} open after {:.2} s, holding for {:.1} s",
            open_phase.as_secs_f64(),
            hold.as_secs_f64()
        );
    }
    tokio::time::sleep(hold).await;
    release.cancel();
    let close_start = Instant::now();

    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_failure = None;
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    let (mut connected, mut clean, mut unclean) = (0u64, 0u64, 0u64);
    for task in tasks {
        match task.await {
            Ok(Outcome::Failed(f)) => {
                *failures.entry(f.kind).or_insert(0) += 1;
                first_failure.get_or_insert(f.detail);
            }
            Ok(Outcome::Held { clean_close }) => {
                connected += 1;
                if clean_close {
                    clean += 1;
                } else {
                    unclean += 1;
                }
            }
            Ok(Outcome::Dropped(why)) => {
                connected += 1;
                *dropped.entry(why).or_insert(0) += 1;
            }
            Err(e) => {
                *failures.entry("panic".to_owned()).or_insert(0) += 1;
                first_failure.get_or_insert(e.to_string());
            }
        }
    }
    let close_phase = close_start.elapsed();
    progress.stop().await;

    let p = Percentiles::of(&latency.total());
    let failed: u64 = failures.values().sum();
    let dropped_total: u64 = dropped.values().sum();
    let mut r = Report::new("connect");
    r.line(format!(
        "connect {}: {} connections, {} at once",
        target.url, args.connections, args.common.connect_concurrency
    ));
    r.line(format!(
        "open        {connected} connected, {failed} failed in {:.2} s ({} connects/s); failures: {}",
        open_phase.as_secs_f64(),
        report::per_second(connected, open_phase),
        report::kinds_text(&failures)
    ));
    if let Some(first) = &first_failure {
        r.line(format!("first failure: {first}"));
    }
    r.line(report::latency_line("connect", &p));
    r.line(format!(
        "hold        {:.1} s: dropped by the server {dropped_total} ({})",
        hold.as_secs_f64(),
        report::kinds_text(&dropped)
    ));
    r.line(format!(
        "close       {clean} clean, {unclean} without the server's close reply, in {:.2} s",
        close_phase.as_secs_f64()
    ));
    r.field("url", target.url.as_str());
    r.field("connections", args.connections as u64);
    r.field("concurrency", args.common.connect_concurrency as u64);
    r.field("connected", connected);
    r.field("failed", failed);
    r.field("failures", report::kinds_json(&failures));
    r.field("open_s", report::seconds(open_phase));
    r.field("connects_per_s", report::per_second(connected, open_phase));
    r.field("connect_us", report::latency_json(&p));
    r.field("hold_s", report::seconds(hold));
    r.field("dropped", dropped_total);
    r.field("closed_clean", clean);
    r.field("closed_unclean", unclean);
    r.must_be_zero("failed connections", failed);
    r.must_be_zero("dropped connections", dropped_total);
    Ok(r)
}

/// Keeps the connection read (so pings are answered and a drop is seen) until `release`, then
/// sends a close frame and waits briefly for the server's.
async fn hold_then_close(mut ws: net::Ws, release: CancellationToken) -> Outcome {
    loop {
        tokio::select! {
            biased;
            _ = release.cancelled() => break,
            m = ws.next() => match m {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | None => {
                    return Outcome::Dropped("closed".to_owned());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Outcome::Dropped(error_kind(&e)),
            },
        }
    }
    let closing = async {
        ws.close(None).await.ok()?;
        // The close completes when the server's close frame (or EOF) arrives.
        while let Some(m) = ws.next().await {
            m.ok()?;
        }
        Some(())
    };
    let clean_close = matches!(
        tokio::time::timeout(Duration::from_secs(5), closing).await,
        Ok(Some(()))
    );
    Outcome::Held { clean_close }
}

fn error_kind(e: &tokio_tungstenite::tungstenite::Error) -> String {
    match e {
        tokio_tungstenite::tungstenite::Error::Io(io) => net::io_kind(io).to_owned(),
        tokio_tungstenite::tungstenite::Error::Protocol(_) => "protocol".to_owned(),
        _ => "other".to_owned(),
    }
}

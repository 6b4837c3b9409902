//! `bench echo`: C WebSocket connections each sending stamped messages to an echo endpoint and
//! checking every echo (sequence, fingerprint, length); closed loop (a fixed number of messages
//! in flight per connection) or open loop at a fixed total rate, where latency counts from each
//! message's scheduled send time so that a stalled server cannot hide behind a slowed client.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use super::client::{self, Checks, Run, Tally};
use super::report::{self, Report};
use super::stats::{
    LatencyRecorder, LocalLatency, Percentiles, SeqTracker, latency_origin, micros_between,
};
use super::{CommonArgs, LoadArgs, net};

/// `switchyard bench echo`
#[derive(Debug, Clone, Args)]
pub struct EchoArgs {
    /// WebSocket echo endpoint (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws/echo/")]
    pub url: String,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub connections: usize,
    /// Closed loop: messages each connection keeps outstanding (an echo missing for --drain
    /// seconds frees its slot).
    #[arg(long, default_value_t = 1)]
    pub in_flight: usize,
    /// Open loop instead: total messages per second over all connections; latency counts from
    /// each message's scheduled send time.
    #[arg(long, short = 'r')]
    pub rate: Option<f64>,
    /// Message size in bytes (at least the 49-byte header).
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// Send binary frames (default: text).
    #[arg(long)]
    pub binary: bool,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// How each connection paces its sends.
#[derive(Debug, Clone, Copy)]
enum Pace {
    Closed { in_flight: usize },
    Open { interval: Duration },
}

/// State shared by every connection of one run.
#[derive(Debug)]
struct Shared {
    run: Run,
    /// Latency of the client itself: actual minus scheduled send time (open loop).
    send_lag: LatencyRecorder,
    pace: Pace,
    /// Closed loop: how long a connection waits for an echo before sending regardless.
    reply_timeout: Duration,
}

/// What one connection saw.
#[derive(Debug, Default)]
struct ConnOutcome {
    sent: u64,
    tracker: SeqTracker,
    corrupted: u64,
    error: Option<String>,
}

pub(super) async fn run(args: EchoArgs) -> anyhow::Result<Report> {
    super::at_least_one("connections", args.connections)?;
    super::at_least_one("in-flight", args.in_flight)?;
    client::check_size(args.size)?;
    let duration = super::seconds("duration", args.load.duration)?;
    let drain = super::seconds("drain", args.load.drain)?;
    let rate = args
        .rate
        .map(|r| super::positive_rate("rate", r))
        .transpose()?;
    let target = net::parse_target(&args.url, &["ws"])?;
    net::raise_fd_limit(args.connections as u64 + 64);

    let conns = args.connections;
    if !args.common.quiet {
        eprintln!("bench echo: opening {conns} connections to {}", target.url);
    }
    let mut opened = super::open_websockets(
        Arc::new(vec![target.clone()]),
        |_| 0,
        conns,
        &args.common,
        net::ws_config(args.size),
    )
    .await?;
    let connected = opened.connected();

    let pace = match rate {
        Some(r) => Pace::Open {
            interval: Duration::from_secs_f64(connected as f64 / r),
        },
        None => Pace::Closed {
            in_flight: args.in_flight,
        },
    };
    let shared = Arc::new(Shared {
        run: Run::new(connected, args.size, args.binary),
        send_lag: LatencyRecorder::default(),
        pace,
        reply_timeout: drain.max(Duration::from_millis(10)),
    });
    let progress = shared.run.progress("echo", "echoes", args.common.quiet);

    let start = Instant::now();
    let mut tasks = Vec::with_capacity(connected);
    for ws in std::mem::take(&mut opened.sockets) {
        let Some(ws) = ws else { continue };
        let id = tasks.len();
        let quota = args.load.quota(connected, id);
        let offset = match pace {
            // Stagger the connections over one interval so the total rate is smooth.
            Pace::Open { interval } => interval.mul_f64(id as f64 / connected as f64),
            Pace::Closed { .. } => Duration::ZERO,
        };
        tasks.push(tokio::spawn(connection(
            ws,
            id as u32,
            quota,
            offset,
            shared.clone(),
        )));
    }

    let run = &shared.run;
    let load_elapsed = run.end_load(start, duration).await;
    // Drain: wait for the outstanding echoes, up to --drain.
    let drain_deadline = Instant::now() + drain;
    let mut poll = tokio::time::interval(Duration::from_millis(5));
    loop {
        poll.tick().await;
        let writers_left = run.writers_active.load(Ordering::Acquire);
        let sent = run.live.sent.load(Ordering::Acquire);
        if (writers_left == 0 && run.arrived() >= sent) || Instant::now() >= drain_deadline {
            break;
        }
    }
    let outcomes = run
        .stop_and_join(tasks, progress, |why| ConnOutcome {
            error: Some(why),
            ..ConnOutcome::default()
        })
        .await;

    let mut total = SeqTracker::default();
    let (mut sent, mut corrupted, mut missing, mut unexpected) = (0u64, 0u64, 0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for o in &outcomes {
        sent += o.sent;
        corrupted += o.corrupted;
        missing += o.tracker.lost(o.sent);
        unexpected += o.tracker.unexpected(o.sent);
        total.add_counts(&o.tracker);
        if let Some(e) = &o.error {
            *errors.entry(e.clone()).or_insert(0) += 1;
        }
    }
    let checks = Checks::new(
        missing,
        corrupted,
        unexpected,
        total.duplicates,
        total.out_of_order,
    );
    let received = total.unique - unexpected;
    let latency = Percentiles::of(&run.latency.total());
    let lag = Percentiles::of(&shared.send_lag.total());

    let mut r = Report::new("echo");
    let mode = match pace {
        Pace::Closed { in_flight } => format!("closed loop, {in_flight} in flight per connection"),
        Pace::Open { .. } => format!("open loop at {} msg/s", rate.unwrap_or_default()),
    };
    r.line(format!(
        "echo {}: {connected}/{conns} connections, {} B {} messages, {mode}",
        target.url,
        args.size,
        if args.binary { "binary" } else { "text" }
    ));
    opened.report_to(&mut r);
    r.line(format!(
        "load        {:.2} s: sent {sent}, echoed {received}, {} echoes/s",
        load_elapsed.as_secs_f64(),
        report::per_second(received, load_elapsed)
    ));
    r.line(report::latency_line("rtt", &latency));
    if rate.is_some() {
        r.line(report::latency_line("send lag", &lag));
    }
    r.line(checks.line());
    report::connection_errors(&mut r, &errors);
    r.field("url", target.url.as_str());
    r.field("connections", connected as u64);
    r.field("size", args.size as u64);
    r.field("binary", args.binary);
    r.field("rate", json!(rate));
    r.field("in_flight", json!(rate.is_none().then_some(args.in_flight)));
    r.field("duration_s", report::seconds(load_elapsed));
    r.field("sent", sent);
    r.field("received", received);
    r.field("echoes_per_s", report::per_second(received, load_elapsed));
    r.field("rtt_us", report::latency_json(&latency));
    if rate.is_some() {
        r.field("send_lag_us", report::latency_json(&lag));
    }
    checks.report_to(&mut r);
    Ok(r)
}

/// One connection: a writer and a reader running together until the run stops them.
async fn connection(
    ws: net::Ws,
    id: u32,
    quota: u64,
    offset: Duration,
    shared: Arc<Shared>,
) -> ConnOutcome {
    let (mut sink, mut stream) = ws.split();
    let permits = Semaphore::new(match shared.pace {
        Pace::Closed { in_flight } => in_flight,
        Pace::Open { .. } => 0,
    });
    let writer = write_loop(&mut sink, id, quota, offset, &permits, &shared);
    let reader = read_loop(&mut stream, id, &permits, &shared);
    let ((sent, write_error), (tracker, corrupted, read_error)) = tokio::join!(writer, reader);
    // Close politely, without waiting long for a server that has stopped answering.
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    ConnOutcome {
        sent,
        tracker,
        corrupted,
        error: write_error.or(read_error),
    }
}

async fn write_loop<S>(
    sink: &mut S,
    id: u32,
    quota: u64,
    offset: Duration,
    permits: &Semaphore,
    shared: &Shared,
) -> (u64, Option<String>)
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let run = &shared.run;
    let mut sender = client::Sender::new(id, run);
    let mut error = None;
    let first_at = Instant::now() + offset;
    let mut lag = LocalLatency::default();
    // One timer per connection, re-armed only when it fires before its waiter's due time: a
    // fresh sleep per message cost two timer-wheel operations (a lock each) per echo.
    let give_up = tokio::time::sleep(shared.reply_timeout);
    tokio::pin!(give_up);
    'run: while sender.seq < quota {
        // How many messages to send now, and their timestamps.
        let (batch, scheduled_base) = match shared.pace {
            Pace::Closed { .. } => {
                // An echo that has not come back within --drain is taken as lost, and its slot
                // is reused, so that loss cannot stall a closed loop for the whole run.
                let waiting_since = Instant::now();
                loop {
                    tokio::select! {
                        biased;
                        _ = sender.stop_sending() => break 'run,
                        permit = permits.acquire() => match permit {
                            Ok(p) => {
                                p.forget();
                                break;
                            }
                            Err(_) => break 'run,
                        },
                        () = &mut give_up => {
                            let due = waiting_since + shared.reply_timeout;
                            if Instant::now() >= due {
                                break;
                            }
                            give_up.as_mut().reset(due.into());
                        }
                    }
                }
                let mut n = 1u64;
                while n < quota - sender.seq {
                    match permits.try_acquire() {
                        Ok(p) => {
                            p.forget();
                            n += 1;
                        }
                        Err(_) => break,
                    }
                }
                (n, None)
            }
            Pace::Open { interval } => match sender.due_batch(first_at, interval, quota).await {
                Some((n, due)) => (n, Some(due)),
                None => break 'run,
            },
        };
        let sent_ns = |i: u64| match (scheduled_base, shared.pace) {
            (Some(base), Pace::Open { interval }) => {
                let due = base + interval.mul_f64(i as f64);
                let now = Instant::now();
                lag.record(
                    &shared.send_lag,
                    micros_between(run.clock.ns_at(due), run.clock.ns_at(now)),
                    now,
                );
                run.clock.ns_at(latency_origin(due, now))
            }
            _ => run.clock.now_ns(),
        };
        let fed = || {
            run.live.sent.fetch_add(1, Ordering::Release);
        };
        if let ControlFlow::Break(why) = sender.send_batch(sink, batch, sent_ns, fed).await {
            error = why;
            break 'run;
        }
    }
    lag.flush(&shared.send_lag);
    run.writer_finished();
    (sender.seq, error)
}

async fn read_loop<S>(
    stream: &mut S,
    id: u32,
    permits: &Semaphore,
    shared: &Shared,
) -> (SeqTracker, u64, Option<String>)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let run = &shared.run;
    let mut tracker = SeqTracker::default();
    let mut tally = Tally::default();
    let error = client::read_stamps(stream, run, |frame, now| match frame {
        Ok(stamp) if stamp.id == id => {
            if tally.stamped(run, &mut tracker, &stamp, now).is_some() {
                permits.add_permits(1);
            }
        }
        _ => {
            tally.corrupted(run);
            permits.add_permits(1);
        }
    })
    .await;
    (tracker, tally.finish(run), error)
}

//! `bench broadcast`: C WebSocket connections spread round robin over R rooms of a relay
//! endpoint (every frame sent to a room reaches every member, sender included), S of them
//! sending stamped messages at a fixed rate. Every receiver tracks each sender's sequence, so
//! the run reports per-delivery latency (from the scheduled send time), deliveries/s, expected
//! against received deliveries, and duplicates and reordering per sender. With `--window W` the
//! senders run a closed loop instead: each keeps W of its frames in flight (sent, not yet back
//! to itself), as fast as they come back; latency is then counted from the actual send.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::client::{self, Checks, Run, Tally};
use super::report::{self, Report};
use super::stats::{Percentiles, SeqTracker, latency_origin};
use super::{BenchError, CommonArgs, LoadArgs, net};

/// `switchyard bench broadcast`
#[derive(Debug, Clone, Args)]
pub struct BroadcastArgs {
    /// Relay endpoint; `{room}` is replaced by each room's name (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws/relay/{room}/")]
    pub url: String,
    /// Connections, assigned to the rooms round robin.
    #[arg(long, short = 'c', default_value_t = 100)]
    pub connections: usize,
    /// Rooms.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Connections that send (the first S, so they spread over the rooms).
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
    /// Messages per second sent by each sender.
    #[arg(long, short = 'r', default_value_t = 10.0)]
    pub rate: f64,
    /// Closed loop: each sender keeps this many of its frames in flight (sent and not yet
    /// heard back by itself) and sends the next as one comes back; `--rate` is then ignored.
    /// Measures what the stack delivers at saturation without queues growing without bound.
    #[arg(long)]
    pub window: Option<u64>,
    /// Message size in bytes (at least the 49-byte header).
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// Send binary frames (default: text, which is what the relay consumer relays).
    #[arg(long)]
    pub binary: bool,
    /// Room names are PREFIX0, PREFIX1, ...; default: a fresh `bench<random>-` per run, so that
    /// a run never meets the members of an earlier one.
    #[arg(long)]
    pub room_prefix: Option<String>,
    /// Seconds to wait between opening the last connection and the first send.
    #[arg(long, default_value_t = 0.2)]
    pub settle: f64,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// State shared by every connection of one run.
#[derive(Debug)]
struct Shared {
    run: Run,
    rooms: usize,
    senders: usize,
    interval: Duration,
    /// `--window`, and per sender how many of its own frames it heard back.
    window: Option<u64>,
    heard: Vec<Heard>,
    /// Messages sent into each room so far.
    sent_in_room: Vec<AtomicU64>,
    /// Per sender, per sequence number: members reached and the slowest delivery so far (see
    /// [`slot_add`]), giving the latency to the last member of the room for each broadcast.
    slowest: Vec<Vec<AtomicU64>>,
}

/// A sender's own frames heard back, and the wake-up of its writer waiting for one.
#[derive(Debug, Default)]
struct Heard {
    count: AtomicU64,
    wake: tokio::sync::Notify,
}

/// What one connection saw (and sent, for senders).
#[derive(Debug, Default)]
struct ConnOutcome {
    room: usize,
    sender: Option<u32>,
    sent: u64,
    /// Per sender id.
    from: Vec<SeqTracker>,
    corrupted: u64,
    misrouted: u64,
    error: Option<String>,
}

pub(super) async fn run(args: BroadcastArgs) -> anyhow::Result<Report> {
    super::at_least_one("connections", args.connections)?;
    super::at_least_one("rooms", args.rooms)?;
    super::at_least_one("senders", args.senders)?;
    if args.senders > args.connections || args.rooms > args.connections {
        return Err(BenchError::Usage(format!(
            "--senders ({}) and --rooms ({}) cannot exceed --connections ({})",
            args.senders, args.rooms, args.connections
        ))
        .into());
    }
    client::check_size(args.size)?;
    if !args.url.contains("{room}") {
        return Err(
            BenchError::Usage(format!("--url must contain {{room}}, got {:?}", args.url)).into(),
        );
    }
    let rate = super::positive_rate("rate", args.rate)?;
    if args.window == Some(0) {
        return Err(BenchError::Usage("--window must be at least 1".into()).into());
    }
    let duration = super::seconds("duration", args.load.duration)?;
    let drain = super::seconds("drain", args.load.drain)?;
    let settle = super::seconds("settle", args.settle)?;
    let prefix = args.room_prefix.clone().unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("bench{:x}-", (nanos ^ std::process::id()) & 0xff_ffff)
    });
    let rooms: Vec<String> = (0..args.rooms).map(|r| format!("{prefix}{r}")).collect();
    let targets = rooms
        .iter()
        .map(|room| net::parse_target(&args.url.replace("{room}", room), &["ws"]))
        .collect::<Result<Vec<_>, _>>()?;
    net::raise_fd_limit(args.connections as u64 + 64);

    let conns = args.connections;
    if !args.common.quiet {
        eprintln!(
            "bench broadcast: opening {conns} connections over {} rooms ({})",
            args.rooms,
            args.url.replace("{room}", &format!("{prefix}N"))
        );
    }
    let room_count = args.rooms;
    let mut opened = super::open_websockets(
        Arc::new(targets),
        |i| i % room_count,
        conns,
        &args.common,
        net::ws_config(args.size),
    )
    .await?;
    let mut members = vec![0u64; args.rooms];
    for (i, s) in opened.sockets.iter().enumerate() {
        if s.is_some() {
            members[i % args.rooms] += 1;
        }
    }
    tokio::time::sleep(settle).await;

    let senders_connected = opened.sockets[..args.senders]
        .iter()
        .filter(|s| s.is_some())
        .count();
    let shared = Arc::new(Shared {
        run: Run::new(senders_connected, args.size, args.binary),
        rooms: args.rooms,
        senders: args.senders,
        interval: Duration::from_secs_f64(1.0 / rate),
        window: args.window,
        heard: (0..args.senders).map(|_| Heard::default()).collect(),
        sent_in_room: (0..args.rooms).map(|_| AtomicU64::new(0)).collect(),
        slowest: {
            let per_sender = tracked_broadcasts(rate, duration, args.load.count, args.senders);
            (0..args.senders)
                .map(|_| (0..per_sender).map(|_| AtomicU64::new(0)).collect())
                .collect()
        },
    });
    let progress = shared
        .run
        .progress("broadcast", "deliveries", args.common.quiet);

    let start = Instant::now();
    let mut tasks = Vec::new();
    for (index, ws) in std::mem::take(&mut opened.sockets).into_iter().enumerate() {
        let Some(ws) = ws else { continue };
        let sender = (index < args.senders).then_some(index as u32);
        let quota = sender.map_or(u64::MAX, |s| args.load.quota(args.senders, s as usize));
        // Stagger the senders over one interval.
        let offset = shared
            .interval
            .mul_f64(index as f64 / args.senders.max(1) as f64);
        tasks.push(tokio::spawn(connection(
            ws,
            index % args.rooms,
            sender,
            quota,
            offset,
            shared.clone(),
        )));
    }

    let run = &shared.run;
    let load_elapsed = run.end_load(start, duration).await;
    // Senders stop promptly once told; their final counts fix the expected deliveries.
    let mut poll = tokio::time::interval(Duration::from_millis(5));
    let writers_deadline = Instant::now() + Duration::from_secs(5);
    while run.writers_active.load(Ordering::Acquire) > 0 && Instant::now() < writers_deadline {
        poll.tick().await;
    }
    let drain_deadline = Instant::now() + drain;
    loop {
        poll.tick().await;
        let expected = expected_deliveries(&shared, &members);
        if run.arrived() >= expected || Instant::now() >= drain_deadline {
            break;
        }
    }
    let outcomes = run
        .stop_and_join(tasks, progress, |why| ConnOutcome {
            error: Some(why),
            ..ConnOutcome::default()
        })
        .await;

    // Per sender: what it sent, and what every member of its room received from it.
    let mut sent_by = vec![0u64; args.senders];
    for o in &outcomes {
        if let Some(s) = o.sender {
            sent_by[s as usize] = o.sent;
        }
    }
    let room_of: Vec<usize> = (0..args.senders).map(|s| s % args.rooms).collect();
    let mut per_sender = vec![SeqTracker::default(); args.senders];
    let mut lost_by = vec![0u64; args.senders];
    let mut unexpected_by = vec![0u64; args.senders];
    let (mut corrupted, mut misrouted) = (0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for o in &outcomes {
        corrupted += o.corrupted;
        misrouted += o.misrouted;
        if let Some(e) = &o.error {
            *errors.entry(e.clone()).or_insert(0) += 1;
        }
        for (s, tracker) in o.from.iter().enumerate() {
            per_sender[s].add_counts(tracker);
            unexpected_by[s] += tracker.unexpected(sent_by[s]);
        }
        // Every member of a sender's room should have had all its messages.
        for s in 0..args.senders {
            if room_of[s] == o.room {
                lost_by[s] += o.from.get(s).map_or(sent_by[s], |t| t.lost(sent_by[s]));
            }
        }
    }
    let expected: u64 = (0..args.senders)
        .map(|s| sent_by[s] * members[room_of[s]])
        .sum();
    let unexpected: u64 = unexpected_by.iter().sum();
    let received: u64 = per_sender.iter().map(|t| t.unique).sum::<u64>() - unexpected;
    let checks = Checks {
        misrouted: Some(misrouted),
        ..Checks::new(
            lost_by.iter().sum(),
            corrupted,
            unexpected,
            per_sender.iter().map(|t| t.duplicates).sum(),
            per_sender.iter().map(|t| t.out_of_order).sum(),
        )
    };
    let sent: u64 = sent_by.iter().sum();
    let latency = Percentiles::of(&run.latency.total());
    // Latency to the last member, over the broadcasts every member received.
    let mut last_hist = super::stats::new_histogram();
    // Which broadcast was the slowest to reach its whole room (sender, its n-th send from 0,
    // µs): tells a warm-up or a one-off stall from a steady cost.
    let mut slowest_broadcast: Option<(usize, usize, u64)> = None;
    for (s, slots) in shared.slowest.iter().enumerate() {
        let members_of = members[room_of[s]];
        for (i, slot) in slots.iter().take(sent_by[s] as usize).enumerate() {
            let (reached, slowest) = slot_read(slot);
            if reached == members_of {
                last_hist.saturating_record(slowest);
                if slowest_broadcast.is_none_or(|(_, _, worst)| slowest > worst) {
                    slowest_broadcast = Some((s, i, slowest));
                }
            }
        }
    }
    let last = Percentiles::of(&last_hist);

    let mut r = Report::new("broadcast");
    let pace = match args.window {
        Some(w) => format!("closed loop, {w} in flight each"),
        None => format!("at {rate} msg/s"),
    };
    r.line(format!(
        "broadcast {}: {} connections over {} rooms ({} members max), {} senders {pace}, {} B {}",
        args.url,
        members.iter().sum::<u64>(),
        args.rooms,
        members.iter().max().copied().unwrap_or(0),
        args.senders,
        args.size,
        if args.binary { "binary" } else { "text" }
    ));
    opened.report_to(&mut r);
    r.line(format!(
        "load        {:.2} s: sent {sent}, deliveries expected {expected}, received {received}, {} deliveries/s",
        load_elapsed.as_secs_f64(),
        report::per_second(received, load_elapsed)
    ));
    r.line(report::latency_line("delivery", &latency));
    r.line(report::latency_line("last member", &last));
    if let Some((sender, index, micros)) = slowest_broadcast {
        r.line(format!(
            "{:<14} broadcast {index} of sender {sender}: last member after {micros} µs",
            "slowest"
        ));
    }
    r.line(checks.line());
    let mut senders_json = Vec::with_capacity(args.senders);
    for s in 0..args.senders {
        let t = &per_sender[s];
        let exp = sent_by[s] * members[room_of[s]];
        if t.duplicates + t.out_of_order + lost_by[s] > 0 {
            r.line(format!(
                "  sender {s} (room {}): sent {}, expected {exp}, lost {}, duplicates {}, out of order {}",
                room_of[s], sent_by[s], lost_by[s], t.duplicates, t.out_of_order
            ));
        }
        senders_json.push(json!({
            "sender": s,
            "room": room_of[s],
            "sent": sent_by[s],
            "expected": exp,
            "received": t.unique - unexpected_by[s],
            "lost": lost_by[s],
            "duplicates": t.duplicates,
            "out_of_order": t.out_of_order,
        }));
    }
    report::connection_errors(&mut r, &errors);
    r.field("url", args.url.as_str());
    r.field("connections", members.iter().sum::<u64>());
    r.field("rooms", args.rooms as u64);
    r.field("members", json!(members));
    r.field("senders", args.senders as u64);
    r.field("rate", rate);
    r.field(
        "window",
        args.window.map_or(serde_json::Value::Null, |w| json!(w)),
    );
    r.field("size", args.size as u64);
    r.field("binary", args.binary);
    r.field("duration_s", report::seconds(load_elapsed));
    r.field("sent", sent);
    r.field("expected", expected);
    r.field("received", received);
    r.field(
        "deliveries_per_s",
        report::per_second(received, load_elapsed),
    );
    r.field("latency_us", report::latency_json(&latency));
    r.field("last_member_latency_us", report::latency_json(&last));
    r.field(
        "slowest_broadcast",
        slowest_broadcast.map_or(serde_json::Value::Null, |(sender, index, micros)| {
            json!({"sender": sender, "index": index, "last_member_us": micros})
        }),
    );
    r.field("per_sender", json!(senders_json));
    checks.report_to(&mut r);
    Ok(r)
}

/// How many broadcasts per sender get a last-member latency slot: the run's expected sends with
/// room to spare, capped so the table stays under ~128 MiB whatever the flags.
fn tracked_broadcasts(rate: f64, duration: Duration, count: Option<u64>, senders: usize) -> usize {
    let by_time = rate * duration.as_secs_f64() * 1.2 + 1024.0;
    let by_count = count.map_or(f64::MAX, |n| {
        (n as f64 / senders.max(1) as f64).ceil() + 1.0
    });
    let cap = f64::from(16u32 << 20) / senders.max(1) as f64;
    by_time.min(by_count).min(cap).max(1.0) as usize
}

/// A last-member slot packs the members reached (high 24 bits) and the slowest delivery's
/// latency in µs (low 40 bits) into one word, so each delivery costs one atomic update.
const LATENCY_BITS: u32 = 40;
const LATENCY_MASK: u64 = (1 << LATENCY_BITS) - 1;

fn slot_add(slot: &AtomicU64, micros: u64) {
    let micros = micros.min(LATENCY_MASK);
    let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        let count = (v >> LATENCY_BITS) + 1;
        Some((count << LATENCY_BITS) | (v & LATENCY_MASK).max(micros))
    });
}

/// (members reached, slowest latency µs) of a slot.
fn slot_read(slot: &AtomicU64) -> (u64, u64) {
    let v = slot.load(Ordering::Acquire);
    (v >> LATENCY_BITS, v & LATENCY_MASK)
}

/// Deliveries owed so far: each room's sent count times its members.
fn expected_deliveries(shared: &Shared, members: &[u64]) -> u64 {
    shared
        .sent_in_room
        .iter()
        .zip(members)
        .map(|(sent, m)| sent.load(Ordering::Acquire) * m)
        .sum()
}

async fn connection(
    mut ws: net::Ws,
    room: usize,
    sender: Option<u32>,
    quota: u64,
    offset: Duration,
    shared: Arc<Shared>,
) -> ConnOutcome {
    let ((sent, write_error), (from, corrupted, misrouted, read_error)) = match sender {
        // Most members only read: no split halves, whose shared lock every read would take.
        None => {
            let read = read_loop(&mut ws, room, None, &shared).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            ((0, None), read)
        }
        Some(id) => {
            let (mut sink, mut stream) = ws.split();
            let outcome = tokio::join!(
                write_loop(&mut sink, id, quota, offset, &shared),
                read_loop(&mut stream, room, Some(id), &shared)
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
            outcome
        }
    };
    ConnOutcome {
        room,
        sender,
        sent,
        from,
        corrupted,
        misrouted,
        error: write_error.or(read_error),
    }
}

async fn write_loop<S>(
    sink: &mut S,
    id: u32,
    quota: u64,
    offset: Duration,
    shared: &Shared,
) -> (u64, Option<String>)
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let run = &shared.run;
    let mut sender = client::Sender::new(id, run);
    let first_at = Instant::now() + offset;
    let mut error = None;
    'run: while sender.seq < quota {
        let batch = match shared.window {
            Some(window) => {
                let heard = &shared.heard[id as usize];
                loop {
                    let in_flight =
                        sender.seq - heard.count.load(Ordering::Acquire).min(sender.seq);
                    if in_flight < window {
                        break (window - in_flight).min(quota - sender.seq);
                    }
                    tokio::select! {
                        biased;
                        () = sender.stop_sending() => break 'run,
                        () = heard.wake.notified() => {}
                    }
                }
            }
            None => match sender.due_batch(first_at, shared.interval, quota).await {
                Some((batch, _)) => batch,
                None => break 'run,
            },
        };
        let first_seq = sender.seq;
        let closed_loop = shared.window.is_some();
        let sent_ns = |i: u64| {
            let now = Instant::now();
            if closed_loop {
                return run.clock.ns_at(now);
            }
            let scheduled = first_at + shared.interval.mul_f64((first_seq + i) as f64);
            run.clock.ns_at(latency_origin(scheduled, now))
        };
        let fed = || {
            run.live.sent.fetch_add(1, Ordering::Relaxed);
            shared.sent_in_room[id as usize % shared.rooms].fetch_add(1, Ordering::Release);
        };
        if let ControlFlow::Break(why) = sender.send_batch(sink, batch, sent_ns, fed).await {
            error = why;
            break 'run;
        }
    }
    run.writer_finished();
    (sender.seq, error)
}

async fn read_loop<S>(
    stream: &mut S,
    room: usize,
    own: Option<u32>,
    shared: &Shared,
) -> (Vec<SeqTracker>, u64, u64, Option<String>)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let run = &shared.run;
    let mut from = vec![SeqTracker::default(); shared.senders];
    let mut misrouted = 0u64;
    let mut tally = Tally::default();
    let error = client::read_stamps(stream, run, |frame, now| match frame {
        Ok(stamp) if (stamp.id as usize) < shared.senders => {
            let sender = stamp.id as usize;
            if own == Some(stamp.id) && shared.window.is_some() {
                let heard = &shared.heard[sender];
                heard.count.fetch_add(1, Ordering::AcqRel);
                heard.wake.notify_one();
            }
            if sender % shared.rooms != room {
                misrouted += 1;
                run.live.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // The slots are bounded (see `tracked_broadcasts`): a broadcast past them goes
            // without a last-member latency.
            if let Some(us) = tally.stamped(run, &mut from[sender], &stamp, now)
                && let Some(slot) = usize::try_from(stamp.seq)
                    .ok()
                    .and_then(|seq| shared.slowest[sender].get(seq))
            {
                slot_add(slot, us);
            }
        }
        _ => tally.corrupted(run),
    })
    .await;
    (from, tally.finish(run), misrouted, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_member_slots_count_and_keep_the_slowest() {
        let slot = AtomicU64::new(0);
        assert_eq!(slot_read(&slot), (0, 0));
        for us in [30, 500, 20] {
            slot_add(&slot, us);
        }
        assert_eq!(slot_read(&slot), (3, 500));
        slot_add(&slot, u64::MAX);
        assert_eq!(slot_read(&slot), (4, LATENCY_MASK));
    }

    #[test]
    fn tracked_broadcasts_are_bounded() {
        let d = Duration::from_secs(10);
        assert_eq!(tracked_broadcasts(100.0, d, None, 1), 2224);
        assert_eq!(tracked_broadcasts(100.0, d, Some(300), 3), 101);
        assert!(tracked_broadcasts(1e9, d, None, 4) <= 4 << 20);
    }
}

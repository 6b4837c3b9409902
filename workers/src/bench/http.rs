//! `bench http`: HTTP/1.1 keep-alive load. C connections each send one pre-built GET (or POST
//! with --body-size) request at a time, closed loop or at a fixed total rate (latency from the
//! scheduled send time), parse the response (Content-Length, chunked, or until close) with
//! httparse, and count statuses and errors by kind. A connection that breaks is reopened.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use clap::Args;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::report::{self, Live, Report};
use super::stats::{
    Clock, LatencyRecorder, LocalLatency, Percentiles, latency_origin, micros_between, wake_for,
};
use super::{CommonArgs, LoadArgs, net};

/// `switchyard bench http`
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// URL to request (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8000/")]
    pub url: String,
    /// Keep-alive connections.
    #[arg(long, short = 'c', default_value_t = 10)]
    pub connections: usize,
    /// Open loop: total requests per second over all connections (latency from each request's
    /// scheduled send time). Without it, closed loop: each connection sends as fast as it gets
    /// answers.
    #[arg(long, short = 'r')]
    pub rate: Option<f64>,
    /// POST a body of this many bytes instead of GET.
    #[arg(long)]
    pub body_size: Option<usize>,
    /// Seconds a single response may take before it counts as a timeout.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug)]
struct Shared {
    clock: Clock,
    latency: Arc<LatencyRecorder>,
    send_lag: LatencyRecorder,
    live: Arc<Live>,
    request: Bytes,
    target: net::Target,
    spread: u8,
    timeout: Duration,
    interval: Option<Duration>,
    stop_sending: CancellationToken,
    stop_all: CancellationToken,
    active: AtomicUsize,
    all_done: Notify,
}

#[derive(Debug, Default)]
struct ConnOutcome {
    sent: u64,
    completed: u64,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    reconnects: u64,
}

/// Why one request did not get a response.
#[derive(Debug)]
struct RequestError(String);

pub(super) async fn run(args: HttpArgs) -> anyhow::Result<Report> {
    super::at_least_one("connections", args.connections)?;
    let duration = super::seconds("duration", args.load.duration)?;
    let drain = super::seconds("drain", args.load.drain)?;
    let timeout = super::seconds("timeout", args.timeout)?;
    let rate = args
        .rate
        .map(|r| super::positive_rate("rate", r))
        .transpose()?;
    let target = net::parse_target(&args.url, &["http"])?;
    net::raise_fd_limit(args.connections as u64 + 64);
    let request = build_request(&target, args.body_size);
    let conns = args.connections;
    let shared = Arc::new(Shared {
        clock: Clock::start(),
        latency: Arc::new(LatencyRecorder::default()),
        send_lag: LatencyRecorder::default(),
        live: Arc::new(Live::default()),
        request,
        target: target.clone(),
        spread: args.common.source_addrs,
        timeout,
        interval: rate.map(|r| Duration::from_secs_f64(conns as f64 / r)),
        stop_sending: CancellationToken::new(),
        stop_all: CancellationToken::new(),
        active: AtomicUsize::new(conns),
        all_done: Notify::new(),
    });
    let progress = report::Progress::start(
        "http",
        "responses",
        &shared.live,
        &shared.latency,
        args.common.quiet,
    );
    if !args.common.quiet {
        eprintln!(
            "bench http: {conns} connections, {} {}",
            if args.body_size.is_some() {
                "POST"
            } else {
                "GET"
            },
            target.url
        );
    }

    let start = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    for index in 0..conns {
        let quota = args.load.quota(conns, index);
        let offset = shared
            .interval
            .map(|i| i.mul_f64(index as f64 / conns as f64))
            .unwrap_or_default();
        tasks.push(tokio::spawn(connection(
            index,
            quota,
            offset,
            shared.clone(),
        )));
    }
    let load_elapsed = super::end_load(
        &shared.active,
        &shared.all_done,
        &shared.stop_sending,
        start,
        duration,
    )
    .await;
    // Requests in flight get --drain to finish.
    let drain_deadline = tokio::time::Instant::now() + drain;
    super::wait_until_idle(&shared.active, &shared.all_done, drain_deadline).await;
    shared.stop_all.cancel();
    let outcomes = super::join_all(tasks, |e| ConnOutcome {
        errors: BTreeMap::from([(format!("task: {e}"), 1)]),
        ..ConnOutcome::default()
    })
    .await;
    let mut total = ConnOutcome::default();
    for o in outcomes {
        total.sent += o.sent;
        total.completed += o.completed;
        total.reconnects += o.reconnects;
        for (k, v) in o.statuses {
            *total.statuses.entry(k).or_insert(0) += v;
        }
        for (k, v) in o.errors {
            *total.errors.entry(k).or_insert(0) += v;
        }
    }
    progress.stop().await;

    let latency = Percentiles::of(&shared.latency.total());
    let lag = Percentiles::of(&shared.send_lag.total());
    let errors: u64 = total.errors.values().sum();
    let bad_status: u64 = total
        .statuses
        .iter()
        .filter(|(s, _)| **s >= 400)
        .map(|(_, n)| n)
        .sum();
    let statuses: BTreeMap<String, u64> = total
        .statuses
        .iter()
        .map(|(s, n)| (s.to_string(), *n))
        .collect();
    let mut r = Report::new("http");
    r.line(format!(
        "http {} {}: {conns} connections, {}",
        if args.body_size.is_some() {
            "POST"
        } else {
            "GET"
        },
        target.url,
        match rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".to_owned(),
        }
    ));
    r.line(format!(
        "load        {:.2} s: sent {}, completed {}, {} req/s, reconnects {}",
        load_elapsed.as_secs_f64(),
        total.sent,
        total.completed,
        report::per_second(total.completed, load_elapsed),
        total.reconnects
    ));
    r.line(report::latency_line("latency", &latency));
    if rate.is_some() {
        r.line(report::latency_line("send lag", &lag));
    }
    r.line(format!("status      {}", report::kinds_text(&statuses)));
    r.line(format!("errors      {}", report::kinds_text(&total.errors)));
    r.field("url", target.url.as_str());
    r.field(
        "method",
        if args.body_size.is_some() {
            "POST"
        } else {
            "GET"
        },
    );
    r.field("body_size", json!(args.body_size));
    r.field("connections", conns as u64);
    r.field("rate", json!(rate));
    r.field("duration_s", report::seconds(load_elapsed));
    r.field("sent", total.sent);
    r.field("completed", total.completed);
    r.field(
        "requests_per_s",
        report::per_second(total.completed, load_elapsed),
    );
    r.field("reconnects", total.reconnects);
    r.field("status", report::kinds_json(&statuses));
    r.field("errors", report::kinds_json(&total.errors));
    r.field("latency_us", report::latency_json(&latency));
    if rate.is_some() {
        r.field("send_lag_us", report::latency_json(&lag));
    }
    r.must_be_zero("request errors", errors);
    r.must_be_zero("responses with status >= 400", bad_status);
    Ok(r)
}

/// The request every connection sends, built once.
fn build_request(target: &net::Target, body_size: Option<usize>) -> Bytes {
    let mut req = Vec::with_capacity(256 + body_size.unwrap_or(0));
    match body_size {
        None => req.extend_from_slice(
            format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: switchyard-bench\r\nAccept: */*\r\n\r\n",
                target.path, target.authority
            )
            .as_bytes(),
        ),
        Some(n) => {
            req.extend_from_slice(
                format!(
                    "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: switchyard-bench\r\nAccept: */*\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n",
                    target.path, target.authority
                )
                .as_bytes(),
            );
            req.extend((0..n).map(|i| b'a' + (i % 26) as u8));
        }
    }
    Bytes::from(req)
}

async fn connection(
    index: usize,
    quota: u64,
    offset: Duration,
    shared: Arc<Shared>,
) -> ConnOutcome {
    let mut out = ConnOutcome::default();
    let mut stream: Option<TcpStream> = None;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut latency = LocalLatency::default();
    let mut lag = LocalLatency::default();
    let first_at = Instant::now() + offset;
    let mut seq = 0u64;
    while seq < quota && !shared.stop_sending.is_cancelled() {
        let scheduled = match shared.interval {
            Some(interval) => {
                let due = first_at + interval.mul_f64(seq as f64);
                tokio::select! {
                    biased;
                    _ = shared.stop_sending.cancelled() => break,
                    _ = tokio::time::sleep_until(wake_for(due).into()) => {}
                }
                let now = Instant::now();
                lag.record(
                    &shared.send_lag,
                    micros_between(shared.clock.ns_at(due), shared.clock.ns_at(now)),
                    now,
                );
                latency_origin(due, now)
            }
            None => Instant::now(),
        };
        seq += 1;
        if stream.is_none() {
            if out.sent > 0 {
                out.reconnects += 1;
            }
            match net::connect_tcp(shared.target.addr, index, shared.spread).await {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    *out.errors
                        .entry(format!("connect_{}", net::io_kind(&e)))
                        .or_insert(0) += 1;
                    shared.live.errors.fetch_add(1, Ordering::Relaxed);
                    // Don't spin on a server that refuses connections.
                    tokio::select! {
                        _ = shared.stop_sending.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            }
        }
        let Some(conn) = stream.as_mut() else {
            continue;
        };
        out.sent += 1;
        shared.live.sent.fetch_add(1, Ordering::Relaxed);
        let exchange =
            tokio::time::timeout(shared.timeout, exchange(conn, &shared.request, &mut buf));
        let result = tokio::select! {
            biased;
            _ = shared.stop_all.cancelled() => {
                *out.errors.entry("unfinished".to_owned()).or_insert(0) += 1;
                break;
            }
            r = exchange => r.unwrap_or_else(|_| Err(RequestError("timeout".to_owned()))),
        };
        match result {
            Ok((status, keep_alive)) => {
                let now = Instant::now();
                latency.record(
                    &shared.latency,
                    micros_between(shared.clock.ns_at(scheduled), shared.clock.ns_at(now)),
                    now,
                );
                out.completed += 1;
                *out.statuses.entry(status).or_insert(0) += 1;
                shared.live.done.fetch_add(1, Ordering::Relaxed);
                if status >= 400 {
                    shared.live.errors.fetch_add(1, Ordering::Relaxed);
                }
                if !keep_alive {
                    stream = None;
                    buf.clear();
                }
            }
            Err(RequestError(kind)) => {
                *out.errors.entry(kind).or_insert(0) += 1;
                shared.live.errors.fetch_add(1, Ordering::Relaxed);
                stream = None;
                buf.clear();
            }
        }
    }
    latency.flush(&shared.latency);
    lag.flush(&shared.send_lag);
    if shared.active.fetch_sub(1, Ordering::AcqRel) == 1 {
        shared.all_done.notify_one();
    }
    out
}

/// Sends the request and reads one whole response; returns its status and whether the
/// connection stays usable.
async fn exchange(
    conn: &mut TcpStream,
    request: &[u8],
    buf: &mut BytesMut,
) -> Result<(u16, bool), RequestError> {
    conn.write_all(request)
        .await
        .map_err(|e| RequestError(format!("write_{}", net::io_kind(&e))))?;
    loop {
        if let Some(parsed) = parse_response(buf)? {
            let Parsed {
                status,
                head_len,
                body,
                keep_alive,
            } = parsed;
            match body {
                Body::Length(n) => {
                    if buf.len() >= head_len + n {
                        buf.advance(head_len + n);
                        return Ok((status, keep_alive));
                    }
                }
                Body::Chunked => {
                    if let Some(n) = chunked_len(&buf[head_len..])? {
                        buf.advance(head_len + n);
                        return Ok((status, keep_alive));
                    }
                }
                Body::UntilClose => {}
            }
            if read_more(conn, buf).await? == 0 {
                return match body {
                    Body::UntilClose => {
                        buf.clear();
                        Ok((status, false))
                    }
                    _ => Err(RequestError("closed_mid_response".to_owned())),
                };
            }
            continue;
        }
        if read_more(conn, buf).await? == 0 {
            return Err(RequestError("closed".to_owned()));
        }
    }
}

/// Reads what the connection has into `buf` (growing it by 16 KiB when under 4 KiB is free);
/// 0 at end of stream.
async fn read_more(conn: &mut TcpStream, buf: &mut BytesMut) -> Result<usize, RequestError> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    conn.read_buf(buf)
        .await
        .map_err(|e| RequestError(format!("read_{}", net::io_kind(&e))))
}

#[derive(Debug, PartialEq, Eq)]
enum Body {
    Length(usize),
    Chunked,
    UntilClose,
}

#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    status: u16,
    head_len: usize,
    body: Body,
    keep_alive: bool,
}

/// Parses the response head in `buf`, or `None` when it is not complete yet.
fn parse_response(buf: &[u8]) -> Result<Option<Parsed>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(RequestError(format!("bad_response ({e})"))),
    };
    let status = response.code.unwrap_or(0);
    let mut keep_alive = response.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| RequestError("bad_content_length".to_owned()))?;
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h
                .value
                .split(|b| *b == b',')
                .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        Body::Length(0)
    } else if chunked {
        Body::Chunked
    } else if let Some(n) = length {
        Body::Length(n)
    } else {
        keep_alive = false;
        Body::UntilClose
    };
    Ok(Some(Parsed {
        status,
        head_len,
        body,
        keep_alive,
    }))
}

/// Length of a complete chunked body at the start of `data` (trailers included), or `None`
/// when more data is needed.
fn chunked_len(data: &[u8]) -> Result<Option<usize>, RequestError> {
    let bad = || RequestError("bad_chunked_body".to_owned());
    let mut pos = 0;
    loop {
        let Some(line_end) = find_crlf(&data[pos..]) else {
            return Ok(None);
        };
        let line = &data[pos..pos + line_end];
        let digits = line
            .split(|b| *b == b';')
            .next()
            .unwrap_or(line)
            .trim_ascii();
        let size = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| usize::from_str_radix(d, 16).ok())
            .ok_or_else(bad)?;
        pos += line_end + 2;
        if size == 0 {
            // Trailer lines, then an empty line.
            loop {
                let Some(end) = find_crlf(&data[pos..]) else {
                    return Ok(None);
                };
                pos += end + 2;
                if end == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        if data.len() < pos + size + 2 {
            return Ok(None);
        }
        if &data[pos + size..pos + size + 2] != b"\r\n" {
            return Err(bad());
        }
        pos += size + 2;
    }
}

fn find_crlf(data: &[u8]) -> Option<usize> {
    data.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_response() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let p = parse_response(head).unwrap().unwrap();
        assert_eq!(p.status, 200);
        assert_eq!(p.body, Body::Length(5));
        assert_eq!(p.head_len, head.len() - 5);
        assert!(p.keep_alive);
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Le")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn connection_close_and_http10() {
        let p = parse_response(b"HTTP/1.1 503 X\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((p.status, p.keep_alive), (503, false));
        let p = parse_response(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!((p.body, p.keep_alive), (Body::UntilClose, false));
        let p = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.body, Body::Length(0));
    }

    #[test]
    fn chunked_bodies() {
        let p = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.body, Body::Chunked);
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nNEXT";
        assert_eq!(chunked_len(body).unwrap(), Some(body.len() - 4));
        let trailers = b"1\r\na\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(chunked_len(trailers).unwrap(), Some(trailers.len()));
        for cut in 0..body.len() - 4 {
            assert_eq!(chunked_len(&body[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(chunked_len(b"zz\r\n").is_err());
        assert!(chunked_len(b"2\r\nabc\r\n").is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_response(b"NOT HTTP\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
    }

    #[test]
    fn requests_are_built_once() {
        let t = net::parse_target("http://127.0.0.1:8000/a?b=1", &["http"]).unwrap();
        let get = build_request(&t, None);
        assert!(get.starts_with(b"GET /a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"));
        assert!(get.ends_with(b"\r\n\r\n"));
        let post = build_request(&t, Some(10));
        assert!(post.starts_with(b"POST /a?b=1 HTTP/1.1\r\n"));
        assert!(post.ends_with(b"\r\n\r\nabcdefghij"));
    }
}

//! What a bench run shows: the progress line printed to stderr every second while it runs, and
//! the final report: readable lines, then one JSON object on a single line for scripts.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::stats::{LatencyRecorder, Percentiles};

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Readable summary lines.
    pub lines: Vec<String>,
    /// Every figure, as one JSON object (`mode` and `ok` included).
    pub json: Map<String, Value>,
    /// Whether the correctness counters are all clean (no loss, corruption, errors...).
    pub ok: bool,
    /// Why `ok` is false, one reason per entry.
    pub problems: Vec<String>,
}

impl Report {
    /// An empty report for `mode`.
    pub fn new(mode: &str) -> Self {
        let mut json = Map::new();
        json.insert("mode".into(), json!(mode));
        Report {
            lines: Vec::new(),
            json,
            ok: true,
            problems: Vec::new(),
        }
    }

    /// Adds a readable line.
    pub fn line(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    /// Sets a JSON field.
    pub fn field(&mut self, key: &str, value: impl Into<Value>) {
        self.json.insert(key.to_owned(), value.into());
    }

    /// Marks the run as failed when `count` is not zero.
    pub fn must_be_zero(&mut self, what: &str, count: u64) {
        if count != 0 {
            self.ok = false;
            self.problems.push(format!("{count} {what}"));
        }
    }

    /// The final JSON line (without the newline).
    pub fn json_line(&self) -> String {
        let mut obj = self.json.clone();
        obj.insert("ok".into(), json!(self.ok));
        Value::Object(obj).to_string()
    }

    /// Writes the readable summary, then the JSON line.
    pub fn write_to(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for line in &self.lines {
            writeln!(out, "{line}")?;
        }
        if !self.ok {
            writeln!(out, "FAILED: {}", self.problems.join(", "))?;
        }
        writeln!(out, "{}", self.json_line())?;
        out.flush()
    }
}

/// The connection errors by kind: a line when there were any, the `errors` field, the check.
pub fn connection_errors(r: &mut Report, errors: &BTreeMap<String, u64>) {
    if !errors.is_empty() {
        r.line(format!("connection errors: {}", kinds_text(errors)));
    }
    r.field("errors", kinds_json(errors));
    r.must_be_zero("connection errors", errors.values().sum());
}

/// A readable line of latency percentiles (µs).
pub fn latency_line(label: &str, p: &Percentiles) -> String {
    format!(
        "{label:<14} p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs  (mean {} µs, n={})",
        p.p50, p.p90, p.p99, p.p999, p.max, p.mean, p.count
    )
}

/// Percentiles as a JSON object.
pub fn latency_json(p: &Percentiles) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

/// Failure counts by kind, as a JSON object.
pub fn kinds_json(kinds: &BTreeMap<String, u64>) -> Value {
    Value::Object(kinds.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

/// Failure counts by kind, readable (`refused 3, timeout 1`), or `none`.
pub fn kinds_text(kinds: &BTreeMap<String, u64>) -> String {
    if kinds.is_empty() {
        return "none".to_owned();
    }
    kinds
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A per-second rate, rounded to one decimal.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    (count as f64 / secs * 10.0).round() / 10.0
}

/// CPU seconds (user, system) this process has used so far, from /proc/self/stat; `None` where
/// that file is missing or unreadable.
pub fn process_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu(&stat)
}

fn parse_cpu(stat: &str) -> Option<(f64, f64)> {
    // Fields after the parenthesised command name start at field 3 (state); utime and stime are
    // fields 14 and 15, in USER_HZ ticks, which Linux fixes at 100 per second for /proc.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let sys: u64 = fields.next()?.parse().ok()?;
    Some((user as f64 / 100.0, sys as f64 / 100.0))
}

impl Report {
    /// Adds the CPU this process used between `before` and now over `wall` time, so a reader
    /// can tell whether the load generator itself was the bottleneck.
    pub fn add_client_cpu(&mut self, before: Option<(f64, f64)>, wall: Duration) {
        let (Some((u0, s0)), Some((u1, s1))) = (before, process_cpu()) else {
            return;
        };
        let (user, sys) = (
            ((u1 - u0) * 100.0).round() / 100.0,
            ((s1 - s0) * 100.0).round() / 100.0,
        );
        let share = if wall.as_secs_f64() > 0.0 {
            ((user + sys) / wall.as_secs_f64() * 100.0).round()
        } else {
            0.0
        };
        self.line(format!(
            "client cpu  user {user:.2} s, sys {sys:.2} s ({share}% of one core over {:.1} s)",
            wall.as_secs_f64()
        ));
        self.field("client_cpu_s", json!({"user": user, "sys": sys}));
    }
}

/// Seconds, rounded to the millisecond, for the JSON line.
pub fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Counters the progress line reads while the run goes on.
#[derive(Debug, Default)]
pub struct Live {
    /// Messages or requests sent (or connection attempts).
    pub sent: AtomicU64,
    /// Replies, deliveries or successful connections.
    pub done: AtomicU64,
    /// Errors of any kind (corrupted, failed, ...).
    pub errors: AtomicU64,
}

/// The progress line of a running mode; every mode starts it the same way and stops it before
/// its report, so that no progress line lands in the middle of the summary.
#[derive(Debug)]
pub struct Progress {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Prints one progress line per second to stderr (nothing when `quiet`) until
    /// [`Progress::stop`].
    pub fn start(
        mode: &'static str,
        done_label: &'static str,
        live: &Arc<Live>,
        latency: &Arc<LatencyRecorder>,
        quiet: bool,
    ) -> Self {
        let stop = CancellationToken::new();
        let task = spawn_progress(
            mode,
            done_label,
            live.clone(),
            latency.clone(),
            stop.clone(),
            quiet,
        );
        Progress { stop, task }
    }

    /// Stops the line and waits until the last one is printed.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn spawn_progress(
    mode: &'static str,
    done_label: &'static str,
    live: Arc<Live>,
    latency: Arc<LatencyRecorder>,
    stop: CancellationToken,
    quiet: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let start = Instant::now();
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let (mut last_sent, mut last_done, mut last_at) = (0u64, 0u64, Instant::now());
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let dt = now.duration_since(last_at);
            let sent = live.sent.load(Ordering::Relaxed);
            let done = live.done.load(Ordering::Relaxed);
            let errors = live.errors.load(Ordering::Relaxed);
            let p = Percentiles::of(&latency.take_interval());
            eprintln!(
                "[{mode} {:>6.1}s] sent {:>9.0}/s  {done_label} {:>9.0}/s  p50 {} µs  p99 {} µs  max {} µs  total {done}  errors {errors}",
                now.duration_since(start).as_secs_f64(),
                per_second(sent - last_sent, dt),
                per_second(done - last_done, dt),
                p.p50,
                p.p99,
                p.max,
            );
            (last_sent, last_done, last_at) = (sent, done, now);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_is_one_line_with_ok() {
        let mut r = Report::new("echo");
        r.field("lost", 0u64);
        r.line("two\nlines");
        let line = r.json_line();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["mode"], "echo");
        assert_eq!(v["ok"], true);
        r.must_be_zero("lost", 3);
        let v: Value = serde_json::from_str(&r.json_line()).unwrap();
        assert_eq!(v["ok"], false);
        let mut out = Vec::new();
        r.write_to(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("FAILED: 3 lost"));
        assert_eq!(text.lines().last().unwrap(), r.json_line());
    }

    #[test]
    fn cpu_fields_are_read_after_the_command_name() {
        // A command name with spaces and parentheses must not shift the fields.
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 1 0";
        assert_eq!(parse_cpu(stat), Some((2.5, 0.75)));
        assert_eq!(parse_cpu("garbage"), None);
        assert!(process_cpu().is_some());
    }

    #[test]
    fn rates_and_kinds() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
        let mut kinds = BTreeMap::new();
        assert_eq!(kinds_text(&kinds), "none");
        kinds.insert("timeout".to_owned(), 1);
        kinds.insert("refused".to_owned(), 3);
        assert_eq!(kinds_text(&kinds), "refused 3, timeout 1");
    }
}

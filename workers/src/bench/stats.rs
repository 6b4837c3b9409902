//! Measurement state shared by every bench mode: per-stream sequence tracking (lost,
//! duplicated, out-of-order messages), latency histograms (HDR, microseconds) fed in batches so
//! that thousands of connections don't contend on one lock, and the run clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Highest latency the histograms resolve (larger values are clamped to it): one hour.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// A batch of samples goes to the shared histograms when it holds this many...
const BATCH: usize = 256;
/// ...or when its oldest sample is this old, so that the progress line stays current.
const BATCH_AGE: Duration = Duration::from_millis(100);

/// A new empty latency histogram (µs, 3 significant figures, up to one hour).
pub fn new_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram always accepts; not input-dependent.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Tokio timers fire on a 1 ms wheel, so a sleep can end up to a tick late. Open-loop senders
/// wake this much before a message's scheduled time and send whatever falls due within it.
pub const TIMER_SLACK: Duration = Duration::from_millis(1);

/// The instant a scheduled message's latency counts from, when it is sent at `now`: its
/// schedule when it goes out late (a stalled sender or socket then shows up as latency, with no
/// coordinated omission), its actual send time when it goes out early within [`TIMER_SLACK`].
pub fn latency_origin(scheduled: Instant, now: Instant) -> Instant {
    scheduled.min(now)
}

/// The instant to wake at for a message scheduled at `due`.
pub fn wake_for(due: Instant) -> Instant {
    due.checked_sub(TIMER_SLACK).unwrap_or(due)
}

/// How many messages spaced `interval` apart, the first scheduled at `due`, fall due by
/// `now + TIMER_SLACK` (at least one).
pub fn due_by(due: Instant, interval: Duration, now: Instant) -> u64 {
    let ahead = (now + TIMER_SLACK)
        .saturating_duration_since(due)
        .as_secs_f64()
        / interval.as_secs_f64().max(1e-9);
    1 + ahead as u64
}

/// The run's time origin: message timestamps are nanoseconds since it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds from the epoch to `at` (0 before the epoch).
    pub fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Nanoseconds from the epoch to now.
    pub fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// The instant `ns` nanoseconds after the epoch.
    pub fn instant(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }
}

/// Latency histograms shared by all connections of a run: the whole run, and the interval since
/// the last progress line.
#[derive(Debug)]
pub struct LatencyRecorder {
    total: Mutex<Histogram<u64>>,
    interval: Mutex<Histogram<u64>>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder {
            total: Mutex::new(new_histogram()),
            interval: Mutex::new(new_histogram()),
        }
    }
}

impl LatencyRecorder {
    fn record_batch(&self, samples: &[u64]) {
        for hist in [&self.total, &self.interval] {
            let mut h = hist.lock().unwrap_or_else(|e| e.into_inner());
            for &us in samples {
                h.saturating_record(us);
            }
        }
    }

    /// A copy of the whole-run histogram.
    pub fn total(&self) -> Histogram<u64> {
        self.total.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The interval histogram's content, leaving it empty.
    pub fn take_interval(&self) -> Histogram<u64> {
        let mut h = self.interval.lock().unwrap_or_else(|e| e.into_inner());
        let out = h.clone();
        h.reset();
        out
    }
}

/// One connection's pending latency samples (µs), handed to a [`LatencyRecorder`] in batches.
#[derive(Debug, Default)]
pub struct LocalLatency {
    /// Starts empty, with nothing allocated, and grows to what the connection's traffic fills in
    /// [`BATCH_AGE`] (a broadcast member's is a sample or two). Reserving [`BATCH`] up front cost
    /// every connection its pages, touched on its first sample: with thousands of members the
    /// page zeroing of the first broadcast showed up as that broadcast's latency.
    samples: Vec<u64>,
    first_at: Option<Instant>,
}

impl LocalLatency {
    /// Records one sample observed at `now`, flushing the batch when it is full or old.
    pub fn record(&mut self, recorder: &LatencyRecorder, micros: u64, now: Instant) {
        self.samples.push(micros);
        let first = *self.first_at.get_or_insert(now);
        if self.samples.len() >= BATCH || now.saturating_duration_since(first) >= BATCH_AGE {
            self.flush(recorder);
        }
    }

    /// Hands every pending sample to the recorder.
    pub fn flush(&mut self, recorder: &LatencyRecorder) {
        if !self.samples.is_empty() {
            recorder.record_batch(&self.samples);
            self.samples.clear();
        }
        self.first_at = None;
    }
}

/// Microseconds between `sent_ns` and `now_ns` (0 if the clock says the reply came first).
pub fn micros_between(sent_ns: u64, now_ns: u64) -> u64 {
    now_ns.saturating_sub(sent_ns) / 1_000
}

/// What happened to one arrival, as seen by a [`SeqTracker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First time this sequence number arrived, after every lower one seen so far.
    InOrder,
    /// First time, but a higher sequence number had already arrived.
    OutOfOrder,
    /// This sequence number had already arrived.
    Duplicate,
}

/// The sequence numbers received from one stream (one echo connection, or one sender as seen by
/// one receiver). Memory grows with the number of gaps, not of messages: received numbers are
/// kept as sorted disjoint ranges, and in-order arrival only extends the last one.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    ranges: Vec<(u64, u64)>,
    /// Arrivals counted, duplicates included.
    pub arrivals: u64,
    /// Distinct sequence numbers received.
    pub unique: u64,
    /// Arrivals of an already-received number.
    pub duplicates: u64,
    /// First arrivals that came after a higher number.
    pub out_of_order: u64,
}

impl SeqTracker {
    /// Records the arrival of `seq`.
    pub fn record(&mut self, seq: u64) -> Arrival {
        self.arrivals += 1;
        // Fast path: the next number after the highest one.
        if let Some(last) = self.ranges.last_mut()
            && seq == last.1
        {
            last.1 += 1;
            self.unique += 1;
            return Arrival::InOrder;
        }
        let highest = self.ranges.last().map(|r| r.1);
        // Index of the first range starting after `seq`.
        let at = self.ranges.partition_point(|r| r.0 <= seq);
        if at > 0 && seq < self.ranges[at - 1].1 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.unique += 1;
        let joins_prev = at > 0 && self.ranges[at - 1].1 == seq;
        let joins_next = at < self.ranges.len() && self.ranges[at].0 == seq + 1;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[at - 1].1 = self.ranges[at].1;
                self.ranges.remove(at);
            }
            (true, false) => self.ranges[at - 1].1 = seq + 1,
            (false, true) => self.ranges[at].0 = seq,
            (false, false) => self.ranges.insert(at, (seq, seq + 1)),
        }
        match highest {
            Some(h) if seq < h => {
                self.out_of_order += 1;
                Arrival::OutOfOrder
            }
            _ => Arrival::InOrder,
        }
    }

    /// Messages among the first `sent` (numbers `0..sent`) that never arrived.
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.received_below(sent))
    }

    /// Distinct numbers received that are `>= sent`, i.e. that were never sent.
    pub fn unexpected(&self, sent: u64) -> u64 {
        self.unique - self.received_below(sent)
    }

    fn received_below(&self, limit: u64) -> u64 {
        self.ranges
            .iter()
            .map(|&(start, end)| end.min(limit).saturating_sub(start))
            .sum()
    }

    /// Adds another tracker's counters (not its ranges) to this one's.
    pub fn add_counts(&mut self, other: &SeqTracker) {
        self.arrivals += other.arrivals;
        self.unique += other.unique;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
    }

    /// Number of stored ranges (gaps + 1), for tests of the memory bound.
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }
}

/// Latency percentiles of a histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of `h` (all zero when it is empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            min: h.min(),
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_has_one_range_and_no_loss() {
        let mut t = SeqTracker::default();
        for seq in 0..10_000 {
            assert_eq!(t.record(seq), Arrival::InOrder);
        }
        assert_eq!(t.ranges(), 1);
        assert_eq!((t.unique, t.duplicates, t.out_of_order), (10_000, 0, 0));
        assert_eq!(t.lost(10_000), 0);
        assert_eq!(t.unexpected(10_000), 0);
    }

    #[test]
    fn gaps_count_as_lost_and_cost_one_range_each() {
        let mut t = SeqTracker::default();
        for seq in (0..100).filter(|s| s % 10 != 3) {
            assert_eq!(t.record(seq), Arrival::InOrder);
        }
        assert_eq!(t.lost(100), 10);
        assert_eq!(t.ranges(), 11);
        // Messages sent but never answered at the end are lost too.
        assert_eq!(t.lost(105), 15);
    }

    #[test]
    fn late_arrival_is_out_of_order_and_fills_the_gap() {
        let mut t = SeqTracker::default();
        for seq in [0, 1, 3, 4, 2, 5] {
            t.record(seq);
        }
        assert_eq!(t.out_of_order, 1);
        assert_eq!(t.duplicates, 0);
        assert_eq!(t.lost(6), 0);
        assert_eq!(t.ranges(), 1);
        // First message missing, arrives last.
        let mut t = SeqTracker::default();
        for seq in [1, 2, 0] {
            t.record(seq);
        }
        assert_eq!((t.out_of_order, t.lost(3), t.ranges()), (1, 0, 1));
    }

    #[test]
    fn duplicates_are_counted_once_and_do_not_hide_loss() {
        let mut t = SeqTracker::default();
        for seq in [0, 1, 1, 2, 0, 2] {
            t.record(seq);
        }
        assert_eq!(t.duplicates, 3);
        assert_eq!(t.unique, 3);
        assert_eq!(t.arrivals, 6);
        assert_eq!(t.out_of_order, 0);
        assert_eq!(t.lost(4), 1);
        // A duplicate of an out-of-order message, inside a middle range.
        let mut t = SeqTracker::default();
        for seq in [0, 5, 6, 7, 6, 3] {
            t.record(seq);
        }
        assert_eq!((t.duplicates, t.out_of_order, t.unique), (1, 1, 5));
        assert_eq!(t.lost(8), 3);
    }

    #[test]
    fn numbers_never_sent_are_unexpected_not_received() {
        let mut t = SeqTracker::default();
        for seq in [0, 1, 2, 50] {
            t.record(seq);
        }
        assert_eq!(t.unexpected(3), 1);
        assert_eq!(t.lost(3), 0);
    }

    #[test]
    fn percentiles_of_known_samples() {
        let rec = LatencyRecorder::default();
        let mut local = LocalLatency::default();
        let now = Instant::now();
        for us in 1..=1000 {
            local.record(&rec, us, now);
        }
        local.flush(&rec);
        let p = Percentiles::of(&rec.total());
        assert_eq!(p.count, 1000);
        assert_eq!(p.min, 1);
        assert_eq!(p.max, 1000);
        assert_eq!(p.p50, 500);
        assert_eq!(p.p99, 990);
        // The interval histogram empties when read; the total does not.
        assert_eq!(rec.take_interval().len(), 1000);
        assert_eq!(rec.take_interval().len(), 0);
        assert_eq!(rec.total().len(), 1000);
    }

    #[test]
    fn open_loop_schedule_helpers() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let ms = Duration::from_millis(1);
        // Late: latency counts from the schedule. Early: from the actual send.
        assert_eq!(latency_origin(t0, t0 + 5 * ms), t0);
        assert_eq!(latency_origin(t0, t0 - ms / 2), t0 - ms / 2);
        assert_eq!(wake_for(t0), t0 - TIMER_SLACK);
        // Woken on time with 10 µs spacing: the next 1 ms of messages (101) go out now.
        assert_eq!(due_by(t0, Duration::from_micros(10), t0), 101);
        // Spacing longer than the slack: just the one.
        assert_eq!(due_by(t0, 10 * ms, t0), 1);
        // Woken 25 ms late at 10 ms spacing: three are overdue.
        assert_eq!(due_by(t0, 10 * ms, t0 + 25 * ms), 3);
    }

    #[test]
    fn micros_never_go_negative() {
        assert_eq!(micros_between(5_000, 2_000), 0);
        assert_eq!(micros_between(1_000, 251_999), 250);
    }
}

//! Worker counters, lock-free, for logs and for the CLI to export: messages consumed, consumer
//! errors, panics and timeouts, requeues, drops, strict-ordering parks and upkeep, streamed request bodies (assembled,
//! abandoned, timed out, too large), and a latency histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

/// Upper bounds (inclusive, milliseconds) of the latency buckets; one more bucket holds the rest.
pub const LATENCY_BUCKETS_MS: [u64; 9] = [1, 2, 5, 10, 25, 50, 100, 500, 1000];

/// Counters of one worker (all its loops).
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    /// Receives that failed in a row (0 while the worker is receiving): its health.
    pub receive_failures_in_a_row: AtomicU64,
    /// Messages whose consumer ran to `Ok` (or to `DenyConnection` / `Close`).
    pub consumed: AtomicU64,
    /// Consumers that returned an error (other than the control errors).
    pub errors: AtomicU64,
    /// Consumers that panicked.
    pub panics: AtomicU64,
    /// Consumers aborted for running longer than the worker's consumer timeout.
    pub timeouts: AtomicU64,
    /// `ConsumeLater` requeues.
    pub requeued: AtomicU64,
    /// Messages given up: retries exhausted, undecodable, or an action that could not be applied.
    pub dropped: AtomicU64,
    /// Messages no route matched.
    pub unrouted: AtomicU64,
    /// Messages parked by strict ordering.
    pub parked: AtomicU64,
    /// Duplicates refused by strict ordering.
    pub duplicates: AtomicU64,
    /// Parked messages dropped by strict-ordering upkeep for waiting longer than the expiry.
    pub ordering_expired: AtomicU64,
    /// Orders given up as missing by strict-ordering upkeep (gaps skipped).
    pub ordering_skipped: AtomicU64,
    /// Strictly ordered messages this worker held while it ran their predecessor, gated in the
    /// same step as that predecessor's done (no park in the layer).
    pub ordering_held: AtomicU64,
    /// Streamed request bodies assembled from their `body_channel`.
    pub bodies_assembled: AtomicU64,
    /// Streamed request bodies abandoned because the client went away (`closed` chunk).
    pub bodies_abandoned: AtomicU64,
    /// Streamed request bodies whose next chunk did not come in time (answered 408).
    pub bodies_timed_out: AtomicU64,
    /// Streamed request bodies over the worker's limit (answered 413).
    pub bodies_too_large: AtomicU64,
    /// Sum of handling times, microseconds.
    pub latency_sum_us: AtomicU64,
    /// Handling-time histogram (see [`LATENCY_BUCKETS_MS`]; the last bucket is "slower").
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    /// Messages received, by channel kind (see [`channel_kind`]).
    received_by_channel: DashMap<String, AtomicU64>,
    /// Messages sent by consumers, by destination kind: a channel kind, `reply` or `group`.
    sent_by_channel: DashMap<String, AtomicU64>,
}

/// The label a channel is counted under: its name, except that a process-local reply channel
/// (`…!…`) counts as `reply` and a single-reader channel (`…?…`) under its name up to the `?`,
/// so the number of labels stays bounded.
pub fn channel_kind(channel: &str) -> &str {
    if channel.contains('!') {
        "reply"
    } else if let Some(i) = channel.find('?') {
        &channel[..=i]
    } else {
        channel
    }
}

fn count(map: &DashMap<String, AtomicU64>, label: &str) {
    if let Some(c) = map.get(label) {
        c.fetch_add(1, Ordering::Relaxed);
        return;
    }
    map.entry(label.to_owned())
        .or_default()
        .fetch_add(1, Ordering::Relaxed);
}

fn read(map: &DashMap<String, AtomicU64>) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = map
        .iter()
        .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
        .collect();
    out.sort();
    out
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerMetricsSnapshot {
    /// See [`WorkerMetrics::consumed`].
    pub consumed: u64,
    /// See [`WorkerMetrics::errors`].
    pub errors: u64,
    /// See [`WorkerMetrics::panics`].
    pub panics: u64,
    /// See [`WorkerMetrics::timeouts`].
    pub timeouts: u64,
    /// See [`WorkerMetrics::requeued`].
    pub requeued: u64,
    /// See [`WorkerMetrics::dropped`].
    pub dropped: u64,
    /// See [`WorkerMetrics::unrouted`].
    pub unrouted: u64,
    /// See [`WorkerMetrics::parked`].
    pub parked: u64,
    /// See [`WorkerMetrics::duplicates`].
    pub duplicates: u64,
    /// See [`WorkerMetrics::ordering_expired`].
    pub ordering_expired: u64,
    /// See [`WorkerMetrics::ordering_skipped`].
    pub ordering_skipped: u64,
    /// See [`WorkerMetrics::ordering_held`].
    pub ordering_held: u64,
    /// See [`WorkerMetrics::bodies_assembled`].
    pub bodies_assembled: u64,
    /// See [`WorkerMetrics::bodies_abandoned`].
    pub bodies_abandoned: u64,
    /// See [`WorkerMetrics::bodies_timed_out`].
    pub bodies_timed_out: u64,
    /// See [`WorkerMetrics::bodies_too_large`].
    pub bodies_too_large: u64,
    /// See [`WorkerMetrics::latency_sum_us`].
    pub latency_sum_us: u64,
    /// See [`WorkerMetrics::latency_buckets`].
    pub latency_buckets: Vec<u64>,
    /// Messages received per channel kind, sorted by label.
    pub received_by_channel: Vec<(String, u64)>,
    /// Messages sent by consumers per destination kind, sorted by label.
    pub sent_by_channel: Vec<(String, u64)>,
}

impl WorkerMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        Self::add(&self.latency_sum_us, us);
        let ms = us / 1000;
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| ms < *b || (ms == *b && us % 1000 == 0))
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        Self::add(&self.latency_buckets[i], 1);
    }

    pub(crate) fn received(&self, channel: &str) {
        count(&self.received_by_channel, channel_kind(channel));
    }

    pub(crate) fn sent(&self, label: &str) {
        count(&self.sent_by_channel, label);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> WorkerMetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerMetricsSnapshot {
            consumed: r(&self.consumed),
            errors: r(&self.errors),
            panics: r(&self.panics),
            timeouts: r(&self.timeouts),
            requeued: r(&self.requeued),
            dropped: r(&self.dropped),
            unrouted: r(&self.unrouted),
            parked: r(&self.parked),
            duplicates: r(&self.duplicates),
            ordering_expired: r(&self.ordering_expired),
            ordering_skipped: r(&self.ordering_skipped),
            ordering_held: r(&self.ordering_held),
            bodies_assembled: r(&self.bodies_assembled),
            bodies_abandoned: r(&self.bodies_abandoned),
            bodies_timed_out: r(&self.bodies_timed_out),
            bodies_too_large: r(&self.bodies_too_large),
            latency_sum_us: r(&self.latency_sum_us),
            latency_buckets: self.latency_buckets.iter().map(r).collect(),
            received_by_channel: read(&self.received_by_channel),
            sent_by_channel: read(&self.sent_by_channel),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_bounded_channel_kind() {
        let m = WorkerMetrics::default();
        m.received("websocket.receive");
        m.received("websocket.receive");
        m.received("http.request.body?abc");
        m.sent(channel_kind("switchyard.response.x!y"));
        m.sent("group");
        let s = m.snapshot();
        assert_eq!(
            s.received_by_channel,
            [
                ("http.request.body?".to_owned(), 1),
                ("websocket.receive".to_owned(), 2)
            ]
        );
        assert_eq!(
            s.sent_by_channel,
            [("group".to_owned(), 1), ("reply".to_owned(), 1)]
        );
    }

    #[test]
    fn histogram_buckets() {
        let m = WorkerMetrics::default();
        m.observe(Duration::from_micros(300));
        m.observe(Duration::from_millis(1));
        m.observe(Duration::from_micros(1500));
        m.observe(Duration::from_secs(3));
        let s = m.snapshot();
        assert_eq!(s.latency_buckets[0], 2);
        assert_eq!(s.latency_buckets[1], 1);
        assert_eq!(s.latency_buckets[LATENCY_BUCKETS_MS.len()], 1);
        assert_eq!(s.latency_sum_us, 300 + 1000 + 1500 + 3_000_000);
    }
}

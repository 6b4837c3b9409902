//! Worker counters, lock-free, each defined once with its Prometheus name: messages consumed,
//! consumer errors, panics and timeouts, requeues, drops, strict-ordering parks and upkeep,
//! streamed request bodies (assembled, abandoned, timed out, too large), messages in and out by
//! channel, and a latency histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use crate::prometheus::{Exposition, metric_set};

/// Upper bounds (inclusive, milliseconds) of the latency buckets; one more bucket holds the rest.
pub const LATENCY_BUCKETS_MS: [u64; 9] = [1, 2, 5, 10, 25, 50, 100, 500, 1000];

metric_set! {
    /// The scalar counters of one worker (all its loops).
    pub struct WorkerCounts => WorkerCountsSnapshot {
        /// Receives that failed in a row (0 while the worker is receiving): its health.
        receive_failures_in_a_row: gauge "switchyard_worker_receive_failures_in_a_row";
        /// Messages whose consumer ran to `Ok` (or to `DenyConnection` / `Close`).
        consumed: counter "switchyard_consumed_total";
        /// Consumers that returned an error (other than the control errors).
        errors: counter "switchyard_consumer_errors_total";
        /// Consumers that panicked.
        panics: counter "switchyard_consumer_panics_total";
        /// Consumers aborted for running longer than the worker's consumer timeout.
        timeouts: counter "switchyard_consumer_timeouts_total";
        /// `ConsumeLater` requeues.
        requeued: counter "switchyard_requeued_total";
        /// Messages given up: retries exhausted, undecodable, or an action that could not be applied.
        dropped: counter "switchyard_worker_dropped_total";
        /// Messages no route matched.
        unrouted: counter "switchyard_unrouted_total";
        /// Messages of sockets this worker owns, run in their connection's order without an
        /// ordering step in the layer.
        owned: counter "switchyard_owned_messages_total";
        /// Messages parked by strict ordering to wait for their predecessors.
        parked: counter "switchyard_parked_total";
        /// Duplicates refused by strict ordering.
        duplicates: counter "switchyard_ordering_duplicates_total";
        /// Parked messages dropped by strict-ordering upkeep for waiting longer than the expiry.
        ordering_expired: counter "switchyard_ordering_total" ["event" = "expired"]
            help "Strict-ordering events: parked messages dropped past expiry, gaps skipped, messages held by the worker running their predecessor (gated with its done), orders restarted after the layer lost their state.";
        /// Orders given up as missing by strict-ordering upkeep (gaps skipped).
        ordering_skipped: counter "switchyard_ordering_total" ["event" = "skipped"];
        /// Strictly ordered messages this worker held while it ran their predecessor, gated in
        /// the same step as that predecessor's done (no park in the layer).
        ordering_held: counter "switchyard_ordering_total" ["event" = "held"];
        /// Connections whose ordering state the layer had lost (a Redis restart, flush or
        /// failover): their order restarted at the next frame instead of waiting for the expiry.
        ordering_restarted: counter "switchyard_ordering_total" ["event" = "restarted"];
        /// Streamed request bodies assembled from their `body_channel`.
        bodies_assembled: counter "switchyard_streamed_bodies_total" ["outcome" = "assembled"]
            help "Streamed request bodies (body_channel) by outcome.";
        /// Streamed request bodies abandoned because the client went away (`closed` chunk).
        bodies_abandoned: counter "switchyard_streamed_bodies_total" ["outcome" = "abandoned"];
        /// Streamed request bodies whose next chunk did not come in time (answered 408).
        bodies_timed_out: counter "switchyard_streamed_bodies_total" ["outcome" = "timed_out"];
        /// Streamed request bodies over the worker's limit (answered 413).
        bodies_too_large: counter "switchyard_streamed_bodies_total" ["outcome" = "too_large"];
    }
}

/// Counters of one worker (all its loops): the scalar ones (reached through `Deref`), the
/// per-channel counts and the latency histogram.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    counts: WorkerCounts,
    /// Sum of handling times, microseconds.
    latency_sum_us: AtomicU64,
    /// Handling-time histogram (see [`LATENCY_BUCKETS_MS`]; the last bucket is "slower").
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    /// Messages received, by channel kind (see [`channel_kind`]).
    received_by_channel: DashMap<String, AtomicU64>,
    /// Messages sent by consumers, by destination kind: a channel kind, `reply` or `group`.
    sent_by_channel: DashMap<String, AtomicU64>,
}

impl std::ops::Deref for WorkerMetrics {
    type Target = WorkerCounts;

    fn deref(&self) -> &WorkerCounts {
        &self.counts
    }
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

/// A copy of the counters at one moment (the scalar ones through `Deref`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerMetricsSnapshot {
    /// The scalar counters.
    pub counts: WorkerCountsSnapshot,
    /// Sum of handling times, microseconds.
    pub latency_sum_us: u64,
    /// Handling-time histogram (see [`LATENCY_BUCKETS_MS`]; the last bucket is "slower").
    pub latency_buckets: Vec<u64>,
    /// Messages received per channel kind, sorted by label.
    pub received_by_channel: Vec<(String, u64)>,
    /// Messages sent by consumers per destination kind, sorted by label.
    pub sent_by_channel: Vec<(String, u64)>,
}

impl std::ops::Deref for WorkerMetricsSnapshot {
    type Target = WorkerCountsSnapshot;

    fn deref(&self) -> &WorkerCountsSnapshot {
        &self.counts
    }
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
            counts: self.counts.snapshot(),
            latency_sum_us: r(&self.latency_sum_us),
            latency_buckets: self.latency_buckets.iter().map(r).collect(),
            received_by_channel: read(&self.received_by_channel),
            sent_by_channel: read(&self.sent_by_channel),
        }
    }
}

fn as_refs(v: &[(String, u64)]) -> Vec<(&str, u64)> {
    v.iter().map(|(c, n)| (c.as_str(), *n)).collect()
}

impl WorkerMetrics {
    /// Writes every metric of the worker.
    pub fn expose(&self, out: &mut Exposition<'_>) {
        let s = self.snapshot();
        out.counter_by(
            "switchyard_worker_messages_in_total",
            "Messages the worker received, by channel (reply channels as \"reply\").",
            "channel",
            &as_refs(&s.received_by_channel),
        )
        .counter_by(
            "switchyard_worker_messages_out_total",
            "Messages consumers sent, by destination (a channel, \"reply\" or \"group\").",
            "channel",
            &as_refs(&s.sent_by_channel),
        );
        self.counts.expose(out);
        let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_MS
            .iter()
            .zip(&s.latency_buckets)
            .map(|(ms, n)| (*ms as f64 / 1000.0, *n))
            .collect();
        // The histogram's last slot counts the slower-than-every-bucket ones: they only reach +Inf.
        buckets.truncate(LATENCY_BUCKETS_MS.len());
        let count: u64 = s.latency_buckets.iter().sum();
        out.histogram(
            "switchyard_consumer_latency_seconds",
            "Time to run a consumer and apply what it sent.",
            &buckets,
            s.latency_sum_us as f64 / 1e6,
            count,
        );
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

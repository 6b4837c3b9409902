//! Counters of one worker's durable-channel runner, and the latest per-channel figures read from
//! Redis (refreshed every few seconds by the runner), for Prometheus.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::JobStats;
use crate::prometheus::{Exposition, metric_set};

metric_set! {
    /// What a job runner did, since the process started.
    pub struct JobCounts => JobMetricsSnapshot {
        /// Durable job runs started (first runs and retries).
        started: counter "switchyard_jobs_started_total";
        /// Durable job runs whose consumer succeeded and whose sends were applied.
        succeeded: counter "switchyard_jobs_succeeded_total";
        /// Durable jobs acknowledged (removed from their stream).
        acked: counter "switchyard_jobs_acked_total";
        /// Failed durable job runs scheduled to run again.
        retries_scheduled: counter "switchyard_jobs_retries_scheduled_total";
        /// Scheduled retries moved back to their stream when due.
        retries_started: counter "switchyard_jobs_retries_started_total";
        /// Durable jobs dead-lettered by this worker (deadline ones included).
        dead: counter "switchyard_jobs_dead_total";
        /// Durable jobs dead-lettered because their deadline passed before they could start.
        deadline_dead: counter "switchyard_jobs_deadline_dead_total";
        /// Durable jobs claimed from a worker that stopped renewing them.
        claimed: counter "switchyard_jobs_claimed_total";
        /// Plain channel-layer sends (Django's) moved into a durable channel's stream.
        moved_from_layer: counter "switchyard_jobs_moved_total";
    }
}

/// A job runner's counters, its wait times and the latest per-channel figures.
#[derive(Debug, Default)]
pub struct JobMetrics {
    counts: JobCounts,
    /// Sum and count of the time from a job's send to the start of its run, in µs.
    wait_us: AtomicU64,
    waits: AtomicU64,
    stats: Mutex<Vec<JobStats>>,
}

/// A per-channel gauge: its name, its help, and how to read it from a channel's stats.
type PerChannelGauge = (&'static str, &'static str, fn(&JobStats) -> f64);

impl std::ops::Deref for JobMetrics {
    type Target = JobCounts;

    fn deref(&self) -> &JobCounts {
        &self.counts
    }
}

impl JobMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn observe_wait(&self, wait: Duration) {
        self.wait_us
            .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_stats(&self, stats: Vec<JobStats>) {
        if let Ok(mut s) = self.stats.lock() {
            *s = stats;
        }
    }

    /// Writes the counters and the per-channel gauges.
    pub fn expose(&self, out: &mut Exposition<'_>) {
        self.counts.expose(out);
        let waits = self.waits.load(Ordering::Relaxed);
        out.counter(
            "switchyard_jobs_wait_seconds_count",
            "Durable job runs timed from send to start.",
            waits,
        )
        .gauge(
            "switchyard_jobs_wait_seconds_sum",
            "Total time from send to start of durable job runs, in seconds.",
            self.wait_us.load(Ordering::Relaxed) as f64 / 1e6,
        );
        let stats = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        let per_channel: [PerChannelGauge; 5] = [
            (
                "switchyard_jobs_pending",
                "Durable jobs waiting to start.",
                |s| s.pending as f64,
            ),
            (
                "switchyard_jobs_in_progress",
                "Durable jobs handed to a worker and not yet acknowledged.",
                |s| s.in_progress as f64,
            ),
            (
                "switchyard_jobs_scheduled_retries",
                "Failed durable jobs waiting for their next run.",
                |s| s.scheduled_retries as f64,
            ),
            (
                "switchyard_jobs_dead_letters",
                "Dead letters held per durable channel.",
                |s| s.dead as f64,
            ),
            (
                "switchyard_jobs_oldest_age_seconds",
                "Age of the oldest durable job not yet done.",
                |s| s.oldest_age_ms as f64 / 1e3,
            ),
        ];
        for (name, help, value) in per_channel {
            let by_channel: Vec<(&str, f64)> = stats
                .iter()
                .map(|s| (s.channel.as_str(), value(s)))
                .collect();
            out.gauge_by(name, help, "channel", &by_channel);
        }
    }
}

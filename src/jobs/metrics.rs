//! Counters of one worker's durable-channel runner, and the latest per-channel figures read from
//! Redis (refreshed every few seconds by the runner), for Prometheus.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::JobStats;
use crate::prometheus::Exposition;

/// What a job runner did, since the process started.
#[derive(Debug, Default)]
pub struct JobMetrics {
    /// Runs started (first runs and retries).
    pub started: AtomicU64,
    /// Runs whose consumer succeeded and whose sends were applied.
    pub succeeded: AtomicU64,
    /// Jobs acknowledged (removed from their stream).
    pub acked: AtomicU64,
    /// Failed runs scheduled to run again.
    pub retries_scheduled: AtomicU64,
    /// Retries moved back to their stream when due.
    pub retries_started: AtomicU64,
    /// Jobs dead-lettered by this worker (deadline ones included).
    pub dead: AtomicU64,
    /// Jobs dead-lettered because their deadline passed before they could start.
    pub deadline_dead: AtomicU64,
    /// Jobs claimed from a worker that stopped renewing them.
    pub claimed: AtomicU64,
    /// Plain channel-layer sends (Django's) moved into a stream.
    pub moved_from_layer: AtomicU64,
    /// Sum and count of the time from a job's send to the start of its run, in µs.
    wait_us: AtomicU64,
    waits: AtomicU64,
    stats: Mutex<Vec<JobStats>>,
}

/// A copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobMetricsSnapshot {
    /// See [`JobMetrics::started`].
    pub started: u64,
    /// See [`JobMetrics::succeeded`].
    pub succeeded: u64,
    /// See [`JobMetrics::acked`].
    pub acked: u64,
    /// See [`JobMetrics::retries_scheduled`].
    pub retries_scheduled: u64,
    /// See [`JobMetrics::dead`].
    pub dead: u64,
    /// See [`JobMetrics::deadline_dead`].
    pub deadline_dead: u64,
    /// See [`JobMetrics::claimed`].
    pub claimed: u64,
    /// See [`JobMetrics::moved_from_layer`].
    pub moved_from_layer: u64,
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

    /// The counters now.
    pub fn snapshot(&self) -> JobMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        JobMetricsSnapshot {
            started: get(&self.started),
            succeeded: get(&self.succeeded),
            acked: get(&self.acked),
            retries_scheduled: get(&self.retries_scheduled),
            dead: get(&self.dead),
            deadline_dead: get(&self.deadline_dead),
            claimed: get(&self.claimed),
            moved_from_layer: get(&self.moved_from_layer),
        }
    }

    /// Writes the counters and the per-channel gauges.
    pub fn expose(&self, out: &mut Exposition) {
        let s = self.snapshot();
        out.counter(
            "switchyard_jobs_started_total",
            "Durable job runs started.",
            s.started,
        )
        .counter(
            "switchyard_jobs_succeeded_total",
            "Durable job runs that succeeded with their sends applied.",
            s.succeeded,
        )
        .counter(
            "switchyard_jobs_acked_total",
            "Durable jobs acknowledged.",
            s.acked,
        )
        .counter(
            "switchyard_jobs_retries_scheduled_total",
            "Failed durable job runs scheduled to run again.",
            s.retries_scheduled,
        )
        .counter(
            "switchyard_jobs_dead_total",
            "Durable jobs dead-lettered by this worker.",
            s.dead,
        )
        .counter(
            "switchyard_jobs_deadline_dead_total",
            "Durable jobs dead-lettered because their deadline passed before they started.",
            s.deadline_dead,
        )
        .counter(
            "switchyard_jobs_claimed_total",
            "Durable jobs claimed from a worker that stopped renewing them.",
            s.claimed,
        )
        .counter(
            "switchyard_jobs_moved_total",
            "Plain channel-layer sends moved into a durable channel's stream.",
            s.moved_from_layer,
        );
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
        let gauge = |out: &mut Exposition, name: &str, help: &str, f: fn(&JobStats) -> f64| {
            out.gauge_by(
                name,
                help,
                "channel",
                &stats
                    .iter()
                    .map(|s| (s.channel.as_str(), f(s)))
                    .collect::<Vec<_>>(),
            );
        };
        gauge(
            out,
            "switchyard_jobs_pending",
            "Durable jobs waiting to start.",
            |s| s.pending as f64,
        );
        gauge(
            out,
            "switchyard_jobs_in_progress",
            "Durable jobs handed to a worker and not yet acknowledged.",
            |s| s.in_progress as f64,
        );
        gauge(
            out,
            "switchyard_jobs_scheduled_retries",
            "Failed durable jobs waiting for their next run.",
            |s| s.scheduled_retries as f64,
        );
        gauge(
            out,
            "switchyard_jobs_dead_letters",
            "Dead letters held per durable channel.",
            |s| s.dead as f64,
        );
        gauge(
            out,
            "switchyard_jobs_oldest_age_seconds",
            "Age of the oldest durable job not yet done.",
            |s| s.oldest_age_ms as f64 / 1e3,
        );
    }
}

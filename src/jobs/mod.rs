//! Durable background jobs: the worker side of at-least-once task channels. A [`JobRunner`]
//! reads a worker's durable channels from their Redis streams (see
//! [`crate::layer::redis::durable`] for the storage), runs each job through a [`JobHandler`]
//! (the worker's consumer call), acknowledges it only once the consumer succeeded and its sends
//! were applied, and otherwise schedules it again with exponential backoff and jitter, or
//! dead-letters it after the policy's last attempt, or when its deadline passed before it could
//! start. While a job runs, its lease is renewed every third of the job timeout; a job whose
//! worker died (no renewal) is claimed by another worker once idle for the job timeout, and that
//! lost run counts as an attempt.
//!
//! The in-memory layer refuses durable channels (see
//! [`crate::layer::memory::DURABLE_NEEDS_REDIS`]): it keeps nothing across a restart, so it
//! could only pretend.

mod metrics;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use rand::Rng;
use switchyard_routing::DurablePolicy;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::layer::redis::durable::is_nogroup;
pub use crate::layer::redis::durable::{
    DeadJob, JobOptions, JobSent, JobStats, Persistence, StreamJob,
};
use crate::layer::{LayerError, RedisLayer, now_ms};
pub use metrics::{JobMetrics, JobMetricsSnapshot};

/// Default visibility timeout: a job whose worker stopped renewing its lease this long ago is
/// run again by another worker (`--job-timeout`).
pub const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a read of new jobs blocks: also how soon plain sends (Django) and due retries are
/// moved into the stream when the worker is idle.
const READ_BLOCK: Duration = Duration::from_millis(100);

/// Most acknowledgements sent in one round trip.
const MAX_ACKS: usize = 512;

/// How often the per-channel figures behind the Prometheus gauges are refreshed.
const STATS_EVERY: Duration = Duration::from_secs(5);

/// Why a job run failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// What went wrong (kept with the job, shown by `switchyard jobs dead list`).
    pub error: String,
    /// True when running it again cannot help (undecodable, no route): dead at once.
    pub permanent: bool,
}

impl JobFailure {
    /// A failure worth retrying.
    pub fn retry(error: impl Into<String>) -> Self {
        JobFailure {
            error: error.into(),
            permanent: false,
        }
    }
    /// A failure that retrying cannot fix.
    pub fn permanent(error: impl Into<String>) -> Self {
        JobFailure {
            error: error.into(),
            permanent: true,
        }
    }
}

/// Runs one job's consumer: `Ok` once it succeeded and its sends were applied.
pub trait JobHandler: Send + Sync + 'static {
    /// Runs `job` (its message, with [`switchyard_routing::Message::attempt`] and
    /// [`switchyard_routing::Message::job_id`] set).
    fn run_job<'a>(&'a self, job: &'a StreamJob) -> BoxFuture<'a, Result<(), JobFailure>>;
}

/// The durable channels one worker runs, and how.
pub struct JobRunner {
    layer: RedisLayer,
    channels: Vec<(String, DurablePolicy)>,
    handler: Arc<dyn JobHandler>,
    concurrency: usize,
    job_timeout: Duration,
    stop_grace: Duration,
    consumer: String,
    metrics: Arc<JobMetrics>,
}

impl std::fmt::Debug for JobRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRunner")
            .field("channels", &self.channels)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

/// Jobs handed to this worker and not yet done, by channel: their leases are renewed.
type InHand = Arc<Mutex<HashMap<String, HashSet<String>>>>;

impl JobRunner {
    /// A runner for `channels` calling `handler`, `concurrency` jobs at once.
    pub fn new(
        layer: RedisLayer,
        channels: Vec<(String, DurablePolicy)>,
        handler: Arc<dyn JobHandler>,
        concurrency: usize,
    ) -> Self {
        JobRunner {
            layer,
            channels,
            handler,
            concurrency: concurrency.max(1),
            job_timeout: JOB_TIMEOUT,
            stop_grace: Duration::from_secs(30),
            consumer: format!("worker-{}", crate::layer::random_local_part()),
            metrics: Arc::default(),
        }
    }

    /// The visibility timeout (5 min).
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// How long a stop waits for the jobs in hand (30 s); those still running stay pending in
    /// Redis and run again elsewhere after the job timeout.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// Shares counters with the caller (Prometheus).
    pub fn metrics(mut self, metrics: Arc<JobMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs until `shutdown`, then waits for the jobs in hand (up to the stop grace).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), LayerError> {
        // Redis may be down at startup: wait for it, as the receive loops do.
        let mut failures = 0u32;
        for (c, _) in &self.channels {
            while let Err(e) = self.layer.job_group_create(c).await {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(channel = %c, error = %e, "durable channels: cannot create the consumer group; retrying");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.min(20)))) => {}
                }
            }
        }
        tracing::info!(
            consumer = %self.consumer,
            channels = ?self.channels.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            job_timeout_ms = self.job_timeout.as_millis() as u64,
            "durable channels: reading jobs"
        );
        let this = Arc::new(self);
        let mut by_shard: HashMap<usize, Vec<String>> = HashMap::new();
        for (c, _) in &this.channels {
            by_shard
                .entry(this.layer.shard_of(c))
                .or_default()
                .push(c.clone());
        }
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let in_hand: InHand = Arc::default();
        let mut loops = JoinSet::new();
        let acker = tokio::spawn(ack_loop(this.clone(), ack_rx, in_hand.clone()));
        let renewal = CancellationToken::new();
        let renewer = tokio::spawn(renew_loop(this.clone(), in_hand.clone(), renewal.clone()));
        for (shard, channels) in by_shard {
            let this = this.clone();
            let (acks, in_hand, shutdown) = (acks.clone(), in_hand.clone(), shutdown.clone());
            loops.spawn(async move {
                this.read_loop(shard, channels, acks, in_hand, shutdown)
                    .await
            });
        }
        drop(acks);
        while let Some(done) = loops.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a durable-channel loop ended abnormally");
            }
        }
        // Every sender of acks is gone: the acker drains what is left and ends.
        if let Err(e) = acker.await {
            tracing::error!(error = %e, "the acknowledgement loop ended abnormally");
        }
        renewal.cancel();
        let _ = renewer.await;
        Ok(())
    }

    fn policy(&self, channel: &str) -> DurablePolicy {
        self.channels
            .iter()
            .find(|(c, _)| c == channel)
            .map(|(_, p)| *p)
            .unwrap_or_default()
    }

    async fn read_loop(
        self: Arc<Self>,
        shard: usize,
        channels: Vec<String>,
        acks: mpsc::UnboundedSender<(String, String)>,
        in_hand: InHand,
        shutdown: CancellationToken,
    ) {
        let idle = Arc::new(Semaphore::new(self.concurrency));
        let mut running = JoinSet::new();
        let mut conn = None;
        let mut conn_generation = 0;
        let mut failures = 0u32;
        let claim_every =
            (self.job_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
        let mut last_claim: Option<Instant> = None;
        let mut last_stats: Option<Instant> = None;
        loop {
            let Some(mut permits) = crate::worker::idle_batch(&idle, &shutdown).await else {
                break;
            };
            let round = async {
                for c in &channels {
                    let (moved, promoted) = self.layer.job_maintain(c).await?;
                    JobMetrics::add(&self.metrics.moved_from_layer, moved);
                    JobMetrics::add(&self.metrics.retries_started, promoted);
                }
                let mut jobs = Vec::new();
                if last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
                    last_claim = Some(Instant::now());
                    for c in &channels {
                        let room = permits.num_permits() - jobs.len();
                        if room == 0 {
                            break;
                        }
                        let claimed = self
                            .layer
                            .job_claim(c, &self.consumer, self.job_timeout, room)
                            .await?;
                        if !claimed.is_empty() {
                            JobMetrics::add(&self.metrics.claimed, claimed.len() as u64);
                            tracing::warn!(channel = %c, jobs = claimed.len(), "claimed jobs whose worker stopped renewing them (lost worker?)");
                        }
                        jobs.extend(claimed);
                    }
                }
                if last_stats.is_none_or(|t| t.elapsed() >= STATS_EVERY) {
                    last_stats = Some(Instant::now());
                    let mut figures = Vec::with_capacity(channels.len());
                    for c in &channels {
                        figures.push(self.layer.job_stats(c).await?);
                    }
                    self.metrics.set_stats(figures);
                }
                let room = permits.num_permits() - jobs.len();
                if room > 0 {
                    let generation = self.layer.job_reader_generation(shard);
                    if conn.is_none() || conn_generation != generation {
                        conn = Some(self.layer.job_reader(shard).await?);
                        conn_generation = generation;
                    }
                    if let Some(c) = conn.as_mut() {
                        let block = if jobs.is_empty() {
                            READ_BLOCK
                        } else {
                            Duration::from_millis(1)
                        };
                        match self
                            .layer
                            .job_read(c, shard, &channels, &self.consumer, room, block)
                            .await
                        {
                            Ok(read) => jobs.extend(read),
                            Err(e) => {
                                if is_nogroup(&e) {
                                    for c in &channels {
                                        self.layer.job_group_create(c).await?;
                                    }
                                } else {
                                    conn = None;
                                }
                                return Err(e);
                            }
                        }
                    }
                }
                Ok::<_, LayerError>(jobs)
            };
            match round.await {
                Ok(jobs) => {
                    failures = 0;
                    for job in jobs {
                        let permit = permits.split(1);
                        if let Ok(mut held) = in_hand.lock() {
                            held.entry(job.channel.clone())
                                .or_default()
                                .insert(job.entry_id.clone());
                        }
                        let this = self.clone();
                        let acks = acks.clone();
                        let in_hand = in_hand.clone();
                        running.spawn(async move {
                            Box::pin(this.run_one(job, acks, in_hand)).await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => {
                    failures += 1;
                    if !is_nogroup(&e) && (failures == 1 || failures.is_multiple_of(20)) {
                        tracing::warn!(error = %e, "durable channels: read failed; retrying");
                    }
                    let pause = Duration::from_millis(50 * u64::from(failures.min(20)));
                    drop(permits);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            }
            drop(permits);
            while let Some(joined) = running.try_join_next() {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a job task ended abnormally");
                }
            }
        }
        let finished = tokio::time::timeout(self.stop_grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                busy = running.len(),
                "stop grace over; aborting the jobs still running (they stay pending and run again after the job timeout)"
            );
            running.abort_all();
            while running.join_next().await.is_some() {}
        }
    }

    /// Runs one job and records its outcome: done (queued for acknowledgement), scheduled again,
    /// or dead.
    async fn run_one(
        self: Arc<Self>,
        job: StreamJob,
        acks: mpsc::UnboundedSender<(String, String)>,
        in_hand: InHand,
    ) {
        let policy = self.policy(&job.channel);
        let now = now_ms();
        let deadline = job
            .deadline_ms
            .or_else(|| policy.deadline.map(|d| job.sent_ms + d.as_millis() as u64));
        let verdict = if deadline.is_some_and(|d| now > d) {
            JobMetrics::add(&self.metrics.deadline_dead, 1);
            Err(JobFailure::permanent(format!(
                "deadline passed before the job could start ({} ms after it was sent)",
                now.saturating_sub(job.sent_ms)
            )))
        } else if job.attempt > policy.max_attempts {
            Err(JobFailure::permanent(format!(
                "worker lost mid-job; {} runs made (max_attempts {}){}",
                job.attempt - 1,
                policy.max_attempts,
                job.last_error
                    .as_deref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            )))
        } else {
            JobMetrics::add(&self.metrics.started, 1);
            let latency = now.saturating_sub(job.sent_ms);
            self.metrics.observe_wait(Duration::from_millis(latency));
            self.handler.run_job(&job).await
        };
        match verdict {
            Ok(()) => {
                JobMetrics::add(&self.metrics.succeeded, 1);
                // Stays in hand (renewed) until acknowledged.
                if acks.send((job.channel, job.entry_id)).is_err() {
                    tracing::error!(
                        "acknowledgement loop gone; the job will run again after the job timeout"
                    );
                }
                return;
            }
            Err(failure) => {
                let dead = failure.permanent || job.attempt >= policy.max_attempts;
                let retry_at = (!dead).then(|| {
                    let wait = policy.backoff_with_jitter(job.attempt, rand::rng().random::<f64>());
                    now_ms() + wait.as_millis() as u64
                });
                let runs = if job.attempt > policy.max_attempts {
                    job.attempt - 1
                } else {
                    job.attempt
                };
                match self
                    .layer
                    .job_fail(&job.channel, &job.entry_id, &failure.error, runs, retry_at)
                    .await
                {
                    Ok(_) if dead => {
                        JobMetrics::add(&self.metrics.dead, 1);
                        tracing::error!(channel = %job.channel, job = %job.job_id, attempts = runs, error = %failure.error, "job dead-lettered");
                    }
                    Ok(_) => {
                        JobMetrics::add(&self.metrics.retries_scheduled, 1);
                        tracing::warn!(channel = %job.channel, job = %job.job_id, attempt = job.attempt, error = %failure.error, retry_in_ms = retry_at.unwrap_or(0).saturating_sub(now_ms()), "job failed; retry scheduled");
                    }
                    Err(e) => {
                        tracing::error!(channel = %job.channel, job = %job.job_id, error = %e, "could not record a failed job; it runs again after the job timeout");
                    }
                }
            }
        }
        if let Ok(mut held) = in_hand.lock()
            && let Some(ids) = held.get_mut(&job.channel)
        {
            ids.remove(&job.entry_id);
        }
    }
}

/// Acknowledges done jobs in batches: one XACK + XDEL per channel per round trip.
async fn ack_loop(
    runner: Arc<JobRunner>,
    mut done: mpsc::UnboundedReceiver<(String, String)>,
    in_hand: InHand,
) {
    let mut batch = Vec::with_capacity(MAX_ACKS);
    while done.recv_many(&mut batch, MAX_ACKS).await > 0 {
        let mut by_channel: HashMap<String, Vec<String>> = HashMap::new();
        for (c, id) in batch.drain(..) {
            by_channel.entry(c).or_default().push(id);
        }
        for (c, ids) in by_channel {
            let mut tries = 0u32;
            loop {
                match runner.layer.job_ack(&c, &ids).await {
                    Ok(()) => {
                        JobMetrics::add(&runner.metrics.acked, ids.len() as u64);
                        break;
                    }
                    Err(e) if tries < 50 => {
                        tries += 1;
                        if tries == 1 {
                            tracing::warn!(channel = %c, error = %e, "acknowledgement failed; retrying");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        tracing::error!(channel = %c, jobs = ids.len(), error = %e, "could not acknowledge done jobs; they will run again after the job timeout");
                        break;
                    }
                }
            }
            if let Ok(mut held) = in_hand.lock()
                && let Some(set) = held.get_mut(&c)
            {
                for id in &ids {
                    set.remove(id);
                }
            }
        }
    }
}

/// Renews the leases of the jobs in hand every third of the job timeout.
async fn renew_loop(runner: Arc<JobRunner>, in_hand: InHand, stop: CancellationToken) {
    let every = runner.job_timeout / 3;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let held: Vec<(String, Vec<String>)> = match in_hand.lock() {
            Ok(h) => h
                .iter()
                .filter(|(_, ids)| !ids.is_empty())
                .map(|(c, ids)| (c.clone(), ids.iter().cloned().collect()))
                .collect(),
            Err(_) => continue,
        };
        for (c, ids) in held {
            if let Err(e) = runner.layer.job_extend(&c, &runner.consumer, &ids).await {
                tracing::warn!(channel = %c, error = %e, "could not renew the lease of running jobs");
            }
        }
    }
}

/// Logs a warning per Redis server whose persistence is off: durable channels are only as
/// durable as Redis is configured (README, "Background jobs").
pub async fn warn_if_not_persistent(layer: &RedisLayer) {
    for (addr, p) in layer.persistence().await {
        match p {
            Some(p) if p.is_off() => tracing::warn!(
                redis = %addr,
                "durable channels are configured but this Redis has persistence off (appendonly no, no RDB save rules): a Redis restart loses every pending job; set appendonly yes"
            ),
            Some(p) if p.appendonly != "yes" => tracing::warn!(
                redis = %addr,
                save = %p.save,
                "durable channels are configured but this Redis only snapshots (appendonly no): a crash loses the jobs sent since the last snapshot; set appendonly yes"
            ),
            Some(p) => {
                tracing::info!(redis = %addr, appendfsync = %p.appendfsync, "durable channels: Redis persistence is on (appendonly yes)")
            }
            None => {
                tracing::info!(redis = %addr, "durable channels: cannot read the Redis persistence settings (CONFIG refused); make sure appendonly is on")
            }
        }
    }
}

//! The worker runtime (`runworker`): per process, one receive loop pops messages in batches from
//! the channels the router listens on (filtered by `--only-channels` / `--exclude-channels`
//! globs), at most as many as it has idle consumers (`--concurrency`), and runs each in its own
//! task: the routed consumer (in that task, not one more), then what it queued, applied only
//! after it returned `Ok`. On Redis a batch costs one BZMPOP (BZPOPMIN + ZPOPMIN before Redis 7)
//! however many messages it holds, instead of one blocked pop per consumer.
//!
//! The loop checks the shutdown token between receives, never during one (a cancelled blocking
//! pop loses its message on Redis), so a graceful stop finishes the messages in hand, waiting at
//! most [`Worker::stop_grace`] (30 s) before aborting those still running. A consumer that errors,
//! panics or runs longer than [`Worker::consumer_timeout`] (5 min; it is then aborted) is logged
//! with its channel and route and the worker goes on; its sends are discarded, except that an
//! `http.request` is answered `500` and a `websocket.connect` `{"close": true}` (so the client is
//! not left waiting for the server's own timeout), and a `websocket.disconnect` still leaves its
//! groups (its `GroupDiscard`s are applied: leaving a group is always safe). Control errors:
//! `DenyConnection` replies `{"close": true}`, `Close(code)` replies `{"close": code}`,
//! `ConsumeLater` requeues with `__retries__` counted, at most [`MAX_RETRIES`] times. Strict
//! ordering and channel sessions are kept in the layer, so any worker can take any message. The
//! task that finished a strictly ordered message runs its parked successor itself (no re-send:
//! nothing to lose on a full channel, no fresh expiry), and so the messages of the same
//! connection this worker receives while it runs one: they wait in that task's lane, holding
//! their consumer slots, and each is gated in the layer step that records its predecessor as
//! done; only messages split across workers park in the layer. A worker that parked a message comes back
//! to its connection once the message could have expired, so that a gap (a predecessor that
//! never came) is skipped by the layer's upkeep even when nothing else arrives.
//!
//! An `http.request` with a `body_channel` (a body the server streamed) is completed before its
//! consumer runs, as Channels 1's `AsgiRequest` did: the task reads the chunks with a receiver
//! of its own (kept in a pool), each within [`Worker::body_receive_timeout`] (60 s, else the
//! worker answers `408 Request Timeout (upload too slow)` itself), up to
//! [`Worker::max_request_body`] (64 MiB, else 413). A `closed` chunk abandons the request
//! without running the consumer. The consumer then sees one message whose `body` is the whole
//! body and which has no `body_channel`.

mod metrics;
mod owned;

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use switchyard_routing::asgi::{
    HTTP_REQUEST, HttpRequestBodyChunk, OWNERS_KEY, WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT,
};
use switchyard_routing::codec;
use switchyard_routing::{
    Action, ByteString, ConsumerError, Ctx, Map, Message, Resolved, Router, Value,
};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::jobs::{JobFailure, JobHandler, JobMetrics, JobRunner, StreamJob};
use crate::layer::owner::{OwnerName, is_owner_channel, owner_channel};
use crate::layer::{
    DEFAULT_BACKPRESSURE_TIMEOUT, Envelope, FullRetry, Gate, Layer, LayerError, Receiver, Upkeep,
    glob, glob_set,
};
use futures_util::future::BoxFuture;
use globset::{GlobSet, GlobSetBuilder};
use switchyard_routing::DurablePolicy;
use switchyard_routing::durable::{ATTEMPT_KEY, JOB_ID_KEY};
use switchyard_routing::settle::{self, Ended, Settlement};

#[cfg(feature = "django")]
pub use crate::django::{DjangoSessionConfig, DjangoSessions};
pub use metrics::{LATENCY_BUCKETS_MS, WorkerMetrics, WorkerMetricsSnapshot};

/// `ConsumeLater` requeues per message before it is dropped (Channels' `message_retries`).
pub const MAX_RETRIES: u32 = 10;

/// Channel-session key remembering the connection's web-session key.
pub const HTTP_SESSION_KEY: &str = "_http_session_key";

/// Default wait for each chunk of a streamed request body (Channels 1's `body_receive_timeout`).
pub const BODY_RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default limit on a request body assembled from its chunks.
pub const MAX_REQUEST_BODY: usize = 64 << 20;

/// Default limit on one consumer run; a consumer still running is aborted.
pub const CONSUMER_TIMEOUT: Duration = Duration::from_secs(300);

/// Default wait, after a stop is asked, for the messages in hand to finish.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// Default number of messages a worker runs at once. A message holds its slot until its replies
/// are written to the layer, so a process carries at most this many per round trip or two; a
/// strictly ordered connection waiting its turn holds a slot too.
pub const DEFAULT_CONCURRENCY: usize = 256;

/// Most messages one pop takes (for that many idle consumers).
pub(crate) const MAX_BATCH: usize = 64;

/// Waits for at least one idle consumer slot (or shutdown: `None`) and takes every other idle
/// one too, up to [`MAX_BATCH`]: a receive loop pops only for consumers that are idle now, so no
/// message waits in this process behind busy ones while another worker could run it.
pub(crate) async fn idle_batch(
    idle: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let mut permits = tokio::select! {
        biased;
        () = shutdown.cancelled() => return None,
        permit = Arc::clone(idle).acquire_owned() => permit.ok()?,
    };
    let more = idle.available_permits().min(MAX_BATCH - 1);
    if more > 0
        && let Ok(p) = Arc::clone(idle).try_acquire_many_owned(more as u32)
    {
        permits.merge(p);
    }
    Some(permits)
}

/// Most connections a worker remembers to come back to (see [`Worker::run`]); past it, gaps are
/// still skipped when the connection's next message arrives.
const MAX_REVISITS: usize = 100_000;

/// How long a message holds its connection's turn beyond the consumer timeout (the time to
/// record it as done).
const HOLD_MARGIN: Duration = Duration::from_secs(5);

/// Why a worker could not run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// After the channel filters, nothing is left to listen on.
    #[error("the worker has no channels to listen on (router: {router:?}; after filters: none)")]
    NoChannels {
        /// The router's channels.
        router: Vec<String>,
    },
    /// The layer failed in a way the worker cannot ride out (e.g. no receiver).
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A setting that makes no sense.
    #[error("invalid worker configuration: {0}")]
    Config(String),
}

/// A worker: a layer, a router and how to run them.
#[derive(Debug, Clone)]
pub struct Worker {
    layer: Layer,
    router: Arc<Router>,
    concurrency: usize,
    /// `None`: every channel of the router.
    only: Option<GlobSet>,
    exclude: GlobSet,
    receive_timeout: Duration,
    max_retries: u32,
    metrics: Arc<WorkerMetrics>,
    #[cfg(feature = "django")]
    http_sessions: Option<Arc<DjangoSessions>>,
    body_receive_timeout: Duration,
    max_request_body: usize,
    consumer_timeout: Duration,
    stop_grace: Duration,
    backpressure_timeout: Duration,
    /// Connections with messages parked by this worker, and when to run their upkeep.
    revisits: Arc<Mutex<Vec<(String, Instant)>>>,
    /// Connections whose turn a task of this worker runs now, with the messages of them this
    /// worker holds meanwhile.
    lanes: Arc<Mutex<HashMap<String, Lane>>>,
    /// Receivers kept for reading streamed request bodies (each holds its own Redis
    /// connection), at most one per consumer.
    body_receivers: Arc<Mutex<Vec<Receiver>>>,
    /// Visibility timeout of durable channels (see [`crate::jobs`]).
    job_timeout: Duration,
    job_metrics: Arc<JobMetrics>,
    /// Whether this worker may own sockets (see [`owned`]).
    owners: bool,
    /// This worker's name as a connection owner, while it holds a lease (see [`owned`]).
    owner: Option<OwnerName>,
    /// The owned connections a task of this worker runs now, with their messages waiting.
    owned_lanes: Arc<Mutex<HashMap<String, owned::OwnedLane>>>,
}

/// The messages of one connection this worker holds while one of its tasks runs the
/// connection's turn (see [`Worker::run_ordered`]), by order.
#[derive(Debug, Default)]
struct Lane {
    waiting: BTreeMap<u64, Held>,
}

/// A strictly ordered message in hand, decoded and routed, with the consumer slot it holds.
#[derive(Debug)]
struct Held {
    message: Message,
    resolved: Resolved,
    order: u64,
    started: Instant,
    /// Released when the message has run (or left the worker).
    _slot: Option<OwnedSemaphorePermit>,
}

/// What the gate decided for a message in a lane.
enum Turn {
    /// Its turn: run it.
    Run,
    /// Not run here (parked, stale, requeued, dropped); the parked message whose turn came
    /// instead, if any.
    Over(Option<Envelope>),
}

/// Where a message its consumer cannot take now (`ConsumeLater`, a channel session unreachable)
/// goes.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// Back on its channel, behind what waits there.
    Requeue,
    /// Back to its caller, to run again in place: an owner keeps a connection's messages in
    /// order by running them one after another, so a requeue must not send one past the rest.
    InPlace,
}

/// What a message's run came to.
enum Ran {
    /// It ran, failed, or was given up: its turn is over.
    Over,
    /// Requeued on its channel: its turn is not over.
    Requeued,
    /// To run again ([`Retry::InPlace`]), its retries counted.
    Again(Message),
}

/// How a consumer run ended.
enum Outcome {
    Returned(Result<(), ConsumerError>),
    Panicked(String),
    TimedOut,
}

/// `--only-channels` / `--exclude-channels` globs, compiled once. A glob that does not compile is
/// logged and matches nothing (the builder cannot fail; a worker left with no channel says so).
fn channel_filter<S: AsRef<str>>(globs: &[S]) -> GlobSet {
    let mut set = GlobSetBuilder::new();
    for pattern in globs {
        match glob(pattern.as_ref()) {
            Ok(g) => {
                set.add(g);
            }
            Err(e) => tracing::warn!(error = %e, "invalid channel glob; it matches nothing"),
        }
    }
    set.build().unwrap_or_else(|_| GlobSet::empty())
}

impl Worker {
    /// A worker listening on every channel of the router, running up to
    /// [`DEFAULT_CONCURRENCY`] messages at once.
    pub fn new(layer: Layer, router: Arc<Router>) -> Self {
        Worker {
            layer,
            router,
            concurrency: DEFAULT_CONCURRENCY,
            only: None,
            exclude: GlobSet::empty(),
            receive_timeout: Duration::from_secs(1),
            max_retries: MAX_RETRIES,
            metrics: Arc::default(),
            #[cfg(feature = "django")]
            http_sessions: None,
            body_receive_timeout: BODY_RECEIVE_TIMEOUT,
            max_request_body: MAX_REQUEST_BODY,
            consumer_timeout: CONSUMER_TIMEOUT,
            stop_grace: STOP_GRACE,
            backpressure_timeout: DEFAULT_BACKPRESSURE_TIMEOUT,
            revisits: Arc::default(),
            lanes: Arc::default(),
            body_receivers: Arc::default(),
            job_timeout: crate::jobs::JOB_TIMEOUT,
            job_metrics: Arc::default(),
            owners: true,
            owner: None,
            owned_lanes: Arc::default(),
        }
    }

    /// Longest a consumer may run on one message (5 min). One still running is aborted, counted
    /// in [`WorkerMetrics::timeouts`] and logged with its channel and route; an `http.request`
    /// is answered 500 and a `websocket.connect` closed. A strictly ordered message holds its
    /// connection's turn this long (plus a few seconds).
    pub fn consumer_timeout(mut self, timeout: Duration) -> Self {
        self.consumer_timeout = timeout;
        self
    }

    /// After the stop token is cancelled, how long the messages in hand may take to finish
    /// before they are aborted (30 s). Aborting a task in a receive can lose the message
    /// it was popping, so this should stay well above the receive timeout.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// How long a consumer's send waits for room in a full channel before it is dropped and
    /// counted ([`DEFAULT_BACKPRESSURE_TIMEOUT`], 10 s; the server's bound for client messages).
    pub fn backpressure_timeout(mut self, timeout: Duration) -> Self {
        self.backpressure_timeout = timeout;
        self
    }

    /// Number of messages run at once (the consumers of this process; one pop takes at most this
    /// many).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Whether this worker may own the strictly ordered sockets it accepts (on by default
    /// where the layer supports it: see [`crate::layer::owner`]). Off, their order is kept in
    /// the layer instead.
    pub fn owners(mut self, on: bool) -> Self {
        self.owners = on;
        self
    }

    /// Listen only on the router's channels matching one of these globs.
    pub fn only_channels<S: AsRef<str>>(mut self, globs: &[S]) -> Self {
        self.only = (!globs.is_empty()).then(|| channel_filter(globs));
        self
    }

    /// Do not listen on channels matching one of these globs.
    pub fn exclude_channels<S: AsRef<str>>(mut self, globs: &[S]) -> Self {
        self.exclude = channel_filter(globs);
        self
    }

    /// How long one receive blocks before the loop checks for shutdown (1 s).
    pub fn receive_timeout(mut self, timeout: Duration) -> Self {
        self.receive_timeout = timeout;
        self
    }

    /// `ConsumeLater` requeues per message before it is dropped (10).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// How long the worker waits for each chunk of a streamed request body before answering 408
    /// itself and dropping the request (60 s).
    pub fn body_receive_timeout(mut self, timeout: Duration) -> Self {
        self.body_receive_timeout = timeout;
        self
    }

    /// Largest request body the worker assembles from `body_channel` chunks; a larger one is
    /// answered 413 and its consumer not run (64 MiB).
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// Reads web sessions (Django's, in Redis) for routes that ask for them.
    #[cfg(feature = "django")]
    pub fn http_sessions(mut self, sessions: DjangoSessions) -> Self {
        self.http_sessions = Some(Arc::new(sessions));
        self
    }

    /// The worker's counters.
    pub fn metrics(&self) -> Arc<WorkerMetrics> {
        self.metrics.clone()
    }

    /// Durable channels: a job whose worker stopped renewing its lease this long ago runs again
    /// on another worker (5 min; see [`crate::jobs`]).
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = timeout;
        self
    }

    /// The durable-channel counters.
    pub fn job_metrics(&self) -> Arc<JobMetrics> {
        self.job_metrics.clone()
    }

    /// The channels this worker listens on that are durable, with their policies: those the
    /// routes declare durable, then those matching the layer's `--durable-channels` globs
    /// (default policy).
    pub fn durable_channels(&self) -> Vec<(String, DurablePolicy)> {
        let listened = self.channels();
        // The layer refused invalid ones when it was built.
        let globs =
            glob_set(&self.layer.settings().durable_channels).unwrap_or_else(|_| GlobSet::empty());
        let mut out: Vec<(String, DurablePolicy)> = self
            .router
            .durable_channels()
            .into_iter()
            .filter(|(c, _)| listened.contains(c))
            .collect();
        for c in &listened {
            if !out.iter().any(|(d, _)| d == c) && !c.contains(['!', '?']) && globs.is_match(c) {
                out.push((c.clone(), DurablePolicy::default()));
            }
        }
        out
    }

    /// The channels this worker listens on: the router's, filtered by the globs.
    pub fn channels(&self) -> Vec<String> {
        self.router
            .channels()
            .iter()
            .filter(|c| self.only.as_ref().is_none_or(|only| only.is_match(c)))
            .filter(|c| !self.exclude.is_match(c))
            .cloned()
            .collect()
    }

    /// Runs until `shutdown` is cancelled, then finishes the messages in hand and returns.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        if self.concurrency == 0 {
            return Err(WorkerError::Config("concurrency must be at least 1".into()));
        }
        if self.consumer_timeout.is_zero() {
            return Err(WorkerError::Config(
                "consumer timeout must be positive".into(),
            ));
        }
        if self.body_receive_timeout.is_zero() {
            return Err(WorkerError::Config(
                "body receive timeout must be positive".into(),
            ));
        }
        let durable = self.durable_channels();
        let channels: Vec<String> = self
            .channels()
            .into_iter()
            .filter(|c| !durable.iter().any(|(d, _)| d == c))
            .collect();
        if channels.is_empty() && durable.is_empty() {
            return Err(WorkerError::NoChannels {
                router: self.router.channels().to_vec(),
            });
        }
        let jobs = self.start_jobs(durable, &shutdown).await?;
        if channels.is_empty() {
            shutdown.cancelled().await;
            if let Some(jobs) = jobs {
                let _ = jobs.await;
            }
            tracing::info!("worker stopped");
            return Ok(());
        }
        let mut channels = channels;
        let owner_lease = if self.owners && Worker::may_own(&channels) {
            match self.layer.start_owner().await {
                Ok(lease) => lease,
                Err(e) => {
                    tracing::warn!(error = %e, "could not take a connection owner's lease; strictly ordered sockets keep the layer's ordering");
                    None
                }
            }
        } else {
            None
        };
        self.owner = owner_lease.as_ref().map(|lease| lease.name().clone());
        let base_channels = channels.clone();
        let mut read_owner = self.owner.as_ref().map(OwnerName::get);
        channels.extend(read_owner.as_deref().map(owner_channel));
        tracing::info!(
            layer = %self.layer.describe(),
            mode = self.layer.mode(),
            concurrency = self.concurrency,
            channels = ?channels,
            "worker listening"
        );
        let mut channels: Arc<[String]> = channels.into();
        let this = Arc::new(self);
        let mut receiver = this.layer.receiver().await?;
        let idle = Arc::new(Semaphore::new(this.concurrency));
        let mut running = JoinSet::new();
        let mut failures = 0u32;
        loop {
            let Some(mut permits) = idle_batch(&idle, &shutdown).await else {
                break;
            };
            let owner = this.owner.as_ref().map(OwnerName::get);
            if owner != read_owner {
                // A new owner name: its channel replaces the old one's, no longer read.
                let mut renamed = base_channels.clone();
                renamed.extend(owner.as_deref().map(owner_channel));
                channels = renamed.into();
                read_owner = owner;
            }
            match receiver
                .receive_many(&channels, this.receive_timeout, permits.num_permits())
                .await
            {
                Ok(batch) => {
                    failures = 0;
                    this.metrics
                        .receive_failures_in_a_row
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                    for envelope in batch {
                        // A group message for several local targets can outnumber the permits.
                        let permit = permits.split(1);
                        if is_owner_channel(&envelope.channel) {
                            this.take_owned(envelope, permit, &mut running);
                            continue;
                        }
                        let this = this.clone();
                        // The handling is boxed: the task then holds a pointer, not the
                        // handling's whole state, which spawning and finishing a task
                        // copied several times (a third of the worker's instructions per
                        // echo went to those copies).
                        running.spawn(async move {
                            Box::pin(this.handle_in_slot(envelope, permit)).await;
                        });
                    }
                }
                Err(e) => {
                    failures += 1;
                    this.metrics
                        .receive_failures_in_a_row
                        .store(u64::from(failures), std::sync::atomic::Ordering::Relaxed);
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(error = %e, "receive failed; retrying");
                    }
                    let pause = Duration::from_millis(50 * u64::from(failures.min(20)));
                    tokio::time::sleep(pause).await;
                }
            }
            drop(permits);
            this.revisit_due(&mut running);
            while let Some(joined) = running.try_join_next() {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a message task ended abnormally");
                }
            }
        }
        let grace = this.stop_grace;
        let finished = tokio::time::timeout(grace, async {
            while let Some(joined) = running.join_next().await {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a message task ended abnormally");
                }
            }
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                busy = running.len(),
                grace_ms = grace.as_millis() as u64,
                "stop grace over; aborting the messages still running (they are lost)"
            );
            running.abort_all();
            while running.join_next().await.is_some() {}
        }
        if let Some(lease) = owner_lease {
            // Only now that its messages have run: the servers then move what waits for this
            // worker back to the shared channels, where nothing overtakes what ran here.
            lease.release().await;
        }
        if let Some(jobs) = jobs {
            let _ = jobs.await;
        }
        tracing::info!("worker stopped");
        Ok(())
    }

    /// Starts the runner of the durable channels (Redis only), after warning when Redis would
    /// lose them on a restart.
    async fn start_jobs(
        &self,
        durable: Vec<(String, DurablePolicy)>,
        shutdown: &CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, WorkerError> {
        if durable.is_empty() {
            return Ok(None);
        }
        let Layer::Redis(redis) = &self.layer else {
            return Err(WorkerError::Config(
                crate::layer::memory::DURABLE_NEEDS_REDIS.into(),
            ));
        };
        crate::jobs::warn_if_not_persistent(redis).await;
        let runner = JobRunner::new(
            redis.clone(),
            durable,
            Arc::new(self.clone()),
            self.concurrency,
        )
        .job_timeout(self.job_timeout)
        .stop_grace(self.stop_grace)
        .metrics(self.job_metrics.clone());
        let shutdown = shutdown.clone();
        Ok(Some(tokio::spawn(async move {
            if let Err(e) = runner.run(shutdown).await {
                tracing::error!(error = %e, "durable channels could not start");
            }
        })))
    }

    /// Runs one durable job: its consumer, then its sends; `Ok` only when both succeeded.
    async fn run_job(&self, job: &StreamJob) -> Result<(), JobFailure> {
        let started = Instant::now();
        self.metrics.received(&job.channel);
        let mut message = Message::from_payload(job.channel.clone(), job.payload.clone())
            .map_err(|e| JobFailure::permanent(format!("undecodable message: {e}")))?;
        message
            .content
            .insert(JOB_ID_KEY, Value::Str(job.job_id.clone()));
        message
            .content
            .insert(ATTEMPT_KEY, Value::Int(i64::from(job.attempt)));
        let Some(resolved) = self.router.resolve(&message) else {
            WorkerMetrics::add(&self.metrics.unrouted, 1);
            return Err(JobFailure::permanent("no route for the message"));
        };
        let ctx = Ctx::new(&message, resolved.kwargs);
        let call = AssertUnwindSafe(resolved.handler.call(message.clone(), ctx.clone()));
        let outcome = match tokio::time::timeout(self.consumer_timeout, call.catch_unwind()).await {
            Ok(Ok(returned)) => Outcome::Returned(returned),
            Ok(Err(panic)) => Outcome::Panicked(panic_text(panic)),
            Err(_) => Outcome::TimedOut,
        };
        let result = match outcome {
            Outcome::Returned(Ok(()))
            | Outcome::Returned(Err(ConsumerError::DenyConnection | ConsumerError::Close(_))) => {
                WorkerMetrics::add(&self.metrics.consumed, 1);
                let mut applied = true;
                for action in ctx.take_actions() {
                    applied &= self.apply(&message.channel, action).await;
                }
                if applied {
                    Ok(())
                } else {
                    Err(JobFailure::retry("a send of the consumer failed"))
                }
            }
            Outcome::Returned(Err(e)) => {
                WorkerMetrics::add(&self.metrics.errors, 1);
                Err(JobFailure::retry(e.to_string()))
            }
            Outcome::Panicked(what) => {
                WorkerMetrics::add(&self.metrics.panics, 1);
                Err(JobFailure::retry(format!("consumer panicked: {what}")))
            }
            Outcome::TimedOut => {
                WorkerMetrics::add(&self.metrics.timeouts, 1);
                Err(JobFailure::retry(format!(
                    "consumer timed out after {} ms",
                    self.consumer_timeout.as_millis()
                )))
            }
        };
        self.metrics.observe(started.elapsed());
        result
    }

    /// Starts ordering upkeep for the connections whose parked messages could have expired by
    /// now, each running the parked message whose turn that brings.
    fn revisit_due(self: &Arc<Self>, running: &mut JoinSet<()>) {
        let mut due: Vec<String> = {
            let mut revisits = self.revisits.lock().unwrap_or_else(|p| p.into_inner());
            if revisits.is_empty() {
                return;
            }
            let now = Instant::now();
            let mut due = Vec::new();
            revisits.retain(|(reply, at)| {
                if *at <= now {
                    due.push(reply.clone());
                    false
                } else {
                    true
                }
            });
            due
        };
        due.sort_unstable();
        due.dedup();
        for reply in due {
            let this = self.clone();
            running.spawn(async move { this.revisit(&reply).await });
        }
    }

    async fn revisit(&self, reply: &str) {
        match self.layer.ordering_upkeep(reply).await {
            Ok(u) => {
                if let Some(resume) = self.note_upkeep(reply, u) {
                    self.handle(resume).await;
                }
            }
            Err(e) => {
                tracing::warn!(reply_channel = %reply, error = %e, "ordering upkeep failed; trying again later");
                self.revisit_later(reply);
            }
        }
    }

    /// Remembers to run ordering upkeep for `reply` once a message parked now could have expired.
    fn revisit_later(&self, reply: &str) {
        let at = Instant::now() + self.layer.settings().expiry + Duration::from_millis(100);
        let mut revisits = self.revisits.lock().unwrap_or_else(|p| p.into_inner());
        if revisits.len() < MAX_REVISITS {
            revisits.push((reply.to_owned(), at));
        }
    }

    /// Counts what ordering upkeep did; returns the parked message to run next.
    fn note_upkeep(&self, reply: &str, upkeep: Upkeep) -> Option<Envelope> {
        let Upkeep {
            expired,
            skipped,
            resume,
            restarted,
        } = upkeep;
        if restarted {
            WorkerMetrics::add(&self.metrics.ordering_restarted, 1);
            tracing::warn!(
                reply_channel = %reply,
                "strict ordering: no state recorded for this connection (the layer lost it); its order restarts at this message"
            );
        }
        if expired > 0 || skipped > 0 {
            WorkerMetrics::add(&self.metrics.ordering_expired, expired);
            WorkerMetrics::add(&self.metrics.ordering_skipped, skipped);
            tracing::warn!(
                reply_channel = %reply,
                expired,
                skipped,
                "strict ordering: dropped parked messages older than the expiry / skipped missing orders"
            );
        }
        resume.map(|(channel, payload)| Envelope { channel, payload })
    }

    /// Runs one message through routing, ordering, the consumer and its outbox, then the parked
    /// messages of the same connection whose turn that brings.
    pub async fn handle(&self, envelope: Envelope) {
        self.handle_in_slot(envelope, None).await;
    }

    /// [`Worker::handle`] for a message that holds one of the consumer slots (`slot`): a strictly
    /// ordered message that waits behind its connection's running message keeps its slot until
    /// it has run.
    async fn handle_in_slot(&self, envelope: Envelope, slot: Option<OwnedSemaphorePermit>) {
        let started = Instant::now();
        let Some((message, resolved)) = self.prepare(envelope).await else {
            return;
        };
        if resolved.options.strict_ordering
            && let (Some(reply), Some(order)) = (message.reply_channel(), message.order())
        {
            let reply = reply.to_owned();
            let held = Held {
                message,
                resolved,
                order,
                started,
                _slot: slot,
            };
            self.run_ordered(reply, held).await;
            return;
        }
        self.run_consumer(message, resolved).await;
        self.metrics.observe(started.elapsed());
    }

    /// Decodes and routes a message (and completes a streamed request body); `None` when it was
    /// dropped or answered instead.
    async fn prepare(&self, envelope: Envelope) -> Option<(Message, Resolved)> {
        self.metrics.received(&envelope.channel);
        let message = match Message::from_payload(envelope.channel.clone(), envelope.payload) {
            Ok(m) => m,
            Err(e) => {
                WorkerMetrics::add(&self.metrics.dropped, 1);
                tracing::error!(channel = %envelope.channel, error = %e, "dropped an undecodable message");
                return None;
            }
        };
        let Some(resolved) = self.router.resolve(&message) else {
            WorkerMetrics::add(&self.metrics.unrouted, 1);
            tracing::warn!(channel = %message.channel, path = ?message.path(), "no route for message; dropped");
            if let Some(answer) = settle::unrouted(&message) {
                self.apply(&message.channel, answer).await;
            }
            return None;
        };
        let message = if message.channel == HTTP_REQUEST && message.get("body_channel").is_some() {
            self.assemble_body(message).await?
        } else {
            message
        };
        Some((message, resolved))
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lane>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a strictly ordered message, then every message of the same connection this worker
    /// came to hold meanwhile, one after another in this task: while a task of this worker runs
    /// a connection's turn (its lane), the connection's other messages this worker receives
    /// wait in the lane, not parked in the layer, and the next one is gated in the same layer
    /// step that records its predecessor as done. Only messages split across workers park in
    /// the layer. A waiting message keeps the consumer slot it came with, so a worker holds no
    /// more messages than its concurrency, as without ordering.
    async fn run_ordered(&self, reply: String, held: Held) {
        {
            let mut lanes = self.lanes();
            if let Some(lane) = lanes.get_mut(&reply) {
                match lane.waiting.entry(held.order) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(held);
                    }
                    std::collections::btree_map::Entry::Occupied(_) => {
                        WorkerMetrics::add(&self.metrics.duplicates, 1);
                        tracing::warn!(channel = %held.message.channel, reply_channel = %reply, order = held.order, "message already in hand (duplicate order); dropped");
                    }
                }
                return;
            }
            lanes.insert(reply.clone(), Lane::default());
        }
        let hold = self.consumer_timeout.saturating_add(HOLD_MARGIN);
        let mut next = Some(held);
        // True when `next` passed the gate already (in the step that recorded its predecessor).
        let mut gated = false;
        loop {
            let current = match next.take() {
                Some(h) => h,
                None => {
                    let mut lanes = self.lanes();
                    match lanes.get_mut(&reply).and_then(|l| l.waiting.pop_first()) {
                        Some((_, h)) => h,
                        None => {
                            lanes.remove(&reply);
                            return;
                        }
                    }
                }
            };
            if !std::mem::take(&mut gated) {
                match self.gate(&reply, &current, hold).await {
                    Turn::Run => {}
                    Turn::Over(resume) => {
                        next = self.held_from(&reply, resume).await;
                        continue;
                    }
                }
            }
            let Held {
                message,
                resolved,
                order,
                started,
                _slot,
            } = current;
            let last = message.channel == WEBSOCKET_DISCONNECT;
            let finished = self
                .run_holding_turn(&reply, order, message, resolved, hold)
                .await;
            self.metrics.observe(started.elapsed());
            if !finished {
                // Requeued: its turn is not over, so the next message gates on its own.
                continue;
            }
            let waiting = if last {
                None
            } else {
                self.lanes()
                    .get_mut(&reply)
                    .and_then(|l| l.waiting.pop_first())
                    .map(|(_, h)| h)
            };
            let resume = match waiting {
                None => self.ordering_done(&reply, order, last).await,
                Some(w) => match self
                    .layer
                    .ordering_done_then_gate(
                        &reply,
                        order,
                        w.order,
                        &w.message.channel,
                        &w.message.payload,
                        hold,
                    )
                    .await
                {
                    Ok(outcome) => {
                        let u = outcome.upkeep;
                        let resume = self.note_upkeep(&reply, u);
                        match self.verdict(&reply, &w.message, w.order, outcome.gate, resume) {
                            Turn::Run => {
                                WorkerMetrics::add(&self.metrics.ordering_held, 1);
                                next = Some(w);
                                gated = true;
                                None
                            }
                            Turn::Over(resume) => resume,
                        }
                    }
                    Err(e) => {
                        tracing::error!(reply_channel = %reply, order, error = %e, "could not record the message as run; its successors wait for ordering upkeep (up to the expiry)");
                        self.revisit_later(&reply);
                        next = Some(w);
                        None
                    }
                },
            };
            if let Some(h) = self.held_from(&reply, resume).await {
                match next.take() {
                    None => next = Some(h),
                    Some(n) => {
                        // Not expected (a resume comes only when the held one does not run);
                        // kept in the lane rather than lost.
                        next = Some(n);
                        if let Some(lane) = self.lanes().get_mut(&reply) {
                            lane.waiting.entry(h.order).or_insert(h);
                        }
                    }
                }
            }
        }
    }

    /// Runs a strictly ordered message that passed its gate. The layer's quick gate records no
    /// hold against ordering upkeep (it only reads `next`), so a consumer still running at half
    /// the layer expiry records one then, before any successor parked meanwhile could have
    /// waited the expiry and had upkeep skip this message.
    async fn run_holding_turn(
        &self,
        reply: &str,
        order: u64,
        message: Message,
        resolved: Resolved,
        hold: Duration,
    ) -> bool {
        let consumer = self.run_consumer(message, resolved);
        tokio::pin!(consumer);
        tokio::select! {
            finished = &mut consumer => finished,
            () = tokio::time::sleep(self.layer.settings().expiry / 2) => {
                match self.layer.ordering_hold(reply, order, hold).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(reply_channel = %reply, order, "strict ordering: a long-running message was no longer its connection's turn when it recorded its hold");
                    }
                    Err(e) => {
                        tracing::warn!(reply_channel = %reply, order, error = %e, "strict ordering: could not record a long-running message's hold");
                    }
                }
                consumer.await
            }
        }
    }

    /// A parked message handed back by the layer, ready to run in the lane of `reply`. One that
    /// is not strictly ordered for `reply` after all is run right away.
    async fn held_from(&self, reply: &str, resume: Option<Envelope>) -> Option<Held> {
        let envelope = resume?;
        let started = Instant::now();
        let (message, resolved) = self.prepare(envelope).await?;
        match (message.reply_channel(), message.order()) {
            (Some(r), Some(order)) if r == reply && resolved.options.strict_ordering => {
                Some(Held {
                    message,
                    resolved,
                    order,
                    started,
                    _slot: None,
                })
            }
            _ => {
                self.run_consumer(message, resolved).await;
                self.metrics.observe(started.elapsed());
                None
            }
        }
    }

    /// Passes a message of `reply`'s lane through the layer's gate.
    async fn gate(&self, reply: &str, held: &Held, hold: Duration) -> Turn {
        let message = &held.message;
        let order = held.order;
        match self
            .layer
            .ordering_gate(reply, order, &message.channel, &message.payload, hold)
            .await
        {
            Ok(outcome) => {
                let u = outcome.upkeep;
                let resume = self.note_upkeep(reply, u);
                self.verdict(reply, message, order, outcome.gate, resume)
            }
            Err(e) if e.is_unavailable() => {
                // Without the gate we cannot keep order; requeue rather than run out of turn.
                tracing::warn!(channel = %message.channel, error = %e, "ordering gate unavailable; requeueing");
                if self.requeue(message).await {
                    // Given up: free its turn if the layer is back, else upkeep skips it.
                    self.revisit_later(reply);
                    let last = message.channel == WEBSOCKET_DISCONNECT;
                    return Turn::Over(self.ordering_done(reply, order, last).await);
                }
                Turn::Over(None)
            }
            Err(e) => {
                // A permanent error (a bad reply channel name): retrying cannot help.
                WorkerMetrics::add(&self.metrics.dropped, 1);
                tracing::error!(channel = %message.channel, reply_channel = %reply, error = %e, "strict ordering refused the message; dropped");
                Turn::Over(None)
            }
        }
    }

    /// What the gate's verdict means for the message.
    fn verdict(
        &self,
        reply: &str,
        message: &Message,
        order: u64,
        gate: Gate,
        resume: Option<Envelope>,
    ) -> Turn {
        match gate {
            Gate::Run => Turn::Run,
            Gate::Parked => {
                WorkerMetrics::add(&self.metrics.parked, 1);
                tracing::debug!(channel = %message.channel, reply_channel = %reply, order, "parked until its predecessors have run");
                self.revisit_later(reply);
                Turn::Over(resume)
            }
            Gate::Stale => {
                WorkerMetrics::add(&self.metrics.duplicates, 1);
                tracing::warn!(channel = %message.channel, reply_channel = %reply, order, "message already run (duplicate order); dropped");
                Turn::Over(resume)
            }
        }
    }

    /// Records a strictly ordered message as run; returns its parked successor to run next.
    async fn ordering_done(&self, reply: &str, order: u64, last: bool) -> Option<Envelope> {
        match self.layer.ordering_done(reply, order, last).await {
            Ok(u) => self.note_upkeep(reply, u),
            Err(e) => {
                tracing::error!(reply_channel = %reply, order, error = %e, "could not record the message as run; its successors wait for ordering upkeep (up to the expiry)");
                self.revisit_later(reply);
                None
            }
        }
    }

    /// Reads a streamed request body from its `body_channel` and returns the request with the
    /// whole body in `body` and no `body_channel`; `None` when the request was answered (408,
    /// 413, 400) or abandoned instead.
    async fn assemble_body(&self, message: Message) -> Option<Message> {
        let pooled = self
            .body_receivers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut receiver = match pooled {
            Some(r) => r,
            None => match self.layer.receiver().await {
                Ok(r) => r,
                Err(e) => {
                    WorkerMetrics::add(&self.metrics.dropped, 1);
                    tracing::error!(error = %e, "no receiver for a request body; request dropped");
                    return None;
                }
            },
        };
        let whole = self.read_body(message, &mut receiver).await;
        // Only a receiver whose reads all completed goes back (an aborted read drops it).
        let mut pool = self
            .body_receivers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.concurrency {
            pool.push(receiver);
        }
        whole
    }

    async fn read_body(&self, message: Message, receiver: &mut Receiver) -> Option<Message> {
        let started = Instant::now();
        let Some(body_channel) = message.get_str("body_channel").map(str::to_owned) else {
            WorkerMetrics::add(&self.metrics.dropped, 1);
            tracing::error!(reply_channel = ?message.reply_channel(), "http.request with a body_channel that is not a string; dropped");
            self.reply_http(&message, 400, "400 Bad Request (invalid body_channel)\n")
                .await;
            return None;
        };
        let mut body: Vec<u8> = match message.get("body") {
            None | Some(Value::Nil) => Vec::new(),
            Some(Value::Bytes(b)) => b.as_slice().to_vec(),
            Some(_) => {
                WorkerMetrics::add(&self.metrics.dropped, 1);
                tracing::error!(reply_channel = ?message.reply_channel(), "http.request whose body is not bytes; dropped");
                self.reply_http(&message, 400, "400 Bad Request (invalid body)\n")
                    .await;
                return None;
            }
        };
        let channels = [body_channel];
        let mut chunks = 0u64;
        loop {
            let Some(envelope) = self.next_body_chunk(receiver, &channels).await else {
                WorkerMetrics::add(&self.metrics.bodies_timed_out, 1);
                tracing::warn!(body_channel = %channels[0], reply_channel = ?message.reply_channel(), received = body.len(), chunks, "request body chunk not received in time; answered 408");
                self.reply_http(&message, 408, "408 Request Timeout (upload too slow)\n")
                    .await;
                return None;
            };
            let chunk: HttpRequestBodyChunk = match envelope.decode() {
                Ok(c) => c,
                Err(e) => {
                    WorkerMetrics::add(&self.metrics.dropped, 1);
                    tracing::error!(body_channel = %channels[0], error = %e, "undecodable request body chunk; answered 400");
                    self.reply_http(&message, 400, "400 Bad Request (invalid body chunk)\n")
                        .await;
                    return None;
                }
            };
            chunks += 1;
            if chunk.closed {
                WorkerMetrics::add(&self.metrics.bodies_abandoned, 1);
                tracing::info!(body_channel = %channels[0], reply_channel = ?message.reply_channel(), received = body.len(), chunks, "client went away mid-body; request abandoned");
                return None;
            }
            if body.len().saturating_add(chunk.content.as_slice().len()) > self.max_request_body {
                WorkerMetrics::add(&self.metrics.bodies_too_large, 1);
                tracing::warn!(body_channel = %channels[0], limit = self.max_request_body, "streamed request body too large; answered 413");
                self.reply_http(&message, 413, "413 Payload Too Large\n")
                    .await;
                return None;
            }
            body.extend_from_slice(chunk.content.as_slice());
            if !chunk.more_content {
                break;
            }
        }
        let Message {
            channel,
            mut content,
            ..
        } = message;
        let size = body.len();
        content.insert("body", ByteString::from(body));
        content.remove("body_channel");
        match codec::to_msgpack(&content) {
            Ok(payload) => {
                WorkerMetrics::add(&self.metrics.bodies_assembled, 1);
                tracing::debug!(
                    size,
                    chunks,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "request body assembled"
                );
                Some(Message {
                    channel,
                    content,
                    payload: Bytes::from(payload),
                })
            }
            Err(e) => {
                WorkerMetrics::add(&self.metrics.dropped, 1);
                tracing::error!(error = %e, "cannot re-encode an assembled request; dropped");
                None
            }
        }
    }

    /// The next chunk within `body_receive_timeout`, riding out receive errors until then.
    async fn next_body_chunk(
        &self,
        receiver: &mut Receiver,
        channels: &[String],
    ) -> Option<Envelope> {
        let deadline = Instant::now() + self.body_receive_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match receiver.receive(channels, left).await {
                Ok(next) => return next,
                Err(e) => {
                    tracing::warn!(body_channel = %channels[0], error = %e, "request body receive failed; retrying");
                    tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                }
            }
        }
    }

    /// Answers an HTTP request on the worker's own behalf.
    async fn reply_http(&self, message: &Message, status: u16, text: &str) {
        if let Some(reply) = settle::http_reply(message, status, text) {
            self.apply(&message.channel, reply).await;
        }
    }

    /// Runs the consumer and applies its outcome. False when the message was requeued (its turn
    /// is not over); true when it ran, failed, or was given up.
    async fn run_consumer(&self, message: Message, resolved: Resolved) -> bool {
        matches!(
            self.consume(message, resolved, Retry::Requeue).await,
            Ran::Over
        )
    }

    /// [`Worker::run_consumer`], with a message its consumer cannot take now retried as `retry`
    /// says.
    async fn consume(&self, message: Message, resolved: Resolved, retry: Retry) -> Ran {
        let mut ctx = Ctx::new(&message, resolved.kwargs);
        let reply = message.reply_channel().map(str::to_owned);
        if resolved.options.channel_session
            && let Some(reply) = &reply
        {
            match self.layer.session_get(reply).await {
                Ok(s) => ctx = ctx.with_session(s),
                Err(e) => {
                    tracing::warn!(channel = %message.channel, error = %e, "channel session unavailable; requeueing");
                    return self.retry(&message, retry).await;
                }
            }
        }
        if resolved.options.http_session {
            let session = self.http_session(&message, &ctx, resolved.options).await;
            ctx = ctx.with_http_session(session);
        }
        // The consumer gets the message itself, not a copy of its decoded content (which cost
        // more than decoding it). What settling needs afterwards is kept: the channel, and the
        // bytes, decoded again only when the consumer did not simply return (a refusal, a close,
        // a failure and a requeue answer from the message). Those bytes are its content: a
        // message is decoded from them, and a worker that changes it (a streamed body put
        // together) encodes them anew.
        let channel = message.channel.clone();
        let payload = message.payload.clone();
        // The accept of a strictly ordered socket names this worker its owner, when the
        // server said it takes one.
        let mut owns = channel == WEBSOCKET_CONNECT
            && resolved.options.strict_ordering
            && self.owner.is_some()
            && message.get(OWNERS_KEY) == Some(&Value::Bool(true));
        // Run inline in this message's own task: a panic is caught here, a timeout drops the
        // consumer's future, and aborting this task (stop grace over) drops it too.
        let call = AssertUnwindSafe(resolved.handler.call(message, ctx.clone()));
        let outcome = match tokio::time::timeout(self.consumer_timeout, call.catch_unwind()).await {
            Ok(Ok(returned)) => Outcome::Returned(returned),
            Ok(Err(panic)) => Outcome::Panicked(panic_text(panic)),
            Err(_) => Outcome::TimedOut,
        };
        let route = &*resolved.route;
        let returned;
        let ended = match outcome {
            Outcome::Returned(result) => {
                match &result {
                    Ok(()) | Err(ConsumerError::DenyConnection | ConsumerError::Close(_)) => {
                        WorkerMetrics::add(&self.metrics.consumed, 1);
                    }
                    Err(ConsumerError::ConsumeLater) => {}
                    Err(e) => {
                        WorkerMetrics::add(&self.metrics.errors, 1);
                        tracing::error!(channel = %channel, route, reply_channel = ?reply, error = %e, "consumer failed; its sends were discarded");
                    }
                }
                returned = result;
                Ended::Returned(&returned)
            }
            Outcome::Panicked(what) => {
                WorkerMetrics::add(&self.metrics.panics, 1);
                tracing::error!(channel = %channel, route, reply_channel = ?reply, panic = %what, "consumer panicked; its sends were discarded");
                Ended::Aborted
            }
            Outcome::TimedOut => {
                WorkerMetrics::add(&self.metrics.timeouts, 1);
                tracing::error!(channel = %channel, route, reply_channel = ?reply, timeout_ms = self.consumer_timeout.as_millis() as u64, "consumer timed out and was aborted; its sends were discarded");
                Ended::Aborted
            }
        };
        if let Ended::Returned(Ok(())) = ended {
            let mut held = None;
            for action in ctx.take_actions() {
                let action = match action {
                    Action::Send {
                        channel: to,
                        payload,
                    } if owns && reply.as_deref() == Some(to.as_str()) => {
                        // The first reply is the accept; only it is read for an owner.
                        owns = false;
                        self.hold_for_connect(&to);
                        held = Some(to.clone());
                        Action::Send {
                            payload: self.with_owner(payload),
                            channel: to,
                        }
                    }
                    other => other,
                };
                self.apply(&channel, action).await;
            }
            if let Some(reply) = held {
                self.connect_finished(&reply);
            }
            return Ran::Over;
        }
        let message = match Message::from_payload(channel, payload) {
            Ok(message) => message,
            Err(e) => {
                // It decoded before the consumer ran, from these same bytes.
                WorkerMetrics::add(&self.metrics.dropped, 1);
                tracing::error!(error = %e, "a consumed message no longer decodes; its outcome is dropped");
                return Ran::Over;
            }
        };
        match settle::settle(&message, ended, ctx.take_actions()) {
            Settlement::Apply(actions) => {
                for action in actions {
                    self.apply(&message.channel, action).await;
                }
                Ran::Over
            }
            // Requeued: its turn is not over. Given up: it is, so its successors can run.
            Settlement::Requeue => self.retry(&message, retry).await,
        }
    }

    /// The web session: from the message's cookie or `session_key` parameter, else (for frames
    /// and disconnects, which carry no headers) from the key remembered in the channel session
    /// at connect, as Channels' `channel_session_user_from_http` does.
    #[cfg(feature = "django")]
    async fn http_session(
        &self,
        message: &Message,
        ctx: &Ctx,
        options: switchyard_routing::RouteOptions,
    ) -> switchyard_routing::HttpSession {
        let Some(sessions) = &self.http_sessions else {
            return switchyard_routing::HttpSession::anonymous();
        };
        let from_message = crate::django::session_key_of(message, sessions.cookie_name());
        let key = from_message.clone().or_else(|| {
            ctx.session_get(HTTP_SESSION_KEY)
                .and_then(|v| v.as_str().map(str::to_owned))
        });
        let Some(key) = key else {
            return switchyard_routing::HttpSession::anonymous();
        };
        let session = sessions.load_key(&key).await;
        if options.channel_session && from_message.is_some() && session.session_key.is_some() {
            // Remembered only if the consumer succeeds, like any session write.
            let _ = ctx.session_set(HTTP_SESSION_KEY, key);
        }
        session
    }

    /// Without the Django integration no web session is read: every user is anonymous.
    #[cfg(not(feature = "django"))]
    async fn http_session(
        &self,
        _message: &Message,
        _ctx: &Ctx,
        _options: switchyard_routing::RouteOptions,
    ) -> switchyard_routing::HttpSession {
        switchyard_routing::HttpSession::anonymous()
    }

    /// Requeues a `ConsumeLater` message; true when it was given up instead (retries exhausted).
    async fn requeue(&self, message: &Message) -> bool {
        matches!(self.retry(message, Retry::Requeue).await, Ran::Over)
    }

    /// Tries a message again later, as `retry` says, with its retries counted; given up
    /// ([`Ran::Over`]) once they are exhausted.
    async fn retry(&self, message: &Message, retry: Retry) -> Ran {
        let retries = message.retries();
        if retries >= self.max_retries {
            WorkerMetrics::add(&self.metrics.dropped, 1);
            tracing::error!(channel = %message.channel, reply_channel = ?message.reply_channel(), retries, "message requeued too many times; dropped");
            return Ran::Over;
        }
        let mut content: Map = message.content.clone();
        content.insert("__retries__", Value::Int(i64::from(retries) + 1));
        let payload = match codec::to_msgpack(&content) {
            Ok(p) => p,
            Err(e) => {
                WorkerMetrics::add(&self.metrics.dropped, 1);
                tracing::error!(channel = %message.channel, error = %e, "cannot re-encode a message to requeue; dropped");
                return Ran::Over;
            }
        };
        WorkerMetrics::add(&self.metrics.requeued, 1);
        if let Retry::InPlace = retry {
            return Ran::Again(Message {
                channel: message.channel.clone(),
                content,
                payload: Bytes::from(payload),
            });
        }
        match self.layer.send_encoded(&message.channel, &payload).await {
            Ok(()) => Ran::Requeued,
            Err(e) => {
                WorkerMetrics::add(&self.metrics.dropped, 1);
                tracing::error!(channel = %message.channel, error = %e, "cannot requeue a message; dropped");
                Ran::Over
            }
        }
    }

    /// Sends one message of a consumer's outbox, waiting for room in a full channel with the
    /// layer's retry policy for [`Worker::backpressure_timeout`] (the consumer's slot stays
    /// taken meanwhile, so a worker whose replies cannot go out pops no more work). True when
    /// sent.
    async fn send_with_retry(&self, from: &str, channel: &str, payload: &[u8]) -> bool {
        let mut retry = FullRetry::new(self.backpressure_timeout);
        loop {
            match self.layer.send_encoded(channel, payload).await {
                Ok(()) => return true,
                Err(e) if retry.wait(&e).await => {}
                Err(e) => {
                    WorkerMetrics::add(&self.metrics.dropped, 1);
                    tracing::error!(from = %from, to = channel, error = %e, "a consumer's send failed");
                    return false;
                }
            }
        }
    }

    /// Applies an action of a consumer of a message from channel `from`; true when applied.
    async fn apply(&self, from: &str, action: Action) -> bool {
        let result = match action {
            Action::Send { channel, payload } => {
                self.metrics.sent(metrics::channel_kind(&channel));
                return self.send_with_retry(from, &channel, &payload).await;
            }
            Action::GroupAdd { group, channel } => self.layer.group_add(&group, &channel).await,
            Action::GroupDiscard { group, channel } => {
                self.layer.group_discard(&group, &channel).await
            }
            Action::GroupSend { group, payload } => {
                self.metrics.sent("group");
                self.layer
                    .group_send_encoded(&group, &payload)
                    .await
                    .map(|_| ())
            }
            Action::SessionSet {
                reply_channel,
                key,
                value,
            } => self.layer.session_set(&reply_channel, &key, &value).await,
            Action::SessionDelete { reply_channel, key } => {
                self.layer.session_delete(&reply_channel, &key).await
            }
            other => {
                tracing::warn!(action = ?other, "unknown consumer action ignored");
                Ok(())
            }
        };
        if let Err(e) = result {
            WorkerMetrics::add(&self.metrics.dropped, 1);
            tracing::error!(channel = %from, error = %e, "a consumer's action failed");
            return false;
        }
        true
    }
}

impl JobHandler for Worker {
    fn run_job<'a>(&'a self, job: &'a StreamJob) -> BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(Worker::run_job(self, job))
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_owned()
    }
}

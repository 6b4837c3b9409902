//! Durable channels on a real redis-server: retries with backoff, dead letters with their error,
//! `dead retry`, a worker killed with SIGKILL mid-job (its job completes on another worker after
//! the job timeout), Redis restarted with `appendonly yes` while jobs are pending (none lost),
//! plain channel-layer sends (what a Django `channel_layer.send` writes) moved into the stream,
//! capacity, idempotency keys, deadlines, and the in-memory layer's refusal.
//!
//! The killed worker is this test binary run again as a child process (`child_worker`, ignored
//! unless asked for by name), so that SIGKILL hits a real process holding a job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{RedisServer, eventually};
use switchyard::jobs::{JobOptions, JobSent};
use switchyard::layer::{Layer, LayerError, LayerSettings};
use switchyard::routing::{ConsumerError, Ctx, DurablePolicy, Map, Message, Router, route};
use switchyard::worker::Worker;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// What the consumers saw: per job `n`, the attempts and job ids of each run.
type Runs = Arc<Mutex<HashMap<i64, Vec<(u32, String)>>>>;

fn fast_policy() -> DurablePolicy {
    DurablePolicy::default()
        .max_attempts(3)
        .initial_delay(Duration::from_millis(50))
        .max_delay(Duration::from_millis(200))
}

/// Routes `jobs.flaky`: job `n` with `fail` = k fails its first k runs (k >= 99: always), and
/// on success sends `{"n"}` to the plain channel `done`.
fn router(runs: Runs, policy: DurablePolicy) -> Router {
    Router::new([route("jobs.flaky", move |m: Message, ctx: Ctx| {
        let runs = runs.clone();
        async move {
            let n = m.get("n").and_then(|v| v.as_i64()).unwrap_or(-1);
            let fail = m.get("fail").and_then(|v| v.as_i64()).unwrap_or(0);
            let attempt = m.attempt().expect("a durable message has an attempt");
            let id = m.job_id().expect("a durable message has an id").to_owned();
            runs.lock()
                .unwrap()
                .entry(n)
                .or_default()
                .push((attempt, id));
            if i64::from(attempt) <= fail {
                return Err(ConsumerError::other(format!("boom on attempt {attempt}")));
            }
            ctx.send("done", &Map::new().with("n", n))
        }
    })
    .durable(policy)])
    .unwrap()
}

async fn layer(redis: &RedisServer) -> Layer {
    Layer::from_url(&redis.url(), LayerSettings::default())
        .await
        .unwrap()
}

/// A running in-process worker; `stop` waits until it has finished.
struct Running {
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), switchyard::worker::WorkerError>>,
}

impl Running {
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the worker stops in time")
            .unwrap()
            .unwrap();
    }
}

fn start_worker(layer: &Layer, router: Router, timeout: Duration) -> Running {
    let token = CancellationToken::new();
    let worker = Worker::new(layer.clone(), Arc::new(router))
        .concurrency(4)
        .job_timeout(timeout)
        .stop_grace(Duration::from_secs(2));
    let task = tokio::spawn(worker.run(token.clone()));
    Running { token, task }
}

fn job(n: i64, fail: i64) -> Map {
    Map::new().with("n", n).with("fail", fail)
}

async fn send_job(layer: &Layer, n: i64, fail: i64) -> String {
    let payload = switchyard::codec::to_msgpack(&job(n, fail)).unwrap();
    match layer
        .send_job("jobs.flaky", &payload, &JobOptions::default())
        .await
        .unwrap()
    {
        JobSent::Queued(id) => id,
        other => panic!("not queued: {other:?}"),
    }
}

/// The `n`s that reached `done`, waiting for `count` of them.
async fn done(layer: &Layer, count: usize) -> Vec<i64> {
    let mut receiver = layer.receiver().await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < count {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "only {got:?} done of {count}");
        if let Some(e) = receiver.receive(&["done".to_owned()], left).await.unwrap() {
            got.push(e.to_map().unwrap().get("n").unwrap().as_i64().unwrap());
        }
    }
    got.sort_unstable();
    got
}

fn runs_of(runs: &Runs, n: i64) -> Vec<(u32, String)> {
    runs.lock().unwrap().get(&n).cloned().unwrap_or_default()
}

async fn stats(layer: &Layer) -> switchyard::jobs::JobStats {
    let Layer::Redis(r) = layer else { panic!() };
    r.job_stats("jobs.flaky").await.unwrap()
}

#[tokio::test]
async fn a_job_that_fails_twice_runs_three_times_and_is_acknowledged_once() {
    let redis = RedisServer::start();
    let layer = layer(&redis).await;
    let runs: Runs = Arc::default();
    let id = send_job(&layer, 1, 2).await;
    let worker = start_worker(&layer, router(runs.clone(), fast_policy()), WAIT);
    assert_eq!(done(&layer, 1).await, vec![1]);
    let seen = runs_of(&runs, 1);
    assert_eq!(
        seen,
        vec![(1, id.clone()), (2, id.clone()), (3, id.clone())],
        "three runs, numbered, one stable id"
    );
    // Acknowledged: the stream and the retry set are empty, nothing in progress, no dead letter.
    eventually(WAIT, "the job acknowledged", || {
        redis.cmd::<u64>(&[b"XLEN", b"asgi:jobs:jobs.flaky"]) == 0
    })
    .await;
    let s = stats(&layer).await;
    assert_eq!(
        (s.pending, s.in_progress, s.scheduled_retries, s.dead),
        (0, 0, 0, 0)
    );
    // And it never runs again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs_of(&runs, 1).len(), 3);
    worker.stop().await;
}

#[tokio::test]
async fn a_job_that_always_fails_is_dead_lettered_with_its_error_and_dead_retry_reruns_it() {
    let redis = RedisServer::start();
    let layer = layer(&redis).await;
    let Layer::Redis(r) = &layer else { panic!() };
    let runs: Runs = Arc::default();
    let id = send_job(&layer, 7, 99).await;
    let worker = start_worker(&layer, router(runs.clone(), fast_policy()), WAIT);
    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while dead.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
        dead = r.dead_list("jobs.flaky", 10).await.unwrap();
    }
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    assert_eq!(letter.job_id, id);
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.error, "boom on attempt 3");
    assert_eq!(letter.message, r#"{"n":7,"fail":99}"#);
    assert_eq!(
        runs_of(&runs, 7).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let s = stats(&layer).await;
    assert_eq!(
        (s.pending, s.in_progress, s.scheduled_retries, s.dead),
        (0, 0, 0, 1)
    );
    // Stopped for good before the retry, so it cannot take the requeued job.
    worker.stop().await;

    // `dead retry` puts it back with fresh attempts; a consumer that now succeeds runs it.
    assert_eq!(r.dead_retry("jobs.flaky", Some("0-1")).await.unwrap(), 0);
    assert_eq!(
        r.dead_retry("jobs.flaky", Some(&letter.entry_id))
            .await
            .unwrap(),
        1
    );
    let healed: Runs = Arc::default();
    let lenient = Router::new([route("jobs.flaky", {
        let healed = healed.clone();
        move |m: Message, ctx: Ctx| {
            let healed = healed.clone();
            async move {
                let attempt = m.attempt().unwrap();
                let id = m.job_id().unwrap().to_owned();
                healed
                    .lock()
                    .unwrap()
                    .entry(7)
                    .or_default()
                    .push((attempt, id));
                ctx.send("done", &Map::new().with("n", 7))
            }
        }
    })
    .durable(fast_policy())])
    .unwrap();
    let worker = start_worker(&layer, lenient, WAIT);
    assert_eq!(done(&layer, 1).await, vec![7]);
    assert_eq!(
        runs_of(&healed, 7),
        vec![(1, id)],
        "same job id, attempts from 1"
    );
    assert!(r.dead_list("jobs.flaky", 10).await.unwrap().is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn plain_layer_sends_into_a_durable_channel_are_moved_into_the_stream_and_run() {
    let redis = RedisServer::start();
    // A sender that does not know the channel is durable writes the channels_redis sorted set,
    // exactly as Django's `channel_layer.send` does.
    let plain = layer(&redis).await;
    plain.send("jobs.flaky", &job(3, 1)).await.unwrap();
    assert_eq!(redis.cmd::<u64>(&[b"ZCARD", b"asgijobs.flaky"]), 1);
    let runs: Runs = Arc::default();
    let worker = start_worker(&plain, router(runs.clone(), fast_policy()), WAIT);
    assert_eq!(done(&plain, 1).await, vec![3]);
    let seen = runs_of(&runs, 3);
    assert_eq!(seen.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(seen[0].1, seen[1].1, "stable id across the retry");
    assert_eq!(redis.cmd::<u64>(&[b"ZCARD", b"asgijobs.flaky"]), 0);
    worker.stop().await;

    // With --durable-channels, a plain send goes straight to the stream.
    let settings = LayerSettings {
        durable_channels: vec!["jobs.*".into()],
        ..LayerSettings::default()
    };
    let durable = Layer::from_url(&redis.url(), settings).await.unwrap();
    durable.send("jobs.flaky", &job(4, 0)).await.unwrap();
    assert_eq!(redis.cmd::<u64>(&[b"ZCARD", b"asgijobs.flaky"]), 0);
    assert_eq!(redis.cmd::<u64>(&[b"XLEN", b"asgi:jobs:jobs.flaky"]), 1);
}

#[tokio::test]
async fn capacity_idempotency_and_deadlines() {
    let redis = RedisServer::start();
    let settings = LayerSettings {
        channel_capacity: vec![("jobs.*".into(), 2)],
        ..LayerSettings::default()
    };
    let layer = Layer::from_url(&redis.url(), settings).await.unwrap();
    let payload = switchyard::codec::to_msgpack(&job(1, 0)).unwrap();
    let keyed = JobOptions {
        idempotency_key: Some("order-42".into()),
        ..JobOptions::default()
    };
    let first = layer
        .send_job("jobs.flaky", &payload, &keyed)
        .await
        .unwrap();
    let again = layer
        .send_job("jobs.flaky", &payload, &keyed)
        .await
        .unwrap();
    assert_eq!(again, JobSent::Duplicate(first.id().to_owned()));
    layer
        .send_job("jobs.flaky", &payload, &JobOptions::default())
        .await
        .unwrap();
    let full = layer
        .send_job("jobs.flaky", &payload, &JobOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&full, LayerError::ChannelFull { capacity: 2, .. }),
        "{full}"
    );
    // A duplicate is recognised even when full, and nothing was added.
    assert!(matches!(
        layer.send_job("jobs.flaky", &payload, &keyed).await,
        Ok(JobSent::Duplicate(_))
    ));
    assert_eq!(redis.cmd::<u64>(&[b"XLEN", b"asgi:jobs:jobs.flaky"]), 2);
    redis.cmd::<()>(&[b"DEL", b"asgi:jobs:jobs.flaky"]);

    // A job past its deadline is dead-lettered, not run, and not silently dropped.
    let late = JobOptions {
        deadline: Some(Duration::from_millis(1)),
        ..JobOptions::default()
    };
    layer.send_job("jobs.flaky", &payload, &late).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let runs: Runs = Arc::default();
    let router = router(runs.clone(), fast_policy());
    let worker = Worker::new(layer.clone(), Arc::new(router)).job_timeout(WAIT);
    let metrics = worker.job_metrics();
    let token = CancellationToken::new();
    tokio::spawn(worker.run(token.clone()));
    let Layer::Redis(r) = &layer else { panic!() };
    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while dead.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
        dead = r.dead_list("jobs.flaky", 10).await.unwrap();
    }
    assert!(
        dead[0].error.starts_with("deadline passed"),
        "{}",
        dead[0].error
    );
    assert!(runs.lock().unwrap().is_empty(), "a late job never runs");
    assert_eq!(metrics.snapshot().deadline_dead, 1);
    token.cancel();
}

#[tokio::test]
async fn the_memory_layer_refuses_durable_channels() {
    let settings = LayerSettings {
        durable_channels: vec!["jobs.*".into()],
        ..LayerSettings::default()
    };
    let e = Layer::from_url("memory://", settings).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("durable channels need the Redis layer"),
        "{e}"
    );
    let memory = Layer::from_url("memory://", LayerSettings::default())
        .await
        .unwrap();
    let payload = switchyard::codec::to_msgpack(&job(1, 0)).unwrap();
    let e = memory
        .send_job("jobs.flaky", &payload, &JobOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, LayerError::Config(_)), "{e}");
    let worker = Worker::new(
        memory.clone(),
        Arc::new(router(Arc::default(), fast_policy())),
    );
    let e = worker.run(CancellationToken::new()).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("durable channels need the Redis layer"),
        "{e}"
    );
    // A bad durable glob is refused with its reason.
    let settings = LayerSettings {
        durable_channels: vec!["inbox!*".into()],
        ..LayerSettings::default()
    };
    let redis = RedisServer::start();
    let e = Layer::from_url(&redis.url(), settings).await.unwrap_err();
    assert!(e.to_string().contains("cannot be durable"), "{e}");
}

#[tokio::test]
async fn jobs_pending_across_a_redis_restart_with_appendonly_are_not_lost() {
    let dir = tempdir();
    let mut redis = RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let layer = layer(&redis).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(send_job(&layer, n, 0).await);
    }
    // One job half done: handed to a worker that never finished (its lease lapses).
    redis.cmd::<redis::Value>(&[
        b"XGROUP",
        b"CREATE",
        b"asgi:jobs:jobs.flaky",
        b"switchyard",
        b"0",
        b"MKSTREAM",
    ]);
    redis.cmd::<redis::Value>(&[
        b"XREADGROUP",
        b"GROUP",
        b"switchyard",
        b"gone",
        b"COUNT",
        b"1",
        b"STREAMS",
        b"asgi:jobs:jobs.flaky",
        b">",
    ]);
    redis.restart();
    assert_eq!(redis.cmd::<u64>(&[b"XLEN", b"asgi:jobs:jobs.flaky"]), 20);
    let runs: Runs = Arc::default();
    let worker = start_worker(
        &layer,
        router(runs.clone(), fast_policy()),
        Duration::from_millis(500),
    );
    assert_eq!(done(&layer, 20).await, (0..20).collect::<Vec<_>>());
    // The job handed to the vanished consumer ran on its second attempt.
    assert_eq!(runs_of(&runs, 0), vec![(2, ids[0].clone())]);
    worker.stop().await;
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-jobs-{}-{}",
        std::process::id(),
        support::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The child worker of the SIGKILL test: started by the test with `CHILD_REDIS` set; runs a
/// worker whose consumer marks the job started in Redis and then never returns.
// Ignored because it is not a test of its own: it never returns, so run alone it would hang.
// CI runs it on every run as the process that
// `a_job_whose_worker_is_killed_runs_on_another_worker` starts (`--ignored --exact`) and kills.
#[tokio::test]
#[ignore = "run as a child process by a_job_whose_worker_is_killed_runs_on_another_worker"]
async fn child_worker() {
    let Ok(url) = std::env::var("CHILD_REDIS") else {
        return;
    };
    let layer = Layer::from_url(&url, LayerSettings::default())
        .await
        .unwrap();
    let marker = layer.clone();
    let router = Router::new([route("jobs.flaky", move |m: Message, _ctx: Ctx| {
        let marker = marker.clone();
        async move {
            let n = m.get("n").and_then(|v| v.as_i64()).unwrap_or(-1);
            marker
                .send(
                    "started",
                    &Map::new()
                        .with("n", n)
                        .with("pid", i64::from(std::process::id())),
                )
                .await
                .map_err(ConsumerError::other)?;
            std::future::pending::<()>().await;
            Ok(())
        }
    })
    .durable(fast_policy())])
    .unwrap();
    let worker = Worker::new(layer, Arc::new(router)).job_timeout(Duration::from_millis(1500));
    // Bounded: the parent kills it long before.
    let _ = tokio::time::timeout(
        Duration::from_secs(60),
        worker.run(CancellationToken::new()),
    )
    .await;
}

#[tokio::test]
async fn a_job_whose_worker_is_killed_runs_on_another_worker_after_the_job_timeout() {
    let redis = RedisServer::start();
    let layer = layer(&redis).await;
    let id = send_job(&layer, 5, 0).await;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_worker", "--ignored", "--nocapture"])
        .env("CHILD_REDIS", redis.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut receiver = layer.receiver().await.unwrap();
    let started = receiver
        .receive(&["started".to_owned()], WAIT)
        .await
        .unwrap()
        .expect("the child started the job")
        .to_map()
        .unwrap();
    assert_eq!(started.get("n").unwrap().as_i64(), Some(5));
    assert_eq!(
        started.get("pid").unwrap().as_i64(),
        Some(i64::from(child.id()))
    );
    // SIGKILL: no graceful stop, no ack, no failure recorded.
    std::process::Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let s = stats(&layer).await;
    assert_eq!(
        (s.in_progress, s.pending),
        (1, 0),
        "held by the dead worker"
    );
    let runs: Runs = Arc::default();
    let took = std::time::Instant::now();
    let worker = start_worker(
        &layer,
        router(runs.clone(), fast_policy()),
        Duration::from_millis(1500),
    );
    assert_eq!(done(&layer, 1).await, vec![5]);
    assert_eq!(
        runs_of(&runs, 5),
        vec![(2, id)],
        "the lost run counts as attempt 1"
    );
    assert!(took.elapsed() < WAIT);
    eventually(WAIT, "acknowledged", || {
        redis.cmd::<u64>(&[b"XLEN", b"asgi:jobs:jobs.flaky"]) == 0
    })
    .await;
    worker.stop().await;
}

/// The Python interpreter with Django and channels_redis (`scripts/setup-python.sh`), or `None`
/// (after saying why) when the test should be skipped; under `CI` its absence fails the test,
/// as in tests/python_interop.rs.
fn python_or_skip() -> Option<std::path::PathBuf> {
    let python = std::env::var_os("SWITCHYARD_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
        });
    if python.exists() {
        return Some(python);
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !in_ci,
        "no Python at {}: run scripts/setup-python.sh",
        python.display()
    );
    eprintln!(
        "skipping the Django test: no Python at {} (run scripts/setup-python.sh)",
        python.display()
    );
    None
}

/// A Django process: settings with channels_redis as the channel layer (every default, prefix
/// `asgi`), then `channel_layer.send("jobs.flaky", {...})` as a view would.
const DJANGO_SEND: &str = r#"
import sys
import django
from django.conf import settings
settings.configure(CHANNEL_LAYERS={"default": {
    "BACKEND": "channels_redis.core.RedisChannelLayer",
    "CONFIG": {"hosts": [sys.argv[1]]},
}})
django.setup()
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
async_to_sync(get_channel_layer().send)("jobs.flaky", {"n": int(sys.argv[2]), "fail": 1})
print("sent")
"#;

#[tokio::test]
async fn a_django_channel_layer_send_into_a_durable_channel_runs_like_a_rust_send() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let redis = RedisServer::start();
    let layer = layer(&redis).await;
    let runs: Runs = Arc::default();
    let worker = start_worker(&layer, router(runs.clone(), fast_policy()), WAIT);
    let url = redis.url();
    let output = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(&python)
            .args(["-c", DJANGO_SEND, &url, "11"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "django send failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout, b"sent\n");
    let rust_id = send_job(&layer, 12, 1).await;
    assert_eq!(done(&layer, 2).await, vec![11, 12]);
    // Both ran twice (the first run fails), numbered 1 and 2, under one stable id each.
    let django = runs_of(&runs, 11);
    let rust = runs_of(&runs, 12);
    assert_eq!(django.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(rust, vec![(1, rust_id.clone()), (2, rust_id)]);
    assert_eq!(django[0].1, django[1].1);
    // Nothing left behind: not in the channels_redis set, not in the stream.
    eventually(WAIT, "both acknowledged", || {
        redis.cmd::<u64>(&[b"XLEN", b"asgi:jobs:jobs.flaky"]) == 0
    })
    .await;
    assert_eq!(redis.cmd::<u64>(&[b"ZCARD", b"asgijobs.flaky"]), 0);
    worker.stop().await;
}

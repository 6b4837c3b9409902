//! `switchyard bench jobs`: background jobs through one Redis on loopback. Without `--soak`: N
//! jobs on the at-most-once task channel, then N on a durable channel (send + run + ack), each
//! run by in-process workers with an empty consumer; jobs/s, p50/p99 from send to start, and the
//! CPU per job of this process and of Redis, side by side. With `--soak`: N durable jobs run by
//! worker processes (`bench jobs-worker`) of which one is killed with SIGKILL at random
//! intervals and replaced; every job must run at least once, and the runs past the first are
//! counted as duplicates (only jobs in flight on a killed worker may run twice).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use rand::Rng;
use switchyard::layer::{Layer, LayerSettings};
use switchyard::routing::{ConsumerError, Ctx, DurablePolicy, Map, Message, Router, route};
use switchyard::worker::Worker;
use tokio_util::sync::CancellationToken;

use super::report::Report;
use super::stats::{Percentiles, new_histogram};
use super::{BenchError, at_least_one, seconds};

const PLAIN: &str = "bench.plain";
const DURABLE: &str = "bench.durable";
const SOAK: &str = "bench.soak";
/// Where soak workers count each job's runs (a hash: job number -> runs).
const SOAK_RUNS: &str = "asgi:bench:soak:runs";

/// `switchyard bench jobs`
#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    /// The Redis of the channel layer (loopback only).
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    pub layer: String,
    /// Jobs per phase.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    pub count: u64,
    /// Concurrent senders.
    #[arg(long, default_value_t = 32)]
    pub senders: usize,
    /// In-process workers (each its own layer connections), or worker processes with --soak.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Jobs each worker runs at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Soak: worker processes killed at random while the jobs run.
    #[arg(long)]
    pub soak: bool,
    /// Soak: mean seconds between two kills.
    #[arg(long, default_value_t = 1.0)]
    pub kill_every: f64,
    /// Soak: job timeout of the worker processes (how soon a killed worker's jobs run again).
    #[arg(long, default_value_t = 2.0)]
    pub job_timeout: f64,
    /// Soak: milliseconds each job takes (so that kills catch jobs in flight).
    #[arg(long, default_value_t = 2)]
    pub job_ms: u64,
    /// Give up after this many seconds (the run is bounded whatever happens).
    #[arg(long, default_value_t = 180.0)]
    pub timeout: f64,
    /// No progress line on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// `switchyard bench jobs-worker` (started by `bench jobs --soak`).
#[derive(Debug, Clone, Args)]
pub struct JobsWorkerArgs {
    /// The Redis of the channel layer.
    #[arg(long)]
    pub layer: String,
    /// Jobs run at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Job timeout, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub job_timeout: f64,
    /// Milliseconds each job takes.
    #[arg(long, default_value_t = 2)]
    pub job_ms: u64,
    /// Exit after this many seconds whatever happens.
    #[arg(long, default_value_t = 300.0)]
    pub lifetime: f64,
}

fn settings() -> LayerSettings {
    LayerSettings {
        // The bench sends far more jobs than the default capacity of 100 before they run.
        channel_capacity: vec![("bench.*".into(), 10_000_000)],
        ..LayerSettings::default()
    }
}

fn check_loopback(url: &str) -> Result<(), BenchError> {
    let rest = url.strip_prefix("redis://").ok_or_else(|| {
        BenchError::BadUrl(format!("{url} (bench jobs takes redis://host:port/db)"))
    })?;
    let host_port = rest.split('/').next().unwrap_or_default();
    let host_port = host_port.rsplit('@').next().unwrap_or_default();
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(h, _)| h)
        .trim_matches(['[', ']']);
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(BenchError::NotLoopback(host.to_owned()))
    }
}

/// One phase's figures.
struct Phase {
    jobs_per_sec: f64,
    wait: Percentiles,
    bench_cpu_us_per_job: f64,
    redis_cpu_us_per_job: f64,
    runs: u64,
    missing: u64,
}

fn redis_cpu(conn: &mut redis::Connection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query(conn)
        .unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k, "used_cpu_sys" | "used_cpu_user")
                .then(|| v.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

fn cpu_now() -> f64 {
    super::report::process_cpu().map_or(0.0, |(u, s)| u + s)
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Runs `count` jobs on `channel` (durable or not) through `workers` in-process workers.
async fn phase(args: &JobsArgs, channel: &'static str, durable: bool) -> anyhow::Result<Phase> {
    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..args.count).map(|_| AtomicU8::new(0)).collect());
    let runs = Arc::new(AtomicU64::new(0));
    let unique = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(std::sync::Mutex::new(new_histogram()));
    let mut tokens = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..args.workers {
        let layer = Layer::from_url(&args.layer, settings()).await?;
        let (seen, runs, unique, hist) = (seen.clone(), runs.clone(), unique.clone(), hist.clone());
        let consumer = move |m: Message, _ctx: Ctx| {
            let waited = m
                .get("t")
                .and_then(|v| v.as_i64())
                .map_or(0, |t| now_us().saturating_sub(t as u64));
            if let Ok(mut h) = hist.lock() {
                let _ = h.record(waited.max(1));
            }
            runs.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = m.get("n").and_then(|v| v.as_i64())
                && let Some(slot) = seen.get(n as usize)
                && slot.fetch_add(1, Ordering::Relaxed) == 0
            {
                unique.fetch_add(1, Ordering::Relaxed);
            }
            async { Ok::<(), ConsumerError>(()) }
        };
        let r = if durable {
            route(channel, consumer).durable(DurablePolicy::default())
        } else {
            route(channel, consumer)
        };
        let worker = Worker::new(layer, Arc::new(Router::new([r])?))
            .concurrency(args.concurrency)
            .receive_timeout(Duration::from_millis(100));
        let token = CancellationToken::new();
        tasks.push(tokio::spawn(worker.run(token.clone())));
        tokens.push(token);
    }
    let sender = Layer::from_url(&args.layer, settings()).await?;
    let Layer::Redis(redis_layer) = &sender else {
        return Err(BenchError::Usage("bench jobs needs a Redis layer".into()).into());
    };
    let client = redis::Client::open(args.layer.as_str())?;
    let mut conn = client.get_connection()?;
    // Let the workers reach their first blocking read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu0 = cpu_now();
    let redis0 = redis_cpu(&mut conn);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..args.senders.max(1) {
        let (next, sender, count) = (next.clone(), sender.clone(), args.count);
        let redis_layer = redis_layer.clone();
        senders.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return Ok::<(), anyhow::Error>(());
                }
                let msg = Map::new().with("n", n as i64).with("t", now_us() as i64);
                let payload = switchyard::codec::to_msgpack(&msg)?;
                if durable {
                    redis_layer
                        .job_send(channel, &payload, &Default::default())
                        .await?;
                } else {
                    sender.send_encoded(channel, &payload).await?;
                }
            }
        }));
    }
    for s in senders {
        s.await??;
    }
    let deadline = started + seconds("timeout", args.timeout)?;
    let stream = format!("asgi:jobs:{channel}");
    loop {
        let all_ran = unique.load(Ordering::Relaxed) >= args.count;
        let acked = !durable || {
            let len: u64 = redis::cmd("XLEN")
                .arg(&stream)
                .query(&mut conn)
                .unwrap_or(1);
            len == 0
        };
        if (all_ran && acked) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let bench_cpu = cpu_now() - cpu0;
    let redis_used = redis_cpu(&mut conn) - redis0;
    for t in &tokens {
        t.cancel();
    }
    for t in tasks {
        let _ = t.await;
    }
    let done = unique.load(Ordering::Relaxed);
    let wait = hist.lock().map(|h| Percentiles::of(&h)).unwrap_or_default();
    Ok(Phase {
        jobs_per_sec: done as f64 / wall,
        wait,
        bench_cpu_us_per_job: bench_cpu * 1e6 / done.max(1) as f64,
        redis_cpu_us_per_job: redis_used * 1e6 / done.max(1) as f64,
        runs: runs.load(Ordering::Relaxed),
        missing: args.count - done,
    })
}

/// Runs `bench jobs`.
pub async fn run(args: JobsArgs) -> anyhow::Result<Report> {
    check_loopback(&args.layer)?;
    at_least_one("count", args.count as usize)?;
    at_least_one("workers", args.workers)?;
    at_least_one("concurrency", args.concurrency)?;
    if args.soak {
        return soak(args).await;
    }
    let client = redis::Client::open(args.layer.as_str())?;
    let mut conn = client.get_connection()?;
    for key in [format!("asgi{PLAIN}"), format!("asgi:jobs:{DURABLE}")] {
        let _: () = redis::cmd("DEL").arg(key).query(&mut conn)?;
    }
    let plain = phase(&args, PLAIN, false).await?;
    let durable = phase(&args, DURABLE, true).await?;
    let mut report = Report::new("jobs");
    for (name, p) in [("at-most-once", &plain), ("durable", &durable)] {
        report.line(format!(
            "{name:>12}: {:>8.0} jobs/s  send->start p50 {} us p99 {} us  cpu/job: bench {:.1} us, redis {:.1} us  runs {} missing {}",
            p.jobs_per_sec, p.wait.p50, p.wait.p99, p.bench_cpu_us_per_job, p.redis_cpu_us_per_job, p.runs, p.missing
        ));
        let key = name.replace('-', "_");
        report.field(
            &key,
            serde_json::json!({
                "jobs_per_sec": p.jobs_per_sec.round(),
                "wait_us": p.wait,
                "bench_cpu_us_per_job": (p.bench_cpu_us_per_job * 10.0).round() / 10.0,
                "redis_cpu_us_per_job": (p.redis_cpu_us_per_job * 10.0).round() / 10.0,
                "runs": p.runs,
                "missing": p.missing,
            }),
        );
        report.must_be_zero(&format!("{name} jobs never ran"), p.missing);
    }
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            (a / b * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    let cpu_ratio = ratio(
        durable.bench_cpu_us_per_job + durable.redis_cpu_us_per_job,
        plain.bench_cpu_us_per_job + plain.redis_cpu_us_per_job,
    );
    report.line(format!(
        "durable / at-most-once: throughput x{}, cpu per job (bench + redis) x{cpu_ratio}",
        ratio(durable.jobs_per_sec, plain.jobs_per_sec)
    ));
    report.field("cpu_ratio", cpu_ratio);
    report.field("count", args.count);
    Ok(report)
}

fn spawn_worker(args: &JobsArgs) -> anyhow::Result<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .args([
            "bench",
            "jobs-worker",
            "--layer",
            &args.layer,
            "--concurrency",
            &args.concurrency.to_string(),
            "--job-timeout",
            &args.job_timeout.to_string(),
            "--job-ms",
            &args.job_ms.to_string(),
            "--lifetime",
            &(args.timeout + 10.0).to_string(),
        ])
        .env("SWITCHYARD_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

async fn soak(args: JobsArgs) -> anyhow::Result<Report> {
    let client = redis::Client::open(args.layer.as_str())?;
    let mut conn = client.get_connection()?;
    for key in [
        SOAK_RUNS.to_owned(),
        format!("asgi:jobs:{SOAK}"),
        format!("asgi:jobs:{SOAK}:retry"),
        format!("asgi:jobs:{SOAK}:dead"),
    ] {
        let _: () = redis::cmd("DEL").arg(key).query(&mut conn)?;
    }
    let layer = Layer::from_url(&args.layer, settings()).await?;
    let Layer::Redis(redis_layer) = &layer else {
        return Err(BenchError::Usage("bench jobs needs a Redis layer".into()).into());
    };
    let mut workers: Vec<Child> = (0..args.workers)
        .map(|_| spawn_worker(&args))
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let deadline = started + seconds("timeout", args.timeout)?;
    // Sent while the kills go on, a few at a time.
    let sender = {
        let (redis_layer, count) = (redis_layer.clone(), args.count);
        tokio::spawn(async move {
            let next = Arc::new(AtomicU64::new(0));
            let mut senders = tokio::task::JoinSet::new();
            for _ in 0..8 {
                let (next, redis_layer) = (next.clone(), redis_layer.clone());
                senders.spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= count {
                            return Ok::<(), anyhow::Error>(());
                        }
                        let msg = Map::new().with("n", n as i64);
                        let payload = switchyard::codec::to_msgpack(&msg)?;
                        redis_layer
                            .job_send(SOAK, &payload, &Default::default())
                            .await?;
                    }
                });
            }
            while let Some(done) = senders.join_next().await {
                done??;
            }
            Ok::<(), anyhow::Error>(())
        })
    };
    let mut kills = 0u64;
    let mean = seconds("kill-every", args.kill_every)?.max(Duration::from_millis(50));
    let mut next_kill = Instant::now() + mean.mul_f64(rand::rng().random_range(0.5..1.5));
    let (mut ran, mut total_runs, mut dead) = (0u64, 0u64, 0u64);
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if now >= next_kill {
            let victim = rand::rng().random_range(0..workers.len());
            let _ = workers[victim].kill();
            let _ = workers[victim].wait();
            workers[victim] = spawn_worker(&args)?;
            kills += 1;
            next_kill = now + mean.mul_f64(rand::rng().random_range(0.5..1.5));
        }
        let counts: Vec<u64> = redis::cmd("HVALS").arg(SOAK_RUNS).query(&mut conn)?;
        ran = counts.len() as u64;
        total_runs = counts.iter().sum();
        dead = redis::cmd("XLEN")
            .arg(format!("asgi:jobs:{SOAK}:dead"))
            .query(&mut conn)?;
        if !args.quiet {
            eprintln!(
                "[{:>5.1}s] ran {ran}/{} runs {total_runs} kills {kills} dead {dead}",
                started.elapsed().as_secs_f64(),
                args.count
            );
        }
        if ran + dead >= args.count && sender.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    if sender.is_finished() {
        sender.await??;
    } else {
        sender.abort();
    }
    let duplicates = total_runs - ran;
    let mut report = Report::new("jobs-soak");
    report.line(format!(
        "soak: {} jobs, {} worker processes, {kills} SIGKILLs in {wall:.1} s: ran {ran}, never ran {}, dead {dead}, runs {total_runs}, duplicates {duplicates}",
        args.count,
        args.workers,
        args.count.saturating_sub(ran + dead)
    ));
    report.field("count", args.count);
    report.field("kills", kills);
    report.field("ran", ran);
    report.field("runs", total_runs);
    report.field("duplicates", duplicates);
    report.field("dead", dead);
    report.field("seconds", (wall * 10.0).round() / 10.0);
    report.must_be_zero("jobs never ran", args.count.saturating_sub(ran));
    Ok(report)
}

/// Runs `bench jobs-worker`: the app of a soak worker process (each run counted in Redis).
pub async fn worker(args: JobsWorkerArgs) -> anyhow::Result<Report> {
    let layer = Layer::from_url(&args.layer, settings()).await?;
    let client = redis::Client::open(args.layer.as_str())?;
    let counter = client.get_multiplexed_async_connection().await?;
    let job_ms = args.job_ms;
    let consumer = move |m: Message, _ctx: Ctx| {
        let mut counter = counter.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(job_ms)).await;
            let n = m.get("n").and_then(|v| v.as_i64()).unwrap_or(-1);
            // Counted as a run once the consumer is done (a killed run is not a run).
            redis::cmd("HINCRBY")
                .arg(SOAK_RUNS)
                .arg(n)
                .arg(1)
                .query_async::<i64>(&mut counter)
                .await
                .map_err(ConsumerError::other)?;
            Ok(())
        }
    };
    let policy = DurablePolicy::default().initial_delay(Duration::from_millis(100));
    let router = Router::new([route(SOAK, consumer).durable(policy)])?;
    let worker = Worker::new(layer, Arc::new(router))
        .concurrency(args.concurrency)
        .job_timeout(seconds("job-timeout", args.job_timeout)?);
    let token = CancellationToken::new();
    switchyard::run::stop_on_signals(token.clone());
    let lifetime = seconds("lifetime", args.lifetime)?;
    let _ = tokio::time::timeout(lifetime, worker.run(token)).await;
    Ok(Report::new("jobs-worker"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_redis_is_loaded() {
        assert!(check_loopback("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_loopback("redis://localhost:6380").is_ok());
        assert!(check_loopback("redis://:secret@[::1]:6379/0").is_ok());
        assert!(matches!(
            check_loopback("redis://10.0.0.5:6379/0"),
            Err(BenchError::NotLoopback(h)) if h == "10.0.0.5"
        ));
        assert!(matches!(
            check_loopback("unix:///tmp/redis.sock"),
            Err(BenchError::BadUrl(_))
        ));
        let args = super::super::parse_args(["bench", "jobs", "-n", "10", "--soak"]).unwrap();
        match args.mode {
            super::super::Mode::Jobs(j) => assert!(j.soak && j.count == 10),
            other => panic!("{other:?}"),
        }
    }
}

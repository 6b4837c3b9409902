//! Durable jobs through the `switchyard` binary on a real redis-server: the reference app's
//! `POST /jobs/` with `durable=1` (retried jobs report the attempt that succeeded; a job that
//! keeps failing is listed by `GET /api/jobs/dead`), `switchyard jobs stats | dead list | dead
//! retry | dead purge`, `switchyard send --idempotency-key`, the Prometheus figures, and the
//! startup warning of `serve` and `worker` when Redis has persistence off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::redis_support::{RedisServer, free_port};
use support::{Proc, bin, http};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = bin().args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// Polls `GET /api/jobs/dead` until a dead letter for app job `job` appears.
async fn dead_letter(base: &str, job: &str) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = http(base, "GET", "/api/jobs/dead", "").await;
        assert_eq!(status, 200, "{body}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        if let Some(found) = list.into_iter().find(|d| {
            serde_json::from_str::<serde_json::Value>(d["message"].as_str().unwrap())
                .unwrap()["job"]
                == job
        }) {
            return found;
        }
        assert!(Instant::now() < deadline, "no dead letter for {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_jobs_through_the_app_and_the_jobs_command() {
    let redis = RedisServer::start();
    let layer = format!("--layer={}", redis.url());
    let metrics_port = free_port();
    let metrics = format!("--metrics-bind=127.0.0.1:{metrics_port}");
    let mut worker = Proc::start(
        &[
            "worker",
            &layer,
            "--concurrency",
            "4",
            "--job-timeout",
            "5",
            &metrics,
        ],
        false,
    );
    let mut web = Proc::start(&["serve", &layer, "--port", "0"], true);
    let base = web.base.clone().unwrap();
    let (mut page, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("{}/ws/jobs/durable-ticket-1/", web.ws())),
    )
    .await
    .unwrap()
    .unwrap();

    // A durable job whose first run fails: the page hears it done on attempt 2.
    let (status, body) = http(
        &base,
        "POST",
        "/jobs/",
        "ticket=durable-ticket-1&text=abc&rounds=1&durable=1&fail=1",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let queued: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(queued["channel"], "jobs.reliable");
    let frame = tokio::time::timeout(WAIT, page.next())
        .await
        .expect("the result in time")
        .unwrap()
        .unwrap();
    let Message::Text(text) = frame else {
        panic!("{frame:?}")
    };
    let done: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["job"], queued["job"]);
    assert_eq!(done["attempt"], 2);
    assert_eq!(
        done["digest"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert!(done["job_id"].as_str().is_some_and(|id| id.contains('-')));

    // A job that keeps failing is dead after 3 runs, with its error.
    let (status, body) = http(
        &base,
        "POST",
        "/jobs/",
        "ticket=durable-ticket-1&text=abc&rounds=1&durable=1&fail=9",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let job = serde_json::from_str::<serde_json::Value>(&body).unwrap()["job"]
        .as_str()
        .unwrap()
        .to_owned();
    let dead = dead_letter(&base, &job).await;
    assert_eq!(dead["attempts"], 3);
    assert_eq!(
        dead["error"],
        format!("failed on purpose on attempt 3 of job {job}")
    );
    assert_eq!(
        http(
            &base,
            "POST",
            "/jobs/",
            "ticket=durable-ticket-1&text=a&rounds=1&durable=1&fail=x"
        )
        .await
        .0,
        400
    );

    // The jobs command sees it.
    let (code, out, err) = run(&["jobs", &layer, "stats", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let stats: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let reliable = stats
        .iter()
        .find(|s| s["channel"] == "jobs.reliable")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        (
            &reliable["pending"],
            &reliable["in_progress"],
            &reliable["scheduled_retries"],
            &reliable["dead"]
        ),
        (&0.into(), &0.into(), &0.into(), &1.into())
    );
    let (code, table, _) = run(&["jobs", &layer, "stats"]);
    assert_eq!(code, Some(0));
    assert!(
        table.starts_with("CHANNEL") && table.contains("jobs.reliable"),
        "{table}"
    );
    let (code, list, _) = run(&["jobs", &layer, "dead", "list", "jobs.reliable"]);
    assert_eq!(code, Some(0));
    assert!(
        list.contains("attempts=3") && list.contains(&job) && list.contains("failed on purpose"),
        "{list}"
    );
    let (code, _, err) = run(&["jobs", &layer, "dead", "retry", "jobs.reliable", "0-1"]);
    assert_eq!(code, Some(2), "an unknown id is a usage error: {err}");
    assert!(err.contains("no dead letter 0-1"), "{err}");
    // Retried, it runs three more times and is dead again (it fails on purpose 9 times).
    let entry = dead["entry_id"].as_str().unwrap();
    let (code, out, err) = run(&["jobs", &layer, "dead", "retry", "jobs.reliable", entry]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "requeued 1 dead letter(s) on jobs.reliable"),
        "{err}"
    );
    let again = dead_letter(&base, &job).await;
    assert_ne!(again["entry_id"], dead["entry_id"]);
    assert_eq!(again["job_id"], dead["job_id"], "the same job");
    assert_eq!(again["attempts"], 3);
    let (code, out, _) = run(&["jobs", &layer, "dead", "purge"]);
    assert_eq!((code, out.as_str()), (Some(0), "purged 1 dead letter(s)"));
    let (_, list, _) = run(&["jobs", &layer, "dead", "list"]);
    assert_eq!(list, "(no dead letters)");

    // `switchyard send` with an idempotency key: the second send is dropped as a duplicate.
    let job_json =
        r#"{"job": "from-cli", "ticket": "durable-ticket-1", "text": "abc", "rounds": 1}"#;
    let send = |key: &str| {
        run(&[
            "send",
            &layer,
            "--idempotency-key",
            key,
            "jobs.reliable",
            job_json,
        ])
    };
    let (code, first, err) = send("order-1");
    assert_eq!(code, Some(0), "{err}");
    let id = first
        .strip_prefix("sent to jobs.reliable (job ")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();
    let (code, second, _) = send("order-1");
    assert_eq!(code, Some(0));
    assert_eq!(
        second,
        format!("not sent: duplicate of job {id} on jobs.reliable (same idempotency key)")
    );
    let frame = tokio::time::timeout(WAIT, page.next())
        .await
        .expect("the CLI job's result")
        .unwrap()
        .unwrap();
    let done: serde_json::Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
    assert_eq!(
        (done["job"].as_str(), done["attempt"].as_i64()),
        (Some("from-cli"), Some(1))
    );
    assert_eq!(done["job_id"].as_str(), Some(id.as_str()));
    let (code, _, err) = run(&["send", &layer, "--deadline=-1", "jobs.reliable", job_json]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = run(&["jobs", "--layer=memory://", "stats"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("needs a Redis layer"), "{err}");

    // Prometheus: counters and per-channel gauges.
    let (status, text) = http(
        &format!("http://127.0.0.1:{metrics_port}"),
        "GET",
        "/metrics",
        "",
    )
    .await;
    assert_eq!(status, 200);
    let value = |line: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("{line} in {text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(value("switchyard_jobs_succeeded_total") >= 2.0);
    assert_eq!(value("switchyard_jobs_dead_total"), 2.0);
    assert!(value("switchyard_jobs_retries_scheduled_total") >= 5.0);
    assert!(
        text.contains("# TYPE switchyard_jobs_pending gauge"),
        "{text}"
    );

    assert!(web.terminate().success(), "serve exits 0 on SIGTERM");
    assert!(worker.terminate().success(), "worker exits 0 on SIGTERM");
}

/// Reads the child's stderr until a line contains `needle` (bounded), then kills it.
fn warns(args: &[&str], needle: &str) -> String {
    let mut child = bin()
        .args(args)
        .env("SWITCHYARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut seen = String::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => break Some(line),
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    found.unwrap_or_else(|| panic!("no {needle:?} from {args:?}; stderr was:\n{seen}"))
}

#[test]
fn serve_and_worker_warn_when_durable_channels_meet_a_redis_without_persistence() {
    // The harness's Redis runs with `--save "" --appendonly no`.
    let redis = RedisServer::start();
    let layer = format!("--layer={}", redis.url());
    let line = warns(&["worker", &layer], "persistence off");
    assert!(line.contains("appendonly yes"), "{line}");
    let line = warns(
        &[
            "serve",
            &layer,
            "--port",
            "0",
            "--durable-channels",
            "jobs.*",
        ],
        "persistence off",
    );
    assert!(line.contains("WARN"), "{line}");
}

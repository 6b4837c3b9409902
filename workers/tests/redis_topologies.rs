//! The Redis deployments users run, under the real binary: a Redis Cluster node behind a plain
//! URL is refused at startup (exit 3, a message naming the cause) by every command, and the
//! startup line and `/healthz` say which mode is in use.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::redis_support::{RedisCluster, RedisServer};
use support::{Proc, bin, http};

/// What a one-shot command did: exit code, stdout, stderr.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `switchyard ARGS` (with `env` set) to completion, 20 s at most.
fn run(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = bin();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("the switchyard binary starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(20)) else {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        panic!("switchyard {args:?} did not exit within 20 s");
    };
    let out = out.expect("waits");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn healthz(base: &str) -> (u16, serde_json::Value) {
    let (status, body) = http(base, "GET", "/healthz", "").await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn a_cluster_node_is_refused_at_startup_with_exit_3_by_every_command() {
    let cluster = RedisCluster::start(3, 0);
    let url = cluster.node_url();
    let cases: [&[&str]; 5] = [
        &["serve", "--port", "0"],
        &["worker"],
        &["send", "jobs.x", r#"{"a": 1}"#],
        &["stats"],
        &["flush"],
    ];
    for args in cases {
        // As the user of the report did: REDIS_URL pointing at one node.
        let ran = run(args, &[("REDIS_URL", &url)]);
        assert_eq!(
            ran.code,
            Some(3),
            "{args:?}: stdout {:?} stderr {:?}",
            ran.stdout,
            ran.stderr
        );
        assert!(
            ran.stderr
                .contains("is a Redis Cluster node (cluster_enabled:1)")
                && ran.stderr.contains("not supported yet"),
            "{args:?}: {}",
            ran.stderr
        );
        assert!(
            !ran.stdout.contains("listening"),
            "{args:?}: {}",
            ran.stdout
        );
    }
    // And through the flag, and with the cluster scheme a user might try.
    let ran = run(&["stats", "--layer", &url], &[]);
    assert_eq!(ran.code, Some(3), "{}", ran.stderr);
    let ran = run(
        &[
            "serve",
            "--port",
            "0",
            "--layer",
            &format!("redis+cluster://127.0.0.1:{}", cluster.nodes[0].port()),
        ],
        &[],
    );
    assert_eq!(ran.code, Some(3), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("Redis Cluster is not supported yet"),
        "{}",
        ran.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_line_and_healthz_name_the_mode() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let shards = format!("{},{}", a.url(), b.url());
    for (url, mode) in [(a.url(), "single"), (shards, "shards")] {
        let server = Proc::start(&["serve", "--port", "0", "--layer", &url], true);
        let line = server.announcement.clone().unwrap();
        assert!(line.contains(&format!("mode {mode}")), "{line}");
        let (status, body) = healthz(server.base.as_ref().unwrap()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["layer_mode"], mode, "{body}");
    }
}

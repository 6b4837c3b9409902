//! Running the real `switchyard` binary in tests: a child process killed on drop, with its
//! announced address read from stdout, plus the repo's redis-server harness.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/support/mod.rs"]
pub mod redis_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `switchyard` child.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    /// Lines the process printed on stdout after the first.
    pub stdout: mpsc::Receiver<String>,
    /// The URL it announced (`http://127.0.0.1:PORT/`), when it announces one.
    pub base: Option<String>,
}

/// The binary under test.
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.env_remove("REDIS_URL")
        .env_remove("SWITCHYARD_LAYER")
        .env_remove("PORT")
        .env("SWITCHYARD_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

impl Proc {
    /// Starts `switchyard ARGS` and, when `announces` is set, waits (10 s at most) for its
    /// "http://ADDR/" line.
    pub fn start(args: &[&str], announces: bool) -> Proc {
        let mut child = bin()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the switchyard binary starts");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = Proc {
            child,
            stdout: rx,
            base: None,
        };
        if announces {
            let line = proc
                .stdout
                .recv_timeout(Duration::from_secs(10))
                .expect("the process announces its address");
            let start = line
                .find("http://")
                .expect("an http:// URL in the announcement");
            let rest = &line[start + 7..];
            let host = &rest[..rest.find('/').expect("a path after the address")];
            proc.base = Some(format!("http://{host}"));
        }
        proc
    }

    /// `ws://ADDR` for the announced address.
    pub fn ws(&self) -> String {
        self.base
            .as_ref()
            .expect("announced")
            .replacen("http://", "ws://", 1)
    }

    /// Sends SIGTERM and waits (10 s at most) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("waits") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "switchyard did not stop within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

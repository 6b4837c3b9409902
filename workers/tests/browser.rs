//! The chat page in a real browser: headless Chromium (Debian's), driven by playwright-core from
//! `tests/browser/chat.mjs`, opens a room in two pages, sends from one, sees it in the other as
//! text, and checks a late joiner gets the history. Once against `switchyard dev`, once against
//! `switchyard serve` + `switchyard worker` on a real redis-server with a short socket lifetime,
//! where both pages must also reconnect by themselves after the server closes their sockets. Screenshots go to `artifacts/`
//! (ignored by git). Needs chromium, node and `npm ci` in tests/browser (the test command installs
//! them): under CI their absence fails the test, elsewhere it is reported and skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::Proc;
use support::redis_support::RedisServer;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Why the browser test cannot run here, if it cannot.
fn missing_tools() -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!(
            "{chromium} not found (apt-get install -y chromium)"
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node not found".into());
    }
    if !repo()
        .join("tests/browser/node_modules/playwright-core")
        .exists()
    {
        return Some("playwright-core not installed (cd tests/browser && npm ci)".into());
    }
    None
}

fn run_browser(base: &str, name: &str, expect_reconnect: bool) {
    if let Some(why) = missing_tools() {
        assert!(
            std::env::var_os("CI").is_none(),
            "browser test cannot run under CI: {why}"
        );
        eprintln!("skipping browser test: {why}");
        return;
    }
    let artifacts = repo().join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join(format!("chat-{name}.png"));
    let _ = std::fs::remove_file(&shot);
    let mut child = Command::new("node")
        .arg(repo().join("tests/browser/chat.mjs"))
        .arg(base)
        .arg(&shot)
        .current_dir(repo().join("tests/browser"))
        .env("EXPECT_RECONNECT", if expect_reconnect { "1" } else { "" })
        .spawn()
        .expect("node starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the browser test did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "the chat page failed in Chromium ({name})"
    );
    let png = std::fs::read(&shot).expect("a screenshot was saved");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "the screenshot is a PNG");
}

#[test]
fn chat_in_two_browser_pages_on_dev() {
    let dev = Proc::start(&["dev", "--port", "0", "--no-open"], true);
    run_browser(dev.base.as_ref().unwrap(), "dev", false);
}

#[test]
fn chat_in_two_browser_pages_on_serve_and_worker_with_redis() {
    let redis = RedisServer::start();
    let layer = format!("--layer={}", redis.url());
    let _worker = Proc::start(&["worker", &layer], false);
    // Sockets live 4 s: the pages must reconnect by themselves and keep chatting.
    let web = Proc::start(
        &["serve", &layer, "--port", "0", "--websocket-lifetime", "4"],
        true,
    );
    run_browser(web.base.as_ref().unwrap(), "redis", true);
}

//! The background-job demo: `POST /jobs/` puts a job on the task channel `jobs.digest` and answers
//! 202 at once; a worker routed to that channel computes an iterated SHA-256 of the text (real but
//! light CPU work, off the async threads) and reports to the group `jobs-<ticket>`, which the page
//! that started it joined over its WebSocket `/ws/jobs/<ticket>/`. The route wraps [`start`] in
//! `csrf_protect` (see `super::routes`): a post from another site's page gets 403, so it cannot
//! start jobs that report to someone else's ticket.
//!
//! With `durable=1` the job goes to [`DURABLE_CHANNEL`] instead, a durable channel on Redis
//! (at-most-once under `dev`'s in-memory layer, which has no durable channels): `fail=N` makes
//! its first N runs fail, so the page shows the retries (the result names the attempt that
//! succeeded) or, past [`DURABLE_ATTEMPTS`], the dead letter with its error
//! (`GET /api/jobs/dead`).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use switchyard_routing::asgi::{HttpRequest, WebsocketSend};
use switchyard_routing::{ConsumerError, Ctx, Kwargs, Message, WebsocketConsumer};

use super::pages::respond;

/// The task channel jobs go to.
pub const JOB_CHANNEL: &str = "jobs.digest";
/// The durable task channel (Redis layer only).
pub const DURABLE_CHANNEL: &str = "jobs.reliable";
/// Runs a durable job gets before it is dead-lettered.
pub const DURABLE_ATTEMPTS: u32 = 3;

/// The retry policy of [`DURABLE_CHANNEL`]: quick retries, so the page shows them live.
pub fn durable_policy() -> switchyard_routing::DurablePolicy {
    switchyard_routing::DurablePolicy::default()
        .max_attempts(DURABLE_ATTEMPTS)
        .initial_delay(std::time::Duration::from_millis(500))
        .max_delay(std::time::Duration::from_secs(5))
}

/// Most SHA-256 rounds a job may ask for.
pub const MAX_ROUNDS: u32 = 200_000;
/// Longest text a job may digest, in bytes.
pub const MAX_TEXT: usize = 10_000;

/// A job on `jobs.digest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestJob {
    /// Job id (for the page's log).
    pub job: String,
    /// Who to tell: the group `jobs-<ticket>`.
    pub ticket: String,
    /// What to digest.
    pub text: String,
    /// How many times.
    pub rounds: u32,
    /// Durable jobs: how many first runs fail on purpose (a demo of retries).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fail: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn valid_ticket(t: &str) -> bool {
    (8..=64).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Decodes `application/x-www-form-urlencoded` into pairs (`+` is a space, `%XX` a byte).
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    fn decode(part: &[u8]) -> String {
        let mut out = Vec::with_capacity(part.len());
        let mut i = 0;
        while i < part.len() {
            match part[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < part.len() => {
                    let hex = std::str::from_utf8(&part[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(b) => {
                            out.push(b);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut kv = pair.splitn(2, |b| *b == b'=');
            let k = kv.next().unwrap_or_default();
            let v = kv.next().unwrap_or_default();
            (decode(k), decode(v))
        })
        .collect()
}

fn json_reply(
    message: &Message,
    ctx: &Ctx,
    status: u16,
    value: &serde_json::Value,
) -> Result<(), ConsumerError> {
    respond(
        message,
        ctx,
        status,
        "application/json",
        value.to_string().as_bytes(),
    )
}

/// `POST /jobs/` with `ticket`, `text`, `rounds`: queues the job, 202; bad input 400; a full task
/// channel 503.
pub async fn start(message: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    let request: HttpRequest = message.decode().map_err(ConsumerError::other)?;
    let form = parse_form(request.body.as_slice());
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let ticket = field("ticket").unwrap_or_default();
    let text = field("text").unwrap_or_default();
    let rounds: Option<u32> = field("rounds").and_then(|r| r.trim().parse().ok());
    let durable = matches!(field("durable"), Some("1" | "on" | "true"));
    let fail: Option<u32> = match field("fail").map(str::trim) {
        None | Some("") => Some(0),
        Some(n) => n.parse().ok().filter(|n| *n <= 10),
    };
    let problem = if !valid_ticket(ticket) {
        Some("ticket must be 8-64 letters, digits or '-'")
    } else if text.is_empty() || text.len() > MAX_TEXT {
        Some("text must be 1-10000 bytes")
    } else if !rounds.is_some_and(|r| (1..=MAX_ROUNDS).contains(&r)) {
        Some("rounds must be between 1 and 200000")
    } else if fail.is_none() {
        Some("fail must be between 0 and 10")
    } else {
        None
    };
    if let Some(error) = problem {
        return json_reply(&message, &ctx, 400, &serde_json::json!({"error": error}));
    }
    let job = DigestJob {
        job: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
        ticket: ticket.to_owned(),
        text: text.to_owned(),
        rounds: rounds.unwrap_or(1),
        fail: if durable { fail.unwrap_or(0) } else { 0 },
    };
    let channel = if durable {
        DURABLE_CHANNEL
    } else {
        JOB_CHANNEL
    };
    ctx.send(channel, &job)?;
    json_reply(
        &message,
        &ctx,
        202,
        &serde_json::json!({"job": job.job, "channel": channel}),
    )
}

/// SHA-256 applied `rounds` times, hex.
pub fn iterated_sha256(text: &str, rounds: u32) -> String {
    let mut digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    for _ in 1..rounds {
        digest = Sha256::digest(digest).into();
    }
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `jobs.digest` consumer.
pub async fn digest(message: Message, ctx: Ctx) -> Result<(), ConsumerError> {
    let job: DigestJob = message.decode().map_err(ConsumerError::other)?;
    if !valid_ticket(&job.ticket) || job.rounds == 0 || job.rounds > MAX_ROUNDS {
        return Err(ConsumerError::other(format!(
            "invalid job {}: bad ticket or rounds",
            job.job
        )));
    }
    let started = Instant::now();
    let (text, rounds) = (job.text.clone(), job.rounds);
    let digest = tokio::task::spawn_blocking(move || iterated_sha256(&text, rounds))
        .await
        .map_err(ConsumerError::other)?;
    let attempt = message.attempt();
    if let Some(attempt) = attempt
        && attempt <= job.fail
    {
        return Err(ConsumerError::other(format!(
            "failed on purpose on attempt {attempt} of job {}",
            job.job
        )));
    }
    let done = serde_json::json!({
        "type": "done",
        "job": job.job,
        "rounds": job.rounds,
        "digest": digest,
        "elapsed_ms": started.elapsed().as_millis() as u64,
        "attempt": attempt,
        "job_id": message.job_id(),
    });
    ctx.group_send(
        &format!("jobs-{}", job.ticket),
        &WebsocketSend::text(done.to_string()),
    )
}

/// The socket of the page that starts jobs: joins `jobs-<ticket>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobSocket;

impl WebsocketConsumer for JobSocket {
    fn groups(&self, kwargs: &Kwargs) -> Vec<String> {
        kwargs
            .get("ticket")
            .map(|t| vec![format!("jobs-{t}")])
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_digests() {
        assert_eq!(
            parse_form(b"ticket=abc-12345&text=hello+w%C3%B6rld%21&rounds=3&bad=%zz"),
            vec![
                ("ticket".into(), "abc-12345".into()),
                ("text".into(), "hello wörld!".into()),
                ("rounds".into(), "3".into()),
                ("bad".into(), "%zz".into()),
            ]
        );
        // sha256("abc")
        assert_eq!(
            iterated_sha256("abc", 1),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(iterated_sha256("abc", 2), iterated_sha256("abc", 1));
        assert!(
            valid_ticket("0123abcd-ef") && !valid_ticket("short") && !valid_ticket("has space 123")
        );
    }
}

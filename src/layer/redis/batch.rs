//! Coalesced sends. A send to a shard with nothing else in flight goes straight out; the sends
//! that come while others are in flight go to the shard's send task, which takes all those
//! waiting, writes each channel key's messages with one script call (one ZCARD, one ZADD of them
//! all, one EXPIRE) and all keys in one pipeline, and answers each sender. Under load N messages
//! cost Redis one script call instead of N, and the process one request; a lone sender pays no
//! task hop. A queued message counts as in flight until written, so a sender's next send never
//! overtakes it; one that waited the command timeout fails unwritten (a send fails as fast in a
//! queue as alone), and one whose sender gave up is not written. The same script and pipeline
//! write group sends. Scores come from a per-layer clock
//! that never repeats a value, so the messages of one sender keep their order however they are
//! batched or sent (equal scores would sort by the random member prefix).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use redis::{RedisError, RedisResult};
use tokio::sync::{mpsc, oneshot};

use super::{Inner, LayerMetrics, RedisLayer};
use crate::layer::LayerError;

/// KEYS[1] channel key; ARGV: capacity, expiry cutoff (score), ttl (s, integer), then one score
/// and member per message. Adds as many messages, in order, as the capacity leaves room for and
/// returns how many. Expired members are trimmed only when they could make the channel look
/// full (receivers drop them anyway).
pub(super) const BATCH_SEND_SCRIPT: &str = r"
local capacity = tonumber(ARGV[1])
local n = (#ARGV - 3) / 2
local count = redis.call('ZCARD', KEYS[1])
if count + n > capacity then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
  count = redis.call('ZCARD', KEYS[1])
end
local take = math.min(n, capacity - count)
if take <= 0 then
  return 0
end
redis.call('ZADD', KEYS[1], unpack(ARGV, 4, 3 + 2 * take))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return take
";

/// Most sends one batch takes; bounds the script's argument list (Lua's stack) and the time
/// Redis spends on one call.
const MAX_BATCH: usize = 256;

/// One message waiting for the shard's send task.
pub(super) struct QueuedSend {
    key: String,
    member: Vec<u8>,
    capacity: usize,
    /// True when added, false when the channel was full.
    done: oneshot::Sender<Result<bool, LayerError>>,
    /// Answered `Unavailable` unwritten once it has waited the command timeout: a send fails as
    /// fast behind a queue of failing batches as alone.
    queued_at: Instant,
    /// Counts the message as in flight until it is written (or dropped unwritten), so that a
    /// later send of the same sender cannot take the direct path past it.
    counted: InFlight,
}

/// Messages for one key, in the order they were sent, written by one script call.
pub(super) struct KeyBatch {
    pub(super) key: String,
    pub(super) capacity: usize,
    /// Score (µs since the epoch) and member per message.
    pub(super) messages: Vec<(u64, Vec<u8>)>,
}

/// The sending half of a shard's send task, replaced when the task is gone (its runtime shut
/// down while the layer lives on in another).
#[derive(Default)]
pub(super) struct SendQueue(std::sync::Mutex<Option<mpsc::UnboundedSender<QueuedSend>>>);

/// One direct write or queued message counted in its shard's in-flight count for as long as
/// it lives (a cancelled send included).
pub(super) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts a direct write only if nothing is in flight.
    pub(super) fn first(count: &Arc<AtomicUsize>) -> Option<Self> {
        count
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| InFlight(Arc::clone(count)))
    }

    pub(super) fn add(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An error for every sender of a failed batch (LayerError is not Clone).
fn shared_error(e: &LayerError) -> LayerError {
    match e {
        LayerError::Unavailable(m) => LayerError::Unavailable(m.clone()),
        other => LayerError::Protocol(other.to_string()),
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// `micros` since the epoch as seconds with exactly six decimals. Written with `itoa`: the
/// zero-padded `format!` cost ~1,000 instructions per send.
fn score_text(micros: u64) -> String {
    let mut digits = itoa::Buffer::new();
    let mut text = String::with_capacity(24);
    text.push_str(digits.format(micros / 1_000_000));
    text.push('.');
    // 1_000_000 + fraction has seven digits; the last six are the zero-padded fraction.
    text.push_str(&digits.format(1_000_000 + micros % 1_000_000)[1..]);
    text
}

impl RedisLayer {
    /// A score after every score this layer gave before: now, or 1 µs after the last one.
    pub(super) fn next_score(&self) -> u64 {
        let now = (super::now_secs() * 1e6) as u64;
        let last = &self.inner.last_score;
        let mut previous = last.load(Ordering::Relaxed);
        loop {
            let next = now.max(previous + 1);
            match last.compare_exchange_weak(previous, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => previous = seen,
            }
        }
    }

    /// Sends one message to shard `shard`: directly when no other send to it is in flight, else
    /// through the shard's send task with whatever else is waiting. True when added.
    pub(super) async fn send_coalesced(
        &self,
        shard: usize,
        key: String,
        member: Vec<u8>,
        capacity: usize,
    ) -> Result<bool, LayerError> {
        let in_flight = &self.inner.shards[shard].in_flight;
        if let Some(_alone) = InFlight::first(in_flight) {
            let batch = KeyBatch {
                key,
                capacity,
                messages: vec![(self.next_score(), member)],
            };
            let mut outcomes = self
                .write_key_batches(shard, std::slice::from_ref(&batch))
                .await;
            return match outcomes.pop() {
                Some(Ok(added)) => Ok(added == 1),
                Some(Err(e)) => Err(e),
                None => Err(LayerError::Protocol("send not attempted".into())),
            };
        }
        let (done, outcome) = oneshot::channel();
        self.enqueue(
            shard,
            QueuedSend {
                key,
                member,
                capacity,
                done,
                queued_at: Instant::now(),
                counted: InFlight::add(in_flight),
            },
        )?;
        outcome.await.unwrap_or_else(|_| Err(self.task_gone(shard)))
    }

    /// Hands `queued` to the shard's send task, starting one on this runtime when there is none
    /// (first send, or the last one's runtime is gone).
    fn enqueue(&self, shard: usize, queued: QueuedSend) -> Result<(), LayerError> {
        let queue = &self.inner.shards[shard].sends;
        let mut sender = queue.0.lock().unwrap_or_else(|p| p.into_inner());
        let queued = match sender.as_ref() {
            Some(tx) => match tx.send(queued) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => back,
            },
            None => queued,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(Arc::downgrade(&self.inner), shard, rx));
        if tx.send(queued).is_err() {
            return Err(self.task_gone(shard));
        }
        *sender = Some(tx);
        Ok(())
    }

    /// What a queued send that waited the whole command timeout gets, like a command that
    /// timed out.
    fn waited_too_long(&self, shard: usize) -> LayerError {
        LayerMetrics::add(&self.inner.metrics.unavailable, 1);
        LayerError::Unavailable(format!(
            "Redis at {} did not answer within {:?}",
            self.inner.shards[shard].addr, self.inner.settings.command_timeout
        ))
    }

    fn task_gone(&self, shard: usize) -> LayerError {
        LayerError::Unavailable(format!(
            "Redis at {}: the send task stopped (runtime shutting down)",
            self.inner.shards[shard].addr
        ))
    }

    /// Writes every key batch with one script call each, all in one pipeline on shard `shard`
    /// (within the command timeout), and returns per batch how many of its messages were added
    /// or why none was. A script Redis no longer knows (restart, SCRIPT FLUSH) is loaded and the
    /// refused batches written again: NOSCRIPT means that call did nothing.
    pub(super) async fn write_key_batches(
        &self,
        shard: usize,
        batches: &[KeyBatch],
    ) -> Vec<Result<usize, LayerError>> {
        let script = &self.inner.batch_script;
        let cutoff = score_text(
            ((super::now_secs() - self.inner.settings.expiry.as_secs_f64()).max(0.0) * 1e6) as u64,
        );
        let ttl = self.inner.settings.expiry.as_secs_f64().ceil().max(1.0) as u64;
        let mut outcomes: Vec<Option<Result<usize, LayerError>>> =
            batches.iter().map(|_| None).collect();
        let mut todo: Vec<usize> = (0..batches.len()).collect();
        for attempt in 0..2 {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            if attempt > 0 {
                pipe.cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(BATCH_SEND_SCRIPT)
                    .ignore();
            }
            for &i in &todo {
                let b = &batches[i];
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(script.get_hash())
                    .arg(1)
                    .arg(&b.key)
                    .arg(b.capacity)
                    .arg(&cutoff)
                    .arg(ttl);
                for (score, member) in &b.messages {
                    cmd.arg(score_text(*score)).arg(member.as_slice());
                }
            }
            let mut conn = self.inner.shards[shard].conn.for_sends();
            let replies = self
                .run(shard, async move {
                    pipe.query_async::<Vec<RedisResult<usize>>>(&mut conn).await
                })
                .await;
            let replies = match replies {
                Ok(r) if r.len() == todo.len() => r,
                Ok(r) => {
                    let e = LayerError::Protocol(format!(
                        "Redis at {} answered {} replies to {} script calls",
                        self.inner.shards[shard].addr,
                        r.len(),
                        todo.len()
                    ));
                    for &i in &todo {
                        outcomes[i] = Some(Err(shared_error(&e)));
                    }
                    break;
                }
                Err(e) => {
                    for &i in &todo {
                        outcomes[i] = Some(Err(shared_error(&e)));
                    }
                    break;
                }
            };
            let mut refused = Vec::new();
            for (&i, reply) in todo.iter().zip(replies) {
                match reply {
                    Ok(added) => outcomes[i] = Some(Ok(added)),
                    Err(e) if is_noscript(&e) && attempt == 0 => refused.push(i),
                    Err(e) => {
                        outcomes[i] = Some(Err(LayerError::Protocol(format!(
                            "Redis at {}: {e}",
                            self.inner.shards[shard].addr
                        ))))
                    }
                }
            }
            if refused.is_empty() {
                break;
            }
            todo = refused;
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(LayerError::Protocol("send not attempted".into()))))
            .collect()
    }
}

/// The send task of one shard: ends when the layer is dropped (its queue closes).
async fn drive(layer: Weak<Inner>, shard: usize, mut queue: mpsc::UnboundedReceiver<QueuedSend>) {
    let mut taken = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut taken, MAX_BATCH).await > 0 {
        let Some(inner) = layer.upgrade() else { break };
        let layer = RedisLayer { inner };
        let timeout = layer.inner.settings.command_timeout;
        // Keys in the order their first message came, each with its messages in order.
        let mut batches: Vec<KeyBatch> = Vec::new();
        let mut senders: Vec<Vec<oneshot::Sender<Result<bool, LayerError>>>> = Vec::new();
        let mut counted = Vec::with_capacity(taken.len());
        for q in taken.drain(..) {
            if q.done.is_closed() {
                // Its sender gave up waiting and was told nothing was sent: at most once
                // allows not sending it, and sending it now could put it after that sender's
                // next message.
                continue;
            }
            if q.queued_at.elapsed() >= timeout {
                let _ = q.done.send(Err(layer.waited_too_long(shard)));
                continue;
            }
            let i = match batches
                .iter()
                .position(|b| b.key == q.key && b.capacity == q.capacity)
            {
                Some(i) => i,
                None => {
                    batches.push(KeyBatch {
                        key: q.key,
                        capacity: q.capacity,
                        messages: Vec::new(),
                    });
                    senders.push(Vec::new());
                    batches.len() - 1
                }
            };
            batches[i].messages.push((layer.next_score(), q.member));
            senders[i].push(q.done);
            counted.push(q.counted);
        }
        if batches.is_empty() {
            continue;
        }
        let outcomes = layer.write_key_batches(shard, &batches).await;
        // Written: released before the answers, so a sender's next send may go straight out.
        drop(counted);
        for (outcome, senders) in outcomes.into_iter().zip(senders) {
            match outcome {
                Ok(added) => {
                    for (n, done) in senders.into_iter().enumerate() {
                        let _ = done.send(Ok(n < added));
                    }
                }
                Err(e) => {
                    for done in senders {
                        let _ = done.send(Err(shared_error(&e)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::score_text;

    #[test]
    fn scores_have_six_decimals() {
        assert_eq!(score_text(1_763_700_000_000_001), "1763700000.000001");
        assert_eq!(score_text(1_763_700_000_123_456), "1763700000.123456");
        assert_eq!(score_text(5), "0.000005");
        assert_eq!(score_text(0), "0.000000");
        assert_eq!(score_text(1_000_000), "1.000000");
        assert_eq!(score_text(999_999), "0.999999");
        assert_eq!(score_text(u64::MAX), "18446744073709.551615");
    }
}

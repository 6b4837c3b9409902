//! Coalesced ordering steps (see [`crate::layer::ordering`]). A step on a shard with nothing
//! else in flight goes straight out; the steps that come while others are in flight go to the
//! shard's step task, which takes all those waiting and runs them with one call of the step
//! script, one key per connection (the script takes each key in turn, each step atomic as
//! alone). Under load N steps then cost Redis one script call and the worker one request
//! instead of N: what strict ordering costs per message is the few hash commands of its steps,
//! not a script call each. A queued step that waited the command timeout fails unrun (as fast
//! as alone), and one whose caller gave up is not run (as if the caller had stopped before it).
//!
//! One call's keys all live on one shard. On Redis Cluster they would also need one hash slot,
//! as every multi-key script there does.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Weak};
use std::time::Instant;

use redis::Script;
use tokio::sync::{mpsc, oneshot};

use super::batch::InFlight;
use super::{Inner, RedisLayer};
use crate::layer::LayerError;

/// Most steps one script call takes; bounds the script's argument list and the time Redis
/// spends on one call.
const MAX_STEPS: usize = 128;

/// One step: its key and its arguments (the script's per-key argument block, after the
/// arguments all steps of a call share).
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) key: String,
    pub(crate) args: Vec<Vec<u8>>,
}

/// What the script answered for one step: verdict, expired, skipped, resume value.
pub(crate) type StepReply = (i64, u64, u64, Option<Vec<u8>>);

struct QueuedStep {
    step: Step,
    script: &'static Script,
    done: oneshot::Sender<Result<StepReply, LayerError>>,
    queued_at: Instant,
    _counted: InFlight,
}

/// The sending half of a shard's step task, and the steps in flight on the shard.
#[derive(Default)]
pub(super) struct StepQueue {
    tx: std::sync::Mutex<Option<mpsc::UnboundedSender<QueuedStep>>>,
    in_flight: Arc<AtomicUsize>,
}

impl RedisLayer {
    /// Runs one ordering step on shard `shard`: directly when no other step is in flight
    /// there, else with whatever else is waiting, in one script call.
    pub(crate) async fn run_step(
        &self,
        shard: usize,
        script: &'static Script,
        step: Step,
    ) -> Result<StepReply, LayerError> {
        let queue = &self.inner.shards[shard].steps;
        if let Some(_alone) = InFlight::first(&queue.in_flight) {
            let mut replies = self
                .run_steps(shard, script, std::slice::from_ref(&step))
                .await?;
            return replies
                .pop()
                .ok_or_else(|| LayerError::Protocol("no reply to an ordering step".into()));
        }
        let (done, reply) = oneshot::channel();
        let queued = QueuedStep {
            step,
            script,
            done,
            queued_at: Instant::now(),
            _counted: InFlight::add(&queue.in_flight),
        };
        {
            let mut tx = queue.tx.lock().unwrap_or_else(|p| p.into_inner());
            let queued = match tx.as_ref() {
                Some(sender) => match sender.send(queued) {
                    Ok(()) => None,
                    Err(mpsc::error::SendError(back)) => Some(back),
                },
                None => Some(queued),
            };
            if let Some(queued) = queued {
                let (sender, rx) = mpsc::unbounded_channel();
                tokio::spawn(drive(Arc::downgrade(&self.inner), shard, rx));
                if sender.send(queued).is_err() {
                    return Err(self.steps_gone(shard));
                }
                *tx = Some(sender);
            }
        }
        reply.await.unwrap_or_else(|_| Err(self.steps_gone(shard)))
    }

    fn steps_gone(&self, shard: usize) -> LayerError {
        LayerError::Unavailable(format!(
            "Redis at {}: the ordering task stopped (runtime shutting down)",
            self.inner.shards[shard].addr
        ))
    }

    /// Runs `steps` with one call of `script` (one key and argument block per step), within
    /// the command timeout; a reply per step, in order.
    async fn run_steps(
        &self,
        shard: usize,
        script: &'static Script,
        steps: &[Step],
    ) -> Result<Vec<StepReply>, LayerError> {
        let mut call = script.prepare_invoke();
        for s in steps {
            call.key(&s.key);
        }
        // The arguments every step shares: now (ms), the expiry (ms), the keys' ttl (s).
        let settings = &self.inner.settings;
        call.arg((super::now_secs() * 1000.0) as u64)
            .arg(u64::try_from(settings.expiry.as_millis()).unwrap_or(u64::MAX))
            .arg(settings.group_expiry.as_secs().max(1));
        for s in steps {
            for a in &s.args {
                call.arg(a.as_slice());
            }
        }
        let mut conn = self.inner.shards[shard].conn.clone();
        let replies: Vec<StepReply> = self
            .run(shard, async move { call.invoke_async(&mut conn).await })
            .await?;
        if replies.len() != steps.len() {
            return Err(LayerError::Protocol(format!(
                "Redis at {} answered {} ordering steps of {}",
                self.inner.shards[shard].addr,
                replies.len(),
                steps.len()
            )));
        }
        Ok(replies)
    }
}

/// An error for every caller of a failed call (LayerError is not Clone).
fn shared_error(e: &LayerError) -> LayerError {
    match e {
        LayerError::Unavailable(m) => LayerError::Unavailable(m.clone()),
        other => LayerError::Protocol(other.to_string()),
    }
}

/// The step task of one shard: ends when the layer is dropped (its queue closes).
async fn drive(layer: Weak<Inner>, shard: usize, mut queue: mpsc::UnboundedReceiver<QueuedStep>) {
    let mut taken = Vec::with_capacity(MAX_STEPS);
    while queue.recv_many(&mut taken, MAX_STEPS).await > 0 {
        let Some(inner) = layer.upgrade() else { break };
        let layer = RedisLayer { inner };
        let timeout = layer.inner.settings.command_timeout;
        // One script per call: steps of another script (none today) go in a call of their own.
        // Per call: its script, its slot in a Redis Cluster, the steps and who waits on each.
        type Call = (
            &'static Script,
            Option<redis::cluster_routing::Slot>,
            Vec<Step>,
            Vec<QueuedStep>,
        );
        let mut calls: Vec<Call> = Vec::new();
        for mut q in taken.drain(..) {
            if q.done.is_closed() {
                continue;
            }
            if q.queued_at.elapsed() >= timeout {
                let _ = q.done.send(Err(LayerError::Unavailable(format!(
                    "Redis at {} did not answer within {timeout:?}",
                    layer.inner.shards[shard].addr
                ))));
                continue;
            }
            let step = std::mem::replace(
                &mut q.step,
                Step {
                    key: String::new(),
                    args: Vec::new(),
                },
            );
            // In a Redis Cluster one call takes the keys of one slot.
            let slot = layer
                .is_cluster()
                .then(|| super::cluster::slot_of(&step.key));
            match calls
                .iter_mut()
                .find(|(s, at, _, _)| std::ptr::eq(*s, q.script) && *at == slot)
            {
                Some((_, _, steps, waiting)) => {
                    steps.push(step);
                    waiting.push(q);
                }
                None => calls.push((q.script, slot, vec![step], vec![q])),
            }
        }
        // All at once: in a Redis Cluster there is a call per slot, and they go to the nodes
        // together (one call otherwise).
        let layer = &layer;
        futures_util::future::join_all(calls.into_iter().map(
            |(script, _, steps, waiting)| async move {
                match layer.run_steps(shard, script, &steps).await {
                    Ok(replies) => {
                        for (q, reply) in waiting.into_iter().zip(replies) {
                            let _ = q.done.send(Ok(reply));
                        }
                    }
                    Err(e) => {
                        for q in waiting {
                            let _ = q.done.send(Err(shared_error(&e)));
                        }
                    }
                }
            },
        ))
        .await;
    }
}

//! Coalesced ordering steps (see [`crate::layer::ordering`]). A step on a shard with nothing
//! else in flight goes straight out; the steps that come while others are in flight go to the
//! shard's step task, which takes all those waiting and runs them together: script steps with
//! one call of the step script, one key per connection (the script takes each key in turn,
//! each step atomic as alone), script-free dones ([`StepKind::Done`]) in one MULTI, quick gates
//! ([`StepKind::Gate`]) in one pipeline. Under load
//! N steps then cost Redis one call and the worker one request instead of N: what strict
//! ordering costs per message is the few hash commands of its steps. A queued step that waited the command timeout fails unrun (as fast
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

/// Most steps one call takes (a script call or a MULTI); bounds its argument list and the
/// time Redis spends on it.
const MAX_STEPS: usize = 128;

/// One step: its key and its arguments (the script's per-key argument block, after the
/// arguments all steps of a call share).
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) key: String,
    pub(crate) args: Vec<Vec<u8>>,
}

/// How a step runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StepKind {
    /// By this script: one key and argument block per step, the steps of a call in one call.
    Script(&'static Script),
    /// The script-free done of the common case: an HMGET of the key's `next`, `u`, `e` and
    /// `p:{successor}`, then an HSET of `next = successor` and `run = 0`; the steps of a call
    /// in one MULTI. Its one argument: the successor's order, in digits.
    Done,
    /// The quick gate: an HMGET of the key's `next` and `u`; no arguments.
    Gate,
}

impl StepKind {
    fn same(self, other: StepKind) -> bool {
        match (self, other) {
            (StepKind::Script(a), StepKind::Script(b)) => std::ptr::eq(a, b),
            (StepKind::Done, StepKind::Done) | (StepKind::Gate, StepKind::Gate) => true,
            _ => false,
        }
    }
}

/// What the script answered for one step: verdict, expired, skipped, resume value.
pub(crate) type ScriptReply = (i64, u64, u64, Option<Vec<u8>>);

/// The answer to one step, by its kind: the script's, or the fields read, in the order asked.
enum StepReply {
    Script(ScriptReply),
    Read(Vec<Option<Vec<u8>>>),
}

struct QueuedStep {
    step: Step,
    kind: StepKind,
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
    /// Runs one step of `script` on shard `shard` (see [`RedisLayer::run_step`]).
    pub(crate) async fn run_script_step(
        &self,
        shard: usize,
        script: &'static Script,
        step: Step,
    ) -> Result<ScriptReply, LayerError> {
        match self.run_step(shard, StepKind::Script(script), step).await? {
            StepReply::Script(reply) => Ok(reply),
            StepReply::Read(_) => Err(self.mismatched_reply(shard)),
        }
    }

    /// Runs one script-free done on shard `shard` (see [`RedisLayer::run_step`]): what it read
    /// before its write, `next`, `u`, `e` and the parked successor.
    pub(crate) async fn run_done_step(
        &self,
        shard: usize,
        step: Step,
    ) -> Result<[Option<Vec<u8>>; 4], LayerError> {
        self.run_read_step(shard, StepKind::Done, step).await
    }

    /// Runs one quick gate's read on shard `shard` (see [`RedisLayer::run_step`]): `next`, `u`.
    pub(crate) async fn run_gate_step(
        &self,
        shard: usize,
        key: String,
    ) -> Result<[Option<Vec<u8>>; 2], LayerError> {
        let step = Step {
            key,
            args: Vec::new(),
        };
        self.run_read_step(shard, StepKind::Gate, step).await
    }

    /// A read step's fields, exactly `N` of them.
    async fn run_read_step<const N: usize>(
        &self,
        shard: usize,
        kind: StepKind,
        step: Step,
    ) -> Result<[Option<Vec<u8>>; N], LayerError> {
        match self.run_step(shard, kind, step).await? {
            StepReply::Read(read) => read.try_into().map_err(|read: Vec<_>| {
                LayerError::Protocol(format!(
                    "Redis at {}: an ordering read answered {} fields of {N}",
                    self.inner.shards[shard].addr,
                    read.len()
                ))
            }),
            StepReply::Script(_) => Err(self.mismatched_reply(shard)),
        }
    }

    fn mismatched_reply(&self, shard: usize) -> LayerError {
        LayerError::Protocol(format!(
            "Redis at {}: an ordering step got the reply of another kind",
            self.inner.shards[shard].addr
        ))
    }

    /// Runs one ordering step on shard `shard`: directly when no other step is in flight
    /// there, else with whatever else of its kind is waiting, in one call.
    async fn run_step(
        &self,
        shard: usize,
        kind: StepKind,
        step: Step,
    ) -> Result<StepReply, LayerError> {
        let queue = &self.inner.shards[shard].steps;
        if let Some(_alone) = InFlight::first(&queue.in_flight) {
            let mut replies = self
                .run_steps(shard, kind, std::slice::from_ref(&step))
                .await?;
            return replies
                .pop()
                .ok_or_else(|| LayerError::Protocol("no reply to an ordering step".into()));
        }
        let (done, reply) = oneshot::channel();
        let queued = QueuedStep {
            step,
            kind,
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

    /// Runs `steps` of one kind in one call, within the command timeout; a reply per step, in
    /// order.
    async fn run_steps(
        &self,
        shard: usize,
        kind: StepKind,
        steps: &[Step],
    ) -> Result<Vec<StepReply>, LayerError> {
        let replies = match kind {
            StepKind::Script(script) => self
                .run_script_steps(shard, script, steps)
                .await?
                .into_iter()
                .map(StepReply::Script)
                .collect::<Vec<_>>(),
            StepKind::Done | StepKind::Gate => self
                .run_read_steps(shard, kind, steps)
                .await?
                .into_iter()
                .map(StepReply::Read)
                .collect(),
        };
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

    /// Script-free dones, all in one MULTI; or quick gates' reads, in one pipeline.
    async fn run_read_steps(
        &self,
        shard: usize,
        kind: StepKind,
        steps: &[Step],
    ) -> Result<Vec<Vec<Option<Vec<u8>>>>, LayerError> {
        let mut pipe = redis::pipe();
        let done = matches!(kind, StepKind::Done);
        if done {
            pipe.atomic();
        }
        for s in steps {
            pipe.cmd("HMGET").arg(&s.key).arg("next").arg("u");
            if !done {
                continue;
            }
            let successor = s.args.first().map_or(&[][..], Vec::as_slice);
            let mut parked = Vec::with_capacity(2 + successor.len());
            parked.extend_from_slice(b"p:");
            parked.extend_from_slice(successor);
            pipe.arg("e")
                .arg(parked)
                .cmd("HSET")
                .arg(&s.key)
                .arg("next")
                .arg(successor)
                .arg("run")
                .arg(0)
                .ignore();
        }
        let mut conn = self.inner.shards[shard].conn.clone();
        self.run(shard, async move { pipe.query_async(&mut conn).await })
            .await
    }

    /// Script steps, with one call of `script` (one key and argument block per step).
    async fn run_script_steps(
        &self,
        shard: usize,
        script: &'static Script,
        steps: &[Step],
    ) -> Result<Vec<ScriptReply>, LayerError> {
        let mut call = script.prepare_invoke();
        for s in steps {
            call.key(&s.key);
        }
        // The arguments every step shares: now (ms), the expiry (ms), the keys' ttl (s).
        let settings = &self.inner.settings;
        call.arg(crate::layer::now_ms())
            .arg(u64::try_from(settings.expiry.as_millis()).unwrap_or(u64::MAX))
            .arg(settings.group_expiry.as_secs().max(1));
        for s in steps {
            for a in &s.args {
                call.arg(a.as_slice());
            }
        }
        let mut conn = self.inner.shards[shard].conn.clone();
        self.run(shard, async move { call.invoke_async(&mut conn).await })
            .await
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
        // One kind per call: steps of another kind go in a call of their own.
        // Per call: its kind, its slot in a Redis Cluster, the steps and who waits on each.
        type Call = (
            StepKind,
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
                .find(|(kind, at, _, _)| kind.same(q.kind) && *at == slot)
            {
                Some((_, _, steps, waiting)) => {
                    steps.push(step);
                    waiting.push(q);
                }
                None => calls.push((q.kind, slot, vec![step], vec![q])),
            }
        }
        // All at once: in a Redis Cluster there is a call per slot, and they go to the nodes
        // together (one call otherwise).
        let layer = &layer;
        futures_util::future::join_all(calls.into_iter().map(
            |(kind, _, steps, waiting)| async move {
                match layer.run_steps(shard, kind, &steps).await {
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

//! The worker as a connection owner (see [`crate::layer::owner`]): it names itself in the accept
//! of a strictly ordered socket, listens on its owner channel, and runs each owned connection's
//! messages one after another in the order they were popped, with no ordering step in the layer.
//!
//! Each message of an owner channel is decoded in the receive loop itself and put in its
//! connection's lane there, so the pop order is the run order (one task per connection drains
//! its lane; the others wait in it with their consumer slots). A message its consumer asks to
//! requeue (`ConsumeLater`, a channel session unreachable) is run again in place after a pause,
//! up to the worker's retries, instead of going to the back of a channel: its successors wait
//! for it, as they would for a requeued message in the layer's ordering. A connection's first
//! messages wait until its connect has applied all its actions (the accept goes out first). When
//! the owner name changes (its lease lapsed), the receive loop reads the new name's channel
//! instead of the old one. When a connection's
//! disconnect has run, its ordering state in the layer (written by the connect, or by a take-back
//! from an earlier owner) is removed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard_routing::Message;
use switchyard_routing::asgi::{OWNER_KEY, WEBSOCKET_CONNECT, WEBSOCKET_DISCONNECT};
use switchyard_routing::value::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::task::JoinSet;

use super::{Ran, Retry, Worker, WorkerMetrics};
use crate::layer::owner::owned_kind;
use crate::layer::{Envelope, wire};

/// Pause before a message requeued by its consumer runs again in its lane.
const REQUEUE_PAUSE: Duration = Duration::from_millis(100);

/// An owned message in hand, with the consumer slot it holds.
#[derive(Debug)]
pub(super) struct Owned {
    message: Message,
    started: Instant,
    _slot: Option<OwnedSemaphorePermit>,
}

/// The owned messages of one connection waiting while a task runs one of them, or while the
/// connection's connect (which named this worker its owner) has not finished.
#[derive(Debug, Default)]
pub(super) struct OwnedLane {
    waiting: VecDeque<Owned>,
    /// A task runs (or is about to run) the lane.
    running: bool,
    /// Set while the connect runs: the lane's task waits for it before the first frame.
    connecting: Option<Arc<Notify>>,
}

impl Worker {
    /// True when this worker takes every message of a socket (and so may own it).
    pub(super) fn may_own(channels: &[String]) -> bool {
        [
            WEBSOCKET_CONNECT,
            switchyard_routing::asgi::WEBSOCKET_RECEIVE,
            WEBSOCKET_DISCONNECT,
        ]
        .iter()
        .all(|c| channels.iter().any(|have| have == c))
    }

    /// Puts a message popped from the owner channel in its connection's lane, starting the
    /// lane's task when it has none.
    pub(super) fn take_owned(
        self: &Arc<Self>,
        envelope: Envelope,
        slot: Option<OwnedSemaphorePermit>,
        running: &mut JoinSet<()>,
    ) {
        let mut message = match Message::from_payload(envelope.channel, envelope.payload) {
            Ok(m) => m,
            Err(e) => {
                WorkerMetrics::add(&self.metrics.dropped, 1);
                tracing::error!(error = %e, "dropped an undecodable message from the owner channel");
                return;
            }
        };
        message.channel = owned_kind(&message).to_owned();
        self.metrics.received(&message.channel);
        let Some(reply) = message.reply_channel() else {
            WorkerMetrics::add(&self.metrics.dropped, 1);
            tracing::error!(channel = %message.channel, "dropped a message without a reply channel from the owner channel");
            return;
        };
        // Looked up by the message's own reply channel: a name is allocated only for a lane
        // that starts, not for every message that joins one.
        let mut lanes = self.owned_lanes();
        let (reply, connecting) = match lanes.get_mut(reply) {
            Some(lane) if lane.running => {
                lane.waiting.push_back(Owned {
                    message,
                    started: Instant::now(),
                    _slot: slot,
                });
                return;
            }
            Some(lane) => {
                lane.running = true;
                (reply.to_owned(), lane.connecting.clone())
            }
            None => {
                let reply = reply.to_owned();
                lanes.insert(
                    reply.clone(),
                    OwnedLane {
                        running: true,
                        ..OwnedLane::default()
                    },
                );
                (reply, None)
            }
        };
        drop(lanes);
        let owned = Owned {
            message,
            started: Instant::now(),
            _slot: slot,
        };
        let this = Arc::clone(self);
        running.spawn(async move {
            if let Some(connect_done) = connecting {
                connect_done.notified().await;
            }
            Box::pin(this.run_owned(reply, owned)).await;
        });
    }

    /// Holds the socket's owned messages back while its connect finishes (the accept naming
    /// this worker goes out before the connect's other actions are applied): with the order
    /// kept in the layer, frame 1 waits for the connect's done the same way.
    pub(super) fn hold_for_connect(&self, reply: &str) {
        self.owned_lanes().insert(
            reply.to_owned(),
            OwnedLane {
                connecting: Some(Arc::new(Notify::new())),
                ..OwnedLane::default()
            },
        );
    }

    /// The connect of `reply` has finished: its owned messages may run.
    pub(super) fn connect_finished(&self, reply: &str) {
        let mut lanes = self.owned_lanes();
        let Some(lane) = lanes.get_mut(reply) else {
            return;
        };
        match lane.connecting.take() {
            // No message came meanwhile: no lane to keep.
            Some(_) if !lane.running => {
                lanes.remove(reply);
            }
            // A stored permit: the lane's task goes on whether it waits already or not.
            Some(done) => done.notify_one(),
            None => {}
        }
    }

    fn owned_lanes(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, OwnedLane>> {
        self.owned_lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `first`, then the connection's lane until it is empty.
    async fn run_owned(&self, reply: String, first: Owned) {
        let mut next = Some(first);
        loop {
            let owned = match next.take() {
                Some(o) => o,
                None => {
                    let mut lanes = self.owned_lanes();
                    match lanes.get_mut(&reply).and_then(|l| l.waiting.pop_front()) {
                        Some(o) => o,
                        None => {
                            lanes.remove(&reply);
                            return;
                        }
                    }
                }
            };
            let Owned {
                message, started, ..
            } = owned;
            let disconnect = message.channel == WEBSOCKET_DISCONNECT;
            let order = message.order();
            self.run_in_place(message).await;
            WorkerMetrics::add(&self.metrics.owned, 1);
            self.metrics.observe(started.elapsed());
            if disconnect && let Some(order) = order {
                // The state the connect (or a take-back) left: recorded done and so removed.
                let _ = self.ordering_done(&reply, order, true).await;
            }
        }
    }

    /// Routes and runs an owned message, again after a pause while its consumer requeues it.
    async fn run_in_place(&self, message: Message) {
        let Some(resolved) = self.router.resolve(&message) else {
            WorkerMetrics::add(&self.metrics.unrouted, 1);
            tracing::warn!(channel = %message.channel, path = ?message.path(), "no route for message; dropped");
            return;
        };
        let mut message = message;
        while let Ran::Again(requeued) = self
            .consume(message, resolved.clone(), Retry::InPlace)
            .await
        {
            message = requeued;
            tokio::time::sleep(REQUEUE_PAUSE).await;
        }
    }

    /// The accept of a strictly ordered connection, naming this worker its owner. Anything
    /// that is not a map is sent as it is (the server refuses it as before).
    pub(super) fn with_owner(&self, payload: Bytes) -> Bytes {
        let Some(owner) = &self.owner else {
            return payload;
        };
        let Ok(mut map) = wire::decode_map(&payload) else {
            return payload;
        };
        map.insert(OWNER_KEY, Value::Str(owner.get().to_string()));
        switchyard_routing::codec::to_msgpack(&map).map_or(payload, Bytes::from)
    }
}

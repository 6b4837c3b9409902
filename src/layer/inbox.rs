//! The process inbox: one `!` channel per process, read by one loop that demultiplexes each
//! message into the bounded buffer of the local channel it names.
//!
//! Every reply channel of an interface server is a local channel of its inbox, so one blocking
//! pop (in batches) serves every connection, and a group message naming several local channels
//! arrives once and is handed to each of them sharing the same bytes. A full local buffer drops
//! the newest message and counts it (per channel and in the layer metrics) — but first, at most
//! once per [`YIELD_EVERY`] messages and not again for a buffer whose reader has not taken
//! anything since its last refusal, the loop lets the readers run and tries once more, because a
//! pop hands out more messages than a buffer holds; a message for a local channel nobody holds
//! is dropped and counted too.
//!
//! On the Redis layer the inbox also holds the process's lease and its record of group
//! memberships (see [`super::membership`] and the Redis backend's `lease` module): every second
//! it renews the lease, removes processes whose lease lapsed, and when the renewal shows that
//! Redis lost its state it puts every membership of its sockets back (or, under
//! [`LayerLossPolicy::Close`], closes them with 1012).
//!
//! The inbox also enforces a cap on groups per socket, when the server sets one
//! ([`ProcessInbox::cap_groups_per_socket`]): the notice of a `group_add` that takes a socket's
//! channel over it is not recorded; the membership is discarded on the layer and the socket told
//! to close with 1008 (policy violation), past its buffer's capacity so that a full buffer cannot
//! lose the close. On the in-memory layer there are no notices on the wire: the layer tells the
//! inboxes of its own process directly ([`super::memory`]), so `dev` enforces the same cap.
//!
//! A local channel's buffer is a [`LocalQueue`], not a tokio mpsc channel: an mpsc channel
//! allocates its first block of 32 slots and a cache-padded header up front, which every
//! idle WebSocket would carry; an empty `LocalQueue` is one small allocation.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use rustc_hash::FxBuildHasher;
use switchyard_routing::names;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backend::ChannelBackend;
use super::membership::{MEMBERSHIP_LOCAL, MembershipNotice, MembershipOp, MembershipTable};
use super::metrics::LayerMetrics;
use super::redis::{LeaseState, RedisLayer};
use super::settings::LayerLossPolicy;
use super::{Envelope, Layer, LayerError, random_local_part, with_random_local_part};

/// How often the lease is renewed (and lapsed leases looked for).
const LEASE_RENEW: Duration = Duration::from_secs(1);
/// The renewal's period while Redis does not answer: how soon its return is noticed.
const LEASE_RETRY: Duration = Duration::from_millis(250);

/// How long one pop blocks; the loop notices shutdown between pops.
const POP_BLOCK: Duration = Duration::from_secs(1);

/// At most one yield of the loop per this many messages handed out. A pop takes up to
/// `inbox_batch` (512) messages, and a group message among them is handed out once per local
/// target, while a socket's buffer holds 64 (`outbound_queue`): a buffer found full in the middle
/// of a batch may only mean that its reader has not run since the batch began, so the loop lets
/// the readers run once and tries again before it drops the message. That covers a reader that
/// keeps up only if its buffer holds at least this many (the server's default is equal). Not
/// more often: yielding after every few messages splits a broadcast's fan-out into passes,
/// one wake-up of every reader per pass, which cuts the sustained broadcast rate several
/// times over; and a buffer refused since its reader
/// last took a message gets no yield at all, so stuck readers cannot bring that back.
const YIELD_EVERY: usize = 64;

/// The bounded buffer of one local channel, shared by the inbox loop (the only producer) and
/// the [`LocalChannel`] (the only consumer).
#[derive(Debug)]
struct LocalQueue {
    state: Mutex<QueueState>,
    capacity: usize,
    /// The waiting consumer. There is only one ([`LocalChannel::recv`] takes `&mut self`), so
    /// a single waker slot does what a `Notify` did for less: no waiter list and no lock per
    /// wait, which a socket's loop pays on every event.
    ready: AtomicWaker,
    /// Messages refused because the buffer was full (read by the slow-client policy).
    dropped: AtomicU64,
    /// A WebSocket's channel: told to close with 1012 when Redis lost state under
    /// [`LayerLossPolicy::Close`], and held to the cap on groups per socket.
    socket: bool,
    /// The socket went over the cap on groups and was told to close (counted once).
    over_group_cap: AtomicBool,
}

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<Envelope>,
    /// No message can arrive any more (the inbox loop has ended); what is queued still drains.
    closed: bool,
    /// A message was refused and the reader has taken nothing since: its reader is not keeping
    /// up, so the loop does not wait for it again.
    refused: bool,
}

/// What became of a pushed message.
enum Pushed {
    Queued,
    /// The buffer was full and the caller may wait for its reader: the message comes back, not
    /// counted, to be pushed again.
    Wait(Envelope),
    /// The buffer was full: the message was dropped and counted in `dropped`; it comes back for
    /// the log line.
    Refused(Envelope),
    Closed,
}

/// What a pop found.
enum Popped {
    Item(Envelope),
    Empty,
    /// Empty, and nothing can arrive any more.
    Closed,
}

/// Capacity an emptied buffer keeps: a socket that once took a burst should not hold the
/// burst's worth of slots for the rest of its (possibly idle) life.
const KEPT_CAPACITY: usize = 4;
/// Capacity above which an emptied buffer gives memory back (bursts up to this never reallocate).
const SHRINK_ABOVE: usize = 16;

impl LocalQueue {
    fn new(capacity: usize, socket: bool) -> Self {
        LocalQueue {
            state: Mutex::new(QueueState::default()),
            capacity: capacity.max(1),
            ready: AtomicWaker::new(),
            dropped: AtomicU64::new(0),
            socket,
            over_group_cap: AtomicBool::new(false),
        }
    }

    /// The lock, also after a panic elsewhere held it: nothing panics while holding it, and a
    /// poisoned queue must not lose what it holds.
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `envelope` unless the buffer is closed or full. A full buffer gives the message back
    /// to wait for the reader when `may_wait` and the reader took something since its last
    /// refusal; otherwise it refuses it, counted under the same lock as the check, so a reader
    /// that empties the buffer right after sees the drop.
    fn push(&self, envelope: Envelope, may_wait: bool) -> Pushed {
        let mut state = self.lock();
        if state.closed {
            return Pushed::Closed;
        }
        if state.items.len() >= self.capacity {
            if may_wait && !state.refused {
                return Pushed::Wait(envelope);
            }
            state.refused = true;
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Pushed::Refused(envelope);
        }
        state.items.push_back(envelope);
        drop(state);
        self.ready.wake();
        Pushed::Queued
    }

    /// Queues `envelope` whatever the buffer holds (a close the server decided on must not be
    /// dropped for want of room); false once the buffer is closed.
    fn push_forced(&self, envelope: Envelope) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        state.items.push_back(envelope);
        drop(state);
        self.ready.wake();
        true
    }

    fn pop(&self) -> Popped {
        let mut state = self.lock();
        match state.items.pop_front() {
            Some(envelope) => {
                state.refused = false;
                if state.items.is_empty() && state.items.capacity() > SHRINK_ABOVE {
                    state.items.shrink_to(KEPT_CAPACITY);
                }
                Popped::Item(envelope)
            }
            None if state.closed => Popped::Closed,
            None => Popped::Empty,
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.wake();
    }
}

/// The cap on groups per socket and where its closes are counted.
#[derive(Debug)]
struct GroupCap {
    max: usize,
    closes: Arc<AtomicU64>,
}

#[derive(Debug)]
pub(super) struct Inner {
    name: String,
    layer: Layer,
    /// Keyed by local channel name. The names are minted here (random local parts), never
    /// chosen by a client, so they need no keyed hash against collision floods; the default
    /// SipHash was a third of the cost of handing a broadcast to each socket.
    slots: DashMap<String, Arc<LocalQueue>, FxBuildHasher>,
    stop: CancellationToken,
    /// Cancelled when the receive loop has ended, however it ended.
    ended: CancellationToken,
    pump: Mutex<Option<JoinHandle<()>>>,
    /// The groups of each local channel, as workers reported them.
    memberships: MembershipTable,
    /// True while memberships are being put back after Redis lost state.
    reasserting: AtomicBool,
    /// The lease task (Redis only).
    upkeep: Mutex<Option<JoinHandle<()>>>,
    /// Groups a socket's channel may be in, once the server set it.
    group_cap: OnceLock<GroupCap>,
    /// The second of the last log line about the group cap: at most one per second, as a
    /// client joining groups in a loop would otherwise write one per join.
    group_cap_logged: AtomicU64,
}

/// A process's inbox and its receive loop. Clones share them; the loop runs until
/// [`ProcessInbox::shutdown`].
#[derive(Debug, Clone)]
pub struct ProcessInbox {
    inner: Arc<Inner>,
}

impl ProcessInbox {
    pub(crate) async fn start(layer: Layer, prefix: &str) -> Result<Self, LayerError> {
        let name = format!("{prefix}.{}!", random_local_part());
        names::validate_receive_channel(&name)?;
        let mut receiver = layer.receiver().await?;
        let inner = Arc::new(Inner {
            name,
            layer,
            slots: DashMap::with_hasher(FxBuildHasher),
            stop: CancellationToken::new(),
            ended: CancellationToken::new(),
            pump: Mutex::new(None),
            memberships: MembershipTable::default(),
            reasserting: AtomicBool::new(false),
            upkeep: Mutex::new(None),
            group_cap: OnceLock::new(),
            group_cap_logged: AtomicU64::new(0),
        });
        if let Layer::Memory(memory) = &inner.layer {
            // No notices travel on the in-memory layer: it tells this inbox itself.
            memory.watch_memberships(&inner.name, Arc::downgrade(&inner));
        }
        if let Layer::Redis(redis) = &inner.layer {
            let mut lease = LeaseState::default();
            let ttl = redis.settings().lease_ttl;
            if let Err(e) = redis.renew_lease(&inner.name, ttl, &mut lease).await {
                tracing::warn!(inbox = %inner.name, error = %e, "could not take the process lease yet; retrying");
            }
            let handle = tokio::spawn(upkeep(Arc::clone(&inner), redis.clone(), lease));
            if let Ok(mut slot) = inner.upkeep.lock() {
                *slot = Some(handle);
            }
        }
        let pump_inner = Arc::clone(&inner);
        let handle = tokio::spawn(async move {
            // However the loop ends (shutdown, panic, abort), its local channels learn of it:
            // their queues close, so `recv` returns `None` (once drained) instead of waiting forever.
            let _close_on_exit = CloseSlotsOnDrop(Arc::clone(&pump_inner));
            let batch = pump_inner.layer.settings().inbox_batch;
            let mut failures = 0u32;
            // Messages handed out since the loop last yielded; starts full, so the first full
            // buffer may wait.
            let mut since_yield = YIELD_EVERY;
            // Checked between pops only: dropping a pop in flight would lose what it pops.
            while !pump_inner.stop.is_cancelled() {
                match receiver
                    .receive_batch(&pump_inner.name, POP_BLOCK, batch)
                    .await
                {
                    Ok(envelopes) => {
                        failures = 0;
                        for e in envelopes {
                            since_yield = since_yield.saturating_add(1);
                            let may_wait = since_yield >= YIELD_EVERY;
                            let Some((queue, e)) = pump_inner.deliver(e, may_wait) else {
                                continue;
                            };
                            since_yield = 0;
                            tokio::task::yield_now().await;
                            pump_inner.hand_to(queue, e, false);
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_power_of_two() {
                            tracing::warn!(inbox = %pump_inner.name, error = %e, failures, "inbox receive failed; retrying");
                        }
                    }
                }
            }
        });
        if let Ok(mut slot) = inner.pump.lock() {
            *slot = Some(handle);
        }
        Ok(ProcessInbox { inner })
    }

    /// The inbox name (ends with `!`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The layer the inbox reads from.
    pub fn layer(&self) -> &Layer {
        &self.inner.layer
    }

    /// A new local channel with the layer's default buffer.
    pub fn new_channel(&self) -> LocalChannel {
        self.channel_with_buffer(self.inner.layer.settings().local_buffer())
    }

    /// A new local channel (`{inbox}{random}`) buffering at most `buffer` messages.
    pub fn channel_with_buffer(&self, buffer: usize) -> LocalChannel {
        self.make_channel(buffer, false)
    }

    /// A WebSocket's local channel: as [`ProcessInbox::channel_with_buffer`], and told to close
    /// (`{"close": 1012}`) when Redis lost state under [`LayerLossPolicy::Close`].
    pub fn socket_channel_with_buffer(&self, buffer: usize) -> LocalChannel {
        self.make_channel(buffer, true)
    }

    fn make_channel(&self, buffer: usize, socket: bool) -> LocalChannel {
        let name = with_random_local_part(&self.inner.name);
        let queue = Arc::new(LocalQueue::new(buffer, socket));
        self.inner.slots.insert(name.clone(), Arc::clone(&queue));
        // The loop may have ended (and closed every queue) before this one was registered.
        if self.inner.ended.is_cancelled() {
            queue.close();
        }
        LocalChannel {
            name,
            queue,
            inbox: Arc::clone(&self.inner),
        }
    }

    /// Resolves once the receive loop has ended (shut down, panicked or aborted): from then on
    /// no message reaches any local channel of this inbox.
    pub async fn ended(&self) {
        self.inner.ended.cancelled().await;
    }

    /// Local channels currently held.
    pub fn local_channels(&self) -> usize {
        self.inner.slots.len()
    }

    /// Group memberships of this process's local channels, as workers reported them.
    pub fn memberships(&self) -> usize {
        self.inner.memberships.len()
    }

    /// Caps the groups each socket's channel may be in at `max`: a `group_add` past it is
    /// discarded on the layer and the socket closed with 1008, each such socket counted once in
    /// `closes`. Set once, before sockets open; false (and nothing changed) when already set.
    pub fn cap_groups_per_socket(&self, max: usize, closes: Arc<AtomicU64>) -> bool {
        self.inner.group_cap.set(GroupCap { max, closes }).is_ok()
    }

    /// Groups recorded for local channel `channel`.
    pub fn groups_of(&self, channel: &str) -> usize {
        self.inner.memberships.groups_of(channel)
    }

    /// True while memberships are being put back after Redis lost state.
    pub fn reasserting(&self) -> bool {
        self.inner.reasserting.load(Ordering::Relaxed)
    }

    /// Stops the receive loop (between pops) and waits for it, at most `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stop.cancel();
        let upkeep = self.inner.upkeep.lock().ok().and_then(|mut h| h.take());
        if let Some(upkeep) = upkeep {
            upkeep.abort();
        }
        if let Layer::Redis(redis) = &self.inner.layer {
            // Gone now rather than when the lease lapses: a rolling restart leaves no stale
            // members behind for every broadcast to pay for.
            match tokio::time::timeout(grace, redis.release_lease(&self.inner.name)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not release the process lease"),
                Err(_) => tracing::warn!("releasing the process lease timed out"),
            }
        }
        let handle = self.inner.pump.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let abort = handle.abort_handle();
            if tokio::time::timeout(grace, handle).await.is_err() {
                abort.abort();
            }
        }
    }
}

struct CloseSlotsOnDrop(Arc<Inner>);

impl Drop for CloseSlotsOnDrop {
    fn drop(&mut self) {
        self.0.ended.cancel();
        for slot in self.0.slots.iter() {
            slot.value().close();
        }
        self.0.slots.clear();
    }
}

impl Inner {
    fn is_membership_notice(&self, envelope: &Envelope) -> bool {
        envelope
            .channel
            .strip_prefix(self.name.as_str())
            .is_some_and(|local| local == MEMBERSHIP_LOCAL)
    }

    /// Decodes a membership notice from the layer and applies it.
    fn apply_notice(&self, envelope: &Envelope) {
        match MembershipNotice::decode(&envelope.payload) {
            Ok(notice) => self.on_notice(notice),
            Err(e) => {
                LayerMetrics::add(&self.layer.metrics().garbage, 1);
                tracing::warn!(error = %e, "dropped an undecodable membership notice");
            }
        }
    }

    /// Records a worker's `group_add`/`group_discard` for a channel this process still holds,
    /// holding sockets to the cap on groups.
    pub(super) fn on_notice(&self, notice: MembershipNotice) {
        // Clone the queue out of the map and let the guard go before anything else.
        let Some(queue) = self
            .slots
            .get(&notice.channel)
            .map(|q| Arc::clone(q.value()))
        else {
            return;
        };
        let cap = self
            .group_cap
            .get()
            .filter(|_| queue.socket && notice.op == MembershipOp::Add);
        let Err(refused) = self.memberships.apply_within(notice, cap.map(|c| c.max)) else {
            return;
        };
        let Some(cap) = cap else { return };
        self.over_group_cap(cap, queue, refused);
    }

    /// A socket's `group_add` went over the cap: undo the membership, then close the socket
    /// with 1008 (so a client that sees the close finds the membership gone), counted and
    /// logged once per socket; every membership past the cap is undone.
    fn over_group_cap(&self, cap: &GroupCap, queue: Arc<LocalQueue>, refused: MembershipNotice) {
        let MembershipNotice { group, channel, .. } = refused;
        let first = !queue.over_group_cap.swap(true, Ordering::Relaxed);
        if first {
            let total = cap.closes.fetch_add(1, Ordering::Relaxed) + 1;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if self.group_cap_logged.swap(now, Ordering::Relaxed) != now {
                tracing::info!(channel = %channel, group = %group, max = cap.max, total, "a socket joined more groups than --max-groups-per-socket: that membership discarded, closing the socket with 1008");
            }
        }
        let layer = self.layer.clone();
        tokio::spawn(async move {
            if let Err(e) = layer.group_discard(&group, &channel).await {
                tracing::warn!(channel = %channel, group = %group, error = %e, "could not discard a membership over the cap on groups; it lapses with the group expiry");
            }
            if first {
                queue.push_forced(Envelope {
                    channel,
                    payload: bytes::Bytes::from_static(CLOSE_1008),
                });
            }
        });
    }

    /// Redis lost its state: put the memberships back, or close the sockets, as configured.
    /// False when putting them back failed (to be tried again).
    async fn recover_from_loss(&self, redis: &RedisLayer) -> bool {
        match redis.settings().on_layer_loss {
            LayerLossPolicy::Resubscribe => {
                self.reasserting.store(true, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let by_group = self.memberships.by_group();
                let result = redis.reassert(&self.name, &by_group).await;
                self.reasserting.store(false, Ordering::Relaxed);
                match result {
                    Ok(n) => {
                        tracing::warn!(inbox = %self.name, memberships = n, groups = by_group.len(), elapsed = ?started.elapsed(), "Redis had lost this process's state; memberships put back");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(inbox = %self.name, error = %e, "putting memberships back failed; retrying");
                        false
                    }
                }
            }
            LayerLossPolicy::Close => {
                let payload = bytes::Bytes::from_static(CLOSE_1012);
                let sockets: Vec<(String, Arc<LocalQueue>)> = self
                    .slots
                    .iter()
                    .filter(|e| e.value().socket)
                    .map(|e| (e.key().clone(), Arc::clone(e.value())))
                    .collect();
                tracing::warn!(inbox = %self.name, sockets = sockets.len(), "Redis had lost this process's state; closing every socket with 1012");
                for (channel, queue) in sockets {
                    let close = Envelope {
                        channel,
                        payload: payload.clone(),
                    };
                    self.hand_to(queue, close, false);
                }
                true
            }
        }
    }

    /// Hands `envelope` to its local channel; see [`Inner::hand_to`].
    fn deliver(&self, envelope: Envelope, may_wait: bool) -> Option<(Arc<LocalQueue>, Envelope)> {
        // Clone the queue out of the map and let the guard go before anything else.
        let queue = self
            .slots
            .get(&envelope.channel)
            .map(|q| Arc::clone(q.value()));
        let Some(queue) = queue else {
            if self.is_membership_notice(&envelope) {
                self.apply_notice(&envelope);
                return None;
            }
            LayerMetrics::add(&self.layer.metrics().local_unknown, 1);
            tracing::debug!(channel = %envelope.channel, "message for an unknown local channel dropped");
            return None;
        };
        self.hand_to(queue, envelope, may_wait)
    }

    /// Pushes `envelope` into `queue`, counting what is dropped; only a message that may wait for
    /// its reader (see [`LocalQueue::push`]) comes back, with its queue, to be handed again.
    fn hand_to(
        &self,
        queue: Arc<LocalQueue>,
        envelope: Envelope,
        may_wait: bool,
    ) -> Option<(Arc<LocalQueue>, Envelope)> {
        match queue.push(envelope, may_wait) {
            Pushed::Queued => None,
            Pushed::Wait(e) => Some((queue, e)),
            Pushed::Refused(e) => {
                LayerMetrics::add(&self.layer.metrics().local_full, 1);
                tracing::debug!(channel = %e.channel, "local channel buffer full; message dropped");
                None
            }
            Pushed::Closed => {
                LayerMetrics::add(&self.layer.metrics().local_unknown, 1);
                None
            }
        }
    }
}

/// One local channel of a process inbox: its name (to hand out as a reply channel) and its
/// bounded buffer. Dropping it unregisters the name; later messages for it are counted and dropped.
#[derive(Debug)]
pub struct LocalChannel {
    name: String,
    queue: Arc<LocalQueue>,
    inbox: Arc<Inner>,
}

impl LocalChannel {
    /// The full channel name (`{inbox}{random}`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next message, or `None` once the inbox is gone and the buffer is empty.
    /// Cancel-safe: a message is taken only when this returns it.
    pub async fn recv(&mut self) -> Option<Envelope> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`LocalChannel::recv`] as a poll, for a caller that polls it beside other sources.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Envelope>> {
        // Registered before the look, so a push right after it wakes this reader; one look per
        // poll (a socket's loop polls an empty channel several times per message it handles).
        self.queue.ready.register(cx.waker());
        match self.queue.pop() {
            Popped::Item(envelope) => Poll::Ready(Some(envelope)),
            Popped::Closed => Poll::Ready(None),
            Popped::Empty => Poll::Pending,
        }
    }

    /// The next message if one is buffered.
    pub fn try_recv(&mut self) -> Option<Envelope> {
        match self.queue.pop() {
            Popped::Item(envelope) => Some(envelope),
            Popped::Empty | Popped::Closed => None,
        }
    }

    /// Waits for the next message at most `timeout`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Option<Envelope> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .ok()
            .flatten()
    }

    /// Messages dropped because this channel's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for LocalChannel {
    fn drop(&mut self) {
        // Closed first: a message the loop is handing over right now is then counted as for
        // nobody instead of vanishing into a queue no one reads.
        self.queue.close();
        self.inbox.slots.remove(&self.name);
        self.inbox.memberships.forget(&self.name);
    }
}

/// `{"close": 1012}` in msgpack: what a worker would send to close a socket with "service
/// restart".
const CLOSE_1012: &[u8] = &[0x81, 0xa5, b'c', b'l', b'o', b's', b'e', 0xcd, 0x03, 0xf4];

/// `{"close": 1008}` in msgpack: "policy violation", for a socket over the cap on groups.
const CLOSE_1008: &[u8] = &[0x81, 0xa5, b'c', b'l', b'o', b's', b'e', 0xcd, 0x03, 0xf0];

/// The lease task of an inbox on Redis: renews the lease every second, removes lapsed
/// processes, and recovers when a renewal shows that Redis lost state. Ends with the inbox.
async fn upkeep(inner: Arc<Inner>, redis: RedisLayer, mut lease: LeaseState) {
    let ttl = redis.settings().lease_ttl;
    let mut failing = false;
    let mut recovery_due = false;
    loop {
        let period = if failing { LEASE_RETRY } else { LEASE_RENEW };
        tokio::select! {
            () = inner.stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        match redis.renew_lease(&inner.name, ttl, &mut lease).await {
            Ok(lost) => {
                failing = false;
                if lost {
                    LayerMetrics::add(&redis.metrics().state_losses, 1);
                    recovery_due = true;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(inbox = %inner.name, error = %e, "could not renew the process lease; retrying");
                }
                failing = true;
                continue;
            }
        }
        if recovery_due {
            recovery_due = !inner.recover_from_loss(&redis).await;
        }
        if let Err(e) = redis.reap_lapsed().await {
            tracing::debug!(error = %e, "looking for lapsed processes failed");
        }
    }
}

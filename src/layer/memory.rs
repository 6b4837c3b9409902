//! The in-memory backend: one process, same semantics as Redis (expiry at receive, capacity per
//! channel or per inbox, group expiry, group send that never fails), for `dev` and tests.
//!
//! State is one `Mutex` (a receive over several channels and a capacity check need one consistent
//! view) plus a `Notify` that wakes receivers; the lock is never held across an await. Messages
//! are stored as the same encoded bytes the Redis backend stores, so a send copies the message.
//!
//! Group memberships of a channel whose inbox this process runs are told to that inbox directly
//! (the Redis backend sends a notice through Redis instead), so it records them and holds its
//! sockets to the cap on groups; see [`super::inbox`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use rand::seq::SliceRandom;
use switchyard_routing::names::non_local_name;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::backend::{AppStore, BackendReceiver, ChannelBackend};
use super::inbox::Inner as InboxInner;
use super::membership::{MembershipNotice, MembershipOp};
use super::metrics::LayerMetrics;
use super::settings::CapacityRules;
use super::{Envelope, GroupSendReport, LayerError, LayerSettings, envelopes_for, wire};

#[derive(Debug)]
struct Stored {
    at: Instant,
    payload: Bytes,
}

#[derive(Debug, Default)]
struct State {
    channels: HashMap<String, VecDeque<Stored>>,
    groups: HashMap<String, HashMap<String, Instant>>,
    /// App data: capped lists and recency indexes, with the instant they lapse.
    lists: HashMap<String, (VecDeque<Bytes>, Instant)>,
    indexes: HashMap<String, (HashMap<String, Instant>, Instant)>,
}

#[derive(Debug)]
struct Shared {
    settings: LayerSettings,
    rules: CapacityRules,
    metrics: Arc<LayerMetrics>,
    state: Mutex<State>,
    notify: Notify,
    connections: super::memory_state::MemoryConnections,
    /// The inboxes started on this layer, by name, told of their channels' memberships. Apart
    /// from `state`: a membership change takes this lock after letting that one go.
    inboxes: Mutex<HashMap<String, Weak<InboxInner>>>,
}

/// The in-memory channel layer. Clones share one state.
#[derive(Debug, Clone)]
pub struct MemoryLayer {
    shared: Arc<Shared>,
}

/// Why the in-memory layer refuses durable channels.
pub const DURABLE_NEEDS_REDIS: &str = "durable channels need the Redis layer: the in-memory layer (dev) keeps nothing across a restart, so it refuses them rather than pretend; use --layer redis://… or drop --durable-channels / .durable(…)";

impl MemoryLayer {
    /// A new, empty layer.
    pub fn new(settings: LayerSettings) -> Result<Self, LayerError> {
        let rules = settings.compile()?;
        if !settings.durable_channels.is_empty() {
            return Err(LayerError::Config(DURABLE_NEEDS_REDIS.into()));
        }
        Ok(MemoryLayer {
            shared: Arc::new(Shared {
                settings,
                rules,
                metrics: Arc::default(),
                state: Mutex::new(State::default()),
                notify: Notify::new(),
                connections: Default::default(),
                inboxes: Mutex::default(),
            }),
        })
    }

    /// Per-connection state (channel sessions, ordering), kept beside the channels.
    pub(crate) fn connections(&self) -> &super::memory_state::MemoryConnections {
        &self.shared.connections
    }

    /// Tells `inbox` of the memberships of its channels from now on (until it is dropped).
    pub(super) fn watch_memberships(&self, name: &str, inbox: Weak<InboxInner>) {
        let mut inboxes = self
            .shared
            .inboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        inboxes.retain(|_, i| i.strong_count() > 0);
        inboxes.insert(name.to_owned(), inbox);
    }

    /// Tells the inbox holding `channel`, if this process runs it, of a membership change.
    fn notify_inbox(&self, op: MembershipOp, group: &str, channel: &str) {
        let key = non_local_name(channel);
        if key.len() == channel.len() {
            return;
        }
        let inbox = self
            .shared
            .inboxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(key)
            .and_then(Weak::upgrade);
        if let Some(inbox) = inbox {
            inbox.on_notice(MembershipNotice {
                op,
                group: group.to_owned(),
                channel: channel.to_owned(),
            });
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops expired messages at the front of a queue, counting them.
    fn trim_expired(&self, queue: &mut VecDeque<Stored>, now: Instant) {
        let expiry = self.shared.settings.expiry;
        let mut dropped = 0;
        while queue
            .front()
            .is_some_and(|m| now.duration_since(m.at) >= expiry)
        {
            queue.pop_front();
            dropped += 1;
        }
        if dropped > 0 {
            LayerMetrics::add(&self.shared.metrics.expired, dropped);
        }
    }

    fn live_members(&self, state: &mut State, group: &str) -> Vec<String> {
        let now = Instant::now();
        let group_expiry = self.shared.settings.group_expiry;
        let Some(members) = state.groups.get_mut(group) else {
            return Vec::new();
        };
        members.retain(|_, added| now.duration_since(*added) < group_expiry);
        let mut names: Vec<String> = members.keys().cloned().collect();
        if members.is_empty() {
            state.groups.remove(group);
        }
        names.sort_unstable();
        names
    }

    /// Pops up to `max` stored messages from the first non-empty channel (in random order).
    fn pop(&self, channels: &[String], max: usize) -> Option<(String, Vec<Stored>)> {
        let now = Instant::now();
        let mut order: Vec<&String> = channels.iter().collect();
        order.shuffle(&mut rand::rng());
        let mut state = self.lock();
        for ch in order {
            let Some(queue) = state.channels.get_mut(ch.as_str()) else {
                continue;
            };
            self.trim_expired(queue, now);
            if queue.is_empty() {
                continue;
            }
            let n = max.min(queue.len());
            let taken: Vec<Stored> = queue.drain(..n).collect();
            if queue.is_empty() {
                state.channels.remove(ch.as_str());
            }
            return Some((ch.clone(), taken));
        }
        None
    }
}

/// The receiving half of the in-memory layer.
#[derive(Debug)]
pub struct MemoryReceiver {
    layer: MemoryLayer,
}

impl MemoryReceiver {
    fn unpack(&self, read_from: &str, stored: Vec<Stored>, out: &mut Vec<Envelope>) {
        let metrics = &self.layer.shared.metrics;
        for s in stored {
            if let Err(e) = envelopes_for(read_from, s.payload, out) {
                LayerMetrics::add(&metrics.garbage, 1);
                tracing::warn!(channel = read_from, error = %e, "dropped an undecodable message");
            }
        }
        LayerMetrics::add(&metrics.received, out.len() as u64);
    }
}

impl ChannelBackend for MemoryLayer {
    type Receiver = MemoryReceiver;

    fn settings(&self) -> &LayerSettings {
        &self.shared.settings
    }

    fn metrics(&self) -> &Arc<LayerMetrics> {
        &self.shared.metrics
    }

    fn available(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        "memory://".to_owned()
    }

    fn mode(&self) -> &'static str {
        "memory"
    }

    async fn send_encoded(&self, channel: &str, payload: &[u8]) -> Result<(), LayerError> {
        let key = non_local_name(channel);
        let stored = if key.len() == channel.len() {
            Bytes::copy_from_slice(payload)
        } else {
            Bytes::from(wire::with_targets(payload, &[channel], 0)?)
        };
        let capacity = self.shared.rules.capacity(channel);
        {
            let now = Instant::now();
            let mut state = self.lock();
            let queue = state.channels.entry(key.to_owned()).or_default();
            self.trim_expired(queue, now);
            if queue.len() >= capacity {
                drop(state);
                LayerMetrics::add(&self.shared.metrics.channel_full, 1);
                return Err(LayerError::ChannelFull {
                    channel: channel.to_owned(),
                    capacity,
                });
            }
            queue.push_back(Stored {
                at: now,
                payload: stored,
            });
        }
        LayerMetrics::add(&self.shared.metrics.sent, 1);
        self.shared.notify.notify_waiters();
        Ok(())
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        let now = Instant::now();
        self.lock()
            .groups
            .entry(group.to_owned())
            .or_default()
            .insert(channel.to_owned(), now);
        self.notify_inbox(MembershipOp::Add, group, channel);
        Ok(())
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        {
            let mut state = self.lock();
            if let Some(members) = state.groups.get_mut(group) {
                members.remove(channel);
                if members.is_empty() {
                    state.groups.remove(group);
                }
            }
        }
        self.notify_inbox(MembershipOp::Discard, group, channel);
        Ok(())
    }

    async fn group_channels(&self, group: &str) -> Result<Vec<String>, LayerError> {
        let mut state = self.lock();
        Ok(self.live_members(&mut state, group))
    }

    async fn group_send_encoded(
        &self,
        group: &str,
        payload: &[u8],
    ) -> Result<GroupSendReport, LayerError> {
        let mut state = self.lock();
        let members = self.live_members(&mut state, group);
        let by_key = super::by_inbox(&members);
        let now = Instant::now();
        let mut report = GroupSendReport {
            members: members.len(),
            full: 0,
        };
        let mut written = 0;
        for (key, targets) in by_key {
            let stored = Bytes::from(wire::with_targets(payload, &targets, 0)?);
            let capacity = self.shared.rules.capacity(targets[0]);
            let queue = state.channels.entry(key.to_owned()).or_default();
            self.trim_expired(queue, now);
            if queue.len() >= capacity {
                report.full += targets.len();
            } else {
                queue.push_back(Stored {
                    at: now,
                    payload: stored,
                });
                written += 1;
            }
        }
        drop(state);
        let m = &self.shared.metrics;
        LayerMetrics::add(&m.group_sends, 1);
        LayerMetrics::add(&m.sent, written);
        LayerMetrics::add(&m.group_member_full, report.full as u64);
        if written > 0 {
            self.shared.notify.notify_waiters();
        }
        Ok(report)
    }

    async fn flush(&self) -> Result<(), LayerError> {
        let mut state = self.lock();
        state.channels.clear();
        state.groups.clear();
        state.lists.clear();
        state.indexes.clear();
        drop(state);
        self.shared.connections.clear();
        Ok(())
    }

    async fn channel_depth(&self, channel: &str) -> Result<usize, LayerError> {
        let now = Instant::now();
        let mut state = self.lock();
        Ok(match state.channels.get_mut(non_local_name(channel)) {
            Some(q) => {
                self.trim_expired(q, now);
                q.len()
            }
            None => 0,
        })
    }

    async fn overview(&self) -> Result<super::Overview, LayerError> {
        let now = Instant::now();
        let group_expiry = self.shared.settings.group_expiry;
        let mut state = self.lock();
        let mut channels = Vec::new();
        for (name, queue) in state.channels.iter_mut() {
            self.trim_expired(queue, now);
            if !queue.is_empty() {
                channels.push(super::Count::new(name.clone(), queue.len()));
            }
        }
        let groups = state
            .groups
            .iter()
            .map(|(g, m)| {
                let live = m
                    .values()
                    .filter(|at| now.duration_since(**at) < group_expiry);
                super::Count::new(g.clone(), live.count())
            })
            .filter(|c| c.count > 0)
            .collect();
        Ok(super::Overview { channels, groups })
    }

    fn receiver(&self) -> MemoryReceiver {
        MemoryReceiver {
            layer: self.clone(),
        }
    }
}

/// App data `key` with the instant it lapses, emptied first when it has lapsed.
fn live_entry<'a, T: Default>(
    data: &'a mut HashMap<String, (T, Instant)>,
    key: &str,
    now: Instant,
) -> &'a mut (T, Instant) {
    let entry = data
        .entry(key.to_owned())
        .or_insert_with(|| (T::default(), now));
    if entry.1 <= now {
        entry.0 = T::default();
    }
    entry
}

impl AppStore for MemoryLayer {
    async fn list_push(
        &self,
        key: &str,
        item: &[u8],
        keep: usize,
        ttl: Duration,
    ) -> Result<(), LayerError> {
        let now = Instant::now();
        let mut state = self.lock();
        let entry = live_entry(&mut state.lists, key, now);
        entry.0.push_back(Bytes::copy_from_slice(item));
        while entry.0.len() > keep {
            entry.0.pop_front();
        }
        entry.1 = now + ttl;
        Ok(())
    }

    async fn list_items(&self, key: &str) -> Result<Vec<Bytes>, LayerError> {
        let now = Instant::now();
        let state = self.lock();
        Ok(match state.lists.get(key) {
            Some((items, lapses)) if *lapses > now => items.iter().cloned().collect(),
            _ => Vec::new(),
        })
    }

    async fn index_touch(
        &self,
        key: &str,
        member: &str,
        keep: usize,
        ttl: Duration,
    ) -> Result<(), LayerError> {
        let now = Instant::now();
        let mut state = self.lock();
        let entry = live_entry(&mut state.indexes, key, now);
        entry.0.insert(member.to_owned(), now);
        if entry.0.len() > keep {
            let mut by_age: Vec<(Instant, String)> =
                entry.0.iter().map(|(m, at)| (*at, m.clone())).collect();
            by_age.sort();
            for (_, oldest) in by_age.into_iter().take(entry.0.len() - keep) {
                entry.0.remove(&oldest);
            }
        }
        entry.1 = now + ttl;
        Ok(())
    }

    async fn index_recent(&self, key: &str, limit: usize) -> Result<Vec<String>, LayerError> {
        let now = Instant::now();
        let state = self.lock();
        let Some((members, lapses)) = state.indexes.get(key) else {
            return Ok(Vec::new());
        };
        if *lapses <= now {
            return Ok(Vec::new());
        }
        let mut by_recency: Vec<(&String, &Instant)> = members.iter().collect();
        by_recency.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        Ok(by_recency
            .into_iter()
            .take(limit)
            .map(|(m, _)| m.clone())
            .collect())
    }
}

impl BackendReceiver for MemoryReceiver {
    /// Up to `max` messages from the first of `channels` found non-empty, waiting up to
    /// `timeout` (every target of a group message, even past `max`).
    async fn receive_many(
        &mut self,
        channels: &[String],
        timeout: Duration,
        max: usize,
    ) -> Result<Vec<Envelope>, LayerError> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.layer.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some((read_from, stored)) = self.layer.pop(channels, max) {
                let mut out = Vec::with_capacity(stored.len());
                self.unpack(&read_from, stored, &mut out);
                if !out.is_empty() {
                    return Ok(out);
                }
                continue;
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            }
        }
    }
}

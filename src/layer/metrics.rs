//! Layer counters: every message the layer refuses, drops or expires is counted here, so that
//! nothing is lost without a number going up. Plain atomics; `serve`, `worker` and `stats` read
//! them through [`LayerMetrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every clone of a layer (and its receivers and inbox).
#[derive(Debug, Default)]
pub struct LayerMetrics {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) channel_full: AtomicU64,
    pub(crate) group_sends: AtomicU64,
    pub(crate) group_member_full: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) local_full: AtomicU64,
    pub(crate) local_unknown: AtomicU64,
    pub(crate) garbage: AtomicU64,
    pub(crate) unavailable: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) state_losses: AtomicU64,
    pub(crate) reasserted_memberships: AtomicU64,
    pub(crate) reaped_processes: AtomicU64,
    pub(crate) reaped_memberships: AtomicU64,
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Messages accepted by `send` (group sends count once per inbox written).
    pub sent: u64,
    /// Messages handed to a receiver.
    pub received: u64,
    /// Sends refused with `ChannelFull`.
    pub channel_full: u64,
    /// `group_send` calls.
    pub group_sends: u64,
    /// Group members that missed a message because their channel was full.
    pub group_member_full: u64,
    /// Messages found expired at receive and dropped.
    pub expired: u64,
    /// Messages for a local channel whose buffer was full (dropped).
    pub local_full: u64,
    /// Messages for a local channel nobody holds any more (dropped).
    pub local_unknown: u64,
    /// Stored messages that could not be decoded (dropped).
    pub garbage: u64,
    /// Operations that failed because the backend was unreachable.
    pub unavailable: u64,
    /// Connections re-established after a failure.
    pub reconnects: u64,
    /// Times this process found that Redis had lost its state (its lease gone or older).
    pub state_losses: u64,
    /// Group memberships this process put back after a loss of state.
    pub reasserted_memberships: u64,
    /// Lapsed processes whose memberships and inbox this process removed.
    pub reaped_processes: u64,
    /// Group memberships removed with lapsed processes.
    pub reaped_memberships: u64,
}

impl LayerMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            sent: r(&self.sent),
            received: r(&self.received),
            channel_full: r(&self.channel_full),
            group_sends: r(&self.group_sends),
            group_member_full: r(&self.group_member_full),
            expired: r(&self.expired),
            local_full: r(&self.local_full),
            local_unknown: r(&self.local_unknown),
            garbage: r(&self.garbage),
            unavailable: r(&self.unavailable),
            reconnects: r(&self.reconnects),
            state_losses: r(&self.state_losses),
            reasserted_memberships: r(&self.reasserted_memberships),
            reaped_processes: r(&self.reaped_processes),
            reaped_memberships: r(&self.reaped_memberships),
        }
    }
}

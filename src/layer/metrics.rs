//! Layer counters: every message the layer refuses, drops or expires is counted here, so that
//! nothing is lost without a number going up. Plain atomics, each defined once with its
//! Prometheus name; `serve`, `worker` and `stats` read them through [`LayerMetrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

use crate::prometheus::metric_set;

metric_set! {
    /// Counters shared by every clone of a layer (and its receivers and inbox).
    pub struct LayerMetrics => MetricsSnapshot {
        /// Messages accepted by `send` (group sends count once per inbox written).
        sent: counter "switchyard_layer_sent_total";
        /// Messages handed to a receiver.
        received: counter "switchyard_layer_received_total";
        /// Sends refused because the channel was full (`ChannelFull`).
        channel_full: counter "switchyard_layer_channel_full_total";
        /// `group_send` calls.
        group_sends: counter "switchyard_layer_group_sends_total";
        /// Group members that missed a message because their channel was full.
        group_member_full: counter "switchyard_layer_group_member_full_total";
        /// Messages found expired at receive and dropped.
        expired: counter "switchyard_layer_expired_total";
        /// Messages dropped because a local channel's buffer was full (slow consumer).
        local_full: counter "switchyard_layer_local_full_total";
        /// Messages dropped because no one held their local channel any more.
        local_unknown: counter "switchyard_layer_local_unknown_total";
        /// Stored messages that could not be decoded (dropped).
        garbage: counter "switchyard_layer_garbage_total";
        /// Operations that failed because the backend was unreachable.
        unavailable: counter "switchyard_layer_unavailable_total";
        /// Redis connections re-established after a failure.
        reconnects: counter "switchyard_layer_reconnects_total";
        /// Times Redis was found to have lost this process's state (restart without persistence,
        /// FLUSHALL, failover to a stale replica): its lease gone or older.
        state_losses: counter "switchyard_layer_state_losses_total";
        /// Group memberships put back by this process after Redis lost state.
        reasserted_memberships: counter "switchyard_layer_reasserted_memberships_total";
        /// Processes whose lease lapsed and whose memberships and inbox this process removed.
        reaped_processes: counter "switchyard_layer_reaped_processes_total";
        /// Group memberships removed with lapsed processes.
        reaped_memberships: counter "switchyard_layer_reaped_memberships_total";
    }
}

impl LayerMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

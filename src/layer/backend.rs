//! What a channel-layer backend implements: the channel layer proper ([`ChannelBackend`]:
//! send, groups, receive, flush, stats), the storage step of the per-connection state kept on
//! top of it ([`StateBackend`]: sessions and strict ordering, whose rules live in
//! `session.rs` and `ordering.rs`), and the app's small store ([`AppStore`]: capped lists and
//! recency indexes). [`super::Layer`] validates names and payloads once and hands each call
//! to its backend: [`super::MemoryLayer`] (one process) or [`super::RedisLayer`] (one Redis,
//! shards, Sentinel or Redis Cluster, told apart inside it).
//!
//! The methods return `impl Future + Send` rather than boxed futures: the layer dispatches
//! over a closed set of backends without an allocation per message.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchyard_routing::{Map, Value};

use super::metrics::LayerMetrics;
use super::ordering::{Gate, Gated, Upkeep};
use super::{Envelope, GroupSendReport, LayerError, LayerSettings, Overview};

/// The channel layer: what channels_redis's `RedisChannelLayer` does. Names and payloads
/// reach it validated (a valid channel or group name, a msgpack map).
pub trait ChannelBackend: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// Its receiving half.
    type Receiver: BackendReceiver;

    /// The settings in force.
    fn settings(&self) -> &LayerSettings;
    /// Its counters.
    fn metrics(&self) -> &Arc<LayerMetrics>;
    /// False while the backend is known to be unreachable.
    fn available(&self) -> bool;
    /// A short description for logs, without passwords.
    fn describe(&self) -> String;
    /// How it is deployed (`memory`, `single`, `shards`, `sentinel`, `cluster`).
    fn mode(&self) -> &'static str;

    /// Appends an encoded message to a channel (`ChannelFull` when at capacity).
    fn send_encoded(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), LayerError>> + Send;
    /// Adds a channel to a group, renewing its membership.
    fn group_add(
        &self,
        group: &str,
        channel: &str,
    ) -> impl Future<Output = Result<(), LayerError>> + Send;
    /// Removes a channel from a group.
    fn group_discard(
        &self,
        group: &str,
        channel: &str,
    ) -> impl Future<Output = Result<(), LayerError>> + Send;
    /// The group's live members.
    fn group_channels(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Vec<String>, LayerError>> + Send;
    /// Sends an encoded message to every member; a full member misses it (counted).
    fn group_send_encoded(
        &self,
        group: &str,
        payload: &[u8],
    ) -> impl Future<Output = Result<GroupSendReport, LayerError>> + Send;
    /// Deletes every channel and group of this layer.
    fn flush(&self) -> impl Future<Output = Result<(), LayerError>> + Send;
    /// Every channel and group with its depth or size.
    fn overview(&self) -> impl Future<Output = Result<Overview, LayerError>> + Send;
    /// Unexpired messages waiting on a channel (on its inbox for a `!` name).
    fn channel_depth(
        &self,
        channel: &str,
    ) -> impl Future<Output = Result<usize, LayerError>> + Send;
    /// A new receiving half.
    fn receiver(&self) -> Self::Receiver;
}

/// The receiving half of a backend: one blocking receive at a time.
pub trait BackendReceiver: Send + std::fmt::Debug {
    /// Waits up to `timeout` for messages on any of `channels` (validated, at least one) and
    /// returns those then waiting on the first non-empty one, up to `max` (every target of a
    /// group message, even past `max`). Empty when nothing came in time.
    fn receive_many(
        &mut self,
        channels: &[String],
        timeout: Duration,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Envelope>, LayerError>> + Send;
}

/// Where a backend keeps the state of a connection (by its reply channel, validated): the
/// channel session's fields and the strict-ordering state.
pub trait StateBackend {
    /// The session (empty when none or expired).
    fn session_load(
        &self,
        reply_channel: &str,
    ) -> impl Future<Output = Result<Map, LayerError>> + Send;
    /// Sets one field, renewing the session's expiry.
    fn session_set(
        &self,
        reply_channel: &str,
        key: &str,
        value: &Value,
    ) -> impl Future<Output = Result<(), LayerError>> + Send;
    /// Deletes one field.
    fn session_delete(
        &self,
        reply_channel: &str,
        key: &str,
    ) -> impl Future<Output = Result<(), LayerError>> + Send;
    /// Deletes every field.
    fn session_clear(
        &self,
        reply_channel: &str,
    ) -> impl Future<Output = Result<(), LayerError>> + Send;
    /// Done (with `last`), then upkeep, then the gate, as one atomic step; each part optional.
    fn ordering_step(
        &self,
        reply_channel: &str,
        done: Option<(u64, bool)>,
        gated: Option<Gated<'_>>,
        hold: Duration,
    ) -> impl Future<Output = Result<(Option<Gate>, Upkeep), LayerError>> + Send;
    /// Holds the turn of running message `order` against upkeep for `hold` from now when it
    /// is still the connection's turn (true); writes nothing otherwise (false).
    fn ordering_hold(
        &self,
        reply_channel: &str,
        order: u64,
        hold: Duration,
    ) -> impl Future<Output = Result<bool, LayerError>> + Send;
}

/// The app's small store beside its channels (a chat room's history, the list of rooms).
/// Keys are validated like group names.
pub trait AppStore {
    /// Appends `item` to the list `key`, keeping the newest `keep` (at least 1); the list
    /// lapses `ttl` after its last append.
    fn list_push(
        &self,
        key: &str,
        item: &[u8],
        keep: usize,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), LayerError>> + Send;
    /// The items of list `key`, oldest first.
    fn list_items(&self, key: &str) -> impl Future<Output = Result<Vec<Bytes>, LayerError>> + Send;
    /// Marks `member` of index `key` active now, keeping the `keep` most recent (at least 1);
    /// the index lapses `ttl` after its last touch.
    fn index_touch(
        &self,
        key: &str,
        member: &str,
        keep: usize,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), LayerError>> + Send;
    /// Up to `limit` members of index `key`, most recent first.
    fn index_recent(
        &self,
        key: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, LayerError>> + Send;
}

//! Channel sessions: a small key/value store per reply channel (per connection), kept in the
//! layer so that every consumer of a connection sees it, on any worker, and expiring with the
//! group expiry (a connection is closed by then).
//!
//! Each backend stores it beside the connection's ordering state ([`super::backend::StateBackend`]:
//! a Redis hash per connection, or the in-memory layer's connection table).

use switchyard_routing::names;
use switchyard_routing::{Map, Value};

use super::backend::StateBackend;
use super::{Layer, LayerError};

impl Layer {
    /// The channel session of a connection (empty when none or expired).
    pub async fn session_get(&self, reply_channel: &str) -> Result<Map, LayerError> {
        names::validate_channel(reply_channel)?;
        backend!(self, l => l.session_load(reply_channel).await)
    }

    /// Sets a key of a connection's channel session (renewing its expiry).
    pub async fn session_set(
        &self,
        reply_channel: &str,
        key: &str,
        value: &Value,
    ) -> Result<(), LayerError> {
        names::validate_channel(reply_channel)?;
        backend!(self, l => l.session_set(reply_channel, key, value).await)
    }

    /// Deletes a key of a connection's channel session.
    pub async fn session_delete(&self, reply_channel: &str, key: &str) -> Result<(), LayerError> {
        names::validate_channel(reply_channel)?;
        backend!(self, l => l.session_delete(reply_channel, key).await)
    }

    /// Deletes a connection's whole channel session.
    pub async fn session_clear(&self, reply_channel: &str) -> Result<(), LayerError> {
        names::validate_channel(reply_channel)?;
        backend!(self, l => l.session_clear(reply_channel).await)
    }
}

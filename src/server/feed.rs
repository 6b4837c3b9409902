//! Sending a client's message to a server-fed channel (`http.request`, `websocket.connect`,
//! `websocket.receive`, a body chunk) with backpressure: while the channel is full the caller
//! (and so the client's reader) waits, with the layer's one retry policy, up to
//! `backpressure_timeout`.

use std::sync::atomic::{AtomicBool, Ordering};

use super::Shared;
use super::metrics::ServerMetrics;
use crate::layer::{FullRetry, LayerError};

/// Sends an encoded message to a server-fed channel, waiting for room while it is full with the
/// layer's retry policy for `backpressure_timeout` (and not once `give_up` is set: the socket is
/// closing); the last error once it stops. A wait and a refusal past the bound are counted.
pub(crate) async fn send_server_fed(
    shared: &Shared,
    channel: &str,
    payload: &[u8],
    give_up: Option<&AtomicBool>,
) -> Result<(), LayerError> {
    let mut retry = FullRetry::new(shared.config.backpressure_timeout);
    loop {
        let error = match shared.layer.send_encoded(channel, payload).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if error.is_full() && retry.refusals() == 0 {
            ServerMetrics::inc(&shared.metrics.backpressure_waits);
        }
        let closing = give_up.is_some_and(|g| g.load(Ordering::Relaxed));
        if !closing && retry.wait(&error).await {
            continue;
        }
        if error.is_full() && !closing {
            ServerMetrics::inc(&shared.metrics.backpressure_refusals);
        }
        return Err(error);
    }
}

//! Watches the process inbox from the outside. Every reply a worker sends reaches a connection
//! only through the inbox's one receive loop, and the layer gives the server no signal when that
//! loop is gone (a `LocalChannel` never reports its end). So the server owns the signal: this
//! task sends a small probe to a local channel of its own through the layer now and then, and
//! when probes the layer accepted are not delivered several times running, it cancels the
//! server's `inbox_gone` token; sockets then close with 1011 and requests get 503 instead of
//! waiting for replies that cannot come, and `/healthz` answers 503 so a supervisor restarts the
//! process. A probe the layer refuses (Redis down, inbox full) proves nothing and is not counted.

use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::layer::{Layer, ProcessInbox};

/// How often and how patiently the inbox is probed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InboxWatch {
    /// Pause between probes.
    pub(crate) interval: Duration,
    /// How long one accepted probe may take to come back.
    pub(crate) timeout: Duration,
    /// Probes lost in a row before the inbox is declared gone.
    pub(crate) misses: u32,
}

impl Default for InboxWatch {
    fn default() -> Self {
        // Delivery takes one pop of the inbox loop (a second at most when idle); twenty seconds
        // twice over is far beyond any healthy delay, and well inside the message expiry.
        InboxWatch {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(20),
            misses: 2,
        }
    }
}

#[derive(Serialize)]
struct Probe {
    inbox_probe: bool,
}

/// Probes `inbox` until `stop` (the server's shutdown) or until it declares the inbox gone by
/// cancelling `gone`.
pub(crate) async fn watch(
    layer: Layer,
    inbox: ProcessInbox,
    gone: CancellationToken,
    stop: CancellationToken,
    watch: InboxWatch,
) {
    let mut missed = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = gone.cancelled() => return,
            _ = tokio::time::sleep(watch.interval) => {}
        }
        let mut probe = inbox.channel_with_buffer(1);
        if let Err(e) = layer.send(probe.name(), &Probe { inbox_probe: true }).await {
            tracing::debug!(error = %e, "inbox probe not sent; nothing learned");
            continue;
        }
        let arrived = tokio::select! {
            _ = stop.cancelled() => return,
            got = probe.recv_timeout(watch.timeout) => got.is_some(),
        };
        if arrived {
            missed = 0;
            continue;
        }
        missed += 1;
        if missed < watch.misses {
            tracing::warn!(inbox = %inbox.name(), missed, "inbox probe accepted by the layer but not delivered");
            continue;
        }
        tracing::error!(
            inbox = %inbox.name(),
            missed,
            "process inbox delivers nothing: closing sockets with 1011 and answering 503 until restarted"
        );
        gone.cancel();
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::LayerSettings;

    fn quick() -> InboxWatch {
        InboxWatch {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            misses: 2,
        }
    }

    #[tokio::test]
    async fn a_stopped_inbox_loop_is_declared_gone() {
        let layer = Layer::from_url("memory://", LayerSettings::default())
            .await
            .expect("memory layer");
        let inbox = layer.inbox("watch.test").await.expect("inbox");
        let (gone, stop) = (CancellationToken::new(), CancellationToken::new());
        let watcher = tokio::spawn(watch(
            layer.clone(),
            inbox.clone(),
            gone.clone(),
            stop.clone(),
            quick(),
        ));
        // A live inbox passes probe after probe.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!gone.is_cancelled(), "a live inbox was declared gone");
        // Its receive loop ends: sends to it still succeed, nothing is delivered.
        inbox.shutdown(Duration::from_secs(2)).await;
        tokio::time::timeout(Duration::from_secs(5), gone.cancelled())
            .await
            .expect("a dead inbox was not noticed");
        tokio::time::timeout(Duration::from_secs(1), watcher)
            .await
            .expect("watcher ends")
            .expect("watcher did not panic");
    }
}

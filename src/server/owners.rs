//! The owners of this server's sockets (see [`crate::layer::owner`]): the worker each strictly
//! ordered socket's messages go to, and the check, every second, that those workers still hold
//! their leases. An owner found lapsed is marked so, and what waits in its channel is moved back
//! to the shared channels at once; each of its sockets then takes itself back (setting its
//! ordering state in the layer) before it sends its next message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::metrics::ServerMetrics;
use crate::layer::Layer;
use crate::layer::owner::owner_channel;

/// How often the owners' leases are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The owners this server's sockets have, by name.
#[derive(Debug, Default)]
pub(crate) struct Owners {
    watched: Mutex<HashMap<String, Arc<OwnerWatch>>>,
}

/// One owner: its channel, whether its lease lapsed, and how many sockets it has here.
#[derive(Debug)]
pub(crate) struct OwnerWatch {
    name: String,
    /// Shared, not copied: every frame of every socket of this owner is sent to it.
    channel: Arc<str>,
    lapsed: AtomicBool,
    sockets: AtomicUsize,
}

/// A socket's hold on its owner's watch; dropping it lets the watch go with its last socket.
#[derive(Debug)]
pub(crate) struct OwnedBy {
    watch: Arc<OwnerWatch>,
    owners: Arc<Owners>,
}

impl OwnedBy {
    pub(crate) fn name(&self) -> &str {
        &self.watch.name
    }

    /// The owner's channel, where the socket's messages go.
    pub(crate) fn channel(&self) -> Arc<str> {
        Arc::clone(&self.watch.channel)
    }

    /// True once the owner's lease was found lapsed (or given up).
    pub(crate) fn lapsed(&self) -> bool {
        self.watch.lapsed.load(Ordering::Acquire)
    }
}

impl Drop for OwnedBy {
    fn drop(&mut self) {
        if self.watch.sockets.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut watched = self.owners.watched();
            // Another socket may have attached between the count and the lock, or the entry
            // may already be a newer watch of the same name: only this one, unused, goes.
            let unused = self.watch.sockets.load(Ordering::Acquire) == 0;
            if unused
                && watched
                    .get(&self.watch.name)
                    .is_some_and(|w| Arc::ptr_eq(w, &self.watch))
            {
                watched.remove(&self.watch.name);
            }
        }
    }
}

impl Owners {
    fn watched(&self) -> MutexGuard<'_, HashMap<String, Arc<OwnerWatch>>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `name` as a socket's owner.
    pub(crate) fn attach(self: &Arc<Self>, name: &str) -> OwnedBy {
        let watch = Arc::clone(self.watched().entry(name.to_owned()).or_insert_with(|| {
            Arc::new(OwnerWatch {
                name: name.to_owned(),
                channel: owner_channel(name).into(),
                lapsed: AtomicBool::new(false),
                sockets: AtomicUsize::new(0),
            })
        }));
        watch.sockets.fetch_add(1, Ordering::AcqRel);
        OwnedBy {
            watch,
            owners: Arc::clone(self),
        }
    }

    /// Checks every second, until `stop`, that each owner still holds its lease; marks the ones
    /// that lapsed and moves what waits in their channels back to the shared channels.
    pub(crate) async fn watch(
        self: Arc<Self>,
        layer: Layer,
        metrics: Arc<ServerMetrics>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(CHECK_EVERY) => {}
            }
            let live: Vec<Arc<OwnerWatch>> = self
                .watched()
                .values()
                .filter(|w| !w.lapsed.load(Ordering::Acquire))
                .cloned()
                .collect();
            for watch in live {
                match layer.owner_alive(&watch.name).await {
                    Ok(true) => {}
                    Ok(false) => {
                        watch.lapsed.store(true, Ordering::Release);
                        ServerMetrics::inc(&metrics.ws_owners_lapsed);
                        tracing::warn!(owner = %watch.name, sockets = watch.sockets.load(Ordering::Relaxed), "a connection owner's lease lapsed; its sockets go back to the shared channels");
                        if let Err(e) = layer.take_back_owned(&watch.name, None).await {
                            tracing::warn!(owner = %watch.name, error = %e, "could not move a lapsed owner's messages back yet; each socket does before its next message");
                        }
                    }
                    // Redis unreachable: the sockets' own sends fail meanwhile; checked again.
                    Err(e) => {
                        tracing::debug!(owner = %watch.name, error = %e, "could not check an owner's lease");
                    }
                }
            }
        }
    }
}

//! Connection owners: a strictly ordered WebSocket served, frame after frame, by the worker that
//! accepted it, its order kept in that worker's memory instead of in the layer.
//!
//! Keeping a connection's order in the layer ([`super::ordering`]) lets any worker take any
//! frame, but every message then records its done in Redis, which measured as the larger part
//! of what ordering cost. So a worker that accepts a strictly ordered socket names itself its
//! owner in the accept (`"x-switchyard-owner": name`), and the interface server sends that
//! socket's frames and its disconnect to the owner's own channels
//! ([`owner_channel`]: `{owner}.sockets`, one list for frames and disconnects). One socket's
//! messages reach that list in the order sent (the server sends the next only once the last is
//! written, and each is scored by its send time), the owner pops them in that order and runs
//! each connection's messages one after another. A channels_redis worker never names an owner, so its sockets keep the shared
//! channels and the layer's ordering.
//!
//! Liveness: an owner holds a process lease (the Redis backend's `lease` module) of
//! [`OWNER_LEASE_TTL`], renewed every second. An interface server checks the leases of its
//! sockets' owners every second ([`Layer::owner_alive`]); once one has lapsed (the worker was
//! killed, stalled, or Redis lost the lease) or was given up (a graceful stop), its sockets go
//! back to the shared channels: [`Layer::take_back_owned`] moves whatever waits in the owner's
//! channels to the shared ones (send times kept) and sets each of those connections' ordering
//! state in the layer to the lowest order moved, or, for a socket with nothing waiting there, to
//! the order it sends next, so the layer's gate takes over without a gap and without a frame
//! overtaking another. The move and the setting are one atomic script, so servers and reapers
//! doing it at once move each frame once and set each connection once. A frame in the killed
//! worker's hand is lost, as it would be from the shared channel. A name whose lease lapsed is
//! never used again (see [`OwnerName`]): a server that has not looked yet must not go on sending
//! there while the sockets' earlier frames run elsewhere.
//!
//! Only where those keys sit on one Redis server (one host, or the master behind Sentinel):
//! on several shards or a Redis Cluster ([`Layer::supports_owners`] false) the layer's ordering
//! stays in use, and so does it on the in-memory layer, whose ordering costs no round trip.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_routing::asgi::{WEBSOCKET_DISCONNECT, WEBSOCKET_RECEIVE};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::redis::LeaseState;
use super::{Layer, LayerError, millis, now_ms, with_random_local_part};

/// What every owner name starts with (and so every owner channel: see
/// [`super::settings`], which gives them the capacity of the shared channels they stand for).
pub const OWNER_PREFIX: &str = "switchyard.owner.";

/// How long an owner's lease lasts without a renewal: a killed owner's sockets go back to the
/// shared channels this long after its last renewal (plus up to a second). Shorter than an
/// interface server's lease, because a server keeps its memberships while stalled but an
/// owner stalled past it only loses its sockets (their frames keep flowing, through the layer).
pub const OWNER_LEASE_TTL: Duration = Duration::from_secs(5);

/// What an owner's channel adds to its name.
const OWNER_SUFFIX: &str = ".sockets";

/// How often an owner renews its lease.
const OWNER_RENEW: Duration = Duration::from_secs(1);

/// An owner whose renewal comes this close to its deadline (a stall, Redis unreachable) takes
/// a new name instead: servers declare the lease lapsed only past the deadline, so the old
/// name is given up before any of them can have taken its sockets back.
const LATE_MARGIN: Duration = Duration::from_secs(2);

/// How long a worker keeps a name it stopped using before giving it up (see [`give_up_later`]).
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// The owner's channel: every message of its sockets, frames and disconnects, in one list, so
/// that a socket's disconnect cannot be popped before its last frame.
pub fn owner_channel(owner: &str) -> String {
    format!("{owner}{OWNER_SUFFIX}")
}

/// True when `channel` is an owner's channel.
pub fn is_owner_channel(channel: &str) -> bool {
    channel
        .strip_suffix(OWNER_SUFFIX)
        .is_some_and(is_owner_name)
}

/// The shared channel a message from an owner's channel stands for: `websocket.disconnect`
/// when it carries a close `code` (a frame never does), else `websocket.receive`.
pub fn owned_kind(message: &switchyard_routing::Message) -> &'static str {
    if message.get("code").is_some() {
        WEBSOCKET_DISCONNECT
    } else {
        WEBSOCKET_RECEIVE
    }
}

/// True when `owner` is a well-formed owner name (what a server accepts from an accept).
pub fn is_owner_name(owner: &str) -> bool {
    owner.strip_prefix(OWNER_PREFIX).is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// The name a worker owns sockets under now, shared by its lease task and the worker. It
/// changes only when a lease lapsed (a lapsed name is never taken up again).
#[derive(Debug, Clone)]
pub struct OwnerName {
    current: Arc<Mutex<Arc<str>>>,
}

impl OwnerName {
    fn new(name: &str) -> Self {
        OwnerName {
            current: Arc::new(Mutex::new(Arc::from(name))),
        }
    }

    /// The name, as it goes into an accept.
    pub fn get(&self) -> Arc<str> {
        Arc::clone(&self.current.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn replace(&self, name: &str) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::from(name);
    }
}

/// A worker's owner lease, renewed by a task until [`OwnerLease::release`] (or dropped).
#[derive(Debug)]
pub struct OwnerLease {
    name: OwnerName,
    stop: CancellationToken,
    renewal: JoinHandle<()>,
    layer: Layer,
}

impl OwnerLease {
    /// The name this worker owns sockets under (it changes when a lease lapses).
    pub fn name(&self) -> &OwnerName {
        &self.name
    }

    /// Gives the lease up (a graceful stop): the servers take the sockets back within a second
    /// and move what still waits in this owner's channels.
    pub async fn release(mut self) {
        self.stop.cancel();
        let _ = (&mut self.renewal).await;
        let name = self.name.get();
        if let Layer::Redis(redis) = &self.layer
            && let Err(e) = redis.release_lease(&name).await
        {
            tracing::warn!(owner = %name, error = %e, "could not give up the owner lease; it lapses by itself");
        }
    }
}

impl Drop for OwnerLease {
    /// A worker that ends without releasing (an error, a dropped future) stops renewing: its
    /// sockets are taken back once the lease lapses instead of never.
    fn drop(&mut self) {
        self.stop.cancel();
        self.renewal.abort();
    }
}

impl Layer {
    /// True when this layer can have connection owners (a Redis layer on one server).
    pub fn supports_owners(&self) -> bool {
        match self {
            Layer::Memory(_) => false,
            Layer::Redis(redis) => redis.single_server(),
        }
    }

    /// Takes a new owner name's lease and keeps renewing it; `None` where owners are not
    /// supported.
    pub async fn start_owner(&self) -> Result<Option<OwnerLease>, LayerError> {
        let Layer::Redis(redis) = self else {
            return Ok(None);
        };
        if !redis.single_server() {
            return Ok(None);
        }
        let name = with_random_local_part(OWNER_PREFIX);
        let mut state = LeaseState::default();
        redis
            .renew_lease(&name, OWNER_LEASE_TTL, &mut state)
            .await?;
        let stop = CancellationToken::new();
        let owner = OwnerName::new(&name);
        let renewal = tokio::spawn(renew_owner(
            redis.clone(),
            owner.clone(),
            state,
            stop.clone(),
        ));
        Ok(Some(OwnerLease {
            name: owner,
            stop,
            renewal,
            layer: self.clone(),
        }))
    }

    /// True while `owner`'s lease is held and has not run out.
    pub async fn owner_alive(&self, owner: &str) -> Result<bool, LayerError> {
        match self {
            Layer::Memory(_) => Ok(false),
            Layer::Redis(redis) => redis.owner_alive(owner).await,
        }
    }

    /// Moves what waits in `owner`'s channels back to the shared channels and sets the ordering
    /// state of each connection moved to its lowest order moved; then, with `seed` =
    /// `(reply channel, order)`, sets that connection's state to `order` unless a move (this one
    /// or an earlier one) already set it. Returns how many messages this call moved.
    pub async fn take_back_owned(
        &self,
        owner: &str,
        seed: Option<(&str, u64)>,
    ) -> Result<usize, LayerError> {
        match self {
            Layer::Memory(_) => Ok(0),
            Layer::Redis(redis) => redis.take_back_owned(owner, seed).await,
        }
    }
}

/// Renews an owner's lease every second until stopped. A lease that lapsed (Redis lost it, or
/// a renewal comes too late: servers may have seen it lapse and taken its sockets back) is
/// never taken up again, since a server that had not looked yet would go on sending to it while
/// the sockets' earlier frames run elsewhere: the worker owns new sockets under a new name, and
/// the old name's lease is given up (what waits in its channel moves back).
async fn renew_owner(
    redis: super::redis::RedisLayer,
    name: OwnerName,
    mut state: LeaseState,
    stop: CancellationToken,
) {
    let mut failing = false;
    let mut deadline = now_ms() + millis(OWNER_LEASE_TTL);
    // Set once the current name lapsed, until a new one is taken.
    let mut lapsed = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(OWNER_RENEW) => {}
        }
        let current = name.get();
        // Renewed this late, a server may see the lease lapse before the renewal lands. The
        // renewal still goes out, so that none does while this worker stops reading the name's
        // channel (what waits there moves back when the name is given up).
        lapsed |= now_ms() + millis(LATE_MARGIN) >= deadline;
        let next = now_ms() + millis(OWNER_LEASE_TTL);
        match redis
            .renew_lease(&current, OWNER_LEASE_TTL, &mut state)
            .await
        {
            Ok(lost) => {
                deadline = next;
                failing = false;
                lapsed |= lost;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(owner = %current, error = %e, "could not renew the owner lease; retrying");
                }
                failing = true;
                continue;
            }
        }
        if !lapsed {
            continue;
        }
        let fresh = with_random_local_part(OWNER_PREFIX);
        let mut fresh_state = LeaseState::default();
        let taken = now_ms() + millis(OWNER_LEASE_TTL);
        match redis
            .renew_lease(&fresh, OWNER_LEASE_TTL, &mut fresh_state)
            .await
        {
            Ok(_) => {
                tracing::warn!(old = %current, new = %fresh, "the owner lease lapsed or Redis lost it; this worker owns new sockets under a new name, and the old one's go on through the shared channels");
                name.replace(&fresh);
                state = fresh_state;
                deadline = taken;
                lapsed = false;
                tokio::spawn(give_up_later(redis.clone(), current));
            }
            Err(e) => {
                tracing::warn!(owner = %current, error = %e, "could not take a new owner lease; retrying");
            }
        }
    }
}

/// Gives up an owner name this worker stopped using, once its receive loop has stopped
/// reading the name's channel (one pop, at most a second) and the messages it took from there
/// have run, so that nothing moved back to the shared channels overtakes them.
async fn give_up_later(redis: super::redis::RedisLayer, old: Arc<str>) {
    tokio::time::sleep(HANDOVER_WAIT).await;
    if let Err(e) = redis.release_lease(&old).await {
        tracing::warn!(owner = %old, error = %e, "could not give up a lapsed owner lease; the servers take its sockets back anyway");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_names_and_channels() {
        let owner = "switchyard.owner.Ab3";
        assert!(is_owner_name(owner));
        assert_eq!(owner_channel(owner), "switchyard.owner.Ab3.sockets");
        assert!(is_owner_channel(&owner_channel(owner)));
        assert!(!is_owner_channel("websocket.receive"));
        assert!(!is_owner_channel("switchyard.owner..sockets"));
        assert!(!is_owner_name("switchyard.owner."));
        assert!(!is_owner_name("switchyard.owner.a.b"));
        assert!(!is_owner_name("other.Ab3"));
    }
}

//! The turns this process handed on. When a worker records message `n` of a connection as run
//! and the record shows nothing of the connection parked, the connection's next turn is
//! `n + 1`, and only running message `n + 1` moves it on (a channel delivers each message once;
//! upkeep moves it only past a message parked for the whole layer expiry, and a state loss
//! only restarts it at a later frame, which then runs first in any case). So when this process
//! then receives message `n + 1` itself, its gate needs no read of Redis: the turn is known.
//! [`HandedTurns`] remembers one turn per connection, is asked once (a gate takes the entry),
//! and trusts an entry for half the layer expiry only. With frames spread over N workers a
//! connection's next frame comes to the same worker about one time in N, and every time to the
//! worker that holds it already (the lane of [`crate::worker`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

/// Entries kept before stale ones are swept: connections whose next frame went to another
/// worker leave theirs behind.
const SWEEP_ABOVE: usize = 16_384;

/// The size is looked at once per this many entries remembered: counting a `DashMap` locks
/// each of its shards, too much for every message. The map holds at most
/// `SWEEP_ABOVE + CHECK_EVERY` entries.
const CHECK_EVERY: usize = 1_024;

/// The next turn of each connection whose last message this process recorded as run.
#[derive(Debug, Default)]
pub(super) struct HandedTurns {
    turns: DashMap<String, (u64, Instant), FxBuildHasher>,
    remembered: AtomicUsize,
}

impl HandedTurns {
    /// Remembers that `next` is the turn of `reply_channel`.
    pub(super) fn remember(&self, reply_channel: &str, next: u64, trust_for: Duration) {
        if self
            .remembered
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(CHECK_EVERY)
            && self.turns.len() >= SWEEP_ABOVE
        {
            self.turns.retain(|_, (_, at)| at.elapsed() < trust_for);
            if self.turns.len() >= SWEEP_ABOVE {
                self.turns.clear();
            }
        }
        self.turns
            .insert(reply_channel.to_owned(), (next, Instant::now()));
    }

    /// Whether message `order` of `reply_channel` is its turn by what this process remembers
    /// (remembered within `trust_for`); the entry is used up either way.
    pub(super) fn take(&self, reply_channel: &str, order: u64, trust_for: Duration) -> bool {
        self.turns
            .remove(reply_channel)
            .is_some_and(|(_, (next, at))| next == order && at.elapsed() < trust_for)
    }

    /// Forgets `reply_channel` (its connection has ended).
    pub(super) fn forget(&self, reply_channel: &str) {
        self.turns.remove(reply_channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_is_taken_once_and_only_for_its_order() {
        let turns = HandedTurns::default();
        let trust = Duration::from_secs(30);
        turns.remember("r!a", 5, trust);
        assert!(!turns.take("r!a", 6, trust), "another order");
        assert!(
            !turns.take("r!a", 5, trust),
            "the entry went with the first ask"
        );
        turns.remember("r!a", 5, trust);
        assert!(turns.take("r!a", 5, trust));
        assert!(!turns.take("r!a", 5, trust));
        turns.remember("r!b", 1, trust);
        assert!(
            !turns.take("r!b", 1, Duration::ZERO),
            "older than it is trusted"
        );
        turns.remember("r!c", 1, trust);
        turns.forget("r!c");
        assert!(!turns.take("r!c", 1, trust));
    }

    #[test]
    fn stale_entries_are_swept_past_the_bound() {
        let turns = HandedTurns::default();
        for i in 0..SWEEP_ABOVE {
            turns.remember(&format!("r!{i}"), 1, Duration::from_secs(30));
        }
        turns.remember("r!last", 1, Duration::ZERO);
        assert_eq!(turns.turns.len(), 1, "every entry older than zero went");
        assert!(turns.take("r!last", 1, Duration::from_secs(30)));
    }
}

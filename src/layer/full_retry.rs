//! The one policy for a send the layer refuses with `ChannelFull`: wait and try again, with a
//! growing, jittered pause, until a bound, then give up with the last error. Every place that
//! meets a full channel uses it: the interface server's `websocket.connect`, `websocket.receive`
//! (the socket reads nothing meanwhile, so TCP pushes back on the client), `http.request`, body
//! chunks and `websocket.disconnect`, and a worker's sends from a consumer's outbox.
//!
//! ASGI 1.0 says to give up on `ChannelFull` at once; daphne did, and a burst that briefly fills
//! `websocket.receive` then closed healthy sockets with 1013. A full shared channel almost always
//! means the workers are momentarily behind, so a sender that waits a little loses nothing; the
//! bound ([`DEFAULT_BACKPRESSURE_TIMEOUT`], `--backpressure-timeout`) keeps a dead worker pool
//! from pinning clients forever.

use std::time::Duration;

use tokio::time::Instant;

use super::LayerError;

/// How long a send waits for room in a full channel before it gives up (10 s): long enough to
/// ride out a burst or a worker restart, short enough that a client learns of a dead worker pool.
pub const DEFAULT_BACKPRESSURE_TIMEOUT: Duration = Duration::from_secs(10);

/// First pause after a refusal: a worker pops a batch within a millisecond or two.
const FIRST_PAUSE: Duration = Duration::from_millis(2);

/// Longest pause between two tries: a channel that empties is used again within this.
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// One send's retry state: when it gives up and how long it pauses next.
#[derive(Debug, Clone)]
pub struct FullRetry {
    give_up: Instant,
    pause: Duration,
    max_pause: Duration,
    retry_unavailable: bool,
    refusals: u32,
}

impl FullRetry {
    /// Retries a full channel for `bound` from now.
    pub fn new(bound: Duration) -> Self {
        Self::until(deadline_after(bound))
    }

    /// Retries a full channel until `give_up`.
    pub fn until(give_up: Instant) -> Self {
        FullRetry {
            give_up,
            pause: FIRST_PAUSE,
            max_pause: MAX_PAUSE,
            retry_unavailable: false,
            refusals: 0,
        }
    }

    /// Also retries while the layer is unreachable (for a message whose loss costs more than its
    /// delay, such as `websocket.disconnect`).
    pub fn or_unavailable(mut self) -> Self {
        self.retry_unavailable = true;
        self
    }

    /// Caps the pause between two tries (at least the first pause).
    pub fn max_pause(mut self, max: Duration) -> Self {
        self.max_pause = max.max(FIRST_PAUSE);
        self
    }

    /// Gives up by `deadline` at the latest (a shutdown that began meanwhile).
    pub fn shorten_to(&mut self, deadline: Instant) {
        self.give_up = self.give_up.min(deadline);
    }

    /// Refusals seen so far (0: the first try went through, or none was refused yet).
    pub fn refusals(&self) -> u32 {
        self.refusals
    }

    /// After `error`, the pause to wait before the next try, or `None` to give up: the error is
    /// not one to retry, or the bound is reached. The last pause ends at the bound, so the last
    /// try is made then.
    pub fn next_pause(&mut self, error: &LayerError) -> Option<Duration> {
        let retryable = error.is_full() || (self.retry_unavailable && error.is_unavailable());
        if !retryable {
            return None;
        }
        self.refusals = self.refusals.saturating_add(1);
        let left = self.give_up.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        // Jitter spreads the tries of many senders that met the same full channel at once.
        let wait = self.pause.mul_f64(0.5 + rand::random::<f64>()).min(left);
        self.pause = (self.pause * 2).min(self.max_pause);
        Some(wait)
    }

    /// Waits out [`next_pause`](Self::next_pause); false when the send should give up instead.
    pub async fn wait(&mut self, error: &LayerError) -> bool {
        match self.next_pause(error) {
            Some(pause) => {
                tokio::time::sleep(pause).await;
                true
            }
            None => false,
        }
    }
}

/// `now + after`, or a deadline decades away when that overflows (a configured bound may be
/// anything up to `Duration::MAX`, and `Instant + Duration` panics).
pub fn deadline_after(after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);
    let now = Instant::now();
    now.checked_add(after).unwrap_or_else(|| now + FAR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> LayerError {
        LayerError::ChannelFull {
            channel: "websocket.receive".into(),
            capacity: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_a_full_channel_until_the_bound_with_growing_pauses() {
        let started = Instant::now();
        let mut retry = FullRetry::new(Duration::from_secs(1));
        let mut pauses = Vec::new();
        while let Some(pause) = retry.next_pause(&full()) {
            pauses.push(pause);
            tokio::time::sleep(pause).await;
        }
        // The tries stop at the bound, not before and not after.
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert!(pauses[0] <= FIRST_PAUSE.mul_f64(1.5), "{pauses:?}");
        assert!(pauses.iter().all(|p| *p <= MAX_PAUSE.mul_f64(1.5)));
        // Growing: more than the first pause would allow in 1 s, fewer than 2 ms pauses would.
        assert!(pauses.len() > 10 && pauses.len() < 100, "{}", pauses.len());
        assert_eq!(retry.refusals() as usize, pauses.len() + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_give_up_at_once_unless_asked() {
        let down = LayerError::Unavailable("redis down".into());
        assert!(
            FullRetry::new(Duration::from_secs(5))
                .next_pause(&down)
                .is_none()
        );
        assert!(
            FullRetry::new(Duration::from_secs(5))
                .or_unavailable()
                .next_pause(&down)
                .is_some()
        );
        let bad = LayerError::Protocol("?".into());
        assert!(
            FullRetry::new(Duration::from_secs(5))
                .or_unavailable()
                .next_pause(&bad)
                .is_none()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shortened_deadline_wins() {
        let mut retry = FullRetry::new(Duration::from_secs(60));
        retry.shorten_to(Instant::now());
        assert!(retry.next_pause(&full()).is_none());
        let mut huge = FullRetry::new(Duration::MAX);
        assert!(huge.next_pause(&full()).is_some());
    }
}

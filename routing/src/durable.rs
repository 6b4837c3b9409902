//! Durable (at-least-once) task channels, as the application declares them: the retry policy a
//! route opts into with [`Route::durable`](crate::Route::durable), and the job facts a worker adds
//! to a durable message before its consumer runs ([`Message::attempt`](crate::Message::attempt),
//! [`Message::job_id`](crate::Message::job_id)). The streams that keep the jobs live in the
//! framework crate (`switchyard::jobs`); this is only the data both sides agree on.

use std::time::Duration;

/// Content key under which a worker hands a durable message's stable id to its consumer.
pub const JOB_ID_KEY: &str = "__job_id__";
/// Content key under which a worker hands a durable message's attempt number (1 = first run).
pub const ATTEMPT_KEY: &str = "__attempt__";

/// How a durable channel retries a failed job before it goes to the dead-letter stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurablePolicy {
    /// Runs in all, the first included (5). A job that failed this many times is dead.
    pub max_attempts: u32,
    /// Wait before the second run (1 s); each further retry waits twice as long, up to
    /// `max_delay`, with up to ±25 % jitter so that retries of many jobs do not bunch up.
    pub initial_delay: Duration,
    /// Longest wait between two runs (5 min).
    pub max_delay: Duration,
    /// A job not yet run this long after it was sent goes to the dead-letter stream instead of
    /// running (`None`: no deadline; jobs wait as long as Redis keeps them).
    pub deadline: Option<Duration>,
}

impl Default for DurablePolicy {
    fn default() -> Self {
        DurablePolicy {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            deadline: None,
        }
    }
}

impl DurablePolicy {
    /// Sets `max_attempts` (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets the first retry's wait.
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Sets the longest wait between runs.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Sets the deadline after sending past which a job is dead instead of run.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The wait before the run after `attempt` failed (attempt 1 waits `initial_delay`), without
    /// jitter: `initial_delay * 2^(attempt-1)`, capped at `max_delay`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(32);
        self.initial_delay
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max_delay)
    }

    /// [`backoff`](Self::backoff) scaled by `jitter` in `[0, 1)`: from 75 % to 125 % of it
    /// (never above `max_delay`).
    pub fn backoff_with_jitter(&self, attempt: u32, jitter: f64) -> Duration {
        let base = self.backoff(attempt);
        base.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0))
            .min(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_initial_delay_up_to_the_cap() {
        let p = DurablePolicy::default()
            .initial_delay(Duration::from_millis(100))
            .max_delay(Duration::from_millis(1000));
        let waits: Vec<u64> = (1..=6).map(|a| p.backoff(a).as_millis() as u64).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_millis(1000));
        assert_eq!(p.backoff_with_jitter(1, 0.0), Duration::from_millis(75));
        assert_eq!(p.backoff_with_jitter(1, 0.5), Duration::from_millis(100));
        assert_eq!(p.backoff_with_jitter(5, 0.99), Duration::from_millis(1000));
        assert_eq!(DurablePolicy::default().max_attempts(0).max_attempts, 1);
    }
}

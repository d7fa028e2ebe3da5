//! Back-off between retries of a call that failed: exponential, with "equal jitter"
//! so that many retriers (channels, replicas) do not retry in lockstep.

use std::time::Duration;

const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Exponential back-off with "equal jitter": each wait is drawn from the upper half
/// of a ceiling that doubles up to `BACKOFF_MAX`.
pub struct Backoff {
    ceiling: Duration,
}

impl Backoff {
    pub fn new() -> Self {
        Self {
            ceiling: BACKOFF_FIRST,
        }
    }

    pub fn next_wait(&mut self) -> Duration {
        let wait = self.ceiling.mul_f64(rand::random_range(0.5..=1.0));
        self.ceiling = (self.ceiling * 2).min(BACKOFF_MAX);
        wait
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

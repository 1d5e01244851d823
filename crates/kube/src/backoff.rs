//! The retry delay between failed list/watch calls: exponential with jitter,
//! so a broken API server is not hammered and a single hiccup (such as a 410
//! relist) is recovered from quickly.
//!
//! The watcher yields a successful `Init` marker before every list attempt, and
//! a successful item resets the backoff; like kube-runtime's `DefaultBackoff`
//! (a `ResetTimerBackoff`), a reset therefore only takes effect once no error
//! happened for a while (twice the maximum delay), or the delay would never grow.

use std::time::{Duration, Instant};

use ::kube::runtime::utils::Backoff;
use rand::Rng;

/// Exponential backoff: `min`, 2×, 4×... capped at `max`, each delay jittered
/// down by up to a quarter so many gateways do not retry in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct WatchBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
    last_error: Option<Instant>,
}

impl WatchBackoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        WatchBackoff {
            min,
            max,
            next: min,
            last_error: None,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.last_error = Some(Instant::now());
        let current = self.next;
        self.next = (current * 2).min(self.max);
        let jitter = rand::rng().random_range(0.75..=1.0);
        Some(current.mul_f64(jitter))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        let calm = self.last_error.is_none_or(|t| t.elapsed() >= self.max * 2);
        if calm {
            self.next = self.min;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = WatchBackoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let d: Vec<Duration> = (&mut b).take(5).collect();
        assert!(d[0] <= Duration::from_millis(100) && d[0] >= Duration::from_millis(75));
        assert!(d[1] >= Duration::from_millis(150));
        assert!(d[4] <= Duration::from_millis(500) && d[4] >= Duration::from_millis(375));
        // Right after an error a reset is ignored (the watcher's Init marker).
        b.reset();
        assert!(b.next().unwrap() >= Duration::from_millis(375));
        // After a calm period (2 x max) it takes effect.
        std::thread::sleep(Duration::from_millis(1000));
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(100));
    }
}

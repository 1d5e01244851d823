//! Event rates, exponentially weighted over a time constant: the critical
//! arrivals admission tunes its reserve by, the blocks an engine evicts.

use std::time::{Duration, Instant};

/// Events per second, exponentially weighted over `tau` (passed to every
/// call, so the rate stays a plain `Copy` value): events at `t` add to a sum
/// that decays by `exp(-dt / tau)`, and the sum over `tau` reads a steady
/// rate as itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct DecayingRate {
    sum: f64,
    at: Option<Instant>,
}

impl DecayingRate {
    /// Counts `n` events at `now`.
    pub fn add(&mut self, n: f64, now: Instant, tau: Duration) {
        self.sum = self.decayed(now, tau) + n;
        self.at = Some(now);
    }

    /// Events per second at `now` (0 before the first).
    pub fn per_second(&self, now: Instant, tau: Duration) -> f64 {
        self.decayed(now, tau) / tau.as_secs_f64()
    }

    /// When the last events were counted.
    pub fn last(&self) -> Option<Instant> {
        self.at
    }

    fn decayed(&self, now: Instant, tau: Duration) -> f64 {
        match self.at {
            Some(at) => {
                let dt = now.saturating_duration_since(at).as_secs_f64();
                self.sum * (-dt / tau.as_secs_f64()).exp()
            }
            None => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_rate_reads_as_itself_and_decays_by_e_per_tau() {
        let tau = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut r = DecayingRate::default();
        assert_eq!(r.per_second(t0, tau), 0.0);
        // 100 events every 100 ms for 100 s: 1,000 per second.
        for i in 1..=1000u64 {
            r.add(100.0, t0 + Duration::from_millis(100 * i), tau);
        }
        let end = t0 + Duration::from_secs(100);
        assert!((r.per_second(end, tau) - 1000.0).abs() < 10.0);
        let later = end + tau;
        let expect = r.per_second(end, tau) / std::f64::consts::E;
        assert!((r.per_second(later, tau) - expect).abs() < 1e-6);
        assert_eq!(r.last(), Some(end));
    }
}

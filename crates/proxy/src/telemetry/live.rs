//! Live figures for the status page: process-wide running totals of TTFT,
//! inter-token latency and tokens (added once per finished request), and a
//! small ring buffer of one sample a second over the last minutes, so the
//! page's charts have history the moment it is opened.
//!
//! The totals are process-wide like the Prometheus recorder; the history is
//! kept per gateway (its queue depth is that gateway's).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Samples kept: five minutes at one a second.
pub(crate) const HISTORY_LEN: usize = 300;
/// Spacing of samples.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Running totals since the process started.
#[derive(Debug, Default)]
struct Totals {
    requests: AtomicU64,
    ttft_us: AtomicU64,
    ttft_n: AtomicU64,
    itl_us: AtomicU64,
    itl_n: AtomicU64,
    completion_tokens: AtomicU64,
}

static TOTALS: Totals = Totals {
    requests: AtomicU64::new(0),
    ttft_us: AtomicU64::new(0),
    ttft_n: AtomicU64::new(0),
    itl_us: AtomicU64::new(0),
    itl_n: AtomicU64::new(0),
    completion_tokens: AtomicU64::new(0),
};

/// What one finished request adds (a few relaxed atomic adds).
pub(crate) fn record(
    ttft: Option<Duration>,
    itl_sum: Duration,
    itl_n: u64,
    completion_tokens: u64,
) {
    let t = &TOTALS;
    t.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(d) = ttft {
        t.ttft_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        t.ttft_n.fetch_add(1, Ordering::Relaxed);
    }
    if itl_n > 0 {
        t.itl_us
            .fetch_add(itl_sum.as_micros() as u64, Ordering::Relaxed);
        t.itl_n.fetch_add(itl_n, Ordering::Relaxed);
    }
    t.completion_tokens
        .fetch_add(completion_tokens, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    requests: u64,
    ttft_us: u64,
    ttft_n: u64,
    itl_us: u64,
    itl_n: u64,
    completion_tokens: u64,
}

fn snapshot() -> Snapshot {
    let t = &TOTALS;
    Snapshot {
        requests: t.requests.load(Ordering::Relaxed),
        ttft_us: t.ttft_us.load(Ordering::Relaxed),
        ttft_n: t.ttft_n.load(Ordering::Relaxed),
        itl_us: t.itl_us.load(Ordering::Relaxed),
        itl_n: t.itl_n.load(Ordering::Relaxed),
        completion_tokens: t.completion_tokens.load(Ordering::Relaxed),
    }
}

/// One point of the charts: means over the requests that finished in the
/// interval before `t_ms` (None when none did).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Sample {
    /// Milliseconds since the Unix epoch.
    pub t_ms: u64,
    pub ttft_ms: Option<f64>,
    pub itl_ms: Option<f64>,
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Requests waiting in admission queues, all pools.
    pub queue_depth: usize,
}

/// The ring buffer of one gateway.
#[derive(Debug, Default)]
pub(crate) struct History {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    last: Option<(SystemTime, Snapshot)>,
    samples: VecDeque<Sample>,
}

impl History {
    /// Takes one sample now (the first call only sets the baseline).
    pub(crate) fn sample(&self, queue_depth: usize) {
        self.sample_at(SystemTime::now(), snapshot(), queue_depth)
    }

    fn sample_at(&self, now: SystemTime, cur: Snapshot, queue_depth: usize) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((then, prev)) = inner.last {
            let secs = now
                .duration_since(then)
                .unwrap_or(SAMPLE_EVERY)
                .as_secs_f64()
                .max(1e-3);
            let mean = |sum: u64, n: u64, psum: u64, pn: u64| {
                let n = n.saturating_sub(pn);
                (n > 0).then(|| sum.saturating_sub(psum) as f64 / n as f64 / 1000.0)
            };
            let s = Sample {
                t_ms: now
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                ttft_ms: mean(cur.ttft_us, cur.ttft_n, prev.ttft_us, prev.ttft_n),
                itl_ms: mean(cur.itl_us, cur.itl_n, prev.itl_us, prev.itl_n),
                tokens_per_s: cur.completion_tokens.saturating_sub(prev.completion_tokens) as f64
                    / secs,
                requests_per_s: cur.requests.saturating_sub(prev.requests) as f64 / secs,
                queue_depth,
            };
            if inner.samples.len() == HISTORY_LEN {
                inner.samples.pop_front();
            }
            inner.samples.push_back(s);
        }
        inner.last = Some((now, cur));
    }

    /// The samples, oldest first.
    pub(crate) fn samples(&self) -> Vec<Sample> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.samples.iter().copied().collect()
    }
}

/// Samples `history` every [`SAMPLE_EVERY`] with the queue depth `depth`
/// reads, until the owner is dropped.
pub(crate) async fn sample_loop<T: Send + Sync + 'static>(
    owner: Weak<T>,
    history: impl Fn(&T) -> &History + Send + 'static,
    depth: impl Fn(&T) -> usize + Send + 'static,
) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(o) = owner.upgrade() else { return };
        history(&o).sample(depth(&o));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_means_over_each_interval_and_the_ring_is_bounded() {
        let h = History::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        h.sample_at(t0, Snapshot::default(), 0);
        assert!(h.samples().is_empty(), "the first call is the baseline");
        let cur = Snapshot {
            requests: 4,
            ttft_us: 400_000,
            ttft_n: 4,
            itl_us: 30_000,
            itl_n: 10,
            completion_tokens: 50,
        };
        h.sample_at(t0 + Duration::from_secs(2), cur, 3);
        let s = h.samples()[0];
        assert_eq!(s.t_ms, 1_002_000);
        assert_eq!(s.ttft_ms, Some(100.0));
        assert_eq!(s.itl_ms, Some(3.0));
        assert_eq!((s.tokens_per_s, s.requests_per_s), (25.0, 2.0));
        assert_eq!(s.queue_depth, 3);
        // Nothing finished in the next interval: no latency, zero rates.
        h.sample_at(t0 + Duration::from_secs(3), cur, 0);
        let s = h.samples()[1];
        assert_eq!((s.ttft_ms, s.itl_ms, s.tokens_per_s), (None, None, 0.0));
        for i in 0..HISTORY_LEN as u64 + 10 {
            h.sample_at(t0 + Duration::from_secs(4 + i), cur, 0);
        }
        assert_eq!(h.samples().len(), HISTORY_LEN);
    }
}

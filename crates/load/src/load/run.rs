//! The two load shapes: a closed loop (N workers, each sending its next request when the last
//! one finished) and an open loop (Poisson arrivals at a fixed rate, whatever the answers do).
//! Both stop at a request count and/or a duration, and every wait is bounded by the
//! per-request timeout plus a grace period, so a run can never hang.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Barrier, Semaphore};
use tokio::task::JoinSet;

use super::client::{Slot, Status, Target};
use super::report::{ClassStats, Stats};
use super::workload::{splitmix64, Class, ClassPicker, Workload};

/// What every request of a run shares.
pub struct Plan {
    /// Where requests go; several: each request to one of them by a hash of
    /// its number (a client spreading its traffic over gateway instances).
    pub targets: Vec<Target>,
    pub workload: Workload,
    pub classes: Vec<Class>,
    pub picker: ClassPicker,
    pub timeout: Duration,
    pub max_requests: u64,
    pub duration: Option<Duration>,
    pub warmup: Duration,
}

/// Stats plus how many requests were cut unfinished by the final grace period.
pub struct Finished {
    pub stats: Stats,
    pub unfinished: u64,
    /// Requests sent (numbers `0..sent` in the open loop).
    pub sent: u64,
}

/// How long to wait past the end for answers still in flight.
const GRACE: Duration = Duration::from_secs(2);
/// Pause after a refused connection, so a dead target does not spin the CPU.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

fn lock(m: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    // A panicking recorder cannot leave the counters half-updated in a way that matters here.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Plan {
    /// Which of `targets` request `seq` goes to: a hash, not a rotation, so
    /// no target sees only some prefix groups (the schedule cycles groups).
    pub fn target_of(&self, seq: u64) -> usize {
        match self.targets.len() {
            0 | 1 => 0,
            n => (splitmix64(seq ^ 0x7461_7267_6574_7321) % n as u64) as usize,
        }
    }

    fn new_stats(&self, start: Instant) -> Arc<Mutex<Stats>> {
        let measure_from = (!self.warmup.is_zero()).then(|| start + self.warmup);
        let total: f64 = self.classes.iter().map(|c| c.share).sum();
        let classes = self
            .classes
            .iter()
            .map(|c| ClassStats {
                name: c.name.clone(),
                share: c.share / total,
                ..Default::default()
            })
            .collect();
        Arc::new(Mutex::new(Stats::new(classes, measure_from)))
    }

    async fn one(
        &self,
        slot: &mut Slot,
        seq: u64,
        stats: &Mutex<Stats>,
        lag: Option<Duration>,
    ) -> Status {
        let class = self.picker.pick(seq);
        let o = slot
            .run(
                &self.targets[self.target_of(seq)],
                self.workload.body(seq),
                &self.classes[class].headers,
                self.workload.stream,
                self.timeout,
            )
            .await;
        lock(stats).record(class, &o, &slot.itls, &slot.error_body, lag);
        o.status
    }

    /// Waits for the tasks up to `limit`, then aborts the rest.
    async fn drain(set: &mut JoinSet<()>, limit: Instant) {
        while !set.is_empty() {
            match tokio::time::timeout_at(limit.into(), set.join_next()).await {
                Ok(_) => {}
                Err(_) => {
                    set.abort_all();
                    while set.join_next().await.is_some() {}
                }
            }
        }
    }

    fn finish(stats: Arc<Mutex<Stats>>, sent: u64) -> Finished {
        let stats = match Arc::try_unwrap(stats) {
            Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(shared) => {
                // Only aborted tasks could still hold it; take a copy of what was recorded.
                let s = lock(&shared);
                let mut copy = Stats::new(s.classes.clone(), s.measure_from);
                copy.lag = s.lag.clone();
                copy.not_sent = s.not_sent;
                copy.retries = s.retries;
                copy.seen = s.seen;
                copy.first_start = s.first_start;
                copy.last_end = s.last_end;
                copy
            }
        };
        let unfinished = sent.saturating_sub(stats.seen);
        Finished {
            stats,
            unfinished,
            sent,
        }
    }

    /// `workers` connections, each sending its next request as soon as the last one ended.
    pub async fn closed(self: Arc<Self>, workers: usize) -> Finished {
        let next = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let barrier = Arc::new(Barrier::new(workers + 1));
        let stats = self.new_stats(Instant::now());
        let mut set = JoinSet::new();
        for _ in 0..workers {
            let (plan, next, sent, barrier, stats) = (
                self.clone(),
                next.clone(),
                sent.clone(),
                barrier.clone(),
                stats.clone(),
            );
            set.spawn(async move {
                let mut slot = Slot::default();
                slot.preconnect(&plan.targets[0]).await;
                barrier.wait().await;
                let deadline = plan.duration.map(|d| Instant::now() + d);
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq >= plan.max_requests {
                        break;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    if plan.one(&mut slot, seq, &stats, None).await == Status::Connect {
                        tokio::time::sleep(CONNECT_BACKOFF).await;
                    }
                }
            });
        }
        // Connecting is not part of the measurement; bounded like everything else.
        let _ = tokio::time::timeout(self.timeout + GRACE, barrier.wait()).await;
        let start = Instant::now();
        if !self.warmup.is_zero() {
            lock(&stats).measure_from = Some(start + self.warmup);
        }
        let end = self
            .duration
            .map_or(start + self.timeout * 10_000, |d| start + d);
        Self::drain(&mut set, end + self.timeout + GRACE).await;
        Self::finish(stats, sent.load(Ordering::Relaxed))
    }

    /// Poisson arrivals at `rate` per second, at most `max_in_flight` at once (more wait for
    /// a free slot and show up as schedule lag).
    pub async fn open(self: Arc<Self>, rate: f64, max_in_flight: usize, seed: u64) -> Finished {
        // One pool of connected slots per target.
        let preconnect = max_in_flight.min(64).div_ceil(self.targets.len().max(1));
        let mut pools = Vec::with_capacity(self.targets.len());
        for t in &self.targets {
            let mut slots = Vec::with_capacity(preconnect);
            for _ in 0..preconnect {
                let mut s = Slot::default();
                s.preconnect(t).await;
                slots.push(s);
            }
            pools.push(Mutex::new(slots));
        }
        let pools = Arc::new(pools);
        let permits = Arc::new(Semaphore::new(max_in_flight));
        let sent = Arc::new(AtomicU64::new(0));
        let mut rng = SmallRng::seed_from_u64(seed);
        let start = Instant::now();
        let stats = self.new_stats(start);
        let deadline = self.duration.map(|d| start + d);
        let mut set = JoinSet::new();
        let mut at_secs = 0.0f64;
        for seq in 0..self.max_requests {
            let u: f64 = rng.random();
            at_secs += -(1.0 - u).ln() / rate;
            let at = start + Duration::from_secs_f64(at_secs);
            if deadline.is_some_and(|d| at >= d) {
                break;
            }
            if at > Instant::now() {
                tokio::time::sleep_until(at.into()).await;
            }
            while set.try_join_next().is_some() {}
            let (plan, pools, permits, sent, stats) = (
                self.clone(),
                pools.clone(),
                permits.clone(),
                sent.clone(),
                stats.clone(),
            );
            set.spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                if deadline.is_some_and(|d| Instant::now() >= d + GRACE) {
                    lock(&stats).not_sent += 1;
                    return;
                }
                let lag = Instant::now().saturating_duration_since(at);
                let pool = &pools[plan.target_of(seq)];
                let mut slot = pool
                    .lock()
                    .ok()
                    .and_then(|mut p| p.pop())
                    .unwrap_or_default();
                sent.fetch_add(1, Ordering::Relaxed);
                if plan.one(&mut slot, seq, &stats, Some(lag)).await == Status::Connect {
                    tokio::time::sleep(CONNECT_BACKOFF).await;
                }
                if let Ok(mut p) = pool.lock() {
                    p.push(slot);
                }
            });
        }
        let end = deadline.unwrap_or_else(Instant::now).max(Instant::now());
        Self::drain(&mut set, end + self.timeout + GRACE).await;
        Self::finish(stats, sent.load(Ordering::Relaxed))
    }
}

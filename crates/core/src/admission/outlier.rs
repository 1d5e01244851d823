//! Outlier ejection and active health probes for one pool.
//!
//! Passive: consecutive connect failures, timeouts and 5xx eject a replica for
//! a backoff that doubles with each ejection (a success served to a client
//! resets it). 4xx never count: a context-length error says nothing about the
//! replica's health. Active: once an ejection's time is over, the replica is
//! probed (`GET /health` by default, through the pool's shared replica client)
//! and comes back only when the probe succeeds; a failed probe ejects it again
//! for a longer time. The prober follows the pool's membership channel and
//! forgets replicas that left.
//!
//! The set of ejected keys is an arc-swap snapshot, so the request path checks
//! it without a lock (`pool::RoutabilityCheck` turns it into a replica's
//! routability); the per-replica counters sit behind a mutex touched once per
//! response, never across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::config::OutlierConfig;
use crate::discovery::ReplicaClient;
use crate::pool::Pool;

/// What happened to one attempt on a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    ConnectFailure,
    Timeout,
    /// A response status (only 5xx count as failures).
    Status(u16),
}

impl Outcome {
    /// Whether this outcome counts towards ejection.
    pub fn is_failure(self) -> bool {
        match self {
            Outcome::Success => false,
            Outcome::ConnectFailure | Outcome::Timeout => true,
            Outcome::Status(s) => s >= 500,
        }
    }
}

#[derive(Debug, Default)]
struct Health {
    consecutive: u32,
    /// Ejections since the last success served to a client (drives the backoff).
    ejections: u32,
    ejected_until: Option<Instant>,
    probing: bool,
}

/// Ejection state of one pool's replicas.
#[derive(Debug)]
pub struct OutlierDetector {
    cfg: OutlierConfig,
    pool: Arc<str>,
    /// foldhash: written on every request's outcome (std's SipHash cost
    /// ~190 instructions of it).
    health: Mutex<HashMap<Arc<str>, Health, foldhash::fast::RandomState>>,
    ejected: ArcSwap<Vec<Arc<str>>>,
}

impl OutlierDetector {
    pub fn new(pool: Arc<str>, cfg: OutlierConfig) -> Self {
        OutlierDetector {
            cfg,
            pool,
            health: Mutex::new(HashMap::default()),
            ejected: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Whether the replica is ejected (lock-free).
    pub fn is_ejected(&self, key: &str) -> bool {
        self.ejected.load().iter().any(|k| **k == *key)
    }

    /// The keys currently ejected.
    pub fn ejected(&self) -> Arc<Vec<Arc<str>>> {
        self.ejected.load_full()
    }

    fn backoff(&self, ejections: u32) -> Duration {
        let factor = 1u64 << ejections.saturating_sub(1).min(20);
        Duration::from_millis(
            self.cfg
                .base_ejection_ms
                .saturating_mul(factor)
                .min(self.cfg.max_ejection_ms),
        )
    }

    /// Records an attempt's outcome on `key`, in a pool of `pool_size`
    /// replicas. Returns the ejection time when this outcome ejected it.
    pub fn record(&self, key: &Arc<str>, outcome: Outcome, pool_size: usize) -> Option<Duration> {
        let mut map = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let ejected_now = map.values().filter(|h| h.ejected_until.is_some()).count();
        let h = map.entry(key.clone()).or_default();
        if !outcome.is_failure() {
            h.consecutive = 0;
            if outcome == Outcome::Success && h.ejected_until.is_none() {
                h.ejections = 0;
            }
            return None;
        }
        h.consecutive += 1;
        if h.ejected_until.is_some() || h.consecutive < self.cfg.consecutive_failures.max(1) {
            return None;
        }
        // Fail open: never eject past the configured share (but always allow one).
        let allowed = ejected_now == 0
            || (ejected_now + 1) * 100 <= pool_size * self.cfg.max_ejected_percent as usize;
        if !allowed {
            tracing::warn!(pool = %self.pool, replica = %key, "outlier not ejected: too many replicas already ejected");
            return None;
        }
        h.ejections += 1;
        let d = self.backoff(h.ejections);
        h.ejected_until = Some(Instant::now() + d);
        h.consecutive = 0;
        drop(map);
        self.publish();
        metrics::counter!("infergate_outlier_ejections_total", "pool" => self.pool.to_string())
            .increment(1);
        tracing::warn!(pool = %self.pool, replica = %key, ?outcome, ejection_ms = d.as_millis() as u64, "replica ejected");
        Some(d)
    }

    /// Replicas whose ejection time is over and which are not being probed yet;
    /// they are marked as being probed.
    pub fn due_for_probe(&self, now: Instant) -> Vec<Arc<str>> {
        let mut map = self.health.lock().unwrap_or_else(|e| e.into_inner());
        map.iter_mut()
            .filter(|(_, h)| !h.probing && h.ejected_until.is_some_and(|t| t <= now))
            .map(|(k, h)| {
                h.probing = true;
                k.clone()
            })
            .collect()
    }

    /// The probe of an ejected replica answered: `healthy` brings it back,
    /// otherwise it is ejected again for a longer time.
    pub fn probe_result(&self, key: &Arc<str>, healthy: bool) {
        let mut map = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = map.get_mut(key) else { return };
        h.probing = false;
        if healthy {
            h.ejected_until = None;
            h.consecutive = 0;
            tracing::info!(pool = %self.pool, replica = %key, "replica back after health probe");
        } else {
            h.ejections += 1;
            let d = self.backoff(h.ejections);
            h.ejected_until = Some(Instant::now() + d);
        }
        drop(map);
        self.publish();
    }

    /// Forgets replicas no longer in the pool.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|k, _| keep(k));
        let changed = map.len() != before;
        drop(map);
        if changed {
            self.publish();
        }
    }

    fn publish(&self) {
        let map = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<Arc<str>> = map
            .iter()
            .filter(|(_, h)| h.ejected_until.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        drop(map);
        metrics::gauge!("infergate_outlier_ejected_replicas", "pool" => self.pool.to_string())
            .set(keys.len() as f64);
        self.ejected.store(Arc::new(keys));
    }

    /// Starts the probe loop of this detector for `pool`; it ends when the
    /// detector is dropped. `on_return` is called when a replica comes back
    /// (so the pool's queue can use the capacity).
    pub fn spawn_prober(
        self: &Arc<Self>,
        pool: Arc<Pool>,
        on_return: impl Fn() + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        let interval = Duration::from_millis(self.cfg.probe_interval_ms.max(10));
        let timeout = Duration::from_millis(self.cfg.probe_timeout_ms.max(10));
        let path = self.cfg.probe_path.clone();
        tokio::spawn(async move {
            let mut membership = pool.subscribe();
            membership.mark_changed();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = membership.changed() => {
                        // Never closed: the pool owns the sender, this task the pool.
                        if changed.is_err() {
                            return;
                        }
                        let Some(det) = weak.upgrade() else { return };
                        let members = membership.borrow_and_update().clone();
                        det.retain(|k| members.iter().any(|r| r.key() == k));
                        continue;
                    }
                }
                let Some(det) = weak.upgrade() else { return };
                let due = det.due_for_probe(Instant::now());
                if due.is_empty() {
                    continue;
                }
                let members = pool.replicas();
                for key in due {
                    let Some(r) = members.iter().find(|r| *r.key() == *key) else {
                        continue;
                    };
                    let healthy = match ReplicaClient::uri(&r.endpoint, &path) {
                        Some(uri) => pool
                            .client()
                            .status(uri, timeout)
                            .await
                            .is_some_and(|s| s.is_success()),
                        None => false,
                    };
                    det.probe_result(&key, healthy);
                    if healthy {
                        on_return();
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(n: u32) -> OutlierDetector {
        OutlierDetector::new(
            "p".into(),
            OutlierConfig {
                consecutive_failures: n,
                base_ejection_ms: 100,
                max_ejection_ms: 350,
                ..Default::default()
            },
        )
    }

    #[test]
    fn consecutive_failures_eject_and_4xx_never_count() {
        let d = det(3);
        let k: Arc<str> = "a:1".into();
        for _ in 0..10 {
            assert_eq!(d.record(&k, Outcome::Status(400), 4), None);
            assert_eq!(d.record(&k, Outcome::Status(429), 4), None);
        }
        assert!(!d.is_ejected(&k));
        d.record(&k, Outcome::Status(500), 4);
        d.record(&k, Outcome::Timeout, 4);
        d.record(&k, Outcome::Success, 4);
        d.record(&k, Outcome::ConnectFailure, 4);
        d.record(&k, Outcome::Status(503), 4);
        assert!(!d.is_ejected(&k), "success broke the streak");
        assert_eq!(
            d.record(&k, Outcome::Status(502), 4),
            Some(Duration::from_millis(100))
        );
        assert!(d.is_ejected(&k));
    }

    #[test]
    fn backoff_grows_until_a_probe_and_a_success() {
        let d = det(1);
        let k: Arc<str> = "a:1".into();
        assert_eq!(
            d.record(&k, Outcome::ConnectFailure, 4),
            Some(Duration::from_millis(100))
        );
        assert!(d.due_for_probe(Instant::now()).is_empty(), "not due yet");
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(d.due_for_probe(later), vec![k.clone()]);
        assert!(d.due_for_probe(later).is_empty(), "already probing");
        d.probe_result(&k, false);
        assert!(d.is_ejected(&k));
        // Second ejection: 200 ms from now.
        assert_eq!(
            d.due_for_probe(Instant::now() + Duration::from_millis(150)),
            vec![]
        );
        assert_eq!(
            d.due_for_probe(Instant::now() + Duration::from_millis(250)),
            vec![k.clone()]
        );
        d.probe_result(&k, true);
        assert!(!d.is_ejected(&k));
        // Third ejection in a row: 400 ms capped at 350.
        assert_eq!(
            d.record(&k, Outcome::Timeout, 4),
            Some(Duration::from_millis(350))
        );
        d.due_for_probe(Instant::now() + Duration::from_secs(1));
        d.probe_result(&k, true);
        d.record(&k, Outcome::Success, 4);
        assert_eq!(
            d.record(&k, Outcome::Timeout, 4),
            Some(Duration::from_millis(100)),
            "a served success resets the backoff"
        );
    }

    #[test]
    fn never_ejects_past_the_share_but_always_one() {
        let d = det(1);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        assert!(d.record(&a, Outcome::Timeout, 2).is_some());
        assert!(d.record(&b, Outcome::Timeout, 2).is_none(), "50% of 2");
        assert!(!d.is_ejected(&b));
        let d = det(1);
        assert!(
            d.record(&a, Outcome::Timeout, 1).is_some(),
            "one is always allowed"
        );
        d.retain(|k| k != "a");
        assert!(!d.is_ejected(&a));
        assert!(d.record(&c, Outcome::Timeout, 1).is_some());
    }
}

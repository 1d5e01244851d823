//! Canary splits: a route sends a weighted share of its users to another
//! target, sticky per user, and rolls the canary back on its own when it is
//! worse than the stable side.
//!
//! The side is a hash of a sticky key (the configured header, else the body's
//! `user`, else the API key), so a conversation stays on one version and keeps
//! its prefix cache; `x-infergate-canary: canary|stable` forces a side.
//! Outcomes of both sides are kept over a sliding window; once each side has
//! enough requests, a canary whose error rate or p90 TTFT is worse than stable
//! by the configured margin is rolled back: its weight becomes zero, a metric
//! and a log line say why, and it stays so until the configuration changes
//! ([`CanarySplit::set`] with a different config, for example from a
//! Kubernetes Service annotation).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderMap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::config::CanaryConfig;

/// Header forcing a side: `canary` (or `true`/`1`) or `stable` (`false`/`0`).
pub(crate) const FORCE_HEADER: &str = "x-infergate-canary";
/// Response header naming the side that served.
pub const SIDE_HEADER: http::HeaderName = http::HeaderName::from_static("x-infergate-canary-side");

/// Most samples kept per side (older ones are dropped even inside the window).
const MAX_SAMPLES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanarySide {
    Stable,
    Canary,
}

impl CanarySide {
    pub fn as_str(self) -> &'static str {
        match self {
            CanarySide::Stable => "stable",
            CanarySide::Canary => "canary",
        }
    }
}

/// Where the canary side goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryTarget {
    pub pool: String,
    /// Upstream model name on the canary side, when it differs.
    pub model: Option<String>,
}

#[derive(Debug)]
struct Current {
    cfg: Option<CanaryConfig>,
    /// Why the canary was rolled back (weight is zero while set).
    rolled_back: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    ok: bool,
    ttft_ms: Option<f64>,
}

#[derive(Debug, Default)]
struct Window {
    sides: [VecDeque<Sample>; 2],
    since_eval: u32,
    last_eval: Option<Instant>,
}

/// One automatic rollback, kept for the status page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rollback {
    /// Seconds since the Unix epoch.
    pub at_unix: u64,
    pub pool: String,
    pub reason: String,
}

/// Rollbacks remembered per route (oldest dropped first).
const ROLLBACK_HISTORY: usize = 16;

/// The canary split of one route.
#[derive(Debug)]
pub struct CanarySplit {
    route: Arc<str>,
    /// Past rollbacks of this route, newest last.
    history: Mutex<VecDeque<Rollback>>,
    current: ArcSwap<Current>,
    window: Mutex<Window>,
    /// What the config file said last (a run-time `set` wins until it changes).
    from_file: Mutex<Option<CanaryConfig>>,
}

impl CanarySplit {
    pub fn new(route: impl Into<Arc<str>>, cfg: Option<CanaryConfig>) -> Self {
        let s = CanarySplit {
            route: route.into(),
            history: Mutex::new(VecDeque::new()),
            current: ArcSwap::from_pointee(Current {
                cfg: None,
                rolled_back: None,
            }),
            window: Mutex::new(Window::default()),
            from_file: Mutex::new(cfg.clone()),
        };
        s.set(cfg);
        s
    }

    /// Applies the config's canary, only when its value changed since the
    /// last call.
    pub fn set_from_file(&self, cfg: Option<CanaryConfig>) {
        let mut last = self.from_file.lock().unwrap_or_else(|e| e.into_inner());
        if *last != cfg {
            *last = cfg.clone();
            drop(last);
            self.set(cfg);
        }
    }

    /// Sets the route's canary (target, weight, rollback rules).
    /// The same config again changes nothing (a rolled-back canary stays rolled
    /// back); a different one starts afresh.
    fn set(&self, cfg: Option<CanaryConfig>) {
        if self.current.load().cfg == cfg && self.window_started() {
            return;
        }
        let weight = cfg.as_ref().map_or(0.0, |c| c.weight);
        self.current.store(Arc::new(Current {
            cfg,
            rolled_back: None,
        }));
        *self.window.lock().unwrap_or_else(|e| e.into_inner()) = Window {
            last_eval: Some(Instant::now()),
            ..Default::default()
        };
        metrics::gauge!("infergate_canary_weight_percent", "route" => self.route.to_string())
            .set(weight);
    }

    fn window_started(&self) -> bool {
        self.window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_eval
            .is_some()
    }

    /// The configured canary, if any.
    pub fn config(&self) -> Option<CanaryConfig> {
        self.current.load().cfg.clone()
    }

    /// Why the canary was rolled back, if it was.
    pub fn rolled_back(&self) -> Option<String> {
        self.current.load().rolled_back.clone()
    }

    /// Past automatic rollbacks, oldest first.
    pub fn rollbacks(&self) -> Vec<Rollback> {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.iter().cloned().collect()
    }

    /// The weight in effect (zero after a rollback).
    pub fn effective_weight(&self) -> f64 {
        let cur = self.current.load();
        match (&cur.cfg, &cur.rolled_back) {
            (Some(c), None) => c.weight.clamp(0.0, 100.0),
            _ => 0.0,
        }
    }

    /// Picks the side for a request; `Canary` comes with the canary's target.
    /// `x-infergate-canary` forces a side only when `may_force` (the caller's
    /// entitlement); otherwise it is ignored.
    pub fn choose(
        &self,
        headers: &HeaderMap,
        user: Option<&str>,
        may_force: bool,
    ) -> (CanarySide, Option<CanaryTarget>) {
        let cur = self.current.load();
        let Some(cfg) = &cur.cfg else {
            return (CanarySide::Stable, None);
        };
        let forced = headers
            .get(FORCE_HEADER)
            .filter(|_| may_force)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| match v.trim().to_ascii_lowercase().as_str() {
                "canary" | "true" | "1" => Some(CanarySide::Canary),
                "stable" | "false" | "0" => Some(CanarySide::Stable),
                _ => None,
            });
        let side = forced.unwrap_or_else(|| {
            let weight = if cur.rolled_back.is_some() {
                0.0
            } else {
                cfg.weight.clamp(0.0, 100.0)
            };
            if weight <= 0.0 {
                return CanarySide::Stable;
            }
            let bucket = match sticky_key(headers, user, &cfg.sticky_header) {
                Some(key) => xxh3_64_with_seed(key.as_bytes(), seed(&self.route)) % 10_000,
                None => rand::random_range(0..10_000),
            };
            if (bucket as f64) < weight * 100.0 {
                CanarySide::Canary
            } else {
                CanarySide::Stable
            }
        });
        match side {
            CanarySide::Canary => (
                side,
                Some(CanaryTarget {
                    pool: cfg.pool.clone(),
                    model: cfg.model.clone(),
                }),
            ),
            CanarySide::Stable => (side, None),
        }
    }

    /// Records one request's outcome on a side (`ok` = no 5xx, timeout or
    /// connect failure; `ttft` when a first byte came) and rolls the canary
    /// back when it is worse than stable.
    pub fn record(&self, side: CanarySide, ok: bool, ttft: Option<Duration>) {
        let cur = self.current.load();
        let Some(cfg) = &cur.cfg else { return };
        if cur.rolled_back.is_some() || !cfg.rollback.enabled {
            return;
        }
        let now = Instant::now();
        let verdict = {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            let q = &mut w.sides[side as usize];
            q.push_back(Sample {
                at: now,
                ok,
                ttft_ms: ttft.map(|d| d.as_secs_f64() * 1000.0),
            });
            if q.len() > MAX_SAMPLES {
                q.pop_front();
            }
            w.since_eval += 1;
            let due = w.since_eval >= 16
                || w.last_eval
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(50));
            if !due {
                return;
            }
            w.since_eval = 0;
            w.last_eval = Some(now);
            let horizon = Duration::from_secs(cfg.rollback.window_secs.max(1));
            for q in &mut w.sides {
                while q
                    .front()
                    .is_some_and(|s| now.duration_since(s.at) > horizon)
                {
                    q.pop_front();
                }
            }
            evaluate(&w.sides[0], &w.sides[1], cfg)
        };
        if let Some(reason) = verdict {
            let mut rolled = false;
            self.current.rcu(|c| {
                rolled = c.cfg.as_ref() == Some(cfg) && c.rolled_back.is_none();
                Current {
                    cfg: c.cfg.clone(),
                    rolled_back: c.rolled_back.clone().or_else(|| Some(reason.clone())),
                }
            });
            if rolled {
                let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
                if h.len() == ROLLBACK_HISTORY {
                    h.pop_front();
                }
                h.push_back(Rollback {
                    at_unix: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    pool: cfg.pool.clone(),
                    reason: reason.clone(),
                });
                drop(h);
                metrics::counter!("infergate_canary_rollbacks_total", "route" => self.route.to_string(), "pool" => cfg.pool.clone())
                    .increment(1);
                metrics::gauge!("infergate_canary_weight_percent", "route" => self.route.to_string())
                    .set(0.0);
                tracing::warn!(route = %self.route, pool = %cfg.pool, %reason, "canary rolled back: weight set to 0 until the config changes");
            }
        }
    }
}

fn seed(route: &str) -> u64 {
    infergate_protocol::tokenizer::model_seed(route)
}

/// The stickiness key: configured header, `user`, then the API key.
fn sticky_key<'a>(headers: &'a HeaderMap, user: Option<&'a str>, header: &str) -> Option<&'a str> {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
    };
    h(header)
        .or(user.filter(|u| !u.is_empty()))
        .or_else(|| h("authorization"))
        .or_else(|| h("x-api-key"))
}

/// Compares the two sides; `Some(reason)` when the canary must roll back.
fn evaluate(
    stable: &VecDeque<Sample>,
    canary: &VecDeque<Sample>,
    cfg: &CanaryConfig,
) -> Option<String> {
    let rb = &cfg.rollback;
    let min = rb.min_requests.max(1) as usize;
    if stable.len() < min || canary.len() < min {
        return None;
    }
    let err = |q: &VecDeque<Sample>| q.iter().filter(|s| !s.ok).count() as f64 / q.len() as f64;
    let (es, ec) = (err(stable), err(canary));
    if ec > es + rb.max_error_rate_increase {
        return Some(format!(
            "error rate {:.1}% vs stable {:.1}% (margin {:.1} points)",
            ec * 100.0,
            es * 100.0,
            rb.max_error_rate_increase * 100.0
        ));
    }
    let (ps, pc) = (p90_ttft(stable)?, p90_ttft(canary)?);
    if pc > ps * rb.max_ttft_p90_ratio {
        return Some(format!(
            "p90 TTFT {pc:.1} ms vs stable {ps:.1} ms (max ratio {})",
            rb.max_ttft_p90_ratio
        ));
    }
    None
}

fn p90_ttft(q: &VecDeque<Sample>) -> Option<f64> {
    let mut v: Vec<f64> = q.iter().filter_map(|s| s.ttft_ms).collect();
    if v.is_empty() {
        return None;
    }
    let i = ((v.len() as f64) * 0.9).ceil() as usize - 1;
    let i = i.min(v.len() - 1);
    let (_, x, _) = v.select_nth_unstable_by(i, f64::total_cmp);
    Some(*x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::config::RollbackConfig;

    fn cfg(weight: f64) -> CanaryConfig {
        CanaryConfig {
            pool: "m-v2".into(),
            model: None,
            weight,
            sticky_header: "x-infergate-session".into(),
            rollback: RollbackConfig {
                min_requests: 20,
                ..Default::default()
            },
        }
    }

    #[test]
    fn share_matches_weight_and_is_sticky() {
        let split = CanarySplit::new("m", Some(cfg(10.0)));
        let h = HeaderMap::new();
        let n = 10_000;
        let canary = (0..n)
            .filter(|i| split.choose(&h, Some(&format!("user-{i}")), true).0 == CanarySide::Canary)
            .count();
        let share = canary as f64 / n as f64;
        assert!((share - 0.10).abs() < 0.02, "share {share}");
        for i in 0..500 {
            let u = format!("user-{i}");
            let first = split.choose(&h, Some(&u), true);
            for _ in 0..3 {
                assert_eq!(split.choose(&h, Some(&u), true), first);
            }
        }
        // The header key wins over `user`; the API key is used last.
        let mut hh = HeaderMap::new();
        hh.insert("authorization", "Bearer sk-1".parse().unwrap());
        assert_eq!(
            sticky_key(&hh, None, "x-infergate-session"),
            Some("Bearer sk-1")
        );
        assert_eq!(sticky_key(&hh, Some("u"), "x-infergate-session"), Some("u"));
        hh.insert("x-infergate-session", "s".parse().unwrap());
        assert_eq!(sticky_key(&hh, Some("u"), "x-infergate-session"), Some("s"));
    }

    #[test]
    fn header_forces_a_side() {
        let split = CanarySplit::new("m", Some(cfg(0.0)));
        let mut h = HeaderMap::new();
        assert_eq!(split.choose(&h, Some("u"), true).0, CanarySide::Stable);
        h.insert(FORCE_HEADER, "canary".parse().unwrap());
        assert_eq!(
            split.choose(&h, Some("u"), true),
            (
                CanarySide::Canary,
                Some(CanaryTarget {
                    pool: "m-v2".into(),
                    model: None
                })
            )
        );
        let split = CanarySplit::new("m", Some(cfg(100.0)));
        h.insert(FORCE_HEADER, "stable".parse().unwrap());
        assert_eq!(split.choose(&h, Some("u"), true).0, CanarySide::Stable);
        assert_eq!(
            split.choose(&HeaderMap::new(), Some("u"), true).0,
            CanarySide::Canary
        );
        // A caller without the entitlement cannot force the weight-0 canary.
        h.insert(FORCE_HEADER, "canary".parse().unwrap());
        let zero = CanarySplit::new("m", Some(cfg(0.0)));
        assert_eq!(zero.choose(&h, Some("u"), false).0, CanarySide::Stable);
        assert_eq!(
            CanarySplit::new("m", None).choose(&h, None, true),
            (CanarySide::Stable, None)
        );
    }

    #[test]
    fn failing_canary_rolls_back_and_stays_until_config_changes() {
        let split = CanarySplit::new("m", Some(cfg(50.0)));
        for i in 0..40 {
            split.record(CanarySide::Stable, true, Some(Duration::from_millis(10)));
            // 25% errors on the canary: above stable's 0% + 5 points.
            split.record(
                CanarySide::Canary,
                i % 4 != 0,
                Some(Duration::from_millis(10)),
            );
        }
        let why = split.rolled_back().expect("rolled back");
        assert!(why.contains("error rate"), "{why}");
        assert_eq!(split.effective_weight(), 0.0);
        let h = HeaderMap::new();
        assert!((0..200)
            .all(|i| split.choose(&h, Some(&format!("u{i}")), true).0 == CanarySide::Stable));
        split.set(Some(cfg(50.0)));
        assert!(
            split.rolled_back().is_some(),
            "same config: stays rolled back"
        );
        split.set(Some(cfg(20.0)));
        assert!(split.rolled_back().is_none(), "new config: starts afresh");
        assert_eq!(split.effective_weight(), 20.0);
        let history = split.rollbacks();
        assert_eq!(
            history.len(),
            1,
            "the rollback is remembered after a new config"
        );
        assert_eq!(history[0].reason, why);
        assert!(history[0].at_unix > 0);
    }

    #[test]
    fn slow_canary_rolls_back_but_not_before_enough_requests() {
        let split = CanarySplit::new("m", Some(cfg(50.0)));
        for _ in 0..19 {
            split.record(CanarySide::Stable, true, Some(Duration::from_millis(10)));
            split.record(CanarySide::Canary, true, Some(Duration::from_millis(100)));
        }
        std::thread::sleep(Duration::from_millis(60));
        split.record(CanarySide::Stable, true, Some(Duration::from_millis(10)));
        assert!(
            split.rolled_back().is_none(),
            "19 canary requests are not enough"
        );
        // Equal sides never roll back.
        let ok = CanarySplit::new("m", Some(cfg(50.0)));
        for _ in 0..100 {
            ok.record(CanarySide::Stable, true, Some(Duration::from_millis(10)));
            ok.record(CanarySide::Canary, true, Some(Duration::from_millis(12)));
        }
        assert!(ok.rolled_back().is_none());
        for _ in 0..40 {
            split.record(CanarySide::Canary, true, Some(Duration::from_millis(100)));
        }
        let why = split.rolled_back().expect("rolled back");
        assert!(why.contains("TTFT"), "{why}");
    }
}

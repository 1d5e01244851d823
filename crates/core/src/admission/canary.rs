//! Canary splits: a route sends a weighted share of its users to another
//! target, sticky per user, and rolls the canary back on its own when it is
//! worse than the stable side.
//!
//! The side is a hash of a sticky key (the configured header, else the body's
//! `user`, else the API key), so a conversation stays on one version and keeps
//! its prefix cache; `x-infergate-canary: canary|stable` forces a side.
//! Outcomes of both sides are kept over a sliding window, after a warm-up
//! (time since the canary was configured, and its first requests, are not
//! judged: its caches and connections start cold); the `verdict` module
//! compares matched traffic and decides only at the configured confidence. A
//! canary judged worse is rolled back: its weight becomes zero, a metric and
//! a log line give the reason with both sides' figures and sample sizes
//! ([`CanarySplit::rolled_back`], which the Kubernetes side reports as an
//! Event), and it stays so until the configuration changes
//! ([`CanarySplit::set`] with a different config, for example from a
//! Kubernetes Service annotation).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderMap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::config::CanaryConfig;
use super::verdict::{self, Sample as Outcome, Stratum};

/// Header forcing a side: `canary` (or `true`/`1`) or `stable` (`false`/`0`).
pub(crate) const FORCE_HEADER: &str = "x-infergate-canary";
/// Response header naming the side that served.
pub const SIDE_HEADER: http::HeaderName = http::HeaderName::from_static("x-infergate-canary-side");

/// Most samples kept per side (older ones are dropped even inside the window).
const MAX_SAMPLES: usize = 4096;
/// How often the sides are compared.
const EVALUATE_EVERY: Duration = Duration::from_secs(1);

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
    outcome: Outcome,
}

#[derive(Debug, Default)]
struct Window {
    sides: [VecDeque<Sample>; 2],
    last_eval: Option<Instant>,
    /// When the canary was configured (the warm-up starts).
    armed_at: Option<Instant>,
    /// Canary requests seen since (the first `warmup_requests` do not count).
    canary_seen: u64,
    /// Samples (stable, canary) the last comparison was made on.
    judged: (usize, usize),
}

/// A canary that was rolled back (told to whoever reports it, for example
/// as a Kubernetes Event on the canary's Service).
#[derive(Debug, Clone, PartialEq)]
pub struct RolledBack {
    pub route: Arc<str>,
    /// The canary's pool.
    pub pool: String,
    /// Why, with both sides' figures and sample sizes.
    pub reason: String,
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
    /// Where rollbacks are announced (the admission registry's channel).
    announce: Option<tokio::sync::broadcast::Sender<RolledBack>>,
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
            announce: None,
        };
        s.set(cfg);
        s
    }

    /// Announces its rollbacks on `tx`.
    pub(crate) fn announcing(mut self, tx: tokio::sync::broadcast::Sender<RolledBack>) -> Self {
        self.announce = Some(tx);
        self
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
        let now = Instant::now();
        *self.window.lock().unwrap_or_else(|e| e.into_inner()) = Window {
            last_eval: Some(now),
            armed_at: Some(now),
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

    /// The samples (stable, canary) the last comparison was made on.
    pub fn judged(&self) -> (usize, usize) {
        self.window.lock().unwrap_or_else(|e| e.into_inner()).judged
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
    /// connect failure; `ttft` when a first byte came; `stratum`: its band and
    /// prompt length) and rolls the canary back when it is worse than stable.
    pub fn record(&self, side: CanarySide, ok: bool, ttft: Option<Duration>, stratum: Stratum) {
        self.record_at(side, ok, ttft, stratum, Instant::now());
    }

    /// [`record`](Self::record) observed at `now` (a simulated clock in tests).
    pub(crate) fn record_at(
        &self,
        side: CanarySide,
        ok: bool,
        ttft: Option<Duration>,
        stratum: Stratum,
        now: Instant,
    ) {
        let cur = self.current.load();
        let Some(cfg) = &cur.cfg else { return };
        if cur.rolled_back.is_some() || !cfg.rollback.enabled {
            return;
        }
        let rb = &cfg.rollback;
        let verdict = {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            if side == CanarySide::Canary {
                w.canary_seen += 1;
                if w.canary_seen <= rb.warmup_requests {
                    return;
                }
            }
            let armed_at = *w.armed_at.get_or_insert(now);
            if now.saturating_duration_since(armed_at) < Duration::from_secs(rb.warmup_secs) {
                return;
            }
            let q = &mut w.sides[side as usize];
            q.push_back(Sample {
                at: now,
                outcome: Outcome {
                    ok,
                    ttft_ms: ttft.map(|d| d.as_secs_f64() * 1000.0),
                    stratum,
                },
            });
            if q.len() > MAX_SAMPLES {
                q.pop_front();
            }
            // Judged at most once a second: a verdict within a second is soon
            // enough, and judging sorts the window.
            let due = w
                .last_eval
                .is_none_or(|t| now.saturating_duration_since(t) >= EVALUATE_EVERY);
            if !due {
                return;
            }
            w.last_eval = Some(now);
            let horizon = Duration::from_secs(rb.window_secs.max(1));
            for q in &mut w.sides {
                while q
                    .front()
                    .is_some_and(|s| now.saturating_duration_since(s.at) > horizon)
                {
                    q.pop_front();
                }
            }
            let outcomes = |q: &VecDeque<Sample>| q.iter().map(|s| s.outcome).collect::<Vec<_>>();
            let (stable, canary) = (outcomes(&w.sides[0]), outcomes(&w.sides[1]));
            w.judged = (stable.len(), canary.len());
            drop(w);
            for (side, n) in [("stable", stable.len()), ("canary", canary.len())] {
                metrics::gauge!("infergate_canary_judged_requests", "route" => self.route.to_string(), "side" => side)
                    .set(n as f64);
            }
            verdict::judge(&stable, &canary, rb)
        };
        let Some(verdict::Verdict {
            rollback: Some(kind),
            summary,
        }) = verdict
        else {
            return;
        };
        let reason = format!("{kind}: {summary}");
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
            metrics::counter!("infergate_canary_rollbacks_total", "route" => self.route.to_string(), "pool" => cfg.pool.clone(), "reason" => kind)
                .increment(1);
            metrics::gauge!("infergate_canary_weight_percent", "route" => self.route.to_string())
                .set(0.0);
            tracing::warn!(route = %self.route, pool = %cfg.pool, %reason, "canary rolled back: weight set to 0 until the config changes");
            if let Some(tx) = &self.announce {
                // Nobody listening (no cluster) is fine.
                let _ = tx.send(RolledBack {
                    route: self.route.clone(),
                    pool: cfg.pool.clone(),
                    reason,
                });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::config::RollbackConfig;
    use crate::admission::Priority;

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

    /// Feeds `n` rounds of one stable and one canary sample, 20 ms apart in
    /// simulated time from `t0`; returns the time after the last.
    fn feed(
        split: &CanarySplit,
        t0: Instant,
        n: usize,
        canary: impl Fn(usize) -> (bool, u64),
    ) -> Instant {
        let mut now = t0;
        for i in 0..n {
            now = t0 + Duration::from_millis(20 * i as u64);
            let ms = |m: u64| Some(Duration::from_millis(m));
            let s = Stratum::default();
            split.record_at(
                CanarySide::Stable,
                true,
                ms(100 + (i % 13) as u64 * 7),
                s,
                now,
            );
            let (ok, ttft) = canary(i);
            split.record_at(
                CanarySide::Canary,
                ok,
                ms(ttft + (i % 11) as u64 * 7),
                s,
                now,
            );
        }
        now
    }

    #[test]
    fn failing_canary_rolls_back_and_stays_until_config_changes() {
        let split = CanarySplit::new("m", Some(cfg(50.0)));
        let t0 = Instant::now();
        // 25% errors on the canary, but all inside the warm-up: no verdict.
        feed(&split, t0, 400, |i| (i % 4 != 0, 100));
        assert!(split.rolled_back().is_none(), "warm-up");
        // After it: above stable's 0% + 5 points.
        feed(&split, t0 + Duration::from_secs(10), 600, |i| {
            (i % 4 != 0, 100)
        });
        let why = split.rolled_back().expect("rolled back");
        assert!(why.starts_with("errors: errors 2"), "{why}");
        assert!(why.contains("vs stable 0.0% (n="), "{why}");
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
        let after_warmup = Instant::now() + Duration::from_secs(10);
        // The first 20 canary requests never count; then 19 more are too few.
        feed(&split, after_warmup, 39, |_| (true, 250));
        let later = after_warmup + Duration::from_secs(2);
        let ms = Some(Duration::from_millis(100));
        split.record_at(CanarySide::Stable, true, ms, Stratum::default(), later);
        assert!(
            split.rolled_back().is_none(),
            "19 canary requests are not enough"
        );
        // Close sides never roll back.
        let ok = CanarySplit::new("m", Some(cfg(50.0)));
        feed(&ok, after_warmup, 2000, |_| (true, 112));
        assert!(ok.rolled_back().is_none(), "{:?}", ok.rolled_back());
        feed(&split, after_warmup + Duration::from_secs(3), 200, |_| {
            (true, 250)
        });
        let why = split.rolled_back().expect("rolled back");
        assert!(why.starts_with("ttft: "), "{why}");
        assert!(why.contains("p90 TTFT"), "{why}");
    }

    /// One simulated canary rollout: 200 requests a second for 75 s
    /// (bursty: 2 s at 1.8x, 2 s at 0.2x), 500 sticky users, `weight`% of
    /// them on the canary, mixed bands and prefix-heavy prompts (a user's
    /// first request on a side misses the prefix cache: the canary starts
    /// with every user cold), TTFT about 120 ms with log-normal noise and
    /// 1.5x during bursts, 0.5% errors. The canary
    /// has `slow`x the TTFT and `errors` more error rate. Returns the
    /// simulated second of the rollback, if any.
    fn rollout(seed: u64, weight: f64, bursty: bool, slow: f64, errors: f64) -> Option<f64> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let split = CanarySplit::new("m", Some(CanaryConfig::new("v2", weight)));
        let t0 = Instant::now();
        let (rate, secs) = (200.0, 75.0);
        let users = 500;
        let prompt: Vec<u64> = (0..users).map(|_| rng.random_range(200..3000)).collect();
        let canary_user = |u: usize| ((u * 37) % 100) as f64 + 0.5 < weight;
        // Stable users are warm from the start; nobody is on the canary.
        let mut warm: Vec<[bool; 2]> = (0..users).map(|_| [true, false]).collect();
        let mut t = 0.0;
        while t < secs {
            let load = if !bursty {
                1.0
            } else if (t as u64 / 2).is_multiple_of(2) {
                1.8
            } else {
                0.2
            };
            t += -(1.0 - rng.random::<f64>()).ln() / (rate * load);
            let u = rng.random_range(0..users);
            let side = if canary_user(u) {
                CanarySide::Canary
            } else {
                CanarySide::Stable
            };
            let band = match rng.random_range(0..10) {
                0..2 => Priority::Critical,
                2..7 => Priority::Standard,
                _ => Priority::Sheddable,
            };
            let cold = !std::mem::replace(&mut warm[u][side as usize], true);
            let prefill = if cold { prompt[u] as f64 * 0.08 } else { 5.0 };
            let noise = {
                let (a, b): (f64, f64) = (rng.random(), rng.random());
                ((-2.0 * (1.0 - a).ln()).sqrt() * (std::f64::consts::TAU * b).cos() * 0.35).exp()
            };
            let mut ttft = (120.0 + prefill) * noise * if load > 1.0 { 1.5 } else { 1.0 };
            let mut err = 0.005;
            if side == CanarySide::Canary {
                ttft *= slow;
                err += errors;
            }
            let ok = rng.random::<f64>() >= err;
            let now = t0 + Duration::from_secs_f64(t);
            split.record_at(
                side,
                ok,
                ok.then(|| Duration::from_secs_f64(ttft / 1000.0)),
                Stratum::of(band, prompt[u]),
                now,
            );
            if split.rolled_back().is_some() {
                return Some(t);
            }
        }
        None
    }

    #[test]
    fn an_identical_canary_is_never_rolled_back() {
        for weight in [10.0, 30.0, 50.0] {
            for bursty in [false, true] {
                for seed in 0..20 {
                    let r = rollout(seed, weight, bursty, 1.0, 0.0);
                    assert_eq!(r, None, "seed {seed}, weight {weight}, bursty {bursty}");
                }
            }
        }
    }

    #[test]
    fn a_worse_canary_is_rolled_back_within_a_minute() {
        let mut worst = 0.0f64;
        for weight in [10.0, 30.0, 50.0] {
            for bursty in [false, true] {
                for seed in 100..120 {
                    for (slow, errors, what) in
                        [(2.0, 0.0, "2x TTFT"), (1.0, 0.10, "+10 points errors")]
                    {
                        let r = rollout(seed, weight, bursty, slow, errors);
                        worst = worst.max(r.unwrap_or(f64::INFINITY));
                        assert!(
                            r.is_some_and(|t| t <= 60.0),
                            "{what}: rolled back at {r:?} s (seed {seed}, weight {weight}, bursty {bursty})"
                        );
                    }
                }
            }
        }
        eprintln!("slowest rollback: {worst:.1} s of simulated time");
    }
}

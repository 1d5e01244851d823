//! The `admission:` section of a route: priorities, token budgets, the queue,
//! fallbacks, the canary split and outlier ejection. Every field has a default,
//! so an empty section (or none) gives a working gateway.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Priority;

/// Per-route admission configuration (`admission:` in a route's YAML).
///
/// The budget, queue and outlier parts apply to the pool the route targets
/// (one queue per pool); the rest is per route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Band of requests that name none (`critical`, `standard`, `sheddable`).
    pub default_priority: Priority,
    /// `x-gateway-inference-objective` names mapped to bands (the band names
    /// themselves and GIE integer priorities are always understood).
    pub objectives: BTreeMap<String, Priority>,
    pub budget: BudgetConfig,
    pub queue: QueueConfig,
    pub fallback: FallbackConfig,
    /// A share of traffic sent to another target; none by default.
    pub canary: Option<CanaryConfig>,
    pub outlier: OutlierConfig,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            default_priority: Priority::Standard,
            objectives: BTreeMap::new(),
            budget: BudgetConfig::default(),
            queue: QueueConfig::default(),
            fallback: FallbackConfig::default(),
            canary: None,
            outlier: OutlierConfig::default(),
        }
    }
}

/// How many tokens a replica may hold at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Token capacity of each replica (prompt + expected output of the
    /// requests in flight). When unset, derived from the KV cache size the
    /// engine reports (times `kv_fraction`); when that is unknown too, the
    /// budget does not limit.
    pub tokens_per_replica: Option<u64>,
    /// Share of the engine's KV cache the gateway fills before it queues.
    /// Default 1: with self-tuning the budget is the streams' projected KV
    /// peak in the engine's blocks (`admission::budget::kv_peak_within`), an
    /// upper bound, so no margin is needed; lower it to leave room for what the
    /// gateway cannot see (other clients of the engine, large shared prefixes).
    pub kv_fraction: f64,
    /// Cap on requests in flight per replica (for example the engine's
    /// `max_num_seqs`, so its own queue stays empty). Unset: the replica's
    /// batch limit as learned from its metrics (`admission::tuning`), no cap
    /// until it is learned.
    pub max_requests_per_replica: Option<u64>,
    /// Share of each replica's budget (tokens and requests) that only
    /// critical requests may use, so a critical arrival finds room at once
    /// instead of waiting for a standard request to end. Unset: derived from
    /// the observed critical traffic (`admission::tuning`; with
    /// `engine_priority` too: vLLM V1 does not preempt for a slot).
    pub critical_reserve: Option<f64>,
    /// Requests a replica may take beyond its request cap when they are
    /// critical: they wait in the engine's own queue, which starts them at
    /// the very step a sequence ends (an engine that preempts for a slot,
    /// such as SGLang, at once: there set it to the batch), instead of in
    /// the gateway's. Only critical requests ever wait there (the others are
    /// held at the gateway while the replica is at its cap), so the engine
    /// queue stays at most this long. Unset: 1 while critical traffic is
    /// seen (self-tuning), else 0.
    pub critical_engine_queue: Option<u64>,
    /// Prompt tokens sent to a replica and not answered yet (no first token)
    /// above which non-critical requests wait. An engine computes every
    /// waiting prefill in its next steps, so a burst of admissions makes long
    /// steps that a critical arrival must sit through; this cap spreads the
    /// burst over several steps (critical requests ignore it). A replica
    /// with no pending prefill always takes one request. Unset: what the
    /// replica prefills in one step, as learned (`admission::tuning`),
    /// while critical traffic is seen; no cap otherwise.
    pub max_prefill_tokens_per_replica: Option<u64>,
    /// Requests (so upstream HTTP/1 connections) in flight per replica at
    /// most, for every band, critical included: the gateway's connection
    /// bound, admitted like any other capacity (a request beyond it queues,
    /// is shed or times out in the queue, visibly). At most
    /// [`MAX_CONNECTIONS_PER_REPLICA`], the upstream client's own bound.
    pub max_connections_per_replica: u64,
    /// Derive the unset knobs above from what the gateway learns (true by
    /// default); false: an unset knob means "no limit".
    pub self_tuning: bool,
}

/// The upstream client's hard bound on connections (so requests) in flight
/// to one replica; `budget.max_connections_per_replica` defaults to it and
/// may only lower it, so admission, not the client, holds every request
/// beyond it.
pub const MAX_CONNECTIONS_PER_REPLICA: u64 = 1024;

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            tokens_per_replica: None,
            kv_fraction: 1.0,
            max_requests_per_replica: None,
            critical_reserve: None,
            critical_engine_queue: None,
            max_prefill_tokens_per_replica: None,
            max_connections_per_replica: MAX_CONNECTIONS_PER_REPLICA,
            self_tuning: true,
        }
    }
}

/// The gateway queue of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Requests waiting at most; beyond, 429.
    pub max_requests: usize,
    /// Deadline of a request in the queue when it names none (header
    /// `x-infergate-deadline-ms`); past it, 503 (or a fallback).
    pub timeout_ms: u64,
    /// Upper bound of a deadline a client may ask for.
    pub max_timeout_ms: u64,
    /// `Retry-After` seconds on 429 and 503.
    pub retry_after_secs: u64,
    /// Sheddable requests get 429 at once when the pool is saturated (the
    /// Gateway API Inference Extension's rule); when false they wait in the
    /// lowest band like the others.
    pub shed_sheddable: bool,
    /// Tenants with their own fair share in a band at once; a new tenant
    /// beyond them shares the `default` tenant's line, so rotating tenant
    /// ids buys no extra shares and the per-band list stays short.
    pub max_tenants: usize,
    /// Requests that may wait (each up to its deadline) while the pool has no
    /// ready replica, for example while it scales from zero; beyond, and with
    /// 0, 503 `no_ready_replica` at once.
    pub max_waiting_when_empty: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_requests: 1024,
            timeout_ms: 30_000,
            max_timeout_ms: 300_000,
            retry_after_secs: 1,
            shed_sheddable: true,
            max_tenants: 64,
            max_waiting_when_empty: 256,
        }
    }
}

/// Smaller models to serve a request when its own target cannot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackConfig {
    /// Model names (routes) tried in order.
    pub models: Vec<String>,
    /// The target has no ready replica.
    pub on_no_ready_replica: bool,
    /// The request would wait in the queue past its deadline.
    pub on_queue_deadline: bool,
    /// Every attempt failed before the first response byte.
    pub on_upstream_failure: bool,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        FallbackConfig {
            models: Vec::new(),
            on_no_ready_replica: true,
            on_queue_deadline: true,
            on_upstream_failure: true,
        }
    }
}

/// A weighted split to another target, with automatic rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The pool serving the canary side.
    pub pool: String,
    /// Model name sent upstream on the canary side (default: the stable side's).
    #[serde(default)]
    pub model: Option<String>,
    /// Percentage of users sent to the canary, 0 to 100.
    pub weight: f64,
    /// Header whose value keys stickiness before the `user` field and the API key.
    #[serde(default = "default_sticky_header")]
    pub sticky_header: String,
    #[serde(default)]
    pub rollback: RollbackConfig,
}

impl CanaryConfig {
    /// A canary to `pool` at `weight` percent with the default stickiness and
    /// rollback rules (as if written `{pool, weight}` in YAML).
    pub fn new(pool: impl Into<String>, weight: f64) -> Self {
        CanaryConfig {
            pool: pool.into(),
            model: None,
            weight,
            sticky_header: default_sticky_header(),
            rollback: RollbackConfig::default(),
        }
    }
}

fn default_sticky_header() -> String {
    "x-infergate-session".to_string()
}

/// When the canary is judged worse than stable and its weight drops to zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RollbackConfig {
    pub enabled: bool,
    /// Sliding window the two sides are compared over.
    pub window_secs: u64,
    /// Requests each side needs in the window before a verdict.
    pub min_requests: u64,
    /// Roll back when canary error rate > stable error rate + this (0.05 = 5 points).
    pub max_error_rate_increase: f64,
    /// Roll back when canary TTFT is above stable TTFT × this (its p90, and
    /// over matched samples at `confidence`).
    pub max_ttft_p90_ratio: f64,
    /// TTFT differences below this many ms never count (a 2 ms vs 1 ms
    /// canary is not a regression).
    pub ttft_floor_ms: f64,
    /// Confidence a rollback needs (one-sided tests: 0.99 = p < 0.01).
    pub confidence: f64,
    /// Seconds after the canary is (re)configured before samples count: its
    /// caches and connections are cold at first.
    pub warmup_secs: u64,
    /// Canary requests that never count (its first ones, cold too).
    pub warmup_requests: u64,
}

impl Default for RollbackConfig {
    fn default() -> Self {
        RollbackConfig {
            enabled: true,
            window_secs: 60,
            min_requests: 50,
            max_error_rate_increase: 0.05,
            max_ttft_p90_ratio: 1.5,
            ttft_floor_ms: 50.0,
            confidence: 0.99,
            warmup_secs: 10,
            warmup_requests: 20,
        }
    }
}

/// Passive outlier detection and active health probes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive connect failures, timeouts or 5xx that eject a replica.
    pub consecutive_failures: u32,
    /// First ejection time; doubled on each new ejection of the same replica.
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    /// At most this share of a pool is ejected at once (the rest stays, to
    /// fail open rather than eject a whole fleet).
    pub max_ejected_percent: u32,
    /// Path probed on an ejected replica once its ejection time is over.
    pub probe_path: String,
    pub probe_interval_ms: u64,
    pub probe_timeout_ms: u64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection_ms: 5_000,
            max_ejection_ms: 300_000,
            max_ejected_percent: 50,
            probe_path: "/health".to_string(),
            probe_interval_ms: 1_000,
            probe_timeout_ms: 1_000,
        }
    }
}

impl AdmissionConfig {
    /// Checks references to other routes and pools, and ranges. On error,
    /// returns (text to point at in the file, message).
    pub fn check(
        &self,
        route: &str,
        has_model: impl Fn(&str) -> bool,
        has_pool: impl Fn(&str) -> bool,
    ) -> Result<(), (String, String)> {
        for m in &self.fallback.models {
            if !has_model(m) {
                return Err((
                    m.clone(),
                    format!("route `{route}`: fallback model `{m}` is not served by any route"),
                ));
            }
            if m == route {
                return Err((
                    m.clone(),
                    format!("route `{route}`: a route cannot fall back to itself"),
                ));
            }
        }
        if let Some(c) = &self.canary {
            if !has_pool(&c.pool) {
                return Err((
                    format!("pool: {}", c.pool),
                    format!("route `{route}`: canary pool `{}` is not defined", c.pool),
                ));
            }
            if !(0.0..=100.0).contains(&c.weight) {
                return Err((
                    "weight:".into(),
                    format!(
                        "route `{route}`: canary weight must be 0 to 100, found {}",
                        c.weight
                    ),
                ));
            }
        }
        if let Some(r) = self
            .budget
            .critical_reserve
            .filter(|r| !(0.0..1.0).contains(r))
        {
            return Err((
                "critical_reserve:".into(),
                format!("route `{route}`: `budget.critical_reserve` must be in [0, 1), found {r}"),
            ));
        }
        if !(1..=MAX_CONNECTIONS_PER_REPLICA).contains(&self.budget.max_connections_per_replica) {
            return Err((
                "max_connections_per_replica:".into(),
                format!(
                    "route `{route}`: `budget.max_connections_per_replica` must be 1 to {MAX_CONNECTIONS_PER_REPLICA}"
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.budget.kv_fraction) || self.budget.kv_fraction == 0.0 {
            return Err((
                "kv_fraction:".into(),
                format!("route `{route}`: `budget.kv_fraction` must be in (0, 1]"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_is_default_and_full_section_parses() {
        let c: AdmissionConfig = serde_yaml_ng::from_str("{}").unwrap();
        assert_eq!(c, AdmissionConfig::default());
        let y = r#"
default_priority: sheddable
objectives: { batch: sheddable, chat: critical }
budget: { tokens_per_replica: 8192, max_requests_per_replica: 16 }
queue: { max_requests: 10, timeout_ms: 500 }
fallback: { models: [small], on_upstream_failure: false }
canary: { pool: m-v2, weight: 10, rollback: { min_requests: 5 } }
outlier: { consecutive_failures: 3 }
"#;
        let c: AdmissionConfig = serde_yaml_ng::from_str(y).unwrap();
        assert_eq!(c.default_priority, Priority::Sheddable);
        assert_eq!(c.objectives["chat"], Priority::Critical);
        assert_eq!(c.budget.tokens_per_replica, Some(8192));
        assert_eq!(c.queue.timeout_ms, 500);
        assert_eq!(c.queue.max_requests, 10);
        assert!(!c.fallback.on_upstream_failure && c.fallback.on_no_ready_replica);
        let canary = c.canary.clone().unwrap();
        assert_eq!(canary.sticky_header, "x-infergate-session");
        assert_eq!(canary.rollback.min_requests, 5);
        assert_eq!(c.outlier.consecutive_failures, 3);
        assert!(serde_yaml_ng::from_str::<AdmissionConfig>("bogus: 1").is_err());
        let yes = |_: &str| true;
        let no = |_: &str| false;
        assert!(c.check("m", yes, yes).is_ok());
        assert!(c
            .check("m", no, yes)
            .unwrap_err()
            .1
            .contains("fallback model `small`"));
        assert!(c.check("m", yes, no).unwrap_err().1.contains("canary pool"));
        assert!(c.check("small", yes, yes).unwrap_err().1.contains("itself"));
        assert_eq!(
            c.budget.max_connections_per_replica,
            MAX_CONNECTIONS_PER_REPLICA
        );
        let mut over = c.clone();
        over.budget.max_connections_per_replica = MAX_CONNECTIONS_PER_REPLICA + 1;
        assert!(over
            .check("m", yes, yes)
            .unwrap_err()
            .1
            .contains("max_connections_per_replica"));
    }
}

//! Admission: who is served now, who waits, who is refused and who is served by
//! another model. Token-level budgets per replica ([`budget`]), the per-pool
//! priority queue ([`queue`]), outlier ejection with active probes
//! ([`outlier`]), canary splits with automatic rollback ([`canary`]) and
//! fallback to smaller models ([`fallback`]), canary verdicts ([`verdict`]),
//! the engine's own priority field ([`engine_priority`]), and cutting clients that stop
//! reading a stream ([`backpressure`]); [`registry`] keeps this state across
//! config reloads; [`cold_start`] ramps up a replica that joins while
//! requests wait for one; [`tuning`] learns each pool's batch limits, step time,
//! prefill rate and critical traffic and derives the budget's protection
//! knobs the config leaves unset. The request path uses it through `proxy::admit`. This file
//! classifies a request: its priority band, its tenant and its deadline, from
//! headers and body.

pub(crate) mod budget;
pub(crate) mod canary;
pub(crate) mod cold_start;
pub(crate) mod config;
pub(crate) mod engine_priority;
pub(crate) mod fallback;
pub(crate) mod outlier;
pub(crate) mod queue;
pub(crate) mod registry;
pub(crate) mod tuning;
pub(crate) mod verdict;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use serde::{Deserialize, Serialize};

pub use budget::{Budget, Cost, Reservation};
pub use canary::{
    CanarySide, CanarySplit, Rollback, RolledBack, SIDE_HEADER as CANARY_SIDE_HEADER,
};
pub use config::{AdmissionConfig, CanaryConfig, MAX_CONNECTIONS_PER_REPLICA};
pub use engine_priority::EnginePriority;
pub use fallback::{FallbackReason, FallbackTrigger, FALLBACK_REASON_HEADER, SERVED_MODEL_HEADER};
pub use outlier::{Outcome, OutlierDetector};
pub use queue::{AdmitError, MustQueue, Placement, PoolAdmission, Ticket};
pub use registry::AdmissionRegistry;
pub use tuning::{Knobs, Timing};
pub use verdict::Stratum;

/// GIE header naming the request's objective (mapped to a priority band).
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
/// GIE header naming the tenant for fairness inside a band.
pub const FAIRNESS_HEADER: &str = "x-gateway-inference-fairness-id";
/// infergate header naming the band directly (`critical`, `standard`, `sheddable`).
pub const PRIORITY_HEADER: &str = "x-infergate-priority";
/// infergate header: the longest time (ms) the request accepts to wait in the queue.
pub const DEADLINE_HEADER: &str = "x-infergate-deadline-ms";

/// A priority band. Ordered: `Critical > Standard > Sheddable`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Refused at once (429) when the pool is saturated; never queued.
    Sheddable = 0,
    #[default]
    Standard = 1,
    Critical = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Standard, Priority::Sheddable];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Standard => "standard",
            Priority::Sheddable => "sheddable",
        }
    }

    /// A band name, or a GIE integer priority (`< 0` sheddable, `0` standard,
    /// `> 0` critical).
    pub fn parse(s: &str) -> Option<Priority> {
        match s.trim().to_ascii_lowercase().as_str() {
            "critical" => Some(Priority::Critical),
            "standard" => Some(Priority::Standard),
            "sheddable" => Some(Priority::Sheddable),
            other => other.parse::<i64>().ok().map(|p| match p {
                p if p < 0 => Priority::Sheddable,
                0 => Priority::Standard,
                _ => Priority::Critical,
            }),
        }
    }

    /// Index into per-band arrays, highest band first.
    pub(crate) fn index(self) -> usize {
        match self {
            Priority::Critical => 0,
            Priority::Standard => 1,
            Priority::Sheddable => 2,
        }
    }
}

/// Who a request is for admission purposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestClass {
    pub priority: Priority,
    /// Fairness key inside a band ("" for anonymous traffic).
    pub tenant: Arc<str>,
    /// How long the request may wait in the queue.
    pub max_wait: Duration,
}

/// What a caller may ask of the gateway through its control headers. The
/// identity layer decides it per caller (`identity::Policy`); classification
/// and the plan take it instead of trusting the headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entitlements {
    /// The highest band: a request asking for more is lowered to it (never
    /// raised).
    pub max_priority: Priority,
    /// Objective applied when the request names no band.
    pub default_objective: Option<Arc<str>>,
    /// Whether `x-infergate-canary` may force a side.
    pub may_force_canary: bool,
    /// Whether `x-infergate-no-fallback` may forbid fallback models.
    pub may_forbid_fallback: bool,
    /// The fairness tenant (the caller's team); `None`: the request's
    /// `x-gateway-inference-fairness-id`, else its `user`.
    pub tenant: Option<Arc<str>>,
}

impl Entitlements {
    /// Everything allowed, tenant from the request (`auth: none`, tests).
    pub fn unrestricted() -> Entitlements {
        Entitlements {
            max_priority: Priority::Critical,
            default_objective: None,
            may_force_canary: true,
            may_forbid_fallback: true,
            tenant: None,
        }
    }
}

/// Classifies a request: band from `x-infergate-priority`, else
/// `x-gateway-inference-objective` (band name, configured objective, or GIE
/// integer), else the caller's default objective, else the route default,
/// then lowered to the caller's highest band; tenant from the caller's team,
/// or (when its policy allows) `x-gateway-inference-fairness-id`, else the
/// body's `user`; deadline from `x-infergate-deadline-ms`, capped.
pub fn classify(
    headers: &HeaderMap,
    user: Option<&str>,
    cfg: &AdmissionConfig,
    ent: &Entitlements,
) -> RequestClass {
    // One pass over the request's few headers for the four names, each
    // value the first of its name as `HeaderMap::get` gives it: four lookups
    // by `&str` parsed and hashed each name, ~1.2k instructions a request.
    let slot = |name: &str| {
        [
            PRIORITY_HEADER,
            OBJECTIVE_HEADER,
            FAIRNESS_HEADER,
            DEADLINE_HEADER,
        ]
        .iter()
        .position(|n| *n == name)
    };
    let mut found: [Option<&http::HeaderValue>; 4] = [None; 4];
    for (name, value) in headers {
        if let Some(i) = slot(name.as_str()) {
            found[i].get_or_insert(value);
        }
    }
    let header = |name: &str| {
        slot(name)
            .and_then(|i| found[i])
            .and_then(|v| v.to_str().ok())
    };
    let objective = |o: &str| {
        cfg.objectives
            .get(o)
            .copied()
            .or_else(|| Priority::parse(o))
    };
    let priority = header(PRIORITY_HEADER)
        .and_then(Priority::parse)
        .or_else(|| header(OBJECTIVE_HEADER).and_then(objective))
        .or_else(|| ent.default_objective.as_deref().and_then(objective))
        .unwrap_or(cfg.default_priority)
        .min(ent.max_priority);
    let tenant: Arc<str> = match &ent.tenant {
        Some(t) => t.clone(),
        None => header(FAIRNESS_HEADER).or(user).unwrap_or("").into(),
    };
    let wait_ms = header(DEADLINE_HEADER)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(cfg.queue.timeout_ms)
        .min(cfg.queue.max_timeout_ms);
    RequestClass {
        priority,
        tenant,
        max_wait: Duration::from_millis(wait_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn classifies_from_headers_body_and_defaults() {
        let mut cfg = AdmissionConfig::default();
        cfg.objectives.insert("batch".into(), Priority::Sheddable);
        let all = Entitlements::unrestricted();
        let c = classify(&HeaderMap::new(), Some("alice"), &cfg, &all);
        assert_eq!(c.priority, Priority::Standard);
        assert_eq!(&*c.tenant, "alice");
        assert_eq!(c.max_wait, Duration::from_millis(30_000));

        let c = classify(&headers(&[(OBJECTIVE_HEADER, "batch")]), None, &cfg, &all);
        assert_eq!(c.priority, Priority::Sheddable);
        assert_eq!(&*c.tenant, "");
        let c = classify(&headers(&[(OBJECTIVE_HEADER, "5")]), None, &cfg, &all);
        assert_eq!(c.priority, Priority::Critical);
        let c = classify(&headers(&[(OBJECTIVE_HEADER, "-1")]), None, &cfg, &all);
        assert_eq!(c.priority, Priority::Sheddable);
        let c = classify(
            &headers(&[
                (OBJECTIVE_HEADER, "batch"),
                (PRIORITY_HEADER, "Critical"),
                (FAIRNESS_HEADER, "team-a"),
                (DEADLINE_HEADER, "999999999"),
            ]),
            Some("alice"),
            &cfg,
            &all,
        );
        assert_eq!(c.priority, Priority::Critical);
        assert_eq!(&*c.tenant, "team-a");
        assert_eq!(c.max_wait, Duration::from_millis(cfg.queue.max_timeout_ms));
        // A name's first value counts, as `HeaderMap::get` gives it; one
        // that is not text counts as absent.
        let mut h = headers(&[(PRIORITY_HEADER, "Sheddable")]);
        h.append(PRIORITY_HEADER, http::HeaderValue::from_static("Critical"));
        h.insert(
            FAIRNESS_HEADER,
            http::HeaderValue::from_bytes(b"\xffx").unwrap(),
        );
        h.append(FAIRNESS_HEADER, http::HeaderValue::from_static("team-b"));
        let c = classify(&h, Some("bob"), &cfg, &all);
        assert_eq!(c.priority, Priority::Sheddable);
        assert_eq!(&*c.tenant, "bob");
        // Unknown objective falls back to the route default.
        let c = classify(&headers(&[(OBJECTIVE_HEADER, "nope")]), None, &cfg, &all);
        assert_eq!(c.priority, Priority::Standard);
        assert!(
            Priority::Critical > Priority::Standard && Priority::Standard > Priority::Sheddable
        );
    }

    #[test]
    fn entitlements_cap_the_band_and_fix_the_tenant() {
        let mut cfg = AdmissionConfig::default();
        cfg.objectives.insert("batch".into(), Priority::Sheddable);
        let team = Entitlements {
            max_priority: Priority::Standard,
            default_objective: Some("batch".into()),
            may_force_canary: false,
            may_forbid_fallback: false,
            tenant: Some("search".into()),
        };
        let asks = headers(&[
            (PRIORITY_HEADER, "critical"),
            (FAIRNESS_HEADER, "rotating-id-17"),
        ]);
        let c = classify(&asks, Some("alice"), &cfg, &team);
        assert_eq!(c.priority, Priority::Standard, "lowered to the cap");
        assert_eq!(&*c.tenant, "search", "the team, not the header");
        // A lower band is honoured (never raised); no header: the default objective.
        let c = classify(
            &headers(&[(PRIORITY_HEADER, "sheddable")]),
            None,
            &cfg,
            &team,
        );
        assert_eq!(c.priority, Priority::Sheddable);
        let c = classify(&HeaderMap::new(), None, &cfg, &team);
        assert_eq!(c.priority, Priority::Sheddable, "default objective `batch`");
        // A route default above the cap is lowered too.
        cfg.default_priority = Priority::Critical;
        let plain = Entitlements {
            default_objective: None,
            ..team
        };
        assert_eq!(
            classify(&HeaderMap::new(), None, &cfg, &plain).priority,
            Priority::Standard
        );
    }
}

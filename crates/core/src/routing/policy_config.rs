//! The sections of a pool's `routing:` config that the inference-aware
//! policy's filters read: when a replica is saturated, how sticky a cached
//! prefix is, and how prefix groups are placed. [`RoutingConfig`] holds them;
//! they live apart from it so that the filters' context ([`Ctx`]) does not
//! depend on the filter registry that `RoutingConfig` names filters from.
//!
//! [`RoutingConfig`]: super::config::RoutingConfig
//! [`Ctx`]: super::framework::Ctx

use serde::{Deserialize, Serialize};

/// When a replica counts as saturated (it then takes traffic only if all are).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaturationConfig {
    /// Queued requests (engine-reported, plus own requests sent since the
    /// scrape beyond the observed batch limit) at or above which a replica is
    /// saturated (GIE's queue threshold is 5).
    pub max_waiting: f64,
    /// KV-cache usage (0..1) at or above which a replica is saturated.
    pub max_kv_usage: f64,
    /// Queued requests at which even a replica holding the prompt's prefix is
    /// dropped while another has headroom. Below it, leaving the holder is
    /// `prefix_affinity`'s call, but its TTFT estimate counts queued prefill,
    /// not the wait for a batch slot, which a deep queue means.
    pub holder_max_waiting: f64,
}

impl Default for SaturationConfig {
    fn default() -> Self {
        SaturationConfig {
            max_waiting: 5.0,
            max_kv_usage: 0.95,
            holder_max_waiting: 20.0,
        }
    }
}

/// Sticky-until-saturated: stay on the replica with the longest cached prefix
/// unless its estimated TTFT is worse than a colder replica's by a margin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StickyConfig {
    /// Replicas matching at least this fraction of the best match are "sticky".
    pub min_match_ratio: f64,
    /// The margin is this many times the prefill time the cached prefix saves
    /// (the value of keeping the group together for the next requests too).
    /// 3 by default: a spill serves one request sooner but leaves the group a
    /// second home whose copy evicts other prefixes, and the group's later
    /// requests pay for that; on the cache-pressure benchmark 3 raised the
    /// fleet hit rate on each of 8 seeds over 1 (0.962 to 0.976 of the
    /// oracle, against 0.948 to 0.963) with p90 TTFT no worse
    /// (docs/benchmarks/2026-12-07-hit-rate.md, session 15).
    pub margin_per_saved: f64,
    /// Added to `margin_per_saved` when leaving would copy the prefix into
    /// a full cache (the precise index knows each engine's free blocks): the
    /// copy evicts as much of other cached prefixes, which later requests
    /// prefill again, and the group keeps two warm homes, halving the
    /// cache's reach for it. 1 by default: the prefixes a copy evicts are
    /// taken to be worth what it saves (on the cache-pressure benchmark it
    /// never lowered the hit rate and kept spills from feeding on themselves
    /// at flatter popularity: docs/benchmarks/2026-12-07-hit-rate.md,
    /// session 12).
    pub margin_per_evicted: f64,
    /// ... but never more than this many milliseconds.
    pub max_margin_ms: f64,
}

impl StickyConfig {
    /// The match that counts as holding a prompt's prefix when the longest
    /// any replica holds is `longest` blocks (`min_match_ratio` of it, at
    /// least one); none when no replica holds any.
    pub fn holder_threshold(&self, longest: u32) -> Option<u32> {
        (longest > 0).then(|| ((f64::from(longest) * self.min_match_ratio).ceil() as u32).max(1))
    }
}

impl Default for StickyConfig {
    fn default() -> Self {
        StickyConfig {
            min_match_ratio: 0.8,
            margin_per_saved: 3.0,
            margin_per_evicted: 1.0,
            max_margin_ms: 6000.0,
        }
    }
}

/// Placement of a prefix no replica holds yet, agreed by independent gateways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RendezvousConfig {
    /// Blocks of the prompt's start that name its prefix group.
    pub blocks: u32,
    /// A replica is skipped while its load (requests) would exceed `(1 +
    /// load_slack)` times the mean plus `load_slack_abs` (bounded-load hashing;
    /// the absolute part keeps independent gateways, whose load views differ
    /// slightly, agreeing at low load, where balance matters little).
    pub load_slack: f64,
    pub load_slack_abs: f64,
    /// A replica is skipped while it would hold more than `ceil((1 +
    /// group_slack) × (groups + 1) / replicas) + group_slack_abs` prefix groups
    /// (groups counted in this gateway's index; bounded-load consistent
    /// hashing; plain hashing puts 7 or 8 of 31 groups on one of 8 replicas).
    /// This slack applies while another gateway feeds the pool (an engine
    /// counted more requests than this gateway had sent it, within
    /// `shared_window_ms`): gateways, which each count only the groups they
    /// placed, then agree on most homes (3 gateways: all but ~5 of 31 groups
    /// with 0.25 and 1; about half with no slack). A gateway alone balances
    /// groups exactly (31 on 8: 3 or 4 each): near the fleet's knee a replica
    /// with a group more than its share is the first to queue (0.25 and 1 gave
    /// 12x the p90 TTFT at 75 requests/s in docs/routing.md).
    pub group_slack: f64,
    pub group_slack_abs: f64,
    /// How long one sign of another gateway keeps the slack on.
    pub shared_window_ms: u64,
    /// `false`: the slack applies always, alone too.
    pub exact_when_alone: bool,
    /// Where engines publish KV events: open new groups on each replica in
    /// proportion to how slowly its cache turns over (blocks evicted per
    /// second over its size), so that an unused prefix survives about as long
    /// on every replica, as in one cache pooled over the fleet. No effect
    /// while no cache evicts, nor without events.
    pub weigh_by_turnover: bool,
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        RendezvousConfig {
            blocks: 4,
            load_slack: 0.25,
            load_slack_abs: 2.0,
            group_slack: 0.25,
            group_slack_abs: 1.0,
            shared_window_ms: 30_000,
            exact_when_alone: true,
            weigh_by_turnover: true,
        }
    }
}

//! The per-pool `routing:` configuration: policy, scrape loop, prefix index,
//! saturation thresholds, stickiness, rendezvous placement, and the filters and
//! weighted scorers of the inference-aware policy. Every field has a default, so
//! `routing: {}` (or no `routing:` at all) gives the recommended policy.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyName {
    /// Replica signals + prefix index + filters + scorers (see `routing::aware`).
    #[default]
    #[serde(alias = "default")]
    InferenceAware,
    LeastRequest,
    RoundRobin,
    Random,
    PowerOfTwo,
}

/// Per-pool routing configuration (`routing:` in a pool's YAML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub policy: PolicyName,
    pub scrape: ScrapeConfig,
    pub prefix: PrefixConfig,
    pub saturation: SaturationConfig,
    pub sticky: StickyConfig,
    pub rendezvous: RendezvousConfig,
    /// A replica's prefill speed, tokens per second, for TTFT estimates
    /// (llm-d's default for an H100-class replica is 15,928).
    pub prefill_tokens_per_sec: f64,
    /// Filters applied in order; each keeps everything when it would keep nothing.
    pub filters: Vec<FilterName>,
    /// Weighted scorers; the highest weighted sum wins.
    pub scorers: Vec<WeightedScorer>,
    /// How many recent decisions are kept for `explain` (0 = none).
    pub explain_buffer: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: PolicyName::default(),
            scrape: ScrapeConfig::default(),
            prefix: PrefixConfig::default(),
            saturation: SaturationConfig::default(),
            sticky: StickyConfig::default(),
            rendezvous: RendezvousConfig::default(),
            prefill_tokens_per_sec: 16_000.0,
            filters: vec![
                FilterName::Saturation,
                FilterName::Lora,
                FilterName::PrefixAffinity,
                FilterName::Rendezvous,
            ],
            scorers: vec![
                WeightedScorer {
                    scorer: ScorerName::Ttft,
                    weight: 2.0,
                },
                WeightedScorer {
                    scorer: ScorerName::TokenLoad,
                    weight: 1.0,
                },
            ],
            explain_buffer: 1024,
        }
    }
}

/// The replica `/metrics` scrape loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeConfig {
    /// Scrape at all (off: only the gateway's own accounting is used, and no
    /// replica is considered unknown).
    pub enabled: bool,
    pub path: String,
    pub interval_ms: u64,
    /// Per-scrape timeout, so one slow replica never stalls the others.
    pub timeout_ms: u64,
    /// Older signals count as unknown (= saturated).
    pub stale_after_ms: u64,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        ScrapeConfig {
            enabled: true,
            path: "/metrics".into(),
            interval_ms: 50,
            timeout_ms: 250,
            stale_after_ms: 1000,
        }
    }
}

/// The approximate prefix index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefixConfig {
    /// Tokens per block (the engine's KV block size; vLLM's default is 16).
    pub block_size: u32,
    /// Prompt blocks hashed at most (longer prompts match on this prefix only).
    pub max_blocks: u32,
    /// Index capacity per replica in blocks when the replica does not report
    /// `cache_config_info` (llm-d's default LRU size).
    pub default_replica_blocks: u32,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig {
            block_size: 16,
            max_blocks: 1024,
            default_replica_blocks: 31_250,
        }
    }
}

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
    pub margin_per_saved: f64,
    /// ... but never more than this many milliseconds.
    pub max_margin_ms: f64,
}

impl Default for StickyConfig {
    fn default() -> Self {
        StickyConfig {
            min_match_ratio: 0.8,
            margin_per_saved: 1.0,
            max_margin_ms: 2000.0,
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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterName {
    /// Drop replicas that are saturated or whose signals are unknown/stale.
    Saturation,
    /// For adapter requests, keep replicas with the adapter in use (else sent
    /// there recently, else with room to load it).
    Lora,
    /// Keep the replicas holding (nearly) the longest prefix unless that costs
    /// more TTFT than the margin.
    PrefixAffinity,
    /// For a prefix no replica holds, keep the rendezvous-hash choice within the load bound.
    Rendezvous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScorerName {
    /// Estimated time to first token: queued prefill + this prompt's uncached part.
    Ttft,
    /// Estimated tokens in flight (prompt + output).
    TokenLoad,
    /// Requests in flight (own count or engine running + waiting, whichever is larger).
    Requests,
    /// Engine-reported waiting requests.
    Queue,
    /// 1 − KV-cache usage.
    KvCache,
    /// Fraction of the prompt's blocks cached.
    Prefix,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedScorer {
    pub scorer: ScorerName,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_defaults_and_overrides() {
        let c: RoutingConfig = serde_yaml_ng::from_str("{}").unwrap();
        assert_eq!(c, RoutingConfig::default());
        let c: RoutingConfig = serde_yaml_ng::from_str(
            "policy: round_robin\nscrape: {interval_ms: 100}\nscorers: [{scorer: queue, weight: 3}, {scorer: prefix}]\nfilters: [saturation]\n",
        )
        .unwrap();
        assert_eq!(c.policy, PolicyName::RoundRobin);
        assert_eq!(c.scrape.interval_ms, 100);
        assert_eq!(c.scrape.timeout_ms, 250);
        assert_eq!(c.scorers[1].weight, 1.0);
        assert_eq!(c.filters, vec![FilterName::Saturation]);
        let c: RoutingConfig = serde_yaml_ng::from_str("policy: default").unwrap();
        assert_eq!(c.policy, PolicyName::InferenceAware);
        assert!(serde_yaml_ng::from_str::<RoutingConfig>("polcy: random").is_err());
    }
}

//! The per-pool `routing:` configuration: policy, scrape loop, prefix index,
//! saturation thresholds, stickiness, rendezvous placement (those three in
//! `policy_config`), and the filters and weighted scorers of the
//! inference-aware policy (named in `registry`). Every field has a default, so
//! `routing: {}` (or no `routing:` at all) gives the recommended policy.

use serde::{Deserialize, Serialize};

use super::kv_events::KvEventsConfig;
pub(crate) use super::policy_config::{RendezvousConfig, SaturationConfig, StickyConfig};
pub(crate) use super::registry::{FilterName, ScorerName};

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
    /// Follow the replicas' KV-cache events for a precise prefix index
    /// (absent = the approximate index only).
    pub kv_events: Option<KvEventsConfig>,
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
            kv_events: None,
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

/// A scorer of the inference-aware policy and its weight in the sum.
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
        let c: RoutingConfig =
            serde_yaml_ng::from_str("kv_events: {port: 5557, replay_port: 5558}").unwrap();
        let ev = c.kv_events.unwrap();
        assert_eq!(
            (ev.port, ev.replay_port, ev.stale_after_ms),
            (5557, Some(5558), 5000)
        );
        assert!(serde_yaml_ng::from_str::<RoutingConfig>("kv_events: {prot: 1}").is_err());
    }
}

//! Precise prefix routing from the engines' own KV-cache events (vLLM's
//! `--kv-events-config`, SGLang's `--kv-events-config`): `decode` reads a
//! batch in either msgpack encoding, `index` keeps exactly which blocks each
//! replica holds, `subscriber` follows each replica's ZMQ stream (replaying
//! gaps, detecting restarts and staleness), `engine_tokens` fetches the
//! engine's own token ids for prompts (so request keys match the engine's).
//! The inference-aware picker asks
//! the precise index first and the approximate one for replicas whose events
//! are absent or stale.
//!
//! Why here and not a crate of its own: like the `/metrics` scrape loops it
//! is a source of routing signals that follows pool membership, and its
//! dependencies (`zeromq`, `rmpv`) are pure Rust and small; a separate crate
//! would have core as its only user.

mod decode;
mod engine_tokens;
mod index;
mod subscriber;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use decode::{decode_batch, DecodeError, KvEvent, KvEventBatch};
pub use engine_tokens::{EngineTokens, EngineTokensStats, TokenizeApi, TokenizeConfig};
pub use index::{key_seed, PreciseIndex, PreciseStats};
pub use subscriber::{follow_pool, KvEventsHandle};

/// `routing.kv_events` of a pool: where each replica publishes its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvEventsConfig {
    /// The PUB port on each replica's host (vLLM's `endpoint`, default 5557).
    pub port: u16,
    /// Instead of `port`: the replica's HTTP port plus this (replicas sharing
    /// one host, such as `infergate sim --kv-events-config`).
    pub port_offset: Option<i32>,
    /// The ROUTER port answering replays (vLLM's `replay_endpoint`); without
    /// it, gaps cannot be filled and liveness is judged from traffic only.
    pub replay_port: Option<u16>,
    pub replay_port_offset: Option<i32>,
    /// Topic prefix subscribed to ("" = all).
    pub topic: String,
    /// A replica's events count as stale after this long without a
    /// message or a replay answer (then it is routed by the approximate index).
    pub stale_after_ms: u64,
    /// With no message for this long, a replay request checks the publisher.
    pub heartbeat_ms: u64,
    /// Each replay reply must arrive within this.
    pub replay_timeout_ms: u64,
    /// Per replica, by its `host:port` key: explicit endpoints, overriding
    /// the port rules (replicas sharing a host, such as a static pool of
    /// simulated replicas started with ephemeral ports).
    pub endpoints: BTreeMap<String, ReplicaEvents>,
    /// Where the prompt's token ids come from: unset, the gateway's own
    /// token rule (right for `infergate sim` only); set, the engine's own
    /// tokenizer and chat template, asked off the request path
    /// (`engine_tokens`). Real engines need it.
    pub tokenize: Option<TokenizeConfig>,
}

/// One replica's event endpoints, `tcp://host:port`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaEvents {
    pub endpoint: String,
    #[serde(default)]
    pub replay_endpoint: Option<String>,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        KvEventsConfig {
            port: 5557,
            port_offset: None,
            replay_port: None,
            replay_port_offset: None,
            topic: String::new(),
            stale_after_ms: 5000,
            heartbeat_ms: 1000,
            replay_timeout_ms: 500,
            endpoints: BTreeMap::new(),
            tokenize: None,
        }
    }
}

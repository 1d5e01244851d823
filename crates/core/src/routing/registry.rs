//! The registry of the inference-aware policy's plugins: every filter and
//! scorer by the name a pool's `routing:` config gives it (`filters:
//! [saturation, ...]`, `scorers: [{scorer: ttft, weight: 2}]`), with the value
//! that implements it. The policy builds its chain from here
//! ([`Pipeline`](super::pipeline::Pipeline)), in the order and with the weights
//! the config lists.
//!
//! # Adding a scorer
//! 1. Write `scorers/NAME.rs` with a type implementing
//!    [`Scorer`](super::framework::Scorer) (each candidate's score in [0, 1],
//!    1 = best), or [`Cost`](super::scorers::Cost) for a value to minimise,
//!    scored relative to the lowest (`scorers/ttft.rs` is one), and declare it
//!    in `scorers/mod.rs` (`pub(super) mod NAME;`).
//! 2. Register it: one line in [`ScorerName`] below,
//!    `Variant = "config_name" => scorers::NAME::Type,` (with a doc line above
//!    it, as the others have).
//!
//! It is then usable as `scorers: [{scorer: config_name, weight: 1}]`.
//!
//! # Adding a filter
//! The same with `filters/NAME.rs`, the [`Filter`](super::framework::Filter)
//! trait (drop candidates by clearing `alive`; keep them all rather than drop
//! every one) and a line in [`FilterName`]. Filters run in the order the
//! config lists them (the default list is in `RoutingConfig::default`).
//!
//! Plugins read a [`Candidate`](super::framework::Candidate) per replica and
//! the request's [`Ctx`](super::framework::Ctx); a plugin that needs a value
//! they lack adds a field there and fills it in `aware.rs` (new tunables go
//! in `policy_config.rs`).

use serde::{Deserialize, Serialize};

use super::filters;
use super::framework::{Filter, Scorer};
use super::scorers;

/// Declares a name enum (as the config spells each name) and the constructor
/// of the plugin each name stands for; one line per plugin.
macro_rules! registry {
    (
        $(#[$meta:meta])*
        pub enum $names:ident: $plugin:ident {
            $( $(#[$doc:meta])* $variant:ident = $config:literal => $value:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
        pub enum $names {
            $( $(#[$doc])* #[serde(rename = $config)] $variant, )*
        }

        /// As the config spells it.
        impl Serialize for $names {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl $names {
            /// The name as the config spells it.
            pub(super) fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $config, )*
                }
            }

            /// A new instance of the plugin this name stands for.
            pub(super) fn build(self) -> Box<dyn $plugin> {
                match self {
                    $( Self::$variant => Box::new($value), )*
                }
            }
        }
    };
}

registry! {
    /// The filters of the inference-aware policy (`routing.filters`).
    pub enum FilterName: Filter {
        /// Drop replicas that are saturated or whose signals are unknown/stale.
        Saturation = "saturation" => filters::saturation::Saturation,
        /// For adapter requests, keep replicas with the adapter in use (else sent
        /// there recently, else with room to load it).
        Lora = "lora" => filters::lora::Lora,
        /// Keep the replicas holding (nearly) the longest prefix unless that costs
        /// more TTFT than the margin.
        PrefixAffinity = "prefix_affinity" => filters::prefix_affinity::PrefixAffinity,
        /// For a prefix no replica holds, keep the rendezvous-hash choice within the load bound.
        Rendezvous = "rendezvous" => filters::rendezvous::Rendezvous,
    }
}

registry! {
    /// The scorers of the inference-aware policy (`routing.scorers`).
    pub enum ScorerName: Scorer {
        /// Estimated time to first token: queued prefill + this prompt's uncached part.
        Ttft = "ttft" => scorers::ttft::Ttft,
        /// Estimated tokens in flight (prompt + output).
        TokenLoad = "token_load" => scorers::token_load::TokenLoad,
        /// Requests in flight (own count or engine running + waiting, whichever is larger).
        Requests = "requests" => scorers::requests::Requests,
        /// Engine-reported waiting requests.
        Queue = "queue" => scorers::queue::Queue,
        /// 1 − KV-cache usage.
        KvCache = "kv_cache" => scorers::kv_cache::KvCache,
        /// Fraction of the prompt's blocks cached.
        Prefix = "prefix" => scorers::prefix::Prefix,
    }
}

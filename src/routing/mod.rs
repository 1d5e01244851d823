//! Routing: which replica of a pool serves a request.
//!
//! The data plane asks a [`Picker`] for a replica, passing what routing needs
//! about the request ([`RouteRequest`]) and the replicas already tried (a retry
//! never goes back to a replica that just failed). Pickers are chosen per pool
//! from the config; the simple ones live in [`simple`].

pub mod simple;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::pool::Replica;

/// What routing knows about one request.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub request_id: &'a str,
    /// The model name as sent upstream (after alias/canary/fallback rewriting).
    pub model: &'a str,
    /// The rendered prompt text (see `protocol::prompt`).
    pub prompt_text: &'a str,
    pub prompt_tokens: u32,
    /// Expected output tokens (`max_tokens` or the route default).
    pub max_tokens: u32,
    /// LoRA adapter requested, when the model name is an adapter.
    pub lora: Option<&'a str>,
}

/// Picks one replica for a request.
pub trait Picker: Send + Sync + std::fmt::Debug {
    /// Returns a replica from `replicas` that is not in `exclude` (compared by
    /// key), or `None` when none can take it.
    fn pick(
        &self,
        replicas: &[Arc<Replica>],
        req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
    ) -> Option<Arc<Replica>>;
}

/// Per-pool routing configuration (`routing:` in a route's YAML).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// `least_request` (default until the inference-aware picker lands),
    /// `round_robin`, `random`.
    #[serde(default)]
    pub policy: PolicyName,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyName {
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
}

/// Builds the picker a routing config names.
pub fn build_picker(cfg: &RoutingConfig) -> Arc<dyn Picker> {
    match cfg.policy {
        PolicyName::LeastRequest => Arc::new(simple::LeastRequest),
        PolicyName::RoundRobin => Arc::new(simple::RoundRobin::default()),
        PolicyName::Random => Arc::new(simple::Random),
    }
}

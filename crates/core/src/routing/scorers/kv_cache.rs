//! The `kv_cache` scorer: the emptier KV cache, the better.

use crate::routing::framework::{Candidate, Ctx, Scorer};

/// 1 − KV-cache usage.
#[derive(Debug)]
pub(crate) struct KvCache;

impl Scorer for KvCache {
    fn score(&self, c: &Candidate, _reference: f64, _ctx: &Ctx<'_>) -> f64 {
        1.0 - c.kv_usage.clamp(0.0, 1.0)
    }
}

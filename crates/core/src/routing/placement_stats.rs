//! Where requests whose prefix is cached somewhere went, and why not to the
//! holder: counts per decision of the default policy, shown in `/routing` as
//! `placement`, so a fleet hit rate below what one shared cache would get can be
//! traced to its cause (a second copy made by a spill, or a cold placement).

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

/// Why a request whose prefix some replica held went elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spill {
    /// No holder had room (admission's `fits`: cap, budget, pacing).
    Admission,
    /// A filter dropped the holder (named in the counters).
    Filter(&'static str),
    /// The holder stayed a candidate and lost on score.
    Score,
}

/// Relaxed counters: read only for `/routing`, never to decide.
#[derive(Debug, Default)]
pub(crate) struct PlacementStats {
    decisions: AtomicU64,
    /// No replica held the prompt's first rendezvous blocks: placed as new.
    cold: AtomicU64,
    cold_tokens: AtomicU64,
    /// Sent to a replica holding (nearly) the longest cached prefix.
    to_holder: AtomicU64,
    cached_tokens: AtomicU64,
    spills: [SpillCount; 5],
}

#[derive(Debug, Default)]
struct SpillCount {
    requests: AtomicU64,
    /// Prompt tokens the holder had cached that the chosen one prefills again.
    reprefill_tokens: AtomicU64,
}

const SPILL_NAMES: [&str; 5] = [
    "admission",
    "saturation",
    "prefix_affinity",
    "other_filter",
    "score",
];

impl PlacementStats {
    fn slot(spill: Spill) -> usize {
        match spill {
            Spill::Admission => 0,
            Spill::Filter("saturation") => 1,
            Spill::Filter("prefix_affinity") => 2,
            Spill::Filter(_) => 3,
            Spill::Score => 4,
        }
    }

    pub(crate) fn cold(&self, uncached_tokens: u64) {
        self.decisions.fetch_add(1, Ordering::Relaxed);
        self.cold.fetch_add(1, Ordering::Relaxed);
        self.cold_tokens
            .fetch_add(uncached_tokens, Ordering::Relaxed);
    }

    pub(crate) fn to_holder(&self, cached_tokens: u64) {
        self.decisions.fetch_add(1, Ordering::Relaxed);
        self.to_holder.fetch_add(1, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(cached_tokens, Ordering::Relaxed);
    }

    pub(crate) fn spilled(&self, why: Spill, reprefill_tokens: u64) {
        self.decisions.fetch_add(1, Ordering::Relaxed);
        let s = &self.spills[Self::slot(why)];
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.reprefill_tokens
            .fetch_add(reprefill_tokens, Ordering::Relaxed);
    }

    pub(crate) fn view(&self) -> Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let spilled: serde_json::Map<String, Value> = SPILL_NAMES
            .iter()
            .zip(&self.spills)
            .map(|(name, s)| {
                (
                    (*name).to_owned(),
                    json!({ "requests": get(&s.requests), "reprefill_tokens": get(&s.reprefill_tokens) }),
                )
            })
            .collect();
        json!({
            "decisions": get(&self.decisions),
            "cold": { "requests": get(&self.cold), "prefill_tokens": get(&self.cold_tokens) },
            "to_holder": { "requests": get(&self.to_holder), "cached_tokens": get(&self.cached_tokens) },
            "spilled": spilled,
        })
    }
}

//! Where requests whose prefix is cached somewhere went, and why not to the
//! holder: counts per decision of the default policy, shown in `/routing` as
//! `placement`, so a fleet hit rate below what one shared cache would get can be
//! traced to its cause (a second copy made by a spill, or a cold placement).

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use super::{NoRoom, Refusal};

/// Why a request whose prefix some replica held went elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spill {
    /// No holder had room: admission's `fits` refused the holder, by this
    /// bound (`None` when the refused holder was not seen, e.g. a picker
    /// deciding without admission).
    Admission(Option<Refusal>),
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
    /// Admission's spills by the bound that refused the holder (`NoRoom`
    /// order), on arrival `[0]` or on a queue turn `[1]`.
    admission_by: [[SpillCount; 2]; NoRoom::ALL.len()],
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

impl SpillCount {
    fn add(&self, reprefill_tokens: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.reprefill_tokens
            .fetch_add(reprefill_tokens, Ordering::Relaxed);
    }

    fn view(&self) -> Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({ "requests": get(&self.requests), "reprefill_tokens": get(&self.reprefill_tokens) })
    }
}

impl PlacementStats {
    fn slot(spill: Spill) -> usize {
        match spill {
            Spill::Admission(_) => 0,
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
        self.spills[Self::slot(why)].add(reprefill_tokens);
        if let Spill::Admission(Some(r)) = why {
            self.admission_by[r.bound as usize][usize::from(r.queued)].add(reprefill_tokens);
        }
    }

    pub(crate) fn view(&self) -> Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut spilled: serde_json::Map<String, Value> = SPILL_NAMES
            .iter()
            .zip(&self.spills)
            .map(|(name, s)| ((*name).to_owned(), s.view()))
            .collect();
        let by_bound: serde_json::Map<String, Value> = NoRoom::ALL
            .iter()
            .zip(&self.admission_by)
            .map(|(b, [arrival, queued])| {
                (
                    b.as_str().to_owned(),
                    json!({ "arrival": arrival.view(), "queued": queued.view() }),
                )
            })
            .collect();
        if let Some(Value::Object(a)) = spilled.get_mut("admission") {
            a.insert("by_bound".into(), Value::Object(by_bound));
        }
        json!({
            "decisions": get(&self.decisions),
            "cold": { "requests": get(&self.cold), "prefill_tokens": get(&self.cold_tokens) },
            "to_holder": { "requests": get(&self.to_holder), "cached_tokens": get(&self.cached_tokens) },
            "spilled": spilled,
        })
    }
}

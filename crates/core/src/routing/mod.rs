//! Routing: which replica of a pool serves a request.
//!
//! The data plane asks a [`Picker`] for a replica, passing what routing needs
//! about the request ([`RouteRequest`]) and the replicas already tried (a retry
//! never goes back to a replica that just failed). Pickers are chosen per pool
//! from the config: the inference-aware default (`aware`: replica signals from
//! [`scrape`], the approximate `prefix_index` or, where the engines publish
//! KV-cache events, the precise index of [`kv_events`], and the filters and scorers of
//! `filters/` and `scorers/`, registered by name in `registry`, run by
//! `pipeline`) or a simple one (`simple`).
//!
//! Use [`Picker::pick_fitting_and_begin`] on the request path: it picks among
//! the replicas admission says have room and starts the chosen one's load
//! accounting in one step, with the picker's estimate of the uncached
//! prefill, so no path can route without counting load.

mod aware;
pub(crate) mod config;
mod filters;
mod framework;
pub mod kv_events;
mod pipeline;
mod placement_stats;
mod policy_config;
mod prefix_index;
mod registry;
mod scorers;
pub(crate) mod scrape;
pub(crate) mod signals;
pub(crate) mod simple;

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

pub use aware::InferenceAware;
pub use config::{PolicyName, RoutingConfig, ScrapeConfig};
pub use scrape::Scrapers;
pub use signals::Signals;

use crate::pool::{LoadGuard, Replica};
use infergate_protocol::tokenizer;

/// What routing knows about one request.
#[derive(Debug, Clone)]
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
    /// The prompt's block hashes, computed once (see [`RouteRequest::block_hashes`]).
    pub hashes: PromptHashes,
}

/// A request's prompt block hashes with the (block size, most blocks) they
/// were computed for, and its token-block keys for the precise index with
/// (block size, seed, most blocks): a queued request tries again, a retry
/// places it anew; all of them reuse one hashing of the prompt.
#[derive(Debug, Clone, Default)]
pub struct PromptHashes {
    text: OnceLock<(usize, usize, Vec<u64>)>,
    tokens: OnceLock<(usize, u64, usize, Vec<u64>)>,
}

impl RouteRequest<'_> {
    /// The estimated total cost of the request in tokens (prompt + expected output).
    pub fn estimated_tokens(&self) -> u64 {
        u64::from(self.prompt_tokens) + u64::from(self.max_tokens)
    }

    /// The prompt's chained block hashes (`tokenizer::block_hashes` with the
    /// model's seed): computed on first use, reused by later calls with the same
    /// parameters (another pool's picker with other ones hashes anew).
    pub fn block_hashes(&self, block_size: usize, max_blocks: usize) -> Cow<'_, [u64]> {
        let compute = || {
            tokenizer::block_hashes(
                self.prompt_text,
                block_size,
                tokenizer::model_seed(self.model),
                max_blocks,
            )
        };
        let (bs, max, hashes) = self
            .hashes
            .text
            .get_or_init(|| (block_size, max_blocks, compute()));
        if (*bs, *max) == (block_size, max_blocks) {
            Cow::Borrowed(hashes)
        } else {
            Cow::Owned(compute())
        }
    }

    /// The prompt's token-block keys (`tokenizer::for_each_token_block_key`)
    /// for the precise index: computed on first use, reused like
    /// [`block_hashes`](Self::block_hashes).
    pub fn token_block_keys(
        &self,
        block_size: usize,
        seed: u64,
        max_blocks: usize,
    ) -> Cow<'_, [u64]> {
        let compute = || {
            let mut keys = Vec::with_capacity(
                (self.prompt_tokens as usize / block_size.max(1)).min(max_blocks),
            );
            tokenizer::for_each_token_block_key(self.prompt_text, block_size, seed, |k| {
                if keys.len() >= max_blocks {
                    return false;
                }
                keys.push(k);
                true
            });
            keys
        };
        let (bs, sd, max, keys) = self
            .hashes
            .tokens
            .get_or_init(|| (block_size, seed, max_blocks, compute()));
        if (*bs, *sd, *max) == (block_size, seed, max_blocks) {
            Cow::Borrowed(keys)
        } else {
            Cow::Owned(compute())
        }
    }
}

/// Whether a replica has room for a request, given the prompt tokens the
/// picker expects it to hold cached already (it then needs room only for the
/// rest); if not, which bound refused it.
pub type Fits<'a> = dyn Fn(&Replica, u64) -> Result<(), Refusal> + 'a;

/// Why admission gave a replica no room for a request: the bound, and whether
/// the request was placing itself on a queue turn (a release somewhere woke
/// it) rather than on arrival. Counted against the prefix holder in
/// `/routing`'s `placement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub bound: NoRoom,
    pub queued: bool,
}

/// The admission bound that refused a replica, in the order they are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// Ejected, excluded, ramping up cold, or its metrics unread.
    Unavailable,
    /// `max_connections_per_replica`.
    Connections,
    /// The request cap (the learned batch, plus the prefix holder's pass).
    RequestCap,
    /// Room left only in the share kept for critical requests (request cap
    /// or KV budget).
    CriticalReserve,
    /// Prefill tokens pending on the replica (the prefill cap, plus the
    /// prefix holder's pass).
    PrefillCap,
    /// The KV token budget.
    KvBudget,
    /// The pacing of queued starts.
    Pacing,
}

impl NoRoom {
    pub const ALL: [NoRoom; 7] = [
        NoRoom::Unavailable,
        NoRoom::Connections,
        NoRoom::RequestCap,
        NoRoom::CriticalReserve,
        NoRoom::PrefillCap,
        NoRoom::KvBudget,
        NoRoom::Pacing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NoRoom::Unavailable => "unavailable",
            NoRoom::Connections => "connections",
            NoRoom::RequestCap => "request_cap",
            NoRoom::CriticalReserve => "critical_reserve",
            NoRoom::PrefillCap => "prefill_cap",
            NoRoom::KvBudget => "kv_budget",
            NoRoom::Pacing => "pacing",
        }
    }
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

    /// Picks among the replicas of `replicas` not in `exclude` that `fits`
    /// accepts, and starts the chosen one's load accounting for this request;
    /// `None` when none fits. The guard must live until the response ends;
    /// call `prefill_done` on it at the first response byte. Pickers that know
    /// how much of the prompt each replica caches pass it to `fits` and
    /// account only the uncached part as prefill; the others pass 0.
    fn pick_fitting_and_begin(
        &self,
        replicas: &[Arc<Replica>],
        req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
        fits: &Fits<'_>,
    ) -> Option<LoadGuard> {
        let fitting: Vec<Arc<Replica>> = replicas
            .iter()
            .filter(|r| !is_excluded(r, exclude) && fits(r, 0).is_ok())
            .cloned()
            .collect();
        let r = self.pick(&fitting, req, exclude)?;
        Some(r.begin(req.estimated_tokens(), u64::from(req.prompt_tokens)))
    }

    /// The pool's membership changed: forget state about replicas not in `present`.
    fn forget_absent(&self, _present: &[Arc<Replica>]) {}

    /// The admin view of this picker over `replicas` (signals, load, last scores).
    fn admin_view(&self, replicas: &[Arc<Replica>]) -> serde_json::Value {
        aware::replicas_view(replicas, None)
    }

    /// Why request `request_id` went where it went, if still remembered.
    fn explain(&self, _request_id: &str) -> Option<serde_json::Value> {
        None
    }

    /// The last `n` decisions this picker remembers, newest first, each in
    /// brief (request id, chosen replica, reason, prompt and cached tokens).
    fn recent_decisions(&self, _n: usize) -> Vec<serde_json::Value> {
        Vec::new()
    }

    /// The precise prefix index this picker routes by, and where its
    /// replicas publish their KV events (`routing.kv_events`).
    fn kv_events(&self) -> Option<(Arc<kv_events::PreciseIndex>, kv_events::KvEventsConfig)> {
        None
    }
}

/// Whether `replica` is one of `exclude` (compared by key).
fn is_excluded(replica: &Replica, exclude: &[Arc<str>]) -> bool {
    exclude.iter().any(|k| **k == *replica.key())
}

/// Builds the picker a routing config names.
pub fn build_picker(cfg: &RoutingConfig) -> Arc<dyn Picker> {
    match cfg.policy {
        PolicyName::InferenceAware => Arc::new(InferenceAware::new(cfg.clone())),
        PolicyName::LeastRequest => Arc::new(simple::LeastRequest),
        PolicyName::RoundRobin => Arc::new(simple::RoundRobin::default()),
        PolicyName::Random => Arc::new(simple::Random),
        PolicyName::PowerOfTwo => Arc::new(simple::PowerOfTwo),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> RouteRequest<'_> {
        RouteRequest {
            request_id: "r",
            model: "m",
            prompt_text: text,
            prompt_tokens: tokenizer::count_tokens(text),
            max_tokens: 8,
            lora: None,
            hashes: Default::default(),
        }
    }

    #[test]
    fn prompt_hashes_are_computed_once_per_parameters() {
        let text = "word ".repeat(400);
        let req = request(&text);
        let seed = tokenizer::model_seed("m");
        let first = req.block_hashes(16, 1024);
        assert_eq!(
            &*first,
            tokenizer::block_hashes(&text, 16, seed, 1024).as_slice()
        );
        // Same parameters: the stored hashes, not a new computation.
        assert!(matches!(req.block_hashes(16, 1024), Cow::Borrowed(_)));
        assert_eq!(req.block_hashes(16, 1024), first);
        // Other parameters (another pool's picker): computed for them.
        let other = req.block_hashes(32, 4);
        assert!(matches!(other, Cow::Owned(_)));
        assert_eq!(
            &*other,
            tokenizer::block_hashes(&text, 32, seed, 4).as_slice()
        );
        assert_ne!(other, first);
    }
}

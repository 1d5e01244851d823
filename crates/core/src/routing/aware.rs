//! The inference-aware picker (the default policy): sticky until saturated,
//! with rendezvous placement of new prefixes and LoRA affinity.
//!
//! For each request it builds one [`Candidate`] per allowed replica from three
//! sources: the gateway's own accounting (always current), the replica's last
//! scrape (unknown or stale = saturated) and a prefix index: the precise one
//! (`kv_events`, what the engine itself reported caching) for replicas whose
//! event stream is live, else the approximate one (how many leading blocks of
//! this prompt were recently sent there). It then runs
//! the configured filters and weighted scorers (a [`Pipeline`] built from the
//! registry), takes the best score (ties broken by rendezvous weight, so
//! independent gateways agree), records the prompt's blocks for the chosen
//! replica and starts its load accounting with the uncached prefill.
//!
//! Under admission, one prefix lookup serves both questions: how much of the
//! prompt each replica holds (so admission can ask whether the rest fits
//! there) and which of the replicas that fit is best.
//!
//! Estimated TTFT on a replica = (prefill tokens queued there + the uncached part
//! of this prompt) / prefill rate. Queued prefill is the larger of the gateway's
//! own not-yet-answered prefill tokens and the engine's waiting count times the
//! mean uncached prompt (other gateways' requests show up only there).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use smallvec::SmallVec;
use xxhash_rust::xxh3::xxh3_64;

use super::config::{FilterName, RoutingConfig};
use super::framework::{Candidate, Ctx, Fixed};
use super::kv_events::{key_seed, EngineTokens, KvEventsConfig, PreciseIndex};
use super::pipeline::{FilterOutcome, Outcomes, Pipeline};
use super::placement_stats::{PlacementStats, Spill};
use super::prefix_index::PrefixIndex;
use super::signals::Signals;
use super::{Fits, NoRoom, Picker, Refusal, RouteRequest};
use crate::pool::{LoadGuard, Replica, Routability, RoutabilityCheck};

/// Why one request went where it went. Kept as numbers: the one-line
/// reason and the filters' details are formatted only when something reads
/// the decision (`/explain`, the status page), not on every request. Once
/// the log is full, a new decision is written over the oldest one's buffers.
#[derive(Debug, Clone, Default)]
pub(super) struct Decision {
    pub request_id: String,
    pub chosen: Arc<str>,
    /// The chosen one among `candidates`.
    pub chosen_candidate: usize,
    pub prompt_tokens: u32,
    pub prompt_blocks: u32,
    pub cached_tokens: u32,
    pub filters: Outcomes,
    pub candidates: Vec<CandidateView>,
}

impl Decision {
    /// A one-line reason naming the filter that decided, else the scores.
    pub fn reason(&self) -> String {
        reason(&self.candidates[self.chosen_candidate], &self.filters)
    }
}

impl Serialize for Decision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            request_id: &'a str,
            chosen: &'a str,
            reason: String,
            prompt_tokens: u32,
            prompt_blocks: u32,
            cached_tokens: u32,
            filters: &'a [FilterOutcome],
            candidates: &'a [CandidateView],
        }
        View {
            request_id: &self.request_id,
            chosen: &self.chosen,
            reason: self.reason(),
            prompt_tokens: self.prompt_tokens,
            prompt_blocks: self.prompt_blocks,
            cached_tokens: self.cached_tokens,
            filters: &self.filters,
            candidates: &self.candidates,
        }
        .serialize(s)
    }
}

/// A candidate in a [`Decision`].
#[derive(Debug, Clone, Serialize)]
pub(super) struct CandidateView {
    pub replica: Arc<str>,
    pub matched_blocks: u32,
    /// Which index answered `matched_blocks`: "precise" or "approximate".
    pub prefix_index: &'static str,
    pub est_ttft_ms: f64,
    pub load_requests: f64,
    pub placement_load: f64,
    pub token_load: f64,
    pub waiting: f64,
    pub running: f64,
    pub kv_usage: f64,
    pub fresh: bool,
    pub saturated: bool,
    pub lora_tier: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_by: Option<&'static str>,
    pub score: f64,
}

/// The default picker.
#[derive(Debug)]
pub struct InferenceAware {
    cfg: RoutingConfig,
    pipeline: Pipeline,
    index: PrefixIndex,
    /// The precise index, when `routing.kv_events` is set.
    precise: Option<Arc<PreciseIndex>>,
    /// EWMA of uncached prompt tokens per request (f64 bits).
    mean_uncached: AtomicU64,
    decisions: Mutex<VecDeque<Arc<Decision>>>,
    total_decisions: AtomicU64,
    /// Where requests with a cached prefix went, and why not to the holder.
    placement: PlacementStats,
    /// Adapter -> replicas this picker recently sent it to (newest last).
    lora_homes: Mutex<LoraHomes>,
}

/// Adapter -> (replica, when sent) pairs.
type LoraHomes = HashMap<Arc<str>, Vec<(Arc<str>, Instant)>>;

/// How long a replica counts as holding an adapter we sent it.
const LORA_MEMORY: Duration = Duration::from_secs(300);
/// Replicas remembered per adapter, and adapters remembered at most.
const LORA_HOMES: usize = 4;
const LORA_ADAPTERS: usize = 4096;

impl InferenceAware {
    pub fn new(cfg: RoutingConfig) -> Self {
        InferenceAware {
            pipeline: Pipeline::new(&cfg.filters, &cfg.scorers),
            precise: cfg.kv_events.as_ref().map(|k| {
                Arc::new(match &k.tokenize {
                    Some(t) => {
                        PreciseIndex::with_engine_tokens(Arc::new(EngineTokens::new(t.clone())))
                    }
                    None => PreciseIndex::new(),
                })
            }),
            cfg,
            index: PrefixIndex::new(),
            mean_uncached: AtomicU64::new(0f64.to_bits()),
            decisions: Mutex::new(VecDeque::new()),
            total_decisions: AtomicU64::new(0),
            placement: PlacementStats::default(),
            lora_homes: Mutex::new(HashMap::new()),
        }
    }

    pub fn index(&self) -> &PrefixIndex {
        &self.index
    }

    /// The precise index (`routing.kv_events` set).
    pub fn precise_index(&self) -> Option<&Arc<PreciseIndex>> {
        self.precise.as_ref()
    }

    fn block_size(&self) -> u32 {
        self.cfg.prefix.block_size.max(1)
    }

    /// Picks, without admission, and starts the replica's load accounting
    /// with the uncached prefill (benchmarks and tests; the request path uses
    /// [`Picker::pick_fitting_and_begin`]).
    pub fn pick_and_begin(
        &self,
        replicas: &[Arc<Replica>],
        req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
    ) -> Option<LoadGuard> {
        let (i, uncached) = self.decide_among(replicas, req, exclude)?;
        Some(self.begin(&replicas[i], req, uncached))
    }

    /// Prompt tokens of `req` each of `replicas` is expected to hold in its
    /// cache already (same order).
    #[cfg(test)]
    fn cached_prompt_tokens(&self, replicas: &[Arc<Replica>], req: &RouteRequest<'_>) -> Vec<u64> {
        let hashes = self.hashes(req);
        self.matched_blocks(replicas, req, &hashes)
            .into_iter()
            .map(|m| self.cached_tokens(m.blocks, req))
            .collect()
    }

    /// The prompt's block hashes for the approximate index. When the precise
    /// index cuts blocks at the same size from the gateway's own token ids,
    /// they are its keys (chained over token ids and the LoRA adapter, as the
    /// engine keys its cache): one chain keys both indexes, so a request
    /// hashes its prompt once (`matched_blocks` then finds the keys computed).
    fn hashes<'r>(&self, req: &'r RouteRequest<'_>) -> Cow<'r, [u64]> {
        let (bs, max) = (
            self.block_size() as usize,
            self.cfg.prefix.max_blocks as usize,
        );
        match &self.precise {
            Some(p) if p.block_size() as usize == bs && p.engine_tokens().is_none() => {
                req.token_block_keys(bs, key_seed(req.lora), max)
            }
            _ => req.block_hashes(bs, max),
        }
    }

    /// Leading blocks of `hashes` each of `replicas` holds (same order): the
    /// precise index answers for each replica whose events are live
    /// (converted from the engine's block size to ours), the approximate
    /// index for the others (skipped when every replica is live: its lookup
    /// is a fifth of a decision over a long prompt).
    fn matched_blocks(
        &self,
        replicas: &[Arc<Replica>],
        req: &RouteRequest<'_>,
        hashes: &[u64],
    ) -> PerReplica<Matched> {
        let mut matched = PerReplica::from_elem(Matched::default(), replicas.len());
        let positions = KeyPositions::new(replicas);
        let position = |key: &Arc<str>| positions.find(key);
        let live = match &self.precise {
            Some(precise) => self.precise_matches(precise, req, hashes, &position, &mut matched),
            None => 0,
        };
        if live < replicas.len() {
            self.index
                .longest_prefix(hashes, &mut |key: &Arc<str>, blocks: u32| {
                    // A live replica's events stand, none included: the
                    // approximate index's match there (what this gateway
                    // sent, perhaps evicted since) would make a stale holder.
                    if let Some(i) = position(key).filter(|i| !matched[*i].precise) {
                        matched[i].blocks = blocks;
                    }
                });
        }
        matched
    }

    /// The precise index's part of [`matched_blocks`](Self::matched_blocks):
    /// fills `matched` for each replica whose events are live and returns
    /// how many of `replicas` those are (0 when the engine's own token ids
    /// for this prompt are not fetched yet: the approximate index answers).
    fn precise_matches(
        &self,
        precise: &PreciseIndex,
        req: &RouteRequest<'_>,
        hashes: &[u64],
        position: &impl Fn(&Arc<str>) -> Option<usize>,
        matched: &mut [Matched],
    ) -> usize {
        let engine_bs = precise.block_size() as usize;
        let bs = self.block_size() as usize;
        // The same token horizon as the approximate index; no block size
        // known yet (no event): no keys, every live replica matches 0.
        let max = (self.cfg.prefix.max_blocks as usize * bs).checked_div(engine_bs);
        let seed = key_seed(req.lora);
        let entry;
        let keys = match (precise.engine_tokens(), max) {
            (Some(tokens), _) => {
                // The engine's own ids, when a prefix of this prompt was
                // fetched; else the approximate index answers (and the
                // prefixes are queued for fetching).
                entry = tokens.lookup(req.model, req.prompt_text);
                match (&entry, max) {
                    (Some(e), Some(max)) => e.keys(engine_bs, seed, max),
                    (Some(_), None) => Cow::Borrowed(&[][..]),
                    (None, _) => return 0,
                }
            }
            (None, Some(max)) => req.token_block_keys(engine_bs, seed, max),
            (None, None) => Cow::Borrowed(&[][..]),
        };
        let mut live = 0;
        precise.longest_prefix(&keys, |key, engine_blocks| {
            if let Some(i) = position(key) {
                let ours = (engine_blocks as usize * engine_bs / bs).min(hashes.len());
                matched[i].blocks = ours as u32;
                matched[i].precise = true;
                live += 1;
            }
        });
        precise.cache_state(Instant::now(), |key, held, evictions_per_s| {
            if let Some(i) = position(key) {
                matched[i].held_tokens = Some(u64::from(held) * engine_bs as u64);
                matched[i].evicted_tokens_per_s = evictions_per_s * engine_bs as f64;
            }
        });
        live
    }

    /// Prompt tokens held by a replica holding `blocks` leading blocks of it.
    fn cached_tokens(&self, blocks: u32, req: &RouteRequest<'_>) -> u64 {
        (u64::from(blocks) * u64::from(self.block_size())).min(u64::from(req.prompt_tokens))
    }

    /// [`decide`](Self::decide) over all of `replicas` but `exclude`.
    fn decide_among(
        &self,
        replicas: &[Arc<Replica>],
        req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
    ) -> Option<(usize, u32)> {
        let hashes = self.hashes(req);
        let matched = self.matched_blocks(replicas, req, &hashes);
        let longest = longest_match(replicas, exclude, &matched);
        self.decide(replicas, req, exclude, &hashes, &matched, longest, None)
    }

    /// Starts `replica`'s load accounting for `req`, `uncached` of its prompt
    /// tokens to prefill.
    fn begin(&self, replica: &Arc<Replica>, req: &RouteRequest<'_>, uncached: u32) -> LoadGuard {
        let cached = req.prompt_tokens.saturating_sub(uncached);
        replica
            .begin(req.estimated_tokens(), u64::from(uncached))
            .with_cached_tokens(u64::from(cached))
    }

    /// The decision itself, over `replicas` (less `exclude`) holding
    /// `matched` leading blocks of the prompt's `hashes` (same order): (index
    /// of the chosen replica, its uncached tokens). `longest` is the longest
    /// match among all the pool's replicas, those admission left out included;
    /// `refused`, why admission left out the one holding the most.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        replicas: &[Arc<Replica>],
        req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
        hashes: &[u64],
        matched: &[Matched],
        longest: u32,
        refused: Option<Refusal>,
    ) -> Option<(usize, u32)> {
        let bs = self.block_size();
        let group_at = (self.cfg.rendezvous.blocks.max(1) as usize)
            .min(hashes.len())
            .checked_sub(1);
        let group_key = group_at.and_then(|i| hashes.get(i)).copied();
        let explain = self.cfg.explain_buffer > 0;
        let lora = req.lora.or_else(|| {
            replicas
                .iter()
                .any(|r| {
                    r.signals
                        .load()
                        .as_ref()
                        .and_then(|s| s.lora.as_ref())
                        .is_some_and(|l| l.is_resident(req.model) || l.is_loading(req.model))
                })
                .then_some(req.model)
                .or_else(|| self.lora_seen(req.model).then_some(req.model))
        });
        let ctx = Ctx {
            req,
            saturation: &self.cfg.saturation,
            sticky: &self.cfg.sticky,
            rendezvous: &self.cfg.rendezvous,
            block_size: bs,
            prefill_rate: self.cfg.prefill_tokens_per_sec.max(1.0),
            prompt_blocks: hashes.len() as u32,
            group_key,
            lora,
            explain,
        };
        // Filled in place: a returned array of 8 candidates would be copied.
        let mut cands = PerReplica::new();
        self.candidates(replicas, req, exclude, matched, &ctx, &mut cands);
        if cands.is_empty() {
            return None;
        }
        if let Some(at) = group_at {
            // A prefix group no replica holds yet: the rendezvous filter bounds
            // how many groups each replica gets.
            if cands.iter().all(|c| (c.matched_blocks as usize) <= at) {
                let positions = KeyPositions::new(replicas);
                self.index.group_counts(|key, n| {
                    if let Some(i) = positions.find(key) {
                        if let Some(c) = cands.iter_mut().find(|c| c.idx == i) {
                            c.groups = n;
                        }
                    }
                });
            }
        }
        let mean_uncached = f64::from_bits(self.mean_uncached.load(Ordering::Relaxed));
        // Before any decision, assume a waiting request has half this prompt uncached.
        let per_waiting = if mean_uncached > 0.0 {
            mean_uncached
        } else {
            f64::from(req.prompt_tokens) / 2.0
        };
        for c in cands.iter_mut() {
            let cached = self.cached_tokens(c.matched_blocks, req);
            c.uncached_tokens = req.prompt_tokens - cached as u32;
            let queued_by_engine = c.waiting * per_waiting;
            c.queued_prefill = c.queued_prefill.max(queued_by_engine);
            c.est_ttft_ms =
                (c.queued_prefill + f64::from(c.uncached_tokens)) / ctx.prefill_rate * 1000.0;
        }
        let mut outcomes = Outcomes::new();
        self.pipeline.filter(&mut cands, &ctx, &mut outcomes);
        self.pipeline.score(&mut cands, &ctx);
        let best = cands
            .iter()
            .enumerate()
            .filter(|(_, c)| c.alive)
            .max_by(|(_, a), (_, b)| {
                a.score
                    .total_cmp(&b.score)
                    .then(a.rendezvous.cmp(&b.rendezvous))
            })
            .map(|(i, _)| i)?;
        let chosen = &cands[best];
        let (idx, uncached) = (chosen.idx, chosen.uncached_tokens);
        self.count_placement(&cands, chosen, longest, group_at, req, refused);
        let replica = &replicas[idx];
        let capacity = replica
            .signals
            .load()
            .as_ref()
            .and_then(|s| s.cache_tokens())
            .map_or(self.cfg.prefix.default_replica_blocks, |t| {
                (t / u64::from(bs)).min(u64::from(u32::MAX)) as u32
            });
        self.index
            .record_group(&replica.endpoint.key, hashes, capacity, group_at);
        if let Some(a) = ctx.lora {
            self.remember_lora(a, &replica.endpoint.key);
        }
        let old = f64::from_bits(self.mean_uncached.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            f64::from(uncached)
        } else {
            0.9 * old + 0.1 * f64::from(uncached)
        };
        self.mean_uncached.store(new.to_bits(), Ordering::Relaxed);
        self.total_decisions.fetch_add(1, Ordering::Relaxed);
        if explain {
            self.remember(replicas, req, &ctx, best, &cands, &outcomes);
        }
        Some((idx, uncached))
    }

    /// Counts where the request went against where its prefix is cached
    /// (`/routing`'s `placement`).
    fn count_placement(
        &self,
        cands: &[Candidate],
        chosen: &Candidate,
        longest: u32,
        group_at: Option<usize>,
        req: &RouteRequest<'_>,
        refused: Option<Refusal>,
    ) {
        let stats = &self.placement;
        if group_at.is_none_or(|at| (longest as usize) <= at) {
            stats.cold(u64::from(chosen.uncached_tokens));
            return;
        }
        let threshold = self.cfg.sticky.holder_threshold(longest).unwrap_or(1);
        if chosen.matched_blocks >= threshold {
            stats.to_holder(self.cached_tokens(chosen.matched_blocks, req));
            return;
        }
        let lost = self
            .cached_tokens(longest, req)
            .saturating_sub(self.cached_tokens(chosen.matched_blocks, req));
        let holder = cands
            .iter()
            .filter(|c| c.matched_blocks >= threshold)
            .max_by_key(|c| c.matched_blocks);
        let why = match holder {
            None => Spill::Admission(refused),
            Some(h) => h.dropped_by.map_or(Spill::Score, Spill::Filter),
        };
        stats.spilled(why, lost);
    }

    /// How this picker judges replicas (`pool::RoutabilityCheck`): by this
    /// request's exclusions and, when it scrapes, by its signals' freshness.
    /// Admission already left out ejected replicas.
    fn routability<'a>(&self, exclude: &'a [Arc<str>], now: Instant) -> RoutabilityCheck<'a> {
        let check = RoutabilityCheck::new(&[], exclude);
        if self.cfg.scrape.enabled {
            check.judging_signals(now, Duration::from_millis(self.cfg.scrape.stale_after_ms))
        } else {
            check
        }
    }

    fn candidates(
        &self,
        replicas: &[Arc<Replica>],
        req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
        matched: &[Matched],
        ctx: &Ctx<'_>,
        out: &mut PerReplica<Candidate>,
    ) {
        let now = Instant::now();
        let stale = Duration::from_millis(self.cfg.scrape.stale_after_ms);
        let sat = &self.cfg.saturation;
        let shared_window = Duration::from_millis(self.cfg.rendezvous.shared_window_ms);
        let lora_homes = ctx.lora.map(|a| self.lora_homes(a)).unwrap_or_default();
        let rotation = if ctx.group_key.is_none() {
            self.total_decisions.load(Ordering::Relaxed) as usize
        } else {
            0
        };
        let check = self.routability(exclude, now);
        out.reserve(replicas.len());
        for (idx, r) in replicas.iter().enumerate() {
            let sig = r.signals.load();
            let sig: Option<&Arc<Signals>> = sig.as_ref();
            let fresh = match check.of_with_signals(r, sig.map(Arc::as_ref)) {
                Routability::Routable => true,
                Routability::LoadUnknown => false,
                Routability::Excluded | Routability::Ejected => continue,
            };
            // With scraping on, "routable" already means fresh signals: do not
            // judge their age twice.
            let fresh_sig = match (self.cfg.scrape.enabled, fresh) {
                (true, true) => sig,
                (true, false) => None,
                (false, _) => sig.filter(|s| s.is_fresh(now, stale)),
            };
            let own_requests = r.load.requests();
            let (waiting, running, kv) = fresh_sig.map_or((0.0, 0.0, 0.0), |s| {
                (
                    s.projected_waiting(own_requests),
                    s.running,
                    s.kv_usage.unwrap_or(0.0),
                )
            });
            let saturated = !fresh || waiting >= sat.max_waiting || kv >= sat.max_kv_usage;
            let lora_tier = match (ctx.lora, fresh_sig.and_then(|s| s.lora.as_ref())) {
                (Some(a), Some(l)) if l.is_resident(a) || l.is_loading(a) => 3,
                (Some(_), _) if lora_homes.iter().any(|k| **k == *r.key()) => 2,
                (Some(_), Some(l)) if l.has_room() => 1,
                _ => 0,
            };
            let own_requests = own_requests as f64;
            let foreign_load = sig.is_some_and(|s| s.foreign_load_within(now, shared_window));
            let cache_tokens = fresh_sig.and_then(|s| s.cache_tokens());
            // Alone, the engine counts only our requests, which our own count
            // has exactly and now, not as of the last scrape. With other
            // gateways, their load shows only in the engine's count, taken
            // averaged: a group's home outlives any one request, and several
            // gateways must agree on it although each read the engine at a
            // different instant.
            let placement_load = match fresh_sig {
                Some(s) if foreign_load => own_requests.max(s.smoothed_requests),
                _ => own_requests,
            };
            out.push(Candidate {
                idx,
                matched_blocks: matched[idx].blocks,
                precise: matched[idx].precise,
                uncached_tokens: req.prompt_tokens,
                fresh,
                saturated,
                waiting,
                running,
                kv_usage: kv,
                load_requests: own_requests.max(running + waiting),
                placement_load,
                token_load: r.load.tokens() as f64,
                cache_turnover: matched[idx]
                    .held_tokens
                    .and(cache_tokens)
                    .map(|cap| cache_turnover_per_s(matched[idx].evicted_tokens_per_s, cap)),
                free_tokens: matched[idx]
                    .held_tokens
                    .zip(cache_tokens)
                    .map(|(held, cap)| cap.saturating_sub(held)),
                queued_prefill: r.load.prefill_tokens() as f64,
                est_ttft_ms: 0.0,
                lora_tier,
                // No prefix to keep together (prompt shorter than a block):
                // ties rotate over the replicas instead.
                rendezvous: ctx.group_key.map_or_else(
                    || ((idx + rotation) % replicas.len()) as u64,
                    |g| rendezvous_weight(g, r.key()),
                ),
                groups: 0,
                group_weight: 1.0,
                foreign_load,
                alive: true,
                dropped_by: None,
                score: 0.0,
            });
        }
        // Cache turnover places new groups where engines publish events.
        if let Some(g) = ctx.group_key {
            if self.precise.is_some() && self.cfg.rendezvous.weigh_by_turnover {
                weigh_by_turnover(out, replicas, g);
            }
        }
    }

    fn remember(
        &self,
        replicas: &[Arc<Replica>],
        req: &RouteRequest<'_>,
        ctx: &Ctx<'_>,
        best: usize,
        cands: &[Candidate],
        filters: &Outcomes,
    ) {
        // Once the log is full, the oldest record (unless a reader still holds
        // it) takes the new decision in its buffers: no allocation per request.
        let oldest = {
            let mut log = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
            if log.len() >= self.cfg.explain_buffer {
                log.pop_front()
            } else {
                None
            }
        };
        let mut rec = oldest.unwrap_or_default();
        if Arc::get_mut(&mut rec).is_none() {
            rec = Arc::default();
        }
        let Some(d) = Arc::get_mut(&mut rec) else {
            return;
        };
        let chosen = &cands[best];
        d.request_id.clear();
        d.request_id.push_str(req.request_id);
        d.chosen = replicas[chosen.idx].endpoint.key.clone();
        d.chosen_candidate = best;
        d.prompt_tokens = req.prompt_tokens;
        d.prompt_blocks = ctx.prompt_blocks;
        d.cached_tokens = req.prompt_tokens - chosen.uncached_tokens;
        d.filters.clone_from(filters);
        d.candidates.clear();
        d.candidates.extend(cands.iter().map(|c| CandidateView {
            replica: replicas[c.idx].endpoint.key.clone(),
            matched_blocks: c.matched_blocks,
            prefix_index: if c.precise { "precise" } else { "approximate" },
            est_ttft_ms: c.est_ttft_ms,
            load_requests: c.load_requests,
            placement_load: c.placement_load,
            token_load: c.token_load,
            waiting: c.waiting,
            running: c.running,
            kv_usage: c.kv_usage,
            fresh: c.fresh,
            saturated: c.saturated,
            lora_tier: c.lora_tier,
            dropped_by: c.dropped_by,
            score: c.score,
        }));
        let mut log = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() >= self.cfg.explain_buffer {
            log.pop_front();
        }
        log.push_back(rec);
    }

    fn lora_seen(&self, adapter: &str) -> bool {
        let homes = self.lora_homes.lock().unwrap_or_else(|e| e.into_inner());
        !homes.is_empty() && homes.contains_key(adapter)
    }

    /// Replicas this picker sent `adapter` to within [`LORA_MEMORY`].
    fn lora_homes(&self, adapter: &str) -> Vec<Arc<str>> {
        let homes = self.lora_homes.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        homes.get(adapter).map_or_else(Vec::new, |v| {
            v.iter()
                .filter(|(_, at)| now.saturating_duration_since(*at) < LORA_MEMORY)
                .map(|(k, _)| k.clone())
                .collect()
        })
    }

    fn remember_lora(&self, adapter: &str, replica: &Arc<str>) {
        let mut homes = self.lora_homes.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if homes.len() >= LORA_ADAPTERS && !homes.contains_key(adapter) {
            homes.retain(|_, v| {
                v.retain(|(_, at)| now.saturating_duration_since(*at) < LORA_MEMORY);
                !v.is_empty()
            });
            if homes.len() >= LORA_ADAPTERS {
                return;
            }
        }
        let v = homes.entry(Arc::from(adapter)).or_default();
        v.retain(|(k, _)| k != replica);
        v.push((replica.clone(), now));
        if v.len() > LORA_HOMES {
            v.remove(0);
        }
    }

    /// The remembered decision for `request_id` (the newest, if retried).
    fn decision(&self, request_id: &str) -> Option<Arc<Decision>> {
        let log = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        log.iter()
            .rev()
            .find(|d| d.request_id == request_id)
            .cloned()
    }

    fn last_decision(&self) -> Option<Arc<Decision>> {
        let log = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        log.back().cloned()
    }
}

/// A one-line reason naming the filter that decided, else the scores.
fn reason(chosen: &CandidateView, filters: &[FilterOutcome]) -> String {
    let decisive = filters
        .iter()
        .rev()
        .find(|f| f.dropped > 0 || (!f.detail.is_none() && f.filter == FilterName::PrefixAffinity));
    // One string, numbers printed by `Fixed`.
    let mut s = String::with_capacity(192);
    let _ = match decisive {
        Some(f) if !f.detail.is_none() => write!(s, "{:?}: {}", f.filter, f.detail),
        Some(f) => write!(s, "{:?} dropped {}", f.filter, f.dropped),
        None => write!(s, "no filter applied"),
    };
    let _ = write!(
        s,
        "; best score {} among the rest (est TTFT {} ms, {} cached blocks by the {} index)",
        Fixed(chosen.score, 3),
        Fixed(chosen.est_ttft_ms, 1),
        chosen.matched_blocks,
        chosen.prefix_index
    );
    s
}

/// Finds replicas by key for the indexes' callbacks. Replica keys from the
/// indexes and from the pool are mostly the same allocation, and the indexes
/// mostly call back in the pool's order: the replica after the last one found
/// is tried first, then every pointer, and the strings only when no pointer
/// matches (a string scan over 64 replicas for each of 64 callbacks costs
/// more than the rest of the decision).
struct KeyPositions<'a> {
    replicas: &'a [Arc<Replica>],
    next: std::cell::Cell<usize>,
}

impl<'a> KeyPositions<'a> {
    fn new(replicas: &'a [Arc<Replica>]) -> Self {
        Self {
            replicas,
            next: std::cell::Cell::new(0),
        }
    }

    fn find(&self, key: &Arc<str>) -> Option<usize> {
        let rs = self.replicas;
        let hint = self.next.get();
        let found = if rs
            .get(hint)
            .is_some_and(|r| Arc::ptr_eq(&r.endpoint.key, key))
        {
            Some(hint)
        } else {
            rs.iter()
                .position(|r| Arc::ptr_eq(&r.endpoint.key, key))
                .or_else(|| rs.iter().position(|r| *r.endpoint.key == **key))
        };
        if let Some(i) = found {
            self.next.set(i + 1);
        }
        found
    }
}

/// Highest-random-weight hashing: every gateway computes the same weight.
fn rendezvous_weight(group: u64, replica_key: &str) -> u64 {
    let mut x = group ^ xxh3_64(replica_key.as_bytes());
    // splitmix64 finaliser: spreads nearby inputs.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The turnover below which caches count as equally idle: a cache that
/// evicts less than its size every 10 minutes keeps what it is given.
const MIN_TURNOVER_PER_S: f64 = 1.0 / 600.0;

/// How fast a cache of `capacity_tokens` turns over: the fraction of it
/// evicted per second (the inverse of how long an unused block survives).
fn cache_turnover_per_s(evicted_tokens_per_s: f64, capacity_tokens: u64) -> f64 {
    evicted_tokens_per_s / capacity_tokens.max(1) as f64
}

/// A replica's rank for a prefix group (highest wins) by weighted rendezvous
/// hashing: score `weight / -ln(u)`, `u` the plain rendezvous hash in (0, 1).
/// Each replica wins groups in proportion to its weight; at equal weights the
/// order is the plain hash's.
fn rendezvous_rank(group: u64, replica_key: &str, weight: f64) -> u64 {
    let h = rendezvous_weight(group, replica_key);
    // u in (0, 1): 53 bits of the hash, never 0.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let score = weight / -u.ln();
    // Positive floats order as their bits do.
    score.to_bits()
}

/// Ranks `cands` for `group` by [`rendezvous_rank`], each weighted by the
/// inverse of its cache's turnover, once any of them is known to evict (a
/// candidate without a `cache_turnover`, no live events or no cache size,
/// counts as the mean of the known ones). So each replica opens new groups in
/// proportion to how slowly its cache turns over, which evens out how long an
/// unused prefix survives on each replica, as one cache pooled over the fleet
/// would (groups differ in popularity and growth, so equal counts of groups
/// do not make equal pressure). Every gateway reads the same engines' events,
/// so they rank alike. While none evicts, the plain hash ranks them, as it
/// would without events.
fn weigh_by_turnover(cands: &mut [Candidate], replicas: &[Arc<Replica>], group: u64) {
    let (n, sum, evicting) = cands
        .iter()
        .filter_map(|c| c.cache_turnover)
        .fold((0usize, 0.0, false), |(n, s, e), t| {
            (n + 1, s + t, e || t > MIN_TURNOVER_PER_S)
        });
    if !evicting {
        return;
    }
    let mean = sum / n as f64;
    for c in cands.iter_mut() {
        let turnover = c.cache_turnover.unwrap_or(mean).max(MIN_TURNOVER_PER_S);
        // Normalised so an unweighted replica's 1 stays comparable.
        c.group_weight = MIN_TURNOVER_PER_S / turnover;
        c.rendezvous = rendezvous_rank(group, replicas[c.idx].key(), c.group_weight);
    }
}

impl Picker for InferenceAware {
    fn pick(
        &self,
        replicas: &[Arc<Replica>],
        req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
    ) -> Option<Arc<Replica>> {
        let (i, _) = self.decide_among(replicas, req, exclude)?;
        Some(replicas[i].clone())
    }

    fn pick_fitting_and_begin(
        &self,
        replicas: &[Arc<Replica>],
        req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
        fits: &Fits<'_>,
    ) -> Option<LoadGuard> {
        let hashes = self.hashes(req);
        let mut matched = self.matched_blocks(replicas, req, &hashes);
        let longest = longest_match(replicas, exclude, &matched);
        // The replicas that fit, with their matches, in their order.
        let mut fitting: PerReplica<Arc<Replica>> = PerReplica::with_capacity(replicas.len());
        // The refusal of the replica holding the most of the prompt (for
        // `placement`: why a request left its prefix's holder).
        let mut holder_refused: Option<(u32, Refusal)> = None;
        // Holders of (nearly) the longest match that only pacing refused.
        let threshold = self.cfg.sticky.holder_threshold(longest);
        let mut paced_holders: PerReplica<(usize, Matched)> = PerReplica::new();
        for (i, r) in replicas.iter().enumerate() {
            if super::is_excluded(r, exclude) {
                continue;
            }
            match fits(r, self.cached_tokens(matched[i].blocks, req)) {
                Ok(()) => {
                    matched[fitting.len()] = matched[i];
                    fitting.push(r.clone());
                }
                Err(why) => {
                    if why.bound == NoRoom::Pacing
                        && threshold.is_some_and(|t| matched[i].blocks >= t)
                    {
                        paced_holders.push((i, matched[i]));
                    }
                    if holder_refused.is_none_or(|(b, _)| matched[i].blocks > b) {
                        holder_refused = Some((matched[i].blocks, why));
                    }
                }
            }
        }
        // Pacing spaces starts in time; it must not move a request off its
        // prefix's holder. When a colder replica would take it now, the start
        // happens now either way, and there it would prefill the whole prompt
        // again and copy it (on a skewed, tight fleet pacing moved a third of
        // the queued requests off their holders: hit rate 0.50 against 0.82,
        // p90 TTFT 17 s against 0.3 s; docs/benchmarks/2026-12-07-hit-rate.md).
        // So the paced holders stay candidates while nothing fitting holds
        // as much; with no colder replica fitting either, all of them wait.
        let holder_fits =
            threshold.is_some_and(|t| matched[..fitting.len()].iter().any(|m| m.blocks >= t));
        if !fitting.is_empty() && !holder_fits {
            for (i, m) in paced_holders {
                matched[fitting.len()] = m;
                fitting.push(replicas[i].clone());
            }
        }
        matched.truncate(fitting.len());
        let refused = holder_refused.map(|(_, why)| why);
        let (i, uncached) = self.decide(&fitting, req, &[], &hashes, &matched, longest, refused)?;
        Some(self.begin(&fitting[i], req, uncached))
    }

    fn forget_absent(&self, present: &[Arc<Replica>]) {
        let keys: Vec<&str> = present.iter().map(|r| r.key()).collect();
        self.index.retain(&keys);
    }

    fn admin_view(&self, replicas: &[Arc<Replica>]) -> serde_json::Value {
        let last = self.last_decision();
        let mut v = replicas_view(replicas, Some(self));
        if let Some(obj) = v.as_object_mut() {
            obj.insert("policy".into(), json!("inference_aware"));
            obj.insert("index".into(), json!(self.index.stats()));
            if let Some(p) = &self.precise {
                obj.insert("precise_index".into(), json!(p.stats()));
                if let Some(t) = p.engine_tokens() {
                    obj.insert("engine_tokens".into(), json!(t.stats()));
                }
            }
            obj.insert(
                "decisions".into(),
                json!(self.total_decisions.load(Ordering::Relaxed)),
            );
            obj.insert("placement".into(), self.placement.view());
            obj.insert("last_decision".into(), json!(last.as_deref()));
        }
        v
    }

    fn explain(&self, request_id: &str) -> Option<serde_json::Value> {
        self.decision(request_id)
            .map(|d| serde_json::to_value(&*d).unwrap_or(serde_json::Value::Null))
    }

    fn recent_decisions(&self, n: usize) -> Vec<serde_json::Value> {
        let log = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        log.iter()
            .rev()
            .take(n)
            .map(|d| {
                json!({
                    "request_id": d.request_id, "chosen": d.chosen, "reason": d.reason(),
                    "prompt_tokens": d.prompt_tokens, "cached_tokens": d.cached_tokens,
                    "candidates": d.candidates.len(),
                })
            })
            .collect()
    }

    fn kv_events(&self) -> Option<(Arc<PreciseIndex>, KvEventsConfig)> {
        Some((self.precise.clone()?, self.cfg.kv_events.clone()?))
    }
}

/// The longest match among `replicas` but `exclude`.
fn longest_match(replicas: &[Arc<Replica>], exclude: &[Arc<str>], matched: &[Matched]) -> u32 {
    replicas
        .iter()
        .zip(matched)
        .filter(|(r, _)| !super::is_excluded(r, exclude))
        .map(|(_, m)| m.blocks)
        .max()
        .unwrap_or(0)
}

/// One entry per replica of a pool, on the stack up to 8 replicas: a
/// decision's matches, fitting replicas and candidates allocate nothing for
/// the usual pool (a larger one spills to the heap).
type PerReplica<T> = SmallVec<[T; 8]>;

/// Leading prompt blocks a replica holds, whether the precise index said so,
/// and how many tokens its engine said it holds in all.
#[derive(Debug, Clone, Copy, Default)]
struct Matched {
    blocks: u32,
    precise: bool,
    held_tokens: Option<u64>,
    /// Tokens per second its engine evicts (0 without events).
    evicted_tokens_per_s: f64,
}

/// Per replica: own load, last signals and (for the aware picker) indexed
/// blocks and last score.
pub(super) fn replicas_view(
    replicas: &[Arc<Replica>],
    aware: Option<&InferenceAware>,
) -> serde_json::Value {
    let now = Instant::now();
    let last = aware.and_then(|a| a.last_decision());
    let list: Vec<serde_json::Value> = replicas
        .iter()
        .map(|r| {
            let sig = r.signals.load_full();
            let mut v = json!({
                "replica": r.key(),
                "load": {
                    "requests": r.load.requests(),
                    "tokens": r.load.tokens(),
                    "prefill_tokens": r.load.prefill_tokens(),
                },
                "signals": sig.as_deref(),
                "signals_age_ms": sig.as_ref().map(|s| now.saturating_duration_since(s.at).as_millis() as u64),
            });
            if let (Some(a), Some(obj)) = (aware, v.as_object_mut()) {
                let routability = a.routability(&[], now).of_with_signals(r, sig.as_deref());
                obj.insert(
                    "fresh".into(),
                    json!(routability == Routability::Routable),
                );
                obj.insert("indexed_blocks".into(), json!(a.index.replica_blocks(r.key())));
                let precise = a.precise.as_ref().is_some_and(|p| p.is_live(r.key()));
                obj.insert(
                    "prefix_index".into(),
                    json!(if precise { "precise" } else { "approximate" }),
                );
                // How fast its engine's cache turns over (weighs where new
                // prefix groups go).
                if let Some((per_s, total)) =
                    a.precise.as_ref().and_then(|p| p.evictions(r.key(), now))
                {
                    obj.insert(
                        "kv_evictions".into(),
                        json!({ "blocks_per_s": per_s, "blocks": total }),
                    );
                }
                let last_score = last
                    .as_ref()
                    .and_then(|d| d.candidates.iter().find(|c| &*c.replica == r.key()));
                obj.insert("last_score".into(), json!(last_score));
            }
            v
        })
        .collect();
    json!({ "replicas": list })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::discovery::Endpoint;
    use crate::routing::kv_events::KvEvent;
    use crate::routing::signals::LoraInfo;
    use infergate_protocol::tokenizer;

    pub(crate) fn replicas(n: u16) -> Vec<Arc<Replica>> {
        (0..n)
            .map(|i| {
                Arc::new(Replica::new(
                    Endpoint::from_url(&format!("http://127.0.0.1:{}", 9000 + i)).unwrap(),
                ))
            })
            .collect()
    }

    /// `n` replicas with fresh signals: nothing waiting, KV cache 10% used.
    fn idle_replicas(n: u16) -> Vec<Arc<Replica>> {
        let rs = replicas(n);
        for r in &rs {
            set_signals(r, 0.0, 0.1, None);
        }
        rs
    }

    fn set_signals(r: &Replica, waiting: f64, kv: f64, lora: Option<LoraInfo>) {
        r.signals.store(Some(Arc::new(Signals {
            at: Instant::now(),
            error: None,
            waiting,
            running: 0.0,
            kv_usage: Some(kv),
            block_size: Some(16),
            num_blocks: Some(1000),
            lora,
            prefix_hit_rate: None,
            preemptions: None,
            tokens_generated: None,
            own_requests_at_scrape: 0,
            batch_limit: None,
            saturated_batch: None,
            slow_start_cap: 0,
            queue_plateau: 0,
            most_running: 0.0,
            foreign_load_at: None,
            smoothed_requests: 0.0,
        })));
    }

    fn req<'a>(id: &'a str, text: &'a str) -> RouteRequest<'a> {
        RouteRequest {
            request_id: id,
            model: "m",
            prompt_text: text,
            prompt_tokens: infergate_protocol::tokenizer::count_tokens(text),
            max_tokens: 16,
            lora: None,
            hashes: Default::default(),
        }
    }

    fn prompt(group: usize, q: usize, len_chars: usize) -> String {
        let sys: String = format!("system prompt of group {group} ").repeat(len_chars / 24 + 1);
        format!(
            "<|system|>\n{}\n<|user|>\nquestion {q}\n<|assistant|>\n",
            &sys[..len_chars]
        )
    }

    /// The decision log keeps the last `explain_buffer` decisions; a new
    /// one is written over the oldest one's buffers, and a record a reader
    /// still holds is left as it was.
    #[test]
    fn the_decision_log_reuses_the_oldest_record_and_spares_one_still_read() {
        let rs = idle_replicas(3);
        let cfg = RoutingConfig {
            explain_buffer: 2,
            ..RoutingConfig::default()
        };
        let p = InferenceAware::new(cfg);
        let decide = |id: &str, group: usize| {
            let g = p
                .pick_and_begin(&rs, &req(id, &prompt(group, 0, 4000)), &[])
                .unwrap();
            g.replica().key().to_string()
        };
        let a = decide("a", 1);
        let held = p.decision("a").unwrap();
        decide("b-longer-id", 2);
        let c = decide("c", 1);
        assert_eq!(a, c, "the prefix stayed");
        // "a" left the log but its reader's copy is intact.
        assert!(p.explain("a").is_none());
        assert_eq!(held.request_id, "a");
        assert_eq!(&*held.chosen, a);
        assert_eq!(held.filters.len(), 4);
        let e = p.explain("c").unwrap();
        assert_eq!(e["request_id"], "c");
        assert_eq!(e["chosen"], c);
        assert_eq!(e["candidates"].as_array().unwrap().len(), 3);
        assert!(e["reason"].as_str().unwrap().contains("stay"), "{e}");
        // "b-longer-id"'s record (no reader) takes the next decision: the
        // shorter id and fewer candidates leave nothing of it behind.
        let d = p
            .pick_and_begin(&rs[..1], &req("d", &prompt(3, 0, 4000)), &[])
            .unwrap();
        let e = p.explain("d").unwrap();
        assert_eq!(e["request_id"], "d");
        assert_eq!(e["chosen"], d.replica().key());
        assert_eq!(e["candidates"].as_array().unwrap().len(), 1);
        assert!(p.explain("b-longer-id").is_none());
        assert!(p.explain("c").is_some());
        assert_eq!(p.recent_decisions(5).len(), 2);
    }

    #[test]
    fn shared_prefix_sticks_and_is_explained() {
        let rs = idle_replicas(4);
        let p = InferenceAware::new(RoutingConfig::default());
        let mut guards = Vec::new();
        let first = p
            .pick_and_begin(&rs, &req("a", &prompt(1, 0, 4000)), &[])
            .unwrap();
        let home = first.replica().key().to_string();
        guards.push(first);
        for q in 1..4 {
            let id = format!("q{q}");
            let g = p
                .pick_and_begin(&rs, &req(&id, &prompt(1, q, 4000)), &[])
                .unwrap();
            assert_eq!(g.replica().key(), home);
            guards.push(g);
        }
        // Only the uncached part is accounted as prefill.
        let home_r = rs.iter().find(|r| r.key() == home).unwrap();
        assert!(home_r.load.prefill_tokens() < 4 * 1020);
        let e = p.explain("q3").unwrap();
        assert_eq!(e["chosen"], home);
        assert!(e["reason"].as_str().unwrap().contains("stay"), "{e}");
        assert!(e["cached_tokens"].as_u64().unwrap() >= 960);
        let admin = p.admin_view(&rs);
        assert_eq!(admin["replicas"].as_array().unwrap().len(), 4);
        assert!(admin["index"]["entries"].as_u64().unwrap() > 0);
        assert!(p.explain("nope").is_none());
    }

    #[test]
    fn saturated_home_spills_and_unknown_attracts_nothing() {
        let rs = idle_replicas(3);
        let p = InferenceAware::new(RoutingConfig::default());
        let home = p.pick(&rs, &req("a", &prompt(2, 0, 2000)), &[]).unwrap();
        set_signals(&home, 20.0, 0.5, None);
        let next = p.pick(&rs, &req("b", &prompt(2, 1, 2000)), &[]).unwrap();
        assert_ne!(next.key(), home.key());
        // Replica never scraped: unknown, never chosen while others are known.
        rs[2].signals.store(None);
        for i in 0..20 {
            let id = format!("u{i}");
            let r = p
                .pick(&rs, &req(&id, &prompt(100 + i, 0, 500)), &[])
                .unwrap();
            assert_ne!(r.key(), rs[2].key());
        }
        // Everything unknown: fail open, still routed.
        for r in &rs {
            r.signals
                .store(Some(Arc::new(Signals::failed(Instant::now(), "x"))));
        }
        assert!(p.pick(&rs, &req("z", "hello"), &[]).is_some());
        // Excluding all: none.
        let all: Vec<Arc<str>> = rs.iter().map(|r| r.endpoint.key.clone()).collect();
        assert!(p.pick(&rs, &req("z", "hello"), &all).is_none());
    }

    #[test]
    fn lora_goes_to_resident_replica() {
        let rs = replicas(3);
        let info = |running: &[&str]| LoraInfo {
            max_lora: 1,
            running: running.iter().map(|s| s.to_string()).collect(),
            waiting: vec![],
        };
        set_signals(&rs[0], 0.0, 0.1, Some(info(&["x"])));
        set_signals(&rs[1], 0.0, 0.1, Some(info(&["ad"])));
        set_signals(&rs[2], 0.0, 0.1, Some(info(&["y"])));
        let p = InferenceAware::new(RoutingConfig::default());
        for i in 0..10 {
            let text = prompt(i, 0, 300);
            let mut r = req("l", &text);
            r.model = "ad";
            // Named explicitly, or recognised from the replicas' adapter lists.
            assert_eq!(p.pick(&rs, &r, &[]).unwrap().key(), rs[1].key());
            r.lora = Some("ad");
            assert_eq!(p.pick(&rs, &r, &[]).unwrap().key(), rs[1].key());
        }
    }

    #[test]
    fn rendezvous_agrees_across_independent_pickers() {
        let rs = idle_replicas(8);
        let a = InferenceAware::new(RoutingConfig::default());
        let b = InferenceAware::new(RoutingConfig::default());
        let mut homes = std::collections::HashSet::new();
        for g in 0..16 {
            let ra = a.pick(&rs, &req("a", &prompt(g, 1, 1500)), &[]).unwrap();
            let rb = b.pick(&rs, &req("b", &prompt(g, 2, 1500)), &[]).unwrap();
            assert_eq!(ra.key(), rb.key(), "group {g}");
            homes.insert(ra.key().to_string());
        }
        assert!(homes.len() >= 4, "groups spread over replicas: {homes:?}");
    }

    #[test]
    fn gateways_agree_on_a_home_when_one_scrape_caught_a_finished_burst() {
        // Scrapes every 20 ms for a second, the first one showing a request
        // another gateway sent; the last one shows `last` requests running.
        fn scraped(r: &Replica, last: u32) {
            let body = |run: u32| {
                format!("llamacpp:requests_processing {run}\nllamacpp:requests_deferred 0\n")
            };
            let now = Instant::now();
            let at = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap();
            let kind = infergate_protocol::EngineKind::LlamaCpp;
            let mut s = crate::routing::signals::parse(kind, &body(1), at(1000));
            s = s.with_context(0, 0, None);
            for i in 1..50 {
                let next = crate::routing::signals::parse(kind, &body(0), at(1000 - 20 * i));
                s = next.with_context(0, 0, Some(&s));
            }
            let next = crate::routing::signals::parse(kind, &body(last), now);
            s = next.with_context(0, 0, Some(&s));
            r.signals.store(Some(Arc::new(s)));
        }
        let text = prompt(3, 0, 1500);
        let home = InferenceAware::new(RoutingConfig::default())
            .pick(&idle_replicas(4), &req("p", &text), &[])
            .unwrap();
        // Two gateways over the same four replicas (same keys, so the same
        // rendezvous order); one of them read the home while the two requests
        // of a burst that has since finished were still counted there.
        let (saw_burst, missed_it) = (replicas(4), replicas(4));
        for (a, b) in saw_burst.iter().zip(&missed_it) {
            scraped(a, if a.key() == home.key() { 2 } else { 0 });
            scraped(b, 0);
        }
        let a = InferenceAware::new(RoutingConfig::default());
        let b = InferenceAware::new(RoutingConfig::default());
        let ra = a.pick(&saw_burst, &req("a", &text), &[]).unwrap();
        let rb = b.pick(&missed_it, &req("b", &text), &[]).unwrap();
        assert_eq!(rb.key(), home.key());
        assert_eq!(ra.key(), rb.key(), "the gateways disagree on the home");
    }

    #[test]
    fn new_prefix_groups_are_spread_evenly() {
        // Plain rendezvous hashing puts about 7 of 31 groups on one of 8
        // replicas; the group bound keeps every replica within
        // ceil(1.25 x 31 / 8) + 1 with the default slack (0.25, 1, used when other
        // gateways feed the pool), and exactly even without slack.
        let rs = idle_replicas(8);
        for (slack, abs, max) in [(0.25, 1.0, 6), (0.0, 0.0, 4)] {
            let mut cfg = RoutingConfig::default();
            cfg.rendezvous.group_slack = slack;
            cfg.rendezvous.group_slack_abs = abs;
            cfg.rendezvous.exact_when_alone = false;
            let p = InferenceAware::new(cfg);
            let mut per = HashMap::new();
            for g in 0..31 {
                let r = p.pick(&rs, &req("g", &prompt(g, 0, 1500)), &[]).unwrap();
                *per.entry(r.key().to_string()).or_insert(0) += 1;
                // The group sticks: its next question goes to the same replica.
                let again = p.pick(&rs, &req("h", &prompt(g, 1, 1500)), &[]).unwrap();
                assert_eq!(again.key(), r.key(), "group {g}");
            }
            assert_eq!(per.len(), 8, "{per:?}");
            assert!(per.values().all(|n| *n <= max), "slack {slack}: {per:?}");
        }
    }

    #[test]
    fn weighted_rendezvous_shares_groups_by_weight_and_is_plain_when_equal() {
        let mut wins = [0u32; 2];
        for g in 0..6000u64 {
            let group = rendezvous_weight(g, "group");
            let a = rendezvous_rank(group, "a", 1.0);
            let b = rendezvous_rank(group, "b", 2.0);
            wins[usize::from(b > a)] += 1;
            // Equal weights: the plain hash's order.
            let (pa, pb) = (rendezvous_weight(group, "a"), rendezvous_weight(group, "b"));
            let (ea, eb) = (
                rendezvous_rank(group, "a", 0.3),
                rendezvous_rank(group, "b", 0.3),
            );
            assert_eq!(pa > pb, ea > eb);
        }
        // b weighs twice as much (its cache turns over half as fast): two
        // thirds of the groups.
        let share = f64::from(wins[1]) / 6000.0;
        assert!((share - 2.0 / 3.0).abs() < 0.03, "{share}");
    }

    /// Two replicas whose engines publish KV events; `evicted` blocks removed
    /// just now from each (of 1,000 blocks of 16 tokens).
    fn evicting_pair(p: &InferenceAware, rs: &[Arc<Replica>], evicted: [u64; 2]) {
        let ix = p.precise_index().unwrap();
        for (r, n) in rs.iter().zip(evicted) {
            let key: Arc<str> = Arc::from(r.key());
            let hashes: Vec<u64> = (1..=500).collect();
            let tokens: Vec<u32> = (0..500 * 16).collect();
            ix.apply(
                &key,
                &[KvEvent::Stored {
                    hashes,
                    parent: None,
                    token_ids: tokens,
                    block_size: 16,
                    lora_name: None,
                    medium: None,
                }],
            );
            ix.apply(
                &key,
                &[KvEvent::Removed {
                    hashes: (1..=n).collect(),
                    medium: None,
                }],
            );
            ix.set_live(&key, true);
        }
    }

    #[test]
    fn one_chain_keys_both_indexes_when_their_blocks_agree() {
        let p = InferenceAware::new(RoutingConfig {
            kv_events: Some(Default::default()),
            ..RoutingConfig::default()
        });
        let text = prompt(1, 0, 1500);
        let r = req("g", &text);
        let (bs, max) = (p.block_size() as usize, p.cfg.prefix.max_blocks as usize);
        // No event yet: the engine's block size is unknown, text hashes key
        // the approximate index.
        assert_eq!(*p.hashes(&r), *r.block_hashes(bs, max));
        // Events at the same block size: the approximate index takes the
        // precise index's keys, computed once for both.
        let ix = p.precise_index().unwrap();
        let ids = tokenizer::token_ids(&text);
        ix.apply(
            &Arc::from("r0"),
            &[KvEvent::Stored {
                hashes: vec![1],
                parent: None,
                token_ids: ids[..bs].to_vec(),
                block_size: bs as u32,
                lora_name: None,
                medium: None,
            }],
        );
        let r = req("g", &text);
        let hashes = p.hashes(&r);
        let keys = r.token_block_keys(bs, key_seed(None), max);
        assert!(matches!(keys, Cow::Borrowed(_)));
        assert_eq!(*hashes, *keys);
        assert_ne!(*hashes, *r.block_hashes(bs, max));
        assert_eq!(hashes.len(), text.len() / (bs * tokenizer::CHARS_PER_TOKEN));
    }

    #[test]
    fn live_events_overrule_the_approximate_index_and_stale_ones_do_not() {
        let rs = idle_replicas(2);
        let p = InferenceAware::new(RoutingConfig {
            kv_events: Some(Default::default()),
            ..RoutingConfig::default()
        });
        let text = prompt(1, 0, 1500);
        let r = req("g", &text);
        // Sent once: the approximate index now places the prompt there.
        let sent = p.pick(&rs, &r, &[]).unwrap();
        let at = rs.iter().position(|x| x.key() == sent.key()).unwrap();
        let hashes = p.hashes(&r);
        let approx = p.matched_blocks(&rs, &r, &hashes);
        assert!(approx[at].blocks > 0 && !approx[at].precise);
        // Both engines' events are live and neither stored the prompt: the
        // engines' answer (nothing held) stands.
        let ix = p.precise_index().unwrap();
        for x in &rs {
            ix.set_live(&Arc::from(x.key()), true);
        }
        let live = p.matched_blocks(&rs, &r, &hashes);
        assert_eq!(live[at].blocks, 0);
        // Events stale again: the approximate index answers for that replica.
        ix.set_live(&Arc::from(rs[at].key()), false);
        let stale = p.matched_blocks(&rs, &r, &hashes);
        assert_eq!(stale[at].blocks, approx[at].blocks);
    }

    #[test]
    fn new_groups_go_where_the_cache_turns_over_slowest() {
        for weigh in [true, false] {
            let rs = idle_replicas(2);
            let mut cfg = RoutingConfig {
                kv_events: Some(Default::default()),
                ..RoutingConfig::default()
            };
            cfg.rendezvous.weigh_by_turnover = weigh;
            let p = InferenceAware::new(cfg);
            // Replica 0 evicts twice as fast as replica 1.
            evicting_pair(&p, &rs, [200, 100]);
            let mut per = [0u32; 2];
            for g in 0..30 {
                let r = p.pick(&rs, &req("g", &prompt(g, 0, 1500)), &[]).unwrap();
                per[usize::from(r.key() == rs[1].key())] += 1;
            }
            if weigh {
                // Alone, the group bound is exact: 2 to 1 by weight.
                assert_eq!(per, [10, 20], "weighted: {per:?}");
            } else {
                assert_eq!(per, [15, 15], "unweighted: {per:?}");
            }
            let view = replicas_view(&rs, Some(&p));
            let ev = &view["replicas"][0]["kv_evictions"];
            assert_eq!(ev["blocks"], 200, "{view}");
            assert!(ev["blocks_per_s"].as_f64().unwrap() > 19.0, "{view}");
        }
    }

    #[test]
    fn cached_prompt_tokens_name_the_holder() {
        let rs = idle_replicas(3);
        let p = InferenceAware::new(RoutingConfig::default());
        let text = prompt(7, 0, 2000);
        assert!(p
            .cached_prompt_tokens(&rs, &req("a", &text))
            .iter()
            .all(|c| *c == 0));
        let home = p.pick(&rs, &req("a", &text), &[]).unwrap();
        let next = prompt(7, 1, 2000);
        let cached = p.cached_prompt_tokens(&rs, &req("b", &next));
        for (r, c) in rs.iter().zip(&cached) {
            if r.key() == home.key() {
                assert!(*c >= 480, "{cached:?}");
            } else {
                assert_eq!(*c, 0, "{cached:?}");
            }
        }
    }

    /// Past the 8 replicas kept on the stack (`PerReplica`), matches and
    /// candidates spill to the heap and keep their order: the holder of a
    /// prefix is found among 12, and `fits` narrows to the one it allows.
    #[test]
    fn pools_larger_than_the_inline_arrays_keep_holders_and_fits() {
        let rs = idle_replicas(12);
        let p = InferenceAware::new(RoutingConfig::default());
        let home = p.pick(&rs, &req("a", &prompt(9, 0, 2000)), &[]).unwrap();
        let next = prompt(9, 1, 2000);
        let cached = p.cached_prompt_tokens(&rs, &req("b", &next));
        assert_eq!(cached.len(), 12);
        let holder = cached.iter().position(|&c| c > 0).unwrap();
        assert_eq!(rs[holder].key(), home.key());
        let g = p
            .pick_fitting_and_begin(&rs, &req("b", &next), &[], &|_, _| Ok(()))
            .unwrap();
        assert_eq!(g.replica().key(), home.key());
        drop(g);
        let only = rs[11].clone();
        let fits = |r: &Replica, _: u64| {
            if r.key() == only.key() {
                Ok(())
            } else {
                Err(Refusal {
                    bound: NoRoom::RequestCap,
                    queued: false,
                })
            }
        };
        let g = p
            .pick_fitting_and_begin(&rs, &req("c", &prompt(9, 2, 2000)), &[], &fits)
            .unwrap();
        assert_eq!(g.replica().key(), only.key());
    }

    #[test]
    fn placements_are_counted_against_the_holder() {
        let rs = idle_replicas(3);
        let p = InferenceAware::new(RoutingConfig::default());
        let placement = |p: &InferenceAware| p.placement.view();
        let text = prompt(7, 0, 2000);
        let home = p.pick(&rs, &req("a", &text), &[]).unwrap();
        assert_eq!(placement(&p)["cold"]["requests"], 1);
        // The next turn goes to its holder.
        let next = prompt(7, 1, 2000);
        let cached = p.cached_prompt_tokens(&rs, &req("b", &next));
        let held = *cached.iter().max().unwrap();
        drop(
            p.pick_fitting_and_begin(&rs, &req("b", &next), &[], &|_, _| Ok(()))
                .unwrap(),
        );
        assert_eq!(placement(&p)["to_holder"]["requests"], 1);
        assert_eq!(placement(&p)["to_holder"]["cached_tokens"], held);
        // The holder has no room (admission's `fits` says no, by its KV
        // budget, on a queue turn), and another replica none by its request
        // cap: a spill that prefills the held part again, counted as
        // admission's under the holder's bound.
        let third = prompt(7, 2, 2000);
        let other = rs.iter().find(|r| r.key() != home.key()).unwrap().clone();
        let fits = |r: &Replica, _: u64| {
            let bound = if r.key() == home.key() {
                NoRoom::KvBudget
            } else if r.key() == other.key() {
                NoRoom::RequestCap
            } else {
                return Ok(());
            };
            Err(Refusal {
                bound,
                queued: true,
            })
        };
        let g = p
            .pick_fitting_and_begin(&rs, &req("c", &third), &[], &fits)
            .unwrap();
        assert_ne!(g.replica().key(), home.key());
        let v = placement(&p);
        let adm = &v["spilled"]["admission"];
        assert_eq!(adm["requests"], 1, "{v}");
        assert!(adm["reprefill_tokens"].as_u64() >= Some(480), "{v}");
        let by = &adm["by_bound"];
        assert_eq!(by["kv_budget"]["queued"]["requests"], 1, "{v}");
        assert_eq!(
            by["kv_budget"]["queued"]["reprefill_tokens"],
            adm["reprefill_tokens"]
        );
        assert_eq!(by["kv_budget"]["arrival"]["requests"], 0, "{v}");
        assert_eq!(by["request_cap"]["queued"]["requests"], 0, "{v}");
        assert_eq!(v["decisions"], 3);
    }

    /// Pacing only spaces starts: a holder refused by it alone keeps the
    /// request while a colder replica would take it now, and with nothing
    /// else fitting the request waits; a real bound still moves it.
    #[test]
    fn pacing_never_moves_a_request_off_its_prefix_holder() {
        let rs = idle_replicas(3);
        let p = InferenceAware::new(RoutingConfig::default());
        let home = p.pick(&rs, &req("a", &prompt(5, 0, 2000)), &[]).unwrap();
        let holder_refused_by = |bound: NoRoom, others_fit: bool| {
            let home = home.key().to_string();
            move |r: &Replica, _: u64| {
                if r.key() == home {
                    Err(Refusal {
                        bound,
                        queued: true,
                    })
                } else if others_fit {
                    Ok(())
                } else {
                    Err(Refusal {
                        bound: NoRoom::RequestCap,
                        queued: true,
                    })
                }
            }
        };
        let g = p
            .pick_fitting_and_begin(
                &rs,
                &req("b", &prompt(5, 1, 2000)),
                &[],
                &holder_refused_by(NoRoom::Pacing, true),
            )
            .unwrap();
        assert_eq!(g.replica().key(), home.key(), "paced holder kept");
        drop(g);
        let v = p.placement.view();
        assert_eq!(v["to_holder"]["requests"], 1, "{v}");
        assert_eq!(v["spilled"]["admission"]["requests"], 0, "{v}");
        // Nothing else fits either: the request waits (for the pacing).
        assert!(p
            .pick_fitting_and_begin(
                &rs,
                &req("c", &prompt(5, 2, 2000)),
                &[],
                &holder_refused_by(NoRoom::Pacing, false),
            )
            .is_none());
        // A real bound (the KV budget) moves it to a colder replica.
        let g = p
            .pick_fitting_and_begin(
                &rs,
                &req("d", &prompt(5, 3, 2000)),
                &[],
                &holder_refused_by(NoRoom::KvBudget, true),
            )
            .unwrap();
        assert_ne!(g.replica().key(), home.key());
    }

    #[test]
    fn prompts_shorter_than_a_block_rotate_over_idle_replicas() {
        let rs = idle_replicas(3);
        let p = InferenceAware::new(RoutingConfig::default());
        let keys: std::collections::HashSet<String> = (0..3)
            .map(|_| p.pick(&rs, &req("s", "hi"), &[]).unwrap().key().to_string())
            .collect();
        assert_eq!(keys.len(), 3);
    }

    #[test]
    fn forget_absent_purges_index() {
        let rs = replicas(2);
        let p = InferenceAware::new(RoutingConfig {
            scrape: crate::routing::config::ScrapeConfig {
                enabled: false,
                ..Default::default()
            },
            ..Default::default()
        });
        let r = p.pick(&rs, &req("a", &prompt(1, 0, 1000)), &[]).unwrap();
        assert!(p.index().replica_blocks(r.key()) > 0);
        p.forget_absent(&[]);
        assert_eq!(p.index().replica_blocks(r.key()), 0);
    }
}

//! Token budgets: what a request is expected to cost, whether a replica can
//! take it, and the [`Reservation`] that holds the cost on the replica until
//! the request ends.
//!
//! The counters themselves are the pool's ([`crate::pool::LoadGuard`]): a
//! reservation wraps the guard, corrects its estimate as the stream reports
//! tokens, and tells the pool's queue when tokens come free (on every path,
//! because release is a `Drop`).
//!
//! With self-tuning (the default), whether a replica's KV cache has room is
//! judged on its projected peak in the engine's blocks ([`kv_peak_within`]), not on prompt + `max_tokens`
//! held for each stream's whole life: a stream holds its prompt plus the
//! output so far, and grows by one token per engine step until it ends, so
//! streams at different ages never all reach their full size at once (on
//! average a stream holds about half its output). A projection from each
//! stream's current size and the tokens it may still add is exact while
//! outputs stay within `max_tokens`, so it never overfills the cache, and it
//! lets a replica whose streams started at different times take more
//! (64 + 500-token streams on a 4,096-token cache: 11 started 50 tokens
//! apart, against 7 at prompt + `max_tokens` each).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use super::config::BudgetConfig;
use super::tuning::{self, Knobs, Timing};
use super::Priority;
use crate::pool::{LoadGuard, Replica, StreamKv};
use crate::routing::NoRoom;

/// Expected cost of one request in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    pub prompt: u64,
    /// Expected output: `max_tokens`, or the route default.
    pub output: u64,
}

impl Cost {
    /// Prompt tokens from the shared tokenizer plus `max_tokens` (or `default_output`).
    pub fn estimate(prompt_tokens: u32, max_tokens: Option<u32>, default_output: u32) -> Cost {
        Cost {
            prompt: u64::from(prompt_tokens),
            output: u64::from(max_tokens.unwrap_or(default_output)),
        }
    }

    pub fn total(self) -> u64 {
        self.prompt + self.output
    }

    /// This cost on a replica that already caches `cached` of the prompt.
    pub fn uncached(self, cached: u64) -> Cost {
        Cost {
            prompt: self.prompt.saturating_sub(cached),
            output: self.output,
        }
    }
}

/// Whether `streams` (each `(held, left)`: KV tokens held now, output
/// tokens it may still add) never hold more than `limit` KV tokens from now
/// on, if every stream adds one token per engine step and frees all it
/// holds when it ends (continuous batching), counted in whole blocks of
/// `block` tokens as the engine allocates them (`t` tokens take
/// `⌈t / block⌉` blocks). Just before the stream with `left = r` ends, the
/// streams with at least `r` left hold `Σ held + count × r` tokens, plus at
/// most `block − 1` each in their last block: the peak is the largest of
/// those (at the smallest `r`, at least what they hold now). The bounds
/// without and with `block − 1` per stream decide most moments in one
/// pass; only a moment they cannot decide is counted block by block.
/// Sorts `streams`.
pub fn kv_peak_within(streams: &mut [(u64, u64)], block: u64, limit: u64) -> bool {
    let block = block.max(1);
    streams.sort_unstable_by_key(|s| std::cmp::Reverse(s.1));
    let (mut held, mut count) = (0u64, 0u64);
    for (i, &(h, left)) in streams.iter().enumerate() {
        held = held.saturating_add(h);
        count += 1;
        // Just before the stream(s) with `left` to go end, each of the
        // first `i + 1` streams has added `left` tokens.
        let tokens = held.saturating_add(count.saturating_mul(left));
        if tokens > limit {
            return false;
        }
        if tokens.saturating_add(count.saturating_mul(block - 1)) <= limit {
            continue;
        }
        let in_blocks = streams[..=i].iter().fold(0u64, |sum, &(h, _)| {
            sum.saturating_add(h.saturating_add(left).div_ceil(block).saturating_mul(block))
        });
        if in_blocks > limit {
            return false;
        }
    }
    true
}

/// How many requests like `cost` a KV cache of `capacity` tokens holds at
/// once under self-tuning's projection ([`kv_peak_within`]) when their
/// starts are evenly spaced over a lifetime: `n` streams of prompt `p` and
/// output `o`, each `o / n` tokens older than the next, peak just before the
/// oldest ends at `n × (p + o) − (o / n) × n(n − 1) / 2 = n × (p + o/2) + o/2`
/// tokens (each holds its prompt and about half its output on average).
fn kv_slots(capacity: u64, cost: Cost) -> u64 {
    let half = cost.output / 2;
    (capacity.saturating_sub(half) / (cost.prompt + half).max(1)).max(1)
}

thread_local! {
    /// Scratch for [`kv_peak_within`] on the placement path (no allocation per call).
    static PEAK_BUF: RefCell<Vec<(u64, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Whether `replica`'s streams with one more costing `cost` (its uncached
/// prompt now, its output to come) stay within `limit` KV tokens
/// ([`kv_peak_within`], in the engine's blocks).
fn replica_kv_within(replica: &Replica, cost: Cost, limit: u64) -> bool {
    PEAK_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        replica.load.each_stream(|h, l| buf.push((h, l)));
        buf.push((cost.prompt, cost.output));
        let block = replica
            .signals
            .load()
            .as_ref()
            .and_then(|s| s.block_size)
            .unwrap_or(1);
        kv_peak_within(&mut buf, u64::from(block), limit)
    })
}

/// Told when a replica's reserved tokens go down (a request ended, or its
/// estimate was corrected downwards), so queued requests get a chance.
pub trait CapacityListener: Send + Sync + std::fmt::Debug {
    fn capacity_freed(&self, tokens: u64);

    /// A request ended, freeing `tokens`; `timing` is what the relay saw of
    /// it (when it got a first byte), for self-tuning.
    fn request_ended(&self, tokens: u64, timing: Option<Timing>) {
        let _ = timing;
        self.capacity_freed(tokens);
    }
}

/// Decides whether a replica has room for a request.
#[derive(Debug)]
pub struct Budget {
    cfg: BudgetConfig,
}

/// How far past its caps a replica may take a request: the prefix holder's
/// pass (`admission::queue`).
#[derive(Debug, Clone, Copy, Default)]
pub struct PastCap {
    /// Requests past the request cap.
    pub requests: u64,
    /// Prompt tokens past the prefill cap.
    pub prefill_tokens: u64,
}

impl Budget {
    pub fn new(cfg: BudgetConfig) -> Self {
        Budget { cfg }
    }

    /// Token capacity of a replica, or `None` when unlimited: the configured
    /// capacity, else the KV cache size (blocks × block size) its engine
    /// reports through the metrics scraper (`Replica::signals`) × `kv_fraction`.
    pub fn capacity(&self, replica: &Replica) -> Option<u64> {
        if let Some(c) = self.cfg.tokens_per_replica {
            return Some(c);
        }
        replica
            .signals
            .load()
            .as_ref()
            .and_then(|s| s.cache_tokens())
            .map(|kv| (kv as f64 * self.cfg.kv_fraction) as u64)
    }

    /// Whether unset knobs are derived (`admission::tuning`).
    pub fn self_tuning(&self) -> bool {
        self.cfg.self_tuning
    }

    /// The request cap of `replica`: configured, else (self-tuning) the
    /// batch limit learned from its metrics, else while it is being learned
    /// the slow-start cap ([`tuning::slow_start_cap`]); `None`: no cap (no
    /// metrics to learn from, or self-tuning off).
    pub fn batch(&self, replica: &Replica) -> Option<u64> {
        self.cfg.max_requests_per_replica.or_else(|| {
            if !self.cfg.self_tuning {
                return None;
            }
            let s = replica.signals.load();
            let s = s.as_ref().filter(|s| s.error.is_none())?;
            Some(match s.saturated_batch {
                Some(b) => (b as u64).max(1),
                // Signals that did not come through a scrape's
                // `with_context` (built by hand) carry a cap of 0: the
                // first step's cap is the floor.
                None => s
                    .slow_start_cap
                    .max(tuning::slow_start_cap(None, s.running, 0, true)),
            })
        })
    }

    /// Whether the request cap is hand-set (`max_requests_per_replica`).
    pub fn cap_set_by_hand(&self) -> bool {
        self.cfg.max_requests_per_replica.is_some()
    }

    /// Whether `replica`'s request cap is its learned batch limit (or a
    /// hand-set one), not the slow-start cap: only a known batch sizes a
    /// reserve.
    fn batch_known(&self, replica: &Replica) -> bool {
        self.cfg.max_requests_per_replica.is_some()
            || replica
                .signals
                .load()
                .as_ref()
                .is_some_and(|s| s.saturated_batch.is_some())
    }

    /// The pacing of queued non-critical starts of requests like `cost` on
    /// `replica` ([`tuning::Pace`]), when self-tuning knows the service time
    /// and how many such requests the replica runs at once: its batch limit,
    /// or fewer where its KV cache holds fewer ([`kv_slots`]; not for a hand-set
    /// `tokens_per_replica`, which is not the engine's cache). A
    /// KV-bound replica bunches like a batch-bound one: streams that start
    /// together peak together, so the projection lets in only a cohort's
    /// worth, all of it ends at once and is refilled at once, and the cache
    /// sat half empty on average (64 + 500-token streams on 4,096 tokens: 7
    /// in flight, KV use 0.42); spread out, the streams' ages differ and the
    /// same cache holds more. A KV-bound replica is paced at exactly one
    /// start per `service / slots`, without the batch's headroom
    /// ([`tuning::Pace::kv_bound`]).
    pub fn pace(&self, replica: &Replica, knobs: &Knobs, cost: Cost) -> Option<tuning::Pace> {
        if !self.cfg.self_tuning {
            return None;
        }
        let batch = self.batch(replica).filter(|_| self.batch_known(replica));
        let kv = self
            .cfg
            .tokens_per_replica
            .is_none()
            .then(|| self.capacity(replica).map(|c| kv_slots(c, cost)))
            .flatten();
        match (batch, kv) {
            (Some(b), Some(k)) if k < b => tuning::Pace::kv_bound(knobs.service, k),
            (Some(b), _) => tuning::Pace::new(knobs.service, b),
            (None, Some(k)) => tuning::Pace::kv_bound(knobs.service, k),
            (None, None) => None,
        }
    }

    /// Whether `replica` can take a request of band `priority` costing `cost`
    /// tokens now, with `knobs` (what self-tuning derived; hand-set values in
    /// the config win). Below critical, only the budget minus the critical
    /// reserve counts. An idle replica always can (a request larger than the
    /// budget must still run somewhere; the engine decides whether it fits at
    /// all).
    pub fn fits(&self, replica: &Replica, cost: Cost, priority: Priority, knobs: &Knobs) -> bool {
        self.room_past_cap(replica, cost, priority, knobs, PastCap::default())
            .is_ok()
    }

    /// [`Budget::fits`] with the request cap and the prefill cap raised by
    /// `past` (the prefix holder's pass, `admission::queue`), saying which
    /// bound refused; every other bound holds as it is.
    pub fn room_past_cap(
        &self,
        replica: &Replica,
        cost: Cost,
        priority: Priority,
        knobs: &Knobs,
        past: PastCap,
    ) -> Result<(), NoRoom> {
        let past_cap = past.requests;
        let critical = priority == Priority::Critical;
        let tune = self.cfg.self_tuning;
        let batch = self.batch(replica);
        let capacity = self.capacity(replica);
        // The slots the reserve is counted in: the request cap, else (a replica
        // its KV cache limits first) how many requests like this one its token
        // budget holds: with self-tuning's projection, a stream holds its
        // prompt and about half its output on average.
        // The projection counts the engine's KV cache; a hand-set
        // `tokens_per_replica` keeps its meaning (prompt + expected output of
        // the requests in flight).
        let project = tune && self.cfg.tokens_per_replica.is_none();
        let slots = batch.filter(|_| self.batch_known(replica)).or_else(|| {
            if project {
                capacity.map(|c| kv_slots(c, cost))
            } else {
                capacity.map(|c| (c / cost.total().max(1)).max(1))
            }
        });
        let (derived_reserve, derived_queue) = match slots {
            Some(b) if tune => knobs.critical_slots(b),
            _ => (0, 0),
        };
        let share = match (self.cfg.critical_reserve, slots) {
            (Some(r), _) => r.clamp(0.0, 1.0),
            (None, Some(b)) => derived_reserve as f64 / b as f64,
            (None, None) => 0.0,
        };
        let share = if critical { 1.0 } else { 1.0 - share };
        let load = &replica.load;
        // The connection bound holds for every band: beyond it a request
        // would wait for a connection where admission cannot see it.
        if load.requests() >= self.cfg.max_connections_per_replica {
            return Err(NoRoom::Connections);
        }
        if let Some(max) = batch {
            // The epsilon keeps 16 x (1 - 4/16) at 12, not 11.99.
            let mut max = ((max as f64 * share + 1e-9).floor() as u64)
                .max(1)
                .saturating_add(past_cap);
            if critical {
                max = max.saturating_add(self.cfg.critical_engine_queue.unwrap_or(derived_queue));
            }
            if load.requests() >= max {
                let whole = max.max(batch.unwrap_or(0).saturating_add(past_cap));
                return Err(if load.requests() < whole {
                    NoRoom::CriticalReserve
                } else {
                    NoRoom::RequestCap
                });
            }
        }
        // The derived prefill cap bounds what a critical arrival sits
        // through, so like the reserve it holds only while critical traffic
        // is seen. Without any, it only held requests in the gateway's
        // queue that the engines would start now and moved them off their
        // prefix holders (the tight shared-prefix fleet: 55 to 75 a run,
        // p90 TTFT 0.7 to 1.1 s).
        let prefill_cap = self.cfg.max_prefill_tokens_per_replica.or(match slots {
            Some(b) if tune && knobs.critical_seen() => knobs.prefill_cap(b),
            _ => None,
        });
        if let (Some(max), false) = (prefill_cap, critical) {
            let pending = load.prefill_tokens();
            if pending > 0
                && pending.saturating_add(cost.prompt) > max.saturating_add(past.prefill_tokens)
            {
                return Err(NoRoom::PrefillCap);
            }
        }
        // An engine that schedules by priority preempts a lower band's
        // sequences for a critical one when its KV cache is full too.
        if critical && tune && knobs.engine_priority {
            return Ok(());
        }
        match capacity {
            None => Ok(()),
            Some(cap) => {
                let used = load.tokens();
                let limit = cap as f64 * share;
                // Self-tuning on the engine's KV cache: the replica's
                // projected KV peak with this request (`kv_peak_within`); otherwise
                // prompt + `max_tokens` held by each stream for its whole life.
                let fits_within = |limit: f64| {
                    used == 0
                        || if project {
                            replica_kv_within(replica, cost, limit as u64)
                        } else {
                            used.saturating_add(cost.total()) as f64 <= limit
                        }
                };
                if fits_within(limit) {
                    Ok(())
                } else if share < 1.0 && fits_within(cap as f64) {
                    Err(NoRoom::CriticalReserve)
                } else {
                    Err(NoRoom::KvBudget)
                }
            }
        }
    }

    /// Reserves `cost` on `replica` (the caller checked [`Budget::fits`]).
    pub fn reserve(
        replica: &Arc<Replica>,
        cost: Cost,
        listener: Option<Arc<dyn CapacityListener>>,
    ) -> Reservation {
        Self::reserve_guard(replica.begin(cost.total(), cost.prompt), cost, listener)
    }

    /// Wraps a load guard the picker already started (with its estimate of the
    /// uncached prefill, see `Picker::pick_fitting_and_begin`), sized to `cost`. The
    /// prompt part leaves out what the picker expects cached: a prefix the engine already
    /// caches is shared by every request using it, so counting it per request
    /// would call a replica full at a fraction of its KV cache (8 requests
    /// sharing a 3,000-token system prompt on a 32k-token cache).
    pub fn reserve_guard(
        mut guard: LoadGuard,
        cost: Cost,
        listener: Option<Arc<dyn CapacityListener>>,
    ) -> Reservation {
        let kv_prompt = cost.uncached(guard.cached_tokens()).prompt;
        guard.set_tokens(kv_prompt + cost.output);
        let kv = Arc::new(StreamKv::new(kv_prompt, cost.output));
        guard.replica().load.add_stream(kv.clone());
        Reservation {
            kv,
            guard: Some(guard),
            cost,
            kv_prompt,
            generated: 0,
            final_usage: false,
            listener,
            wake_on_prefill: false,
            placed: Instant::now(),
            first_byte: None,
        }
    }

    /// Whether a replica's room depends on its pending prefill (a
    /// `max_prefill_tokens_per_replica` cap, set or derived): only then is the end of a
    /// prefill worth telling the queue about.
    pub fn caps_prefill(&self) -> bool {
        self.cfg.max_prefill_tokens_per_replica.is_some() || self.cfg.self_tuning
    }
}

/// One request's tokens held on its replica; released on drop.
#[derive(Debug)]
pub struct Reservation {
    // Always `Some` until drop.
    guard: Option<LoadGuard>,
    /// This stream's entry in its replica's list (`kv_peak_within`).
    kv: Arc<StreamKv>,
    cost: Cost,
    /// The prompt tokens this request adds to the replica's KV cache (its
    /// uncached part, as estimated when it was placed).
    kv_prompt: u64,
    generated: u64,
    final_usage: bool,
    listener: Option<Arc<dyn CapacityListener>>,
    /// Tell the listener when the prefill ends (see [`Budget::caps_prefill`]);
    /// otherwise that would be one more queue lock per request for nothing.
    wake_on_prefill: bool,
    /// When it was placed and when its first byte came (self-tuning's timings).
    placed: Instant,
    first_byte: Option<Instant>,
}

impl Reservation {
    pub fn replica(&self) -> &Arc<Replica> {
        match &self.guard {
            Some(g) => g.replica(),
            None => unreachable!("a reservation's guard is only taken in drop"),
        }
    }

    /// Tokens currently reserved.
    pub fn tokens(&self) -> u64 {
        self.guard.as_ref().map_or(0, LoadGuard::tokens)
    }

    /// The estimate the request was admitted with.
    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// Tells the listener when the prefill ends, for a pool whose budget caps
    /// pending prefill.
    pub fn waking_queue_on_prefill(mut self, wake: bool) -> Self {
        self.wake_on_prefill = wake;
        self
    }

    /// The first response byte arrived: the prefill share is released, and
    /// when asked, the queue hears of it (a request held back by the
    /// replica's prefill cap, or by a cold replica's ramp, may go now).
    pub fn prefill_done(&mut self) {
        let Some(g) = &mut self.guard else { return };
        if !g.prefill_done() {
            return;
        }
        self.first_byte = Some(Instant::now());
        if let (true, Some(l)) = (self.wake_on_prefill, &self.listener) {
            l.capacity_freed(0);
        }
    }

    /// The stream has produced `total` output tokens so far. The reservation
    /// grows when the output runs past the estimate (a request without
    /// `max_tokens` that talks longer than the route default).
    pub fn observe_generated(&mut self, total: u64) {
        if self.final_usage {
            return;
        }
        self.generated = total;
        self.kv.set(
            self.kv_prompt + total,
            self.cost.output.saturating_sub(total),
        );
        let want = self.kv_prompt + self.cost.output.max(total);
        self.set(want);
    }

    /// The engine reported its actual usage: the reservation becomes exactly
    /// that (less the prefix estimated as cached when placed) for the rest of
    /// the request's life.
    pub fn observe_usage(&mut self, prompt_tokens: u64, completion_tokens: u64) {
        self.final_usage = true;
        self.generated = completion_tokens;
        let cached = self.cost.prompt - self.kv_prompt;
        let held = prompt_tokens.saturating_sub(cached) + completion_tokens;
        // Usage comes with the last event: nothing more to add.
        self.kv.set(held, 0);
        self.set(held);
    }

    fn set(&mut self, tokens: u64) {
        let Some(g) = &mut self.guard else { return };
        let before = g.tokens();
        if before == tokens {
            return;
        }
        g.set_tokens(tokens);
        if tokens < before {
            if let Some(l) = &self.listener {
                l.capacity_freed(before - tokens);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Release the counters first, then wake the queue, so the woken request
        // sees the freed room.
        if let Some(g) = &self.guard {
            g.replica().load.remove_stream(&self.kv);
        }
        let freed = self.guard.take().map_or(0, |g| g.tokens());
        if let Some(l) = &self.listener {
            let timing = self.first_byte.map(|first| Timing {
                ttft: first.saturating_duration_since(self.placed),
                total: self.placed.elapsed(),
                generated: self.generated,
                prompt: self.kv_prompt,
            });
            l.request_ended(freed, timing);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::discovery::Endpoint;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    const S: Priority = Priority::Standard;
    const K: Knobs = Knobs {
        critical_in_flight_per_replica: 0.0,
        prefill_step_tokens: None,
        prefill_per_slot: 0.0,
        engine_priority: false,
        service: 0.0,
    };

    fn replica() -> Arc<Replica> {
        Arc::new(Replica::new(
            Endpoint::from_url("http://127.0.0.1:9").unwrap(),
        ))
    }

    /// A cost of `tokens` output tokens and no prompt.
    fn out(tokens: u64) -> Cost {
        Cost {
            prompt: 0,
            output: tokens,
        }
    }

    #[derive(Debug, Default)]
    struct Count(AtomicU64, AtomicU64);
    impl CapacityListener for Count {
        fn capacity_freed(&self, tokens: u64) {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.fetch_add(tokens, Ordering::SeqCst);
        }
    }

    #[test]
    fn fixed_capacity_and_request_cap() {
        let b = Budget::new(BudgetConfig {
            tokens_per_replica: Some(100),
            max_requests_per_replica: Some(2),
            ..Default::default()
        });
        let r = replica();
        // Idle replica takes even an oversized request.
        assert!(b.fits(&r, out(1000), S, &K));
        let _a = Budget::reserve(&r, Cost::estimate(40, Some(20), 256), None);
        assert_eq!(r.load.tokens(), 60);
        assert!(b.fits(&r, out(40), S, &K));
        assert!(!b.fits(&r, out(41), S, &K));
        let _c = Budget::reserve(&r, Cost::estimate(1, None, 1), None);
        assert!(!b.fits(&r, out(1), S, &K), "request cap reached");
    }

    #[test]
    fn critical_reserve_is_kept_for_critical() {
        let b = Budget::new(BudgetConfig {
            tokens_per_replica: Some(100),
            max_requests_per_replica: Some(4),
            critical_reserve: Some(0.25),
            ..Default::default()
        });
        let r = replica();
        let _a = Budget::reserve(&r, Cost::estimate(70, Some(0), 0), None);
        assert!(b.fits(&r, out(5), S, &K), "75 of 100 tokens for standard");
        assert!(!b.fits(&r, out(6), S, &K));
        assert!(b.fits(&r, out(30), Priority::Critical, &K));
        let _b = Budget::reserve(&r, Cost::estimate(1, Some(0), 0), None);
        let _c = Budget::reserve(&r, Cost::estimate(1, Some(0), 0), None);
        assert!(
            !b.fits(&r, out(1), Priority::Sheddable, &K),
            "3 of 4 requests for others"
        );
        assert!(b.fits(&r, out(1), Priority::Critical, &K));
    }

    #[test]
    fn critical_may_queue_in_the_engine_beyond_the_request_cap() {
        let b = Budget::new(BudgetConfig {
            max_requests_per_replica: Some(2),
            critical_engine_queue: Some(1),
            ..Default::default()
        });
        let r = replica();
        let _held: Vec<_> = (0..2)
            .map(|_| Budget::reserve(&r, Cost::estimate(1, Some(0), 0), None))
            .collect();
        assert!(
            !b.fits(&r, out(1), S, &K),
            "standard stops at the engine's cap"
        );
        assert!(
            b.fits(&r, out(1), Priority::Critical, &K),
            "critical may wait in the engine"
        );
        let _third = Budget::reserve(&r, Cost::estimate(1, Some(0), 0), None);
        assert!(
            !b.fits(&r, out(1), Priority::Critical, &K),
            "the engine queue is bounded"
        );
    }

    #[test]
    fn the_connection_bound_holds_for_every_band_even_without_a_budget() {
        let b = Budget::new(BudgetConfig {
            max_requests_per_replica: Some(8),
            critical_engine_queue: Some(4),
            max_connections_per_replica: 2,
            ..Default::default()
        });
        let r = replica();
        assert!(b.fits(&r, out(1), Priority::Critical, &K));
        let held: Vec<_> = (0..2)
            .map(|_| Budget::reserve(&r, Cost::estimate(1, Some(0), 0), None))
            .collect();
        for p in [Priority::Critical, S, Priority::Sheddable] {
            assert!(
                !b.fits(&r, out(1), p, &K),
                "{p:?} beyond the connection bound"
            );
        }
        drop(held);
        assert!(b.fits(&r, out(1), S, &K), "room again once a request ends");
    }

    #[test]
    fn pending_prefill_caps_non_critical_and_its_end_wakes_the_queue() {
        let b = Budget::new(BudgetConfig {
            max_prefill_tokens_per_replica: Some(100),
            ..Default::default()
        });
        let r = replica();
        let prompt = |p| Cost {
            prompt: p,
            output: 10,
        };
        assert!(
            b.fits(&r, prompt(500), S, &K),
            "an idle replica takes any prompt"
        );
        let count = Arc::new(Count::default());
        let mut first =
            Budget::reserve(&r, prompt(60), Some(count.clone())).waking_queue_on_prefill(true);
        assert!(b.fits(&r, prompt(40), S, &K));
        assert!(
            !b.fits(&r, prompt(41), S, &K),
            "60 + 41 prompt tokens pending"
        );
        assert!(
            b.fits(&r, prompt(41), Priority::Critical, &K),
            "critical ignores the cap"
        );
        first.prefill_done();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the queue hears of it");
        assert!(b.fits(&r, prompt(500), S, &K));
        first.prefill_done();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "only once");
        // Without a prefill cap the pool does not ask: no queue lock for nothing.
        let mut uncapped = Budget::reserve(&r, prompt(60), Some(count.clone()));
        uncapped.prefill_done();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn capacity_derived_from_reported_kv() {
        let b = Budget::new(BudgetConfig {
            kv_fraction: 0.5,
            ..Default::default()
        });
        let r = replica();
        assert_eq!(b.capacity(&r), None);
        let _g = Budget::reserve(&r, Cost::estimate(1_000_000, None, 0), None);
        assert!(
            b.fits(&r, out(1_000_000), S, &K),
            "unlimited when nothing is known"
        );
        let body = "vllm:num_requests_running{engine=\"0\"} 0\nvllm:num_requests_waiting{engine=\"0\"} 0\nvllm:kv_cache_usage_perc{engine=\"0\"} 0.1\nvllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",num_gpu_blocks=\"250\"} 1.0\n";
        let signals = crate::routing::signals::parse(
            infergate_protocol::EngineKind::Vllm,
            body,
            std::time::Instant::now(),
        );
        assert_eq!(signals.cache_tokens(), Some(4000));
        r.signals.store(Some(Arc::new(signals)));
        assert_eq!(b.capacity(&r), Some(2000));
        assert!(!b.fits(&r, out(1), S, &K));
    }

    /// Scrapes of `r` showing `(running, waiting)` in turn, on a KV cache of `blocks`.
    fn scrapes(r: &Replica, counts: &[(u32, u32)], blocks: u32) {
        scrapes_at_usage(r, counts, blocks, 0.5);
    }

    /// [`scrapes`] with the engine's KV cache `usage` full at each.
    fn scrapes_at_usage(r: &Replica, counts: &[(u32, u32)], blocks: u32, usage: f64) {
        let t = std::time::Instant::now();
        let mut last = None;
        for (run, wait) in counts {
            let body = format!("vllm:num_requests_running {run}\nvllm:num_requests_waiting {wait}\nvllm:kv_cache_usage_perc {usage}\nvllm:cache_config_info{{block_size=\"16\",num_gpu_blocks=\"{blocks}\"}} 1\n");
            let s = crate::routing::signals::parse(infergate_protocol::EngineKind::Vllm, &body, t)
                .with_context(0, 0, last.as_ref());
            last = Some(s);
        }
        r.signals.store(last.map(Arc::new));
    }

    /// A replica whose scrapes showed a full batch of `batch` three times in a row.
    pub(crate) fn scraped(r: &Replica, batch: u32, blocks: u32) {
        scrapes(r, &[(batch, 3), (batch, 2), (batch, 2)], blocks);
    }

    #[test]
    fn slow_start_caps_a_replica_until_its_batch_is_learned() {
        let b = Budget::new(BudgetConfig::default());
        let r = replica();
        assert_eq!(b.batch(&r), None, "no metrics: no cap");
        scrapes(&r, &[(0, 0)], 100_000);
        assert_eq!(b.batch(&r), Some(4), "idle: the slow-start cap");
        let held: Vec<_> = (0..4)
            .map(|_| Budget::reserve(&r, Cost::estimate(10, Some(10), 0), None))
            .collect();
        assert!(!b.fits(&r, out(1), S, &K), "a flood stops at 4");
        // The engine runs them all: the cap doubles.
        scrapes(&r, &[(4, 0)], 100_000);
        assert!(b.fits(&r, out(1), S, &K));
        assert_eq!(b.batch(&r), Some(8));
        // It runs 6 of 8 with a queue three scrapes in a row: its batch is 6.
        scrapes(&r, &[(6, 2), (6, 2), (6, 2)], 100_000);
        assert_eq!(b.batch(&r), Some(6));
        // A failed scrape: no cap from it (the engine's load is unknown).
        r.signals
            .store(Some(Arc::new(crate::routing::signals::Signals::failed(
                std::time::Instant::now(),
                "refused",
            ))));
        assert_eq!(b.batch(&r), None);
        drop(held);
    }

    #[test]
    fn slow_start_grows_on_a_replica_that_answers_between_scrapes() {
        // The engine reads `running 0` at every scrape (it answers faster
        // than the scrape interval) while the gateway keeps the cap full:
        // the cap doubles per scrape. Twice `running` alone held such a
        // replica at 4 requests at once (a fast upstream at 0.38x nginx).
        let b = Budget::new(BudgetConfig::default());
        let r = replica();
        let t = std::time::Instant::now();
        let body = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0.1\n";
        let mut last: Option<crate::routing::signals::Signals> = None;
        let mut caps = vec![];
        for _ in 0..4 {
            let cap = last.as_ref().map_or(4, |s| s.slow_start_cap);
            let s = crate::routing::signals::parse(infergate_protocol::EngineKind::Vllm, body, t)
                .with_context(cap, cap, last.as_ref());
            r.signals.store(Some(Arc::new(s.clone())));
            caps.push(b.batch(&r));
            last = Some(s);
        }
        assert_eq!(caps, [Some(4), Some(8), Some(16), Some(32)]);
        // Below the cap, it holds.
        let s = crate::routing::signals::parse(infergate_protocol::EngineKind::Vllm, body, t)
            .with_context(3, 3, last.as_ref());
        r.signals.store(Some(Arc::new(s)));
        assert_eq!(b.batch(&r), Some(32));
    }

    #[test]
    fn self_tuning_caps_at_the_learned_batch_and_keeps_the_derived_reserve() {
        let b = Budget::new(BudgetConfig::default());
        let r = replica();
        assert_eq!(b.batch(&r), None, "nothing learned: no cap");
        scraped(&r, 16, 100_000);
        assert_eq!(b.batch(&r), Some(16));
        // Critical traffic at 60% of the batch: 1 slot kept (1/16 of the
        // batch, tuning::Knobs::critical_slots) and 1 in the engine's queue.
        let k = Knobs {
            critical_in_flight_per_replica: 9.6,
            ..K
        };
        let held: Vec<_> = (0..15)
            .map(|_| Budget::reserve(&r, Cost::estimate(10, Some(10), 0), None))
            .collect();
        assert!(!b.fits(&r, out(1), S, &k), "standard stops at 16 - 1");
        assert!(b.fits(&r, out(1), S, &K), "no critical traffic: no reserve");
        assert!(b.fits(&r, out(1), Priority::Critical, &k));
        let more: Vec<_> = (0..2)
            .map(|_| Budget::reserve(&r, Cost::estimate(10, Some(10), 0), None))
            .collect();
        assert!(
            !b.fits(&r, out(1), Priority::Critical, &k),
            "the batch and its one queued critical"
        );
        // Engine priority: the same (vLLM V1 does not preempt a running
        // sequence for a slot); it used to let a whole batch of critical
        // requests past the cap, and keep no reserve.
        let ep = Knobs {
            engine_priority: true,
            ..k
        };
        assert!(!b.fits(&r, out(1), Priority::Critical, &ep));
        drop(more);
        assert!(
            !b.fits(&r, out(1), S, &ep),
            "the reserve stays with engine priority"
        );
        // A hand-set value wins.
        let fixed = Budget::new(BudgetConfig {
            max_requests_per_replica: Some(15),
            critical_reserve: Some(0.0),
            ..Default::default()
        });
        assert!(!fixed.fits(&r, out(1), S, &k));
        drop(held);
        assert!(fixed.fits(&r, out(1), S, &k));
        // Self-tuning off: nothing derived.
        let off = Budget::new(BudgetConfig {
            self_tuning: false,
            ..Default::default()
        });
        assert_eq!(off.batch(&r), None);
    }

    #[test]
    fn a_kv_bound_replica_is_not_capped_at_a_running_count_seen_under_a_full_cache() {
        // The tight shared-prefix fleet: 2,048 blocks (32k tokens), the
        // engine queueing at 30 running because its cache is full (the
        // streams' cached prefixes plus their own tokens), not its batch.
        let b = Budget::new(BudgetConfig::default());
        let kv_bound = replica();
        scrapes_at_usage(&kv_bound, &[(30, 3), (30, 2), (30, 2)], 2048, 0.97);
        let learned = kv_bound
            .signals
            .load()
            .as_ref()
            .and_then(|s| s.saturated_batch);
        assert_eq!(learned, None, "no batch learned behind a full cache");
        // Streams that each add 200 uncached prompt tokens and 150 of
        // output (their 3,000-token system prompt is cached): the request
        // cap does not stop the 31st to 40th, the KV projection decides.
        let req = Cost::estimate(200, Some(150), 0);
        let held: Vec<_> = (0..40)
            .map(|_| Budget::reserve(&kv_bound, req, None))
            .collect();
        assert_eq!(
            b.room_past_cap(&kv_bound, req, S, &K, PastCap::default()),
            Ok(())
        );
        // Streams whose own tokens overfill the cache are still refused by it.
        let long = Cost::estimate(20_000, Some(150), 0);
        assert_eq!(
            b.room_past_cap(&kv_bound, long, S, &K, PastCap::default()),
            Err(NoRoom::KvBudget)
        );
        drop(held);

        // The same counts with the cache half used: the batch is what
        // bound it, and the replica is capped at it.
        let batch_bound = replica();
        scrapes_at_usage(&batch_bound, &[(30, 3), (30, 2), (30, 2)], 2048, 0.5);
        assert_eq!(b.batch(&batch_bound), Some(30));
        let held: Vec<_> = (0..30)
            .map(|_| Budget::reserve(&batch_bound, req, None))
            .collect();
        assert_eq!(
            b.room_past_cap(&batch_bound, req, S, &K, PastCap::default()),
            Err(NoRoom::RequestCap)
        );
        drop(held);
    }

    #[test]
    fn kv_bound_replicas_count_the_reserve_in_requests_their_budget_holds() {
        let b = Budget::new(BudgetConfig::default());
        let r = replica();
        // 4,096 KV tokens; no batch learned (the KV cache limits first).
        scrapes(&r, &[(3, 0)], 256);
        assert_eq!((b.batch(&r), b.capacity(&r)), (Some(6), Some(4096)));
        let k = Knobs {
            critical_in_flight_per_replica: 4.0,
            ..K
        };
        // 64 + 500-token requests: the budget holds 12 evenly spaced
        // (prompt and half the output each); 1 slot of 12 is kept, so 5 of
        // the slow-start cap's 6 for the others.
        let req = Cost::estimate(64, Some(500), 0);
        let _held: Vec<_> = (0..5).map(|_| Budget::reserve(&r, req, None)).collect();
        assert!(!b.fits(&r, req, S, &k), "5 of 6 for the others");
        assert!(b.fits(&r, req, Priority::Critical, &k));
    }

    #[test]
    fn kv_peak_is_the_most_the_streams_hold_before_one_ends() {
        assert_eq!(kv_peak(&mut [], 15), 0);
        // Three streams that started together: all reach 564 tokens at once.
        assert_eq!(kv_peak(&mut [(64, 500); 3], 0), 3 * 564);
        // The same three at different ages: the longest alone reaches 564,
        // the three together peak before the youngest-but-one ends.
        let mut aged = [(514, 50), (64, 500), (314, 250)];
        assert_eq!(kv_peak(&mut aged, 0), 64 + 314 + 514 + 3 * 50);
        assert_eq!(kv_peak(&mut [(10, 0), (20, 0)], 15), 30 + 2 * 15);
        // One long stream past a crowd of short ones that end first.
        assert_eq!(kv_peak(&mut [(100, 10); 4], 0), 440);
        assert_eq!(kv_peak(&mut [(100, 10), (100, 10), (0, 1000)], 0), 1000);
    }

    /// The most `streams` hold at once from now on with `slack` tokens more
    /// per stream (a bound around [`kv_peak_within`]'s block count: `0` from
    /// below, `block − 1` from above).
    fn kv_peak(streams: &mut [(u64, u64)], slack: u64) -> u64 {
        streams.sort_unstable_by_key(|s| std::cmp::Reverse(s.1));
        let (mut held, mut count, mut peak) = (0u64, 0u64, 0u64);
        for &(h, left) in streams.iter() {
            held += h + slack;
            count += 1;
            peak = peak.max(held + count * left);
        }
        peak
    }

    /// What `streams` hold at their fullest, in whole blocks, found by
    /// walking every engine step (the reference for [`kv_peak_within`]).
    fn peak_in_blocks_step_by_step(streams: &[(u64, u64)], block: u64) -> u64 {
        let last = streams.iter().map(|s| s.1).max().unwrap_or(0);
        (0..=last)
            .map(|t| {
                streams
                    .iter()
                    .filter(|s| s.1 >= t)
                    .map(|&(h, _)| (h + t).div_ceil(block) * block)
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0)
    }

    proptest::proptest! {
        #[test]
        fn kv_peak_within_agrees_with_a_step_by_step_walk(
            streams in proptest::collection::vec((0u64..300, 0u64..60), 0..12),
            block in 1u64..33,
            limit in 0u64..4000,
        ) {
            let peak = peak_in_blocks_step_by_step(&streams, block);
            proptest::prop_assert_eq!(kv_peak_within(&mut streams.clone(), block, limit), peak <= limit);
            // The slack bounds around it.
            proptest::prop_assert!(kv_peak(&mut streams.clone(), 0) <= peak);
            proptest::prop_assert!(peak <= kv_peak(&mut streams.clone(), block - 1));
        }
    }

    #[test]
    fn two_long_prompts_that_fill_a_small_cache_in_whole_blocks_both_fit() {
        // 2,010 + 32 tokens take 128 blocks of 16 at their end: two fill a
        // 256-block cache exactly. A slack of 15 tokens per stream
        // (2 x 2,057 = 4,114) would have refused the second.
        let two = [(2010, 32), (2010, 32)];
        assert!(kv_peak_within(&mut two.clone(), 16, 4096));
        assert!(kv_peak(&mut two.clone(), 15) > 4096);
        // 2,049 tokens each need a 129th block: not both.
        assert!(kv_peak_within(&mut [(2016, 32), (2016, 32)], 16, 4096));
        assert!(!kv_peak_within(&mut [(2017, 32), (2017, 32)], 16, 4096));
        // Through the budget: a replica holding one such stream takes a second.
        let r = replica();
        scraped(&r, 16, 256);
        let b = Budget::new(BudgetConfig::default());
        let req = Cost::estimate(2010, Some(32), 0);
        let _first = Budget::reserve(&r, req, None);
        assert!(b.fits(&r, req, Priority::Critical, &K));
    }

    #[test]
    fn a_kv_bound_replica_paces_queued_starts_before_its_batch_is_learned() {
        // 4,096 KV tokens, no batch learned: the KV cache limits first.
        let r = replica();
        scrapes(&r, &[(3, 0)], 256);
        let b = Budget::new(BudgetConfig::default());
        let k = Knobs { service: 3.25, ..K };
        // 64 + 500-token streams: evenly spaced, the cache holds 12
        // ((4,096 - 250) / (64 + 250)), so one start per 3.25 s / 12, no headroom.
        let long = Cost::estimate(64, Some(500), 0);
        let pace = b.pace(&r, &k, long).expect("paced on its KV slots");
        assert_eq!(pace.interval(), Duration::from_nanos(270_833_333));
        // Service time not learned yet: no pacing.
        assert_eq!(b.pace(&r, &K, long), None);
        // A learned batch above the KV slots: the fewer counts.
        scraped(&r, 16, 256);
        assert_eq!(
            b.pace(&r, &k, long).map(|p| p.interval()),
            Some(Duration::from_nanos(270_833_333))
        );
        // Short requests: the batch (16) is the fewer, with its headroom.
        let short = Cost::estimate(64, Some(32), 0);
        assert_eq!(
            b.pace(&r, &k, short).map(|p| p.interval()),
            Some(Duration::from_nanos(162_500_000))
        );
        // A hand-set token budget is not the engine's KV cache: batch only.
        let fixed = Budget::new(BudgetConfig {
            tokens_per_replica: Some(4096),
            ..Default::default()
        });
        assert_eq!(
            fixed.pace(&r, &k, long).map(|p| p.interval()),
            Some(Duration::from_nanos(162_500_000))
        );
        // Self-tuning off: never paced.
        let off = Budget::new(BudgetConfig {
            self_tuning: false,
            ..Default::default()
        });
        assert_eq!(off.pace(&r, &k, long), None);
    }

    /// Streams in flight on average on `r` (a 4,096-token cache) fed by a
    /// queue that never empties with 64 + 500-token requests, one engine
    /// step (one token per stream) every 10 ms, queued starts paced by
    /// `pace` and admitted by `b`'s projection: steps 3,000 to 6,000, after
    /// six lifetimes.
    fn in_flight_with_queued_starts(b: &Budget, r: &Arc<Replica>, pace: tuning::Pace) -> f64 {
        let req = Cost::estimate(64, Some(500), 0);
        let k = Knobs { service: 5.0, ..K };
        let next = AtomicU64::new(0);
        let t0 = Instant::now();
        let mut streams: Vec<(Reservation, u64)> = vec![];
        let mut sum = 0usize;
        for step in 0..6000u64 {
            let now = t0 + Duration::from_millis(10 * step);
            for (s, generated) in streams.iter_mut() {
                *generated += 1;
                s.observe_generated(*generated);
            }
            streams.retain(|(_, generated)| *generated < req.output);
            while pace.allowed_at(&next) <= now && b.fits(r, req, S, &k) {
                pace.started(&next, now);
                streams.push((Budget::reserve(r, req, None), 0));
            }
            if step >= 3000 {
                sum += streams.len();
            }
        }
        sum as f64 / 3000.0
    }

    #[test]
    fn a_kv_bound_replica_paced_at_its_evenly_spaced_slots_fills_its_cache() {
        // 4,096 KV tokens, a batch of 16 learned; 64 + 500-token streams of
        // 5 s. Evenly spaced, 12 fit the projection; starts packed at the
        // batch's headroom (5 s / (13 x 1.25), the rule before) make a
        // group that fills the projection before a lifetime is covered, and
        // the gap after it repeats.
        let b = Budget::new(BudgetConfig::default());
        let r = replica();
        scraped(&r, 16, 256);
        let k = Knobs { service: 5.0, ..K };
        let req = Cost::estimate(64, Some(500), 0);
        let pace = b.pace(&r, &k, req).expect("paced");
        let packed = tuning::Pace::new(5.0, 13).expect("paced");
        let even = in_flight_with_queued_starts(&b, &r, pace);
        let bunched = in_flight_with_queued_starts(&b, &r, packed);
        // 10 against 9: the evenly spaced group covers more of a lifetime.
        assert!(
            even >= 9.9 && even >= bunched + 0.9,
            "evenly spaced starts hold {even:.2} streams, packed {bunched:.2}"
        );
    }

    #[test]
    fn a_kv_bound_replica_takes_more_streams_when_their_ages_differ() {
        // 4,096 KV tokens in 16-token blocks, a batch of 16 learned.
        let r = replica();
        scraped(&r, 16, 256);
        let tuned = Budget::new(BudgetConfig::default());
        let whole_life = Budget::new(BudgetConfig {
            self_tuning: false,
            ..Default::default()
        });
        let req = Cost::estimate(64, Some(500), 0);
        // Ten streams of 64 + 500 tokens started 50 tokens apart (paced
        // starts): 10 x 564 = 5,640 tokens if each held its whole life,
        // but with an eleventh they peak at 3,600 in whole blocks.
        let mut held = vec![];
        for i in 0..10u64 {
            let mut s = Budget::reserve(&r, req, None);
            s.observe_generated(50 * i);
            held.push(s);
        }
        assert!(tuned.fits(&r, req, S, &K), "an eleventh fits the cache");
        assert!(
            !whole_life.fits(&r, req, S, &K),
            "prompt + max_tokens for the whole life: 7 at most"
        );
        drop(held);
        // Seven that started together reach 564 tokens each at once: an
        // eighth would need 8 x 576 (36 blocks each) > 4,096.
        let cohort: Vec<_> = (0..7).map(|_| Budget::reserve(&r, req, None)).collect();
        assert!(!tuned.fits(&r, req, S, &K), "a cohort is not overfilled");
        drop(cohort);
        assert!(tuned.fits(&r, req, S, &K));
    }

    #[test]
    fn derived_prefill_cap_spreads_admissions() {
        let b = Budget::new(BudgetConfig::default());
        let r = replica();
        scraped(&r, 16, 100_000);
        let k = Knobs {
            prefill_step_tokens: Some(100),
            prefill_per_slot: 1.0,
            critical_in_flight_per_replica: 0.5,
            ..K
        };
        let prompt = |p| Cost {
            prompt: p,
            output: 10,
        };
        let _first = Budget::reserve(&r, prompt(60), None);
        assert!(b.fits(&r, prompt(40), S, &k));
        assert!(!b.fits(&r, prompt(41), S, &k), "one step's prefill");
        assert!(b.fits(&r, prompt(41), S, &K), "not learned yet: no cap");
        assert!(b.fits(&r, prompt(41), Priority::Critical, &k));
        // No critical traffic seen: no critical arrival to keep the
        // prefill short for, so no derived cap.
        let quiet = Knobs {
            critical_in_flight_per_replica: 0.0,
            ..k
        };
        assert!(b.fits(&r, prompt(10_000), S, &quiet));
        // A hand-set cap holds whatever the traffic.
        let hand = Budget::new(BudgetConfig {
            max_prefill_tokens_per_replica: Some(100),
            ..Default::default()
        });
        assert!(!hand.fits(&r, prompt(41), S, &quiet));
    }

    #[test]
    fn a_cached_prefix_is_not_reserved_again() {
        let r = replica();
        // The picker found 900 of 1,000 prompt tokens cached on the replica.
        let guard = r.begin(1050, 100).with_cached_tokens(900);
        let mut res = Budget::reserve_guard(guard, Cost::estimate(1000, Some(50), 16), None);
        assert_eq!(r.load.tokens(), 150);
        res.prefill_done();
        res.observe_generated(60);
        assert_eq!(r.load.tokens(), 160);
        res.observe_usage(1010, 60);
        assert_eq!(r.load.tokens(), 170);
        drop(res);
        assert_eq!(r.load.tokens(), 0);
    }

    #[test]
    fn estimate_is_corrected_by_stream_and_usage_and_released() {
        let r = replica();
        let l = Arc::new(Count::default());
        let mut res = Budget::reserve(&r, Cost::estimate(100, None, 50), Some(l.clone()))
            .waking_queue_on_prefill(true);
        assert_eq!(r.load.tokens(), 150);
        assert_eq!(r.load.prefill_tokens(), 100);
        res.prefill_done();
        assert_eq!(r.load.prefill_tokens(), 0);
        assert_eq!(l.0.load(Ordering::SeqCst), 1, "prefill end notifies");
        res.observe_generated(30);
        assert_eq!(r.load.tokens(), 150, "within the estimate: unchanged");
        let streams = |r: &Replica| {
            let mut v = vec![];
            r.load.each_stream(|h, l| v.push((h, l)));
            v
        };
        assert_eq!(streams(&r), [(130, 20)], "held now, still to come");
        res.observe_generated(80);
        assert_eq!(r.load.tokens(), 180, "grows past the estimate");
        // The engine's count differs from ours: actual usage wins.
        res.observe_usage(90, 70);
        assert_eq!(r.load.tokens(), 160);
        assert_eq!(
            l.0.load(Ordering::SeqCst),
            2,
            "downward correction notifies"
        );
        res.observe_generated(500);
        assert_eq!(r.load.tokens(), 160, "final usage is not overridden");
        assert_eq!(streams(&r), [(160, 0)]);
        drop(res);
        assert_eq!(streams(&r), [], "the stream leaves the replica's list");
        assert_eq!((r.load.tokens(), r.load.requests()), (0, 0));
        assert_eq!(l.0.load(Ordering::SeqCst), 3);
        assert_eq!(l.1.load(Ordering::SeqCst), 20 + 160);
    }
}

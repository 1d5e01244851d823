//! The engine of one replica: vLLM-style continuous batching over a KV cache.
//!
//! Synchronous and clock-free: [`Engine::schedule`] plans one step (admissions,
//! chunked prefill, one decode token per running sequence, preemption when the
//! cache is full) and returns its modelled duration; [`Engine::finish_step`]
//! applies it once that time has passed. The fleet's clock thread
//! (`clock.rs`) drives the two in real time, and unit tests drive them
//! directly, so the model is tested exactly, without wall-clock noise.
//!
//! A sequence talks to its HTTP response through [`SeqShared`]: atomics for the
//! tokens generated so far and the status, and one waker, so a step wakes each
//! stream once and allocates nothing per token.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::task::AtomicWaker;

use super::config::EngineParams;
use super::events::EventSink;
use super::histogram::Histogram;
use super::kv::{BlockId, BlockPool, BlockTokens};

/// Why a sequence ended (or that it has not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum SeqStatus {
    Active = 0,
    /// Reached `max_tokens`.
    Length = 1,
    /// Ended before `max_tokens` (output-length distribution).
    Stop = 2,
    /// Dropped by the engine (crash, or a request that can never fit).
    Failed = 3,
}

impl SeqStatus {
    fn from_u8(v: u8) -> SeqStatus {
        match v {
            1 => SeqStatus::Length,
            2 => SeqStatus::Stop,
            3 => SeqStatus::Failed,
            _ => SeqStatus::Active,
        }
    }
    /// The OpenAI `finish_reason`.
    pub(crate) fn finish_reason(self) -> &'static str {
        match self {
            SeqStatus::Stop => "stop",
            _ => "length",
        }
    }
}

/// State shared between a sequence in the engine and its HTTP response.
#[derive(Debug)]
pub(crate) struct SeqShared {
    pub id: u64,
    pub prompt_tokens: u32,
    generated: AtomicU32,
    status: AtomicU8,
    cached_tokens: AtomicU32,
    pub waker: AtomicWaker,
}

impl SeqShared {
    pub(crate) fn new(id: u64, prompt_tokens: u32) -> Self {
        SeqShared {
            id,
            prompt_tokens,
            generated: AtomicU32::new(0),
            status: AtomicU8::new(SeqStatus::Active as u8),
            cached_tokens: AtomicU32::new(0),
            waker: AtomicWaker::new(),
        }
    }
    /// Status, then the tokens generated (read in that order, a final status
    /// guarantees the final count).
    pub(crate) fn progress(&self) -> (SeqStatus, u32) {
        let s = SeqStatus::from_u8(self.status.load(Ordering::Acquire));
        (s, self.generated.load(Ordering::Acquire))
    }
    pub(crate) fn cached_tokens(&self) -> u32 {
        self.cached_tokens.load(Ordering::Acquire)
    }
    fn end(&self, status: SeqStatus) {
        self.status.store(status as u8, Ordering::Release);
        self.waker.wake();
    }
}

/// A request as submitted to the engine.
#[derive(Debug)]
pub(crate) struct NewSeq {
    pub shared: Arc<SeqShared>,
    /// Chained hashes of the prompt's full blocks.
    pub hashes: Vec<u64>,
    /// The prompt's token ids, for KV events (empty when they are off).
    pub token_ids: Vec<u32>,
    /// Tokens to generate.
    pub output_tokens: u32,
    /// True when `output_tokens` is the request's `max_tokens` (finish `length`).
    pub hits_max_tokens: bool,
    /// LoRA adapter index, if the request names one.
    pub lora: Option<u16>,
    pub arrival: Instant,
    /// The request's `priority` (lower first; priority scheduling only).
    pub priority: i64,
}

#[derive(Debug)]
struct Seq {
    new: NewSeq,
    /// Tokens generated so far.
    output: u32,
    num_computed: u32,
    blocks: Vec<BlockId>,
    /// Prompt blocks whose hash is registered.
    registered: usize,
    /// Tokens scheduled in the step in flight.
    scheduled: u32,
    admitted_once: bool,
    last_token: Instant,
}

impl Seq {
    fn num_tokens(&self) -> u32 {
        self.new.shared.prompt_tokens + self.output
    }

    /// Rank under priority scheduling: lower goes first.
    fn rank(&self) -> (i64, Instant) {
        (self.new.priority, self.new.arrival)
    }
}

/// Cumulative counters of one replica.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub requests_received: u64,
    pub requests_aborted: u64,
    pub requests_failed: u64,
    pub success_length: u64,
    pub success_stop: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// Prompt tokens looked up in the prefix cache (vLLM counts tokens).
    pub prefix_cache_queries: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
    pub lora_loads: u64,
    pub steps: u64,
    /// Sum of modelled step durations, wall-clock microseconds (after time scale).
    pub modelled_step_us: f64,
    /// Sum of observed step durations, microseconds.
    pub observed_step_us: f64,
    /// Sum of |observed - modelled| per step, microseconds.
    pub step_abs_error_us: f64,
}

/// A point-in-time view of the engine.
#[derive(Debug, Clone, Default)]
pub(crate) struct EngineSnapshot {
    pub(crate) running: usize,
    pub(crate) waiting: usize,
    pub(crate) kv_blocks_used: u32,
    pub(crate) kv_blocks_total: u32,
    pub(crate) kv_blocks_cached: usize,
    /// Tokens of the running sequences (prompt + output so far).
    pub(crate) tokens_in_use: u64,
    pub(crate) counters: Counters,
    pub(crate) running_loras: Vec<u16>,
    pub(crate) waiting_loras: Vec<u16>,
    pub(crate) resident_loras: Vec<u16>,
}

/// The scheduler state of one replica.
#[derive(Debug)]
pub(crate) struct Engine {
    p: EngineParams,
    kv: BlockPool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Resident adapters with their last-use tick.
    loras: Vec<(u16, u64)>,
    tick: u64,
    pub counters: Counters,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    /// When each client-disconnect abort happened.
    pub aborted_at: Vec<Instant>,
    /// Adapter names by index, for KV events.
    lora_names: Vec<String>,
}

impl Engine {
    #[cfg(test)]
    pub(crate) fn new(p: EngineParams) -> Self {
        Self::with_events(p, None, Vec::new())
    }

    /// An engine whose cache sends its changes to `events` (see `kv.rs`).
    pub(crate) fn with_events(p: EngineParams, events: EventSink, lora_names: Vec<String>) -> Self {
        Engine {
            kv: BlockPool::new(p.num_gpu_blocks, p.block_size, events),
            lora_names,
            p,
            waiting: VecDeque::new(),
            running: Vec::new(),
            loras: Vec::new(),
            tick: 0,
            counters: Counters::default(),
            ttft: Histogram::ttft(),
            itl: Histogram::itl(),
            e2e: Histogram::e2e(),
            aborted_at: Vec::new(),
        }
    }

    pub(crate) fn params(&self) -> &EngineParams {
        &self.p
    }

    /// Queues a request.
    pub(crate) fn submit(&mut self, new: NewSeq) {
        self.counters.requests_received += 1;
        self.counters.prompt_tokens += u64::from(new.shared.prompt_tokens);
        let arrival = new.arrival;
        let seq = Seq {
            new,
            output: 0,
            num_computed: 0,
            blocks: Vec::new(),
            registered: 0,
            scheduled: 0,
            admitted_once: false,
            last_token: arrival,
        };
        if self.p.priority_scheduling {
            self.enqueue_ranked(seq);
        } else {
            self.waiting.push_back(seq);
        }
    }

    /// Inserts into the waiting queue ordered by (priority, arrival).
    fn enqueue_ranked(&mut self, seq: Seq) {
        let at = self.waiting.partition_point(|w| w.rank() <= seq.rank());
        self.waiting.insert(at, seq);
    }

    /// Takes a running sequence out to recompute it later: FCFS preempts the
    /// newest (back of the queue's front), priority scheduling the
    /// lowest-ranked (into its place in the queue).
    fn preempt(&mut self, index: usize) {
        let mut victim = self.running.remove(index);
        self.kv.release(&mut victim.blocks);
        victim.num_computed = 0;
        victim.registered = 0;
        victim.scheduled = 0;
        self.counters.preemptions += 1;
        if self.p.priority_scheduling {
            self.enqueue_ranked(victim);
        } else {
            self.waiting.push_front(victim);
        }
    }

    /// Takes a running sequence's part of the step being planned back out of
    /// the step's (prefill tokens, decoding sequences, their context tokens)
    /// and token budget.
    fn take_back(s: &Seq, work: (&mut u64, &mut u64, &mut u64), budget: &mut u32) {
        let (prefill, decode_seqs, decode_ctx) = work;
        match s.scheduled {
            0 => {}
            1 if s.output > 0 && s.num_tokens() - s.num_computed == 1 => {
                *decode_seqs -= 1;
                *decode_ctx -= u64::from(s.num_computed);
            }
            n => *prefill -= u64::from(n),
        }
        *budget += s.scheduled;
    }

    /// The running sequence a full cache (or, under priority scheduling, a
    /// higher-priority arrival) preempts: the newest, or the lowest-ranked.
    fn victim(&self) -> Option<usize> {
        if self.p.priority_scheduling {
            (0..self.running.len()).max_by_key(|&i| self.running[i].rank())
        } else {
            self.running.len().checked_sub(1)
        }
    }

    /// Plans one step. Returns its modelled duration in microseconds, or `None`
    /// when there is no work.
    pub(crate) fn schedule(&mut self) -> Option<f64> {
        let bs = self.p.block_size;
        let mut budget = self.p.max_num_batched_tokens;
        let (mut prefill, mut decode_seqs, mut decode_ctx, mut lora_loads) =
            (0u64, 0u64, 0u64, 0u32);
        let mut scheduled_any = false;
        let mut preempted = false;

        // Running sequences first, in arrival order.
        let mut i = 0;
        'running: while i < self.running.len() && budget > 0 {
            let need = self.running[i].num_tokens() - self.running[i].num_computed;
            let n = need.min(budget);
            loop {
                let seq = &mut self.running[i];
                if self.kv.ensure(&mut seq.blocks, seq.num_computed + n) {
                    break;
                }
                // Cache full: preempt the newest (FCFS) or lowest-ranked
                // running sequence (recompute later).
                let Some(v) = self.victim() else {
                    break 'running;
                };
                if v < i {
                    // Already scheduled in this step: take its part back.
                    let work = (&mut prefill, &mut decode_seqs, &mut decode_ctx);
                    Self::take_back(&self.running[v], work, &mut budget);
                    i -= 1;
                }
                self.preempt(v);
                preempted = true;
                if v == i || self.running.len() <= i {
                    // The sequence itself went back to waiting.
                    continue 'running;
                }
            }
            let seq = &mut self.running[i];
            if seq.output > 0 && need == 1 {
                decode_seqs += 1;
                decode_ctx += u64::from(seq.num_computed);
            } else {
                prefill += u64::from(n);
            }
            seq.scheduled = n;
            budget -= n;
            Self::register_full_blocks(&mut self.kv, seq, bs, &self.lora_names);
            scheduled_any = true;
            i += 1;
        }

        // Preemptive priority scheduling (vLLM V0, SGLang; not vLLM V1): a
        // waiting request that outranks a running one while the batch is
        // full takes the lowest-ranked one's slot (it is recomputed later),
        // before this step's admissions.
        if self.p.priority_scheduling && self.p.priority_preemption && !preempted {
            while self.running.len() as u32 >= self.p.max_num_seqs {
                let (Some(head), Some(v)) = (self.waiting.front(), self.victim()) else {
                    break;
                };
                if head.rank() >= self.running[v].rank() {
                    break;
                }
                let work = (&mut prefill, &mut decode_seqs, &mut decode_ctx);
                Self::take_back(&self.running[v], work, &mut budget);
                self.preempt(v);
            }
        }

        // Then admit waiting ones, unless this step had to preempt for cache.
        let mut wi = 0;
        while !preempted
            && wi < self.waiting.len()
            && budget > 0
            && (self.running.len() as u32) < self.p.max_num_seqs
        {
            if let Some(adapter) = self.waiting[wi].new.lora {
                match self.make_resident(adapter) {
                    Some(loaded) => lora_loads += u32::from(loaded),
                    None => {
                        wi += 1;
                        continue;
                    }
                }
            }
            let seq = &mut self.waiting[wi];
            let max_hit = ((seq.num_tokens().saturating_sub(1)) / bs) as usize;
            let hit = self.kv.lookup(&seq.new.hashes, max_hit);
            self.kv
                .acquire_cached(&seq.new.hashes, hit, &mut seq.blocks);
            seq.num_computed = hit as u32 * bs;
            seq.registered = hit;
            let n = (seq.num_tokens() - seq.num_computed).min(budget);
            if !self.kv.ensure(&mut seq.blocks, seq.num_computed + n) {
                self.kv.release(&mut seq.blocks);
                seq.num_computed = 0;
                seq.registered = 0;
                break;
            }
            if !seq.admitted_once {
                seq.admitted_once = true;
                let cached = seq.num_computed;
                seq.new
                    .shared
                    .cached_tokens
                    .store(cached, Ordering::Release);
                self.counters.prefix_cache_queries += u64::from(seq.new.shared.prompt_tokens);
                self.counters.prefix_cache_hits += u64::from(cached);
            }
            prefill += u64::from(n);
            seq.scheduled = n;
            budget -= n;
            Self::register_full_blocks(&mut self.kv, seq, bs, &self.lora_names);
            scheduled_any = true;
            if let Some(seq) = self.waiting.remove(wi) {
                self.running.push(seq);
            }
        }

        if !scheduled_any {
            // Nothing runs and the head cannot be admitted even into an empty
            // cache: it never will be. Fail it instead of stalling forever.
            if self.running.is_empty() {
                if let Some(mut seq) = self.waiting.pop_front() {
                    self.kv.release(&mut seq.blocks);
                    self.counters.requests_failed += 1;
                    seq.new.shared.end(SeqStatus::Failed);
                }
            }
            return None;
        }
        self.counters.lora_loads += u64::from(lora_loads);
        Some(self.p.step_us(prefill, decode_seqs, decode_ctx, lora_loads))
    }

    fn register_full_blocks(kv: &mut BlockPool, seq: &mut Seq, bs: u32, lora_names: &[String]) {
        let upto = (((seq.num_computed + seq.scheduled) / bs) as usize).min(seq.new.hashes.len());
        if upto > seq.registered {
            let tokens = BlockTokens {
                token_ids: &seq.new.token_ids,
                lora_name: seq
                    .new
                    .lora
                    .and_then(|a| lora_names.get(usize::from(a)))
                    .map(String::as_str),
            };
            kv.register(&seq.blocks, &seq.new.hashes, seq.registered, upto, tokens);
            seq.registered = upto;
        }
    }

    /// Makes `adapter` resident. `Some(true)` if it had to be loaded, `Some(false)`
    /// if it already was, `None` if every slot holds an adapter in use.
    fn make_resident(&mut self, adapter: u16) -> Option<bool> {
        self.tick += 1;
        if let Some(slot) = self.loras.iter_mut().find(|(a, _)| *a == adapter) {
            slot.1 = self.tick;
            return Some(false);
        }
        if (self.loras.len() as u32) < self.p.max_loras.max(1) {
            self.loras.push((adapter, self.tick));
            return Some(true);
        }
        let running = &self.running;
        let victim = self
            .loras
            .iter()
            .enumerate()
            .filter(|(_, (a, _))| !running.iter().any(|s| s.new.lora == Some(*a)))
            .min_by_key(|(_, (_, t))| *t)
            .map(|(i, _)| i)?;
        self.loras[victim] = (adapter, self.tick);
        Some(true)
    }

    /// Applies the step planned by [`Self::schedule`]: every scheduled sequence
    /// whose tokens are all computed samples one token. `modelled_us` and
    /// `observed_us` are the step's wall-clock durations, for the error stats.
    pub(crate) fn finish_step(&mut self, now: Instant, modelled_us: f64, observed_us: f64) {
        let c = &mut self.counters;
        c.steps += 1;
        c.modelled_step_us += modelled_us;
        c.observed_step_us += observed_us;
        c.step_abs_error_us += (observed_us - modelled_us).abs();
        let mut finished_any = false;
        let mut itl_secs = 0.0;
        let mut itl_n = 0u64;
        for seq in &mut self.running {
            if seq.scheduled == 0 {
                continue;
            }
            seq.num_computed += seq.scheduled;
            seq.scheduled = 0;
            if seq.num_computed < seq.num_tokens() {
                continue; // chunked prefill not done yet
            }
            seq.output += 1;
            c.generation_tokens += 1;
            let since = now.saturating_duration_since(seq.last_token).as_secs_f64();
            if seq.output == 1 {
                self.ttft.observe(since);
            } else if itl_n > 0 && since != itl_secs {
                self.itl.observe_n(itl_secs, itl_n);
                itl_secs = since;
                itl_n = 1;
            } else {
                itl_secs = since;
                itl_n += 1;
            }
            seq.last_token = now;
            let shared = &seq.new.shared;
            shared.generated.store(seq.output, Ordering::Release);
            if seq.output >= seq.new.output_tokens {
                finished_any = true;
                self.e2e
                    .observe(now.saturating_duration_since(seq.new.arrival).as_secs_f64());
                let status = if seq.new.hits_max_tokens {
                    c.success_length += 1;
                    SeqStatus::Length
                } else {
                    c.success_stop += 1;
                    SeqStatus::Stop
                };
                shared.end(status);
            } else {
                shared.waker.wake();
            }
        }
        if itl_n > 0 {
            self.itl.observe_n(itl_secs, itl_n);
        }
        if finished_any {
            let kv = &mut self.kv;
            self.running.retain_mut(|s| {
                let done = s.output >= s.new.output_tokens;
                if done {
                    kv.release(&mut s.blocks);
                }
                !done
            });
        }
    }

    /// Removes a sequence whose client went away, freeing its blocks now.
    /// Returns false if it is no longer in the engine.
    pub(crate) fn abort(&mut self, id: u64, now: Instant) -> bool {
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.new.shared.id == id) {
            self.running.remove(i)
        } else if let Some(i) = self.waiting.iter().position(|s| s.new.shared.id == id) {
            match self.waiting.remove(i) {
                Some(s) => s,
                None => return false,
            }
        } else {
            return false;
        };
        self.kv.release(&mut seq.blocks);
        self.counters.requests_aborted += 1;
        self.aborted_at.push(now);
        true
    }

    /// Fails every sequence (the replica crashed) and frees the cache.
    pub(crate) fn fail_all(&mut self) {
        for mut seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            self.kv.release(&mut seq.blocks);
            self.counters.requests_failed += 1;
            seq.new.shared.end(SeqStatus::Failed);
        }
        self.loras.clear();
    }

    /// Forgets all cached prefixes (`/reset_prefix_cache`).
    pub(crate) fn reset_prefix_cache(&mut self) {
        self.kv.reset_prefix_cache();
    }

    /// Every prefix hash the cache holds.
    pub(crate) fn cached_hashes(&self) -> Vec<u64> {
        self.kv.cached_hashes()
    }

    pub(crate) fn snapshot(&self) -> EngineSnapshot {
        let mut running_loras: Vec<u16> = self.running.iter().filter_map(|s| s.new.lora).collect();
        running_loras.sort_unstable();
        running_loras.dedup();
        let mut waiting_loras: Vec<u16> = self.waiting.iter().filter_map(|s| s.new.lora).collect();
        waiting_loras.sort_unstable();
        waiting_loras.dedup();
        EngineSnapshot {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_used: self.kv.used(),
            kv_blocks_total: self.kv.total(),
            kv_blocks_cached: self.kv.cached_blocks(),
            tokens_in_use: self.running.iter().map(|s| u64::from(s.num_tokens())).sum(),
            counters: self.counters.clone(),
            running_loras,
            waiting_loras,
            resident_loras: self.loras.iter().map(|(a, _)| *a).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Profile;

    fn params() -> EngineParams {
        EngineParams {
            num_gpu_blocks: 64,
            max_num_seqs: 4,
            max_num_batched_tokens: 256,
            ..Profile::Tiny.params()
        }
    }

    fn seq(
        engine: &mut Engine,
        id: u64,
        prompt: u32,
        out: u32,
        hashes: Vec<u64>,
    ) -> Arc<SeqShared> {
        submit(engine, id, prompt, out, hashes, Instant::now(), 0)
    }

    /// A sequence with a vLLM `priority`, arriving `id` ms after a fixed start.
    fn ranked(
        engine: &mut Engine,
        id: u64,
        prompt: u32,
        out: u32,
        priority: i64,
    ) -> Arc<SeqShared> {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let arrival = *START.get_or_init(Instant::now) + std::time::Duration::from_millis(id);
        submit(engine, id, prompt, out, vec![], arrival, priority)
    }

    fn submit(
        engine: &mut Engine,
        id: u64,
        prompt: u32,
        out: u32,
        hashes: Vec<u64>,
        arrival: Instant,
        priority: i64,
    ) -> Arc<SeqShared> {
        let shared = Arc::new(SeqShared::new(id, prompt));
        engine.submit(NewSeq {
            shared: shared.clone(),
            hashes,
            token_ids: Vec::new(),
            output_tokens: out,
            hits_max_tokens: true,
            lora: None,
            arrival,
            priority,
        });
        shared
    }

    /// Runs steps until idle; returns the modelled time (us) at which each
    /// `watch`ed sequence got its first token, and the total.
    fn run(engine: &mut Engine, watch: &[&Arc<SeqShared>]) -> (Vec<f64>, f64) {
        let mut t = 0.0;
        let mut first = vec![f64::NAN; watch.len()];
        let mut guard = 0;
        while let Some(us) = engine.schedule() {
            t += us;
            engine.finish_step(Instant::now(), us, us);
            for (i, s) in watch.iter().enumerate() {
                if first[i].is_nan() && s.progress().1 > 0 {
                    first[i] = t;
                }
            }
            guard += 1;
            assert!(guard < 100_000);
        }
        (first, t)
    }

    #[test]
    fn repeated_prompt_is_faster_by_the_cached_prefill() {
        let p = params();
        let mut e = Engine::new(p.clone());
        let hashes: Vec<u64> = (1..=10).collect(); // 160 tokens = 10 full blocks
        let a = seq(&mut e, 1, 170, 1, hashes.clone());
        let (t1, _) = run(&mut e, &[&a]);
        assert_eq!(a.cached_tokens(), 0);
        let b = seq(&mut e, 2, 170, 1, hashes);
        let (t2, _) = run(&mut e, &[&b]);
        assert_eq!(b.cached_tokens(), 160);
        let saved = t1[0] - t2[0];
        assert!(
            (saved - 160.0 * p.prefill_us_per_token).abs() < 1e-6,
            "saved {saved}"
        );
        assert_eq!(e.counters.prefix_cache_hits, 160);
        assert_eq!(e.counters.prefix_cache_queries, 340);
    }

    #[test]
    fn fully_cached_prompt_still_computes_its_last_block() {
        let mut e = Engine::new(params());
        let a = seq(&mut e, 1, 32, 1, vec![1, 2]);
        run(&mut e, &[&a]);
        let b = seq(&mut e, 2, 32, 1, vec![1, 2]);
        run(&mut e, &[&b]);
        assert_eq!(
            b.cached_tokens(),
            16,
            "vLLM never serves the whole prompt from cache"
        );
    }

    #[test]
    fn ttft_grows_with_queue_length() {
        let p = params(); // max_num_seqs 4
        let mut e = Engine::new(p);
        let shared: Vec<_> = (0..12).map(|i| seq(&mut e, i, 64, 8, vec![])).collect();
        let refs: Vec<&Arc<SeqShared>> = shared.iter().collect();
        let (first, _) = run(&mut e, &refs);
        assert!(first[4] > first[3] && first[8] > first[4], "{first:?}");
        assert!(first.windows(2).all(|w| w[1] >= w[0]));
    }

    #[test]
    fn full_cache_preempts_newest_and_everything_still_finishes() {
        let p = EngineParams {
            num_gpu_blocks: 10,
            max_num_seqs: 4,
            ..params()
        };
        let mut e = Engine::new(p);
        // Two sequences of 3 blocks of prompt growing to 6 blocks each: 12 > 10.
        let a = seq(&mut e, 1, 48, 40, vec![]);
        let b = seq(&mut e, 2, 48, 40, vec![]);
        let mut max_used = 0;
        let mut guard = 0;
        while let Some(us) = e.schedule() {
            max_used = max_used.max(e.snapshot().kv_blocks_used);
            e.finish_step(Instant::now(), us, us);
            guard += 1;
            assert!(guard < 10_000);
        }
        assert!(e.counters.preemptions >= 1);
        assert!(max_used <= 10);
        assert_eq!(a.progress(), (SeqStatus::Length, 40));
        assert_eq!(b.progress(), (SeqStatus::Length, 40));
        assert_eq!(e.snapshot().kv_blocks_used, 0);
    }

    #[test]
    fn chunked_prefill_respects_the_token_budget() {
        let p = params(); // budget 256
        let mut e = Engine::new(p.clone());
        let a = seq(&mut e, 1, 600, 1, vec![]);
        let us = e.schedule().unwrap();
        assert_eq!(us, p.step_us(256, 0, 0, 0));
        e.finish_step(Instant::now(), us, us);
        assert_eq!(a.progress().1, 0);
        let us = e.schedule().unwrap();
        e.finish_step(Instant::now(), us, us);
        let us = e.schedule().unwrap();
        assert_eq!(us, p.step_us(600 - 512, 0, 0, 0));
        e.finish_step(Instant::now(), us, us);
        assert_eq!(a.progress(), (SeqStatus::Length, 1));
    }

    #[test]
    fn abort_frees_blocks_immediately() {
        let mut e = Engine::new(params());
        let a = seq(&mut e, 1, 100, 50, vec![]);
        let us = e.schedule().unwrap();
        e.finish_step(Instant::now(), us, us);
        assert!(e.snapshot().kv_blocks_used > 0);
        assert!(e.abort(a.id, Instant::now()));
        let s = e.snapshot();
        assert_eq!(
            (s.kv_blocks_used, s.running, s.counters.requests_aborted),
            (0, 0, 1)
        );
        assert!(!e.abort(a.id, Instant::now()));
        assert!(e.schedule().is_none());
    }

    #[test]
    fn lora_slots_limit_resident_adapters() {
        let p = EngineParams {
            max_loras: 1,
            ..params()
        };
        let mut e = Engine::new(p.clone());
        let mk = |e: &mut Engine, id, lora| {
            let s = Arc::new(SeqShared::new(id, 16));
            e.submit(NewSeq {
                shared: s.clone(),
                hashes: vec![],
                token_ids: Vec::new(),
                output_tokens: 4,
                hits_max_tokens: true,
                lora: Some(lora),
                arrival: Instant::now(),
                priority: 0,
            });
            s
        };
        mk(&mut e, 1, 0);
        mk(&mut e, 2, 1);
        let us = e.schedule().unwrap();
        // Adapter 0 loads; adapter 1 must wait for the slot.
        assert_eq!(us, p.step_us(16, 0, 0, 1));
        let s = e.snapshot();
        assert_eq!((s.running, s.waiting), (1, 1));
        run(&mut e, &[]);
        assert_eq!(e.counters.lora_loads, 2);
    }

    fn priority_params(max_num_seqs: u32) -> EngineParams {
        EngineParams {
            max_num_seqs,
            priority_scheduling: true,
            ..params()
        }
    }

    /// Two running sequences (40 and `mid_out` tokens) fill a batch of 2,
    /// then a higher-priority one arrives; returns them as (low, mid, top).
    fn full_batch_then_top(e: &mut Engine, mid_out: u32) -> [Arc<SeqShared>; 3] {
        let low = ranked(e, 1, 32, 40, 2);
        let mid = ranked(e, 2, 32, mid_out, 1);
        for _ in 0..5 {
            let us = e.schedule().unwrap();
            e.finish_step(Instant::now(), us, us);
        }
        assert!(low.progress().1 > 0, "both running");
        let top = ranked(e, 3, 32, 4, 0);
        [low, mid, top]
    }

    #[test]
    fn vllm_v1_priority_never_preempts_for_a_slot_the_top_waits_at_the_head() {
        // vLLM V1: a waiting request never preempts for a batch slot; it
        // takes the first slot that frees, ahead of everything queued.
        let mut e = Engine::new(priority_params(2));
        let [low, mid, top] = full_batch_then_top(&mut e, 80);
        let queued = ranked(&mut e, 4, 32, 4, 1);
        let us = e.schedule().unwrap();
        e.finish_step(Instant::now(), us, us);
        let s = e.snapshot();
        assert_eq!((s.running, s.waiting, e.counters.preemptions), (2, 2, 0));
        assert_eq!(top.progress().1, 0, "no slot: top waits");
        // It takes the slot `low` frees (`mid` runs on), before `queued`.
        let mut guard = 0;
        while top.progress().1 == 0 {
            let us = e.schedule().unwrap();
            e.finish_step(Instant::now(), us, us);
            guard += 1;
            assert!(guard < 1000);
        }
        assert_eq!(low.progress(), (SeqStatus::Length, 40));
        assert_eq!(mid.progress().0, SeqStatus::Active);
        assert_eq!(queued.progress().1, 0, "top went first");
        run(&mut e, &[]);
        assert_eq!(e.counters.preemptions, 0);
    }

    #[test]
    fn priority_scheduling_orders_the_queue_by_priority_then_arrival() {
        let mut e = Engine::new(priority_params(1));
        let a = ranked(&mut e, 1, 16, 2, 1);
        let b = ranked(&mut e, 2, 16, 2, 0);
        let c = ranked(&mut e, 3, 16, 2, 1);
        let d = ranked(&mut e, 4, 16, 2, 0);
        let (first, _) = run(&mut e, &[&a, &b, &c, &d]);
        let mut order = [
            (first[0], 'a'),
            (first[1], 'b'),
            (first[2], 'c'),
            (first[3], 'd'),
        ];
        order.sort_by(|x, y| x.0.total_cmp(&y.0));
        assert_eq!(order.map(|o| o.1), ['b', 'd', 'a', 'c']);
        assert_eq!(
            e.counters.preemptions, 0,
            "equal or lower ranks never preempt"
        );
    }

    #[test]
    fn preemptive_priority_takes_the_lowest_running_sequences_slot() {
        let mut e = Engine::new(EngineParams {
            priority_preemption: true,
            ..priority_params(2)
        });
        // The batch is full; a critical request arrives.
        let [low, mid, top] = full_batch_then_top(&mut e, 40);
        let us = e.schedule().unwrap();
        let s = e.snapshot();
        assert_eq!((s.running, s.waiting), (2, 1), "top in, low out");
        assert_eq!(e.counters.preemptions, 1);
        e.finish_step(Instant::now(), us, us);
        assert!(
            top.progress().1 > 0,
            "top's first token in the very next step"
        );
        // Everything still finishes; the preempted one is recomputed.
        run(&mut e, &[]);
        for (seq, n) in [(&low, 40), (&mid, 40), (&top, 4)] {
            assert_eq!(seq.progress(), (SeqStatus::Length, n));
        }
        // FCFS never preempts for a later arrival.
        let mut f = Engine::new(EngineParams {
            max_num_seqs: 2,
            ..params()
        });
        ranked(&mut f, 1, 32, 40, 0);
        ranked(&mut f, 2, 32, 40, 0);
        let us = f.schedule().unwrap();
        f.finish_step(Instant::now(), us, us);
        let late = ranked(&mut f, 3, 32, 4, 0);
        let us = f.schedule().unwrap();
        f.finish_step(Instant::now(), us, us);
        assert_eq!((late.progress().1, f.counters.preemptions), (0, 0));
    }

    #[test]
    fn a_full_cache_preempts_the_lowest_priority_not_the_newest() {
        let mut e = Engine::new(EngineParams {
            num_gpu_blocks: 10,
            ..priority_params(4)
        });
        // The newest has the highest priority: the older, lower one goes.
        let low = ranked(&mut e, 1, 48, 40, 5);
        let high = ranked(&mut e, 2, 48, 40, 0);
        let mut low_preempted_while_high_ran = false;
        let mut guard = 0;
        while let Some(us) = e.schedule() {
            if e.counters.preemptions > 0 && !low_preempted_while_high_ran {
                low_preempted_while_high_ran =
                    e.snapshot().running == 1 && high.progress().0 == SeqStatus::Active;
            }
            e.finish_step(Instant::now(), us, us);
            guard += 1;
            assert!(guard < 10_000);
        }
        assert!(e.counters.preemptions >= 1);
        assert!(low_preempted_while_high_ran);
        assert_eq!(high.progress(), (SeqStatus::Length, 40));
        assert_eq!(low.progress(), (SeqStatus::Length, 40));
    }
}

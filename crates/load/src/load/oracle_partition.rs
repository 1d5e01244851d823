//! What placement alone can reach: the run's requests through one LRU cache
//! per replica (a partition of the oracle's pooled blocks), each request to
//! the replica holding most of its prompt and a new prefix to a rendezvous
//! home, plainly or weighted by cache turnover as the gateway places new
//! groups (`rendezvous.weigh_by_turnover`). No load and no timing: the gap
//! between a live fleet and this is what the engines keep for themselves
//! (running requests' and output blocks) and requests moved off their holder;
//! the gap between this and the pooled oracle is the partition's.

use serde_json::{json, Value};

use super::oracle::{Lru, Prompt};
use super::workload::splitmix64;

/// A new prefix's group key: its first 4 blocks, as the gateway's `rendezvous.blocks`.
const GROUP_BLOCKS: usize = 4;
/// How many requests the eviction rates remember (10 s at 40 requests/s, as the
/// gateway's 10 s).
const RATE_MEMORY_REQUESTS: f64 = 400.0;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Placement {
    /// The highest rendezvous hash of (group, replica).
    Plain,
    /// Weighted rendezvous, weight = 1 / the cache's recent eviction rate.
    ByTurnover,
}

struct Cache {
    lru: Lru,
    /// Decaying count of evicted blocks, and the total at the last request.
    eviction_rate: f64,
    evicted_seen: u64,
}

/// Partitioned LRU caches fed requests in send order.
pub struct Partitioned {
    caches: Vec<Cache>,
    block_size: usize,
    placement: Placement,
    decay: f64,
    hits: u64,
    queries: u64,
}

impl Partitioned {
    pub fn new(
        replicas: usize,
        blocks_each: usize,
        block_size: usize,
        placement: Placement,
    ) -> Self {
        let caches = (0..replicas.max(1))
            .map(|_| Cache {
                lru: Lru::new(blocks_each),
                eviction_rate: 0.0,
                evicted_seen: 0,
            })
            .collect();
        Self {
            caches,
            block_size: block_size.max(1),
            placement,
            decay: (-1.0 / RATE_MEMORY_REQUESTS).exp(),
            hits: 0,
            queries: 0,
        }
    }

    /// Places and feeds one prompt, parsed at this partition's block size.
    pub(super) fn add(&mut self, p: &Prompt) {
        let matched: Vec<usize> = self.caches.iter().map(|c| c.lru.matched(p)).collect();
        let best = matched.iter().copied().max().unwrap_or(0);
        let group = p.hashes.get(GROUP_BLOCKS - 1).copied().unwrap_or(0);
        let rank = |i: usize| splitmix64(group ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let all = 0..self.caches.len();
        let chosen = if best >= GROUP_BLOCKS {
            all.filter(|&i| matched[i] == best).max_by_key(|&i| rank(i))
        } else if self.placement == Placement::Plain {
            all.max_by_key(|&i| rank(i))
        } else {
            // As the gateway's `rendezvous_rank`: weight / -ln(u), u from the hash.
            let score = |i: usize| {
                let u = ((rank(i) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                let c = &self.caches[i];
                let turnover = (c.eviction_rate / c.lru.capacity().max(1) as f64).max(1e-9);
                1.0 / turnover / -u.ln()
            };
            all.max_by(|&a, &b| score(a).total_cmp(&score(b)))
        };
        let Some(chosen) = chosen else {
            return;
        };
        self.hits += (matched[chosen] * self.block_size) as u64;
        self.queries += p.tokens;
        self.caches[chosen].lru.store(p);
        for c in &mut self.caches {
            let new = c.lru.evicted - c.evicted_seen;
            c.evicted_seen = c.lru.evicted;
            c.eviction_rate = c.eviction_rate * self.decay + new as f64;
        }
    }

    pub fn hit_rate(&self) -> Option<f64> {
        (self.queries > 0).then(|| self.hits as f64 / self.queries as f64)
    }
}

/// The oracle report's `partitioned` object: both placements' hit rates.
pub fn report(plain: &Partitioned, by_turnover: &Partitioned) -> Value {
    json!({
        "replicas": plain.caches.len(),
        "blocks_each": plain.caches.first().map(|c| c.lru.capacity()),
        "plain": plain.hit_rate(),
        "by_turnover": by_turnover.hit_rate(),
        "definition": "one LRU per replica; a request to its longest holder, a new prefix to its rendezvous home",
    })
}

#[cfg(test)]
mod tests {
    use super::super::oracle::{chat, Oracle};
    use super::*;

    /// Eight prefixes of 10 blocks, each asked twice in a row per round.
    fn prompts() -> Vec<Prompt> {
        let systems: Vec<String> = (0..8).map(|g| format!("{g}").repeat(64 * 10)).collect();
        (0..6)
            .flat_map(|round| {
                let systems = &systems;
                (0..16).map(move |i| chat(&systems[i / 2], &format!("r{round} q{i}")))
            })
            .collect()
    }

    #[test]
    fn one_partition_is_the_pooled_oracle() {
        for placement in [Placement::Plain, Placement::ByTurnover] {
            let (mut one, mut pooled) =
                (Partitioned::new(1, 60, 16, placement), Oracle::new(60, 16));
            for p in prompts() {
                one.add(&p);
                pooled.add(&p);
            }
            assert_eq!(one.hit_rate(), pooled.hit_rate());
            assert!(one.hit_rate().is_some_and(|h| h > 0.0));
        }
    }

    #[test]
    fn a_prefix_stays_on_its_holder() {
        // Room for all prefixes on any one replica: a prefix misses only on its
        // first request, in the partition as in the pool, if it stays on its holder.
        let mut parts = Partitioned::new(4, 200, 16, Placement::Plain);
        let mut pooled = Oracle::new(4 * 200, 16);
        for p in prompts() {
            parts.add(&p);
            pooled.add(&p);
        }
        let (part, pool) = (parts.hit_rate().unwrap(), pooled.hit_rate().unwrap());
        assert_eq!(part, pool);
        // Each prefix was stored on exactly one replica: 8 x 10 system blocks
        // plus the questions' blocks, never a second copy of a system block.
        let probe = chat(&"0".repeat(64 * 10), "a new question");
        let held: Vec<usize> = parts.caches.iter().map(|c| c.lru.matched(&probe)).collect();
        assert_eq!(
            held.iter().sum::<usize>(),
            10,
            "one copy of the leading blocks: {held:?}"
        );
    }
}

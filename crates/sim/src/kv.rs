//! The KV cache of one replica: a fixed pool of blocks with vLLM-style
//! automatic prefix caching.
//!
//! A block in use has a reference count. A full prompt block carries the chained
//! hash of its tokens (see `infergate_protocol::tokenizer`), registered in a hash -> block
//! map, so a later prompt with the same prefix reuses it. A block whose count
//! drops to zero keeps its hash and goes to the tail of the free queue; blocks
//! are allocated from the head, so cached blocks nobody uses are evicted least
//! recently freed first (vLLM's `FreeKVCacheBlockQueue`).
//!
//! With KV events on, every change of the set of cached hashes is sent to
//! the replica's publisher as it happens (`events::CacheEvent`): a hash
//! registered is `Stored`, a cached block taken for reuse is `Removed`, a
//! reset is `Cleared`, so a subscriber can mirror the cache exactly.

use std::collections::{BTreeMap, HashMap};

use super::events::{CacheEvent, EventSink};

/// Index of a block in the pool.
pub(crate) type BlockId = u32;

/// The block pool.
#[derive(Debug)]
pub(crate) struct BlockPool {
    block_size: u32,
    ref_count: Vec<u32>,
    /// Hash registered for the block, if any.
    hash: Vec<Option<u64>>,
    /// Position in the free queue (valid while `ref_count == 0`).
    free_stamp: Vec<u64>,
    /// Free queue: stamp -> block, oldest first.
    free: BTreeMap<u64, BlockId>,
    next_stamp: u64,
    cached: HashMap<u64, BlockId>,
    events: EventSink,
}

/// What [`BlockPool::register`] needs to describe newly cached blocks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BlockTokens<'a> {
    /// The sequence's prompt token ids (empty when events are off).
    pub token_ids: &'a [u32],
    pub lora_name: Option<&'a str>,
}

impl BlockPool {
    pub(crate) fn new(num_blocks: u32, block_size: u32, events: EventSink) -> Self {
        let n = num_blocks as usize;
        BlockPool {
            block_size: block_size.max(1),
            ref_count: vec![0; n],
            hash: vec![None; n],
            free_stamp: (0..n as u64).collect(),
            free: (0..num_blocks).map(|b| (u64::from(b), b)).collect(),
            next_stamp: n as u64,
            cached: HashMap::with_capacity(n),
            events,
        }
    }

    fn emit(&self, e: CacheEvent) {
        if let Some(tx) = &self.events {
            // The publisher gone (fleet shutting down) only loses events.
            let _ = tx.send(e);
        }
    }

    /// Every hash currently cached (tests compare a subscriber's view with it).
    pub(crate) fn cached_hashes(&self) -> Vec<u64> {
        self.cached.keys().copied().collect()
    }

    pub(crate) fn total(&self) -> u32 {
        self.ref_count.len() as u32
    }
    /// Blocks not free (referenced by some sequence).
    pub(crate) fn used(&self) -> u32 {
        self.total() - self.free.len() as u32
    }
    /// Blocks that can be allocated (includes cached blocks nobody uses).
    #[cfg(test)]
    pub(crate) fn free(&self) -> u32 {
        self.free.len() as u32
    }
    /// Blocks currently holding a registered prefix hash.
    pub(crate) fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Number of leading `hashes` present in the cache, at most `max`.
    pub(crate) fn lookup(&self, hashes: &[u64], max: usize) -> usize {
        hashes
            .iter()
            .take(max)
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Takes a reference on the cached blocks of the first `n` hashes (which must
    /// be present: see [`Self::lookup`]) and appends them to `blocks`.
    pub(crate) fn acquire_cached(&mut self, hashes: &[u64], n: usize, blocks: &mut Vec<BlockId>) {
        for h in &hashes[..n] {
            if let Some(&b) = self.cached.get(h) {
                self.take_ref(b);
                blocks.push(b);
            }
        }
    }

    fn take_ref(&mut self, b: BlockId) {
        let i = b as usize;
        if self.ref_count[i] == 0 {
            self.free.remove(&self.free_stamp[i]);
        }
        self.ref_count[i] += 1;
    }

    /// Grows `blocks` so it can hold `tokens` tokens. Returns false (and changes
    /// nothing) when there are not enough free blocks.
    pub(crate) fn ensure(&mut self, blocks: &mut Vec<BlockId>, tokens: u32) -> bool {
        let needed = tokens.div_ceil(self.block_size) as usize;
        if needed <= blocks.len() {
            return true;
        }
        if needed - blocks.len() > self.free.len() {
            return false;
        }
        while blocks.len() < needed {
            let Some((_, b)) = self.free.pop_first() else {
                return false;
            };
            let i = b as usize;
            if let Some(h) = self.hash[i].take() {
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                    self.emit(CacheEvent::Removed { hashes: vec![h] });
                }
            }
            self.ref_count[i] = 1;
            blocks.push(b);
        }
        true
    }

    /// Registers `hashes[from..to]` for `blocks[from..to]` (blocks now fully
    /// computed). A hash already cached elsewhere is left pointing there.
    /// Each run of newly cached blocks is one `Stored` event.
    pub(crate) fn register(
        &mut self,
        blocks: &[BlockId],
        hashes: &[u64],
        from: usize,
        to: usize,
        tokens: BlockTokens<'_>,
    ) {
        let to = to.min(blocks.len()).min(hashes.len());
        let mut run: Option<usize> = None;
        for i in from..to {
            let (b, h) = (blocks[i], hashes[i]);
            let new = self.hash[b as usize].is_none() && !self.cached.contains_key(&h);
            if new {
                self.hash[b as usize] = Some(h);
                self.cached.insert(h, b);
                run.get_or_insert(i);
            } else if let Some(start) = run.take() {
                self.emit_stored(hashes, start, i, tokens);
            }
        }
        if let Some(start) = run {
            self.emit_stored(hashes, start, to, tokens);
        }
    }

    fn emit_stored(&self, hashes: &[u64], from: usize, to: usize, tokens: BlockTokens<'_>) {
        if self.events.is_none() {
            return;
        }
        let bs = self.block_size as usize;
        let token_ids = tokens
            .token_ids
            .get(from * bs..to * bs)
            .unwrap_or_default()
            .to_vec();
        self.emit(CacheEvent::Stored {
            hashes: hashes[from..to].to_vec(),
            parent: from.checked_sub(1).map(|p| hashes[p]),
            token_ids,
            block_size: self.block_size,
            lora_name: tokens.lora_name.map(str::to_owned),
        });
    }

    /// Drops a sequence's references, tail first so that a sequence's last blocks
    /// are evicted before its (more shareable) first ones.
    pub(crate) fn release(&mut self, blocks: &mut Vec<BlockId>) {
        while let Some(b) = blocks.pop() {
            let i = b as usize;
            self.ref_count[i] = self.ref_count[i].saturating_sub(1);
            if self.ref_count[i] == 0 {
                let stamp = self.next_stamp;
                self.next_stamp += 1;
                self.free_stamp[i] = stamp;
                self.free.insert(stamp, b);
            }
        }
    }

    /// Forgets every cached hash (vLLM `/reset_prefix_cache`); blocks in use stay.
    pub(crate) fn reset_prefix_cache(&mut self) {
        self.emit(CacheEvent::Cleared);
        self.cached.clear();
        for h in &mut self.hash {
            *h = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_hits_and_unused_blocks_evict_lru() {
        let mut kv = BlockPool::new(4, 16, None);
        let mut a = Vec::new();
        assert!(kv.ensure(&mut a, 32));
        kv.register(&a, &[11, 12], 0, 2, BlockTokens::default());
        assert_eq!(kv.used(), 2);
        assert_eq!(kv.lookup(&[11, 12, 13], 8), 2);
        assert_eq!(kv.lookup(&[99, 12], 8), 0, "only a true prefix hits");
        let mut b = Vec::new();
        kv.acquire_cached(&[11, 12], 2, &mut b);
        assert_eq!(b, a);
        assert_eq!(kv.used(), 2);
        kv.release(&mut a);
        kv.release(&mut b);
        assert_eq!(kv.used(), 0);
        // Still cached while free.
        assert_eq!(kv.lookup(&[11, 12], 8), 2);
        // Allocating all 4 blocks evicts the never-used ones first, then LRU.
        let mut c = Vec::new();
        assert!(kv.ensure(&mut c, 16 * 3));
        assert_eq!(kv.lookup(&[11, 12], 8), 1, "tail block 12 evicted first");
        assert!(!kv.ensure(&mut c, 16 * 5), "not enough blocks");
        assert_eq!(c.len(), 3);
        assert!(kv.ensure(&mut c, 16 * 4));
        assert_eq!(kv.lookup(&[11], 8), 0);
        assert_eq!(kv.free(), 0);
    }

    #[test]
    fn reacquiring_a_free_cached_block_removes_it_from_the_free_queue() {
        let mut kv = BlockPool::new(2, 16, None);
        let mut a = Vec::new();
        assert!(kv.ensure(&mut a, 16));
        kv.register(&a, &[7], 0, 1, BlockTokens::default());
        kv.release(&mut a);
        let mut b = Vec::new();
        kv.acquire_cached(&[7], 1, &mut b);
        assert_eq!(kv.free(), 1);
        let mut c = Vec::new();
        assert!(kv.ensure(&mut c, 16));
        assert_ne!(c[0], b[0]);
        assert!(!kv.ensure(&mut c, 32));
    }

    #[test]
    fn events_follow_the_cached_hashes() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut kv = BlockPool::new(3, 2, Some(tx));
        let mut a = Vec::new();
        assert!(kv.ensure(&mut a, 6));
        let toks = [1, 2, 3, 4, 5, 6];
        let t = BlockTokens {
            token_ids: &toks,
            lora_name: Some("ad"),
        };
        kv.register(&a, &[11, 12], 0, 2, t);
        kv.register(&a, &[11, 12, 13], 2, 3, t);
        assert_eq!(
            rx.try_recv().unwrap(),
            CacheEvent::Stored {
                hashes: vec![11, 12],
                parent: None,
                token_ids: vec![1, 2, 3, 4],
                block_size: 2,
                lora_name: Some("ad".into()),
            }
        );
        assert!(matches!(
            rx.try_recv().unwrap(),
            CacheEvent::Stored { parent: Some(12), ref token_ids, .. } if token_ids == &[5, 6]
        ));
        kv.release(&mut a);
        let mut b = Vec::new();
        assert!(kv.ensure(&mut b, 2));
        // Tail block first: 13 goes.
        assert_eq!(
            rx.try_recv().unwrap(),
            CacheEvent::Removed { hashes: vec![13] }
        );
        kv.reset_prefix_cache();
        assert_eq!(rx.try_recv().unwrap(), CacheEvent::Cleared);
        assert!(kv.cached_hashes().is_empty());
    }
}

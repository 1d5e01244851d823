//! The precise prefix index: exactly which blocks each replica's engine
//! holds, as its KV events said.
//!
//! Two key spaces, as in llm-d: the engine's own block hashes (opaque; they
//! depend on the engine's hash function and seed) and the gateway's keys,
//! recomputed from the token ids a `BlockStored` carries
//! (`tokenizer::token_block_key`, chained, seeded by the LoRA name), which a
//! request's prompt yields too. Each replica maps its engine hashes to keys
//! (a `BlockRemoved` carries only engine hashes); every key maps to the set of
//! replicas holding it: a bitmask for the first 64 replicas (a lookup is an AND
//! per block) and a list beyond. A `BlockStored` whose parent the replica no
//! longer holds is still recorded (so the index mirrors the engine's cache
//! block by block), under keys chained from the unknown parent's engine hash,
//! which no prompt can produce: a prefix lookup stops before it, as the
//! engine's own lookup does.
//!
//! Whether a replica's entries are trusted is the subscriber's call
//! ([`PreciseIndex::set_live`]); a replica that is not live answers nothing
//! here and the router uses the approximate index for it.
//!
//! Each replica also keeps the rate at which its engine evicts blocks (an
//! exponentially weighted rate of `BlockRemoved` blocks): an engine evicts
//! only to make room, so the rate over the cache's size is how fast the cache
//! turns over. Every gateway reads it from the same events, so they agree on
//! it, which placement of new prefixes needs (`routing::aware`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

use infergate_protocol::tokenizer::token_block_key;

use super::decode::KvEvent;
use super::engine_tokens::EngineTokens;
use crate::rate::DecayingRate;
use crate::routing::prefix_index::U64Map;

/// Salt of keys chained from a parent the replica no longer holds.
const ORPHAN: u64 = 0x6f72_7068_616e_0001;

/// Time constant of the eviction rate: long enough to smooth the bursts of
/// one long prompt's allocation, short enough to follow a shift in which
/// prefixes are popular.
const EVICTION_RATE_TAU: Duration = Duration::from_secs(10);

/// The chain seed of a prompt's first block: 0 for the base model, else a
/// hash of the LoRA adapter's name.
pub fn key_seed(lora: Option<&str>) -> u64 {
    lora.map_or(0, |n| xxh3_64(n.as_bytes()))
}

/// Replicas holding one key.
#[derive(Debug, Default, Clone)]
struct Holders {
    /// Slots 0..64.
    low: u64,
    /// Slots 64 and up. Boxed so the common case (no such slot) costs one
    /// thin pointer: `Holders` stays 16 bytes.
    #[allow(clippy::box_collection)]
    high: Option<Box<Vec<u16>>>,
}

impl Holders {
    fn add(&mut self, slot: u16) -> bool {
        if slot < 64 {
            let had = self.low & (1 << slot) != 0;
            self.low |= 1 << slot;
            !had
        } else {
            let v = self.high.get_or_insert_with(Default::default);
            if v.contains(&slot) {
                false
            } else {
                v.push(slot);
                true
            }
        }
    }
    fn remove(&mut self, slot: u16) {
        if slot < 64 {
            self.low &= !(1 << slot);
        } else if let Some(v) = &mut self.high {
            v.retain(|s| *s != slot);
            if v.is_empty() {
                self.high = None;
            }
        }
    }
    fn has(&self, slot: u16) -> bool {
        if slot < 64 {
            self.low & (1 << slot) != 0
        } else {
            self.high.as_ref().is_some_and(|v| v.contains(&slot))
        }
    }
    fn is_empty(&self) -> bool {
        self.low == 0 && self.high.is_none()
    }
}

#[derive(Debug, Default)]
struct Slot {
    key: Option<Arc<str>>,
    live: bool,
    /// Engine hash -> gateway key.
    engine: U64Map<u64>,
    /// Keys reached by more than one engine hash (extra keys such as a cache
    /// salt make the engine's hashes differ where the tokens agree): how many
    /// more, so removing one keeps the key.
    dup: U64Map<u32>,
    /// Blocks its engine evicts per second, over `EVICTION_RATE_TAU`.
    evictions: DecayingRate,
    /// Blocks removed by `BlockRemoved` since the replica was first seen.
    evicted_total: u64,
}

#[derive(Debug, Default)]
struct Inner {
    blocks: U64Map<Holders>,
    slots: Vec<Slot>,
    by_key: HashMap<Arc<str>, u16>,
    /// The engine block size the keys are cut at (from the first event).
    block_size: u32,
    /// Events whose block size differs from `block_size` (ignored).
    mismatched: u64,
}

/// Size and memory of the precise index.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PreciseStats {
    pub replicas: usize,
    pub live_replicas: usize,
    /// Distinct gateway keys.
    pub blocks: usize,
    /// (block, replica) entries.
    pub entries: usize,
    pub block_size: u32,
    /// Bytes held (capacity, not just length).
    pub memory_bytes: usize,
    pub mismatched_block_size_events: u64,
}

/// The per-pool precise index.
#[derive(Debug, Default)]
pub struct PreciseIndex {
    inner: RwLock<Inner>,
    /// The engine token ids requests are keyed from (`kv_events.tokenize`),
    /// fetched by the task that follows the pool's events.
    tokens: Option<Arc<EngineTokens>>,
}

impl PreciseIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// An index whose requests are keyed from the engine's token ids.
    pub fn with_engine_tokens(tokens: Arc<EngineTokens>) -> Self {
        PreciseIndex {
            tokens: Some(tokens),
            ..Self::default()
        }
    }

    pub fn engine_tokens(&self) -> Option<&Arc<EngineTokens>> {
        self.tokens.as_ref()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while writing leaves at worst a stale entry: keep routing.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine block size keys are cut at (0 until an event said).
    pub fn block_size(&self) -> u32 {
        self.read().block_size
    }

    /// Applies one replica's events, in order.
    pub fn apply(&self, replica: &Arc<str>, events: &[KvEvent]) {
        self.apply_at(replica, events, Instant::now());
    }

    /// [`apply`](Self::apply), the events having arrived at `now`.
    fn apply_at(&self, replica: &Arc<str>, events: &[KvEvent], now: Instant) {
        let mut inner = self.write();
        let slot = inner.slot_for(replica);
        let mut evicted = 0;
        for e in events {
            evicted += inner.apply(slot, e);
        }
        if evicted > 0 {
            let s = &mut inner.slots[slot as usize];
            s.evictions.add(evicted as f64, now, EVICTION_RATE_TAU);
            s.evicted_total += evicted;
        }
    }

    /// Forgets everything `replica` holds (it restarted, cleared, or its
    /// event stream lost events that cannot be replayed).
    pub fn clear_replica(&self, replica: &str) {
        let mut inner = self.write();
        if let Some(&slot) = inner.by_key.get(replica) {
            inner.clear_slot(slot);
        }
    }

    /// Drops `replica` entirely (it left the pool).
    pub fn remove_replica(&self, replica: &str) {
        let mut inner = self.write();
        if let Some(slot) = inner.by_key.remove(replica) {
            inner.clear_slot(slot);
            let s = &mut inner.slots[slot as usize];
            s.key = None;
            s.live = false;
            s.engine = U64Map::default();
            s.dup = U64Map::default();
        }
    }

    /// Whether routing may trust `replica`'s entries.
    pub fn set_live(&self, replica: &Arc<str>, live: bool) {
        let mut inner = self.write();
        let slot = inner.slot_for(replica);
        inner.slots[slot as usize].live = live;
    }

    pub fn is_live(&self, replica: &str) -> bool {
        let inner = self.read();
        inner
            .by_key
            .get(replica)
            .is_some_and(|s| inner.slots[*s as usize].live)
    }

    /// For each live replica, calls `f(key, leading blocks of keys it holds)`
    /// (0 included). `keys` are the prompt's keys at [`Self::block_size`].
    pub fn longest_prefix(&self, keys: &[u64], mut f: impl FnMut(&Arc<str>, u32)) {
        let inner = self.read();
        let mut low_live = 0u64;
        for (i, s) in inner.slots.iter().enumerate() {
            if s.live && i < 64 {
                low_live |= 1 << i;
            }
        }
        // Slots 0..64: AND the bitmasks along the prompt.
        let mut alive = low_live;
        let mut depth = 0u32;
        for k in keys {
            let holders = inner.blocks.get(k).map_or(0, |h| h.low);
            let next = alive & holders;
            let mut gone = alive & !next;
            while gone != 0 {
                let s = gone.trailing_zeros() as usize;
                gone &= gone - 1;
                if let Some(key) = &inner.slots[s].key {
                    f(key, depth);
                }
            }
            alive = next;
            depth += 1;
            if alive == 0 {
                break;
            }
        }
        while alive != 0 {
            let s = alive.trailing_zeros() as usize;
            alive &= alive - 1;
            if let Some(key) = &inner.slots[s].key {
                f(key, depth);
            }
        }
        // Slots 64 and up, one by one.
        for (i, s) in inner.slots.iter().enumerate().skip(64) {
            if let (true, Some(key)) = (s.live, &s.key) {
                let n = keys
                    .iter()
                    .take_while(|k| inner.blocks.get(k).is_some_and(|h| h.has(i as u16)))
                    .count();
                f(key, n as u32);
            }
        }
    }

    /// For each live replica, calls `f(key, blocks its engine holds, blocks
    /// per second it evicts now)`.
    pub fn cache_state(&self, now: Instant, mut f: impl FnMut(&Arc<str>, u32, f64)) {
        let inner = self.read();
        for s in &inner.slots {
            if let (true, Some(key)) = (s.live, &s.key) {
                let held = s.engine.len().min(u32::MAX as usize) as u32;
                f(key, held, s.evictions.per_second(now, EVICTION_RATE_TAU));
            }
        }
    }

    /// `replica`'s evictions: (blocks per second now, blocks in all).
    pub fn evictions(&self, replica: &str, now: Instant) -> Option<(f64, u64)> {
        let inner = self.read();
        let s = &inner.slots[*inner.by_key.get(replica)? as usize];
        Some((
            s.evictions.per_second(now, EVICTION_RATE_TAU),
            s.evicted_total,
        ))
    }

    /// The engine hashes `replica` holds (tests compare them with the engine).
    pub fn engine_hashes(&self, replica: &str) -> Vec<u64> {
        let inner = self.read();
        inner.by_key.get(replica).map_or_else(Vec::new, |s| {
            inner.slots[*s as usize].engine.keys().copied().collect()
        })
    }

    pub fn stats(&self) -> PreciseStats {
        let inner = self.read();
        // hashbrown: (key, value) plus one control byte per bucket.
        fn map_bytes<V>(m: &U64Map<V>) -> usize {
            m.capacity() * (std::mem::size_of::<(u64, V)>() + 1)
        }
        let mut memory_bytes = map_bytes(&inner.blocks)
            + inner.slots.capacity() * std::mem::size_of::<Slot>()
            + inner
                .blocks
                .values()
                .filter_map(|h| h.high.as_ref())
                .map(|v| 24 + v.capacity() * 2)
                .sum::<usize>();
        let mut entries = 0;
        for s in &inner.slots {
            memory_bytes += map_bytes(&s.engine) + map_bytes(&s.dup);
            entries += s.engine.len();
        }
        PreciseStats {
            replicas: inner.by_key.len(),
            live_replicas: inner
                .slots
                .iter()
                .filter(|s| s.live && s.key.is_some())
                .count(),
            blocks: inner.blocks.len(),
            entries,
            block_size: inner.block_size,
            memory_bytes,
            mismatched_block_size_events: inner.mismatched,
        }
    }
}

impl Inner {
    fn slot_for(&mut self, key: &Arc<str>) -> u16 {
        if let Some(s) = self.by_key.get(key) {
            return *s;
        }
        let fresh = Slot {
            key: Some(key.clone()),
            ..Slot::default()
        };
        let s = match self.slots.iter().position(|s| s.key.is_none()) {
            Some(i) => {
                self.slots[i] = fresh;
                i as u16
            }
            None => {
                self.slots.push(fresh);
                (self.slots.len() - 1) as u16
            }
        };
        self.by_key.insert(key.clone(), s);
        s
    }

    /// Applies one event; returns how many held blocks it evicted.
    fn apply(&mut self, slot: u16, e: &KvEvent) -> u64 {
        match e {
            KvEvent::Stored {
                hashes,
                parent,
                token_ids,
                block_size,
                lora_name,
                ..
            } => {
                let bs = *block_size;
                if bs == 0 || token_ids.len() < hashes.len() * bs as usize {
                    // No tokens (an engine that only reports a tier change):
                    // nothing to key.
                    return 0;
                }
                if self.block_size == 0 {
                    self.block_size = bs;
                } else if self.block_size != bs {
                    self.mismatched += 1;
                    return 0;
                }
                let mut key = match parent {
                    None => key_seed(lora_name.as_deref()),
                    Some(p) => match self.slots[slot as usize].engine.get(p) {
                        Some(k) => *k,
                        None => xxh3_64(&p.to_le_bytes()) ^ ORPHAN,
                    },
                };
                for (h, block) in hashes.iter().zip(token_ids.chunks_exact(bs as usize)) {
                    key = token_block_key(key, block);
                    self.store(slot, *h, key);
                }
                0
            }
            KvEvent::Removed { hashes, .. } => hashes
                .iter()
                .map(|h| u64::from(self.remove(slot, *h)))
                .sum(),
            KvEvent::Cleared => {
                self.clear_slot(slot);
                0
            }
        }
    }

    fn store(&mut self, slot: u16, engine_hash: u64, key: u64) {
        let s = &mut self.slots[slot as usize];
        if let Some(old) = s.engine.insert(engine_hash, key) {
            if old == key {
                return; // stored again: nothing changes
            }
            // The engine reused the hash for other tokens: drop the old key.
            Self::unhold(&mut self.blocks, s, slot, old);
        }
        let s = &mut self.slots[slot as usize];
        if !self.blocks.entry(key).or_default().add(slot) {
            *s.dup.entry(key).or_default() += 1;
        }
    }

    /// Whether the replica held the block.
    fn remove(&mut self, slot: u16, engine_hash: u64) -> bool {
        let s = &mut self.slots[slot as usize];
        match s.engine.remove(&engine_hash) {
            Some(key) => {
                Self::unhold(&mut self.blocks, s, slot, key);
                true
            }
            None => false,
        }
    }

    fn unhold(blocks: &mut U64Map<Holders>, s: &mut Slot, slot: u16, key: u64) {
        if let Some(n) = s.dup.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                s.dup.remove(&key);
            }
            return;
        }
        if let Some(h) = blocks.get_mut(&key) {
            h.remove(slot);
            if h.is_empty() {
                blocks.remove(&key);
            }
        }
    }

    fn clear_slot(&mut self, slot: u16) {
        let s = &mut self.slots[slot as usize];
        for (_, key) in s.engine.drain() {
            if let Some(h) = self.blocks.get_mut(&key) {
                h.remove(slot);
                if h.is_empty() {
                    self.blocks.remove(&key);
                }
            }
        }
        s.dup.clear();
        // An empty cache turns nothing over.
        s.evictions = DecayingRate::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_protocol::tokenizer::token_block_key as key;

    fn k(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> KvEvent {
        KvEvent::Stored {
            hashes: hashes.to_vec(),
            parent,
            token_ids: tokens.to_vec(),
            block_size: 2,
            lora_name: None,
            medium: None,
        }
    }

    fn matches(ix: &PreciseIndex, keys: &[u64]) -> HashMap<String, u32> {
        let mut m = HashMap::new();
        ix.longest_prefix(keys, |r, n| {
            m.insert(r.to_string(), n);
        });
        m
    }

    #[test]
    fn keys_are_recomputed_from_tokens_and_removed_by_engine_hash() {
        let ix = PreciseIndex::new();
        let (a, b) = (k("a"), k("b"));
        // Two replicas with different engine hashes for the same tokens.
        ix.apply(&a, &[stored(&[100, 101], None, &[1, 2, 3, 4])]);
        ix.apply(&b, &[stored(&[900], None, &[1, 2])]);
        ix.apply(&b, &[stored(&[901], Some(900), &[3, 4])]);
        ix.set_live(&a, true);
        ix.set_live(&b, true);
        let k0 = key(key_seed(None), &[1, 2]);
        let k1 = key(k0, &[3, 4]);
        let m = matches(&ix, &[k0, k1, 77]);
        assert_eq!((m["a"], m["b"]), (2, 2));
        ix.apply(
            &b,
            &[KvEvent::Removed {
                hashes: vec![901],
                medium: None,
            }],
        );
        assert_eq!(matches(&ix, &[k0, k1])["b"], 1);
        assert_eq!(ix.stats().entries, 3);
        // Not live: not answered.
        ix.set_live(&a, false);
        assert!(!matches(&ix, &[k0]).contains_key("a"));
        ix.apply(&b, &[KvEvent::Cleared]);
        assert_eq!(matches(&ix, &[k0])["b"], 0);
        assert!(ix.engine_hashes("b").is_empty());
        ix.remove_replica("a");
        assert_eq!(ix.stats().blocks, 0);
        assert_eq!(ix.stats().replicas, 1);
    }

    #[test]
    fn orphans_are_mirrored_but_never_match_and_dups_keep_their_key() {
        let ix = PreciseIndex::new();
        let a = k("a");
        ix.set_live(&a, true);
        ix.apply(&a, &[stored(&[5], Some(4), &[1, 2])]);
        assert_eq!(ix.engine_hashes("a"), vec![5]);
        let k0 = key(key_seed(None), &[1, 2]);
        assert_eq!(matches(&ix, &[k0])["a"], 0);
        // Two engine hashes (say, two cache salts) for the same tokens.
        ix.apply(
            &a,
            &[stored(&[10], None, &[1, 2]), stored(&[11], None, &[1, 2])],
        );
        ix.apply(
            &a,
            &[KvEvent::Removed {
                hashes: vec![10],
                medium: None,
            }],
        );
        assert_eq!(matches(&ix, &[k0])["a"], 1, "hash 11 still holds the key");
        // Another block size than the first one seen is ignored and counted.
        ix.apply(
            &a,
            &[KvEvent::Stored {
                hashes: vec![20],
                parent: None,
                token_ids: vec![1, 2, 3],
                block_size: 3,
                lora_name: None,
                medium: None,
            }],
        );
        assert_eq!(ix.stats().mismatched_block_size_events, 1);
        // LoRA blocks live in their own key space.
        ix.apply(
            &a,
            &[KvEvent::Stored {
                hashes: vec![30],
                parent: None,
                token_ids: vec![1, 2],
                block_size: 2,
                lora_name: Some("ad".into()),
                medium: None,
            }],
        );
        let kl = key(key_seed(Some("ad")), &[1, 2]);
        assert_ne!(kl, k0);
        assert_eq!(matches(&ix, &[kl])["a"], 1);
    }

    #[test]
    fn eviction_rate_counts_held_blocks_removed_and_decays() {
        let ix = PreciseIndex::new();
        let a = k("a");
        ix.set_live(&a, true);
        let t0 = Instant::now();
        let hashes: Vec<u64> = (1..=50).collect();
        let tokens: Vec<u32> = (0..100).collect();
        ix.apply_at(&a, &[stored(&hashes, None, &tokens)], t0);
        assert_eq!(
            ix.evictions("a", t0),
            Some((0.0, 0)),
            "stores evict nothing"
        );
        // 20 held blocks removed and 5 never held (not evictions of this cache).
        let removed: Vec<u64> = (1..=20).chain(1000..1005).collect();
        let remove = KvEvent::Removed {
            hashes: removed,
            medium: None,
        };
        ix.apply_at(&a, &[remove], t0);
        let (rate, total) = ix.evictions("a", t0).unwrap();
        assert_eq!(total, 20);
        assert!((rate - 20.0 / EVICTION_RATE_TAU.as_secs_f64()).abs() < 1e-9);
        // One time constant later, a 1/e of it.
        let later = t0 + EVICTION_RATE_TAU;
        let (decayed, _) = ix.evictions("a", later).unwrap();
        assert!((decayed - rate / std::f64::consts::E).abs() < 1e-9);
        let mut seen = Vec::new();
        ix.cache_state(later, |r, held, per_s| {
            seen.push((r.to_string(), held, per_s))
        });
        assert_eq!(seen, vec![("a".to_string(), 30, decayed)]);
        // A steady 100 blocks/s reads about 100 after a few time constants.
        let ix = PreciseIndex::new();
        ix.apply_at(
            &a,
            &[stored(
                &(1..=5000).collect::<Vec<_>>(),
                None,
                &(0..10_000).collect::<Vec<_>>(),
            )],
            t0,
        );
        for i in 1..=40u64 {
            let hs: Vec<u64> = ((i - 1) * 100 + 1..=i * 100).collect();
            let at = t0 + Duration::from_secs(i);
            ix.apply_at(
                &a,
                &[KvEvent::Removed {
                    hashes: hs,
                    medium: None,
                }],
                at,
            );
        }
        let (steady, _) = ix.evictions("a", t0 + Duration::from_secs(40)).unwrap();
        assert!((steady - 100.0).abs() < 10.0, "{steady}");
        // A cleared cache turns nothing over.
        ix.apply_at(&a, &[KvEvent::Cleared], t0 + Duration::from_secs(41));
        assert_eq!(
            ix.evictions("a", t0 + Duration::from_secs(41)).unwrap().0,
            0.0
        );
    }

    #[test]
    fn more_than_64_replicas() {
        let ix = PreciseIndex::new();
        let k0 = key(0, &[1, 2]);
        for i in 0..70 {
            let r = k(&format!("r{i}"));
            ix.set_live(&r, true);
            if i % 2 == 0 {
                ix.apply(&r, &[stored(&[i], None, &[1, 2])]);
            }
        }
        let m = matches(&ix, &[k0]);
        assert_eq!(m.len(), 70);
        assert_eq!((m["r0"], m["r1"], m["r66"], m["r67"]), (1, 0, 1, 0));
        ix.remove_replica("r66");
        assert!(!matches(&ix, &[k0]).contains_key("r66"));
    }

    /// Memory per indexed block, from the index's own accounting (capacity
    /// of its maps): printed for the benchmark report.
    #[test]
    fn memory_per_indexed_block() {
        let ix = PreciseIndex::new();
        let replicas = 8u64;
        let per_replica = 20_000u64;
        let tokens: Vec<u32> = (0..per_replica as u32 * 16).collect();
        for r in 0..replicas {
            let key = k(&format!("r{r}"));
            // Each replica holds its own chain (no sharing: the worst case).
            let mut ev = stored(&[], None, &[]);
            if let KvEvent::Stored {
                hashes,
                token_ids,
                block_size,
                lora_name,
                ..
            } = &mut ev
            {
                *hashes = (0..per_replica).map(|i| r << 32 | i).collect();
                *token_ids = tokens.clone();
                *block_size = 16;
                *lora_name = Some(format!("l{r}"));
            }
            ix.apply(&key, &[ev]);
        }
        let st = ix.stats();
        assert_eq!(st.entries as u64, replicas * per_replica);
        let per_block = st.memory_bytes as f64 / st.entries as f64;
        println!(
            "precise index: {} entries, {} bytes, {per_block:.1} bytes per indexed block",
            st.entries, st.memory_bytes
        );
        assert!(per_block < 128.0, "{per_block}");
    }
}

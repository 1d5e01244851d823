//! The approximate prefix index: which prompt blocks were recently sent to which
//! replica, so routing can predict where a prompt's prefix is still cached.
//!
//! Blocks are the chained hashes of `tokenizer::for_each_block_hash` (equal hash =
//! equal whole prefix). Each replica has an LRU of the blocks routed to it,
//! bounded by that replica's own cache size (from `cache_config_info`, else a
//! default), so the index forgets roughly when the engine evicts. A decision
//! touches the prompt's blocks last-to-first, so the first blocks (shared by the
//! most requests) are the most recent and are evicted last, as in vLLM.
//!
//! Layout (one allocation-free structure, no per-block boxing): one node per
//! (block, replica) pair in a slab, threaded on two lists: the replica's LRU
//! (doubly linked) and the block's holder list (singly linked, usually 1 to 3
//! long). A map from block hash to its first holder node finds the holders. The
//! longest-prefix lookup walks the prompt's blocks once, narrowing the set of
//! replicas that held every block so far, with generation-stamped scratch arrays
//! so it costs O(blocks + holders) and allocates nothing.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

const NIL: u32 = u32::MAX;

/// Block hashes are already uniform (xxh3): use them as their own hash.
#[derive(Default)]
pub(super) struct IdentityHasher(u64);
impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}
/// A map keyed by an already-uniform u64 hash (also the precise index's).
pub(super) type U64Map<V> = HashMap<u64, V, BuildHasherDefault<IdentityHasher>>;
type BlockMap = U64Map<u32>;

#[derive(Debug, Clone, Copy)]
struct Node {
    hash: u64,
    /// Next holder of the same block.
    next_holder: u32,
    /// LRU neighbours within the replica (prev = more recent).
    prev: u32,
    next: u32,
    slot: u16,
    /// The block that names a prefix group (counted per replica).
    group: bool,
}

#[derive(Debug)]
struct Slot {
    key: Option<Arc<str>>,
    mru: u32,
    lru: u32,
    len: u32,
    /// Group-naming blocks among `len`: the prefix groups homed here.
    groups: u32,
}

#[derive(Debug)]
struct Inner {
    map: BlockMap,
    nodes: Vec<Node>,
    free: u32,
    slots: Vec<Slot>,
    by_key: HashMap<Arc<str>, u16>,
    /// Scratch for lookups, indexed by slot.
    mark: Vec<u32>,
    alive: Vec<u16>,
    generation: u32,
    evictions: u64,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            map: BlockMap::default(),
            nodes: Vec::new(),
            free: NIL,
            slots: Vec::new(),
            by_key: HashMap::new(),
            mark: Vec::new(),
            alive: Vec::new(),
            generation: 0,
            evictions: 0,
        }
    }
}

/// Size and memory of the index, for the admin view and the benchmark.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IndexStats {
    pub replicas: usize,
    /// Distinct block hashes.
    pub blocks: usize,
    /// (block, replica) entries.
    pub entries: usize,
    pub evictions: u64,
    /// Bytes held by the index structures (capacity, not just length).
    pub memory_bytes: usize,
}

/// A per-pool approximate prefix index.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    inner: Mutex<Inner>,
}

/// Matched leading blocks per replica key, filled by [`PrefixIndex::longest_prefix`].
pub trait MatchSink {
    fn matched(&mut self, key: &Arc<str>, blocks: u32);
}

impl PrefixIndex {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the index usable (worst case a
        // stale entry); never propagate the poison to the request path.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For each replica holding at least the first block, reports how many
    /// leading blocks of `hashes` it holds.
    pub fn longest_prefix(&self, hashes: &[u64], sink: &mut impl MatchSink) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if hashes.is_empty() || inner.slots.is_empty() {
            return;
        }
        inner.alive.clear();
        let mut n = inner.map.get(&hashes[0]).copied().unwrap_or(NIL);
        while n != NIL {
            let node = inner.nodes[n as usize];
            inner.alive.push(node.slot);
            n = node.next_holder;
        }
        for (i, h) in hashes.iter().enumerate().skip(1) {
            if inner.alive.is_empty() {
                return;
            }
            inner.generation = inner.generation.wrapping_add(1);
            let g = inner.generation;
            let mut n = inner.map.get(h).copied().unwrap_or(NIL);
            while n != NIL {
                let node = inner.nodes[n as usize];
                inner.mark[node.slot as usize] = g;
                n = node.next_holder;
            }
            // Drop the replicas that lack block i, reporting their match. A
            // plain loop, not `Vec::retain`: this runs once per prompt block,
            // and the retain closure was not inlined (a call per replica and
            // block, 3% of a routing decision under callgrind).
            let mut j = 0;
            while j < inner.alive.len() {
                let s = inner.alive[j] as usize;
                if inner.mark[s] == g {
                    j += 1;
                } else {
                    if let Some(k) = &inner.slots[s].key {
                        sink.matched(k, i as u32);
                    }
                    inner.alive.swap_remove(j);
                }
            }
        }
        for s in &inner.alive {
            if let Some(k) = &inner.slots[*s as usize].key {
                sink.matched(k, hashes.len() as u32);
            }
        }
    }

    /// Records that `hashes` were sent to replica `key`, whose cache holds about
    /// `capacity` blocks.
    pub fn record(&self, key: &Arc<str>, hashes: &[u64], capacity: u32) {
        self.record_group(key, hashes, capacity, None);
    }

    /// [`record`](Self::record), marking `hashes[group_at]` as the block that
    /// names the prompt's prefix group, so [`group_counts`](Self::group_counts)
    /// counts the groups each replica holds.
    pub fn record_group(
        &self,
        key: &Arc<str>,
        hashes: &[u64],
        capacity: u32,
        group_at: Option<usize>,
    ) {
        if hashes.is_empty() || capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        let slot = inner.slot_for(key);
        for (i, h) in hashes.iter().enumerate().rev() {
            inner.touch(slot, *h, group_at == Some(i));
        }
        while inner.slots[slot as usize].len > capacity {
            inner.evict_lru(slot);
        }
    }

    /// Drops every replica not in `present` (it left the pool).
    pub fn retain(&self, present: &[&str]) {
        let mut inner = self.lock();
        let gone: Vec<u16> = inner
            .by_key
            .iter()
            .filter(|(k, _)| !present.contains(&&***k))
            .map(|(_, s)| *s)
            .collect();
        for slot in gone {
            while inner.slots[slot as usize].len > 0 {
                inner.evict_lru(slot);
            }
            if let Some(k) = inner.slots[slot as usize].key.take() {
                inner.by_key.remove(&k);
            }
        }
    }

    /// Reports, for every replica in the index, how many prefix groups it holds
    /// (group-naming blocks still in its LRU).
    pub fn group_counts(&self, mut f: impl FnMut(&Arc<str>, u32)) {
        let inner = self.lock();
        for s in &inner.slots {
            if let Some(k) = &s.key {
                f(k, s.groups);
            }
        }
    }

    /// Blocks currently recorded for `key`.
    pub fn replica_blocks(&self, key: &str) -> u32 {
        let inner = self.lock();
        inner
            .by_key
            .get(key)
            .map_or(0, |s| inner.slots[*s as usize].len)
    }

    pub fn stats(&self) -> IndexStats {
        let inner = self.lock();
        let live_slots = inner.slots.iter().filter(|s| s.key.is_some()).count();
        let entries = inner.slots.iter().map(|s| s.len as usize).sum();
        // hashbrown stores (key, value) plus one control byte per bucket.
        let map_bytes = inner.map.capacity() * (std::mem::size_of::<(u64, u32)>() + 1);
        let memory_bytes = map_bytes
            + inner.nodes.capacity() * std::mem::size_of::<Node>()
            + inner.slots.capacity() * std::mem::size_of::<Slot>()
            + inner.mark.capacity() * 4
            + inner.alive.capacity() * 2;
        IndexStats {
            replicas: live_slots,
            blocks: inner.map.len(),
            entries,
            evictions: inner.evictions,
            memory_bytes,
        }
    }
}

impl Inner {
    fn slot_for(&mut self, key: &Arc<str>) -> u16 {
        if let Some(s) = self.by_key.get(key) {
            return *s;
        }
        let empty = Slot {
            key: Some(key.clone()),
            mru: NIL,
            lru: NIL,
            len: 0,
            groups: 0,
        };
        let s = match self.slots.iter().position(|s| s.key.is_none()) {
            Some(i) => {
                self.slots[i] = empty;
                i as u16
            }
            None => {
                self.slots.push(empty);
                self.mark.push(0);
                (self.slots.len() - 1) as u16
            }
        };
        self.by_key.insert(key.clone(), s);
        s
    }

    /// Makes (hash, slot) the replica's most recent block, adding it if absent.
    fn touch(&mut self, slot: u16, hash: u64, group: bool) {
        let head = self.map.get(&hash).copied().unwrap_or(NIL);
        let mut n = head;
        while n != NIL {
            let node = self.nodes[n as usize];
            if node.slot == slot {
                if group && !node.group {
                    self.nodes[n as usize].group = true;
                    self.slots[slot as usize].groups += 1;
                }
                self.unlink_lru(n);
                self.push_mru(n);
                return;
            }
            n = node.next_holder;
        }
        let node = Node {
            hash,
            next_holder: head,
            prev: NIL,
            next: NIL,
            slot,
            group,
        };
        let idx = if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[i as usize].next_holder;
            self.nodes[i as usize] = node;
            i
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        };
        self.map.insert(hash, idx);
        self.push_mru(idx);
        self.slots[slot as usize].len += 1;
        self.slots[slot as usize].groups += u32::from(group);
    }

    fn push_mru(&mut self, n: u32) {
        let slot = self.nodes[n as usize].slot as usize;
        let old = self.slots[slot].mru;
        self.nodes[n as usize].prev = NIL;
        self.nodes[n as usize].next = old;
        if old != NIL {
            self.nodes[old as usize].prev = n;
        } else {
            self.slots[slot].lru = n;
        }
        self.slots[slot].mru = n;
    }

    fn unlink_lru(&mut self, n: u32) {
        let Node {
            prev, next, slot, ..
        } = self.nodes[n as usize];
        let slot = slot as usize;
        if prev != NIL {
            self.nodes[prev as usize].next = next;
        } else {
            self.slots[slot].mru = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        } else {
            self.slots[slot].lru = prev;
        }
    }

    fn evict_lru(&mut self, slot: u16) {
        let n = self.slots[slot as usize].lru;
        if n == NIL {
            return;
        }
        self.unlink_lru(n);
        let Node {
            hash,
            next_holder,
            group,
            ..
        } = self.nodes[n as usize];
        // Unlink from the block's holder list.
        match self.map.get(&hash).copied() {
            Some(head) if head == n => {
                if next_holder == NIL {
                    self.map.remove(&hash);
                } else {
                    self.map.insert(hash, next_holder);
                }
            }
            Some(head) => {
                let mut p = head;
                while p != NIL {
                    let pn = self.nodes[p as usize].next_holder;
                    if pn == n {
                        self.nodes[p as usize].next_holder = next_holder;
                        break;
                    }
                    p = pn;
                }
            }
            None => {}
        }
        self.nodes[n as usize].next_holder = self.free;
        self.free = n;
        self.slots[slot as usize].len -= 1;
        self.slots[slot as usize].groups -= u32::from(group);
        self.evictions += 1;
    }
}

impl<F: FnMut(&Arc<str>, u32)> MatchSink for F {
    fn matched(&mut self, key: &Arc<str>, blocks: u32) {
        self(key, blocks);
    }
}

impl MatchSink for HashMap<Arc<str>, u32> {
    fn matched(&mut self, key: &Arc<str>, blocks: u32) {
        self.insert(key.clone(), blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn matches(ix: &PrefixIndex, hashes: &[u64]) -> HashMap<Arc<str>, u32> {
        let mut m = HashMap::new();
        ix.longest_prefix(hashes, &mut m);
        m
    }

    #[test]
    fn longest_prefix_per_replica() {
        let ix = PrefixIndex::new();
        ix.record(&k("a"), &[1, 2, 3, 4], 100);
        ix.record(&k("b"), &[1, 2, 9], 100);
        ix.record(&k("c"), &[7], 100);
        let m = matches(&ix, &[1, 2, 3, 4, 5]);
        assert_eq!(m.get(&k("a")), Some(&4));
        assert_eq!(m.get(&k("b")), Some(&2));
        assert_eq!(m.get(&k("c")), None);
        assert_eq!(matches(&ix, &[1, 2, 9]).get(&k("b")), Some(&3));
        assert!(matches(&ix, &[8]).is_empty());
        // A hole in the chain stops the match even if later blocks are present.
        ix.record(&k("d"), &[1, 3], 100);
        assert_eq!(matches(&ix, &[1, 2, 3]).get(&k("d")), Some(&1));
    }

    #[test]
    fn lru_bounded_by_capacity_evicts_tail_blocks_first() {
        let ix = PrefixIndex::new();
        ix.record(&k("a"), &[1, 2, 3, 4], 3);
        assert_eq!(ix.replica_blocks("a"), 3);
        // Touched last-to-first: block 1 is most recent, block 4 was evicted.
        assert_eq!(matches(&ix, &[1, 2, 3, 4]).get(&k("a")), Some(&3));
        ix.record(&k("a"), &[10, 11], 3);
        assert_eq!(ix.replica_blocks("a"), 3);
        assert_eq!(matches(&ix, &[1, 2, 3]).get(&k("a")), Some(&1));
        assert_eq!(matches(&ix, &[10, 11]).get(&k("a")), Some(&2));
        let st = ix.stats();
        assert_eq!((st.replicas, st.entries, st.blocks), (1, 3, 3));
        assert_eq!(st.evictions, 3);
        assert!(st.memory_bytes > 0);
    }

    #[test]
    fn group_blocks_are_counted_per_replica_until_evicted() {
        let ix = PrefixIndex::new();
        let counts = |ix: &PrefixIndex| {
            let mut m = HashMap::new();
            ix.group_counts(|k, n| {
                m.insert(k.to_string(), n);
            });
            m
        };
        ix.record_group(&k("a"), &[1, 2, 3], 4, Some(1));
        ix.record_group(&k("a"), &[1, 2, 4], 4, Some(1));
        ix.record_group(&k("a"), &[5, 6], 4, Some(1));
        ix.record_group(&k("b"), &[1, 2], 4, Some(1));
        ix.record(&k("c"), &[7], 4);
        let m = counts(&ix);
        assert_eq!((m["a"], m["b"], m["c"]), (2, 1, 0));
        // A block seen first without, then with the group mark counts once.
        ix.record(&k("c"), &[8, 9], 4);
        ix.record_group(&k("c"), &[8, 9], 4, Some(1));
        ix.record_group(&k("c"), &[8, 9], 4, Some(1));
        assert_eq!(counts(&ix)["c"], 1);
        // Evicting a group block uncounts it: a holds 5, 6, 1, 2 (newest first).
        ix.record(&k("a"), &[20], 4);
        assert_eq!(counts(&ix)["a"], 1);
    }

    #[test]
    fn shared_blocks_and_retain() {
        let ix = PrefixIndex::new();
        for r in ["a", "b", "c"] {
            ix.record(&k(r), &[1, 2], 10);
        }
        assert_eq!(ix.stats().entries, 6);
        assert_eq!(ix.stats().blocks, 2);
        assert_eq!(matches(&ix, &[1, 2]).len(), 3);
        ix.retain(&["a", "c"]);
        let m = matches(&ix, &[1, 2]);
        assert_eq!(m.len(), 2);
        assert!(!m.contains_key(&k("b")));
        assert_eq!(ix.stats().entries, 4);
        // The freed slot and nodes are reused.
        ix.record(&k("d"), &[1, 2, 3], 10);
        assert_eq!(matches(&ix, &[1, 2, 3]).get(&k("d")), Some(&3));
        assert_eq!(ix.stats().replicas, 3);
        // Evicting a middle holder keeps the others' lists intact.
        ix.record(&k("c"), &[50, 51], 2);
        let m = matches(&ix, &[1, 2]);
        assert_eq!(
            (m.get(&k("a")), m.get(&k("c")), m.get(&k("d"))),
            (Some(&2), None, Some(&2))
        );
    }
}

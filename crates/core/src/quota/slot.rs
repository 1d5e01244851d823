//! One limit's counter in this process for local mode: the window's tag
//! and the value in one atomic word, so a window roll and an add are one
//! compare-and-swap. Built with the config (`rules`), used by `counters`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bits of a [`LocalSlot`] word that hold the value; the rest hold the
/// window id (its low 16 bits: ids are only compared with the current one).
const VALUE_BITS: u32 = 48;
const VALUE_MASK: u64 = (1 << VALUE_BITS) - 1;
/// Limits from this up are counted in the map (their values might not fit).
pub const SLOT_LIMIT_MAX: u64 = 1 << 47;

/// One limit's counter in this process: window tag and value in one
/// atomic word, so rolling the window and adding are one compare-and-swap.
#[derive(Debug, Clone)]
pub struct LocalSlot(Arc<[AtomicU64]>, usize);

impl LocalSlot {
    /// `n` counters (one per limit of a team or key), all zero.
    pub fn new_set(n: usize) -> Arc<[AtomicU64]> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    pub fn of(set: &Arc<[AtomicU64]>, i: usize) -> LocalSlot {
        LocalSlot(set.clone(), i)
    }

    fn cell(&self) -> &AtomicU64 {
        &self.0[self.1]
    }

    fn pack(window_id: u64, v: u64) -> u64 {
        (window_id << VALUE_BITS) | v.min(VALUE_MASK)
    }

    fn value_in(word: u64, window_id: u64) -> u64 {
        if word >> VALUE_BITS == window_id & 0xffff {
            word & VALUE_MASK
        } else {
            0 // another window: this one starts at zero
        }
    }

    /// Adds `add` if the value stays within `limit`: `Ok(value after)`, or
    /// `Err(value seen)`.
    pub(super) fn take(&self, window_id: u64, add: u64, limit: u64) -> Result<i64, i64> {
        let c = self.cell();
        let mut word = c.load(Ordering::Acquire);
        loop {
            let v = Self::value_in(word, window_id);
            if add > 0 && v.saturating_add(add) > limit {
                return Err(v as i64);
            }
            let new = Self::pack(window_id & 0xffff, v + add);
            match c.compare_exchange_weak(word, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok((v + add) as i64),
                Err(w) => word = w,
            }
        }
    }

    /// Adds `delta` (never below zero) if the window is still the counted one.
    pub(super) fn settle(&self, window_id: u64, delta: i64) {
        let c = self.cell();
        let mut word = c.load(Ordering::Acquire);
        loop {
            if word >> VALUE_BITS != window_id & 0xffff {
                return; // the window ended: nothing left to correct
            }
            let v = ((word & VALUE_MASK) as i64).saturating_add(delta).max(0) as u64;
            let new = Self::pack(window_id & 0xffff, v);
            match c.compare_exchange_weak(word, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(w) => word = w,
            }
        }
    }

    pub(super) fn value(&self, window_id: u64) -> i64 {
        Self::value_in(self.cell().load(Ordering::Acquire), window_id) as i64
    }

    /// Copies another counter (a reloaded config keeps what was counted).
    pub fn copy_from(&self, other: &LocalSlot) {
        self.cell()
            .store(other.cell().load(Ordering::Acquire), Ordering::Release);
    }
}

//! Filters of the inference-aware policy, one per file, registered by name in
//! `registry.rs`: each narrows the candidate set and fails open (keeps
//! everything) when it would keep nothing, so a filter can never make a
//! request unroutable. They run in the configured order. This module holds
//! what several of them share.

pub(super) mod lora;
pub(super) mod prefix_affinity;
pub(super) mod rendezvous;
pub(super) mod saturation;

use super::framework::{Candidate, Ctx, Narrowing};

/// Keeps the alive candidates satisfying `keep`, or all of them when none does.
fn keep_only(cands: &mut [Candidate], keep: impl Fn(&Candidate) -> bool) -> Narrowing {
    let kept = cands.iter().filter(|c| c.alive && keep(c)).count();
    if kept == 0 {
        return Narrowing {
            dropped: 0,
            fail_open: cands.iter().any(|c| c.alive),
        };
    }
    let mut dropped = 0;
    for c in cands.iter_mut().filter(|c| c.alive && !keep(c)) {
        c.alive = false;
        dropped += 1;
    }
    Narrowing {
        dropped,
        fail_open: false,
    }
}

/// Cached blocks a replica needs to count as holding the longest prefix among
/// the alive candidates (`sticky.min_match_ratio` of it); `None` when no
/// replica holds any of the prompt.
fn sticky_threshold(cands: &[Candidate], ctx: &Ctx<'_>) -> Option<u32> {
    ctx.sticky
        .holder_threshold(best_alive(cands, |c| c.matched_blocks))
}

/// The largest `field` among the alive candidates (0 when none is alive).
fn best_alive<T: Ord + Default>(cands: &[Candidate], field: impl Fn(&Candidate) -> T) -> T {
    cands
        .iter()
        .filter(|c| c.alive)
        .map(field)
        .max()
        .unwrap_or_default()
}

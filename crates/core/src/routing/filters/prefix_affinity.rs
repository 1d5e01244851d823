//! The `prefix_affinity` filter: sticky until saturated.

use super::{best_alive, keep_only};
use crate::routing::framework::{Candidate, Ctx, Detail, Filter, Narrowing};

/// Sticky until saturated: keep the replicas holding nearly the longest prefix
/// unless their best estimated TTFT exceeds the best colder replica's by more
/// than the margin (the prefill time the prefix saves, scaled, capped); then
/// drop them (spill), so `rendezvous` sends the overflow of one prefix to the
/// same next replica from every gateway rather than scattering copies.
///
/// The margin grows by `margin_per_evicted` (1 by default) times the saved
/// time when the holder's prefix is known from its engine's events and the
/// colder replica's cache has no room for the copy: under cache pressure
/// every spill evicts other prefixes and leaves the group two homes. The
/// approximate index's matches may be stale, and a cache with free blocks
/// loses nothing to a copy, so neither gets the extra margin.
#[derive(Debug)]
pub(crate) struct PrefixAffinity;

impl Filter for PrefixAffinity {
    fn filter(&self, cands: &mut [Candidate], ctx: &Ctx<'_>, detail: &mut Detail) -> Narrowing {
        let best = best_alive(cands, |c| c.matched_blocks);
        let Some(threshold) = ctx.sticky.holder_threshold(best) else {
            return Narrowing::default();
        };
        // Colder replicas count only when not saturated: leaving for a replica that
        // queues too would spread the prefix and gain nothing.
        let min_ttft = |sticky: bool| {
            cands
                .iter()
                .filter(|c| {
                    c.alive && (c.matched_blocks >= threshold) == sticky && (sticky || !c.saturated)
                })
                .map(|c| c.est_ttft_ms)
                .fold(f64::INFINITY, f64::min)
        };
        let (sticky_ttft, cold_ttft) = (min_ttft(true), min_ttft(false));
        let saved_tokens =
            (u64::from(best) * u64::from(ctx.block_size)).min(u64::from(ctx.req.prompt_tokens));
        let saved_ms = saved_tokens as f64 / ctx.prefill_rate * 1000.0;
        let precise_holder = cands
            .iter()
            .any(|c| c.alive && c.precise && c.matched_blocks >= threshold);
        // The colder replica the request would leave for: its cache's room.
        let evicts = precise_holder
            && cands
                .iter()
                .filter(|c| c.alive && c.matched_blocks < threshold && !c.saturated)
                .min_by(|a, b| a.est_ttft_ms.total_cmp(&b.est_ttft_ms))
                .is_some_and(copy_evicts);
        let per_saved = ctx.sticky.margin_per_saved
            + if evicts {
                ctx.sticky.margin_per_evicted
            } else {
                0.0
            };
        let margin = (per_saved * saved_ms).min(ctx.sticky.max_margin_ms);
        let stick = sticky_ttft <= cold_ttft + margin;
        *detail = Detail::Sticky {
            best_blocks: best,
            sticky_ttft_ms: sticky_ttft,
            cold_ttft_ms: cold_ttft,
            margin_ms: margin,
            evicts,
            stick,
        };
        if stick {
            keep_only(cands, |c| c.matched_blocks >= threshold)
        } else {
            keep_only(cands, |c| c.matched_blocks < threshold && !c.saturated)
        }
    }
}

/// Whether copying the prompt into `c`'s cache evicts cached prefixes: its
/// engine has evicted blocks lately, or its unheld room is smaller than the
/// prompt. Room alone is not enough: an engine allocates from the head of one
/// LRU free queue, so once its cache has turned over, a copy evicts the oldest
/// cached blocks even while unhashed blocks (partial last blocks, output
/// blocks, running requests' tails) make the index's count of held blocks
/// look short of the capacity.
fn copy_evicts(c: &Candidate) -> bool {
    c.cache_turnover.is_some_and(|t| t > 0.0)
        || c.free_tokens
            .is_some_and(|f| f < u64::from(c.uncached_tokens))
}

#[cfg(test)]
mod tests {
    use crate::routing::config::FilterName;
    use crate::routing::framework::test_support::{cand, ctx_for};
    use crate::routing::pipeline::test_support::apply;
    use crate::routing::RoutingConfig;

    #[test]
    fn prefix_affinity_sticks_then_spills() {
        // The arithmetic below takes a margin of once the saved time.
        let mut cfg = RoutingConfig::default();
        cfg.sticky.margin_per_saved = 1.0;
        let ctx = ctx_for(&cfg, None, 1000);
        // 50 blocks of 16 = 800 tokens cached on replica 0: saves 50 ms at 16k tok/s.
        let mut cs = vec![cand(0), cand(1), cand(2)];
        cs[0].matched_blocks = 50;
        cs[0].est_ttft_ms = 80.0; // queued behind others
        cs[1].est_ttft_ms = 62.5; // cold: whole prompt
        cs[2].est_ttft_ms = 70.0;
        let o = apply(FilterName::PrefixAffinity, &mut cs, &ctx);
        assert_eq!(o.dropped, 2);
        assert!(cs[0].alive);
        // ... also when the colder replica is faster but saturated itself.
        let mut cs = vec![cand(0), cand(1)];
        cs[0].matched_blocks = 50;
        cs[0].est_ttft_ms = 500.0;
        cs[1].est_ttft_ms = 62.5;
        cs[1].saturated = true;
        apply(FilterName::PrefixAffinity, &mut cs, &ctx);
        assert!(cs[0].alive && !cs[1].alive);
        // Queue grows past the margin: leave (the holder is dropped).
        let mut cs = vec![cand(0), cand(1)];
        cs[0].matched_blocks = 50;
        cs[0].est_ttft_ms = 62.5 + 50.0 + 1.0;
        cs[1].est_ttft_ms = 62.5;
        let o = apply(FilterName::PrefixAffinity, &mut cs, &ctx);
        assert_eq!(o.dropped, 1);
        assert!(o.detail.to_string().contains("leave"), "{}", o.detail);
        assert!(!cs[0].alive && cs[1].alive);
        // The default margin is three times the saved time (150 ms): stay, and
        // leave only past it.
        let default_cfg = RoutingConfig::default();
        let default_ctx = ctx_for(&default_cfg, None, 1000);
        for (queued_ms, stay) in [(150.0 - 1.0, true), (150.0 + 1.0, false)] {
            let mut cs = vec![cand(0), cand(1)];
            cs[0].matched_blocks = 50;
            cs[0].est_ttft_ms = 62.5 + queued_ms;
            cs[1].est_ttft_ms = 62.5;
            let o = apply(FilterName::PrefixAffinity, &mut cs, &default_ctx);
            assert_eq!((cs[0].alive, cs[1].alive), (stay, !stay), "{}", o.detail);
        }
        // Replica 0 holds 50 blocks (known from events) and is 51 ms slower;
        // replica 1 would prefill 1,000 tokens with `free` tokens of room.
        let held_vs_colder = |free: Option<u64>| {
            let mut cs = vec![cand(0), cand(1)];
            cs[0].matched_blocks = 50;
            cs[0].precise = true;
            cs[0].est_ttft_ms = 62.5 + 50.0 + 1.0;
            cs[1].est_ttft_ms = 62.5;
            cs[1].uncached_tokens = 1000;
            cs[1].free_tokens = free;
            cs
        };
        // The colder cache is full: by default (`margin_per_evicted` 1) the
        // margin is twice the saved time.
        let mut cs = held_vs_colder(Some(999));
        apply(FilterName::PrefixAffinity, &mut cs, &ctx);
        assert!(cs[0].alive && !cs[1].alive, "the copy would evict: stay");
        // Leaving would evict as much elsewhere, so (with `margin_per_evicted`
        // 2) the margin is 3x the saved time.
        cfg.sticky.margin_per_evicted = 2.0;
        let ctx = ctx_for(&cfg, None, 1000);
        let mut cs = held_vs_colder(Some(999));
        let o = apply(FilterName::PrefixAffinity, &mut cs, &ctx);
        assert!(cs[0].alive && !cs[1].alive, "{}", o.detail);
        assert!(o.detail.to_string().contains("evict"), "{}", o.detail);
        cs[0].est_ttft_ms = 62.5 + 150.0 + 1.0;
        cs[0].alive = true;
        cs[1].alive = true;
        apply(FilterName::PrefixAffinity, &mut cs, &ctx);
        assert!(!cs[0].alive && cs[1].alive);
        // ... not when the colder cache has room, nor unknown room.
        for free in [Some(1000), None] {
            let mut cs = held_vs_colder(free);
            apply(FilterName::PrefixAffinity, &mut cs, &ctx);
            assert!(!cs[0].alive && cs[1].alive, "{free:?}");
        }
        // Room by the index's count, but the colder engine's cache turns over
        // (it has evicted lately): the copy evicts from its LRU head.
        let mut cs = held_vs_colder(Some(1000));
        cs[1].cache_turnover = Some(0.01);
        let o = apply(FilterName::PrefixAffinity, &mut cs, &ctx);
        assert!(cs[0].alive && !cs[1].alive, "{}", o.detail);
        // An engine that has not evicted (turnover 0) with room: leave.
        let mut cs = held_vs_colder(Some(1000));
        cs[1].cache_turnover = Some(0.0);
        apply(FilterName::PrefixAffinity, &mut cs, &ctx);
        assert!(!cs[0].alive && cs[1].alive);
        // Near-longest matches are sticky too.
        let mut cs = vec![cand(0), cand(1), cand(2)];
        cs[0].matched_blocks = 50;
        cs[1].matched_blocks = 45;
        cs[2].matched_blocks = 10;
        apply(FilterName::PrefixAffinity, &mut cs, &ctx);
        assert_eq!(
            cs.iter().map(|c| c.alive).collect::<Vec<_>>(),
            [true, true, false]
        );
    }
}

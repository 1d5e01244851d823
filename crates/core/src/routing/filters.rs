//! Filters of the inference-aware policy: each narrows the candidate set and
//! fails open (keeps everything) when it would keep nothing, so a filter can
//! never make a request unroutable. They run in the configured order.

use std::fmt::Write;

use serde::Serialize;

use super::aware::{Candidate, Ctx};
use super::config::FilterName;

/// What one filter did, for `explain`.
#[derive(Debug, Clone, Serialize)]
pub struct FilterOutcome {
    pub filter: FilterName,
    pub dropped: u32,
    /// It would have dropped every candidate, so it dropped none.
    pub fail_open: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Applies filter `name` to the alive candidates.
pub fn apply(name: FilterName, cands: &mut [Candidate], ctx: &Ctx<'_>) -> FilterOutcome {
    let mut detail = String::new();
    let (dropped, fail_open) = match name {
        FilterName::Saturation => saturation(cands, ctx),
        FilterName::Lora => lora(cands, ctx),
        FilterName::PrefixAffinity => prefix_affinity(cands, ctx, &mut detail),
        FilterName::Rendezvous => rendezvous(cands, ctx, &mut detail),
    };
    FilterOutcome {
        filter: name,
        dropped,
        fail_open,
        detail,
    }
}

/// Keeps the alive candidates satisfying `keep`; returns (dropped, failed open).
fn keep_only(
    cands: &mut [Candidate],
    name: FilterName,
    keep: impl Fn(&Candidate) -> bool,
) -> (u32, bool) {
    let kept = cands.iter().filter(|c| c.alive && keep(c)).count();
    if kept == 0 {
        return (0, cands.iter().any(|c| c.alive));
    }
    let mut dropped = 0;
    for c in cands.iter_mut().filter(|c| c.alive && !keep(c)) {
        c.alive = false;
        c.dropped_by = Some(name);
        dropped += 1;
    }
    (dropped, false)
}

/// Drops unknown/stale replicas always; drops busy ones (queue or KV over the
/// thresholds) only while some replica has clear headroom (queue under half the
/// threshold): when every replica queues, moving work around only costs cache.
/// A busy replica holding (nearly) the longest cached prefix of this prompt is
/// kept until its queue reaches `holder_max_waiting` (20): below that, whether
/// to leave it is `prefix_affinity`'s call, which weighs its queue against the
/// full prefill elsewhere. Dropping busy holders at twice the threshold (10)
/// made every burst replicate prefixes onto colder replicas, whose extra
/// prefills and KV copies fed the next burst: at 75 requests/s on the tight
/// 8-replica fleet of docs/routing.md the fleet's hit rate fell from 0.85 to
/// 0.81 and p90 TTFT rose from 78 ms to 694 ms. Past 20 the queue is waiting
/// for batch slots, which the TTFT estimate does not see.
fn saturation(cands: &mut [Candidate], ctx: &Ctx<'_>) -> (u32, bool) {
    let max_waiting = ctx.cfg.saturation.max_waiting;
    let headroom = cands
        .iter()
        .any(|c| c.alive && c.fresh && !c.saturated && c.waiting < max_waiting / 2.0);
    let sticky = sticky_threshold(cands, ctx);
    let holder_cap = ctx.cfg.saturation.holder_max_waiting;
    let holder =
        |c: &Candidate| sticky.is_some_and(|t| c.matched_blocks >= t) && c.waiting < holder_cap;
    keep_only(cands, FilterName::Saturation, |c| {
        c.fresh && (!c.saturated || !headroom || holder(c))
    })
}

/// Cached blocks a replica needs to count as holding the longest prefix among
/// the alive candidates (`sticky.min_match_ratio` of it); `None` when no
/// replica holds any of the prompt.
fn sticky_threshold(cands: &[Candidate], ctx: &Ctx<'_>) -> Option<u32> {
    threshold_for(best_alive(cands, |c| c.matched_blocks), ctx)
}

/// [`sticky_threshold`] when the longest prefix is `best` blocks.
fn threshold_for(best: u32, ctx: &Ctx<'_>) -> Option<u32> {
    (best > 0).then(|| ((f64::from(best) * ctx.cfg.sticky.min_match_ratio).ceil() as u32).max(1))
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

/// Adapter requests: the best non-empty tier of in use > sent recently > has room.
fn lora(cands: &mut [Candidate], ctx: &Ctx<'_>) -> (u32, bool) {
    if ctx.lora.is_none() {
        return (0, false);
    }
    let best = best_alive(cands, |c| c.lora_tier);
    if best == 0 {
        return (0, cands.iter().any(|c| c.alive));
    }
    keep_only(cands, FilterName::Lora, |c| c.lora_tier == best)
}

/// Sticky until saturated: keep the replicas holding nearly the longest prefix
/// unless their best estimated TTFT exceeds the best colder replica's by more
/// than the margin (the prefill time the prefix saves, scaled, capped); then
/// drop them (spill), so `rendezvous` sends the overflow of one prefix to the
/// same next replica from every gateway rather than scattering copies.
fn prefix_affinity(cands: &mut [Candidate], ctx: &Ctx<'_>, detail: &mut String) -> (u32, bool) {
    let best = best_alive(cands, |c| c.matched_blocks);
    let Some(threshold) = threshold_for(best, ctx) else {
        return (0, false);
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
    let margin = (ctx.cfg.sticky.margin_per_saved * saved_ms).min(ctx.cfg.sticky.max_margin_ms);
    let stick = sticky_ttft <= cold_ttft + margin;
    if ctx.explain {
        let _ = write!(
            detail,
            "best prefix {best} blocks; sticky est TTFT {sticky_ttft:.1} ms vs colder {cold_ttft:.1} ms, margin {margin:.1} ms: {}",
            if stick { "stay" } else { "leave (spill)" }
        );
    }
    if stick {
        keep_only(cands, FilterName::PrefixAffinity, |c| {
            c.matched_blocks >= threshold
        })
    } else {
        keep_only(cands, FilterName::PrefixAffinity, |c| {
            c.matched_blocks < threshold && !c.saturated
        })
    }
}

/// A prefix no replica holds: keep the highest rendezvous weight among the
/// replicas within the load bounds, so independent gateways agree on its home.
/// Two bounds (bounded-load consistent hashing): requests in flight, and the
/// number of prefix groups the replica already holds (plain hashing would put
/// 7 of 31 groups on one of 8 replicas; a group's KV and traffic last longer
/// than any one request's). When no replica is within both, the group bound is
/// dropped first. The request bound reads `placement_load`, never the last
/// scrape's count: gateways scraping at different instants (a scrape may still
/// count requests that have finished) put the same group on different homes
/// whenever one of them caught a brief burst on its first choice.
fn rendezvous(cands: &mut [Candidate], ctx: &Ctx<'_>, detail: &mut String) -> (u32, bool) {
    let Some(_) = ctx.group_key else {
        return (0, false);
    };
    let group_blocks = ctx.cfg.rendezvous.blocks.min(ctx.prompt_blocks).max(1);
    if cands
        .iter()
        .any(|c| c.alive && c.matched_blocks >= group_blocks)
    {
        return (0, false);
    }
    // Its holders were all dropped (busy, unknown, spilled): the overflow goes
    // to the next replica in the group's rendezvous order, not to a new home.
    let new_group = !cands.iter().any(|c| c.matched_blocks >= group_blocks);
    let (n, total, groups) = cands
        .iter()
        .filter(|c| c.alive)
        .fold((0usize, 0.0, 0u64), |(n, t, g), c| {
            (n + 1, t + c.placement_load, g + u64::from(c.groups))
        });
    if n == 0 {
        return (0, false);
    }
    let rz = &ctx.cfg.rendezvous;
    let bound = ((1.0 + rz.load_slack) * (total + 1.0) / n as f64 + rz.load_slack_abs).max(1.0);
    // Exact balance alone; slack so gateways agree when another one feeds the pool.
    let shared = !rz.exact_when_alone || cands.iter().any(|c| c.foreign_load);
    let (slack, slack_abs) = if shared {
        (rz.group_slack, rz.group_slack_abs)
    } else {
        (0.0, 0.0)
    };
    let group_cap = ((1.0 + slack) * (groups as f64 + 1.0) / n as f64).ceil() + slack_abs;
    let best = |group_bound: bool| {
        cands
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.alive
                    && c.placement_load + 1.0 <= bound
                    && (!group_bound || !new_group || f64::from(c.groups) + 1.0 <= group_cap)
            })
            .max_by_key(|(_, c)| c.rendezvous)
            .map(|(i, _)| i)
    };
    let Some(chosen) = best(true).or_else(|| best(false)) else {
        if ctx.explain {
            let _ = write!(detail, "every replica above load bound {bound:.2}");
        }
        return (0, true);
    };
    if ctx.explain {
        if new_group {
            let _ = write!(
                detail,
                "new prefix group: placed by rendezvous hash within load bound {bound:.2} and {group_cap} groups ({})",
                if shared { "other gateways seen: slack" } else { "alone: exact balance" }
            );
        } else {
            let _ = write!(
                detail,
                "prefix holders unavailable: next by rendezvous hash within load bound {bound:.2}"
            );
        }
    }
    let mut dropped = 0;
    for (i, c) in cands.iter_mut().enumerate() {
        if c.alive && i != chosen {
            c.alive = false;
            c.dropped_by = Some(FilterName::Rendezvous);
            dropped += 1;
        }
    }
    (dropped, false)
}

#[cfg(test)]
mod tests {
    use super::super::aware::tests::{cand, ctx_for};
    use super::*;
    use crate::routing::RoutingConfig;

    #[test]
    fn saturation_drops_unknown_and_fails_open() {
        let cfg = RoutingConfig::default();
        let ctx = ctx_for(&cfg, None, 10);
        let mut cs = vec![cand(0), cand(1)];
        cs[0].saturated = true;
        let o = apply(FilterName::Saturation, &mut cs, &ctx);
        assert_eq!((o.dropped, o.fail_open), (1, false));
        assert!(!cs[0].alive && cs[1].alive);
        // Every replica queues: busy ones are kept (no headroom anywhere).
        cs[1].saturated = true;
        cs[0].alive = true;
        let o = apply(FilterName::Saturation, &mut cs, &ctx);
        assert_eq!(o.dropped, 0);
        assert!(cs[0].alive && cs[1].alive);
        // Unknown is dropped even then; all unknown fails open.
        cs[0].fresh = false;
        apply(FilterName::Saturation, &mut cs, &ctx);
        assert!(!cs[0].alive && cs[1].alive);
        let mut cs = vec![cand(0), cand(1)];
        cs[0].fresh = false;
        cs[1].fresh = false;
        assert!(apply(FilterName::Saturation, &mut cs, &ctx).fail_open);
        // A busy replica holding the prompt's prefix is left to prefix_affinity.
        let mut cs = vec![cand(0), cand(1), cand(2)];
        cs[0].saturated = true;
        cs[0].matched_blocks = 40;
        cs[1].saturated = true;
        cs[1].matched_blocks = 10;
        let o = apply(FilterName::Saturation, &mut cs, &ctx);
        assert_eq!(o.dropped, 1);
        assert!(cs[0].alive && !cs[1].alive && cs[2].alive);
        // ... past twice the threshold too (prefix_affinity weighs it) ...
        cs[0].waiting = 19.0;
        cs[1].alive = true;
        apply(FilterName::Saturation, &mut cs, &ctx);
        assert!(cs[0].alive && !cs[1].alive && cs[2].alive);
        // ... until `holder_max_waiting`, or unknown.
        cs[0].waiting = 20.0;
        apply(FilterName::Saturation, &mut cs, &ctx);
        assert!(!cs[0].alive && cs[2].alive);
        cs[0].waiting = 1.0;
        cs[0].alive = true;
        cs[0].fresh = false;
        cs[1].alive = true;
        apply(FilterName::Saturation, &mut cs, &ctx);
        assert!(!cs[0].alive && cs[2].alive);
        // A queue just under the threshold is not headroom.
        let mut cs = vec![cand(0), cand(1)];
        cs[0].saturated = true;
        cs[1].waiting = 3.0;
        apply(FilterName::Saturation, &mut cs, &ctx);
        assert!(cs[0].alive && cs[1].alive);
    }

    #[test]
    fn lora_prefers_resident_then_loading_then_room() {
        let cfg = RoutingConfig::default();
        let ctx = ctx_for(&cfg, Some("ad"), 10);
        let mut cs = vec![cand(0), cand(1), cand(2)];
        cs[0].lora_tier = 1;
        cs[1].lora_tier = 3;
        cs[2].lora_tier = 2;
        apply(FilterName::Lora, &mut cs, &ctx);
        assert_eq!(
            cs.iter().map(|c| c.alive).collect::<Vec<_>>(),
            [false, true, false]
        );
        let mut cs = vec![cand(0), cand(1)];
        let o = apply(FilterName::Lora, &mut cs, &ctx);
        assert!(o.fail_open && cs.iter().all(|c| c.alive));
        // Not an adapter request: no-op.
        let ctx = ctx_for(&cfg, None, 10);
        let mut cs = vec![cand(0), cand(1)];
        cs[1].lora_tier = 3;
        assert_eq!(apply(FilterName::Lora, &mut cs, &ctx).dropped, 0);
    }

    #[test]
    fn prefix_affinity_sticks_then_spills() {
        let cfg = RoutingConfig::default();
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
        assert!(o.detail.contains("leave"), "{}", o.detail);
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

    /// Four candidates ranked 0..4 in rendezvous order (3 first), each holding `groups`.
    fn ranked(groups: u32) -> Vec<Candidate> {
        let mut cs: Vec<Candidate> = (0..4).map(cand).collect();
        for (i, c) in cs.iter_mut().enumerate() {
            c.rendezvous = i as u64;
            c.groups = groups;
        }
        cs
    }

    #[test]
    fn rendezvous_places_new_groups_within_load_bound() {
        let mut cfg = RoutingConfig::default();
        (cfg.rendezvous.group_slack, cfg.rendezvous.group_slack_abs) = (0.0, 0.0);
        let ctx = ctx_for(&cfg, None, 1000);
        let mut cs = ranked(0);
        apply(FilterName::Rendezvous, &mut cs, &ctx);
        assert_eq!(cs.iter().position(|c| c.alive), Some(3));
        // Replica 3 is over the bound: the next in rendezvous order.
        let mut cs = ranked(0);
        // bound = 1.25 x (5 + 1) / 4 + 2 = 3.875: 3 in flight + this one is over.
        cs[3].placement_load = 3.0;
        cs[0].placement_load = 2.0;
        apply(FilterName::Rendezvous, &mut cs, &ctx);
        assert_eq!(cs.iter().position(|c| c.alive), Some(2));
        // Replica 3 holds more groups than its share: the next in rendezvous
        // order takes the new one; over every bound, the group bound yields first.
        let mut cs = ranked(1);
        cs[3].groups = 2; // 5 groups + this one over 4 replicas: at most 2 each
        apply(FilterName::Rendezvous, &mut cs, &ctx);
        assert_eq!(cs.iter().position(|c| c.alive), Some(2));
        let mut cs = ranked(2);
        cs[3].groups = 0; // cap = ceil(7 / 4) = 2: only replica 3 has room
        cs[3].placement_load = 9.0; // ... but it is over the request bound
        apply(FilterName::Rendezvous, &mut cs, &ctx);
        assert_eq!(cs.iter().position(|c| c.alive), Some(2));
        // A replica already holding the group: not a new prefix, no-op.
        let mut cs: Vec<Candidate> = (0..4).map(cand).collect();
        cs[0].matched_blocks = 4;
        assert_eq!(apply(FilterName::Rendezvous, &mut cs, &ctx).dropped, 0);
    }

    #[test]
    fn rendezvous_bounds_placement_load_not_the_last_scrape() {
        let cfg = RoutingConfig::default();
        let ctx = ctx_for(&cfg, None, 1000);
        // The last scrape of replica 3 (first in rendezvous order) still counts
        // the two requests of a finished burst; another gateway, scraping a
        // moment later, saw none. Both must give the group the same home.
        let mut cs = ranked(0);
        cs[3].load_requests = 2.0;
        cs[3].running = 2.0;
        apply(FilterName::Rendezvous, &mut cs, &ctx);
        assert_eq!(cs.iter().position(|c| c.alive), Some(3));
        // Load that lasts (in the average) still moves the group.
        let mut cs = ranked(0);
        cs[3].placement_load = 2.0;
        apply(FilterName::Rendezvous, &mut cs, &ctx);
        assert_eq!(cs.iter().position(|c| c.alive), Some(2));
    }

    #[test]
    fn group_slack_applies_only_while_another_gateway_feeds_the_pool() {
        let cfg = RoutingConfig::default(); // slack 0.25 and 1, exact when alone
        let ctx = ctx_for(&cfg, None, 1000);
        // 5 groups + this one over 4 replicas; replica 3 (first in rendezvous
        // order) holds 2: exact cap ceil(6 / 4) = 2, with slack ceil(7.5 / 4) + 1 = 3.
        let shaped = |foreign: bool| {
            let mut cs = ranked(1);
            cs[3].groups = 2;
            cs[0].foreign_load = foreign;
            cs
        };
        let mut alone = shaped(false);
        apply(FilterName::Rendezvous, &mut alone, &ctx);
        assert_eq!(alone.iter().position(|c| c.alive), Some(2));
        let mut shared = shaped(true);
        let o = apply(FilterName::Rendezvous, &mut shared, &ctx);
        assert_eq!(shared.iter().position(|c| c.alive), Some(3));
        assert!(o.detail.contains("other gateways seen"), "{}", o.detail);
        // exact_when_alone: false applies the slack alone too.
        let mut cfg = RoutingConfig::default();
        cfg.rendezvous.exact_when_alone = false;
        let ctx = ctx_for(&cfg, None, 1000);
        let mut cs = shaped(false);
        apply(FilterName::Rendezvous, &mut cs, &ctx);
        assert_eq!(cs.iter().position(|c| c.alive), Some(3));
    }
}

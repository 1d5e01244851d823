//! The `saturation` filter: unknown, stale and busy replicas out while others
//! have headroom.

use super::{keep_only, sticky_threshold};
use crate::routing::framework::{Candidate, Ctx, Detail, Filter, Narrowing};

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
#[derive(Debug)]
pub(crate) struct Saturation;

impl Filter for Saturation {
    fn filter(&self, cands: &mut [Candidate], ctx: &Ctx<'_>, _detail: &mut Detail) -> Narrowing {
        let max_waiting = ctx.saturation.max_waiting;
        let headroom = cands
            .iter()
            .any(|c| c.alive && c.fresh && !c.saturated && c.waiting < max_waiting / 2.0);
        let sticky = sticky_threshold(cands, ctx);
        let holder_cap = ctx.saturation.holder_max_waiting;
        let holder =
            |c: &Candidate| sticky.is_some_and(|t| c.matched_blocks >= t) && c.waiting < holder_cap;
        keep_only(cands, |c| {
            c.fresh && (!c.saturated || !headroom || holder(c))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::routing::config::FilterName;
    use crate::routing::framework::test_support::{cand, ctx_for};
    use crate::routing::pipeline::test_support::apply;
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
}

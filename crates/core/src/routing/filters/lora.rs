//! The `lora` filter: adapter requests go where the adapter is.

use super::{best_alive, keep_only};
use crate::routing::framework::{Candidate, Ctx, Detail, Filter, Narrowing};

/// Adapter requests: the best non-empty tier of in use > sent recently > has room.
#[derive(Debug)]
pub(crate) struct Lora;

impl Filter for Lora {
    fn filter(&self, cands: &mut [Candidate], ctx: &Ctx<'_>, _detail: &mut Detail) -> Narrowing {
        if ctx.lora.is_none() {
            return Narrowing::default();
        }
        let best = best_alive(cands, |c| c.lora_tier);
        if best == 0 {
            return Narrowing {
                dropped: 0,
                fail_open: cands.iter().any(|c| c.alive),
            };
        }
        keep_only(cands, |c| c.lora_tier == best)
    }
}

#[cfg(test)]
mod tests {
    use crate::routing::config::FilterName;
    use crate::routing::framework::test_support::{cand, ctx_for};
    use crate::routing::pipeline::test_support::apply;
    use crate::routing::RoutingConfig;

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
}

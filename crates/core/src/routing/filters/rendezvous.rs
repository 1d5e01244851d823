//! The `rendezvous` filter: a new prefix group's home, agreed by independent
//! gateways.

use crate::routing::framework::{Candidate, Ctx, Detail, Filter, Narrowing};

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
#[derive(Debug)]
pub(crate) struct Rendezvous;

impl Filter for Rendezvous {
    fn filter(&self, cands: &mut [Candidate], ctx: &Ctx<'_>, detail: &mut Detail) -> Narrowing {
        let Some(_) = ctx.group_key else {
            return Narrowing::default();
        };
        let group_blocks = ctx.rendezvous.blocks.min(ctx.prompt_blocks).max(1);
        if cands
            .iter()
            .any(|c| c.alive && c.matched_blocks >= group_blocks)
        {
            return Narrowing::default();
        }
        // Its holders were all dropped (busy, unknown, spilled): the overflow goes
        // to the next replica in the group's rendezvous order, not to a new home.
        let new_group = !cands.iter().any(|c| c.matched_blocks >= group_blocks);
        let (n, total, groups, weights) =
            cands
                .iter()
                .filter(|c| c.alive)
                .fold((0usize, 0.0, 0u64, 0.0), |(n, t, g, w), c| {
                    (
                        n + 1,
                        t + c.placement_load,
                        g + u64::from(c.groups),
                        w + c.group_weight,
                    )
                });
        if n == 0 {
            return Narrowing::default();
        }
        let rz = &ctx.rendezvous;
        let bound = ((1.0 + rz.load_slack) * (total + 1.0) / n as f64 + rz.load_slack_abs).max(1.0);
        // Exact balance alone; slack so gateways agree when another one feeds the pool.
        let shared = !rz.exact_when_alone || cands.iter().any(|c| c.foreign_load);
        let (slack, slack_abs) = if shared {
            (rz.group_slack, rz.group_slack_abs)
        } else {
            (0.0, 0.0)
        };
        // Each replica's share of the groups: its weight's (equal unless
        // caches evict; see `aware::weigh_by_turnover`).
        let group_cap_of = |weight: f64| {
            ((1.0 + slack) * (groups as f64 + 1.0) * weight / weights).ceil() + slack_abs
        };
        let group_cap = group_cap_of(weights / n as f64);
        let best = |group_bound: bool| {
            cands
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    c.alive
                        && c.placement_load + 1.0 <= bound
                        && (!group_bound
                            || !new_group
                            || f64::from(c.groups) + 1.0 <= group_cap_of(c.group_weight))
                })
                .max_by_key(|(_, c)| c.rendezvous)
                .map(|(i, _)| i)
        };
        let Some(chosen) = best(true).or_else(|| best(false)) else {
            *detail = Detail::AboveBound { bound };
            return Narrowing {
                dropped: 0,
                fail_open: true,
            };
        };
        *detail = if new_group {
            Detail::NewGroup {
                bound,
                group_cap,
                shared,
            }
        } else {
            Detail::NextHome { bound }
        };
        let mut dropped = 0;
        for (i, c) in cands.iter_mut().enumerate() {
            if c.alive && i != chosen {
                c.alive = false;
                dropped += 1;
            }
        }
        Narrowing {
            dropped,
            fail_open: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::config::FilterName;
    use crate::routing::framework::test_support::{cand, ctx_for};
    use crate::routing::pipeline::test_support::apply;
    use crate::routing::RoutingConfig;

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
        assert!(
            o.detail.to_string().contains("other gateways seen"),
            "{}",
            o.detail
        );
        // exact_when_alone: false applies the slack alone too.
        let mut cfg = RoutingConfig::default();
        cfg.rendezvous.exact_when_alone = false;
        let ctx = ctx_for(&cfg, None, 1000);
        let mut cs = shaped(false);
        apply(FilterName::Rendezvous, &mut cs, &ctx);
        assert_eq!(cs.iter().position(|c| c.alive), Some(3));
    }
}

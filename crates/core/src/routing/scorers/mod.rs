//! Scorers of the inference-aware policy, one per file, registered by name in
//! `registry.rs`: each maps the alive candidates to [0, 1] (1 = best); the
//! policy adds them with their configured weights. Most score a cost (a
//! [`Cost`]) as a ratio to the best, `(min + 1) / (v + 1)`, not min-max, so a
//! one-token difference between two idle replicas does not swing a whole weight.

pub(super) mod kv_cache;
pub(super) mod prefix;
pub(super) mod queue;
pub(super) mod requests;
pub(super) mod token_load;
pub(super) mod ttft;

use std::fmt;

use super::framework::{Candidate, Ctx, Scorer};

/// A value to minimise, scored relative to the lowest among the candidates.
pub(super) trait Cost: Send + Sync + fmt::Debug {
    fn cost(&self, c: &Candidate) -> f64;
}

impl<T: Cost> Scorer for T {
    /// The lowest cost among the alive candidates.
    fn reference(&self, cands: &[Candidate]) -> f64 {
        cands
            .iter()
            .filter(|c| c.alive)
            .map(|c| self.cost(c))
            .fold(f64::INFINITY, f64::min)
    }

    fn score(&self, c: &Candidate, lowest: f64, _ctx: &Ctx<'_>) -> f64 {
        (lowest.max(0.0) + 1.0) / (self.cost(c).max(0.0) + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use crate::routing::config::{ScorerName, WeightedScorer};
    use crate::routing::framework::test_support::cand;
    use crate::routing::pipeline::test_support::score_all;

    fn ws(scorer: ScorerName, weight: f64) -> WeightedScorer {
        WeightedScorer { scorer, weight }
    }

    #[test]
    fn each_scorer_prefers_the_better_replica() {
        for name in [
            ScorerName::Ttft,
            ScorerName::TokenLoad,
            ScorerName::Requests,
            ScorerName::Queue,
            ScorerName::KvCache,
            ScorerName::Prefix,
        ] {
            let mut cs = vec![cand(0), cand(1)];
            // Replica 1 is better on every signal.
            cs[0].est_ttft_ms = 500.0;
            cs[0].token_load = 9000.0;
            cs[0].load_requests = 9.0;
            cs[0].waiting = 4.0;
            cs[0].kv_usage = 0.9;
            cs[1].matched_blocks = 10;
            score_all(&[ws(name, 1.0)], &mut cs, 10);
            assert!(cs[1].score > cs[0].score, "{name:?}");
            assert!(cs[1].score <= 1.0 && cs[0].score >= 0.0, "{name:?}");
        }
    }

    #[test]
    fn weights_and_dead_candidates() {
        let mut cs = vec![cand(0), cand(1), cand(2)];
        cs[0].est_ttft_ms = 100.0;
        cs[1].est_ttft_ms = 300.0;
        cs[1].token_load = 0.0;
        cs[0].token_load = 1000.0;
        cs[2].alive = false;
        cs[2].est_ttft_ms = 0.0;
        score_all(&[ws(ScorerName::Ttft, 1.0)], &mut cs, 1);
        assert!(cs[0].score > cs[1].score);
        assert_eq!(cs[2].score, 0.0);
        // A heavier token-load weight flips it.
        score_all(
            &[ws(ScorerName::Ttft, 1.0), ws(ScorerName::TokenLoad, 5.0)],
            &mut cs,
            1,
        );
        assert!(cs[1].score > cs[0].score);
        // Equal replicas score equally (ties go to the rendezvous order).
        let mut cs = vec![cand(0), cand(1)];
        score_all(&[ws(ScorerName::Ttft, 2.0)], &mut cs, 1);
        assert_eq!(cs[0].score, cs[1].score);
    }
}

//! Scorers of the inference-aware policy: each maps the alive candidates to
//! [0, 1] (1 = best); the policy adds them with their configured weights. Costs
//! are scored as a ratio to the best (`(min + 1) / (v + 1)`), not min-max, so a
//! one-token difference between two idle replicas does not swing a whole weight.

use super::aware::Candidate;
use super::config::{ScorerName, WeightedScorer};

/// The raw value a scorer reads, and whether lower is better.
fn raw(name: ScorerName, c: &Candidate) -> (f64, bool) {
    match name {
        ScorerName::Ttft => (c.est_ttft_ms, true),
        ScorerName::TokenLoad => (c.token_load, true),
        ScorerName::Requests => (c.load_requests, true),
        ScorerName::Queue => (c.waiting, true),
        ScorerName::KvCache => (c.kv_usage, true),
        ScorerName::Prefix => (f64::from(c.matched_blocks), false),
    }
}

/// Adds `weight × score` of every configured scorer to each alive candidate's `score`.
pub fn score_all(scorers: &[WeightedScorer], cands: &mut [Candidate], prompt_blocks: u32) {
    for c in cands.iter_mut() {
        c.score = 0.0;
    }
    for ws in scorers {
        let lower_best = raw(ws.scorer, &cands[0]).1;
        let best = cands
            .iter()
            .filter(|c| c.alive)
            .map(|c| raw(ws.scorer, c).0)
            .fold(if lower_best { f64::INFINITY } else { 0.0 }, |a, v| {
                if lower_best {
                    a.min(v)
                } else {
                    a.max(v)
                }
            });
        for c in cands.iter_mut().filter(|c| c.alive) {
            let v = raw(ws.scorer, c).0;
            let s = match ws.scorer {
                ScorerName::KvCache => 1.0 - v.clamp(0.0, 1.0),
                ScorerName::Prefix => v / f64::from(prompt_blocks.max(1)),
                _ if lower_best => (best.max(0.0) + 1.0) / (v.max(0.0) + 1.0),
                _ => (v + 1.0) / (best + 1.0),
            };
            c.score += ws.weight * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::aware::tests::cand;
    use super::*;

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

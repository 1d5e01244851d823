//! The inference-aware policy's chain of plugins, built once per picker from
//! the config through the registry: the filters in the configured order, each
//! recorded for `explain`, then the weighted sum of the scorers.

use serde::Serialize;

use super::config::{FilterName, WeightedScorer};
use super::framework::{Candidate, Ctx, Detail, Filter, Scorer};

/// What one filter did, for `explain`.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct FilterOutcome {
    pub filter: FilterName,
    pub dropped: u32,
    /// It would have dropped every candidate, so it dropped none.
    pub fail_open: bool,
    #[serde(skip_serializing_if = "Detail::is_none")]
    pub detail: Detail,
}

/// What the filters of one decision did, in order: inline up to four (the
/// number of filters there are), so a decision allocates nothing for it.
pub(super) type Outcomes = smallvec::SmallVec<[FilterOutcome; 4]>;

/// The filters and weighted scorers of one picker.
#[derive(Debug)]
pub(super) struct Pipeline {
    filters: Vec<(FilterName, Box<dyn Filter>)>,
    scorers: Vec<(Box<dyn Scorer>, f64)>,
}

impl Pipeline {
    pub(super) fn new(filters: &[FilterName], scorers: &[WeightedScorer]) -> Self {
        Pipeline {
            filters: filters.iter().map(|f| (*f, f.build())).collect(),
            scorers: scorers
                .iter()
                .map(|ws| (ws.scorer.build(), ws.weight))
                .collect(),
        }
    }

    /// Runs the filters in order; `outcomes` (cleared first) takes what each
    /// did when `ctx.explain` is set.
    pub(super) fn filter(&self, cands: &mut [Candidate], ctx: &Ctx<'_>, outcomes: &mut Outcomes) {
        outcomes.clear();
        for (name, f) in &self.filters {
            let o = run_filter(*name, &**f, cands, ctx);
            if ctx.explain {
                outcomes.push(o);
            }
        }
    }

    /// Sets each alive candidate's `score` to the weighted sum of the scorers.
    pub(super) fn score(&self, cands: &mut [Candidate], ctx: &Ctx<'_>) {
        for c in cands.iter_mut() {
            c.score = 0.0;
        }
        for (scorer, weight) in &self.scorers {
            scorer.add_weighted(cands, *weight, ctx);
        }
    }
}

/// Runs filter `name` and marks the candidates it dropped with its name.
fn run_filter(
    name: FilterName,
    filter: &dyn Filter,
    cands: &mut [Candidate],
    ctx: &Ctx<'_>,
) -> FilterOutcome {
    let mut detail = Detail::None;
    let n = filter.filter(cands, ctx, &mut detail);
    // Candidates dropped by earlier filters are marked already: only a
    // filter that dropped some has any to mark.
    if n.dropped > 0 {
        for c in cands
            .iter_mut()
            .filter(|c| !c.alive && c.dropped_by.is_none())
        {
            c.dropped_by = Some(name.as_str());
        }
    }
    FilterOutcome {
        filter: name,
        dropped: n.dropped,
        fail_open: n.fail_open,
        detail,
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::routing::framework::test_support::ctx_for;
    use crate::routing::RoutingConfig;

    /// Applies filter `name` to the candidates, as the pipeline does.
    pub(crate) fn apply(name: FilterName, cands: &mut [Candidate], ctx: &Ctx<'_>) -> FilterOutcome {
        run_filter(name, &*name.build(), cands, ctx)
    }

    /// Scores the candidates with `scorers`, as the pipeline does, for a
    /// prompt of `prompt_blocks` blocks.
    pub(crate) fn score_all(
        scorers: &[WeightedScorer],
        cands: &mut [Candidate],
        prompt_blocks: u32,
    ) {
        let cfg = RoutingConfig::default();
        let mut ctx = ctx_for(&cfg, None, 0);
        ctx.prompt_blocks = prompt_blocks;
        Pipeline::new(&[], scorers).score(cands, &ctx);
    }
}

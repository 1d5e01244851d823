//! The `prefix` scorer: the more of the prompt cached, the better.

use crate::routing::framework::{Candidate, Ctx, Scorer};

/// Fraction of the prompt's blocks cached.
#[derive(Debug)]
pub(crate) struct Prefix;

impl Scorer for Prefix {
    fn score(&self, c: &Candidate, _reference: f64, ctx: &Ctx<'_>) -> f64 {
        f64::from(c.matched_blocks) / f64::from(ctx.prompt_blocks.max(1))
    }
}

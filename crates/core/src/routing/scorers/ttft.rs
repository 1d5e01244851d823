//! The `ttft` scorer: the lower estimated time to first token, the better.

use super::Cost;
use crate::routing::framework::Candidate;

/// Estimated time to first token: queued prefill + this prompt's uncached part.
#[derive(Debug)]
pub(crate) struct Ttft;

impl Cost for Ttft {
    fn cost(&self, c: &Candidate) -> f64 {
        c.est_ttft_ms
    }
}

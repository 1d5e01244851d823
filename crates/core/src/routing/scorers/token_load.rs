//! The `token_load` scorer: the fewer tokens in flight, the better.

use super::Cost;
use crate::routing::framework::Candidate;

/// Estimated tokens in flight (prompt + output).
#[derive(Debug)]
pub(crate) struct TokenLoad;

impl Cost for TokenLoad {
    fn cost(&self, c: &Candidate) -> f64 {
        c.token_load
    }
}

//! The `queue` scorer: the shorter engine queue, the better.

use super::Cost;
use crate::routing::framework::Candidate;

/// Engine-reported waiting requests.
#[derive(Debug)]
pub(crate) struct Queue;

impl Cost for Queue {
    fn cost(&self, c: &Candidate) -> f64 {
        c.waiting
    }
}

//! The `requests` scorer: the fewer requests in flight, the better.

use super::Cost;
use crate::routing::framework::Candidate;

/// Requests in flight (own count or engine running + waiting, whichever is larger).
#[derive(Debug)]
pub(crate) struct Requests;

impl Cost for Requests {
    fn cost(&self, c: &Candidate) -> f64 {
        c.load_requests
    }
}

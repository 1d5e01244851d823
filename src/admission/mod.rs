//! Admission: token-level backpressure, the per-pool priority queue, load
//! shedding, fallback, canary splits and outlier ejection.
//!
//! (Being built: see the admission issue. Until then every request is admitted.)

use serde::{Deserialize, Serialize};

/// Per-route admission configuration (`admission:` in a route's YAML).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {}

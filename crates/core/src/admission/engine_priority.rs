//! Engine-side priority: a pool whose engines schedule by a request's own
//! priority (vLLM's `--scheduling-policy priority`: the `priority` field,
//! lower first, preempting lower-priority running sequences) declares it with
//! `engine_priority: vllm`, and the gateway then writes each request's band
//! into that field, so a critical request starts in the engine's next step
//! instead of waiting for a slot. The field is always the gateway's: a
//! client's own `priority` is replaced (pools that declare it) or removed
//! (the others), so clients cannot pick their engine priority.

use serde::{Deserialize, Serialize};

use super::Priority;

/// How a pool's engines take a request's priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnginePriority {
    /// vLLM `--scheduling-policy priority`: integer `priority`, lower first.
    Vllm,
}

impl EnginePriority {
    /// The body's `priority` for a request of `band`. Standard is vLLM's
    /// default (0), so traffic that bypasses the gateway ranks as standard.
    pub fn value(self, band: Priority) -> i64 {
        match (self, band) {
            (EnginePriority::Vllm, Priority::Critical) => -1,
            (EnginePriority::Vllm, Priority::Standard) => 0,
            (EnginePriority::Vllm, Priority::Sheddable) => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_map_to_vllm_priorities_lower_first() {
        let v = |b| EnginePriority::Vllm.value(b);
        assert!(v(Priority::Critical) < v(Priority::Standard));
        assert!(v(Priority::Standard) < v(Priority::Sheddable));
        assert_eq!(v(Priority::Standard), 0, "vLLM's default");
        let p: EnginePriority = serde_yaml_ng::from_str("vllm").unwrap();
        assert_eq!(p, EnginePriority::Vllm);
    }
}

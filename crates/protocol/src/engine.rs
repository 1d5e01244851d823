//! Which model server a pool runs: it decides metric names and API quirks,
//! so the gateway, the simulator and the load tools share one definition.

use serde::{Deserialize, Serialize};

/// The model server behind a pool, which decides metric names and API quirks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum EngineKind {
    #[default]
    #[serde(rename = "vllm")]
    Vllm,
    #[serde(rename = "sglang")]
    Sglang,
    #[serde(rename = "llama.cpp", alias = "llamacpp", alias = "llama-cpp")]
    LlamaCpp,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::LlamaCpp => "llama.cpp",
        }
    }
}

//! infergate: an inference-aware L7 gateway for LLM serving.
//!
//! See ARCHITECTURE.md for the request's path through these modules.

pub mod admission;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod kube;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod sim;
pub mod telemetry;
pub mod tokenizer;

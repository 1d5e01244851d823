//! The OpenAI-compatible wire contract shared by the gateway, the simulator
//! and the load tools: error bodies ([`error`]), how a request's prompt text is
//! rendered for token counting and prefix hashing ([`prompt`]), the shared
//! tokenizer and prefix-block hashes ([`tokenizer`]) and the model-server
//! kinds ([`EngineKind`]).

mod engine;
pub mod error;
pub mod prompt;
pub mod tokenizer;

pub use engine::EngineKind;

//! The OpenAI-compatible wire contract shared by the gateway and the simulator:
//! error bodies ([`error`]) and how a request's prompt text is rendered for
//! token counting and prefix hashing ([`prompt`]).

pub mod error;
pub mod prompt;

//! The gateway's decisions, with no listener and no upstream client of its
//! own: the config model, pools and their membership, discovery, routing
//! (which replica) and admission (whether, when, where a request may run).
//! The proxy crate executes what this crate decides.

pub mod admission;
pub mod civil;
pub mod config;
pub mod cost;
pub mod dataplane;
pub mod discovery;
pub mod endpoint;
pub mod identity;
pub mod plan;
pub mod pool;
pub mod quota;
pub mod rate;
pub mod reload;
pub mod routing;

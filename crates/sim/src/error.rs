//! Why a fleet cannot start.

use std::net::SocketAddr;

/// Errors starting a fleet.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid simulator config: {0}")]
    Config(String),
}

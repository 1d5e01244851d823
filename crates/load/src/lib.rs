//! The load tools, measuring the gateway from outside: [`load`] is the
//! `infergate-load` generator, [`sim_cost`] the simulator's cost tool. They
//! depend on the wire contract (`infergate-protocol`) only, never on the
//! gateway's crates, kube or rustls. Their binaries are declared by the
//! `infergate` package (`src/bin/`), so that `cargo run` at the workspace root
//! has one package with binaries and runs the gateway.

pub mod load;
pub mod sim_cost;

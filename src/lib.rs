//! infergate: the binary's wiring. The layers live in their own crates
//! (see ARCHITECTURE.md); this crate parses the command line and assembles
//! them: the control plane for a config file or a cluster, and the gateway.

pub mod cli;
pub mod composer;
pub mod control_plane;

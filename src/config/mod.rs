//! Configuration: the YAML model of listeners, routes and pools, parsed with
//! errors that name the file, line and what was expected.
//!
//! (Being built by the data-plane issue.)

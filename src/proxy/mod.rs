//! The data plane: listener, request handling, upstream forwarding.
//!
//! (Being built by the data-plane issue.)

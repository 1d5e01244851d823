//! Telemetry: Prometheus metrics and structured request logs.
//!
//! (Being built by the data-plane issue.)

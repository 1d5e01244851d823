//! Telemetry: Prometheus metrics ([`metrics`]) and the structured per-request
//! log line plus logging setup ([`log`]).

pub mod log;
pub mod metrics;

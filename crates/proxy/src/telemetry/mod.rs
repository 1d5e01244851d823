//! Telemetry: Prometheus metrics ([`metrics`]) and the structured per-request
//! log line plus logging setup ([`log`]).

pub(crate) mod log;
pub(crate) mod metrics;

//! Telemetry: Prometheus metrics ([`metrics`]), the structured per-request
//! log line plus logging setup ([`log`]), and the status page's live figures
//! ([`live`]).

pub(crate) mod live;
pub(crate) mod log;
pub(crate) mod metrics;

//! Telemetry: Prometheus metrics ([`metrics`]), the structured per-request
//! log line plus logging setup ([`log`]), the status page's live figures
//! ([`live`]), and OpenTelemetry traces ([`trace`], exported by [`otlp`]).

pub(crate) mod live;
pub(crate) mod log;
pub(crate) mod metrics;
pub(crate) mod otlp;
pub(crate) mod trace;

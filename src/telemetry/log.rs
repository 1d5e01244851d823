//! Logging setup (text or JSON lines) and the one structured line per request.

use std::time::Duration;

use crate::config::LogFormat;

/// Installs the global `tracing` subscriber. `RUST_LOG` wins over `level`.
/// Calling it twice is harmless (the second call does nothing).
pub fn init(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The fields of a request's log line.
pub struct RequestLine<'a> {
    pub request_id: &'a str,
    pub model: &'a str,
    pub route: &'a str,
    pub replica: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub ttft: Option<Duration>,
    pub duration: Duration,
    pub attempts: u32,
}

/// Emits the request's line at target `infergate::access`.
pub fn request_line(l: &RequestLine<'_>) {
    tracing::info!(
        target: "infergate::access",
        request_id = l.request_id,
        model = l.model,
        route = l.route,
        replica = l.replica,
        status = l.status,
        outcome = l.outcome,
        prompt_tokens = l.prompt_tokens,
        completion_tokens = l.completion_tokens,
        ttft_ms = l.ttft.map(|t| t.as_secs_f64() * 1e3),
        duration_ms = l.duration.as_secs_f64() * 1e3,
        attempts = l.attempts,
        "request"
    );
}

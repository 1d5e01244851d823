//! The record of one request that ends as one log line and its metrics,
//! written exactly once whichever way the request ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::telemetry::{log, metrics};
use infergate_core::admission::{CanarySide, CanarySplit, Stratum};

/// How a request ended, for the log and the `outcome` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Answered with an error status before forwarding (bad request, unknown model...).
    Rejected,
    UpstreamError,
    FirstByteTimeout,
    IdleTimeout,
    TotalTimeout,
    ClientGone,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::UpstreamError => "upstream_error",
            Outcome::FirstByteTimeout => "first_byte_timeout",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::TotalTimeout => "total_timeout",
            Outcome::ClientGone => "client_disconnect",
        }
    }
}

/// What is known about a request so far.
#[derive(Debug)]
pub struct RequestRecord {
    pub request_id: String,
    pub route: Arc<str>,
    pub model: String,
    pub replica: Arc<str>,
    pub received_at: Instant,
    pub ttft: Option<Duration>,
    /// Time spent in the gateway before the request went upstream.
    pub overhead: Option<Duration>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub attempts: u32,
    /// The route's canary split and the side that served, for its rollback
    /// statistics.
    pub canary: Option<(Arc<CanarySplit>, CanarySide)>,
    /// The traffic the canary's outcome is matched with (band, prompt length).
    pub canary_stratum: Stratum,
}

impl RequestRecord {
    pub fn new(request_id: String, received_at: Instant) -> Self {
        RequestRecord {
            request_id,
            route: Arc::from("-"),
            model: String::new(),
            replica: Arc::from("-"),
            received_at,
            ttft: None,
            overhead: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            attempts: 0,
            canary: None,
            canary_stratum: Stratum::default(),
        }
    }

    /// Writes the log line and the metrics.
    pub fn finish(&self, status: u16, outcome: Outcome) {
        let duration = self.received_at.elapsed();
        if let Some((split, side)) = &self.canary {
            let failed = status >= 500
                || matches!(
                    outcome,
                    Outcome::UpstreamError
                        | Outcome::FirstByteTimeout
                        | Outcome::IdleTimeout
                        | Outcome::TotalTimeout
                );
            split.record(*side, !failed, self.ttft, self.canary_stratum);
        }
        log::request_line(&log::RequestLine {
            request_id: &self.request_id,
            model: &self.model,
            route: &self.route,
            replica: &self.replica,
            status,
            outcome: outcome.as_str(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            ttft: self.ttft,
            duration,
            attempts: self.attempts,
        });
        metrics::record_finished(&metrics::Finished {
            route: &self.route,
            model: &self.model,
            replica: &self.replica,
            status,
            outcome: outcome.as_str(),
            duration,
            ttft: self.ttft,
            overhead: self.overhead,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        });
    }
}

//! The record of one request that ends as one log line and its metrics,
//! written exactly once whichever way the request ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::telemetry::trace::{self, RequestTrace};
use crate::telemetry::{live, log, metrics};
use infergate_core::admission::{CanarySide, CanarySplit, Stratum};
use opentelemetry::KeyValue;

/// The route of a request whose model did not resolve (yet).
const UNRESOLVED: &str = "-";
/// The longest model name written to the log.
const MAX_LOGGED_MODEL: usize = 256;

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
    /// The gateway's id of the request.
    pub request_id: String,
    /// The id the client sent as `x-request-id`, if any.
    pub client_request_id: Option<String>,
    pub route: Arc<str>,
    /// `gen_ai.operation.name` of the API, once the route is known.
    pub operation: Option<&'static str>,
    pub model: String,
    pub replica: Arc<str>,
    pub received_at: Instant,
    pub ttft: Option<Duration>,
    /// Time spent in the gateway before the request went upstream.
    pub overhead: Option<Duration>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens the engine served from its prefix cache (its usage's
    /// `cached_tokens` / `cache_read_input_tokens`).
    pub cached_tokens: u64,
    /// Sum and count of the gaps between stream chunks (inter-token latency).
    pub itl_sum: Duration,
    pub itl_count: u64,
    pub attempts: u32,
    /// The route's canary split and the side that served, for its rollback
    /// statistics.
    pub canary: Option<(Arc<CanarySplit>, CanarySide)>,
    /// The traffic the canary's outcome is matched with (band, prompt length).
    pub canary_stratum: Stratum,
    /// The request's span, when tracing is on.
    pub(crate) trace: Option<RequestTrace>,
}

impl RequestRecord {
    pub fn new(request_id: String, received_at: Instant) -> Self {
        RequestRecord {
            request_id,
            client_request_id: None,
            route: Arc::from(UNRESOLVED),
            operation: None,
            model: String::new(),
            replica: Arc::from("-"),
            received_at,
            ttft: None,
            overhead: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            itl_sum: Duration::ZERO,
            itl_count: 0,
            attempts: 0,
            canary: None,
            canary_stratum: Stratum::default(),
            trace: None,
        }
    }

    /// Whether the request's model resolved to a route.
    fn resolved(&self) -> bool {
        &*self.route != UNRESOLVED
    }

    /// Keeps the client's model name for the log, cut to [`MAX_LOGGED_MODEL`]
    /// bytes: a client may send megabytes of it.
    pub fn set_model(&mut self, model: &str) {
        self.model.clear();
        let mut end = model.len().min(MAX_LOGGED_MODEL);
        while !model.is_char_boundary(end) {
            end -= 1;
        }
        self.model.push_str(&model[..end]);
    }

    /// Writes the log line and the metrics.
    pub fn finish(&self, status: u16, outcome: Outcome) {
        let duration = self.received_at.elapsed();
        let failed = status >= 500
            || matches!(
                outcome,
                Outcome::UpstreamError
                    | Outcome::FirstByteTimeout
                    | Outcome::IdleTimeout
                    | Outcome::TotalTimeout
            );
        if let Some((split, side)) = &self.canary {
            split.record(*side, !failed, self.ttft, self.canary_stratum);
        }
        if let Some(t) = &self.trace {
            self.end_trace(t, status, outcome, failed);
        }
        live::record(
            self.ttft,
            self.itl_sum,
            self.itl_count,
            self.completion_tokens,
        );
        log::request_line(&log::RequestLine {
            request_id: &self.request_id,
            client_request_id: self.client_request_id.as_deref(),
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
        // Labels come from config only: the route the model name resolved
        // to, or `unknown`; never the client's string (unbounded series).
        let model_label: &str = if self.resolved() {
            &self.route
        } else {
            "unknown"
        };
        metrics::record_finished(&metrics::Finished {
            route: &self.route,
            operation: self.operation,
            model: model_label,
            replica: &self.replica,
            status,
            outcome: outcome.as_str(),
            duration,
            ttft: self.ttft,
            overhead: self.overhead,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens,
        });
    }

    /// The request span's closing attributes (the GenAI usage and TTFT).
    fn end_trace(&self, t: &RequestTrace, status: u16, outcome: Outcome, failed: bool) {
        let mut kv = vec![
            KeyValue::new(trace::INPUT_TOKENS, self.prompt_tokens as i64),
            KeyValue::new(trace::OUTPUT_TOKENS, self.completion_tokens as i64),
            KeyValue::new(trace::ATTEMPTS, i64::from(self.attempts)),
        ];
        if self.cached_tokens > 0 {
            kv.push(KeyValue::new(
                trace::CACHED_TOKENS,
                self.cached_tokens as i64,
            ));
        }
        if let Some(ttft) = self.ttft {
            kv.push(KeyValue::new(trace::TTFT, ttft.as_secs_f64()));
        }
        if self.resolved() {
            kv.push(KeyValue::new(trace::ROUTE, self.route.to_string()));
        }
        if &*self.replica != "-" {
            kv.push(KeyValue::new(trace::REPLICA, self.replica.to_string()));
        }
        t.set(kv);
        t.end(status, outcome.as_str(), failed);
    }
}

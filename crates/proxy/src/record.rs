//! The record of one request that ends as one log line, its metrics and
//! its governance record (usage ledger, cost, audit line), written exactly
//! once whichever way the request ends.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use http::HeaderValue;

use crate::gateway::Route;
use crate::governance::{Governance, RequestFacts};
use crate::telemetry::trace::{self, RequestTrace};
use crate::telemetry::{live, log, metrics};
use infergate_core::admission::{CanarySide, CanarySplit, Priority, Stratum};
use infergate_core::cost::{Money, TokenPrice, TokenUsage};
use opentelemetry::KeyValue;

/// The route of a request whose model did not resolve (yet).
const UNRESOLVED: &str = "-";
/// [`UNRESOLVED`], shared: every record starts with it as its route and
/// replica, which most requests replace, so it should cost no allocation.
fn unresolved() -> Arc<str> {
    static DASH: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(UNRESOLVED));
    DASH.clone()
}

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
    /// The gateway's id of the request (shared with its `RequestContext`).
    pub request_id: Arc<str>,
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
    /// Where the governance record goes (none in unit tests).
    pub(crate) governance: Option<Arc<Governance>>,
    pub caller: Option<CallerFacts>,
    pub client_addr: Option<IpAddr>,
    pub band: Option<Priority>,
    /// The route side that answered, once one did.
    pub served: Option<ServedBy>,
    /// The route's pool, for a request no replica answered.
    pub route_pool: Option<Arc<str>>,
    /// The prompt, kept only for a route with `audit_prompts`.
    pub prompt: Option<String>,
    /// The request's span, when tracing is on.
    pub(crate) trace: Option<RequestTrace>,
}

/// The caller, for usage and audit.
#[derive(Debug, Clone)]
pub struct CallerFacts {
    pub team: Arc<str>,
    /// The team is in the config or key file (may be a metric label).
    pub listed: bool,
    pub key_id: Option<HeaderValue>,
}

/// The route side that answered a request.
#[derive(Debug, Clone)]
pub struct ServedBy {
    pub model: Arc<str>,
    pub pool: Arc<str>,
    pub price: Option<TokenPrice>,
    /// It answered 2xx: its tokens are billed (the engine's usage, else the
    /// prompt count and counted events), even if the client left early.
    pub billable: bool,
}

impl ServedBy {
    pub(crate) fn of(route: &Route, status: http::StatusCode) -> ServedBy {
        ServedBy {
            model: route.model_label.clone(),
            pool: route.pool.name.clone(),
            price: route.price,
            billable: status.is_success(),
        }
    }
}

impl RequestRecord {
    pub fn new(request_id: Arc<str>, received_at: Instant) -> Self {
        RequestRecord {
            request_id,
            client_request_id: None,
            route: unresolved(),
            operation: None,
            model: String::new(),
            replica: unresolved(),
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
            governance: None,
            caller: None,
            client_addr: None,
            band: None,
            served: None,
            route_pool: None,
            prompt: None,
            trace: None,
        }
    }

    /// The tokens billed and their cost: what a replica that answered 2xx
    /// served, nothing otherwise.
    fn billed(&self) -> (TokenUsage, Money) {
        match &self.served {
            Some(s) if s.billable => {
                let usage = TokenUsage::new(
                    self.prompt_tokens,
                    self.cached_tokens,
                    self.completion_tokens,
                );
                (usage, s.price.map_or(Money::ZERO, |p| p.cost(usage)))
            }
            _ => (TokenUsage::default(), Money::ZERO),
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
        let (usage, cost) = self.billed();
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
            cached_prompt_tokens: self.cached_tokens,
            cost,
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
        if let Some(g) = &self.governance {
            let route_pool = self.route_pool.as_ref().unwrap_or(&self.route);
            let (model, pool) = match &self.served {
                Some(s) => (&s.model, &s.pool),
                None => (&self.route, route_pool),
            };
            g.request(&RequestFacts {
                request_id: &self.request_id,
                client_request_id: self.client_request_id.as_deref(),
                team: self.caller.as_ref().map(|c| &c.team),
                team_listed: self.caller.as_ref().is_none_or(|c| c.listed),
                key_id: self.caller.as_ref().and_then(|c| c.key_id.as_ref()),
                requested_model: &self.model,
                route: &self.route,
                model,
                pool,
                replica: &self.replica,
                priority: self.band.map(Priority::as_str),
                status,
                outcome: outcome.as_str(),
                usage,
                cost,
                client_addr: self.client_addr,
                duration,
                prompt: self.prompt.as_deref(),
            });
        }
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

//! A request's OpenTelemetry trace: one server span for the request (named
//! `{gen_ai.operation.name} {gen_ai.request.model}`, as the GenAI semantic
//! conventions name inference spans) with a child per admission (`queue`),
//! per try on a replica (`attempt`, a client span whose context goes to the
//! replica as `traceparent`) and for the relayed answer (`stream`).
//!
//! A client's `traceparent` / `tracestate` is continued (with `parent_based`
//! sampling its sampled flag decides); when tracing is off the gateway
//! forwards them untouched and a request costs one `Option` check here.
//! Attributes come from config, discovery, the caller's identity and the
//! engine's usage; the only client string is `gen_ai.request.model`, cut to
//! 256 bytes like the log's.

use std::time::{Instant, SystemTime};

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span};

use super::otlp;
use infergate_core::config::OtlpConfig;

// The GenAI semantic conventions' attributes.
pub(crate) const OPERATION: &str = "gen_ai.operation.name";
pub(crate) const REQUEST_MODEL: &str = "gen_ai.request.model";
pub(crate) const RESPONSE_MODEL: &str = "gen_ai.response.model";
pub(crate) const INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
pub(crate) const OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
pub(crate) const CACHED_TOKENS: &str = "gen_ai.usage.cache_read.input_tokens";
pub(crate) const TTFT: &str = "gen_ai.response.time_to_first_chunk";
// General semantic conventions.
const SERVER_ADDRESS: &str = "server.address";
const SERVER_PORT: &str = "server.port";
const STATUS_CODE: &str = "http.response.status_code";
const ERROR_TYPE: &str = "error.type";
// The gateway's own (labels from config, discovery and identity).
pub(crate) const ROUTE: &str = "infergate.route";
pub(crate) const PRIORITY: &str = "infergate.priority";
pub(crate) const TEAM: &str = "infergate.team";
pub(crate) const REQUEST_ID: &str = "infergate.request_id";
pub(crate) const REPLICA: &str = "infergate.replica";
pub(crate) const POOL: &str = "infergate.pool";
pub(crate) const ATTEMPT: &str = "infergate.attempt";
pub(crate) const ATTEMPTS: &str = "infergate.attempts";
pub(crate) const CANARY_SIDE: &str = "infergate.canary_side";
pub(crate) const FALLBACK: &str = "infergate.fallback_reason";

/// A gateway's tracer: built from `telemetry.otlp` at start.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Tracing {
    /// The tracer exporting to `cfg`'s collector; needs a Tokio runtime (the
    /// exporter's requests run on it).
    pub fn new(cfg: &OtlpConfig) -> Result<Tracing, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "OTLP traces need a Tokio runtime".to_string())?;
        let ratio = Sampler::TraceIdRatioBased(cfg.sampling.ratio);
        let sampler = if cfg.sampling.parent_based {
            Sampler::ParentBased(Box::new(ratio))
        } else {
            ratio
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(otlp::processor(cfg, runtime)?)
            .with_sampler(sampler)
            .with_resource(otlp::resource(cfg))
            .build();
        let tracer = provider.tracer("infergate");
        Ok(Tracing {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// Starts a request's span at `received_at`, under the client's trace
    /// context when it sent one.
    pub(crate) fn start(
        &self,
        headers: &HeaderMap,
        operation: &'static str,
        request_id: &str,
        received_at: Instant,
    ) -> RequestTrace {
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        let start = SystemTime::now()
            .checked_sub(received_at.elapsed())
            .unwrap_or_else(SystemTime::now);
        let span = self
            .tracer
            .span_builder(operation)
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .with_attributes([
                KeyValue::new(OPERATION, operation),
                KeyValue::new(REQUEST_ID, request_id.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestTrace {
            cx: parent.with_span(span),
            tracer: self.tracer.clone(),
        }
    }

    /// Exports what is queued and stops the exporter (at shutdown). Runs on a
    /// blocking thread: the export it waits for runs on this runtime.
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::debug!(error = %e, "OTLP tracer shutdown");
        }
    }
}

/// The server span of one request (in a context its children start under).
#[derive(Debug, Clone)]
pub(crate) struct RequestTrace {
    cx: Context,
    tracer: SdkTracer,
}

impl RequestTrace {
    /// Adds attributes to the request's span.
    pub(crate) fn set(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        self.cx.span().set_attributes(attributes)
    }

    /// Names the span `{operation} {model}` once the model is known.
    pub(crate) fn name_model(&self, operation: &'static str, model: &str) {
        let span = self.cx.span();
        span.update_name(format!("{operation} {model}"));
        span.set_attribute(KeyValue::new(REQUEST_MODEL, model.to_owned()));
    }

    /// Starts a child span now.
    pub(crate) fn child(
        &self,
        name: &'static str,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Span {
        self.tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.cx)
    }

    /// A client span for one try on `replica` (`host:port`), with the
    /// `traceparent` that carries it to the replica.
    pub(crate) fn attempt(&self, replica: &str, attempt: u32) -> (Span, Option<HeaderValue>) {
        let (host, port) = match replica.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<i64>().ok()),
            None => (replica, None),
        };
        let mut attributes = vec![
            KeyValue::new(SERVER_ADDRESS, host.to_owned()),
            KeyValue::new(REPLICA, replica.to_owned()),
            KeyValue::new(ATTEMPT, i64::from(attempt)),
        ];
        if let Some(p) = port {
            attributes.push(KeyValue::new(SERVER_PORT, p));
        }
        let span = self.child("attempt", SpanKind::Client, attributes);
        let tp = traceparent(&span);
        (span, tp)
    }

    /// Ends the request's span with how it went.
    pub(crate) fn end(&self, status: u16, outcome: &'static str, failed: bool) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(STATUS_CODE, i64::from(status)));
        if outcome != "ok" {
            span.set_attribute(KeyValue::new(ERROR_TYPE, outcome));
        }
        if failed {
            span.set_status(Status::error(outcome));
        }
        span.end();
    }
}

/// Marks `span` failed with `error_type` (and ends nothing).
pub(crate) fn fail(span: &mut Span, error_type: &'static str) {
    span.set_attribute(KeyValue::new(ERROR_TYPE, error_type));
    span.set_status(Status::error(error_type));
}

/// Records a replica's answer status on an attempt span.
pub(crate) fn answered(span: &mut Span, status: u16) {
    span.set_attribute(KeyValue::new(STATUS_CODE, i64::from(status)));
    if status >= 500 {
        span.set_status(Status::error("upstream status"));
    }
}

/// W3C `traceparent` of `span`: version 00, trace id, span id, flags.
fn traceparent(span: &Span) -> Option<HeaderValue> {
    let sc = span.span_context();
    let v = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    HeaderValue::from_str(&v).ok()
}

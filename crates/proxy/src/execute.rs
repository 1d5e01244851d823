//! Executes a request's plan ([`infergate_core::plan`]) over HTTP: each
//! `Admit` step reserves a replica through the side's admission (which may
//! wait in its queue), each `Send` step sends the request with our upstream
//! client, and the outcome goes back to the plan, which alone decides what
//! happens next. This module decides nothing; it observes: every try's
//! outcome feeds the pool's outlier detector (4xx never count) and retries
//! are counted.
//!
//! [`forward`] returns as soon as response headers arrive, before the body is
//! touched, so nothing after the first response byte can be retried. If the
//! client goes away, hyper drops the future, and the plan with it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use tokio::sync::OwnedSemaphorePermit;

use super::context::RequestContext;
use super::gateway::Route;
use super::parse::upstream_body;
use super::upstream::{Outgoing, UpstreamBody};
use crate::telemetry::metrics::record_retry;
use crate::telemetry::trace::{self, RequestTrace};
use infergate_core::admission::{
    CanarySide, CanarySplit, FallbackReason, Outcome, Reservation, CANARY_SIDE_HEADER,
    FALLBACK_REASON_HEADER, SERVED_MODEL_HEADER,
};
use infergate_core::plan::{self, Event, Failure, RequestPlan, RetryReason, Step};
use infergate_core::routing::RouteRequest;
use infergate_protocol::error::ApiError;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

/// A request's plan over the proxy's routes.
pub(crate) type Plan = RequestPlan<Route>;

/// Which model and side served a request: for the response headers and the
/// canary's statistics.
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// The model name sent upstream, as the header's value (none when it is
    /// not a valid header value).
    pub model: Option<HeaderValue>,
    pub fallback: Option<FallbackReason>,
    pub canary: Option<(Arc<CanarySplit>, CanarySide)>,
}

impl Served {
    /// What `plan` served with `route`, the side that answered. The header
    /// value is the route's own when the model sent is the side's model
    /// (not a forwarded alias): shared, not built per request.
    fn of(plan: &Plan, route: &Route) -> Served {
        let model = plan.upstream_model();
        Served {
            model: match &route.model_header {
                Some(h) if model == &*route.model_label => Some(h.clone()),
                _ => HeaderValue::from_str(model).ok(),
            },
            fallback: plan.fallback(),
            canary: plan.canary().cloned(),
        }
    }
}

/// Adds `x-infergate-served-model`, and when they apply
/// `x-infergate-fallback-reason` and `x-infergate-canary-side`.
pub(crate) fn served_headers(h: &mut HeaderMap, s: &Served) {
    if let Some(v) = &s.model {
        h.insert(SERVED_MODEL_HEADER, v.clone());
    }
    if let Some(r) = s.fallback {
        h.insert(FALLBACK_REASON_HEADER, HeaderValue::from_static(r.as_str()));
    }
    if let Some((_, side)) = &s.canary {
        h.insert(CANARY_SIDE_HEADER, HeaderValue::from_static(side.as_str()));
    }
}

/// A replica's response headers, with the reservation (load guard) for the
/// rest of the request.
pub struct Upstream {
    pub response: Response<UpstreamBody>,
    pub guard: Reservation,
    /// The replica connection permit, held until the body ends.
    pub permit: OwnedSemaphorePermit,
    /// Which model and side served.
    pub served: Served,
    /// Tries made on the side that answered, including the one that did.
    pub attempts: u32,
    /// The route side that answered (a fallback's, the canary's).
    pub route: Arc<Route>,
}

/// Why no replica answered.
#[derive(Debug)]
pub struct ForwardError {
    pub error: ApiError,
    pub attempts: u32,
    /// The last replica tried.
    pub replica: Option<Arc<str>>,
}

impl From<Failure> for ForwardError {
    fn from(f: Failure) -> Self {
        ForwardError {
            error: f.error,
            attempts: f.attempts,
            replica: f.replica,
        }
    }
}

/// The first reservation of an admitted request: the plan's first `Send`.
pub(crate) struct Reserved {
    reservation: Reservation,
    route: Arc<Route>,
    attempt: u32,
    /// When the first response byte is due (the clock starts at admission).
    pub(crate) first_byte_deadline: Instant,
}

/// Drives the plan's admission steps until a replica is reserved (the
/// request may wait in queues, move to the stable side or to a fallback) or
/// the request is refused.
pub(crate) async fn admit(plan: &mut Plan, ctx: &RequestContext) -> Result<Reserved, Failure> {
    let mut step = plan.start();
    loop {
        step = match step {
            Step::Admit { route, retry } => {
                let (event, reservation) = admit_on(plan, &route, retry, ctx).await;
                let next = plan.on(event, Instant::now());
                if let (Step::Send { route, attempt }, Some(reservation)) = (&next, reservation) {
                    let first_byte_deadline = plan
                        .first_byte_deadline()
                        .unwrap_or_else(|| Instant::now() + route.config.timeouts.first_byte);
                    return Ok(Reserved {
                        reservation,
                        route: route.clone(),
                        attempt: *attempt,
                        first_byte_deadline,
                    });
                }
                next
            }
            Step::Fail(f) => return Err(f),
            other => return Err(out_of_order(&other)),
        };
    }
}

/// Sends an admitted request, then follows the plan (retries on other
/// replicas, fallbacks after an upstream failure) until response headers
/// arrive or the plan gives up. The body is rewritten for each side's model.
pub(crate) async fn forward(
    mut plan: Plan,
    first: Reserved,
    ctx: &RequestContext,
    out: Outgoing<'_>,
    include_usage: bool,
) -> Result<Upstream, ForwardError> {
    let first_byte_deadline = first.first_byte_deadline;
    let mut reservation = Some(first.reservation);
    let mut step = Step::Send {
        route: first.route,
        attempt: first.attempt,
    };
    let mut body = Bytes::new();
    loop {
        step = match step {
            Step::Admit { route, retry } => {
                let (event, r) = admit_on(&plan, &route, retry, ctx).await;
                reservation = r;
                plan.on(event, Instant::now())
            }
            Step::Send { route, attempt } => {
                let Some(guard) = reservation.take() else {
                    return Err(ForwardError::from(Failure {
                        error: plan::out_of_order(),
                        attempts: attempt,
                        replica: None,
                        rejected: false,
                    }));
                };
                if attempt == 1 {
                    // A new side: its model name may differ.
                    body = upstream_body(
                        &out.body,
                        &ctx.features,
                        Some(plan.upstream_model()),
                        include_usage,
                        route
                            .engine_priority
                            .map(|e| e.value(plan.class().priority)),
                    )
                    .map_err(|error| ForwardError {
                        error,
                        attempts: 0,
                        replica: None,
                    })?;
                }
                // The try's span (tracing on) goes to the replica as its
                // `traceparent`.
                let span = ctx
                    .trace
                    .as_ref()
                    .map(|t| t.attempt(guard.replica().key(), attempt));
                let this = Outgoing {
                    path_and_query: out.path_and_query.clone(),
                    headers: out.headers,
                    body: body.clone(),
                    request_id: out.request_id,
                    client_request_id: out.client_request_id,
                    traceparent: span.as_ref().and_then(|(_, tp)| tp.as_ref()),
                };
                let (event, answered) = send(&route, guard, &this, ctx, first_byte_deadline).await;
                if let Some((mut span, _)) = span {
                    end_attempt(&mut span, &event);
                }
                let next = plan.on(event, Instant::now());
                if let (Step::Respond, Some((response, permit, guard))) = (&next, answered) {
                    let served = Served::of(&plan, &route);
                    if let Some(t) = &ctx.trace {
                        trace_served(t, plan.upstream_model(), &served);
                    }
                    return Ok(Upstream {
                        response,
                        guard,
                        permit,
                        served,
                        attempts: attempt,
                        route,
                    });
                }
                // Not answered, or answered with a status the plan retries or
                // falls back from: the response and its reservation are
                // dropped here (closing that connection) before the next step.
                next
            }
            Step::Fail(f) => return Err(f.into()),
            other => return Err(out_of_order(&other).into()),
        };
    }
}

type Answered = (Response<UpstreamBody>, OwnedSemaphorePermit, Reservation);

/// Ends a try's span with its outcome.
fn end_attempt(span: &mut opentelemetry_sdk::trace::Span, event: &Event) {
    use opentelemetry::trace::Span as _;
    match event {
        Event::Answered { status } => trace::answered(span, status.as_u16()),
        Event::ConnectFailed => trace::fail(span, "connect_failed"),
        Event::FirstByteTimeout => trace::fail(span, "first_byte_timeout"),
        _ => trace::fail(span, "send_failed"),
    }
    span.end();
}

/// What served the request, on its span.
fn trace_served(t: &RequestTrace, model: &str, served: &Served) {
    let mut kv = vec![KeyValue::new(trace::RESPONSE_MODEL, model.to_owned())];
    if let Some((_, side)) = &served.canary {
        kv.push(KeyValue::new(trace::CANARY_SIDE, side.as_str()));
    }
    if let Some(r) = served.fallback {
        kv.push(KeyValue::new(trace::FALLBACK, r.as_str()));
    }
    t.set(kv);
}

/// One try on the reserved replica, bounded by the first-byte deadline; the
/// outcome is recorded for outlier detection.
async fn send(
    route: &Route,
    guard: Reservation,
    out: &Outgoing<'_>,
    ctx: &RequestContext,
    first_byte_deadline: Instant,
) -> (Event, Option<Answered>) {
    let replica = guard.replica().clone();
    let key = &replica.endpoint.key;
    let pool_size = route.pool.replicas().len();
    let outlier = &route.admission.outlier;
    let sent = tokio::time::timeout_at(
        first_byte_deadline.into(),
        route
            .client
            .send(key, &replica.endpoint.base_url, out, &route.name),
    );
    match sent.await {
        Err(_elapsed) => {
            outlier.record(key, Outcome::Timeout, pool_size);
            (Event::FirstByteTimeout, None)
        }
        Ok(Err(e)) if e.is_connect() => {
            outlier.record(key, Outcome::ConnectFailure, pool_size);
            tracing::debug!(request_id = %ctx.request_id, replica = %key, error = %e, "connect failed");
            (Event::ConnectFailed, None)
        }
        Ok(Err(e)) => {
            outlier.record(key, Outcome::ConnectFailure, pool_size);
            (
                Event::SendFailed {
                    detail: e.to_string(),
                },
                None,
            )
        }
        Ok(Ok((response, permit))) => {
            let status = response.status();
            let outcome = if status.is_success() {
                Outcome::Success
            } else {
                Outcome::Status(status.as_u16())
            };
            outlier.record(key, outcome, pool_size);
            (Event::Answered { status }, Some((response, permit, guard)))
        }
    }
}

/// One admission attempt on `route` for the plan's current side, excluding
/// the replicas already tried.
async fn admit_on(
    plan: &Plan,
    route: &Route,
    retry: Option<RetryReason>,
    ctx: &RequestContext,
) -> (Event, Option<Reservation>) {
    if let (Some(reason), Some(failed)) = (retry, plan.excluded().last()) {
        tracing::debug!(request_id = %ctx.request_id, replica = %failed, reason = reason.as_str(), "retrying");
        record_retry(&route.name, failed, reason.as_str());
    }
    let span = ctx.trace.as_ref().map(|t| {
        let pool = KeyValue::new(trace::POOL, route.pool.name.to_string());
        t.child("queue", SpanKind::Internal, vec![pool])
    });
    let rr = RouteRequest {
        request_id: &ctx.request_id,
        model: plan.upstream_model(),
        prompt_text: &ctx.features.prompt_text,
        prompt_tokens: ctx.features.prompt_tokens,
        max_tokens: ctx.expected_output_tokens,
        lora: None,
        hashes: Default::default(),
    };
    let (ticket, excluded) = (plan.ticket(), plan.excluded());
    let adm = &route.admission;
    // Most requests are placed at once: the queue's future is built, and
    // boxed, only for one that waits, so this future (held inline by the
    // handler's and the forward's) stays small.
    let admitted = match adm.try_acquire(&route.pool, &*route.picker, &rr, &ticket, excluded) {
        Ok(decided) => decided,
        Err(wait) => {
            let queued = adm.wait_queued(&route.pool, &*route.picker, &rr, &ticket, excluded, wait);
            Box::pin(queued).await
        }
    };
    if let Some(mut span) = span {
        use opentelemetry::trace::Span as _;
        match &admitted {
            Ok(r) => {
                span.set_attribute(KeyValue::new(trace::REPLICA, r.replica().key().to_string()))
            }
            Err(e) => trace::fail(&mut span, e.as_str()),
        }
        span.end();
    }
    match admitted {
        Ok(r) => (
            Event::Admitted {
                replica: r.replica().endpoint.key.clone(),
            },
            Some(r),
        ),
        Err(e) => (Event::NotAdmitted(e), None),
    }
}

fn out_of_order(step: &Step<Route>) -> Failure {
    tracing::error!(?step, "request executor: unexpected plan step");
    Failure {
        error: plan::out_of_order(),
        attempts: 0,
        replica: None,
        rejected: false,
    }
}

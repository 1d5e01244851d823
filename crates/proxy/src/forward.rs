//! Forwarding to a replica: the retry loop around the upstream client
//! ([`super::upstream`]).
//!
//! A request is retried on another replica (never one already tried) when the
//! connection could not be made or the replica answered a retryable status,
//! and only before any response byte went to the client: this function returns
//! before the response body is touched, so everything after it is never
//! retried. If the client goes away, hyper drops this future and the retry
//! loop with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use tokio::sync::OwnedSemaphorePermit;

use super::admit::{AdmissionPlan, Served};
use super::context::RequestContext;
use super::gateway::Route;
use super::upstream::{Outgoing, UpstreamBody};
use infergate_core::admission::{Outcome, Reservation};
use infergate_protocol::error::ApiError;
use crate::telemetry::metrics::record_retry;

/// A replica's response headers, with the reservation (load guard) for the
/// rest of the request.
pub struct Upstream {
    pub response: Response<UpstreamBody>,
    pub guard: Reservation,
    /// The replica connection permit, held until the body ends.
    pub permit: OwnedSemaphorePermit,
    /// Which model and side served (filled in by the handler's dispatch).
    pub served: Served,
    /// Tries made, including the one that answered.
    pub attempts: u32,
}

/// Why no replica answered.
#[derive(Debug)]
pub struct ForwardError {
    pub error: ApiError,
    pub attempts: u32,
    /// The last replica tried.
    pub replica: Option<Arc<str>>,
}

/// 503: no replica to send to.
pub fn no_replica(route: &Route) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        format!("No ready replica for model `{}`", route.name),
    )
    .with_code("no_ready_replica")
    .with_retry_after(1)
}

/// 504: the replica did not answer in time.
pub fn upstream_timeout(what: &str, after: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!("The model server did not answer: {what} timeout of {after:?} elapsed"),
    )
    .with_code("upstream_timeout")
}

/// 502: the replica failed.
pub fn upstream_failed(detail: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        format!("The model server failed: {detail}"),
    )
    .with_code("upstream_error")
}

/// How one request is sent: its admission plan, the side it was admitted to
/// and the reservation of its first attempt.
pub struct Dispatch<'a> {
    pub plan: &'a AdmissionPlan,
    pub route: &'a Route,
    /// Admitted on a fallback route (the model name sent is the route's).
    pub fallback: bool,
    pub first: Reservation,
}

/// Sends the request to the replica admission reserved, retrying on another
/// replica (admitted again, never one already tried) as the route allows,
/// until response headers arrive or `first_byte_deadline`. Each attempt's
/// outcome feeds the pool's outlier detector (4xx never count).
pub async fn forward(
    d: Dispatch<'_>,
    ctx: &RequestContext,
    out: Outgoing<'_>,
    first_byte_deadline: Instant,
) -> Result<Upstream, ForwardError> {
    let route = d.route;
    let retry = &route.config.retries;
    let outlier = &route.admission.outlier;
    let mut tried: Vec<Arc<str>> = Vec::new();
    let mut last: Option<ApiError> = None;
    let mut first = Some(d.first);
    for attempt in 1..=retry.attempts {
        let guard = match first.take() {
            Some(r) => r,
            None => match d.plan.retry(route, d.fallback, ctx, &tried).await {
                Some(r) => r,
                None => break,
            },
        };
        let replica = guard.replica().clone();
        let pool_size = route.pool.replicas().len();
        let key = replica.endpoint.key.clone();
        let sent = tokio::time::timeout_at(
            first_byte_deadline.into(),
            route
                .client
                .send(&key, &replica.endpoint.base_url, &out, &route.name),
        );
        match sent.await {
            Err(_elapsed) => {
                outlier.record(&key, Outcome::Timeout, pool_size);
                // The engine may be working on it: never resent.
                return Err(ForwardError {
                    error: upstream_timeout("first byte", route.config.timeouts.first_byte),
                    attempts: attempt,
                    replica: Some(key),
                });
            }
            Ok(Err(e)) if e.is_connect() => {
                outlier.record(&key, Outcome::ConnectFailure, pool_size);
                tracing::debug!(request_id = %ctx.request_id, replica = %key, error = %e, "connect failed");
                record_retry(&route.name, &key, "connect");
                last = Some(upstream_failed(format!("cannot connect to {key}")));
                tried.push(key);
            }
            Ok(Err(e)) => {
                outlier.record(&key, Outcome::ConnectFailure, pool_size);
                return Err(ForwardError {
                    error: upstream_failed(e),
                    attempts: attempt,
                    replica: Some(key),
                });
            }
            Ok(Ok((resp, permit))) => {
                let status = resp.status().as_u16();
                outlier.record(
                    &key,
                    if resp.status().is_success() {
                        Outcome::Success
                    } else {
                        Outcome::Status(status)
                    },
                    pool_size,
                );
                let more = attempt < retry.attempts
                    && route
                        .pool
                        .replicas()
                        .iter()
                        .any(|r| r.key() != &*key && !tried.iter().any(|t| **t == *r.key()));
                if retry.on_status.contains(&status) && more {
                    tracing::debug!(request_id = %ctx.request_id, replica = %key, status, "retrying");
                    record_retry(&route.name, &key, "status");
                    last = Some(upstream_failed(format!("replica answered status {status}")));
                    tried.push(key);
                    continue;
                }
                return Ok(Upstream {
                    response: resp,
                    guard,
                    permit,
                    attempts: attempt,
                    served: Served::default(),
                });
            }
        }
    }
    let attempts = tried.len() as u32;
    Err(ForwardError {
        error: last.unwrap_or_else(|| no_replica(route)),
        attempts,
        replica: tried.pop(),
    })
}

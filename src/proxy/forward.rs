//! Forwarding to a replica: a pooled keep-alive HTTP client, the upstream
//! request, and the retry loop.
//!
//! A request is retried on another replica (never one already tried) when the
//! connection could not be made or the replica answered a retryable status,
//! and only before any response byte went to the client: this function returns
//! before the response body is touched, so everything after it is never
//! retried. If the client goes away, hyper drops this future and the retry
//! loop with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::admit::{AdmissionPlan, Served};
use super::context::RequestContext;
use super::gateway::Route;
use super::headers::upstream_request_headers;
use crate::admission::{Outcome, Reservation};
use crate::protocol::error::ApiError;
use crate::telemetry::metrics::record_retry;

/// A pooled keep-alive HTTP/1.1 client to replicas (one per connect timeout).
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamClient")
    }
}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(30)));
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(http);
        UpstreamClient { inner }
    }
}

/// A replica's response headers, with the reservation (load guard) for the
/// rest of the request.
pub struct Upstream {
    pub response: Response<Incoming>,
    pub guard: Reservation,
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

/// What to send upstream (the same for every try).
pub struct Outgoing<'a> {
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    pub request_id: &'a HeaderValue,
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
    let base_headers = upstream_request_headers(out.headers, out.request_id, out.body.len());
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
        let uri = format!("{}{}", replica.endpoint.base_url, out.path_and_query);
        let mut req = Request::new(Full::new(out.body.clone()));
        *req.method_mut() = http::Method::POST;
        *req.headers_mut() = base_headers.clone();
        match uri.parse() {
            Ok(u) => *req.uri_mut() = u,
            Err(e) => {
                return Err(ForwardError {
                    error: upstream_failed(format!("bad upstream URI `{uri}`: {e}")),
                    attempts: attempt,
                    replica: Some(replica.endpoint.key.clone()),
                })
            }
        }
        let sent =
            tokio::time::timeout_at(first_byte_deadline.into(), route.client.inner.request(req));
        let key = replica.endpoint.key.clone();
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
            Ok(Ok(resp)) => {
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

//! Forwarding to a replica: a pooled keep-alive HTTP client, the upstream
//! request, and the retry loop.
//!
//! A request is retried on another replica (never one already tried) when the
//! connection could not be made or the replica answered a retryable status,
//! and only before any response byte went to the client: this function returns
//! before the response body is touched, so everything after it is never
//! retried. If the client goes away, hyper drops this future and the retry
//! loop with it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::admit::{AdmissionPlan, Served};
use super::context::RequestContext;
use super::gateway::Route;
use super::headers::upstream_request_headers;
use crate::admission::{Outcome, Reservation};
use crate::protocol::error::ApiError;
use crate::telemetry::metrics::record_retry;

/// Requests (so HTTP/1 connections) in flight to one replica at most; more
/// wait for a free one within their first-byte deadline. It bounds the
/// connections a burst can open (each costs the replica an accept and the
/// gateway two buffers).
pub const MAX_CONNECTIONS_PER_REPLICA: usize = 1024;
/// Idle keep-alive connections kept per replica and serving worker.
const MAX_IDLE_PER_REPLICA: usize = 256;
/// Replicas remembered before the idle ones are forgotten.
const MAX_REPLICA_SLOTS: usize = 4096;
/// Pools kept: one per serving worker (workers beyond share by modulo).
const MAX_WORKER_POOLS: usize = 64;

type HttpClient = Client<TrackingConnector, Full<Bytes>>;

/// A pooled keep-alive HTTP/1.1 client to replicas (one per connect
/// timeout). Each serving worker thread gets its own connection pool, so a
/// connection's task runs on the thread that uses it.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    connect_timeout: Duration,
    per_worker: Box<[OnceLock<HttpClient>]>,
    replicas: RwLock<HashMap<Arc<str>, Arc<ReplicaSlot>>>,
}

/// What the client keeps per replica: the connection bound and the parsed authority.
struct ReplicaSlot {
    permits: Arc<Semaphore>,
    authority: Option<Authority>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamClient")
    }
}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration) -> Self {
        UpstreamClient {
            inner: Arc::new(ClientInner {
                connect_timeout,
                per_worker: (0..MAX_WORKER_POOLS).map(|_| OnceLock::new()).collect(),
                replicas: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// The current worker thread's client.
    fn client(&self) -> &HttpClient {
        let i = super::server::current_worker() % MAX_WORKER_POOLS;
        self.inner.per_worker[i].get_or_init(|| {
            let mut http = HttpConnector::new();
            http.set_connect_timeout(Some(self.inner.connect_timeout));
            http.set_nodelay(true);
            http.set_keepalive(Some(Duration::from_secs(30)));
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(MAX_IDLE_PER_REPLICA)
                .pool_timer(TokioTimer::new())
                .build(TrackingConnector(http))
        })
    }

    fn slot(&self, key: &Arc<str>, base_url: &str) -> Arc<ReplicaSlot> {
        let map = &self.inner.replicas;
        if let Some(s) = map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
            return s.clone();
        }
        let authority = base_url
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.authority().cloned());
        let slot = Arc::new(ReplicaSlot {
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_REPLICA)),
            authority,
        });
        let mut map = map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_REPLICA_SLOTS {
            // Replicas come and go (discovery): forget the idle ones.
            map.retain(|_, s| s.permits.available_permits() < MAX_CONNECTIONS_PER_REPLICA);
        }
        map.entry(key.clone()).or_insert(slot).clone()
    }
}

/// Connects like [`HttpConnector`] and tracks what each connection carried,
/// so a failed send can tell a stale kept-alive connection from a replica
/// that failed the request.
#[derive(Clone)]
struct TrackingConnector(HttpConnector);

impl tower::Service<Uri> for TrackingConnector {
    type Response = TokioIo<Tracked>;
    type Error = <HttpConnector as tower::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let io = connecting.await?.into_inner();
            Ok(TokioIo::new(Tracked {
                io,
                usage: Arc::default(),
            }))
        })
    }
}

/// What one upstream connection carried so far.
#[derive(Debug, Default)]
struct ConnUsage {
    /// Requests started: a write after a read, or the first write.
    requests: AtomicU32,
    /// A byte arrived since the last request started.
    answered: AtomicBool,
}

/// The connection's [`ConnUsage`], found again from a client error.
#[derive(Clone, Debug)]
struct UsageHandle(Arc<ConnUsage>);

impl ConnUsage {
    /// The connection carried an exchange before the current request, and
    /// the current one got no byte back: the replica closed an idle
    /// keep-alive connection as the request went out, so it never saw it.
    fn stale_reuse(&self) -> bool {
        self.requests.load(Ordering::Relaxed) >= 2 && !self.answered.load(Ordering::Relaxed)
    }
}

/// An upstream TCP stream that records its [`ConnUsage`].
struct Tracked {
    io: TcpStream,
    usage: Arc<ConnUsage>,
}

impl Connection for Tracked {
    fn connected(&self) -> Connected {
        Connected::new().extra(UsageHandle(self.usage.clone()))
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.usage.answered.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl Tracked {
    fn wrote(&self, n: usize) {
        let u = &self.usage;
        if n > 0 && (u.answered.load(Ordering::Relaxed) || u.requests.load(Ordering::Relaxed) == 0)
        {
            u.requests.fetch_add(1, Ordering::Relaxed);
            u.answered.store(false, Ordering::Relaxed);
        }
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(n);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Whether a client error is a request lost on a stale kept-alive connection
/// (never seen by the replica: safe to send again).
fn is_stale_reuse(e: &hyper_util::client::legacy::Error) -> bool {
    let Some(info) = e.connect_info() else {
        return false;
    };
    let mut ext = http::Extensions::new();
    info.get_extras(&mut ext);
    ext.get::<UsageHandle>().is_some_and(|u| u.0.stale_reuse())
}

impl UpstreamClient {
    /// Sends `out` to the replica at `base_url`, holding one of its connection
    /// permits for as long as the returned permit lives. A request lost on a
    /// stale kept-alive connection is sent once more (on another idle or a
    /// fresh connection): the replica never saw it.
    async fn send(
        &self,
        key: &Arc<str>,
        base_url: &str,
        out: &Outgoing<'_>,
        route: &str,
    ) -> Result<(Response<Incoming>, OwnedSemaphorePermit), SendError> {
        let slot = self.slot(key, base_url);
        let permit = slot
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SendError::Closed)?;
        let build = || -> Result<Request<Full<Bytes>>, SendError> {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = slot.authority.clone();
            parts.path_and_query = Some(out.path_and_query.clone());
            let uri = Uri::from_parts(parts).map_err(|e| SendError::Uri(e.to_string()))?;
            let mut request = Request::new(Full::new(out.body.clone()));
            *request.method_mut() = http::Method::POST;
            *request.uri_mut() = uri;
            *request.headers_mut() =
                upstream_request_headers(out.headers, out.request_id, out.body.len());
            Ok(request)
        };
        match self.client().request(build()?).await {
            Ok(resp) => Ok((resp, permit)),
            Err(e) if is_stale_reuse(&e) => {
                tracing::debug!(replica = %key, error = %e, "stale keep-alive connection: sending again");
                record_retry(route, key, "stale_connection");
                match self.client().request(build()?).await {
                    Ok(resp) => Ok((resp, permit)),
                    Err(e) => Err(SendError::Client(e)),
                }
            }
            Err(e) => Err(SendError::Client(e)),
        }
    }
}

/// Why a send failed.
enum SendError {
    Client(hyper_util::client::legacy::Error),
    Uri(String),
    /// The client was shut down.
    Closed,
}

impl SendError {
    /// No connection could be made: nothing reached the replica.
    fn is_connect(&self) -> bool {
        matches!(self, SendError::Client(e) if e.is_connect())
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Client(e) => match std::error::Error::source(e) {
                Some(cause) => write!(f, "{e}: {cause}"),
                None => write!(f, "{e}"),
            },
            SendError::Uri(e) => write!(f, "bad upstream URI: {e}"),
            SendError::Closed => f.write_str("the upstream client is shut down"),
        }
    }
}

/// A replica's response headers, with the reservation (load guard) for the
/// rest of the request.
pub struct Upstream {
    pub response: Response<Incoming>,
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

/// What to send upstream (the same for every try).
pub struct Outgoing<'a> {
    pub path_and_query: http::uri::PathAndQuery,
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

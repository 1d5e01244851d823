//! The per-request pipeline: path allow-list → caller → body → features →
//! route (and the caller's models) → admission → forward → relay. Each step
//! lives in its own module; this one wires them, starts the request's span
//! when tracing is on, and turns every failure into an OpenAI-style JSON
//! error (Anthropic's shape on `/v1/messages`) with a log line.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use smallvec::SmallVec;

use super::body::{check_content_type, read_limited, too_large, BodyLimits};
use super::context::{ApiKind, RequestContext, CLIENT_REQUEST_ID, REPLICA_HEADER, REQUEST_ID};
use super::execute::{self, served_headers, Plan};
use super::gateway::Gateway;
use super::headers::is_event_stream;
use super::parse::parse_features;
use super::record::{CallerFacts, Outcome, RequestRecord, ServedBy};
use super::relay::{GatewayBody, RelayBody, RelaySetup};
use super::upstream::Outgoing;
use crate::telemetry::trace::{self, RequestTrace};
use infergate_core::admission::{Cost, Priority};
use infergate_core::endpoint::{normalize_path, InferenceEndpoint};
use infergate_core::identity::AuthError;
use infergate_core::quota::{Demand, Refusal};
use infergate_protocol::error::{ApiError, ErrorShape};
use opentelemetry::KeyValue;

/// Handles one client request from `peer`.
pub(crate) async fn handle<B>(
    gw: Arc<Gateway>,
    req: Request<B>,
    peer: IpAddr,
) -> Response<GatewayBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let received_at = Instant::now();
    let ids = RequestIds::of(&req);
    let version = req.version();
    let record = || ids.record(received_at, &gw, peer);
    let mut resp = match dispatch(req.method(), req.uri().path()) {
        Dispatch::Models => models(&gw, req.headers(), peer, record()),
        Dispatch::Forward(endpoint) => proxy(&gw, req, peer, endpoint, &ids, record()).await,
        Dispatch::Refuse(e, shape) => reject(shape, e, record()),
    };
    let h = resp.headers_mut();
    h.insert(REQUEST_ID, ids.gateway);
    if let Some(c) = ids.client {
        h.insert(CLIENT_REQUEST_ID, c);
    }
    if version == http::Version::HTTP_2 {
        let limit = gw.config().listeners.main.client_stall;
        resp = resp.map(|b| b.watch_stream(limit));
    }
    resp
}

/// What a request's method and path ask for.
enum Dispatch {
    Models,
    /// An inference endpoint and its canonical path.
    Forward((InferenceEndpoint, &'static str)),
    /// An error, in the shape of the API the path names (OpenAI's if none).
    Refuse(ApiError, ErrorShape),
}

/// Normalises the path and checks it against the forwarding allow-list
/// (`core::endpoint`): only inference endpoints reach a replica.
fn dispatch(method: &Method, raw: &str) -> Dispatch {
    let path = match normalize_path(raw) {
        Ok(p) => p,
        Err(e) => {
            return Dispatch::Refuse(
                ApiError::bad_request(e.message()).with_code("invalid_path"),
                ErrorShape::OpenAi,
            )
        }
    };
    match (method, InferenceEndpoint::from_path(&path)) {
        (&Method::GET, None) if path == "/v1/models" => Dispatch::Models,
        (&Method::POST, Some(e)) => Dispatch::Forward(e),
        (m, Some((e, _))) => Dispatch::Refuse(
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!("Method {m} is not allowed on {path}"),
            ),
            ApiKind::of(e).error_shape(),
        ),
        (_, None) => Dispatch::Refuse(
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("Unknown path {path}"),
            )
            .with_code("not_found"),
            ErrorShape::OpenAi,
        ),
    }
}

/// `GET /v1/models`: the models the caller may use.
fn models(
    gw: &Gateway,
    headers: &http::HeaderMap,
    peer: IpAddr,
    record: Box<RequestRecord>,
) -> Response<GatewayBody> {
    match gw.identity().authenticator().authenticate(headers, peer) {
        Ok(caller) => json_response(gw.routes().models_for(&caller.policy)),
        Err(e) => unauthorized(ErrorShape::OpenAi, e, record),
    }
}

/// 401 with the error body (in `shape`) and `WWW-Authenticate: Bearer`.
fn unauthorized(
    shape: ErrorShape,
    e: AuthError,
    record: Box<RequestRecord>,
) -> Response<GatewayBody> {
    let mut r = reject(shape, e.to_api_error(), record);
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// A request's ids: the gateway's own (always fresh: a client's id would let
/// two clients' requests share one upstream and in the log) and the
/// client's `x-request-id`, kept apart.
struct RequestIds {
    gateway: HeaderValue,
    client: Option<HeaderValue>,
}

impl RequestIds {
    fn of<B>(req: &Request<B>) -> Self {
        let client = req
            .headers()
            .get(REQUEST_ID)
            .filter(|v| {
                !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic)
            })
            .cloned();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        let gateway = HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("-"));
        RequestIds { gateway, client }
    }

    /// Boxed once here: the record (~470 bytes) moves through the handler
    /// and into the relay as a pointer, not copied at each step.
    fn record(&self, received_at: Instant, gw: &Gateway, peer: IpAddr) -> Box<RequestRecord> {
        let mut r = Box::new(RequestRecord::new(
            Arc::from(self.gateway.to_str().unwrap_or("-")),
            received_at,
        ));
        r.client_request_id = self
            .client
            .as_ref()
            .and_then(|c| c.to_str().ok())
            .map(str::to_owned);
        r.governance = Some(gw.governance().clone());
        r.client_addr = Some(peer);
        r
    }
}

/// The path sent upstream: the endpoint's canonical spelling with the
/// client's query (the client's own bytes when they are already canonical).
fn upstream_path(uri: &http::Uri, canonical: &'static str) -> http::uri::PathAndQuery {
    match (uri.path_and_query(), uri.query()) {
        (Some(pq), _) if pq.path() == canonical => pq.clone(),
        (_, None) => http::uri::PathAndQuery::from_static(canonical),
        (_, Some(q)) => format!("{canonical}?{q}")
            .parse()
            .unwrap_or_else(|_| http::uri::PathAndQuery::from_static(canonical)),
    }
}

/// The route and the caller's class on the request's span.
fn trace_caller(t: &RequestTrace, route: &str, band: Priority, team: &str) {
    let mut kv = vec![
        KeyValue::new(trace::ROUTE, route.to_owned()),
        KeyValue::new(trace::PRIORITY, band.as_str()),
    ];
    if !team.is_empty() {
        kv.push(KeyValue::new(trace::TEAM, team.to_owned()));
    }
    t.set(kv);
}

fn json_response(body: Bytes) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::from(body));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// 429 (or 503 for a fail-closed quota without its counters) with
/// `Retry-After` and the `x-ratelimit-*` headers.
fn quota_refused(
    shape: ErrorShape,
    refusal: &Refusal,
    record: Box<RequestRecord>,
) -> Response<GatewayBody> {
    let mut r = reject(shape, refusal.to_api_error(), record);
    refusal.rates().write(r.headers_mut());
    r
}

/// Answers `e` in the client's API's error shape, with its log line.
fn reject(shape: ErrorShape, e: ApiError, record: Box<RequestRecord>) -> Response<GatewayBody> {
    tracing::debug!(request_id = %record.request_id, error = %e, "rejected");
    record.finish(e.status.as_u16(), Outcome::Rejected);
    e.into_response_as(shape)
}

async fn proxy<B>(
    gw: &Gateway,
    req: Request<B>,
    peer: IpAddr,
    (endpoint, path): (InferenceEndpoint, &'static str),
    ids: &RequestIds,
    mut record: Box<RequestRecord>,
) -> Response<GatewayBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let received_at = record.received_at;
    let (mut parts, body) = req.into_parts();
    let kind = ApiKind::of(endpoint);
    let shape = kind.error_shape();
    if let Some(t) = gw.tracing() {
        let span = t.start(
            &parts.headers,
            kind.operation(),
            &record.request_id,
            received_at,
        );
        record.trace = Some(span);
    }
    // Who is calling, before the body is read.
    let caller = {
        let auth = gw.identity().authenticator();
        match auth.authenticate(&parts.headers, peer) {
            Ok(c) => {
                record.caller = Some(CallerFacts {
                    listed: auth.is_listed_team(&c.policy.team),
                    team: c.policy.team.clone(),
                    key_id: c.key_id.clone(),
                });
                c
            }
            Err(e) => return unauthorized(shape, e, record),
        }
    };
    let table = gw.routes();
    let limits = &table.limits;

    if let Err(e) = check_content_type(&parts.headers) {
        return reject(shape, e, record);
    }
    let read = BodyLimits {
        max_bytes: table.max_read_body_bytes,
        budget: &gw.body_budget,
        max_inflight: limits.max_inflight_body_bytes,
        deadline: received_at + limits.body_read_timeout,
        timeout: limits.body_read_timeout,
    };
    let (body, body_permit) = match read_limited(&parts.headers, body, &read).await {
        Ok(b) => b,
        Err(e) => return reject(shape, e, record),
    };
    let features = match parse_features(kind, &body) {
        Ok(f) => f,
        Err(e) => return reject(shape, e, record),
    };
    record.set_model(&features.model);
    record.prompt_tokens = u64::from(features.prompt_tokens);
    if let Some(t) = &record.trace {
        t.name_model(kind.operation(), &record.model);
    }
    // A model the caller may not use is as unknown to it as a missing one.
    let Some(route) = table
        .resolve(&features.model)
        .filter(|r| caller.policy.allows(r.config.names()))
        .cloned()
    else {
        return reject(shape, ApiError::model_not_found(&features.model), record);
    };
    record.route = route.name.clone();
    record.route_pool = Some(route.pool.name.clone());
    record.operation = Some(kind.operation());
    let rc = &route.config;
    if rc.audit_prompts && gw.governance().audit.enabled() {
        record.prompt = Some(features.prompt_text.clone());
    }
    if !rc.serves(endpoint) {
        return reject(
            shape,
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{}` is not served on {path}", features.model),
            )
            .with_code("not_found"),
            record,
        );
    }
    let body_limit = rc.max_body_bytes.unwrap_or(table.max_body_bytes);
    if body.len() as u64 > body_limit {
        return reject(shape, too_large(body_limit), record);
    }
    if features.choices > limits.max_n {
        return reject(
            shape,
            ApiError::bad_request(format!(
                "`n` and `best_of` may be at most {} on this gateway",
                limits.max_n
            ))
            .with_param("n"),
            record,
        );
    }

    let mut ctx = RequestContext::new(record.request_id.clone());
    // Every completion asked for (`n`, `best_of`) generates its own output.
    ctx.expected_output_tokens = features
        .max_tokens
        .unwrap_or(rc.default_max_tokens)
        .saturating_mul(features.choices.max(1));
    ctx.features = features;
    ctx.trace = record.trace.clone();

    let fallbacks = rc
        .admission
        .fallback
        .models
        .iter()
        .filter_map(|m| table.resolve(m).cloned())
        .filter(|r| caller.policy.allows(r.config.names()))
        .collect();
    let cost = Cost::estimate(
        ctx.features.prompt_tokens,
        Some(ctx.expected_output_tokens),
        0,
    );
    let mut plan: Plan = Plan::new(
        &route,
        fallbacks,
        &parts.headers,
        &ctx.features.model,
        ctx.features.user.as_deref(),
        cost,
        &caller.policy.entitlements,
    );
    // Control headers the caller may not use were ignored; the engine must
    // not see them (nor the caller's key).
    // A request carries a few headers and usually none of these but its
    // key: one pass over its headers finds them (typed names compare
    // without parsing), and only those found are removed.
    let stripped = caller.policy.stripped_header_names();
    let found: SmallVec<[&HeaderName; 8]> = parts
        .headers
        .keys()
        .filter_map(|k| stripped.iter().find(|s| *s == k))
        .collect();
    for name in found {
        parts.headers.remove(name);
    }
    record.canary = plan.canary().cloned();
    record.canary_stratum = plan.canary_stratum();
    record.band = Some(plan.class().priority);
    if let Some(t) = &record.trace {
        trace_caller(t, &route.name, plan.class().priority, &caller.policy.team);
    }
    // Quotas before admission: the estimate is reserved now and settled
    // from the reported usage when the response ends (see relay).
    let demand = Demand {
        input_tokens: u64::from(ctx.features.prompt_tokens),
        output_tokens: u64::from(ctx.expected_output_tokens),
        cost_micros: 0,
    };
    let key_id = caller.key_id.as_ref().and_then(|k| k.to_str().ok());
    // Decided at once unless the shared counters must be asked: only then
    // is the waiting future built, and boxed, so this future stays small.
    let reserved = gw.quotas().try_reserve(
        &caller.policy.team,
        key_id,
        plan.class().priority,
        demand,
        rc.target_model.as_deref().into_iter().chain(rc.names()),
    );
    let reserved = match reserved {
        Ok(decided) => decided,
        Err(ask) => Box::pin(ask.ask()).await,
    };
    let quota = match reserved {
        Ok(g) => g,
        Err(refusal) => return quota_refused(shape, &refusal, record),
    };
    let reserved = match execute::admit(&mut plan, &ctx).await {
        Ok(r) => r,
        Err(f) => return reject(shape, f.error, record),
    };

    let timeouts = rc.timeouts.clone();
    let expose_replica = table.expose_replica_header;
    let stream = ctx.features.stream;
    let first_byte_deadline = reserved.first_byte_deadline;
    record.overhead = Some(received_at.elapsed());
    let path_and_query = upstream_path(&parts.uri, path);
    let headers = parts.headers;
    let rid = ids.gateway.clone();
    let client_rid = ids.client.clone();
    let include_usage = rc.usage.include_usage;
    let mut pending = Box::pin(async move {
        let out = Outgoing {
            path_and_query,
            headers: &headers,
            body,
            request_id: &rid,
            client_request_id: client_rid.as_ref(),
            traceparent: None,
        };
        let r = execute::forward(plan, reserved, &ctx, out, include_usage).await;
        // The body is gone once forwarded: its bytes leave the budget.
        drop(body_permit);
        r
    });

    let upstream = match (stream, timeouts.keepalive_after) {
        (true, Some(after)) => {
            let commit_at = received_at + after;
            tokio::select! {
                r = &mut pending => r,
                _ = tokio::time::sleep_until(commit_at.into()) => {
                    // Prefill is slow: commit the event stream now and keep it alive.
                    let rates = quota.rates();
                    let setup = RelaySetup { record, timeouts, first_byte_deadline, sse: true, shape, quota };
                    let mut resp = Response::new(GatewayBody::Relay(RelayBody::waiting(pending, setup)));
                    let h = resp.headers_mut();
                    if let Some(r) = rates {
                        r.write(h);
                    }
                    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                    h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                    return resp;
                }
            }
        }
        _ => pending.await,
    };

    match upstream {
        Err(fe) => {
            record.attempts = fe.attempts;
            if let Some(r) = fe.replica {
                record.replica = r;
            }
            let outcome = if fe.error.status == StatusCode::GATEWAY_TIMEOUT {
                Outcome::FirstByteTimeout
            } else {
                Outcome::UpstreamError
            };
            tracing::warn!(request_id = %record.request_id, error = %fe.error, "upstream failed");
            record.finish(fe.error.status.as_u16(), outcome);
            fe.error.into_response_as(shape)
        }
        Ok(up) => {
            record.attempts = up.attempts;
            let (mut head, incoming) = up.response.into_parts();
            // Hop-by-hop headers were dropped as the head was parsed.
            let sse = is_event_stream(&head.headers);
            if sse {
                // The relay may append an error event: the length is not known.
                head.headers.remove(http::header::CONTENT_LENGTH);
            }
            // Replica addresses are internal: named only when config allows.
            if expose_replica {
                if let Ok(v) = HeaderValue::from_str(up.guard.replica().key()) {
                    head.headers.insert(REPLICA_HEADER, v);
                }
            } else {
                head.headers.remove(REPLICA_HEADER);
            }
            served_headers(&mut head.headers, &up.served);
            if let Some(r) = quota.rates() {
                r.write(&mut head.headers);
            }
            record.canary = up.served.canary.clone();
            record.served = Some(ServedBy::of(&up.route, head.status));
            let status = head.status.as_u16();
            let setup = RelaySetup {
                record,
                timeouts,
                first_byte_deadline,
                sse,
                shape,
                quota,
            };
            let body = RelayBody::streaming(incoming, up.guard, up.permit, status, setup);
            Response::from_parts(head, GatewayBody::Relay(body))
        }
    }
}

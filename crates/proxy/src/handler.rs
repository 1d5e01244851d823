//! The per-request pipeline: path allow-list → caller → body → features →
//! route (and the caller's models) → admission → forward → relay. Each step lives in its own module; this one wires them and turns
//! every failure into an OpenAI-style JSON error with a log line.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};

use super::body::{check_content_type, read_limited, too_large};
use super::context::{ApiKind, RequestContext, REPLICA_HEADER, REQUEST_ID};
use super::execute::{self, served_headers, Plan};
use super::gateway::Gateway;
use super::headers::{clean_response_headers, is_event_stream};
use super::parse::parse_features;
use super::record::{Outcome, RequestRecord};
use super::relay::{GatewayBody, RelayBody, RelaySetup};
use super::upstream::Outgoing;
use infergate_core::admission::Cost;
use infergate_core::endpoint::{normalize_path, InferenceEndpoint};
use infergate_core::identity::AuthError;
use infergate_protocol::error::ApiError;

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
    let request_id = request_id_of(&req);
    let version = req.version();
    let record = || RequestRecord::new(request_id.to_str().unwrap_or("-").to_owned(), received_at);
    let mut resp = match dispatch(req.method(), req.uri().path()) {
        Dispatch::Models => models(&gw, req.headers(), peer, record()),
        Dispatch::Forward(endpoint) => {
            proxy(&gw, req, peer, endpoint, request_id.clone(), received_at).await
        }
        Dispatch::Refuse(e) => reject(e, record()),
    };
    resp.headers_mut().insert(REQUEST_ID, request_id);
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
    Refuse(ApiError),
}

/// Normalises the path and checks it against the forwarding allow-list
/// (`core::endpoint`): only inference endpoints reach a replica.
fn dispatch(method: &Method, raw: &str) -> Dispatch {
    let path = match normalize_path(raw) {
        Ok(p) => p,
        Err(e) => {
            return Dispatch::Refuse(ApiError::bad_request(e.message()).with_code("invalid_path"))
        }
    };
    match (method, InferenceEndpoint::from_path(&path)) {
        (&Method::GET, None) if path == "/v1/models" => Dispatch::Models,
        (&Method::POST, Some(e)) => Dispatch::Forward(e),
        (m, Some(_)) => Dispatch::Refuse(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("Method {m} is not allowed on {path}"),
        )),
        (_, None) => Dispatch::Refuse(
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("Unknown path {path}"),
            )
            .with_code("not_found"),
        ),
    }
}

/// `GET /v1/models`: the models the caller may use.
fn models(
    gw: &Gateway,
    headers: &http::HeaderMap,
    peer: IpAddr,
    record: RequestRecord,
) -> Response<GatewayBody> {
    match gw.identity().authenticator().authenticate(headers, peer) {
        Ok(caller) => json_response(gw.routes().models_for(&caller.policy)),
        Err(e) => unauthorized(e, record),
    }
}

/// 401 with the OpenAI error body and `WWW-Authenticate: Bearer`.
fn unauthorized(e: AuthError, record: RequestRecord) -> Response<GatewayBody> {
    let mut r = reject(e.to_api_error(), record);
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// The client's `x-request-id` when usable, else a fresh UUID.
fn request_id_of<B>(req: &Request<B>) -> HeaderValue {
    match req.headers().get(REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 128 && v.to_str().is_ok() => v.clone(),
        _ => {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
            HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("-"))
        }
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

fn json_response(body: Bytes) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::from(body));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn reject(e: ApiError, record: RequestRecord) -> Response<GatewayBody> {
    tracing::debug!(request_id = %record.request_id, error = %e, "rejected");
    record.finish(e.status.as_u16(), Outcome::Rejected);
    e.into_response()
}

async fn proxy<B>(
    gw: &Gateway,
    req: Request<B>,
    peer: IpAddr,
    (endpoint, path): (InferenceEndpoint, &'static str),
    request_id: HeaderValue,
    received_at: Instant,
) -> Response<GatewayBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut record = RequestRecord::new(request_id.to_str().unwrap_or("-").to_owned(), received_at);
    let (mut parts, body) = req.into_parts();
    // Who is calling, before the body is read.
    let caller = match gw
        .identity()
        .authenticator()
        .authenticate(&parts.headers, peer)
    {
        Ok(c) => c,
        Err(e) => return unauthorized(e, record),
    };
    let kind = ApiKind::from_path(path);
    let table = gw.routes();

    if let Err(e) = check_content_type(&parts.headers) {
        return reject(e, record);
    }
    let body = match read_limited(&parts.headers, body, table.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return reject(e, record),
    };
    let features = match parse_features(kind, &body) {
        Ok(f) => f,
        Err(e) => return reject(e, record),
    };
    record.model = features.model.clone();
    record.prompt_tokens = u64::from(features.prompt_tokens);
    // A model the caller may not use is as unknown to it as a missing one.
    let Some(route) = table
        .resolve(&features.model)
        .filter(|r| caller.policy.allows(r.config.names()))
        .cloned()
    else {
        return reject(ApiError::model_not_found(&features.model), record);
    };
    record.route = route.name.clone();
    let rc = &route.config;
    if !rc.serves(endpoint) {
        return reject(
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{}` is not served on {path}", features.model),
            )
            .with_code("not_found"),
            record,
        );
    }
    if let Some(limit) = rc.max_body_bytes {
        if body.len() as u64 > limit {
            return reject(too_large(limit), record);
        }
    }

    let mut ctx = RequestContext::new(record.request_id.clone());
    ctx.expected_output_tokens = features.max_tokens.unwrap_or(rc.default_max_tokens);
    ctx.features = features;

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
    for name in caller.policy.stripped_headers() {
        parts.headers.remove(name);
    }
    record.canary = plan.canary().cloned();
    let reserved = match execute::admit(&mut plan, &ctx).await {
        Ok(r) => r,
        Err(f) => return reject(f.error, record),
    };

    let timeouts = rc.timeouts.clone();
    let stream = ctx.features.stream;
    let first_byte_deadline = reserved.first_byte_deadline;
    record.overhead = Some(received_at.elapsed());
    let path_and_query = upstream_path(&parts.uri, path);
    let headers = parts.headers;
    let rid = request_id.clone();
    let include_usage = rc.usage.include_usage;
    let mut pending = Box::pin(async move {
        let out = Outgoing {
            path_and_query,
            headers: &headers,
            body,
            request_id: &rid,
        };
        execute::forward(plan, reserved, &ctx, out, include_usage).await
    });

    let upstream = match (stream, timeouts.keepalive_after) {
        (true, Some(after)) => {
            let commit_at = received_at + after;
            tokio::select! {
                r = &mut pending => r,
                _ = tokio::time::sleep_until(commit_at.into()) => {
                    // Prefill is slow: commit the event stream now and keep it alive.
                    let setup = RelaySetup { record, timeouts, first_byte_deadline, sse: true };
                    let mut resp = Response::new(GatewayBody::Relay(Box::new(RelayBody::waiting(pending, setup))));
                    let h = resp.headers_mut();
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
            fe.error.into_response()
        }
        Ok(up) => {
            record.attempts = up.attempts;
            let (mut head, incoming) = up.response.into_parts();
            clean_response_headers(&mut head.headers);
            let sse = is_event_stream(&head.headers);
            if sse {
                // The relay may append an error event: the length is not known.
                head.headers.remove(http::header::CONTENT_LENGTH);
            }
            if let Ok(v) = HeaderValue::from_str(up.guard.replica().key()) {
                head.headers.insert(REPLICA_HEADER, v);
            }
            served_headers(&mut head.headers, &up.served);
            record.canary = up.served.canary.clone();
            let status = head.status.as_u16();
            let setup = RelaySetup {
                record,
                timeouts,
                first_byte_deadline,
                sse,
            };
            let body = RelayBody::streaming(incoming, up.guard, up.permit, status, setup);
            Response::from_parts(head, GatewayBody::Relay(Box::new(body)))
        }
    }
}

//! The per-request pipeline: body → features → route → admission → forward →
//! relay. Each step lives in its own module; this one wires them and turns
//! every failure into an OpenAI-style JSON error with a log line.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
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
use infergate_protocol::error::ApiError;

/// Handles one client request.
pub(crate) async fn handle<B>(gw: Arc<Gateway>, req: Request<B>) -> Response<GatewayBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let received_at = Instant::now();
    let request_id = request_id_of(&req);
    let version = req.version();
    let mut resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/models") => json_response(gw.routes().models_body.clone()),
        (&Method::POST, p) if p.starts_with("/v1/") => {
            proxy(&gw, req, request_id.clone(), received_at).await
        }
        (_, p) if p.starts_with("/v1/") => reject(
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!("Method {} is not allowed on {p}", req.method()),
            ),
            RequestRecord::new(request_id.to_str().unwrap_or("-").to_owned(), received_at),
        ),
        (_, p) => reject(
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("Unknown path {p}"),
            )
            .with_code("not_found"),
            RequestRecord::new(request_id.to_str().unwrap_or("-").to_owned(), received_at),
        ),
    };
    resp.headers_mut().insert(REQUEST_ID, request_id);
    if version == http::Version::HTTP_2 {
        let limit = gw.config().listeners.main.client_stall;
        resp = resp.map(|b| b.watch_stream(limit));
    }
    resp
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
    request_id: HeaderValue,
    received_at: Instant,
) -> Response<GatewayBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut record = RequestRecord::new(request_id.to_str().unwrap_or("-").to_owned(), received_at);
    let (parts, body) = req.into_parts();
    let kind = ApiKind::from_path(parts.uri.path());
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
    let Some(route) = table.resolve(&features.model).cloned() else {
        return reject(ApiError::model_not_found(&features.model), record);
    };
    record.route = route.name.clone();
    let rc = &route.config;
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
    );
    record.canary = plan.canary().cloned();
    record.canary_stratum = plan.canary_stratum();
    let reserved = match execute::admit(&mut plan, &ctx).await {
        Ok(r) => r,
        Err(f) => return reject(f.error, record),
    };

    let timeouts = rc.timeouts.clone();
    let stream = ctx.features.stream;
    let first_byte_deadline = reserved.first_byte_deadline;
    record.overhead = Some(received_at.elapsed());
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
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

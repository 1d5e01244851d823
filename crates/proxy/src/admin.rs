//! The admin listener: `/metrics` (Prometheus), `/healthz` (the process is up),
//! `/readyz` (accepting traffic; off while draining) and `/routes` (a JSON view
//! of routes, pools and each replica's load), `/routing` (per route and pool:
//! replica signals, last scores, prefix-index size) and
//! `/routing/explain/{request_id}` (why that request went where it went).
//! With `auth.admin` a bearer token guards all but the probes (`/healthz`,
//! `/readyz`) and, when public, `/metrics`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::gateway::Gateway;
use super::relay::GatewayBody;
use crate::telemetry::metrics;

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Handles one admin request.
pub(crate) fn handle<B>(gw: &Arc<Gateway>, req: &Request<B>) -> Response<GatewayBody> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    if !gw
        .identity()
        .authenticator()
        .admin_allows(req.headers(), req.uri().path())
    {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "admin endpoints need `Authorization: Bearer TOKEN`\n",
        );
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics::render(gw.pools().iter()),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if gw.is_ready() => text(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n"),
        "/routes" => text(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(&routes_view(gw)).unwrap_or_default(),
        ),
        "/routing" => text(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(&routing_view(gw)).unwrap_or_default(),
        ),
        p if p.starts_with("/routing/explain/") => {
            match explain(gw, &p["/routing/explain/".len()..]) {
                Some(v) => text(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec_pretty(&v).unwrap_or_default(),
                ),
                None => text(
                    StatusCode::NOT_FOUND,
                    "application/json",
                    r#"{"error":"no routing decision remembered for this request id"}"#,
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Every route's picker over its pool (and canary pool): signals per replica,
/// own load, prefix-index size, the last decision's scores.
pub(crate) fn routing_view(gw: &Gateway) -> serde_json::Value {
    let table = gw.routes();
    let sides = table.routes.iter().flat_map(|r| {
        std::iter::once((r, "stable")).chain(r.canary_side.iter().map(|c| (c, "canary")))
    });
    let routes: Vec<_> = sides
        .map(|(r, side)| {
            json!({
                "model": &*r.name,
                "side": side,
                "pool": &*r.pool.name,
                "engine": r.pool.engine.as_str(),
                "policy": r.config.routing.policy,
                "view": r.picker.admin_view(&r.pool.replicas()),
            })
        })
        .collect();
    json!({ "routes": routes })
}

/// Why request `id` went where it went (searched in every route's picker).
pub(crate) fn explain(gw: &Gateway, id: &str) -> Option<serde_json::Value> {
    let table = gw.routes();
    table.routes.iter().find_map(|r| {
        let e = r
            .picker
            .explain(id)
            .or_else(|| r.canary_side.as_ref().and_then(|c| c.picker.explain(id)))?;
        Some(json!({"model": &*r.name, "pool": &*r.pool.name, "decision": e}))
    })
}

/// Routes with their pools and the live load of each replica.
pub(crate) fn routes_view(gw: &Gateway) -> serde_json::Value {
    let table = gw.routes();
    let routes: Vec<_> = table
        .routes
        .iter()
        .map(|r| {
            json!({
                "model": &*r.name,
                "aliases": r.config.aliases,
                "pool": &*r.pool.name,
                "target_model": r.config.target_model,
                "routing": r.config.routing,
            })
        })
        .collect();
    let pools: Vec<_> = gw
        .pools()
        .iter()
        .map(|p| {
            let replicas: Vec<_> = p
                .replicas()
                .iter()
                .map(|r| {
                    json!({
                        "key": r.key(),
                        "url": &*r.endpoint.base_url,
                        "requests_in_flight": r.load.requests(),
                        "tokens_in_flight": r.load.tokens(),
                        "prefill_tokens": r.load.prefill_tokens(),
                    })
                })
                .collect();
            json!({"name": &*p.name, "engine": p.engine.as_str(), "replicas": replicas})
        })
        .collect();
    json!({"ready": gw.is_ready(), "routes": routes, "pools": pools})
}

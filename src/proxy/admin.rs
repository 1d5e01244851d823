//! The admin listener: `/metrics` (Prometheus), `/healthz` (the process is up),
//! `/readyz` (accepting traffic; off while draining) and `/routes` (a JSON view
//! of routes, pools and each replica's load).

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
pub fn handle<B>(gw: &Arc<Gateway>, req: &Request<B>) -> Response<GatewayBody> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
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
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Routes with their pools and the live load of each replica.
pub fn routes_view(gw: &Gateway) -> serde_json::Value {
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

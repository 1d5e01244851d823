//! The admin listener: `/metrics` (Prometheus), `/healthz` (the process is up),
//! `/readyz` (accepting traffic; off while draining) and `/routes` (a JSON view
//! of routes, pools and each replica's load), `/routing` (per route and pool:
//! replica signals, last scores, prefix-index size) and
//! `/routing/explain/{request_id}` (why that request went where it went),
//! `/usage` (usage and cost totals for chargeback, JSON or CSV) and
//! `/capacity` (pool utilisation and idle cost, see `governance`);
//! `/` is the status page (one self-contained HTML file, `status.html`,
//! embedded in the binary) and `/status.json` the one view it polls.
//! With `auth.admin` a bearer token guards all but the probes (`/healthz`,
//! `/readyz`) and, when public, `/metrics`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::gateway::Gateway;
use super::relay::GatewayBody;
use crate::governance::report;
use crate::telemetry::metrics;
use infergate_core::quota::BackendState;

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
        "/metrics" => {
            metrics::quota_backend(gw.quotas().backend_state());
            let mut m = metrics::render(gw.pools().iter());
            gw.governance().render_metrics(&mut m);
            text(StatusCode::OK, "text/plain; version=0.0.4", m)
        }
        "/usage" => {
            let (status, ct, body) = report::usage(gw.governance(), req.uri().query());
            text(status, ct, body)
        }
        "/capacity" => {
            let (status, ct, body) =
                report::capacity(gw.governance(), &gw.pools(), req.uri().query());
            text(status, ct, body)
        }
        "/" | "/status" => text(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE),
        "/status.json" => text(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&status_view(gw)).unwrap_or_default(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if !gw.is_ready() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
        }
        "/readyz" => match gw.quotas().backend_state() {
            BackendState::Down {
                required_for_ready: true,
            } => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "quota counters down (redis unreachable)\n",
            ),
            BackendState::Down { .. } => text(
                StatusCode::OK,
                "text/plain",
                "ready; quota counters down (redis unreachable): limits fail open or closed as configured\n",
            ),
            _ => text(StatusCode::OK, "text/plain", "ready\n"),
        },
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

/// The status page: plain HTML, CSS and JavaScript, no external assets.
const STATUS_PAGE: &str = include_str!("status.html");

/// Decisions shown per route side on the status page.
const RECENT_DECISIONS: usize = 8;

fn secs(d: Option<std::time::Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// Everything the status page shows, in one document: pools and replicas
/// (state, engine signals, own load, warm-up), routes with their canary,
/// admission queues per band, recent routing decisions and the chart samples.
pub(crate) fn status_view(gw: &Gateway) -> serde_json::Value {
    let now = std::time::Instant::now();
    let admissions = gw.pool_admissions();
    let pools: Vec<_> = gw
        .pools()
        .iter()
        .map(|p| {
            let admission = admissions.iter().find(|a| a.name == p.name);
            let queues = admission.map(|a| {
                a.queued_by_band()
                    .iter()
                    .map(|(band, n)| (band.as_str().to_string(), json!(n)))
                    .collect::<serde_json::Map<_, _>>()
            });
            // Members, then replicas that left the pool but still serve
            // the requests they took (Kubernetes: terminating endpoints).
            let members = p.replicas();
            let draining = p.draining();
            let replicas: Vec<_> = members
                .iter()
                .map(|r| (r, false))
                .chain(draining.iter().map(|r| (r, true)))
                .map(|(r, departed)| {
                    let sig = r.signals.load_full();
                    let ejected = admission.is_some_and(|a| a.outlier.is_ejected(r.key()));
                    let state = match sig.as_deref() {
                        _ if departed || !gw.is_ready() => "draining",
                        _ if ejected => "ejected",
                        None => "unscraped",
                        Some(s) if s.error.is_some() => "unreachable",
                        Some(_) => "ready",
                    };
                    let ok = sig.as_deref().filter(|s| s.error.is_none());
                    json!({
                        "key": r.key(),
                        "url": &*r.endpoint.base_url,
                        "state": state,
                        "error": sig.as_deref().and_then(|s| s.error.as_deref()),
                        "waiting": ok.map(|s| s.waiting),
                        "running": ok.map(|s| s.running),
                        "kv_usage": ok.and_then(|s| s.kv_usage),
                        "prefix_hit_rate": ok.and_then(|s| s.prefix_hit_rate),
                        "scrape_age_ms": sig.as_deref().map(|s| now.saturating_duration_since(s.at).as_millis() as u64),
                        "requests_in_flight": r.load.requests(),
                        "tokens_in_flight": r.load.tokens(),
                        "requests_started": r.load.started(),
                        "warmup": {
                            "age_s": secs(Some(r.warmup.age())),
                            "first_scrape_s": secs(r.warmup.first_scrape()),
                            "first_token_s": secs(r.warmup.first_token()),
                        },
                    })
                })
                .collect();
            json!({"name": &*p.name, "engine": p.engine.as_str(), "queued": queues, "replicas": replicas})
        })
        .collect();
    let table = gw.routes();
    let routes: Vec<_> = table
        .routes
        .iter()
        .map(|r| {
            let canary = r.canary.config().map(|c| {
                json!({
                    "pool": c.pool, "model": c.model, "weight": c.weight,
                    "effective_weight": r.canary.effective_weight(),
                    "rolled_back": r.canary.rolled_back(),
                })
            });
            json!({
                "model": &*r.name,
                "aliases": r.config.aliases,
                "pool": &*r.pool.name,
                "upstream_model": r.config.target_model.as_deref().unwrap_or(&r.name),
                "policy": r.config.routing.policy,
                "canary": canary,
                "rollbacks": r.canary.rollbacks(),
            })
        })
        .collect();
    let mut decisions = Vec::new();
    let sides = table.routes.iter().flat_map(|r| {
        std::iter::once((r, "stable")).chain(r.canary_side.iter().map(|c| (c, "canary")))
    });
    for (r, side) in sides {
        for mut d in r.picker.recent_decisions(RECENT_DECISIONS) {
            if let Some(o) = d.as_object_mut() {
                o.insert("model".into(), json!(&*r.name));
                o.insert("side".into(), json!(side));
                o.insert("pool".into(), json!(&*r.pool.name));
            }
            decisions.push(d);
        }
    }
    json!({
        "ready": gw.is_ready(),
        "now_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        "pools": pools,
        "routes": routes,
        "decisions": decisions,
        "history": gw.history().samples(),
    })
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

/// What admission holds each of a route's replicas to now: the request cap
/// (hand-set, learned batch limit or slow-start cap; `null`: none), the
/// batch limit learned from the engine's metrics, and the KV token capacity
/// the budget counts (`null`: unlimited).
fn admission_view(r: &super::gateway::Route) -> serde_json::Value {
    let budget = &r.admission.budget;
    let replicas: Vec<_> = r
        .pool
        .replicas()
        .iter()
        .map(|replica| {
            let learned = replica
                .signals
                .load()
                .as_ref()
                .and_then(|s| s.saturated_batch);
            json!({
                "key": replica.key(),
                "request_cap": budget.batch(replica),
                "batch_learned": learned,
                "kv_capacity_tokens": budget.capacity(replica),
            })
        })
        .collect();
    json!({ "self_tuning": budget.self_tuning(), "replicas": replicas })
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
                "admission": admission_view(r),
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

//! Shared helpers for the admission integration tests: simulated fleets, a
//! gateway started in-process over several pools, requests with headers, and
//! reading the gateway's admission state and metrics.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use infergate_core::config::Config;
use infergate_proxy::{Route, ServerHandle};
use infergate_sim::{start_fleet, Fleet, FleetConfig, Profile};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http()
}

/// A tiny simulated fleet serving `model`, `time_scale` times faster than real.
pub async fn fleet(model: &str, replicas: usize, time_scale: f64) -> Fleet {
    start_fleet(FleetConfig {
        time_scale,
        replicas,
        served_model_name: Some(model.to_string()),
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap()
}

/// A YAML list of quoted URLs.
pub fn urls(f: &Fleet) -> String {
    f.urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Starts a gateway on loopback with `pools_and_routes` (YAML, the `pools:`
/// and `routes:` sections).
pub async fn gateway(pools_and_routes: &str) -> ServerHandle {
    let yaml = format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: {{ address: \"127.0.0.1:0\" }}\n\
         expose_replica_header: true\n{pools_and_routes}\n"
    );
    let cfg = Config::parse(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    infergate_proxy::start(cfg).await.unwrap()
}

pub fn route(gw: &ServerHandle, model: &str) -> Arc<Route> {
    gw.gateway.routes().resolve(model).unwrap().clone()
}

/// Requests waiting in the queue of `model`'s pool.
pub fn queued(gw: &ServerHandle, model: &str) -> usize {
    route(gw, model).admission.queued()
}

/// Polls until `f` holds (at most 5 s).
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(5), "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A completion request body.
pub fn completion(model: &str, prompt: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream})
        .to_string()
}

/// POSTs to `/v1/completions` with headers; returns status, headers, body.
pub async fn post(
    c: &HttpClient,
    gw: &ServerHandle,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let mut b = Request::post(format!("{}/v1/completions", gw.url()))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("answer within 20 s")
        .expect("request");
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(Duration::from_secs(20), body.collect())
        .await
        .expect("body within 20 s")
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (parts.status, parts.headers, bytes)
}

/// The `error` object of an OpenAI error body.
pub fn error_of(body: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
    v["error"].clone()
}

/// The gateway's `/metrics` text.
pub async fn metrics(c: &HttpClient, gw: &ServerHandle) -> String {
    let url = format!("{}/metrics", gw.admin_url().unwrap());
    let resp = c
        .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

/// Starts a streaming request that keeps its replica busy until it ends
/// (`tokens` tokens), and waits until the gateway has admitted it.
pub async fn hold(
    c: &HttpClient,
    gw: &ServerHandle,
    model: &str,
    tokens: u32,
) -> tokio::task::JoinHandle<StatusCode> {
    let r = route(gw, model);
    let before: u64 = r.pool.replicas().iter().map(|x| x.load.requests()).sum();
    let (c, url, body) = (c.clone(), gw.url(), completion(model, "hold", tokens, true));
    let task = tokio::spawn(async move {
        let req = Request::post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        status
    });
    until("the holding request is admitted", || {
        r.pool
            .replicas()
            .iter()
            .map(|x| x.load.requests())
            .sum::<u64>()
            > before
    })
    .await;
    task
}

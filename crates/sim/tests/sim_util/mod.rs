//! Helpers shared by the simulator's integration tests: a plain HTTP client on
//! loopback and SSE parsing with arrival times.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn request(
    method: &str,
    url: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    b.body(body).unwrap()
}

/// Sends a request and reads the whole response.
pub async fn call(
    c: &HttpClient,
    method: &str,
    url: &str,
    body: Option<&Value>,
) -> (StatusCode, HeaderMap, Bytes) {
    call_with(c, method, url, body, &[]).await
}

pub async fn call_with(
    c: &HttpClient,
    method: &str,
    url: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        c.request(request(method, url, body, headers)),
    )
    .await
    .expect("response within 20 s")
    .expect("request");
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(Duration::from_secs(20), body.collect())
        .await
        .expect("body within 20 s")
        .expect("body")
        .to_bytes();
    (parts.status, parts.headers, bytes)
}

pub async fn post_json(c: &HttpClient, url: &str, body: &Value) -> (StatusCode, Value) {
    let (s, _, b) = call(c, "POST", url, Some(body)).await;
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&b)));
    (s, v)
}

/// Starts a streamed request; returns the response with its body unread.
pub async fn open_stream(c: &HttpClient, url: &str, body: &Value) -> http::Response<Incoming> {
    tokio::time::timeout(
        Duration::from_secs(20),
        c.request(request("POST", url, Some(body), &[])),
    )
    .await
    .expect("response within 20 s")
    .expect("request")
}

/// One SSE event and when its bytes arrived.
#[derive(Debug, Clone)]
pub struct Event {
    pub data: String,
    pub at: Instant,
}

/// Reads SSE `data:` events until the body ends (bounded by 30 s).
pub async fn read_events(mut body: Incoming) -> Vec<Event> {
    let mut out = Vec::new();
    let mut pending = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(frame) = tokio::time::timeout_at(deadline.into(), body.frame())
        .await
        .expect("stream ended within 30 s")
    {
        let frame = frame.expect("frame");
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let at = Instant::now();
        pending.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(i) = pending.find("\n\n") {
            let ev: String = pending.drain(..i + 2).collect();
            let data = ev
                .trim_end()
                .strip_prefix("data: ")
                .expect("data: prefix")
                .to_owned();
            out.push(Event { data, at });
        }
    }
    assert!(pending.is_empty(), "trailing bytes: {pending:?}");
    out
}

/// A chat request body.
pub fn chat(model: &str, content: &str, max_tokens: u32, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// Polls `f` every 5 ms until it is true or `within` passes.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f()
}

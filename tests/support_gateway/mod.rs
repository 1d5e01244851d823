//! Shared helpers for the gateway integration tests: a tiny scriptable
//! upstream (an OpenAI-like replica whose timing and failures the test
//! controls), a gateway started in-process, and an HTTP client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use infergate_core::config::Config;
use infergate_proxy::ServerHandle;

/// How a mini upstream answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// JSON, or SSE tokens when `stream: true` (count = `max_tokens`, default 5;
    /// spacing = body field `x_itl_ms`, default 0; delay before headers = `x_ttft_ms`).
    Echo,
    /// Always this status with an OpenAI error body.
    Status(u16),
    /// SSE: sends this many tokens, then nothing (the connection stays open).
    Stall { after: usize },
}

/// What a mini upstream saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub requests: AtomicUsize,
    pub completed: AtomicUsize,
    /// When a request's handling or body was dropped before its end.
    pub cancelled: Mutex<Vec<Instant>>,
    pub last_headers: Mutex<Option<HeaderMap>>,
    pub last_body: Mutex<Option<Bytes>>,
}

pub struct MiniUpstream {
    pub addr: SocketAddr,
    pub name: String,
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl MiniUpstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn key(&self) -> String {
        self.addr.to_string()
    }
    pub fn cancelled(&self) -> Vec<Instant> {
        self.seen.cancelled.lock().unwrap().clone()
    }
}

impl Drop for MiniUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Records a cancel unless disarmed (the request ran to its end).
struct CancelProbe {
    seen: Arc<Seen>,
    armed: bool,
}

impl Drop for CancelProbe {
    fn drop(&mut self) {
        if self.armed {
            self.seen.cancelled.lock().unwrap().push(Instant::now());
        } else {
            self.seen.completed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub async fn mini_upstream(name: &str, behaviour: Behaviour) -> MiniUpstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let (s, n) = (seen.clone(), name.to_string());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (seen, name) = (s.clone(), n.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| answer(req, behaviour, name.clone(), seen.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    MiniUpstream {
        addr,
        name: name.to_string(),
        seen,
        task,
    }
}

async fn answer(
    req: Request<Incoming>,
    behaviour: Behaviour,
    name: String,
    seen: Arc<Seen>,
) -> Result<Response<UpBody>, Infallible> {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let mut probe = CancelProbe {
        seen: seen.clone(),
        armed: true,
    };
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    *seen.last_headers.lock().unwrap() = Some(parts.headers.clone());
    *seen.last_body.lock().unwrap() = Some(body.clone());
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let ms = |k: &str| Duration::from_millis(v[k].as_u64().unwrap_or(0));
    let tokens = v["max_tokens"].as_u64().unwrap_or(5) as usize;
    let stream = v["stream"].as_bool().unwrap_or(false);
    let usage = v["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    tokio::time::sleep(ms("x_ttft_ms")).await;
    let resp = |status: u16, ct: &str, body: UpBody| {
        Response::builder()
            .status(status)
            .header("content-type", ct)
            .header("x-upstream-worker", name.as_str())
            .body(body)
            .unwrap()
    };
    let out = match behaviour {
        Behaviour::Status(code) => {
            probe.armed = false;
            resp(
                code,
                "application/json",
                full(format!(
                    r#"{{"error":{{"message":"upstream says {code}","type":"x","param":null,"code":null}}}}"#
                )),
            )
        }
        Behaviour::Echo if !stream => {
            let text = format!(
                r#"{{"id":"cmpl-1","object":"text_completion","worker":"{name}","choices":[{{"index":0,"text":"{}","finish_reason":"length"}}],"usage":{{"prompt_tokens":3,"completion_tokens":{tokens},"total_tokens":{}}}}}"#,
                "tok ".repeat(tokens),
                tokens + 3
            );
            probe.armed = false;
            resp(200, "application/json", full(text))
        }
        Behaviour::Echo | Behaviour::Stall { .. } => {
            let stall = match behaviour {
                Behaviour::Stall { after } => Some(after),
                _ => None,
            };
            let itl = ms("x_itl_ms");
            let n = stall.unwrap_or(tokens);
            let state = (0usize, probe, false);
            let name2 = name.clone();
            let s = futures::stream::unfold(state, move |(i, mut probe, done)| {
                let name = name2.clone();
                async move {
                    if done {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(itl).await;
                    }
                    if i < n {
                        let chunk = format!("data: {{\"choices\":[{{\"index\":0,\"text\":\"t{i} \"}}],\"worker\":\"{name}\"}}\n\n");
                        return Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))),
                            (i + 1, probe, false),
                        ));
                    }
                    if stall.is_some() {
                        futures::future::pending::<()>().await;
                    }
                    let mut tail = String::new();
                    if usage {
                        tail.push_str(&format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":{n},\"total_tokens\":{}}}}}\n\n", n + 3));
                    }
                    tail.push_str("data: [DONE]\n\n");
                    probe.armed = false;
                    Some((Ok(Frame::data(Bytes::from(tail))), (i + 1, probe, true)))
                }
            });
            resp(200, "text/event-stream", BodyExt::boxed(StreamBody::new(s)))
        }
    };
    Ok(out)
}

fn full(s: String) -> UpBody {
    BodyExt::boxed(Full::new(Bytes::from(s)))
}

/// A gateway config with one route `m` (alias `m-alias`) over `endpoints`;
/// `extra_route` is appended to the route (indented YAML lines).
pub fn config(endpoints: &[String], extra_route: &str) -> Config {
    let eps = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let pool = if endpoints.is_empty() {
        "    service: { name: none, port: 80 }".to_string()
    } else {
        format!("    endpoints: [{eps}]")
    };
    // These tests exercise the proxy's mechanics (retries, pass-through): a
    // deterministic load-only policy, and no /metrics scraping of the upstreams.
    let routing = if extra_route.contains("routing:") {
        ""
    } else {
        "    routing: { policy: least_request }\n"
    };
    let yaml = format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: {{ address: \"127.0.0.1:0\" }}\n\
         max_body_bytes: 64KiB\n\
         expose_replica_header: true\n\
         pools:\n  - name: p\n{pool}\n\
         routes:\n  - model: m\n    aliases: [m-alias]\n    pool: p\n{routing}{extra_route}\n"
    );
    Config::parse(&yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

pub async fn gateway(config: Config) -> ServerHandle {
    infergate_proxy::start(config).await.unwrap()
}

pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GETs a JSON document (an admin endpoint); `Null` when the body is not JSON.
pub async fn admin_json(url: &str) -> serde_json::Value {
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    let resp = client().request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap_or_default()
}

/// POSTs JSON and returns status, headers and the whole body.
pub async fn post(url: &str, path: &str, body: &str) -> (StatusCode, HeaderMap, Bytes) {
    post_with(url, path, body, &[]).await
}

/// [`post`] with extra request headers.
pub async fn post_with(
    url: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let resp = post_stream(url, path, body, headers).await;
    let (parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (parts.status, parts.headers, bytes)
}

/// POSTs JSON with extra headers and returns the response with its body unread.
pub async fn post_stream(
    url: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let mut b = Request::post(format!("{url}{path}")).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    client().request(req).await.unwrap()
}

/// The `error` object of an OpenAI error body (panics if the shape is wrong).
pub fn error_of(body: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    let err = v["error"].clone();
    assert!(err["message"].is_string(), "no error.message in {v}");
    assert!(err["type"].is_string(), "no error.type in {v}");
    assert!(
        err.get("param").is_some() && err.get("code").is_some(),
        "{v}"
    );
    err
}

/// POSTs a tiny completion request for model `m`.
pub async fn complete(url: &str) -> (StatusCode, HeaderMap, Bytes) {
    post(url, "/v1/completions", r#"{"model":"m","prompt":"x"}"#).await
}

/// A loopback URL where nothing listens.
pub fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

/// The Python interpreter the SDK tests run (`INFERGATE_PYTHON`, else python3).
pub fn python() -> String {
    std::env::var("INFERGATE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether Python can import `modules` (comma-separated); `Err` says how to
/// install them. With INFERGATE_REQUIRE_EXTERNAL=1 (CI) a missing module
/// fails the test; otherwise the caller skips with the printed reason.
pub fn python_modules(test: &str, modules: &str, install: &str) -> bool {
    let why = match std::process::Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .output()
    {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!(
            "{modules} not importable ({}): {install}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("{} not found: {e}", python()),
    };
    if std::env::var("INFERGATE_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
        panic!("required external tool missing: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// Runs `tests/support_gateway/{script}` with `args` and returns its stdout
/// (panics with both outputs when it fails).
pub async fn run_python(script: &str, args: &[String]) -> String {
    let path = format!(
        "{}/tests/support_gateway/{script}",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = tokio::process::Command::new(python())
        .arg(path)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python failed:\n{stdout}\n{stderr}");
    stdout
}

//! OpenTelemetry traces end to end: the gateway (tracing on with one config
//! line) in front of a simulated replica exports its spans over OTLP/HTTP to
//! a receiver started here, which decodes the protobuf
//! `ExportTraceServiceRequest`; the replica receives the trace context.

#[path = "support_gateway/mod.rs"]
mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use infergate_core::config::Config;
use infergate_core::identity::hash_key;
use infergate_sim::{start_fleet, FleetConfig, Profile};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::*;

/// The spans an OTLP/HTTP receiver got, with their resource's `service.name`.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (bounded) until `n` spans of `trace_id` arrived.
    async fn trace(&self, trace_id: &[u8], n: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans: Vec<Span> = self
                .spans()
                .into_iter()
                .map(|(_, s)| s)
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if spans.len() >= n || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A minimal OTLP/HTTP receiver on 127.0.0.1: `POST /v1/traces` with a
/// protobuf body, answered with an empty `ExportTraceServiceResponse`.
async fn otlp_receiver() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Received::default();
    let store = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let ok = req.uri().path() == "/v1/traces"
                            && req.headers()["content-type"] == "application/x-protobuf";
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).unwrap();
                        for rs in export.resource_spans {
                            let service = rs
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|kv| kv.key == "service.name")
                                .and_then(|kv| kv.value.as_ref()?.value.clone());
                            let service = match service {
                                Some(Value::StringValue(s)) => s,
                                _ => String::new(),
                            };
                            for ss in rs.scope_spans {
                                for s in ss.spans {
                                    store.0.lock().unwrap().push((service.clone(), s));
                                }
                            }
                        }
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = if ok { 200 } else { 400 }.try_into().unwrap();
                        resp.headers_mut()
                            .insert("content-type", "application/x-protobuf".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    (addr, got)
}

/// A span's attributes as (key, value).
fn attrs(s: &Span) -> HashMap<String, Value> {
    s.attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.as_ref()?.value.clone()?)))
        .collect()
}

fn int(a: &HashMap<String, Value>, k: &str) -> i64 {
    match a.get(k) {
        Some(Value::IntValue(i)) => *i,
        other => panic!("{k}: {other:?}"),
    }
}

fn string<'a>(a: &'a HashMap<String, Value>, k: &str) -> &'a str {
    match a.get(k) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{k}: {other:?}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Route `m` (alias `m-alias`) over `replica`, keys on (team `search` may go
/// critical), and tracing on with the one line `telemetry: { otlp: ... }`.
fn traced_config(replica: &str, keys: &std::path::Path, collector: SocketAddr) -> Config {
    let yaml = format!(
        r#"listeners:
  main: {{ address: "127.0.0.1:0" }}
  admin: {{ address: "127.0.0.1:0" }}
telemetry: {{ otlp: {{ endpoint: "http://{collector}", export_interval: 50ms, service_name: gw-test }} }}
auth:
  mode: keys
  key_file: {keys}
  teams:
    search: {{ max_priority: critical }}
pools:
  - name: p
    endpoints: ["{replica}"]
routes:
  - model: m
    aliases: [m-alias]
    pool: p
    routing: {{ policy: least_request }}
"#,
        keys = keys.display()
    );
    Config::parse(&yaml, "otlp.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// The `usage` object of an SSE chat stream's usage chunk.
fn stream_usage(body: &[u8]) -> serde_json::Value {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
        .expect("a usage chunk")
}

#[tokio::test]
async fn a_request_trace_reaches_the_collector_and_the_replica_gets_its_context() {
    let (collector, received) = otlp_receiver().await;
    let fleet = start_fleet(FleetConfig {
        replicas: 1,
        served_model_name: Some("m".into()),
        time_scale: 20.0,
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(
        &keys,
        format!(
            "- {{id: s1, sha256: {}, team: search}}\n",
            hash_key("sk-search")
        ),
    )
    .unwrap();
    let gw = gateway(traced_config(&fleet.urls()[0], &keys, collector)).await;
    let url = gw.url();

    // The client's own trace: the gateway continues it.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{client_trace}-{client_span}-01");
    let system = "You are a careful assistant. ".repeat(40);
    let body = serde_json::json!({
        "model": "m-alias", "stream": true, "max_tokens": 12,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
    })
    .to_string();
    let headers = [
        ("authorization", "Bearer sk-search"),
        ("traceparent", traceparent.as_str()),
        ("tracestate", "vendor=abc"),
        ("x-gateway-inference-objective", "critical"),
    ];
    // Twice: the second finds the system prompt in the replica's prefix cache.
    let (status, _, first) = post_with(&url, "/v1/chat/completions", &body, &headers).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&first));
    let (status, _, second) = post_with(&url, "/v1/chat/completions", &body, &headers).await;
    assert_eq!(status, 200);
    let usage = stream_usage(&second);
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_i64()
        .unwrap();
    assert!(cached > 0, "the replica reported no cached tokens: {usage}");

    // The replica received the gateway's context in the client's trace.
    let seen = fleet.replica(0).stats().last_request_headers.unwrap();
    let sent = seen["traceparent"].to_str().unwrap().to_string();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!((parts[0], parts[1], parts[3]), ("00", client_trace, "01"));
    assert_ne!(
        parts[2], client_span,
        "the replica's parent is the gateway's span"
    );
    assert_eq!(seen["tracestate"], "vendor=abc");

    // 2 requests x (request + queue + attempt + stream).
    let spans = received.trace(&unhex(client_trace), 8).await;
    assert_eq!(spans.len(), 8, "{spans:#?}");
    assert!(received.spans().iter().all(|(svc, _)| svc == "gw-test"));
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == unhex(client_span))
        .collect();
    assert_eq!(roots.len(), 2);
    // The second request's span: the one whose attempt the replica saw last.
    let attempt_of = |root: &Span| {
        spans
            .iter()
            .find(|s| s.parent_span_id == root.span_id && s.name == "attempt")
            .unwrap()
            .clone()
    };
    let root = roots
        .iter()
        .find(|r| hex(&attempt_of(r).span_id) == parts[2])
        .expect("the replica's traceparent names an attempt span");
    assert_eq!(root.name, "chat m-alias");
    assert_eq!(root.kind, SpanKind::Server as i32);
    let a = attrs(root);
    assert_eq!(string(&a, "gen_ai.operation.name"), "chat");
    assert_eq!(string(&a, "gen_ai.request.model"), "m-alias");
    assert_eq!(string(&a, "gen_ai.response.model"), "m");
    assert_eq!(
        int(&a, "gen_ai.usage.input_tokens"),
        usage["prompt_tokens"].as_i64().unwrap()
    );
    assert_eq!(
        int(&a, "gen_ai.usage.output_tokens"),
        usage["completion_tokens"].as_i64().unwrap()
    );
    assert_eq!(int(&a, "gen_ai.usage.cache_read.input_tokens"), cached);
    assert!(
        matches!(a.get("gen_ai.response.time_to_first_chunk"), Some(Value::DoubleValue(t)) if *t > 0.0)
    );
    assert_eq!(string(&a, "infergate.route"), "m");
    assert_eq!(string(&a, "infergate.priority"), "critical");
    assert_eq!(string(&a, "infergate.team"), "search");
    let replica = fleet.replica(0).addr();
    assert_eq!(string(&a, "infergate.replica"), replica.to_string());
    assert_eq!(int(&a, "http.response.status_code"), 200);

    let children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == root.span_id)
        .collect();
    let mut names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["attempt", "queue", "stream"]);
    let by = |n: &str| *children.iter().find(|s| s.name == n).unwrap();
    let (queue, attempt, stream) = (by("queue"), by("attempt"), by("stream"));
    assert_eq!(string(&attrs(queue), "infergate.pool"), "p");
    let at = attrs(attempt);
    assert_eq!(attempt.kind, SpanKind::Client as i32);
    assert_eq!(string(&at, "server.address"), "127.0.0.1");
    assert_eq!(int(&at, "server.port"), i64::from(replica.port()));
    assert_eq!(int(&at, "http.response.status_code"), 200);
    assert_eq!(int(&at, "infergate.attempt"), 1);
    // In order: queued, then sent, then streamed, all inside the request.
    assert!(queue.end_time_unix_nano <= attempt.start_time_unix_nano);
    assert!(attempt.end_time_unix_nano <= stream.start_time_unix_nano + 1_000_000);
    assert!(root.start_time_unix_nano <= queue.start_time_unix_nano);
    assert!(stream.end_time_unix_nano <= root.end_time_unix_nano);
    assert_eq!(
        int(&attrs(stream), "gen_ai.usage.output_tokens"),
        usage["completion_tokens"].as_i64().unwrap()
    );
    assert!(stream.events.iter().any(|e| e.name == "first_token"));

    // Without a client context: a new trace, rooted at the gateway.
    let (status, _, _) = post_with(
        &url,
        "/v1/completions",
        r#"{"model":"m","prompt":"Once upon a time","max_tokens":4}"#,
        &[("authorization", "Bearer sk-search")],
    )
    .await;
    assert_eq!(status, 200);
    let seen = fleet.replica(0).stats().last_request_headers.unwrap();
    let sent = seen["traceparent"].to_str().unwrap().to_string();
    let trace_id = unhex(sent.split('-').nth(1).unwrap());
    assert_ne!(hex(&trace_id), client_trace);
    let spans = received.trace(&trace_id, 4).await;
    let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
    assert_eq!(root.name, "text_completion m");
    assert_eq!(
        string(&attrs(root), "gen_ai.operation.name"),
        "text_completion"
    );
    assert_eq!(string(&attrs(root), "infergate.priority"), "standard");

    // Every exported span is counted.
    let metrics = String::from_utf8(
        client()
            .request(
                Request::get(format!("{}/metrics", gw.admin_url().unwrap()))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("infergate_trace_spans_total{result=\"exported\"}")),
        "{metrics}"
    );
    gw.drain(Duration::from_secs(1)).await;
}

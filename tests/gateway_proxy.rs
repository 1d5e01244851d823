//! The gateway's request path against scriptable upstreams on loopback:
//! pass-through, timeouts, retries, disconnects, errors, keep-alives.

#[path = "support_gateway/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::*;

#[tokio::test]
async fn answers_are_byte_identical_to_the_replica() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(&[up.url()], "")).await;
    for (path, body) in [
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"hello","max_tokens":4}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"hello","max_tokens":6,"stream":true}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m-alias","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
    ] {
        let (s1, h1, direct) = post(&up.url(), path, body).await;
        let (s2, h2, via) = post(&gw.url(), path, body).await;
        assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200));
        assert_eq!(direct, via, "{path} {body}");
        // The replica got the client's bytes untouched, except that an alias
        // is rewritten to the route's model (docs/config.md).
        // The rewrite splices the model's bytes; everything else is as sent.
        let expected = body.replace("\"m-alias\"", "\"m\"").into_bytes();
        assert_eq!(
            up.seen.last_body.lock().unwrap().as_deref(),
            Some(expected.as_slice())
        );
        assert_eq!(h1["content-type"], h2["content-type"]);
        assert_eq!(h2["x-infergate-replica"], up.key().as_str());
        assert!(h2.contains_key("x-request-id"));
    }
}

#[tokio::test]
async fn request_id_flows_to_the_replica_and_back() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(&[up.url()], "")).await;
    let resp = post_stream(
        &gw.url(),
        "/v1/completions",
        r#"{"model":"m","prompt":"x"}"#,
        &[("x-request-id", "rid-42")],
    )
    .await;
    // The gateway's own id upstream and back (issue 13: a client's id let two
    // clients' requests share one); the client's id kept apart.
    let gw_id = resp.headers()["x-request-id"].clone();
    assert_eq!(gw_id.len(), 36);
    assert_eq!(resp.headers()["x-client-request-id"], "rid-42");
    let seen = up.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-request-id"], gw_id);
    assert_eq!(seen["x-client-request-id"], "rid-42");
    // Generated when absent, and no client id then.
    let (_, h, _) = complete(&gw.url()).await;
    assert_eq!(h["x-request-id"].len(), 36);
    assert!(!h.contains_key("x-client-request-id"));
}

#[tokio::test]
async fn two_clients_with_the_same_request_id_get_distinct_upstream_ids() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(&[up.url()], "")).await;
    let mut upstream_ids = Vec::new();
    for _ in 0..2 {
        let resp = post_stream(
            &gw.url(),
            "/v1/completions",
            r#"{"model":"m","prompt":"x"}"#,
            &[("x-request-id", "same-id")],
        )
        .await;
        assert_eq!(resp.headers()["x-client-request-id"], "same-id");
        let seen = up.seen.last_headers.lock().unwrap().clone().unwrap();
        assert_eq!(seen["x-client-request-id"], "same-id");
        assert_eq!(seen["x-request-id"], resp.headers()["x-request-id"]);
        upstream_ids.push(seen["x-request-id"].clone());
    }
    assert_ne!(upstream_ids[0], upstream_ids[1]);
}

#[tokio::test]
async fn a_long_stream_survives_a_short_idle_timeout() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    // 30 tokens 40 ms apart = 1.2 s, four times the idle timeout.
    let gw = gateway(config(&[up.url()], "    timeouts: { idle: 300ms }")).await;
    let body = r#"{"model":"m","prompt":"p","stream":true,"max_tokens":30,"x_itl_ms":40}"#;
    let (status, _, bytes) = post(&gw.url(), "/v1/completions", body).await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(text.matches("data: {\"choices\"").count(), 30, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("error"));
}

#[tokio::test]
async fn a_stalled_stream_ends_with_an_sse_error_event() {
    let up = mini_upstream("a", Behaviour::Stall { after: 3 }).await;
    let gw = gateway(config(&[up.url()], "    timeouts: { idle: 200ms }")).await;
    let body = r#"{"model":"m","prompt":"p","stream":true}"#;
    let started = Instant::now();
    let (status, _, bytes) = post(&gw.url(), "/v1/completions", body).await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(text.matches("\"text\":\"t").count(), 3, "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let json = last.strip_prefix("data: ").expect(&text);
    let err = error_of(json.as_bytes());
    assert_eq!(err["code"], "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The replica saw the stream dropped.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(up.cancelled().len(), 1);
}

/// An Anthropic error body: `{"type": "error", "error": {"type", "message"}}`.
fn anthropic_error(body: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    assert_eq!(v["type"], "error", "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"].clone()
}

#[tokio::test]
async fn messages_errors_are_in_anthropic_shape() {
    let up = mini_upstream("a", Behaviour::Stall { after: 2 }).await;
    let gw = gateway(config(&[up.url()], "    timeouts: { idle: 200ms }")).await;
    let url = gw.url();
    let msg = |model: &str, stream: bool| {
        format!(
            r#"{{"model":"{model}","max_tokens":5,"stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
        )
    };
    let (status, _, body) = post(&url, "/v1/messages", &msg("nope", false)).await;
    assert_eq!(status, 404);
    let e = anthropic_error(&body);
    assert_eq!(e["type"], "not_found_error");
    assert!(e["message"].as_str().unwrap().contains("nope"), "{e}");
    let (status, _, body) = post(&url, "/v1/messages", "{not json").await;
    assert_eq!(status, 400);
    assert_eq!(anthropic_error(&body)["type"], "invalid_request_error");
    // The other APIs keep OpenAI's shape.
    let (status, _, body) = post(&url, "/v1/completions", r#"{"model":"nope","prompt":"p"}"#).await;
    assert_eq!(status, 404);
    assert_eq!(error_of(&body)["code"], "model_not_found");
    // A stream that fails after its first events ends with Anthropic's
    // `error` event.
    let (status, _, bytes) = post(&url, "/v1/messages", &msg("m", true)).await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&bytes);
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let data = last.strip_prefix("event: error\ndata: ").expect(&text);
    assert_eq!(anthropic_error(data.as_bytes())["type"], "timeout_error");
}

/// The status page's view of replica `key` in the first pool, if listed.
async fn replica_status(
    gw: &infergate_proxy::ServerHandle,
    key: &str,
) -> Option<serde_json::Value> {
    let s = admin_json(&format!("{}/status.json", gw.admin_url().unwrap())).await;
    s["pools"][0]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key)
        .cloned()
}

#[tokio::test]
async fn a_replica_removed_with_requests_in_flight_shows_as_draining() {
    let a = mini_upstream("a", Behaviour::Echo).await;
    let b = mini_upstream("b", Behaviour::Echo).await;
    let gw = gateway(config(&[a.url(), b.url()], "")).await;
    // A slow stream: 20 tokens, 40 ms apart.
    let resp = post_stream(
        &gw.url(),
        "/v1/completions",
        r#"{"model":"m","prompt":"p","stream":true,"max_tokens":20,"x_itl_ms":40}"#,
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let served = resp.headers()["x-infergate-replica"]
        .to_str()
        .unwrap()
        .to_string();
    let other = if served == a.addr.to_string() { &b } else { &a };
    assert_eq!(
        replica_status(&gw, &served).await.unwrap()["state"],
        "unscraped"
    );
    // The replica leaves the pool (as a terminating endpoint leaves its
    // EndpointSlice) while its stream runs.
    gw.gateway.apply_config(config(&[other.url()], "")).unwrap();
    let r = replica_status(&gw, &served).await.expect("still listed");
    assert_eq!(r["state"], "draining", "{r}");
    assert_eq!(r["requests_in_flight"], 1, "{r}");
    assert_eq!(
        replica_status(&gw, &other.addr.to_string()).await.unwrap()["state"],
        "unscraped"
    );
    // Its last request ends: it is gone.
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    assert_eq!(replica_status(&gw, &served).await, None);
}

#[tokio::test]
async fn connect_failure_is_retried_on_another_replica() {
    // A port with nothing listening, listed first so least-request tries it first.
    let dead = dead_url();
    let up = mini_upstream("live", Behaviour::Echo).await;
    let gw = gateway(config(&[dead, up.url()], "")).await;
    let (status, h, _) = complete(&gw.url()).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-upstream-worker"], "live");
}

#[tokio::test]
async fn retryable_status_is_retried_on_a_different_replica() {
    let bad = mini_upstream("bad", Behaviour::Status(503)).await;
    let good = mini_upstream("good", Behaviour::Echo).await;
    let gw = gateway(config(&[bad.url(), good.url()], "")).await;
    let (status, h, _) = complete(&gw.url()).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-upstream-worker"], "good");
    assert_eq!(
        bad.seen.requests.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // With retries off, the replica's own 503 is passed through.
    let gw1 = gateway(config(
        &[bad.url(), good.url()],
        "    retries: { attempts: 1 }",
    ))
    .await;
    let (status, _, body) = complete(&gw1.url()).await;
    assert_eq!(status, 503);
    assert_eq!(error_of(&body)["message"], "upstream says 503");
}

#[tokio::test]
async fn client_disconnect_mid_stream_reaches_the_replica_within_100ms() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(&[up.url()], "")).await;
    let body = r#"{"model":"m","prompt":"p","stream":true,"max_tokens":1000,"x_itl_ms":20}"#;
    let resp = post_stream(&gw.url(), "/v1/completions", body, &[]).await;
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    let dropped = Instant::now();
    drop(body);
    wait_for_cancel(&up, dropped).await;
}

#[tokio::test]
async fn client_disconnect_during_prefill_reaches_the_replica_within_100ms() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(&[up.url()], "")).await;
    let body = r#"{"model":"m","prompt":"p","stream":true,"x_ttft_ms":5000}"#;
    let url = gw.url();
    let req = tokio::spawn(async move { post(&url, "/v1/completions", body).await });
    while up.seen.requests.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dropped = Instant::now();
    req.abort();
    wait_for_cancel(&up, dropped).await;
}

async fn wait_for_cancel(up: &MiniUpstream, since: Instant) {
    let deadline = since + Duration::from_secs(2);
    loop {
        if let Some(at) = up.cancelled().first() {
            let took = at.saturating_duration_since(since);
            assert!(
                took < Duration::from_millis(100),
                "replica saw the disconnect after {took:?}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica never saw the disconnect"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn slow_prefill_commits_the_stream_and_sends_keepalives() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(
        &[up.url()],
        "    timeouts: { keepalive_after: 100ms, keepalive_interval: 100ms }",
    ))
    .await;
    let body = r#"{"model":"m","prompt":"p","stream":true,"max_tokens":2,"x_ttft_ms":450}"#;
    let started = Instant::now();
    let resp = post_stream(&gw.url(), "/v1/completions", body, &[]).await;
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "headers came late"
    );
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with(": keep-alive\n\n"), "{text}");
    assert!(text.matches(": keep-alive").count() >= 2, "{text}");
    assert_eq!(text.matches("\"text\":\"t").count(), 2, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn committed_stream_whose_replica_fails_gets_an_sse_error() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(
        &[up.url()],
        "    timeouts: { keepalive_after: 50ms, first_byte: 300ms }",
    ))
    .await;
    let body = r#"{"model":"m","prompt":"p","stream":true,"x_ttft_ms":2000}"#;
    let (status, _, bytes) = post(&gw.url(), "/v1/completions", body).await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&bytes);
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let err = error_of(last.strip_prefix("data: ").expect(&text).as_bytes());
    assert_eq!(err["code"], "upstream_timeout");
}

#[tokio::test]
async fn every_error_status_has_an_openai_json_body() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(&[up.url()], "    timeouts: { first_byte: 200ms }")).await;
    let url = gw.url();
    let check = |status: u16, body: bytes::Bytes, want: u16| {
        assert_eq!(status, want, "{}", String::from_utf8_lossy(&body));
        error_of(&body)
    };
    let (s, _, b) = post(&url, "/v1/completions", "{not json").await;
    check(s.as_u16(), b, 400);
    let (s, _, b) = post(&url, "/v1/completions", r#"{"prompt":"x"}"#).await;
    assert_eq!(check(s.as_u16(), b, 400)["param"], "model");
    let (s, _, b) = post(&url, "/v1/completions", r#"{"model":"nope","prompt":"x"}"#).await;
    assert_eq!(check(s.as_u16(), b, 404)["code"], "model_not_found");
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(70_000));
    let (s, _, b) = post(&url, "/v1/completions", &big).await;
    check(s.as_u16(), b, 413);
    let req = http::Request::post(format!("{url}/v1/completions"))
        .header("content-type", "text/plain")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let s = resp.status().as_u16();
    check(s, resp.into_body().collect().await.unwrap().to_bytes(), 415);
    // 504: first byte too late.
    let (s, _, b) = post(
        &url,
        "/v1/completions",
        r#"{"model":"m","prompt":"x","x_ttft_ms":1000}"#,
    )
    .await;
    assert_eq!(check(s.as_u16(), b, 504)["code"], "upstream_timeout");

    // 502: every replica refuses connections.
    let dead = dead_url();
    let gw502 = gateway(config(&[dead], "")).await;
    let (s, _, b) = complete(&gw502.url()).await;
    check(s.as_u16(), b, 502);
    // 503: a pool with no replicas yet (a Service nobody has discovered),
    // when the route holds no request for a replica to start
    // (tests/admission_scale_from_zero.rs covers the wait).
    let gw503 = gateway(config(
        &[],
        "    admission: { queue: { max_waiting_when_empty: 0 } }",
    ))
    .await;
    let (s, h, b) = complete(&gw503.url()).await;
    assert_eq!(check(s.as_u16(), b, 503)["code"], "no_ready_replica");
    assert!(h.contains_key("retry-after"));
    // Unknown path and wrong method.
    let resp = client()
        .get(format!("{url}/v1/completions").parse().unwrap())
        .await
        .unwrap();
    let s = resp.status().as_u16();
    check(s, resp.into_body().collect().await.unwrap().to_bytes(), 405);
}

#[tokio::test]
async fn models_are_listed_and_h2c_works() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(&[up.url()], "")).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = h2
        .get(format!("{}/v1/models", gw.url()).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let ids: Vec<_> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m", "m-alias"]);
    let req = http::Request::post(format!("{}/v1/completions", gw.url()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"model":"m","prompt":"x","stream":true}"#,
        )))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(text.ends_with(b"data: [DONE]\n\n"));
}

#[tokio::test]
async fn admin_reports_metrics_readiness_and_routes() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(&[up.url()], "")).await;
    post(
        &gw.url(),
        "/v1/completions",
        r#"{"model":"m","prompt":"x","max_tokens":2}"#,
    )
    .await;
    let admin = gw.admin_url().unwrap();
    let get = |p: &'static str| {
        let admin = admin.clone();
        async move {
            let r = client()
                .get(format!("{admin}{p}").parse().unwrap())
                .await
                .unwrap();
            let s = r.status().as_u16();
            (
                s,
                String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec())
                    .unwrap(),
            )
        }
    };
    let (s, metrics) = get("/metrics").await;
    assert_eq!(s, 200);
    assert!(metrics.contains("infergate_requests_total"), "{metrics}");
    assert!(
        metrics.contains("infergate_completion_tokens_total"),
        "{metrics}"
    );
    // The finished non-streaming request counts as ok, not as a disconnect.
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("infergate_requests_total{")
                && l.contains(&format!("replica=\"{}\"", up.key()))
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        line.contains("status=\"200\"") && line.contains("outcome=\"ok\""),
        "{line}"
    );
    assert_eq!(get("/healthz").await.0, 200);
    assert_eq!(get("/readyz").await.0, 200);
    let (_, routes) = get("/routes").await;
    let v: serde_json::Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(v["routes"][0]["model"], "m");
    assert_eq!(v["pools"][0]["replicas"][0]["key"], up.key().as_str());
    assert_eq!(v["pools"][0]["replicas"][0]["requests_in_flight"], 0);
}

#[tokio::test]
async fn usage_injection_rewrites_only_streaming_requests() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(
        &[up.url()],
        "    usage: { include_usage: true }\n    target_model: real-m",
    ))
    .await;
    let (s, _, b) = post(
        &gw.url(),
        "/v1/completions",
        r#"{"model":"m","prompt":"x","stream":true,"max_tokens":2}"#,
    )
    .await;
    assert_eq!(s, 200);
    let sent: serde_json::Value =
        serde_json::from_slice(&up.seen.last_body.lock().unwrap().clone().unwrap()).unwrap();
    assert_eq!(sent["model"], "real-m");
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert!(String::from_utf8_lossy(&b).contains("\"usage\""));
}

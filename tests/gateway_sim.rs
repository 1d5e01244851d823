//! The gateway in front of simulated vLLM-like replicas (crate::sim) on loopback.

#[path = "support_gateway/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use infergate::cli::{start_quickstart, QuickstartArgs};
use infergate_core::config::{Config, QUICKSTART_YAML};
use infergate_sim::{start_fleet, EngineParams, Faults, FleetConfig, Profile};
use support::*;

fn fleet_config(replicas: usize) -> FleetConfig {
    FleetConfig {
        replicas,
        served_model_name: Some("m".into()),
        time_scale: 20.0,
        ..FleetConfig::with_profile(Profile::Tiny)
    }
}

/// Masks the two fields that differ between any two answers of a replica
/// (the random completion id and the creation second).
fn mask(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes).into_owned();
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find("\"id\":\"") {
        out.push_str(&rest[..i + 6]);
        rest = &rest[i + 6..];
        let end = rest.find('"').unwrap_or(rest.len());
        out.push_str("ID");
        rest = &rest[end..];
    }
    out.push_str(rest);
    let mut masked = String::new();
    let mut rest = out.as_str();
    while let Some(i) = rest.find("\"created\":") {
        masked.push_str(&rest[..i + 10]);
        rest = &rest[i + 10..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        masked.push('T');
        rest = &rest[end..];
    }
    masked.push_str(rest);
    masked
}

#[tokio::test]
async fn sim_answers_pass_through_unchanged() {
    let fleet = start_fleet(fleet_config(1)).await.unwrap();
    let gw = gateway(config(&fleet.urls(), "")).await;
    let direct = fleet.urls()[0].clone();
    for (path, body) in [
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"Once upon a time","max_tokens":12}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"Hi there"}],"max_tokens":9}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"Once upon a time","max_tokens":12,"stream":true}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"Hi"}],"max_tokens":7,"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
    ] {
        let (s1, h1, a) = post(&direct, path, body).await;
        let (s2, h2, b) = post(&gw.url(), path, body).await;
        assert_eq!(
            (s1.as_u16(), s2.as_u16()),
            (200, 200),
            "{}",
            String::from_utf8_lossy(&b)
        );
        assert_eq!(a.len(), b.len(), "{path}: lengths differ");
        assert_eq!(mask(&a), mask(&b), "{path} {body}");
        assert_eq!(h1["content-type"], h2["content-type"]);
    }
}

#[tokio::test]
async fn a_ten_minute_stream_survives_a_short_idle_timeout() {
    // 3000 tokens at 200 ms each = 10 modelled minutes; time scale 1000 makes
    // that 0.6 s of wall time, many times the 50 ms idle timeout.
    let params = EngineParams {
        step_fixed_us: 200_000.0,
        decode_us_per_seq: 0.0,
        prefill_us_per_token: 0.0,
        max_model_len: 8192,
        ..Profile::Tiny.params()
    };
    let fleet = start_fleet(FleetConfig {
        params,
        time_scale: 1000.0,
        ..fleet_config(1)
    })
    .await
    .unwrap();
    let gw = gateway(config(&fleet.urls(), "    timeouts: { idle: 50ms }")).await;
    let body = r#"{"model":"m","prompt":"go","max_tokens":3000,"stream":true,"stream_options":{"include_usage":true}}"#;
    let started = Instant::now();
    let (status, _, bytes) = post(&gw.url(), "/v1/completions", body).await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text.contains("\"error\""),
        "{}",
        &text[text.len().saturating_sub(400)..]
    );
    assert!(text.contains("\"completion_tokens\":3000"));
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(
        took > Duration::from_millis(200),
        "stream took only {took:?}"
    );
}

#[tokio::test]
async fn a_stalled_sim_stream_ends_with_an_sse_error() {
    let fleet = start_fleet(FleetConfig {
        faults: Faults {
            stall_rate: 1.0,
            stall_after_tokens: 3,
            stall_ms: 0,
            ..Faults::default()
        },
        ..fleet_config(1)
    })
    .await
    .unwrap();
    let gw = gateway(config(&fleet.urls(), "    timeouts: { idle: 300ms }")).await;
    let (status, _, bytes) = post(
        &gw.url(),
        "/v1/completions",
        r#"{"model":"m","prompt":"p","max_tokens":50,"stream":true}"#,
    )
    .await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&bytes);
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let err = error_of(last.strip_prefix("data: ").expect(&text).as_bytes());
    assert_eq!(err["code"], "upstream_timeout");
    assert_eq!(text.matches("data: {\"id\"").count(), 3, "{text}");
}

#[tokio::test]
async fn retry_lands_on_a_different_sim_replica() {
    let fleet = start_fleet(fleet_config(2)).await.unwrap();
    // Replica 0 answers 503 to every generation request; least-request tries it first.
    fleet.replica(0).set_faults(Faults {
        error_rate: 1.0,
        error_status: Some(503),
        ..Faults::default()
    });
    let gw = gateway(config(&fleet.urls(), "")).await;
    for _ in 0..3 {
        let (status, h, _) = complete(&gw.url()).await;
        assert_eq!(status, 200);
        assert_eq!(
            h["x-infergate-replica"],
            fleet.replica(1).addr().to_string().as_str()
        );
    }
    assert_eq!(fleet.replica(0).stats().generation_requests, 3);
    assert_eq!(fleet.replica(1).stats().requests_received, 3);
    // A replica that refuses new connections is skipped the same way (a fresh
    // gateway: the first one still holds kept-alive connections to replica 0).
    fleet.replica(0).set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    let gw = gateway(config(&fleet.urls(), "")).await;
    let (status, h, _) = complete(&gw.url()).await;
    assert_eq!(status, 200);
    assert_eq!(
        h["x-infergate-replica"],
        fleet.replica(1).addr().to_string().as_str()
    );
}

#[tokio::test]
async fn sim_sees_a_client_disconnect_within_100ms() {
    let fleet = start_fleet(fleet_config(1)).await.unwrap();
    let gw = gateway(config(&fleet.urls(), "")).await;
    let resp = post_stream(
        &gw.url(),
        "/v1/completions",
        r#"{"model":"m","prompt":"p","max_tokens":1500,"stream":true}"#,
        &[],
    )
    .await;
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    let dropped = Instant::now();
    drop(body);
    let deadline = dropped + Duration::from_secs(2);
    loop {
        let stats = fleet.replica(0).stats();
        if let Some(at) = stats.aborted_at.first() {
            let took = at.saturating_duration_since(dropped);
            assert!(
                took < Duration::from_millis(100),
                "abort seen after {took:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never saw the disconnect"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn quickstart_serves_the_embedded_config() {
    let config = Config::parse(QUICKSTART_YAML, "quickstart.yaml").unwrap();
    let args = QuickstartArgs {
        port: 0,
        admin_port: 0,
        replicas: 2,
    };
    let (fleet, handle) = start_quickstart(config, &args).await.unwrap();
    assert_eq!(fleet.len(), 2);
    let banner = infergate::cli::quickstart_banner(&handle, &fleet.urls());
    assert!(banner.contains(&handle.url()));
    let body =
        r#"{"model":"sim-llama","messages":[{"role":"user","content":"Hello!"}],"max_tokens":4}"#;
    let (status, _, bytes) = post(&handle.url(), "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 4);
    handle.drain(Duration::from_secs(1)).await;
}

/// A client using an alias reaches a replica that serves only the canonical
/// name (an unknown name gets vLLM's 404): the gateway rewrites the model to
/// the route's `model`, or sends the alias as is with `forward_alias: true`.
#[tokio::test]
async fn an_alias_reaches_an_engine_that_serves_only_the_canonical_name() {
    let fleet = start_fleet(fleet_config(1)).await.unwrap();
    let direct = fleet.urls()[0].clone();
    let body = |model: &str| {
        format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"Hi there"}}],"max_tokens":5}}"#
        )
    };
    // The replica itself knows only `m`.
    let (s, _, b) = post(&direct, "/v1/chat/completions", &body("m-alias")).await;
    assert_eq!(s.as_u16(), 404, "{}", String::from_utf8_lossy(&b));
    assert_eq!(error_of(&b)["code"], "model_not_found");

    let gw = gateway(config(&fleet.urls(), "")).await;
    let (s, _, via_alias) = post(&gw.url(), "/v1/chat/completions", &body("m-alias")).await;
    assert_eq!(s.as_u16(), 200, "{}", String::from_utf8_lossy(&via_alias));
    let (_, _, canonical) = post(&direct, "/v1/chat/completions", &body("m")).await;
    assert_eq!(
        mask(&via_alias),
        mask(&canonical),
        "the engine's own answer"
    );

    // forward_alias: the alias goes upstream as sent, and this engine refuses it.
    let fwd = gateway(config(&fleet.urls(), "    forward_alias: true\n")).await;
    let (s, _, b) = post(&fwd.url(), "/v1/chat/completions", &body("m-alias")).await;
    assert_eq!(s.as_u16(), 404, "{}", String::from_utf8_lossy(&b));
    assert_eq!(error_of(&b)["code"], "model_not_found");
}

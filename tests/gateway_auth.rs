//! The trust boundary through the real gateway on loopback: API keys (401,
//! per-key models, key-file hot reload), entitlements (priority, canary and
//! fallback headers only for callers allowed them, stripped before the
//! replica), the forwarding allow-list, trusted-proxy headers and the admin
//! token. Each test fails on a gateway that trusts every caller.

#[path = "support_gateway/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::BodyExt;
use infergate::control_plane::{ConfigSource, ControlOptions, ControlPlane, Loaded};
use infergate_core::config::Config;
use infergate_core::identity::hash_key;
use support::*;

/// Keys: `sk-search` (team search: model `m` only, may go critical and
/// force the canary), `sk-ads` (team ads: the defaults, every model,
/// standard at most).
fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("keys.yaml");
    std::fs::write(
        &path,
        format!(
            "- {{id: search-1, sha256: {}, team: search}}\n- {{id: ads-1, sha256: {}, team: ads}}\n",
            hash_key("sk-search"),
            hash_key("sk-ads")
        ),
    )
    .unwrap();
    path
}

/// A gateway with two routes (`m` on `stable`, `other` on `stable`), `m`
/// with a weight-0 canary on `canary`, keys on.
fn keyed_config(stable: &str, canary: &str, keys: &std::path::Path) -> Config {
    let yaml = format!(
        r#"listeners:
  main: {{ address: "127.0.0.1:0" }}
  admin: {{ address: "127.0.0.1:0" }}
auth:
  mode: keys
  key_file: {keys}
  teams:
    search: {{ models: [m], max_priority: critical, may_force_canary: true, may_forbid_fallback: true }}
pools:
  - name: stable
    endpoints: ["{stable}"]
  - name: canary
    endpoints: ["{canary}"]
routes:
  - model: m
    pool: stable
    routing: {{ policy: least_request }}
    admission: {{ canary: {{ pool: canary, weight: 0 }} }}
  - model: other
    pool: stable
    routing: {{ policy: least_request }}
"#,
        keys = keys.display()
    );
    Config::parse(&yaml, "auth.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// Replicas for the stable and canary sides, the key file (in `dir`) and
/// the config over them.
struct Keyed {
    stable: MiniUpstream,
    canary: MiniUpstream,
    keys: std::path::PathBuf,
    config: Config,
    _dir: tempfile::TempDir,
}

async fn keyed(stable: Behaviour) -> Keyed {
    let stable = mini_upstream("s", stable).await;
    let canary = mini_upstream("c", Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let config = keyed_config(&stable.url(), &canary.url(), &keys);
    Keyed {
        stable,
        canary,
        keys,
        config,
        _dir: dir,
    }
}

use support::post_with as post_as;

async fn get_as(url: &str, headers: &[(&str, &str)]) -> (http::StatusCode, bytes::Bytes) {
    let mut b = http::Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client()
        .request(
            b.body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

const CHAT_M: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;

#[tokio::test]
async fn a_missing_or_wrong_key_is_401_and_never_reaches_a_replica() {
    let k = keyed(Behaviour::Echo).await;
    let (stable, gw) = (&k.stable, gateway(k.config.clone()).await);
    for headers in [
        vec![],
        vec![("authorization", "Bearer sk-wrong")],
        vec![("x-api-key", "sk-wrong")],
        vec![("authorization", "Basic sk-search")],
    ] {
        let (s, h, body) = post_as(&gw.url(), "/v1/chat/completions", CHAT_M, &headers).await;
        assert_eq!(s, 401, "{headers:?}");
        assert_eq!(h["www-authenticate"], "Bearer");
        let e = error_of(&body);
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["code"], "invalid_api_key");
        assert!(
            !String::from_utf8_lossy(&body).contains("sk-"),
            "the key is not echoed"
        );
    }
    let (s, _) = get_as(&format!("{}/v1/models", gw.url()), &[]).await;
    assert_eq!(s, 401);
    assert_eq!(stable.seen.requests.load(Ordering::SeqCst), 0);
    // Both spellings of a good key pass, and the key does not go upstream.
    for h in [("authorization", "Bearer sk-ads"), ("x-api-key", "sk-ads")] {
        let (s, _, _) = post_as(&gw.url(), "/v1/chat/completions", CHAT_M, &[h]).await;
        assert_eq!(s, 200);
        let seen = stable.seen.last_headers.lock().unwrap().clone().unwrap();
        assert!(seen.get("authorization").is_none() && seen.get("x-api-key").is_none());
    }
}

#[tokio::test]
async fn a_key_sees_only_its_models() {
    let k = keyed(Behaviour::Echo).await;
    let (stable, gw) = (&k.stable, gateway(k.config.clone()).await);
    let search = [("authorization", "Bearer sk-search")];
    let other = r#"{"model":"other","messages":[{"role":"user","content":"hi"}]}"#;
    let (s, _, body) = post_as(&gw.url(), "/v1/chat/completions", other, &search).await;
    assert_eq!(s, 404);
    let (_, _, unknown) = post_as(
        &gw.url(),
        "/v1/chat/completions",
        &other.replace("other", "nope"),
        &search,
    )
    .await;
    let (e, u) = (error_of(&body), error_of(&unknown));
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(
        e["message"].as_str().unwrap().replace("other", "X"),
        u["message"].as_str().unwrap().replace("nope", "X"),
        "a model not allowed looks exactly like an unknown one"
    );
    assert_eq!(stable.seen.requests.load(Ordering::SeqCst), 0);
    let (s, _, _) = post_as(&gw.url(), "/v1/chat/completions", CHAT_M, &search).await;
    assert_eq!(s, 200);

    let ids = |body: &[u8]| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (s, body) = get_as(&format!("{}/v1/models", gw.url()), &search).await;
    assert_eq!(s, 200);
    assert_eq!(ids(&body), ["m"]);
    let (_, body) = get_as(
        &format!("{}/v1/models", gw.url()),
        &[("x-api-key", "sk-ads")],
    )
    .await;
    assert_eq!(ids(&body), ["m", "other"]);
}

#[tokio::test]
async fn control_headers_count_only_for_callers_entitled_to_them() {
    // The stable replica of `m` takes one request at a time: while it is
    // busy a sheddable request is refused (429) at once, a critical one
    // waits in the queue (here until its 300 ms deadline: 503). Team ads
    // may use `sheddable` at most, search `critical`.
    let k = keyed(Behaviour::Stall { after: 1 }).await;
    let (stable, canary) = (&k.stable, &k.canary);
    let gw = gateway({
        let mut c = k.config.clone();
        c.auth.teams.insert(
            "ads".into(),
            serde_yaml_ng::from_str("max_priority: sheddable").unwrap(),
        );
        c.routes[0].admission.budget.max_requests_per_replica = Some(1);
        // No critical request in the engine's queue (self-tuning would allow
        // one): the entitled critical request must wait in the gateway's.
        c.routes[0].admission.budget.critical_engine_queue = Some(0);
        c
    })
    .await;

    // The canary has weight 0: only an entitled caller can force it.
    let force = [
        ("x-infergate-canary", "canary"),
        ("x-infergate-no-fallback", "1"),
    ];
    let (s, _, _) = post_as(
        &gw.url(),
        "/v1/chat/completions",
        CHAT_M,
        &[&force[..], &[("authorization", "Bearer sk-search")]].concat(),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        canary.seen.requests.load(Ordering::SeqCst),
        1,
        "entitled: forced"
    );
    let seen = canary.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(
        seen["x-infergate-canary"], "canary",
        "entitled headers pass"
    );

    // Hold the one slot of the stable replica with a stalled stream; what
    // ads may not use never reaches the replica.
    let critical = [
        ("x-infergate-priority", "critical"),
        ("x-gateway-inference-objective", "100"),
        ("x-infergate-canary", "canary"),
        ("x-infergate-no-fallback", "1"),
        ("x-gateway-inference-fairness-id", "rot-1"),
        ("x-infergate-deadline-ms", "300"),
    ];
    let held = post_stream(
        &gw.url(),
        "/v1/chat/completions",
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        &[&critical[..], &[("x-api-key", "sk-ads")]].concat(),
    )
    .await;
    assert_eq!(held.status(), 200);
    assert_eq!(
        stable.seen.requests.load(Ordering::SeqCst),
        1,
        "stable side, not forced"
    );
    let seen = stable.seen.last_headers.lock().unwrap().clone().unwrap();
    for (h, _) in critical.iter().take(5) {
        assert!(seen.get(*h).is_none(), "{h} reached the replica");
    }

    // ads may not go critical nor force the canary: its request is lowered
    // to sheddable (429 at once) and stays on the stable side.
    let (s, _, body) = post_as(
        &gw.url(),
        "/v1/chat/completions",
        CHAT_M,
        &[&critical[..], &[("x-api-key", "sk-ads")]].concat(),
    )
    .await;
    assert_eq!(s, 429, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        canary.seen.requests.load(Ordering::SeqCst),
        1,
        "canary not forced"
    );
    // search may: its critical request is queued (then times out at 300 ms).
    let (s, _, _) = post_as(
        &gw.url(),
        "/v1/chat/completions",
        CHAT_M,
        &[
            ("x-infergate-priority", "critical"),
            ("x-infergate-canary", "stable"),
            ("x-infergate-deadline-ms", "300"),
            ("authorization", "Bearer sk-search"),
        ],
    )
    .await;
    assert_eq!(s, 503, "queued, not shed");
    drop(held);
}

#[tokio::test]
async fn only_inference_endpoints_are_forwarded() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let gw = gateway(config(&[up.url()], "")).await;
    let lora = r#"{"model":"m","lora_name":"prod-adapter"}"#;
    for (path, status) in [
        ("/v1/unload_lora_adapter", 404),
        ("/v1/load_lora_adapter", 404),
        ("/v1/../v1/unload_lora_adapter", 400),
        ("/v1/./unload_lora_adapter", 400),
        ("/v1/%2e%2e/v1/unload_lora_adapter", 400),
        ("/v1%2Funload_lora_adapter", 400),
        ("//v1//unload_lora_adapter", 404),
        ("/v1/chat/completions/../../unload_lora_adapter", 400),
    ] {
        let (s, _, body) = post(&gw.url(), path, lora).await;
        assert_eq!(s, status, "{path}");
        error_of(&body);
    }
    assert_eq!(
        up.seen.requests.load(Ordering::SeqCst),
        0,
        "no replica saw any of them"
    );
    // Repeated slashes collapse to a served endpoint.
    let (s, _, _) = post(
        &gw.url(),
        "//v1//completions",
        r#"{"model":"m","prompt":"x"}"#,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, _) = post(&gw.url(), "/tokenize", r#"{"model":"m","prompt":"x"}"#).await;
    assert_eq!(s, 200, "vLLM's /tokenize is an inference endpoint");
    assert_eq!(up.seen.requests.load(Ordering::SeqCst), 2);

    // A route may narrow its endpoints.
    let gw = gateway(config(&[up.url()], "    endpoints: [chat_completions]\n")).await;
    let (s, _, body) = complete(&gw.url()).await;
    assert_eq!(s, 404);
    assert_eq!(error_of(&body)["code"], "not_found");
    assert_eq!(up.seen.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn key_file_changes_apply_without_a_restart() {
    let k = keyed(Behaviour::Echo).await;
    let (keys, config) = (&k.keys, k.config.clone());
    let cfg_path = k.keys.with_file_name("config.yaml");
    let text = serde_yaml_ng::to_string(&config).unwrap();
    std::fs::write(&cfg_path, &text).unwrap();
    let gateway = infergate_proxy::Gateway::new(config.clone()).unwrap();
    let loaded = Loaded {
        config: config.clone(),
        text,
        source: ConfigSource::File(cfg_path),
        cluster: None,
        canary_annotations: false,
    };
    let opts = ControlOptions {
        file_poll: Duration::from_millis(20),
        ..ControlOptions::default()
    };
    let _control = ControlPlane::start(gateway.clone(), loaded, opts).await;
    let gw = infergate_proxy::start_with(gateway, &config.listeners.main, None)
        .await
        .unwrap();
    let status = |key: &'static str| {
        let url = gw.url();
        async move {
            post_as(&url, "/v1/chat/completions", CHAT_M, &[("x-api-key", key)])
                .await
                .0
        }
    };
    assert_eq!(status("sk-new").await, 401);
    assert_eq!(status("sk-ads").await, 200);
    // Rotate: ads's key is revoked, a new one added (as a Secret update would).
    std::fs::write(
        keys,
        format!(
            "- {{id: search-1, sha256: {}, team: search}}\n- {{id: new-1, sha256: {}, team: ads}}\n",
            hash_key("sk-search"),
            hash_key("sk-new")
        ),
    )
    .unwrap();
    let mut ok = false;
    for _ in 0..200 {
        if status("sk-new").await == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the new key was never accepted");
    assert_eq!(status("sk-ads").await, 401, "the revoked key is refused");
    // A broken file is rejected; the keys in force stay.
    std::fs::write(keys, "- id: [").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status("sk-new").await, 200);
}

#[tokio::test]
async fn trusted_headers_count_only_from_trusted_sources() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let with_sources = |sources: &str| {
        let mut c = config(&[up.url()], "");
        c.auth = serde_yaml_ng::from_str(&format!(
            "mode: trusted_headers\ntrusted_headers: {{team_header: x-auth-team, sources: [{sources}]}}\n"
        ))
        .unwrap();
        c
    };
    // The test client (127.0.0.1) is not the trusted proxy.
    let gw = gateway(with_sources("10.0.0.0/8")).await;
    let team = [("x-auth-team", "search")];
    let body = r#"{"model":"m","prompt":"x"}"#;
    let (s, _, b) = post_as(&gw.url(), "/v1/completions", body, &team).await;
    assert_eq!(s, 401);
    assert_eq!(error_of(&b)["code"], "untrusted_source");
    assert_eq!(up.seen.requests.load(Ordering::SeqCst), 0);
    // From the trusted source: accepted, and a missing team is refused.
    let gw = gateway(with_sources("127.0.0.1/32")).await;
    assert_eq!(
        post_as(&gw.url(), "/v1/completions", body, &team).await.0,
        200
    );
    assert_eq!(
        post_as(&gw.url(), "/v1/completions", body, &[]).await.0,
        401
    );
}

#[tokio::test]
async fn an_admin_listener_beyond_loopback_needs_a_token() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let mut c = config(&[up.url()], "");
    if let Some(a) = c.listeners.admin.as_mut() {
        a.address = "0.0.0.0:0".parse().unwrap();
    }
    // Refused before anything binds.
    let e = infergate_proxy::start(c.clone())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("beyond loopback") && e.contains("token_file"),
        "{e}"
    );

    // With a token (bound to loopback here): everything but the probes and
    // (when public) /metrics needs it.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let mut c = config(&[up.url()], "");
    c.auth.admin.token_file = Some(token);
    c.auth.admin.public_metrics = true;
    let gw = gateway(c).await;
    let admin = gw.admin_url().unwrap();
    assert_eq!(get_as(&format!("{admin}/routes"), &[]).await.0, 401);
    assert_eq!(
        get_as(
            &format!("{admin}/routes"),
            &[("authorization", "Bearer wrong")]
        )
        .await
        .0,
        401
    );
    assert_eq!(
        get_as(
            &format!("{admin}/routes"),
            &[("authorization", "Bearer s3cret")]
        )
        .await
        .0,
        200
    );
    assert_eq!(get_as(&format!("{admin}/readyz"), &[]).await.0, 200);
    assert_eq!(get_as(&format!("{admin}/metrics"), &[]).await.0, 200);
}

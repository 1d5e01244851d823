//! The Responses API and Anthropic-style messages through the gateway with
//! the unchanged `openai` and `anthropic` Python SDKs (streaming and not),
//! plus rerank and score, in front of simulated replicas: the same long
//! system prompt lands on one replica (prefix-aware routing sees these APIs'
//! prompts), and the gateway's token metrics equal the usage the engines
//! reported.
//!
//! Needs python3 with both SDKs, so it is `#[ignore]`d; `.ci/run` installs
//! them and runs it with `--include-ignored`. Without them it skips with a
//! printed reason, unless INFERGATE_REQUIRE_EXTERNAL=1 (CI), which fails it.

#[path = "support_gateway/mod.rs"]
mod support;

use infergate_sim::{start_fleet, FleetConfig, Profile};
use support::*;

/// Sum of every series of `name` in Prometheus text whose labels contain
/// `having`.
fn metric_sum_of(text: &str, name: &str, having: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(having))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metric_sum(text: &str, name: &str) -> f64 {
    metric_sum_of(text, name, "")
}

async fn admin_metrics(gw: &infergate_proxy::ServerHandle) -> String {
    let url = format!("{}/metrics", gw.admin_url().unwrap());
    let resp = client().get(url.parse().unwrap()).await.unwrap();
    let b = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the openai and anthropic Python SDKs: python3 -m pip install openai anthropic"]
async fn responses_and_messages_sdks_route_by_prefix_and_count_exact_usage() {
    if !python_modules(
        "responses_and_messages_sdks",
        "openai, anthropic",
        "python3 -m pip install openai anthropic",
    ) {
        return;
    }
    let fleet = start_fleet(FleetConfig {
        replicas: 3,
        served_model_name: Some("m".into()),
        time_scale: 20.0,
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    let gw = gateway(config(
        &fleet.urls(),
        "    routing: { policy: inference_aware }\n",
    ))
    .await;
    let args = [gw.url(), "m-alias".into()];
    let stdout = run_python("responses_messages_client.py", &args).await;
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let replicas: Vec<&str> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(replicas.len(), 4);
    assert!(
        replicas.iter().all(|r| *r == replicas[0]),
        "the shared system prompt stays on one replica: {replicas:?}"
    );
    // That replica's engine cache served the repeated prompt.
    let home = fleet
        .replicas()
        .iter()
        .find(|r| r.url().ends_with(replicas[0]))
        .unwrap();
    assert!(home.stats().prefix_cache_hits > 0, "{:?}", home.stats());

    // Rerank and score, through the gateway's unversioned and /v1 paths.
    let (s, _, rr) = post(
        &gw.url(),
        "/rerank",
        r#"{"model":"m","query":"night trains","documents":["timetable","bikes on board","sleeper cars"],"top_n":2}"#,
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&rr));
    let rr: serde_json::Value = serde_json::from_slice(&rr).unwrap();
    assert_eq!(rr["results"].as_array().unwrap().len(), 2);
    let (s, _, sc) = post(
        &gw.url(),
        "/v1/score",
        r#"{"model":"m","text_1":"night trains","text_2":["sleeper cars","bikes"]}"#,
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&sc));
    let sc: serde_json::Value = serde_json::from_slice(&sc).unwrap();
    assert_eq!(sc["data"].as_array().unwrap().len(), 2);

    // The gateway counted exactly what the engines reported.
    let prompt = v["input_tokens"].as_f64().unwrap()
        + rr["usage"]["total_tokens"].as_f64().unwrap()
        + sc["usage"]["prompt_tokens"].as_f64().unwrap();
    let completion = v["output_tokens"].as_f64().unwrap();
    let m = admin_metrics(&gw).await;
    // (The script's last call, an unknown model, never reached a route.)
    assert_eq!(
        metric_sum_of(&m, "infergate_prompt_tokens_total", "route=\"m\""),
        prompt,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "infergate_completion_tokens_total"),
        completion,
        "{m}"
    );
    // Prompt tokens served from the engine's prefix cache, as the SDKs saw
    // them (Responses: `input_tokens_details.cached_tokens`; Anthropic:
    // `cache_read_input_tokens`).
    assert_eq!(
        metric_sum(&m, "infergate_cached_prompt_tokens_total"),
        v["cached_tokens"].as_f64().unwrap(),
        "{m}"
    );
    // And so did the GenAI-convention token histogram, by token type, with
    // the Responses and messages calls as `chat` operations.
    let usage = "gen_ai_client_token_usage_sum";
    assert_eq!(
        metric_sum_of(&m, usage, "gen_ai_token_type=\"input\""),
        prompt,
        "{m}"
    );
    assert_eq!(
        metric_sum_of(&m, usage, "gen_ai_token_type=\"output\""),
        completion,
        "{m}"
    );
    assert_eq!(
        metric_sum_of(
            &m,
            "gen_ai_server_time_to_first_token_seconds_count",
            "gen_ai_operation_name=\"chat\""
        ),
        4.0,
        "{m}"
    );
    for op in ["rerank", "score"] {
        let count = metric_sum_of(
            &m,
            "gen_ai_server_request_duration_seconds_count",
            &format!("gen_ai_operation_name=\"{op}\""),
        );
        assert_eq!(count, 1.0, "{op}: {m}");
    }
}

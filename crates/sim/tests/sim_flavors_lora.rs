//! The same engine state under vLLM's, SGLang's and llama.cpp's metric names,
//! and LoRA adapters: listed, `max_loras` resident, loading costs time.

mod sim_util;

use std::time::{Duration, Instant};

use infergate_protocol::EngineKind;
use infergate_sim::{start_fleet, EngineParams, FleetConfig, Profile};
use serde_json::Value;
use sim_util::*;

async fn metrics_text(c: &HttpClient, url: &str) -> String {
    let (s, h, b) = call(c, "GET", &format!("{url}/metrics"), None).await;
    assert_eq!(s, 200);
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    String::from_utf8(b.to_vec()).unwrap()
}

#[tokio::test]
async fn each_flavor_serves_its_engine_names() {
    let cases = [
        (
            EngineKind::Vllm,
            &[
                "vllm:num_requests_running{",
                "vllm:num_requests_waiting{",
                "vllm:kv_cache_usage_perc{",
                "vllm:prefix_cache_hits_total{",
                "vllm:lora_requests_info{",
                "vllm:time_to_first_token_seconds_bucket{",
                "vllm:inter_token_latency_seconds_count{",
                "vllm:prompt_tokens_total{",
                "vllm:generation_tokens_total{",
            ][..],
            "sglang:",
        ),
        (
            EngineKind::Sglang,
            &[
                "sglang:num_running_reqs{",
                "sglang:num_queue_reqs{",
                "sglang:token_usage{",
                "sglang:cache_hit_rate{",
                "sglang:cache_config_info{",
                "sglang:time_to_first_token_seconds_bucket{",
            ][..],
            "vllm:",
        ),
        (
            EngineKind::LlamaCpp,
            &[
                "llamacpp:requests_processing ",
                "llamacpp:requests_deferred ",
                "llamacpp:kv_cache_usage_ratio ",
                "llamacpp:prompt_tokens_total ",
                "llamacpp:tokens_predicted_total ",
            ][..],
            "vllm:",
        ),
    ];
    for (flavor, names, absent) in cases {
        let fleet = start_fleet(FleetConfig {
            metrics_flavor: flavor,
            time_scale: 20.0,
            ..FleetConfig::with_profile(Profile::Tiny)
        })
        .await
        .unwrap();
        let url = fleet.urls()[0].clone();
        let c = client();
        let (s, _) = post_json(
            &c,
            &format!("{url}/v1/chat/completions"),
            &chat("sim-tiny", "hello", 3, false),
        )
        .await;
        assert_eq!(s, 200);
        let m = metrics_text(&c, &url).await;
        for n in names {
            assert!(m.contains(n), "{flavor:?}: no {n} in\n{m}");
        }
        assert!(!m.contains(absent), "{flavor:?} leaks {absent}");
        fleet.shutdown().await;
    }
}

#[tokio::test]
async fn lora_adapters_are_listed_limited_and_cost_a_load() {
    let params = EngineParams {
        max_loras: 1,
        lora_load_ms: 400.0,
        step_fixed_us: 1000.0,
        ..Profile::Tiny.params()
    };
    let fleet = start_fleet(FleetConfig {
        params,
        time_scale: 2.0, // a load = 200 ms wall, a step = 0.5 ms
        lora_adapters: vec!["a".into(), "b".into()],
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    let timed = |model: &'static str| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let t0 = Instant::now();
            let (s, v) = post_json(
                &c,
                &format!("{url}/v1/chat/completions"),
                &chat(model, "hi", 1, false),
            )
            .await;
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["model"], model);
            t0.elapsed()
        }
    };
    let load = Duration::from_millis(190);
    assert!(timed("a").await >= load, "first use of a loads it");
    assert!(timed("a").await < load, "a is resident");
    assert_eq!(
        fleet.replica(0).stats().resident_loras,
        vec!["a".to_string()]
    );
    assert!(timed("b").await >= load, "b evicts a (max_loras 1)");
    assert_eq!(
        fleet.replica(0).stats().resident_loras,
        vec!["b".to_string()]
    );
    assert!(
        timed("sim-tiny").await < load,
        "the base model needs no adapter"
    );
    assert_eq!(fleet.replica(0).stats().counters.lora_loads, 2);
    let m = metrics_text(&c, &url).await;
    assert!(m.contains("vllm:lora_requests_info{max_lora=\"1\""), "{m}");
    let (_, _, b) = call(&c, "GET", &format!("{url}/v1/models"), None).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    fleet.shutdown().await;
}

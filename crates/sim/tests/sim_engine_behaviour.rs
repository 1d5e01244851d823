//! The simulator's engine behaviour seen over HTTP: prefix-cache savings match
//! the cost model, TTFT grows with the queue, a full KV cache preempts, metrics
//! agree with the state, and a client disconnect frees the sequence at once.

mod sim_util;

use std::time::{Duration, Instant};

use infergate_sim::{start_fleet, EngineParams, FleetConfig, Profile};
use serde_json::{json, Value};
use sim_util::*;

fn cfg(params: EngineParams, time_scale: f64) -> FleetConfig {
    FleetConfig {
        params,
        time_scale,
        ..FleetConfig::with_profile(Profile::Tiny)
    }
}

/// Sends a streamed chat request; returns (TTFT, events).
async fn timed_stream(
    c: &HttpClient,
    url: &str,
    content: &str,
    max_tokens: u32,
) -> (Duration, Vec<Event>) {
    let mut body = chat("sim-tiny", content, max_tokens, true);
    body["stream_options"] = json!({"include_usage": true});
    let t0 = Instant::now();
    let resp = open_stream(c, &format!("{url}/v1/chat/completions"), &body).await;
    assert_eq!(resp.status(), 200);
    let events = read_events(resp.into_body()).await;
    (events[0].at - t0, events)
}

fn usage(events: &[Event]) -> Value {
    let v: Value = serde_json::from_str(&events[events.len() - 2].data).unwrap();
    v["usage"].clone()
}

#[tokio::test]
async fn repeated_prompt_is_faster_by_the_modelled_prefill_and_reports_cached_tokens() {
    let p = EngineParams {
        max_num_batched_tokens: 4096,
        prefill_us_per_token: 200.0,
        step_fixed_us: 2000.0,
        ..Profile::Tiny.params()
    };
    let scale = 2.0;
    let fleet = start_fleet(cfg(p.clone(), scale)).await.unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    let content = "The quick brown fox jumps over the lazy dog. ".repeat(88); // ~1000 tokens
    let (ttft1, ev1) = timed_stream(&c, &url, &content, 2).await;
    let (ttft2, ev2) = timed_stream(&c, &url, &content, 2).await;
    let (u1, u2) = (usage(&ev1), usage(&ev2));
    assert_eq!(u1["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt = u2["prompt_tokens"].as_u64().unwrap();
    let cached = u2["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // Every full block but the one holding the last prompt token.
    assert_eq!(cached, (prompt - 1) / 16 * 16);
    let predicted = Duration::from_secs_f64(cached as f64 * p.prefill_us_per_token / scale / 1e6);
    let saved = ttft1.saturating_sub(ttft2);
    let err = saved.as_secs_f64() - predicted.as_secs_f64();
    assert!(
        err.abs() < predicted.as_secs_f64() * 0.15 + 0.005,
        "ttft1 {ttft1:?} ttft2 {ttft2:?}: saved {saved:?}, model predicts {predicted:?}"
    );
    let st = fleet.replica(0).stats();
    assert_eq!(st.prefix_cache_hits, cached);
    assert_eq!(st.prefix_cache_queries, 2 * prompt);
    fleet.shutdown().await;
}

#[tokio::test]
async fn ttft_grows_with_queue_length() {
    let p = EngineParams {
        max_num_seqs: 2,
        step_fixed_us: 4000.0,
        ..Profile::Tiny.params()
    };
    let fleet = start_fleet(cfg(p, 1.0)).await.unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            timed_stream(&c, &url, &format!("request {i}"), 10).await.0
        }));
    }
    // While they run, the engine holds 2 and queues 4.
    let r = fleet.replica(0).clone();
    assert!(
        eventually(Duration::from_secs(2), || {
            let s = r.stats();
            s.running == 2 && s.waiting == 4
        })
        .await
    );
    let mut ttft = Vec::new();
    for t in tasks {
        ttft.push(t.await.unwrap());
    }
    ttft.sort();
    // Each pair waits for the previous pair's 10 steps (~40 ms).
    let gap = Duration::from_millis(25);
    assert!(
        ttft[2] > ttft[1] + gap && ttft[4] > ttft[3] + gap,
        "{ttft:?}"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn full_kv_cache_preempts_and_both_requests_still_complete() {
    let p = EngineParams {
        num_gpu_blocks: 10,
        max_num_seqs: 4,
        ..Profile::Tiny.params()
    };
    let fleet = start_fleet(cfg(p, 20.0)).await.unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    // ~45 prompt tokens (3 blocks) growing by 40 tokens: 6 blocks each, 12 > 10.
    let content = "y".repeat(160);
    let a = tokio::spawn({
        let (c, url, content) = (c.clone(), url.clone(), content.clone());
        async move {
            post_json(
                &c,
                &format!("{url}/v1/chat/completions"),
                &chat("sim-tiny", &content, 40, false),
            )
            .await
        }
    });
    let (s2, v2) = post_json(
        &c,
        &format!("{url}/v1/chat/completions"),
        &chat("sim-tiny", &format!("z{content}"), 40, false),
    )
    .await;
    let (s1, v1) = a.await.unwrap();
    assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200));
    assert_eq!(v1["usage"]["completion_tokens"], 40);
    assert_eq!(v2["usage"]["completion_tokens"], 40);
    let st = fleet.replica(0).stats();
    assert!(st.counters.preemptions >= 1, "{st:?}");
    assert_eq!(st.kv_blocks_used, 0);
    let (_, _, m) = call(&c, "GET", &format!("{url}/metrics"), None).await;
    let m = String::from_utf8(m.to_vec()).unwrap();
    assert!(metric(&m, "vllm:num_preemptions_total") >= 1.0, "{m}");
    fleet.shutdown().await;
}

/// The value of the first sample of `name` in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in metrics"))
}

#[tokio::test]
async fn metrics_agree_with_state_and_disconnect_frees_blocks_at_once() {
    let p = EngineParams {
        max_num_seqs: 2,
        step_fixed_us: 5000.0,
        ..Profile::Tiny.params()
    };
    let fleet = start_fleet(cfg(p, 1.0)).await.unwrap();
    let url = fleet.urls()[0].clone();
    let r = fleet.replica(0).clone();
    let c = client();
    let mut bodies = Vec::new();
    for i in 0..4 {
        let resp = open_stream(
            &c,
            &format!("{url}/v1/chat/completions"),
            &chat(
                "sim-tiny",
                &format!("long {i} {}", "w".repeat(100)),
                1000,
                true,
            ),
        )
        .await;
        bodies.push(resp.into_body());
    }
    assert!(eventually(Duration::from_secs(2), || r.stats().running == 2).await);
    let (_, _, m) = call(&c, "GET", &format!("{url}/metrics"), None).await;
    let m = String::from_utf8(m.to_vec()).unwrap();
    let st = r.stats();
    assert_eq!(metric(&m, "vllm:num_requests_running"), 2.0);
    assert_eq!(metric(&m, "vllm:num_requests_waiting"), 2.0);
    assert_eq!((st.running, st.waiting), (2, 2));
    let usage = metric(&m, "vllm:kv_cache_usage_perc");
    assert!(usage > 0.0);
    // Blocks only change at step boundaries (every 5 ms), allow one block of drift.
    let expected = f64::from(st.kv_blocks_used) / f64::from(st.kv_blocks_total);
    assert!(
        (usage - expected).abs() <= 1.0 / f64::from(st.kv_blocks_total) + 1e-9,
        "{usage} vs {expected}"
    );
    assert_eq!(metric(&m, "vllm:gpu_cache_usage_perc"), usage);
    assert!(m.contains("vllm:cache_config_info{block_size=\"16\""));
    assert!(m.contains("num_gpu_blocks=\"256\""));
    assert!(metric(&m, "vllm:prefix_cache_queries_total") > 0.0);

    // Read a token from the first stream, then hang up on all of them.
    use http_body_util::BodyExt;
    let first = bodies[0].frame().await.unwrap().unwrap();
    assert!(first.is_data());
    let dropped_at = Instant::now();
    drop(bodies);
    assert!(
        eventually(Duration::from_secs(2), || {
            let s = r.stats();
            s.requests_aborted == 4
        })
        .await,
        "{:?}",
        r.stats()
    );
    let st = r.stats();
    assert_eq!((st.running, st.waiting, st.kv_blocks_used), (0, 0, 0));
    for at in &st.aborted_at {
        assert!(at.saturating_duration_since(dropped_at) < Duration::from_millis(500));
    }
    let (_, _, m) = call(&c, "GET", &format!("{url}/metrics"), None).await;
    let m = String::from_utf8(m.to_vec()).unwrap();
    assert_eq!(metric(&m, "vllm:num_requests_running"), 0.0);
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc"), 0.0);
    fleet.shutdown().await;
}

#[tokio::test]
async fn non_streaming_disconnect_also_aborts() {
    let p = EngineParams {
        step_fixed_us: 5000.0,
        ..Profile::Tiny.params()
    };
    let fleet = start_fleet(cfg(p, 1.0)).await.unwrap();
    let url = fleet.urls()[0].clone();
    let r = fleet.replica(0).clone();
    let task = tokio::spawn(async move {
        let c = client();
        post_json(
            &c,
            &format!("{url}/v1/chat/completions"),
            &chat("sim-tiny", "wait for me", 1000, false),
        )
        .await
    });
    assert!(eventually(Duration::from_secs(2), || r.stats().running == 1).await);
    task.abort();
    assert!(
        eventually(Duration::from_secs(2), || r.stats().requests_aborted == 1).await,
        "{:?}",
        r.stats()
    );
    assert_eq!(r.stats().kv_blocks_used, 0);
    fleet.shutdown().await;
}

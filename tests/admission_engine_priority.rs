//! Engine-side priority through the real gateway: a simulated vLLM replica
//! run with `--scheduling-policy priority` and a full batch with a queue of
//! standard requests behind it. A critical request reaches its first token
//! sooner when the pool declares `engine_priority: vllm` (the gateway sends
//! the band as the body's `priority`, and the engine, vLLM V1-like, starts
//! it in the first slot that frees, ahead of the four queued before it) than
//! when it does not (the gateway removes any `priority`, so the engine
//! serves it in arrival order). vLLM V1 preempts for a full KV cache only,
//! never for a slot: no preemption either way.

#[path = "admission_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use infergate_sim::{start_fleet, EngineParams, FleetConfig, Profile};
use support::*;

/// Time to the critical request's answer (one token: its TTFT) behind a
/// full batch of standard streams, through a gateway whose pool has
/// `pool_extra` (YAML lines).
async fn critical_ttft(fleet: &infergate_sim::Fleet, pool_extra: &str) -> Duration {
    let gw = gateway(&format!(
        "pools:\n  - name: p\n    endpoints: [{}]\n{pool_extra}routes:\n  - model: m\n    pool: p\n    routing: {{ policy: least_request }}\n",
        urls(fleet)
    ))
    .await;
    let c = client();
    // Two running, four waiting in the engine: 100 tokens each.
    let standard: Vec<_> = (0..6)
        .map(|i| {
            let (c, url) = (c.clone(), gw.url());
            let body = completion("m", &format!("standard {i}"), 100, true);
            tokio::spawn(async move {
                let req = http::Request::post(format!("{url}/v1/completions"))
                    .header("content-type", "application/json")
                    .header("x-infergate-priority", "standard")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                let resp = c.request(req).await.unwrap();
                let s = resp.status();
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                s
            })
        })
        .collect();
    let replica = fleet.replica(0);
    until("the batch is full and four wait", || {
        let s = replica.stats();
        s.running == 2 && s.waiting == 4
    })
    .await;
    let t0 = Instant::now();
    let (s, _, b) = post(
        &c,
        &gw,
        &completion("m", "critical", 1, false),
        &[("x-infergate-priority", "critical")],
    )
    .await;
    let ttft = t0.elapsed();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    for t in standard {
        assert_eq!(t.await.unwrap(), 200);
    }
    ttft
}

#[tokio::test]
async fn a_critical_request_starts_sooner_with_engine_priority() {
    let fleet = start_fleet(FleetConfig {
        params: EngineParams {
            max_num_seqs: 2,
            priority_scheduling: true,
            ..Profile::Tiny.params()
        },
        time_scale: 2.0,
        replicas: 1,
        served_model_name: Some("m".into()),
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    let preemptions = || fleet.replica(0).stats().counters.preemptions;
    let off = critical_ttft(&fleet, "").await;
    assert_eq!(preemptions(), 0, "without engine priority: arrival order");
    let on = critical_ttft(&fleet, "    engine_priority: vllm\n").await;
    assert_eq!(preemptions(), 0, "vLLM V1 does not preempt for a slot");
    eprintln!("critical TTFT behind a full batch: {on:?} with engine priority, {off:?} without");
    assert!(on < off, "with {on:?}, without {off:?}");
}

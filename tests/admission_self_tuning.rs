//! Self-tuning through the real gateway, with the DEFAULT config (no
//! `admission:` section at all): the gateway learns the replica's batch
//! limit from its `/metrics` once the engine shows a queue, caps the replica
//! there (so the engine's own queue stays empty and later requests wait in
//! the gateway's queue, which is ordered by band), and a critical request
//! sent behind a saturating standard load is served ahead of the standard
//! requests already waiting. Before the limit is learned, slow start keeps
//! a flood out of the engine's queue. With engine-side priority, critical
//! requests let a whole batch past the cap (`critical_engine_queue`) all
//! start at once on an engine that preempts for a slot.

#[path = "admission_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use infergate_sim::{start_fleet, EngineParams, FleetConfig, Profile};
use support::*;

fn standard(c: &HttpClient, url: String, i: usize) -> tokio::task::JoinHandle<u16> {
    let c = c.clone();
    tokio::spawn(async move {
        let body = completion("m", &format!("standard {i}"), 60, true);
        let req = http::Request::post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .header("x-infergate-priority", "standard")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
            .await
            .expect("answer within 20 s")
            .unwrap();
        let s = resp.status().as_u16();
        let _ = tokio::time::timeout(
            Duration::from_secs(20),
            http_body_util::BodyExt::collect(resp.into_body()),
        )
        .await;
        s
    })
}

/// One simulated replica running at most 4 sequences at once, scheduling by
/// priority and preempting a lower-ranked running sequence for a slot when
/// `preemptive_priority` (SGLang's priority scheduling, vLLM V0).
async fn batch_of_4(preemptive_priority: bool) -> infergate_sim::Fleet {
    start_fleet(FleetConfig {
        params: EngineParams {
            max_num_seqs: 4,
            priority_scheduling: preemptive_priority,
            priority_preemption: preemptive_priority,
            ..Profile::Tiny.params()
        },
        time_scale: 1.0,
        replicas: 1,
        served_model_name: Some("m".into()),
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap()
}

/// The batch limit the gateway learned for `replica`, if any.
fn learned_batch(replica: &infergate_core::pool::Replica) -> Option<f64> {
    replica
        .signals
        .load()
        .as_ref()
        .and_then(|s| s.saturated_batch)
}

#[tokio::test]
async fn default_config_learns_the_batch_and_serves_critical_first() {
    let fleet = batch_of_4(false).await;
    // The default config: no budget, no reserve, no caps.
    let gw = gateway(&format!(
        "pools:\n  - name: p\n    endpoints: [{}]\nroutes:\n  - model: m\n    pool: p\n",
        urls(&fleet)
    ))
    .await;
    let c = client();
    let r = route(&gw, "m");
    let replica = r.pool.replicas()[0].clone();
    let learned = || learned_batch(&replica);
    until("the first scrape: the slow-start cap", || {
        r.admission.budget.batch(&replica) == Some(4)
    })
    .await;
    assert_eq!(learned(), None, "nothing learned yet");

    // Wave 1: 16 standard streams at once. Slow start lets 4 in, then twice
    // what the engine runs: the engine holds at most 8 (its 4 running and 4
    // queued, not the other 8 of the flood), and the scrapes learn the limit
    // from that queue. The engine's own split between running and waiting is
    // not checked: between two steps it reports a finished batch's
    // successors all as waiting.
    let wave1: Vec<_> = (0..16).map(|i| standard(&c, gw.url(), i)).collect();
    let mut most_in_engine = 0;
    let t0 = Instant::now();
    while learned() != Some(4.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the batch limit is never learned"
        );
        let s = fleet.replica(0).stats();
        most_in_engine = most_in_engine.max(s.running + s.waiting);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(r.admission.budget.batch(&replica), Some(4));
    assert!(
        most_in_engine <= 8,
        "the engine held {most_in_engine} of the flood of 16"
    );
    for t in wave1 {
        assert_eq!(t.await.unwrap(), 200);
    }

    // Wave 2: 12 more. Now the replica is capped at its batch: 4 run, the
    // rest wait at the gateway and the engine's queue stays empty.
    let wave2: Vec<_> = (0..12).map(|i| standard(&c, gw.url(), 100 + i)).collect();
    until("the standard requests wait at the gateway", || {
        queued(&gw, "m") >= 6
    })
    .await;
    // Capped at the learned batch: the engine runs 4 and queues none.
    until("the engine runs its batch and holds no queue", || {
        let s = fleet.replica(0).stats();
        (s.running, s.waiting) == (4, 0)
    })
    .await;
    let waiting_before = queued(&gw, "m");

    // A critical request behind them is served ahead of them: when its answer
    // is complete, standard requests that waited before it still wait.
    let (status, _, body) = post(
        &c,
        &gw,
        &completion("m", "critical", 1, false),
        &[("x-infergate-priority", "critical")],
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let still_waiting = queued(&gw, "m");
    assert!(
        still_waiting > 0 && still_waiting + 4 >= waiting_before,
        "critical overtook the queue: {waiting_before} waited before it, {still_waiting} after its answer"
    );
    for t in wave2 {
        assert_eq!(t.await.unwrap(), 200);
    }
}

/// A streamed completion of `tokens` tokens at band `priority`: when its
/// first byte and its end arrived.
fn timed(
    c: &HttpClient,
    url: String,
    priority: &'static str,
    tokens: u32,
) -> tokio::task::JoinHandle<(Instant, Instant)> {
    let c = c.clone();
    tokio::spawn(async move {
        let body = completion("m", priority, tokens, true);
        let req = http::Request::post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .header("x-infergate-priority", priority)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
            .await
            .expect("answer within 20 s")
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut first = None;
        while let Some(f) = tokio::time::timeout(
            Duration::from_secs(20),
            http_body_util::BodyExt::frame(&mut body),
        )
        .await
        .expect("the stream goes on")
        {
            f.unwrap();
            first.get_or_insert_with(Instant::now);
        }
        (first.expect("a first byte"), Instant::now())
    })
}

#[tokio::test]
async fn a_preempting_engine_with_a_batch_past_the_cap_starts_critical_requests_at_once() {
    let fleet = batch_of_4(true).await;
    // The pool's engines schedule by priority and preempt for a slot
    // (SGLang-like); the default admission config but for the critical
    // engine queue, a whole batch (derived, it is one: vLLM V1 does not
    // preempt for a slot).
    let gw = gateway(&format!(
        "pools:\n  - name: p\n    endpoints: [{}]\n    engine_priority: vllm\nroutes:\n  - model: m\n    pool: p\n    admission:\n      budget: {{ critical_engine_queue: 4 }}\n",
        urls(&fleet)
    ))
    .await;
    let c = client();
    let r = route(&gw, "m");
    let replica = r.pool.replicas()[0].clone();
    // Learn the batch limit from a flood.
    let wave1: Vec<_> = (0..16).map(|i| standard(&c, gw.url(), i)).collect();
    until("the batch limit is learned", || {
        learned_batch(&replica) == Some(4.0)
    })
    .await;
    for t in wave1 {
        assert_eq!(t.await.unwrap(), 200);
    }
    // Long standard streams fill the batch; the rest wait at the gateway.
    let long: Vec<_> = (0..10)
        .map(|_| timed(&c, gw.url(), "standard", 600))
        .collect();
    until("the standard requests wait at the gateway", || {
        queued(&gw, "m") >= 6
    })
    .await;
    until("the engine runs its batch", || {
        fleet.replica(0).stats().running == 4
    })
    .await;
    assert_eq!(r.admission.budget.batch(&replica), Some(4));
    // Four critical streams at once: all four start before the first of
    // them ends. With less than a batch let past the cap, the others would
    // wait at the gateway for a slot (no 600-token standard stream ends
    // meanwhile, so that slot would be a critical one's, after its end).
    let critical: Vec<_> = (0..4)
        .map(|_| timed(&c, gw.url(), "critical", 200))
        .collect();
    let mut times = Vec::new();
    for t in critical {
        times.push(t.await.unwrap());
    }
    let last_first = times.iter().map(|t| t.0).max().unwrap();
    let first_end = times.iter().map(|t| t.1).min().unwrap();
    assert!(
        last_first < first_end,
        "a critical request waited for another to end"
    );
    assert!(fleet.replica(0).stats().counters.preemptions >= 4);
    for t in long {
        t.await.unwrap();
    }
}

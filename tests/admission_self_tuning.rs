//! Self-tuning through the real gateway, with the DEFAULT config (no
//! `admission:` section at all): the gateway learns the replica's batch
//! limit from its `/metrics` once the engine shows a queue, caps the replica
//! there (so the engine's own queue stays empty and later requests wait in
//! the gateway's queue, which is ordered by band), and a critical request
//! sent behind a saturating standard load is served ahead of the standard
//! requests already waiting.

#[path = "admission_support/mod.rs"]
mod support;

use std::time::Duration;

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

#[tokio::test]
async fn default_config_learns_the_batch_and_serves_critical_first() {
    let fleet = start_fleet(FleetConfig {
        params: EngineParams {
            max_num_seqs: 4,
            ..Profile::Tiny.params()
        },
        time_scale: 1.0,
        replicas: 1,
        served_model_name: Some("m".into()),
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    // The default config: no budget, no reserve, no caps.
    let gw = gateway(&format!(
        "pools:\n  - name: p\n    endpoints: [{}]\nroutes:\n  - model: m\n    pool: p\n",
        urls(&fleet)
    ))
    .await;
    let c = client();
    let r = route(&gw, "m");
    let replica = r.pool.replicas()[0].clone();
    assert_eq!(
        r.admission.budget.batch(&replica),
        None,
        "nothing learned yet"
    );

    // Wave 1: 16 standard streams at once. Nothing caps them yet, so the
    // engine runs 4 and queues the rest; the scrapes see that and the
    // gateway learns the limit.
    let wave1: Vec<_> = (0..16).map(|i| standard(&c, gw.url(), i)).collect();
    until("the batch limit is learned", || {
        r.admission.budget.batch(&replica) == Some(4)
    })
    .await;
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

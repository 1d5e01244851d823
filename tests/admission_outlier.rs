//! Outlier ejection and health probes through the real gateway, on simulated
//! replicas: 5xx eject, 4xx never do, a probe brings a healed replica back,
//! and a retry never goes to the replica that just failed.

#[path = "admission_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use infergate_sim::Faults;
use support::*;

async fn setup(replicas: usize) -> (infergate_sim::Fleet, infergate_proxy::ServerHandle) {
    let f = fleet("m", replicas, 20.0).await;
    let gw = gateway(&format!(
        "pools:\n  - name: p\n    endpoints: [{}]\nroutes:\n  - model: m\n    pool: p\n    retries: {{ attempts: 2, on_status: [500, 502, 503] }}\n    admission:\n      outlier: {{ consecutive_failures: 3, base_ejection_ms: 300, probe_interval_ms: 20 }}\n",
        urls(&f)
    ))
    .await;
    (f, gw)
}

#[tokio::test]
async fn client_errors_never_eject() {
    let (f, gw) = setup(1).await;
    let c = client();
    // Longer than the engine's 2048-token context: the replica answers 400.
    let long = completion("m", &"z".repeat(4 * 2100), 4, false);
    for _ in 0..8 {
        let (s, _, b) = post(&c, &gw, &long, &[]).await;
        assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    }
    assert_eq!(f.replica(0).stats().generation_requests, 8);
    assert!(route(&gw, "m").admission.outlier.ejected().is_empty());
    let (s, _, _) = post(&c, &gw, &completion("m", "ok", 2, false), &[]).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn server_errors_eject_and_a_probe_brings_the_replica_back() {
    let (f, gw) = setup(2).await;
    let c = client();
    let bad = f.replica(0);
    bad.set_faults(Faults {
        error_rate: 1.0,
        error_status: Some(500),
        ..Faults::default()
    });
    let r = route(&gw, "m");
    let bad_key: std::sync::Arc<str> = r.pool.replicas()[0].endpoint.key.clone();
    assert_eq!(&*bad_key, bad.url().trim_start_matches("http://"));
    // Every request succeeds (the retry goes to the other replica) until the
    // bad one is ejected after three 5xx in a row.
    let t0 = Instant::now();
    while !r.admission.outlier.is_ejected(&bad_key) {
        assert!(t0.elapsed() < Duration::from_secs(5), "never ejected");
        let (s, h, _) = post(&c, &gw, &completion("m", "x", 2, false), &[]).await;
        assert_eq!(s, 200);
        assert_ne!(h["x-infergate-replica"], &*bad_key);
    }
    assert_eq!(bad.stats().generation_requests, 3);
    // Ejected: no traffic reaches it.
    for _ in 0..10 {
        let (s, _, _) = post(&c, &gw, &completion("m", "x", 2, false), &[]).await;
        assert_eq!(s, 200);
    }
    let during = bad.stats().generation_requests;
    assert_eq!(during, 3);
    // Healed: after the ejection time a probe of /health brings it back.
    bad.set_faults(Faults::default());
    until("probed back", || !r.admission.outlier.is_ejected(&bad_key)).await;
    let t0 = Instant::now();
    while bad.stats().generation_requests == during {
        assert!(t0.elapsed() < Duration::from_secs(5), "never used again");
        let (s, _, _) = post(&c, &gw, &completion("m", "x", 2, false), &[]).await;
        assert_eq!(s, 200);
    }
}

#[tokio::test]
async fn a_retry_never_picks_the_replica_that_just_failed() {
    let (f, gw) = setup(2).await;
    let c = client();
    f.replica(0).set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    let good = f.replica(1).url();
    let good = good.trim_start_matches("http://");
    for _ in 0..6 {
        let (s, h, _) = post(&c, &gw, &completion("m", "x", 2, false), &[]).await;
        assert_eq!(s, 200);
        assert_eq!(h["x-infergate-replica"], good);
    }
}

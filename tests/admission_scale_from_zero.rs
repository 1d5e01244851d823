//! Scale from zero through the real gateway: a pool starts with no replica,
//! requests of every band arrive and wait (none fails), the demand gauges
//! rise; the first simulated replica joins the pool (a discovery update) and
//! the held requests are served in band order; the gauges fall to 0. A
//! request whose deadline passes before any replica is ready gets 503 with
//! `Retry-After`.

#[path = "admission_support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infergate_core::discovery::{Endpoint, Update};
use support::*;

/// The value of `name{pool="p"}` in the gateway's metrics text.
fn gauge(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{pool=\"p\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

#[tokio::test]
async fn a_pool_scales_from_zero_while_requests_wait_in_band_order() {
    // One request at a time on the replica, so completion order is admission order.
    let gw = gateway(
        "pools:\n  - name: p\n    service: { name: none, port: 80 }\nroutes:\n  - model: m\n    pool: p\n    admission:\n      budget: { max_requests_per_replica: 1 }\n",
    )
    .await;
    let c = client();

    // No replica before its deadline: 503 no_ready_replica, Retry-After, after the wait.
    let t0 = Instant::now();
    let (s, h, b) = post(
        &c,
        &gw,
        &completion("m", "late", 2, false),
        &[("x-infergate-deadline-ms", "150")],
    )
    .await;
    assert_eq!(s, 503);
    assert!(h.contains_key("retry-after"));
    assert_eq!(error_of(&b)["code"], "no_ready_replica");
    assert!(t0.elapsed() >= Duration::from_millis(150), "it waited");

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let bands = [
        "sheddable",
        "standard",
        "critical",
        "sheddable",
        "standard",
        "critical",
    ];
    for (i, band) in bands.into_iter().enumerate() {
        let (c, order) = (c.clone(), order.clone());
        let gw_url = gw.url();
        let body = completion("m", band, 4, false);
        tasks.push(tokio::spawn(async move {
            let req = http::Request::post(format!("{gw_url}/v1/completions"))
                .header("content-type", "application/json")
                .header("x-infergate-priority", band)
                .header("x-infergate-deadline-ms", "20000")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            let s = resp.status();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            order.lock().unwrap().push(band);
            s
        }));
        until("held", || queued(&gw, "m") == i + 1).await;
    }
    let m = metrics(&c, &gw).await;
    assert_eq!(gauge(&m, "infergate_admission_queue_depth"), 6.0);
    assert_eq!(gauge(&m, "infergate_admission_waiting_for_replica"), 6.0);
    assert!(gauge(&m, "infergate_admission_queue_tokens") >= 6.0 * 4.0);

    // The first replica starts and joins the pool.
    let f = fleet("m", 1, 5.0).await;
    let r = route(&gw, "m");
    r.pool
        .apply(Update::Add(vec![Endpoint::from_url(&f.urls()[0]).unwrap()]));
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "none fails within its deadline");
    }
    assert_eq!(
        *order.lock().unwrap(),
        vec![
            "critical",
            "critical",
            "standard",
            "standard",
            "sheddable",
            "sheddable"
        ]
    );
    let m = metrics(&c, &gw).await;
    assert_eq!(gauge(&m, "infergate_admission_queue_depth"), 0.0);
    assert_eq!(gauge(&m, "infergate_admission_waiting_for_replica"), 0.0);
    assert_eq!(gauge(&m, "infergate_admission_queue_tokens"), 0.0);
    drop(f);
}

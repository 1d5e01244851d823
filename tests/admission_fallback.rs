//! Fallback to a smaller model through the real gateway, on simulated
//! replicas: each trigger, the response's model field and headers, the
//! metric, and the header that forbids it.

#[path = "admission_support/mod.rs"]
mod support;

use infergate_sim::Faults;
use support::*;

/// Route `big` over `big_pool` (YAML of the pool's source), falling back to
/// `small` served by a healthy simulated replica.
async fn setup(
    big_pool: &str,
    admission: &str,
) -> (infergate_sim::Fleet, infergate_proxy::ServerHandle) {
    let small = fleet("small", 1, 20.0).await;
    let gw = gateway(&format!(
        "pools:\n  - name: big\n    {big_pool}\n  - name: small\n    endpoints: [{}]\nroutes:\n  - model: big\n    pool: big\n    admission:\n      fallback: {{ models: [small] }}\n{admission}\n  - model: small\n    pool: small\n",
        urls(&small)
    ))
    .await;
    (small, gw)
}

fn served_by_small(status: http::StatusCode, h: &http::HeaderMap, body: &[u8], reason: &str) {
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(body));
    assert_eq!(h["x-infergate-served-model"], "small");
    assert_eq!(h["x-infergate-fallback-reason"], reason);
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["model"], "small", "{v}");
}

async fn fallback_metric(c: &HttpClient, gw: &infergate_proxy::ServerHandle, reason: &str) -> bool {
    metrics(c, gw).await.lines().any(|l| {
        l.starts_with("infergate_fallbacks_total")
            && l.contains(&format!("reason=\"{reason}\""))
            && l.contains("to=\"small\"")
    })
}

#[tokio::test]
async fn no_ready_replica_falls_back_unless_forbidden() {
    let (_small, gw) = setup("service: { name: none, port: 80 }", "").await;
    let c = client();
    let (s, h, b) = post(&c, &gw, &completion("big", "hi", 3, false), &[]).await;
    served_by_small(s, &h, &b, "no_ready_replica");
    assert!(fallback_metric(&c, &gw, "no_ready_replica").await);

    let (s, h, b) = post(
        &c,
        &gw,
        &completion("big", "hi", 3, false),
        // Without a fallback it waits for a replica (scale from zero) until
        // its deadline.
        &[
            ("x-infergate-no-fallback", "true"),
            ("x-infergate-deadline-ms", "100"),
        ],
    )
    .await;
    assert_eq!(s, 503);
    assert!(h.contains_key("retry-after"));
    assert_eq!(error_of(&b)["code"], "no_ready_replica");
}

#[tokio::test]
async fn a_request_that_would_wait_past_its_deadline_falls_back() {
    let big = fleet("big", 1, 1.0).await;
    let (_small, gw) = setup(
        &format!("endpoints: [{}]", urls(&big)),
        "      budget: { max_requests_per_replica: 1 }",
    )
    .await;
    let c = client();
    let held = hold(&c, &gw, "big", 2000).await;
    let (s, h, b) = post(
        &c,
        &gw,
        &completion("big", "hi", 3, false),
        &[("x-infergate-deadline-ms", "100")],
    )
    .await;
    served_by_small(s, &h, &b, "queue_deadline");
    assert!(fallback_metric(&c, &gw, "queue_deadline").await);
    // Forbidden: the deadline gives 503.
    let (s, _, b) = post(
        &c,
        &gw,
        &completion("big", "hi", 3, false),
        &[
            ("x-infergate-deadline-ms", "50"),
            ("x-infergate-no-fallback", "1"),
        ],
    )
    .await;
    assert_eq!(s, 503);
    assert_eq!(error_of(&b)["code"], "queue_deadline");
    held.abort();
}

#[tokio::test]
async fn every_attempt_failing_before_the_first_byte_falls_back() {
    let big = fleet("big", 2, 20.0).await;
    for r in big.replicas() {
        r.set_faults(Faults {
            error_rate: 1.0,
            error_status: Some(503),
            ..Faults::default()
        });
    }
    let (_small, gw) = setup(&format!("endpoints: [{}]", urls(&big)), "").await;
    let c = client();
    let (s, h, b) = post(&c, &gw, &completion("big", "hi", 3, false), &[]).await;
    served_by_small(s, &h, &b, "upstream_failure");
    assert!(fallback_metric(&c, &gw, "upstream_failure").await);
    // Both big replicas were tried before falling back.
    let tried: u64 = big
        .replicas()
        .iter()
        .map(|r| r.stats().generation_requests)
        .sum();
    assert_eq!(tried, 2);
    // Forbidden: the replica's own error comes back.
    let (s, _, _) = post(
        &c,
        &gw,
        &completion("big", "hi", 3, false),
        // Without a fallback it waits for a replica (scale from zero) until
        // its deadline.
        &[
            ("x-infergate-no-fallback", "true"),
            ("x-infergate-deadline-ms", "100"),
        ],
    )
    .await;
    assert_eq!(s, 503);
}

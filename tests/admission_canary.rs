//! Canary splits through the real gateway, on simulated replicas: the share
//! follows the weight, each user sticks to one side, a header forces a side,
//! a failing canary is rolled back, and a canary set at run time applies.

#[path = "admission_support/mod.rs"]
mod support;

use std::collections::HashMap;

use futures::StreamExt;

use infergate_sim::Faults;
use support::*;

/// Route `m` over pool `stable`, with a canary of `weight`% on pool `canary`
/// whose replicas serve model `m-v2`.
async fn setup(
    weight: u32,
    rollback: &str,
) -> (
    infergate_sim::Fleet,
    infergate_sim::Fleet,
    infergate_proxy::ServerHandle,
) {
    let stable = fleet("m", 2, 50.0).await;
    let canary = fleet("m-v2", 1, 50.0).await;
    let gw = gateway(&format!(
        "pools:\n  - name: stable\n    endpoints: [{}]\n  - name: canary\n    endpoints: [{}]\n\
routes:\n  - model: m\n    pool: stable\n    admission:\n      canary: {{ pool: canary, model: m-v2, weight: {weight}{rollback} }}\n",
        urls(&stable),
        urls(&canary)
    ))
    .await;
    (stable, canary, gw)
}

#[tokio::test]
async fn shares_follow_the_weight_and_users_stick_to_their_side() {
    // Rollback off: this test is about the split itself. With rollback on, a
    // loaded machine can make the one-replica canary's p90 TTFT look worse than
    // the stable side's and roll it back mid-test (tested separately below).
    let (_s, _c, gw) = setup(10, ", rollback: { enabled: false }").await;
    let c = client();
    // 10,000 requests: 2,000 users x 5 requests, 32 at a time.
    let users = 2000;
    let per_user = 5;
    let mut sides: HashMap<usize, Vec<String>> = HashMap::new();
    let jobs = (0..per_user).flat_map(|_| 0..users);
    let results: Vec<(usize, String)> = futures::stream::iter(jobs)
        .map(|u| {
            let (c, gw_url) = (c.clone(), gw.url());
            async move {
                let body = serde_json::json!({"model": "m", "prompt": "hi", "max_tokens": 1, "user": format!("user-{u}")}).to_string();
                let req = http::Request::post(format!("{gw_url}/v1/completions"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                let resp = c.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                let side = resp.headers()["x-infergate-canary-side"].to_str().unwrap().to_string();
                let model = resp.headers()["x-infergate-served-model"].to_str().unwrap().to_string();
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                assert_eq!(model, if side == "canary" { "m-v2" } else { "m" });
                (u, side)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for (u, side) in results {
        sides.entry(u).or_default().push(side);
    }
    let total: usize = sides.values().map(Vec::len).sum();
    assert_eq!(total, users * per_user);
    let canary = sides.values().flatten().filter(|s| *s == "canary").count();
    let share = canary as f64 / total as f64;
    eprintln!("canary share over {total} requests: {share:.4}");
    assert!((share - 0.10).abs() <= 0.02, "canary share {share}");
    // Stickiness: every user saw one side only.
    for (u, s) in &sides {
        assert!(
            s.iter().all(|x| *x == s[0]),
            "user {u} switched sides: {s:?}"
        );
    }
}

#[tokio::test]
async fn a_header_forces_a_side() {
    let (_s, _c, gw) = setup(0, "").await;
    let c = client();
    let body = completion("m", "hi", 1, false);
    let (s, h, _) = post(&c, &gw, &body, &[("x-infergate-canary", "canary")]).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-infergate-canary-side"], "canary");
    assert_eq!(h["x-infergate-served-model"], "m-v2");
    let (_, h, _) = post(&c, &gw, &body, &[]).await;
    assert_eq!(h["x-infergate-canary-side"], "stable");
}

#[tokio::test]
async fn a_canary_identical_to_stable_is_not_rolled_back() {
    // The same simulator profile on both sides, 30% of users on the canary
    // (one replica against stable's two), default verdict rules but a short
    // warm-up: its cold start and the noise of a loaded machine must not
    // count as a regression.
    let (_s, _c, gw) = setup(30, ", rollback: { warmup_secs: 1 }").await;
    let c = client();
    let split = gw.gateway.canary("m").unwrap();
    let t0 = std::time::Instant::now();
    let mut canary = 0;
    // 32 at a time, a round every 5 ms or so, for 3.5 s (judged once a
    // second after the 1 s warm-up), bounded by 1,000 rounds.
    for round in 0..1000 {
        if t0.elapsed() > std::time::Duration::from_millis(3500) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let answers = futures::future::join_all((0..32).map(|i| {
            let user = format!("user-{}", (round * 32 + i) % 500);
            let body = serde_json::json!({"model": "m", "prompt": format!("{user} says hi"), "max_tokens": 4, "user": user}).to_string();
            let c = c.clone();
            let gw = &gw;
            async move { post(&c, gw, &body, &[]).await }
        }))
        .await;
        for (s, h, _) in answers {
            assert_eq!(s, 200);
            canary += usize::from(h["x-infergate-canary-side"] == "canary");
        }
    }
    assert!(canary >= 100, "only {canary} canary requests");
    // A verdict was reached on enough samples, and it was "keep".
    let (stable, judged) = split.judged();
    assert!(
        judged >= 50,
        "judged on {judged} canary requests ({stable} stable)"
    );

    assert_eq!(split.rolled_back(), None);
    assert_eq!(split.effective_weight(), 30.0);
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back_and_stays_until_the_config_changes() {
    let (_s, canary, gw) = setup(
        50,
        " , rollback: { min_requests: 20, window_secs: 60, warmup_secs: 0, warmup_requests: 0 } }\n      outlier: { base_ejection_ms: 50, probe_interval_ms: 20 ",
    )
    .await;
    canary.replica(0).set_faults(Faults {
        error_rate: 1.0,
        error_status: Some(500),
        ..Faults::default()
    });
    let c = client();
    let split = gw.gateway.canary("m").unwrap();
    // Judged once a second: keep sending until then (bounded in time).
    let (mut n, t0) = (0, std::time::Instant::now());
    while split.rolled_back().is_none() {
        n += 1;
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "never rolled back"
        );
        let body = serde_json::json!({"model": "m", "prompt": "hi", "max_tokens": 1, "user": format!("u{n}")}).to_string();
        post(&c, &gw, &body, &[]).await;
    }
    let why = split.rolled_back().unwrap();
    assert!(why.starts_with("errors: "), "{why}");
    assert!(
        why.contains("vs stable 0.0% (n="),
        "both sides' figures: {why}"
    );
    assert_eq!(split.effective_weight(), 0.0);
    // Every user now goes to stable.
    for u in 0..100 {
        let body = serde_json::json!({"model": "m", "prompt": "hi", "max_tokens": 1, "user": format!("u{u}")}).to_string();
        let (s, h, _) = post(&c, &gw, &body, &[]).await;
        assert_eq!(s, 200);
        assert_eq!(h["x-infergate-canary-side"], "stable");
    }
    let m = metrics(&c, &gw).await;
    assert!(
        m.lines().any(|l| l.starts_with("infergate_canary_rollbacks_total") && l.contains("route=\"m\"")),
        "{m}"
    );
    // A reload with the same config keeps it rolled back; a new config (set
    // at run time, as the Kubernetes controller does) starts afresh.
    gw.gateway
        .apply_config(infergate_core::config::Config::clone(&gw.gateway.config()))
        .unwrap();
    assert!(split.rolled_back().is_some());
    let mut cfg = split.config().unwrap();
    cfg.weight = 100.0;
    let mut config = infergate_core::config::Config::clone(&gw.gateway.config());
    let route = config.routes.iter_mut().find(|r| r.model == "m").unwrap();
    route.admission.canary = Some(cfg);
    gw.gateway.apply_config(config).unwrap();
    assert!(split.rolled_back().is_none());
    // The failing canary replica was also ejected (its users are served by
    // stable meanwhile); once healthy, a probe brings it back.
    canary.replica(0).set_faults(Faults::default());
    let t0 = std::time::Instant::now();
    loop {
        let (s, h, _) = post(&c, &gw, &completion("m", "hi", 1, false), &[]).await;
        assert_eq!(s, 200);
        if h["x-infergate-canary-side"] == "canary" {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 5,
            "the canary replica never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

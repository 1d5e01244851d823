//! Token budgets and the per-pool queue through the real gateway, on
//! simulated replicas: estimates corrected by the stream, priority order,
//! shedding, deadlines, disconnects and fairness between tenants.

#[path = "admission_support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// One replica that runs one request at a time (so admission order is
/// completion order), `m` served by it.
/// One request at a time per replica, every waiter in the gateway's queue
/// (no critical request in the engine's: self-tuning would allow one).
async fn one_at_a_time(
    time_scale: f64,
    extra: &str,
) -> (infergate_sim::Fleet, infergate_proxy::ServerHandle) {
    let f = fleet("m", 1, time_scale).await;
    let gw = gateway(&format!(
        "pools:\n  - name: p\n    endpoints: [{}]\nroutes:\n  - model: m\n    pool: p\n    admission:\n      budget: {{ max_requests_per_replica: 1, critical_engine_queue: 0 }}\n{extra}",
        urls(&f)
    ))
    .await;
    (f, gw)
}

#[tokio::test]
async fn reservation_follows_the_stream_and_is_released() {
    // Real time: 2 ms per token, so the stream is observable mid-way.
    let f = fleet("m", 1, 1.0).await;
    let gw = gateway(&format!(
        "pools:\n  - name: p\n    endpoints: [{}]\nroutes:\n  - model: m\n    pool: p\n    default_max_tokens: 4\n    usage: {{ include_usage: true }}",
        urls(&f)
    ))
    .await;
    let c = client();
    let r = route(&gw, "m");
    let replica = r.pool.replicas()[0].clone();
    // No max_tokens: estimated at the route's 4, but the engine writes 200
    // (its own default is 256; max_tokens is what the sim generates).
    let prompt = "x".repeat(400); // 100 tokens
    let body = serde_json::json!({"model": "m", "prompt": prompt, "stream": true}).to_string();
    let task = {
        let (c, url) = (c.clone(), gw.url());
        tokio::spawn(async move {
            let req = http::Request::post(format!("{url}/v1/completions"))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes()
        })
    };
    until("admitted at the estimate", || replica.load.tokens() == 104).await;
    until("grown past the estimate as tokens stream", || {
        replica.load.tokens() > 104 + 10
    })
    .await;
    let out = task.await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("\"usage\""), "{text}");
    until("released at the end", || replica.load.tokens() == 0).await;
    assert_eq!(replica.load.requests(), 0);
    drop(f);
}

#[tokio::test]
async fn queue_releases_critical_then_standard_and_sheds_sheddable() {
    let (_f, gw) = one_at_a_time(5.0, "").await;
    let c = client();
    let held = hold(&c, &gw, "m", 1500).await;

    // Saturated: sheddable is refused at once, with Retry-After and JSON.
    let t0 = Instant::now();
    let (s, h, b) = post(
        &c,
        &gw,
        &completion("m", "s", 2, false),
        &[("x-gateway-inference-objective", "-1")],
    )
    .await;
    let shed_time = t0.elapsed();
    assert_eq!(s, 429);
    assert!(h.contains_key("retry-after"));
    assert_eq!(error_of(&b)["code"], "shed");
    assert!(shed_time < Duration::from_secs(1), "{shed_time:?}");

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, (prio, label)) in [("standard", "standard"), ("critical", "critical")]
        .into_iter()
        .enumerate()
    {
        let (c, gw_url, order) = (c.clone(), gw.url(), order.clone());
        let body = completion("m", label, 4, false);
        tasks.push(tokio::spawn(async move {
            let req = http::Request::post(format!("{gw_url}/v1/completions"))
                .header("content-type", "application/json")
                .header("x-infergate-priority", prio)
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            let s = resp.status();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            order.lock().unwrap().push(label);
            s
        }));
        until("queued", || queued(&gw, "m") == i + 1).await;
    }
    assert_eq!(held.await.unwrap(), 200);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(*order.lock().unwrap(), vec!["critical", "standard"]);
    let m = metrics(&c, &gw).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("infergate_admission_rejected_total")
                && l.contains("reason=\"shed\"")),
        "{m}"
    );
}

#[tokio::test]
async fn a_queued_sheddable_goes_after_standard_when_configured() {
    let (_f, gw) = one_at_a_time(5.0, "      queue: { shed_sheddable: false }").await;
    let c = client();
    let held = hold(&c, &gw, "m", 1500).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, prio) in ["sheddable", "standard", "critical"]
        .into_iter()
        .enumerate()
    {
        let (c, gw_url, order) = (c.clone(), gw.url(), order.clone());
        let body = completion("m", prio, 4, false);
        tasks.push(tokio::spawn(async move {
            let req = http::Request::post(format!("{gw_url}/v1/completions"))
                .header("content-type", "application/json")
                .header("x-gateway-inference-objective", prio)
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            order.lock().unwrap().push(prio);
        }));
        until("queued", || queued(&gw, "m") == i + 1).await;
    }
    held.await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        vec!["critical", "standard", "sheddable"]
    );
}

#[tokio::test]
async fn a_deadline_passed_in_the_queue_gives_503_and_a_disconnect_leaves_at_once() {
    // Real time: the holding stream lasts about 4 s; it is cut at the end.
    let (_f, gw) = one_at_a_time(1.0, "").await;
    let c = client();
    let held = hold(&c, &gw, "m", 2000).await;

    let t0 = Instant::now();
    let (s, h, b) = post(
        &c,
        &gw,
        &completion("m", "d", 2, false),
        &[("x-infergate-deadline-ms", "80")],
    )
    .await;
    assert_eq!(s, 503);
    assert!(t0.elapsed() >= Duration::from_millis(80));
    assert_eq!(h["retry-after"], "1");
    assert_eq!(error_of(&b)["code"], "queue_deadline");
    assert_eq!(queued(&gw, "m"), 0);

    // A client that goes away leaves the queue at once.
    let (c2, url) = (c.clone(), gw.url());
    let waiting = tokio::spawn(async move {
        let req = http::Request::post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(completion(
                "m", "w", 2, false,
            ))))
            .unwrap();
        let _ = c2.request(req).await;
    });
    until("queued", || queued(&gw, "m") == 1).await;
    waiting.abort();
    let t0 = Instant::now();
    until("left the queue", || queued(&gw, "m") == 0).await;
    assert!(t0.elapsed() < Duration::from_millis(500));
    held.abort();
}

#[tokio::test]
async fn tenants_in_one_band_get_equal_token_shares() {
    // Tenant "big" sends 100-token prompts, "small" 10-token ones (10 output
    // tokens each); eight workers each keep both backlogged. Fair by tokens,
    // each gets about half the tokens (request-fair would give big ~77%).
    let (_f, gw) = one_at_a_time(20.0, "").await;
    let c = client();
    let served: Arc<Mutex<[u64; 2]>> = Arc::default();
    let stop = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (tenant, prompt_chars, idx) = if w % 2 == 0 {
            ("big", 400, 0)
        } else {
            ("small", 40, 1)
        };
        let (c, gw_url, served) = (c.clone(), gw.url(), served.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u32;
            while Instant::now() < stop && n < 500 {
                n += 1;
                let body = completion("m", &"y".repeat(prompt_chars), 10, false);
                let req = http::Request::post(format!("{gw_url}/v1/completions"))
                    .header("content-type", "application/json")
                    .header("x-gateway-inference-fairness-id", tenant)
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                let resp = c.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                if Instant::now() < stop {
                    served.lock().unwrap()[idx] += (prompt_chars / 4) as u64 + 10;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let [big, small] = *served.lock().unwrap();
    let share = big as f64 / (big + small) as f64;
    eprintln!("token shares: big {big}, small {small}, big's share {share:.3}");
    assert!(
        big + small > 1000,
        "too little traffic to judge: {big} + {small}"
    );
    assert!(
        (share - 0.5).abs() <= 0.05,
        "big's token share {share:.3} ({big} vs {small})"
    );
}

#[tokio::test]
async fn a_critical_request_may_go_past_the_request_cap_while_others_wait_at_the_gateway() {
    let f = fleet("m", 1, 5.0).await;
    let gw = gateway(&format!(
        "pools:\n  - name: p\n    endpoints: [{}]\nroutes:\n  - model: m\n    pool: p\n    admission:\n      budget: {{ max_requests_per_replica: 1, critical_engine_queue: 1 }}\n",
        urls(&f)
    ))
    .await;
    let c = client();
    let replica = route(&gw, "m").pool.replicas()[0].clone();
    let send = |prio: &'static str, max_tokens: u32| {
        let (c, url) = (c.clone(), gw.url());
        tokio::spawn(async move {
            let req = http::Request::post(format!("{url}/v1/completions"))
                .header("content-type", "application/json")
                .header("x-infergate-priority", prio)
                .body(http_body_util::Full::new(bytes::Bytes::from(completion(
                    "m", prio, max_tokens, true,
                ))))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            let s = resp.status();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            (s, Instant::now())
        })
    };
    // The replica's one slot is taken by a long standard stream.
    let held = hold(&c, &gw, "m", 1500).await;
    let standard = send("standard", 2);
    until("standard waits at the gateway", || queued(&gw, "m") == 1).await;
    // A critical request still goes to the replica (the engine's own queue).
    let critical_long = send("critical", 1500);
    until("critical goes past the cap", || {
        replica.load.requests() == 2
    })
    .await;
    assert_eq!(queued(&gw, "m"), 1, "only the standard request is queued");
    // ... but only `critical_engine_queue` of them.
    let critical = send("critical", 2);
    until("the next critical waits at the gateway", || {
        queued(&gw, "m") == 2
    })
    .await;
    assert_eq!(replica.load.requests(), 2, "the excess is bounded");
    let (s_held, t_held) = (held.await.unwrap(), Instant::now());
    let (s_long, _) = critical_long.await.unwrap();
    let (s_crit, t_crit) = critical.await.unwrap();
    let (s_std, t_std) = standard.await.unwrap();
    assert_eq!(
        [s_held, s_long, s_crit, s_std].map(|s| s.as_u16()),
        [200; 4]
    );
    assert!(t_crit <= t_std, "the queued critical goes before standard");
    assert!(t_held <= t_std);
    drop(f);
}

/// The per-replica connection bound is admission capacity: streams beyond it
/// wait in the pool's queue (its gauge shows them) and are then served, or
/// are refused 429 `queue_full` once the queue is full (counted); none waits
/// for an upstream connection where admission cannot see it.
#[tokio::test]
async fn streams_beyond_the_connection_bound_are_queued_or_refused_by_admission() {
    let f = fleet("m", 1, 5.0).await;
    // A pool name of its own: the metrics are process-wide, the other tests use `p`.
    let gw = gateway(&format!(
        "pools:\n  - name: connbound\n    endpoints: [{}]\nroutes:\n  - model: m\n    pool: connbound\n    admission:\n      budget: {{ max_connections_per_replica: 3, tokens_per_replica: 1000000 }}\n      queue: {{ max_requests: 4 }}\n",
        urls(&f)
    ))
    .await;
    let c = client();
    let replica = route(&gw, "m").pool.replicas()[0].clone();
    // Three long streams hold the bound (about 300 ms each at this time scale).
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(hold(&c, &gw, "m", 1500).await);
    }
    // Four more wait in admission's queue, not for a connection.
    let mut queued_streams = Vec::new();
    for i in 0..4 {
        let (c, gw_url) = (c.clone(), gw.url());
        let body = completion("m", "beyond", 8, true);
        queued_streams.push(tokio::spawn(async move {
            let req = http::Request::post(format!("{gw_url}/v1/completions"))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            let s = resp.status();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            s
        }));
        until("queued by admission", || queued(&gw, "m") == i + 1).await;
    }
    assert_eq!(replica.load.requests(), 3, "the bound holds in flight");
    assert!(f.replica(0).stats().running + f.replica(0).stats().waiting <= 3);
    let m = metrics(&c, &gw).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("infergate_admission_queue_depth{pool=\"connbound\"} 4")),
        "{m}"
    );
    // The queue is full: the next two are refused at once, with JSON and Retry-After.
    for _ in 0..2 {
        let (s, h, b) = post(&c, &gw, &completion("m", "refused", 8, true), &[]).await;
        assert_eq!(s, 429);
        assert!(h.contains_key("retry-after"));
        assert_eq!(error_of(&b)["code"], "queue_full");
    }
    let m = metrics(&c, &gw).await;
    assert!(
        m.lines().any(|l| l.starts_with(
            "infergate_admission_rejected_total{pool=\"connbound\",reason=\"queue_full\"} 2"
        )),
        "{m}"
    );
    // Everything admitted is served; nothing waited for a connection unseen.
    for t in held.into_iter().chain(queued_streams) {
        assert_eq!(t.await.unwrap(), 200);
    }
    until("released", || {
        replica.load.requests() == 0 && queued(&gw, "m") == 0
    })
    .await;
    let m = metrics(&c, &gw).await;
    assert!(
        !m.contains("infergate_upstream_connection_waits_total"),
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l
                .starts_with("infergate_admission_queue_wait_seconds_count{pool=\"connbound\"")),
        "{m}"
    );
}

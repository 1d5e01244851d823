//! Every fault the simulator injects does what it says, whether set by config
//! (the CLI flags map onto it), through `ReplicaHandle`, or through the admin
//! endpoint at run time.

mod sim_util;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use infergate_sim::{start_fleet, Faults, FleetConfig, Profile};
use serde_json::{json, Value};
use sim_util::*;

fn tiny(faults: Faults) -> FleetConfig {
    FleetConfig {
        faults,
        time_scale: 10.0,
        ..FleetConfig::with_profile(Profile::Tiny)
    }
}

fn chat_url(url: &str) -> String {
    format!("{url}/v1/chat/completions")
}

#[tokio::test]
async fn error_rate_and_429_rate() {
    let fleet = start_fleet(tiny(Faults {
        error_rate: 1.0,
        ..Faults::default()
    }))
    .await
    .unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    let (s, v) = post_json(&c, &chat_url(&url), &chat("sim-tiny", "x", 1, false)).await;
    assert_eq!(s, 500);
    assert!(v["error"]["message"].is_string());
    fleet.replica(0).set_faults(Faults {
        error_rate: 1.0,
        error_status: Some(503),
        ..Faults::default()
    });
    let (s, _) = post_json(&c, &chat_url(&url), &chat("sim-tiny", "x", 1, false)).await;
    assert_eq!(s, 503);
    fleet.replica(0).set_faults(Faults {
        rate_limit_rate: 1.0,
        ..Faults::default()
    });
    let (s, h, b) = call(
        &c,
        "POST",
        &chat_url(&url),
        Some(&chat("sim-tiny", "x", 1, true)),
    )
    .await;
    assert_eq!(s, 429);
    assert_eq!(h["retry-after"], "1");
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["error"]["type"],
        "rate_limit_error"
    );
    // A rate of one half errs on some requests and not others.
    fleet.replica(0).set_faults(Faults {
        error_rate: 0.5,
        ..Faults::default()
    });
    let mut codes = Vec::new();
    for _ in 0..40 {
        codes.push(
            post_json(&c, &chat_url(&url), &chat("sim-tiny", "x", 1, false))
                .await
                .0
                .as_u16(),
        );
    }
    let errs = codes.iter().filter(|c| **c == 500).count();
    assert!((5..=35).contains(&errs), "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 40 - errs);
    fleet.shutdown().await;
}

#[tokio::test]
async fn stalls_pause_a_stream_mid_way() {
    // 2 tokens, then a 300 ms (modelled; 30 ms wall at scale 10) pause.
    let faults = Faults {
        stall_rate: 1.0,
        stall_after_tokens: 2,
        stall_ms: 300,
        ..Faults::default()
    };
    let fleet = start_fleet(tiny(faults)).await.unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    let resp = open_stream(&c, &chat_url(&url), &chat("sim-tiny", "x", 5, true)).await;
    let events = read_events(resp.into_body()).await;
    // role+token0 arrive together, token1, then the stall before token2.
    let tokens: Vec<&Event> = events
        .iter()
        .filter(|e| e.data.contains("\"content\":\" "))
        .collect();
    assert_eq!(tokens.len(), 5);
    let gap = tokens[2].at - tokens[1].at;
    assert!(gap >= Duration::from_millis(25), "gap {gap:?}");
    assert_eq!(events.last().unwrap().data, "[DONE]");

    // stall_ms 0 = forever: nothing after the 1st token; hanging up aborts the sequence.
    fleet.replica(0).set_faults(Faults {
        stall_rate: 1.0,
        stall_after_tokens: 1,
        stall_ms: 0,
        ..Faults::default()
    });
    let resp = open_stream(&c, &chat_url(&url), &chat("sim-tiny", "x", 2000, true)).await;
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(std::str::from_utf8(&first).unwrap().contains("\"content\""));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), body.frame())
            .await
            .is_err(),
        "stream should stall"
    );
    drop(body);
    let r = fleet.replica(0).clone();
    assert!(eventually(Duration::from_secs(2), || r.stats().requests_aborted == 1).await);
    fleet.shutdown().await;
}

async fn connect_refused(url: &str) -> bool {
    let addr = url.trim_start_matches("http://");
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn crash_after_n_requests_cuts_connections_and_closes_the_port() {
    let fleet = start_fleet(tiny(Faults {
        crash_after: Some(3),
        ..Faults::default()
    }))
    .await
    .unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    // A long stream in flight when the crash comes is cut off.
    let resp = open_stream(&c, &chat_url(&url), &chat("sim-tiny", "x", 1000, true)).await;
    let mut stream = resp.into_body();
    let (s, _) = post_json(&c, &chat_url(&url), &chat("sim-tiny", "x", 1, false)).await;
    assert_eq!(s, 200);
    // The 3rd generation request: no response at all.
    let third = c
        .request(request(
            "POST",
            &chat_url(&url),
            Some(&chat("sim-tiny", "x", 1, false)),
            &[],
        ))
        .await;
    assert!(third.is_err(), "crashing request must not get a response");
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.frame().await {
                Some(Ok(_)) => continue,
                other => return other.is_some(), // Some(Err) = cut mid-stream
            }
        }
    })
    .await
    .unwrap();
    assert!(cut, "stream in flight must be cut, not ended cleanly");
    assert!(connect_refused(&url).await);
    assert!(fleet.replica(0).stats().crashed);
    fleet.replica(0).restart();
    let r = fleet.replica(0).clone();
    assert!(eventually(Duration::from_secs(2), || !r.stats().crashed).await);
    let c = client();
    let mut ok = false;
    for _ in 0..100 {
        if !connect_refused(&url).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok);
    let (s, _) = post_json(&c, &chat_url(&url), &chat("sim-tiny", "x", 1, false)).await;
    assert_eq!(s, 200);
    fleet.shutdown().await;
}

#[tokio::test]
async fn refusing_connections_and_model_load_delay() {
    let fleet = start_fleet(tiny(Faults {
        refuse_connections: true,
        ..Faults::default()
    }))
    .await
    .unwrap();
    let url = fleet.urls()[0].clone();
    let r = fleet.replica(0).clone();
    let mut refused = false;
    for _ in 0..100 {
        if connect_refused(&url).await {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(refused);
    // Clear refusal but start a model load of 3 s modelled (300 ms wall).
    r.set_faults(Faults {
        load_delay_ms: 3000,
        ..Faults::default()
    });
    let c = client();
    let mut first_ok = None;
    let t0 = Instant::now();
    let mut saw_503 = false;
    while t0.elapsed() < Duration::from_secs(3) {
        if connect_refused(&url).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let (s, _, _) = call(&c, "GET", &format!("{url}/health"), None).await;
        match s.as_u16() {
            503 => {
                saw_503 = true;
                let (g, _) = post_json(&c, &chat_url(&url), &chat("sim-tiny", "x", 1, false)).await;
                if t0.elapsed() < Duration::from_millis(250) {
                    assert_eq!(g, 503, "generation is refused while loading");
                }
            }
            200 => {
                first_ok = Some(t0.elapsed());
                break;
            }
            other => panic!("health answered {other}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_503);
    let ok_after = first_ok.expect("healthy after the load delay");
    assert!(ok_after >= Duration::from_millis(290), "{ok_after:?}");
    fleet.shutdown().await;
}

#[tokio::test]
async fn admin_endpoint_sets_faults_at_run_time() {
    let fleet = start_fleet(tiny(Faults::default())).await.unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    let (s, v) = post_json(
        &c,
        &format!("{url}/admin/faults"),
        &json!({"rate_limit_rate": 1.0}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["rate_limit_rate"], 1.0);
    let (s, _) = post_json(&c, &chat_url(&url), &chat("sim-tiny", "x", 1, false)).await;
    assert_eq!(s, 429);
    let (_, _, b) = call(&c, "GET", &format!("{url}/admin/faults"), None).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["rate_limit_rate"],
        1.0
    );
    assert_eq!(fleet.replica(0).faults().rate_limit_rate, 1.0);
    let (s, _) = post_json(&c, &format!("{url}/admin/faults"), &json!({})).await;
    assert_eq!(s, 200);
    let (s, _) = post_json(&c, &chat_url(&url), &chat("sim-tiny", "x", 1, false)).await;
    assert_eq!(s, 200);
    let (s, _, b) = call(&c, "GET", &format!("{url}/admin/stats"), None).await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["requests_received"],
        1
    );
    let (s, _) = post_json(
        &c,
        &format!("{url}/admin/faults"),
        &json!({"error_rate": "lots"}),
    )
    .await;
    assert_eq!(s, 400);
    fleet.shutdown().await;
}

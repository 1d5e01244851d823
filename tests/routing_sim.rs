//! Inference-aware routing through the real gateway in front of simulated
//! vLLM-like replicas on loopback: a shared prefix sticks to one replica and
//! spills when it saturates; unshared prompts spread within their share; a
//! replica whose metrics cannot be read attracts nothing; adapter requests go
//! to the replica holding the adapter; the admin endpoints show and explain.

#[path = "support_gateway/mod.rs"]
mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use infergate_protocol::EngineKind;
use infergate_sim::{start_fleet, EngineParams, Fleet, FleetConfig, Profile};
use support::*;

const ROUTING: &str = "    routing:\n      scrape: { interval_ms: 20, timeout_ms: 250 }\n";

fn fleet_config(replicas: usize, time_scale: f64) -> FleetConfig {
    FleetConfig {
        replicas,
        served_model_name: Some("m".into()),
        time_scale,
        params: EngineParams {
            max_model_len: 4096,
            num_gpu_blocks: 1024,
            ..Profile::Tiny.params()
        },
        ..FleetConfig::with_profile(Profile::Tiny)
    }
}

/// A chat body: group `g`'s ~1,000-token system prompt, then question `q`.
fn chat(g: usize, q: usize, max_tokens: u32) -> String {
    let system = format!("You are assistant number {g} of the support team. ").repeat(80);
    serde_json::json!({
        "model": "m",
        "max_tokens": max_tokens,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": format!("Question {q}: how do I reset my password?")}
        ]
    })
    .to_string()
}

/// A body sharing nothing with other values of `i` (differs from its first character).
fn unique(i: usize, max_tokens: u32) -> String {
    serde_json::json!({
        "model": "m",
        "max_tokens": max_tokens,
        "prompt": format!("{i:05} {}", "a unique story about a dragon and a knight. ".repeat(30)),
    })
    .to_string()
}

fn received(fleet: &Fleet) -> Vec<u64> {
    fleet
        .replicas()
        .iter()
        .map(|r| r.stats().requests_received)
        .collect()
}

/// Waits until the gateway has scraped every replica at least once.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

#[tokio::test]
async fn shared_prefix_sticks_then_spills_when_saturated() {
    let fleet = start_fleet(fleet_config(4, 2.0)).await.unwrap();
    let gw = gateway(config(&fleet.urls(), ROUTING)).await;
    settle().await;
    // One at a time: every request of the group lands on one replica.
    for q in 0..8 {
        let (s, _, b) = post(&gw.url(), "/v1/chat/completions", &chat(1, q, 4)).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    }
    let after_sequential = received(&fleet);
    let home = after_sequential
        .iter()
        .position(|n| *n == 8)
        .unwrap_or_else(|| panic!("not sticky: {after_sequential:?}"));
    // The home replica served from its cache.
    let st = fleet.replica(home).stats();
    assert!(
        st.prefix_cache_hits * 2 > st.prefix_cache_queries,
        "hits {} of {}",
        st.prefix_cache_hits,
        st.prefix_cache_queries
    );
    // A burst far beyond one replica's batch (max_num_seqs 16): it spills.
    let mut tasks = Vec::new();
    for q in 0..80 {
        let url = gw.url();
        tasks.push(tokio::spawn(async move {
            post(&url, "/v1/chat/completions", &chat(1, 100 + q, 200))
                .await
                .0
        }));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let total = received(&fleet);
    let burst: Vec<u64> = total
        .iter()
        .zip(&after_sequential)
        .map(|(a, b)| a - b)
        .collect();
    let used = burst.iter().filter(|n| **n > 0).count();
    assert!(used >= 2, "never spilled: {burst:?}");
    // The home replica kept at least a full batch before others took the rest.
    assert!(burst[home] >= 16, "{burst:?}");
    assert!(burst.iter().all(|n| *n < 80), "{burst:?}");
    gw.shutdown().await;
    fleet.shutdown().await;
}

#[tokio::test]
async fn unshared_prompts_stay_within_each_replicas_share() {
    let fleet = start_fleet(fleet_config(4, 1.0)).await.unwrap();
    let gw = gateway(config(&fleet.urls(), ROUTING)).await;
    settle().await;
    let n = 80;
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = gw.url();
        tasks.push(tokio::spawn(async move {
            post(&url, "/v1/completions", &unique(i, 200)).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let got = received(&fleet);
    assert_eq!(got.iter().sum::<u64>(), n as u64);
    // Share 20 each; the load bound allows 1.25x the mean in flight, plus 2.
    let bound = (1.25 * n as f64 / 4.0).ceil() as u64 + 3;
    assert!(got.iter().all(|c| *c <= bound), "{got:?} (bound {bound})");
    assert!(got.iter().all(|c| *c >= 5), "{got:?}");
    gw.shutdown().await;
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_replica_whose_metrics_cannot_be_read_attracts_nothing() {
    let good = start_fleet(fleet_config(3, 1.0)).await.unwrap();
    // Serves fine but speaks SGLang metric names to a vLLM pool: unreadable.
    let bad = start_fleet(FleetConfig {
        metrics_flavor: EngineKind::Sglang,
        ..fleet_config(1, 1.0)
    })
    .await
    .unwrap();
    let mut urls = good.urls();
    urls.insert(1, bad.urls()[0].clone());
    let gw = gateway(config(&urls, ROUTING)).await;
    settle().await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let url = gw.url();
        tasks.push(tokio::spawn(async move {
            let (s, h, _) = post(&url, "/v1/completions", &unique(i, 50)).await;
            (s.as_u16(), h)
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let (s, h) = t.await.unwrap();
        assert_eq!(s, 200);
        if let Some(id) = h.get("x-request-id") {
            ids.push(id.to_str().unwrap().to_string());
        }
    }
    assert_eq!(bad.replica(0).stats().requests_received, 0);
    assert_eq!(received(&good).iter().sum::<u64>(), 40);
    // The admin view shows it as not fresh, with the reason.
    let admin = gw.admin_url().unwrap();
    let (s, v) = get_json(&format!("{admin}/routing")).await;
    assert_eq!(s, 200);
    let reps = v["routes"][0]["view"]["replicas"].as_array().unwrap();
    let bad_key = bad.urls()[0].trim_start_matches("http://").to_string();
    let bad_view = reps
        .iter()
        .find(|r| r["replica"] == bad_key.as_str())
        .unwrap();
    assert_eq!(bad_view["fresh"], false, "{bad_view}");
    assert!(bad_view["signals"]["error"].is_string(), "{bad_view}");
    // Explain one decision by its request id.
    let id = ids.first().expect("responses carry x-request-id");
    let (s, e) = get_json(&format!("{admin}/routing/explain/{id}")).await;
    assert_eq!(s, 200, "{e}");
    let cands = e["decision"]["candidates"].as_array().unwrap();
    // Admission withholds the unreadable replica while the others' metrics
    // are read (its cap is unknown), so routing sees only the three.
    assert_eq!(cands.len(), 3, "{e}");
    assert!(
        cands.iter().all(|c| c["replica"] != bad_key.as_str()),
        "{e}"
    );
    let (s, _) = get_json(&format!("{admin}/routing/explain/no-such-id")).await;
    assert_eq!(s, 404);
    gw.shutdown().await;
    good.shutdown().await;
    bad.shutdown().await;
}

#[tokio::test]
async fn adapter_requests_go_to_the_replica_holding_the_adapter() {
    let fleet = start_fleet(FleetConfig {
        lora_adapters: vec!["ad1".into(), "ad2".into()],
        params: EngineParams {
            max_loras: 1,
            ..fleet_config(3, 5.0).params
        },
        ..fleet_config(3, 5.0)
    })
    .await
    .unwrap();
    let eps: Vec<String> = fleet.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let yaml = format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: {{ address: \"127.0.0.1:0\" }}\n\
         pools:\n  - name: p\n    endpoints: [{}]\n\
         routes:\n  - model: m\n    aliases: [ad1, ad2]\n    forward_alias: true\n    pool: p\n{ROUTING}",
        eps.join(", ")
    );
    let gw = gateway(infergate_core::config::Config::parse(&yaml, "t.yaml").unwrap()).await;
    // A long ad1 request runs on replica 2 (sent directly): the engine reports
    // ad1 in use there.
    let direct = fleet.urls()[2].clone();
    let long = tokio::spawn(async move {
        let body = unique(0, 1500).replace("\"model\":\"m\"", "\"model\":\"ad1\"");
        post(&direct, "/v1/completions", &body).await.0
    });
    settle().await;
    assert_eq!(fleet.replica(2).stats().running, 1, "the long request runs");
    let send = |i: usize| {
        let url = gw.url();
        async move {
            let body = unique(i, 2).replace("\"model\":\"m\"", "\"model\":\"ad1\"");
            let (s, _, b) = post(&url, "/v1/completions", &body).await;
            assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        }
    };
    let before = received(&fleet);
    for i in 1..=6 {
        send(i).await;
    }
    let during = received(&fleet);
    assert_eq!(during[2] - before[2], 6, "{before:?} -> {during:?}");
    // Once idle, vLLM reports the adapter nowhere: the gateway remembers.
    assert_eq!(long.await.unwrap(), 200);
    settle().await;
    for i in 7..=12 {
        send(i).await;
    }
    let after = received(&fleet);
    assert_eq!(after[2] - during[2], 6, "{during:?} -> {after:?}");
    for r in 0..2 {
        assert_eq!(
            fleet.replica(r).stats().counters.lora_loads,
            0,
            "replica {r}"
        );
    }
    gw.shutdown().await;
    fleet.shutdown().await;
}

/// Sends `rounds` questions for each of `groups` prefix groups, round robin over
/// the gateways (2 at a time: within the rendezvous load bound, which at tiny
/// concurrency would otherwise move groups on noise), and returns the fleet's
/// prefix-cache hit rate.
async fn hit_rate_through(gateways: &[String], fleet: &Fleet, groups: usize, rounds: usize) -> f64 {
    let mut seq = 0;
    for q in 0..rounds {
        let mut batch = Vec::new();
        for g in 0..groups {
            let url = gateways[seq % gateways.len()].clone();
            seq += 1;
            batch.push(tokio::spawn(async move {
                post(&url, "/v1/chat/completions", &chat(g, q, 4)).await.0
            }));
            if batch.len() == 2 {
                for t in batch.drain(..) {
                    assert_eq!(t.await.unwrap(), 200);
                }
            }
        }
        for t in batch.drain(..) {
            assert_eq!(t.await.unwrap(), 200);
        }
    }
    let (hits, queries) = fleet.replicas().iter().fold((0, 0), |(h, q), r| {
        let s = r.stats();
        (h + s.prefix_cache_hits, q + s.prefix_cache_queries)
    });
    hits as f64 / queries.max(1) as f64
}

/// Short, prefix-less requests through every gateway at once, held in flight
/// across a few scrapes: as in a running deployment, each gateway then sees the
/// engines counting requests it did not send (other gateways) and places new
/// prefix groups with slack, so the gateways agree on homes.
async fn overlapping_traffic(gateways: &[String]) {
    let mut running = Vec::new();
    for (i, url) in gateways.iter().enumerate() {
        for j in 0..4 {
            let (url, body) = (
                url.clone(),
                serde_json::json!({"model": "m", "max_tokens": 1000,
                    "messages": [{"role": "user", "content": format!("hello {i} {j}")}]})
                .to_string(),
            );
            running.push(tokio::spawn(async move {
                post(&url, "/v1/chat/completions", &body).await.0
            }));
        }
    }
    for t in running {
        assert_eq!(t.await.unwrap(), 200);
    }
    // Until the next scrapes, the engines' counts still show these requests.
    settle().await;
}

#[tokio::test]
async fn three_gateways_agree_on_prefix_homes_without_a_shared_store() {
    let (groups, rounds) = (8, 6);
    let one = {
        let fleet = start_fleet(fleet_config(4, 5.0)).await.unwrap();
        let gw = gateway(config(&fleet.urls(), ROUTING)).await;
        settle().await;
        overlapping_traffic(&[gw.url()]).await;
        let rate = hit_rate_through(&[gw.url()], &fleet, groups, rounds).await;
        gw.shutdown().await;
        fleet.shutdown().await;
        rate
    };
    let fleet = start_fleet(fleet_config(4, 5.0)).await.unwrap();
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(gateway(config(&fleet.urls(), ROUTING)).await);
    }
    settle().await;
    let urls: Vec<String> = gws.iter().map(|g| g.url()).collect();
    overlapping_traffic(&urls).await;
    let three = hit_rate_through(&urls, &fleet, groups, rounds).await;
    eprintln!("fleet prefix hit rate: one gateway {one:.3}, three gateways {three:.3}");
    // Each group's first request is a miss either way: 5 of 6 can hit.
    assert!(one > 0.7, "one gateway: {one:.3}");
    assert!(
        three >= 0.9 * one,
        "three gateways {three:.3} vs one {one:.3}"
    );
    for g in gws {
        g.shutdown().await;
    }
    fleet.shutdown().await;
}

//! Precise prefix routing from KV-cache events, against simulated vLLM
//! replicas publishing them over ZMQ on loopback.
//!
//! The first test follows two replicas into a precise index and checks it
//! block by block against each engine's cache (and prompt by prompt against
//! the engine's own prefix lookup) through stores, evictions, preemption, a
//! dropped batch (replayed), a restart (sequence reset) and a dead publisher
//! (the replica falls back to the approximate index, then recovers). The
//! second runs the whole gateway: `/routing` and the explain endpoint name the
//! index that answered, in both event encodings and both hash forms.

#[path = "support_gateway/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use infergate_core::discovery::{Endpoint, Update};
use infergate_core::pool::Pool;
use infergate_core::routing::kv_events::{
    follow_pool, key_seed, KvEventsConfig, PreciseIndex, ReplicaEvents, TokenizeApi, TokenizeConfig,
};
use infergate_protocol::{tokenizer, EngineKind};
use infergate_sim::{
    start_fleet, EngineParams, EventEncoding, Fleet, FleetConfig, KvEventsConfig as SimEvents,
    Profile,
};
use support::*;

const BS: usize = 16;

fn fleet_config(replicas: usize, encoding: EventEncoding, int_hashes: bool) -> FleetConfig {
    FleetConfig {
        replicas,
        served_model_name: Some("m".into()),
        time_scale: 20.0,
        params: EngineParams {
            block_size: BS as u32,
            // 768 tokens of cache: a handful of prompts evict each other.
            num_gpu_blocks: 48,
            max_num_seqs: 4,
            max_num_batched_tokens: 512,
            max_model_len: 2048,
            ..Profile::Tiny.params()
        },
        kv_events: Some(SimEvents {
            enable_kv_cache_events: true,
            endpoint: "tcp://*:0".into(),
            replay_endpoint: Some("tcp://*:0".into()),
            encoding,
            int_block_hashes: int_hashes,
            ..SimEvents::default()
        }),
        ..FleetConfig::with_profile(Profile::Tiny)
    }
}

/// The gateway's event config for `fleet`: each replica's own ports.
fn events_config(fleet: &Fleet) -> KvEventsConfig {
    let mut cfg = KvEventsConfig {
        stale_after_ms: 500,
        heartbeat_ms: 100,
        replay_timeout_ms: 300,
        ..KvEventsConfig::default()
    };
    for r in fleet.replicas() {
        let (port, replay) = r.kv_event_ports().expect("events on");
        cfg.endpoints.insert(
            r.addr().to_string(),
            ReplicaEvents {
                endpoint: format!("tcp://127.0.0.1:{port}"),
                replay_endpoint: replay.map(|p| format!("tcp://127.0.0.1:{p}")),
            },
        );
    }
    cfg
}

/// Group `g`'s prompt: a shared `len`-token prefix, then question `q`.
fn prompt(g: usize, q: usize, len: usize) -> String {
    let body = format!("group {g:03} shares this long context. ").repeat(len * 4 / 35 + 1);
    format!("{} question {q}", &body[..len * 4])
}

async fn complete(url: &str, prompt: &str, max_tokens: u32) -> u16 {
    let body = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": max_tokens});
    let (s, _, _) = post(url, "/v1/completions", &body.to_string()).await;
    s.as_u16()
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

/// Waits until the index mirrors every replica's cache, then asserts it.
async fn assert_mirrors(ix: &PreciseIndex, fleet: &Fleet, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let same = fleet.replicas().iter().all(|r| {
            sorted(ix.engine_hashes(&r.addr().to_string())) == sorted(r.cached_block_hashes())
        });
        if same || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in fleet.replicas() {
        let key = r.addr().to_string();
        let engine = sorted(r.cached_block_hashes());
        assert_eq!(
            sorted(ix.engine_hashes(&key)),
            engine,
            "{what}: replica {key} (engine holds {} blocks)",
            engine.len()
        );
    }
}

/// For each prompt: the leading blocks the precise index says each replica
/// holds equal the leading blocks the engine would find in its cache.
fn assert_prefixes_agree(ix: &PreciseIndex, fleet: &Fleet, prompts: &[String]) {
    for p in prompts {
        let engine_hashes = tokenizer::block_hashes(p, BS, tokenizer::model_seed("m"), usize::MAX);
        let mut keys = Vec::new();
        tokenizer::for_each_token_block_key(p, BS, key_seed(None), |k| {
            keys.push(k);
            true
        });
        let mut ours = std::collections::HashMap::new();
        ix.longest_prefix(&keys, |r, n| {
            ours.insert(r.to_string(), n);
        });
        for r in fleet.replicas() {
            let cached: std::collections::HashSet<u64> =
                r.cached_block_hashes().into_iter().collect();
            let engine = engine_hashes
                .iter()
                .take_while(|h| cached.contains(h))
                .count() as u32;
            let key = r.addr().to_string();
            assert_eq!(
                ours.get(&key).copied(),
                Some(engine),
                "replica {key}, prompt {}",
                &p[..20]
            );
        }
    }
}

async fn wait_live(ix: &PreciseIndex, key: &str, live: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ix.is_live(key) != live && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ix.is_live(key), live, "replica {key} live");
}

#[tokio::test]
async fn precise_index_mirrors_the_engines_caches() {
    let fleet = start_fleet(fleet_config(2, EventEncoding::Map, true))
        .await
        .unwrap();
    let pool = Arc::new(Pool::new("p", EngineKind::Vllm));
    let endpoints = fleet
        .urls()
        .iter()
        .map(|u| Endpoint::from_url(u).unwrap())
        .collect();
    pool.apply(Update::Reset(endpoints));
    let ix = Arc::new(PreciseIndex::new());
    let _follow = follow_pool(pool.clone(), ix.clone(), events_config(&fleet));
    let urls = fleet.urls();
    let keys: Vec<String> = fleet
        .replicas()
        .iter()
        .map(|r| r.addr().to_string())
        .collect();
    for k in &keys {
        wait_live(&ix, k, true).await;
    }

    // Stores.
    let mut sent = Vec::new();
    for g in 0..3 {
        let p = prompt(g, 0, 200);
        assert_eq!(complete(&urls[g % 2], &p, 4).await, 200);
        sent.push(p);
    }
    assert_mirrors(&ix, &fleet, "stores").await;
    assert_prefixes_agree(&ix, &fleet, &sent);
    assert!(ix.stats().entries > 0);

    // Evictions: far more prefix data than 48 blocks.
    for g in 3..12 {
        let p = prompt(g, 1, 250);
        assert_eq!(complete(&urls[0], &p, 2).await, 200);
        sent.push(p);
    }
    assert_mirrors(&ix, &fleet, "evictions").await;
    assert_prefixes_agree(&ix, &fleet, &sent);

    // Preemption: four long generations cannot all fit.
    let before = fleet.replica(1).stats().counters.preemptions;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (u, p) = (urls[1].clone(), prompt(20 + i, 2, 200));
            tokio::spawn(async move { complete(&u, &p, 300).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(
        fleet.replica(1).stats().counters.preemptions > before,
        "the workload must preempt"
    );
    assert_mirrors(&ix, &fleet, "preemption").await;
    assert_prefixes_agree(&ix, &fleet, &sent);

    // A dropped batch: the next sequence shows the gap and a replay fills it.
    fleet.replica(1).drop_next_kv_events(1);
    assert_eq!(complete(&urls[1], &prompt(30, 0, 120), 2).await, 200);
    assert_eq!(complete(&urls[1], &prompt(31, 0, 120), 2).await, 200);
    assert_mirrors(&ix, &fleet, "dropped batch").await;

    // A restart with no traffic after it: the engine publishes nothing until
    // it stores a block, yet its entries go within a heartbeat (the probe
    // finds the publisher's sequence started over).
    assert!(!ix.engine_hashes(&keys[0]).is_empty());
    fleet.replica(0).crash();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.replica(0).restart();
    assert!(fleet.replica(0).cached_block_hashes().is_empty());
    assert_mirrors(&ix, &fleet, "restart, no traffic since").await;
    wait_live(&ix, &keys[0], true).await;
    for k in 3..12 {
        assert_eq!(complete(&urls[0], &prompt(k, 1, 250), 2).await, 200);
    }
    assert_mirrors(&ix, &fleet, "refilled").await;

    // A restart: an empty cache, the sequence starts again at 0.
    fleet.replica(0).crash();
    fleet.replica(0).restart();
    assert_eq!(complete(&urls[0], &prompt(40, 0, 100), 2).await, 200);
    assert_mirrors(&ix, &fleet, "restart").await;
    assert_prefixes_agree(&ix, &fleet, &sent);

    // A dead publisher: the replica falls back, then recovers by replay.
    fleet.replica(1).set_kv_events_silent(true);
    assert_eq!(complete(&urls[1], &prompt(50, 0, 150), 2).await, 200);
    wait_live(&ix, &keys[1], false).await;
    assert!(ix.is_live(&keys[0]), "the other replica stays precise");
    fleet.replica(1).set_kv_events_silent(false);
    wait_live(&ix, &keys[1], true).await;
    assert_mirrors(&ix, &fleet, "publisher back").await;

    // A replica leaving the pool takes its entries along.
    pool.apply(Update::Remove(vec![Arc::from(keys[0].as_str())]));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ix.engine_hashes(&keys[0]).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ix.engine_hashes(&keys[0]).is_empty());
    assert!(!ix.is_live(&keys[0]));
    fleet.shutdown().await;
}

/// The route's per-replica view from `/routing`.
async fn replica_views(admin: &str) -> Vec<serde_json::Value> {
    let v = admin_json(&format!("{admin}/routing")).await;
    v["routes"][0]["view"]["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn gateway_routes_by_events_and_shows_which_index_answered() {
    for (encoding, int_hashes) in [(EventEncoding::Array, false), (EventEncoding::Map, true)] {
        let fleet = start_fleet(fleet_config(2, encoding, int_hashes))
            .await
            .unwrap();
        let ev = serde_json::to_string(&events_config(&fleet)).unwrap();
        let routing = format!(
            "    routing:\n      scrape: {{ interval_ms: 20, timeout_ms: 250 }}\n      kv_events: {ev}\n"
        );
        let gw = gateway(config(&fleet.urls(), &routing)).await;
        let admin = gw.admin_url().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let views = replica_views(&admin).await;
            if views.len() == 2 && views.iter().all(|r| r["prefix_index"] == "precise") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let views = replica_views(&admin).await;
        assert!(
            views.iter().all(|r| r["prefix_index"] == "precise"),
            "{encoding:?}: {views:?}"
        );
        // The same prompt twice: the second decision sees its blocks, by events.
        let p = prompt(1, 0, 300);
        assert_eq!(complete(&gw.url(), &p, 2).await, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let body = serde_json::json!({"model": "m", "prompt": p, "max_tokens": 2});
        let (s, h, _) = post(&gw.url(), "/v1/completions", &body.to_string()).await;
        assert_eq!(s, 200);
        let id = h["x-request-id"].to_str().unwrap().to_string();
        let e = admin_json(&format!("{admin}/routing/explain/{id}")).await;
        let cands = e["decision"]["candidates"].as_array().unwrap();
        assert!(cands.iter().all(|c| c["prefix_index"] == "precise"), "{e}");
        let best = cands
            .iter()
            .map(|c| c["matched_blocks"].as_u64().unwrap())
            .max();
        assert_eq!(best, Some(300 / BS as u64), "{encoding:?}: {e}");
        let v = admin_json(&format!("{admin}/routing")).await;
        assert!(
            v["routes"][0]["view"]["precise_index"]["entries"].as_u64() > Some(0),
            "{v}"
        );
        // Events stop: the replicas fall back to the approximate index, visibly.
        for r in fleet.replicas() {
            r.set_kv_events_silent(true);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let views = replica_views(&admin).await;
            if views.iter().all(|r| r["prefix_index"] == "approximate") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let views = replica_views(&admin).await;
        assert!(
            views.iter().all(|r| r["prefix_index"] == "approximate"),
            "{views:?}"
        );
        gw.shutdown().await;
        fleet.shutdown().await;
    }
}

/// Keys from the engine's own token ids (`kv_events.tokenize: {api: vllm}`,
/// against the simulator's vLLM-style `/tokenize`): the first request of a
/// conversation is routed by the approximate index while its message
/// prefixes are fetched off the request path; a later one sharing its system
/// prompt finds, by the precise index, exactly the system prompt's blocks
/// the engine cached (keys from the ids the engine returned), and goes there.
#[tokio::test]
async fn precise_keys_come_from_the_engines_token_ids() {
    let fleet = start_fleet(fleet_config(2, EventEncoding::Map, true))
        .await
        .unwrap();
    let mut ev = events_config(&fleet);
    ev.tokenize = Some(TokenizeConfig {
        api: TokenizeApi::Vllm,
        cache_entries: 64,
        queue: 16,
        max_in_flight: 2,
        timeout_ms: 2000,
    });
    let ev = serde_json::to_string(&ev).unwrap();
    let routing = format!(
        "    routing:\n      scrape: {{ interval_ms: 20, timeout_ms: 250 }}\n      kv_events: {ev}\n"
    );
    let gw = gateway(config(&fleet.urls(), &routing)).await;
    let admin = gw.admin_url().unwrap();
    let system = prompt(7, 0, 300);
    let chat = |q: &str| {
        serde_json::json!({"model": "m", "max_tokens": 2, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": q}]})
        .to_string()
    };
    let (url, adm) = (gw.url(), admin.clone());
    let send = |body: String| {
        let (url, adm) = (url.clone(), adm.clone());
        async move {
            let (s, h, _) = post(&url, "/v1/chat/completions", &body).await;
            assert_eq!(s, 200);
            let id = h["x-request-id"].to_str().unwrap().to_string();
            admin_json(&format!("{adm}/routing/explain/{id}")).await
        }
    };
    // The simulator's /tokenize as vLLM's: the chat template with or
    // without the generation prompt.
    let tokenize = |gen: bool| {
        serde_json::json!({"model": "m", "add_generation_prompt": gen,
            "messages": [{"role": "system", "content": system}]})
        .to_string()
    };
    let ids = |b: bytes::Bytes| -> Vec<u32> {
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        serde_json::from_value(v["tokens"].clone()).unwrap()
    };
    let (s, _, without) = post(&fleet.urls()[0], "/tokenize", &tokenize(false)).await;
    assert_eq!(s, 200);
    let (_, _, with) = post(&fleet.urls()[0], "/tokenize", &tokenize(true)).await;
    let (without, with) = (ids(without), ids(with));
    assert_eq!(
        without,
        tokenizer::token_ids(&format!("<|system|>\n{system}\n"))
    );
    // The gateway's token rule (which the simulator shares) may join the
    // message's closing newline with the next role line: all but the last
    // id agree (a real template closes a message with a special token).
    assert!(with.len() > without.len() && with.starts_with(&without[..without.len() - 1]));
    let first = send(chat("first question")).await;
    let cands = first["decision"]["candidates"].as_array().unwrap();
    assert!(
        cands.iter().all(|c| c["prefix_index"] == "approximate"),
        "no ids fetched yet: {first}"
    );
    // Both prefixes (the system message, the whole conversation) arrive.
    let deadline = Instant::now() + Duration::from_secs(5);
    let tokens = loop {
        let v = admin_json(&format!("{admin}/routing")).await;
        let t = v["routes"][0]["view"]["engine_tokens"].clone();
        if t["entries"].as_u64() >= Some(2) || Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(tokens["entries"], 2, "{tokens}");
    assert_eq!(
        (tokens["misses"].as_u64(), tokens["errors"].as_u64()),
        (Some(1), Some(0))
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = send(chat("another user's question")).await;
    let d = &second["decision"];
    let cands = d["candidates"].as_array().unwrap();
    assert!(
        cands.iter().all(|c| c["prefix_index"] == "precise"),
        "{second}"
    );
    // The engine's ids of the rendered system message, without the
    // generation prompt: its full blocks are what the holder has.
    let sys_ids = tokenizer::token_ids(&format!("<|system|>\n{system}\n"));
    let best = cands
        .iter()
        .max_by_key(|c| c["matched_blocks"].as_u64())
        .unwrap();
    assert_eq!(
        best["matched_blocks"].as_u64(),
        Some((sys_ids.len() / BS) as u64),
        "{second}"
    );
    assert_eq!(d["chosen"], first["decision"]["chosen"], "{second}");
    assert_eq!(d["chosen"], best["replica"]);
    gw.shutdown().await;
    fleet.shutdown().await;
}

//! Governance end to end: the real gateway in front of simulated vLLM
//! replicas. The usage API's totals must equal the sum of the audit log's
//! lines and the engines' own token counters (tokens exactly, cost to the
//! cent); the capacity report must match a known load (a saturated replica,
//! an idle one).

#[path = "support_gateway/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use infergate_core::config::Config;
use infergate_core::identity::hash_key;
use infergate_sim::{start_fleet, EngineParams, FleetConfig, Profile};
use support::*;

/// Prices of `m`, in dollars per million tokens (the same as the config).
const INPUT: u64 = 150_000; // micro-dollars per million tokens: $0.15
const CACHED: u64 = 30_000; // $0.03
const OUTPUT: u64 = 600_000; // $0.60

async fn get_text(url: &str) -> String {
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    let resp = client().request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// Sums a counter over all label sets of a Prometheus text.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Exact decimal dollars to pico-dollars.
fn pico(s: &str) -> u64 {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    assert!(frac.len() <= 12, "{s}");
    whole.parse::<u64>().unwrap() * 1_000_000_000_000
        + format!("{frac:0<12}").parse::<u64>().unwrap()
}

fn write_keys(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("keys.yaml");
    std::fs::write(
        &path,
        format!(
            "- {{id: search-prod, sha256: {}, team: search}}\n- {{id: ads-batch, sha256: {}, team: ads}}\n",
            hash_key("sk-search"),
            hash_key("sk-ads")
        ),
    )
    .unwrap();
    path
}

/// Waits until `path` holds at least `n` audit lines of `event`.
async fn audit_lines(path: &Path, event: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["event"] == event)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Simulated vLLM replicas of the tiny profile serving `model`.
async fn sim(
    replicas: usize,
    model: &str,
    time_scale: f64,
    params: EngineParams,
) -> infergate_sim::Fleet {
    start_fleet(FleetConfig {
        replicas,
        served_model_name: Some(model.into()),
        time_scale,
        params,
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn usage_totals_equal_the_audit_log_and_the_engines_counters() {
    let fleet = sim(2, "m", 20.0, Profile::Tiny.params()).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(dir.path());
    let audit = dir.path().join("audit.jsonl");
    let eps = fleet
        .urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let yaml = format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: {{ address: \"127.0.0.1:0\" }}\n\
         auth:\n  mode: keys\n  key_file: {keys}\n  teams: {{ search: {{ max_priority: critical }} }}\n\
         pricing:\n  models:\n    m: {{ input: 0.15, cached_input: 0.03, output: 0.6 }}\n\
         audit: {{ output: {audit} }}\n\
         pools:\n  - name: p\n    endpoints: [{eps}]\n\
         routes:\n  - model: m\n    pool: p\n    usage: {{ include_usage: true }}\n    routing: {{ policy: least_request }}\n",
        keys = keys.display(),
        audit = audit.display(),
    );
    let config = Config::parse(&yaml, "gov.yaml").unwrap();
    let gw = gateway(config).await;
    let url = gw.url();

    // 3 clients x 8 requests per key: chat and streamed completions, with
    // a shared prefix so the engines report cached prompt tokens.
    let mut tasks = Vec::new();
    for (key, team) in [("sk-search", "search"), ("sk-ads", "ads")] {
        for c in 0..3 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut seen = (0u64, 0u64, 0u64);
                for i in 0..8 {
                    let shared = "You are a careful assistant who answers in full sentences. ".repeat(4);
                    let (path, body) = if i % 2 == 0 {
                        (
                            "/v1/chat/completions",
                            format!(
                                r#"{{"model":"m","messages":[{{"role":"system","content":"{shared}"}},{{"role":"user","content":"question {c} {i}"}}],"max_tokens":{}}}"#,
                                5 + i
                            ),
                        )
                    } else {
                        (
                            "/v1/completions",
                            format!(
                                r#"{{"model":"m","prompt":"{shared} item {c} {i}","max_tokens":{},"stream":true}}"#,
                                3 + i
                            ),
                        )
                    };
                    let auth = format!("Bearer {key}");
                    let (status, _, bytes) =
                        post_with(&url, path, &body, &[("authorization", &auth)]).await;
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
                    // The client's own view of usage (the last usage object).
                    let text = String::from_utf8_lossy(&bytes);
                    let at = text.rfind("\"usage\"").unwrap();
                    let obj = &text[at + 8..];
                    let usage: serde_json::Value = serde_json::Deserializer::from_str(obj)
                        .into_iter()
                        .next()
                        .unwrap()
                        .unwrap();
                    seen.0 += usage["prompt_tokens"].as_u64().unwrap();
                    seen.1 += usage["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0);
                    seen.2 += usage["completion_tokens"].as_u64().unwrap();
                }
                (team, seen)
            }));
        }
    }
    let mut by_team: HashMap<&str, (u64, u64, u64)> = HashMap::new();
    for t in tasks {
        let (team, s) = t.await.unwrap();
        let e = by_team.entry(team).or_default();
        e.0 += s.0;
        e.1 += s.1;
        e.2 += s.2;
    }
    // Two refused requests: they are audited and counted, with no tokens.
    let (s, _, _) = post(
        &url,
        "/v1/chat/completions",
        r#"{"model":"m","messages":[]}"#,
    )
    .await;
    assert_eq!(s, 401);
    let (s, _, _) = post_with(
        &url,
        "/v1/chat/completions",
        r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
        &[("authorization", "Bearer sk-ads")],
    )
    .await;
    assert_eq!(s, 404);

    // The audit log: one line per request, 48 served and 2 refused.
    let lines = audit_lines(&audit, "request", 50).await;
    assert_eq!(lines.len(), 50);
    let sum = |f: &dyn Fn(&serde_json::Value) -> u64| lines.iter().map(f).sum::<u64>();
    let a_in = sum(&|v| v["input_tokens"].as_u64().unwrap());
    let a_cached = sum(&|v| v["cached_input_tokens"].as_u64().unwrap());
    let a_out = sum(&|v| v["output_tokens"].as_u64().unwrap());
    let a_cost = sum(&|v| pico(v["cost"].as_str().unwrap()));
    for v in &lines {
        let text = v.to_string();
        assert!(
            !text.contains("sk-search") && !text.contains("sk-ads"),
            "no key: {text}"
        );
        assert!(
            v.get("prompt").is_none(),
            "no prompt unless the route opts in"
        );
        if v["status"] == 200 {
            assert_eq!(v["route"], "m");
            assert_eq!(v["pool"], "p");
            assert_eq!(v["client_addr"], "127.0.0.1");
            assert!(v["replica"].as_str().unwrap().starts_with("127.0.0.1:"));
            // No band asked for: every request is `standard`.
            assert_eq!(v["priority"], "standard");
        }
    }
    let refused: Vec<_> = lines.iter().filter(|v| v["status"] != 200).collect();
    assert_eq!(refused.len(), 2);
    assert!(refused
        .iter()
        .all(|v| v["output_tokens"] == 0 && v["cost"] == "0"));
    assert!(refused
        .iter()
        .any(|v| v["status"] == 401 && v["key_id"].is_null()));
    assert!(refused
        .iter()
        .any(|v| v["status"] == 404 && v["key_id"] == "ads-batch" && v["team"] == "ads"));

    // The engines' own counters, summed over replicas.
    let mut e_in = 0;
    let mut e_cached = 0;
    let mut e_out = 0;
    for u in fleet.urls() {
        let m = get_text(&format!("{u}/metrics")).await;
        e_in += counter(&m, "vllm:prompt_tokens_total");
        e_cached += counter(&m, "vllm:prefix_cache_hits_total");
        e_out += counter(&m, "vllm:generation_tokens_total");
    }
    assert!(e_cached > 0, "the shared prefix was served from cache");
    let c_in: u64 = by_team.values().map(|s| s.0).sum();
    let c_cached: u64 = by_team.values().map(|s| s.1).sum();
    let c_out: u64 = by_team.values().map(|s| s.2).sum();
    assert_eq!(
        (a_in, a_cached, a_out),
        (e_in, e_cached, e_out),
        "audit = engines"
    );
    assert_eq!(
        (c_in, c_cached, c_out),
        (e_in, e_cached, e_out),
        "clients = engines"
    );

    // The cost the test derives from the engines' counters and the prices.
    let expected_pico = (e_in - e_cached) * INPUT + e_cached * CACHED + e_out * OUTPUT;
    assert_eq!(a_cost, expected_pico, "audit cost is exact");

    // The usage API: totals and per-team rows.
    let admin = format!("http://{}", gw.admin_addr.unwrap());
    let u = admin_json(&format!("{admin}/usage?group_by=team,key")).await;
    let total = &u["total"];
    assert_eq!(total["requests"], 50);
    assert_eq!(total["input_tokens"], e_in);
    assert_eq!(total["cached_input_tokens"], e_cached);
    assert_eq!(total["output_tokens"], e_out);
    let api_cost = pico(total["cost"].as_str().unwrap());
    assert_eq!(api_cost, expected_pico);
    assert_eq!(
        api_cost.div_ceil(10_000_000_000),
        expected_pico.div_ceil(10_000_000_000),
        "to the cent"
    );
    assert_eq!(u["currency"], "USD");
    for (team, key) in [("search", "search-prod"), ("ads", "ads-batch")] {
        let row = u["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["team"] == team && r["key_id"] == key)
            .unwrap_or_else(|| panic!("{team}: {u}"));
        let s = by_team[team];
        assert_eq!(row["input_tokens"], s.0, "{team}");
        assert_eq!(row["cached_input_tokens"], s.1, "{team}");
        assert_eq!(row["output_tokens"], s.2, "{team}");
        let cost = (s.0 - s.1) * INPUT + s.1 * CACHED + s.2 * OUTPUT;
        assert_eq!(pico(row["cost"].as_str().unwrap()), cost, "{team}");
    }
    // CSV for chargeback: the same figures.
    let csv = get_text(&format!("{admin}/usage?group_by=team&format=csv")).await;
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "team,requests,input_tokens,cached_input_tokens,output_tokens,cost,currency"
    );
    let mut csv_out = 0;
    let mut csv_cost = 0;
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        csv_out += f[4].parse::<u64>().unwrap();
        csv_cost += pico(f[5]);
    }
    assert_eq!((csv_out, csv_cost), (e_out, expected_pico));
    // A range that ends before the run holds nothing; a bad one is a 400.
    let none = admin_json(&format!("{admin}/usage?to=1000")).await;
    assert_eq!(none["total"]["requests"], 0);
    let bad = admin_json(&format!("{admin}/usage?from=yesterday")).await;
    assert!(bad["error"].as_str().unwrap().contains("from"));

    // Prometheus: per team, route, model and pool, labels from config.
    let m = get_text(&format!("{admin}/metrics")).await;
    let search_out = by_team["search"].2;
    assert!(
        m.contains(&format!(
            "infergate_usage_tokens_total{{team=\"search\",route=\"m\",model=\"m\",pool=\"p\",type=\"output\"}} {search_out}"
        )),
        "{m}"
    );
    assert!(m.contains("infergate_usage_cost_dollars_total{team=\"ads\""));
    assert!(m.contains("infergate_audit_dropped_total 0"));
}

#[tokio::test]
async fn capacity_report_matches_a_saturated_and_an_idle_replica() {
    // Batches of at most 4 sequences; one token every ~2.2 ms of wall time.
    let params = EngineParams {
        max_num_seqs: 4,
        ..Profile::Tiny.params()
    };
    let fleet = sim(2, "m", 1.0, params).await;
    let urls = fleet.urls();
    // $3.60 per GPU-hour, 2 GPUs per replica: $0.002 per replica-second.
    let yaml = format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: {{ address: \"127.0.0.1:0\" }}\n\
         accounting: {{ pool_sample_interval: 50ms }}\n\
         pricing:\n  pools:\n    busy: {{ gpu_hour: 3.6, gpus_per_replica: 2, max_num_seqs: 4 }}\n    idle: {{ gpu_hour: 3.6, gpus_per_replica: 2, max_num_seqs: 4 }}\n\
         pools:\n  - name: busy\n    endpoints: [\"{}\"]\n  - name: idle\n    endpoints: [\"{}\"]\n\
         routes:\n  - model: m\n    pool: busy\n    usage: {{ include_usage: true }}\n    admission: {{ queue: {{ timeout_ms: 60000 }} }}\n  - model: i\n    pool: idle\n    target_model: m\n",
        urls[0], urls[1]
    );
    let started = Instant::now();
    let gw = gateway(Config::parse(&yaml, "cap.yaml").unwrap()).await;
    let url = gw.url();
    // Twice the batch limit in closed loop for 3 s: the busy replica runs 4
    // sequences (and queues 4) the whole time; the idle one gets nothing.
    let load_for = Duration::from_secs(3);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut tokens = 0u64;
            let until = Instant::now() + load_for;
            let mut i = 0;
            while Instant::now() < until {
                let body = format!(
                    r#"{{"model":"m","prompt":"worker {w} request {i}","max_tokens":60,"stream":true}}"#
                );
                let (status, _, bytes) = post(&url, "/v1/completions", &body).await;
                assert_eq!(status, 200);
                let text = String::from_utf8_lossy(&bytes);
                let at = text.rfind("\"completion_tokens\":").unwrap() + 20;
                let n: String = text[at..].chars().take_while(char::is_ascii_digit).collect();
                tokens += n.parse::<u64>().unwrap();
                i += 1;
            }
            tokens
        }));
    }
    let mut output = 0;
    for t in tasks {
        output += t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let admin = format!("http://{}", gw.admin_addr.unwrap());
    let r = admin_json(&format!("{admin}/capacity")).await;
    let pools = r["pools"].as_array().unwrap();
    let pool = |name: &str| pools.iter().find(|p| p["pool"] == name).unwrap().clone();
    let (busy, idle) = (pool("busy"), pool("idle"));
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k}: {v}"));

    // Each replica existed for about the whole run: replica-seconds within
    // a sample interval or two of the wall time since the gateway started.
    for p in [&busy, &idle] {
        let secs = f(p, "replica_seconds");
        assert!(
            secs <= elapsed + 0.05 && secs >= elapsed - 0.5,
            "{secs} vs {elapsed}: {p}"
        );
        // Cost: every replica-second at 2 GPUs x $3.60 per hour.
        let cost = f(p, "cost");
        assert!((cost - secs * 0.002).abs() < 1e-9, "{cost} {secs}");
        assert!((f(p, "gpu_hours") - secs * 2.0 / 3600.0).abs() < 1e-12);
        // Nearly all of it measured (the first scrapes take a moment).
        assert!(f(p, "measured_seconds") >= secs - 0.5, "{p}");
    }
    // The idle replica never ran anything: utilisation 0, all measured time idle.
    assert_eq!(f(&idle, "utilization"), 0.0);
    assert!((f(&idle, "idle_cost") - f(&idle, "measured_seconds") * 0.002).abs() < 1e-9);
    assert_eq!(idle["output_tokens"], 0);
    assert!(idle["cost_per_1k_output_tokens"].is_null());
    // The saturated one ran its 4 slots for all of the load but the ramp up
    // and the last requests' tail (one request, ~60 tokens x 2.2 ms, about
    // 0.15 s of 3 s): utilisation at least 0.85, idle cost at most 15%.
    let util = f(&busy, "utilization");
    assert!((0.85..=1.0).contains(&util), "{busy}");
    assert!(f(&busy, "mean_running") >= 3.4, "{busy}");
    let cost = f(&busy, "cost");
    let idle_cost = f(&busy, "idle_cost");
    assert!(
        (idle_cost - f(&busy, "measured_seconds") * (1.0 - util) * 0.002).abs() < 1e-9,
        "{busy}"
    );
    assert!(idle_cost <= 0.15 * cost, "{busy}");
    // Tokens: what the clients received, and the rates derived from them.
    assert_eq!(busy["output_tokens"], output);
    let gpu_hours = f(&busy, "gpu_hours");
    assert!((f(&busy, "output_tokens_per_gpu_hour") - output as f64 / gpu_hours).abs() < 1e-6);
    assert!((f(&busy, "cost_per_1k_output_tokens") - cost / output as f64 * 1000.0).abs() < 1e-12);
    // The same figures as metrics.
    let m = get_text(&format!("{admin}/metrics")).await;
    assert!(
        m.contains("infergate_pool_idle_cost_dollars_total{pool=\"idle\"}"),
        "{m}"
    );
    assert!(
        m.contains("infergate_pool_utilization_ratio{pool=\"idle\"} 0"),
        "{m}"
    );
}

#[tokio::test]
async fn administrative_changes_and_opted_in_prompts_are_audited() {
    let stable = sim(1, "m", 50.0, Profile::Tiny.params()).await;
    let canary = sim(1, "m-v2", 50.0, Profile::Tiny.params()).await;
    canary.replica(0).set_faults(infergate_sim::Faults {
        error_rate: 1.0,
        error_status: Some(500),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let yaml = format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: {{ address: \"127.0.0.1:0\" }}\n\
         audit: {{ output: {} }}\n\
         pools:\n  - name: stable\n    endpoints: [\"{}\"]\n  - name: canary\n    endpoints: [\"{}\"]\n\
         routes:\n  - model: m\n    pool: stable\n    audit_prompts: true\n    admission:\n      canary: {{ pool: canary, model: m-v2, weight: 50, rollback: {{ min_requests: 20, window_secs: 60, warmup_secs: 0, warmup_requests: 0 }} }}\n",
        audit.display(),
        stable.urls()[0],
        canary.urls()[0]
    );
    let gw = gateway(Config::parse(&yaml, "audit.yaml").unwrap()).await;
    let split = gw.gateway.canary("m").unwrap();
    // The failing canary is rolled back (judged once a second; bounded).
    let t0 = Instant::now();
    let mut n = 0;
    while split.rolled_back().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(20), "never rolled back");
        n += 1;
        let body = format!(r#"{{"model":"m","prompt":"hi there","max_tokens":1,"user":"u{n}"}}"#);
        post(&gw.url(), "/v1/completions", &body).await;
    }
    // A canary change, a rejected config, a key file change and a bad one.
    let mut config = Config::clone(&gw.gateway.config());
    let route = config.routes.iter_mut().find(|r| r.model == "m").unwrap();
    route.admission.canary.as_mut().unwrap().weight = 10.0;
    gw.gateway.apply_config(config.clone()).unwrap();
    let mut bad = config.clone();
    bad.routes[0].pool = "nope".into();
    assert!(gw.gateway.apply_config(bad).is_err());
    let keys = format!("- {{id: k1, sha256: {}, team: t}}\n", hash_key("secret-1"));
    gw.gateway.apply_keys_text(&keys, "keys.yaml").unwrap();
    assert!(gw.gateway.apply_keys_text("- id: x", "keys.yaml").is_err());

    let rollback = audit_lines(&audit, "canary_rollback", 1).await;
    assert_eq!(rollback.len(), 1);
    assert_eq!(rollback[0]["route"], "m");
    assert_eq!(rollback[0]["pool"], "canary");
    assert!(rollback[0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("errors: "));
    let change = audit_lines(&audit, "canary_change", 1).await;
    assert_eq!(change.len(), 1, "{change:?}");
    assert_eq!(change[0]["route"], "m");
    assert_eq!(change[0]["before"]["weight"], 50.0);
    assert_eq!(change[0]["after"]["weight"], 10.0);
    assert_eq!(change[0]["after"]["model"], "m-v2");
    let reloads = audit_lines(&audit, "config_reload", 3).await;
    let results: Vec<_> = reloads
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["applied", "applied", "rejected"]);
    assert!(reloads[2]["error"].as_str().unwrap().contains("nope"));
    assert_eq!(reloads[0]["routes"][0], "m");
    let keys = audit_lines(&audit, "key_file_change", 2).await;
    assert_eq!(keys[0]["result"], "applied");
    assert_eq!(keys[0]["added"][0], "k1");
    assert_eq!(keys[1]["result"], "rejected");
    assert!(!std::fs::read_to_string(&audit)
        .unwrap()
        .contains(&hash_key("secret-1")));
    // The route opted in: request lines carry the prompt.
    let requests = audit_lines(&audit, "request", n).await;
    assert_eq!(requests.len(), n);
    assert!(
        requests.iter().all(|r| r["prompt"] == "hi there"),
        "{:?}",
        requests[0]
    );
    assert!(time_ordered(&reloads));
}

/// Audit lines carry RFC 3339 UTC times, in order.
fn time_ordered(lines: &[serde_json::Value]) -> bool {
    let t: Vec<&str> = lines.iter().map(|l| l["time"].as_str().unwrap()).collect();
    t.iter().all(|s| s.ends_with('Z') && s.len() == 27) && t.windows(2).all(|w| w[0] <= w[1])
}

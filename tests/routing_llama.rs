//! Prefix-aware routing in front of real llama.cpp replicas: a short version of
//! `ENGINE=llama loadtest/shared_prefix.sh`. Two `llama-server` replicas
//! (SmolLM2-135M, built by `loadtest/llama_server.sh build`) behind the gateway's
//! default policy with the pool's `engine: llama.cpp` metrics: every chat of a
//! prefix group after the first lands on the replica already holding the group's
//! system prompt and is served from its cache (llama.cpp's `timings.cache_n`),
//! and the gateway reads the replicas' llama.cpp metrics (none is unknown).
//!
//! Needs the llama-server build, so it is `#[ignore]`d: `cargo test --
//! --include-ignored` (what .ci/run does, after the build) runs it. Run that way
//! without the server binary or the model, it skips with a printed reason,
//! unless INFERGATE_REQUIRE_EXTERNAL=1 (CI), which makes that a failure, except
//! with INFERGATE_SKIP_LLAMA=1 (.ci/run sets it only when told not to build:
//! INFERGATE_BUILD_LLAMA=0).

#[path = "support_gateway/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::*;

/// (server binary, model) from `loadtest/llama_server.sh path`, if both exist.
fn llama_paths() -> Result<(PathBuf, PathBuf), String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/loadtest/llama_server.sh");
    let out = Command::new("bash")
        .args([script, "path"])
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|p| PathBuf::from(p.trim()))
            .ok_or_else(|| format!("{script} path printed no {name}"))
    };
    let (server, model) = (field("server:")?, field("model:")?);
    for p in [&server, &model] {
        if !p.exists() {
            return Err(format!(
                "{} not found: run `loadtest/llama_server.sh build` (cached in ~/.cache/infergate/llama)",
                p.display()
            ));
        }
    }
    Ok((server, model))
}

/// llama-server processes, killed when dropped (also when the test panics).
struct Replicas(Vec<Child>);

impl Drop for Replicas {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_replicas(server: &Path, model: &Path, n: usize) -> (Replicas, Vec<String>) {
    let mut replicas = Replicas(Vec::new());
    let mut urls = Vec::new();
    let lib_dir = server.parent().unwrap();
    for _ in 0..n {
        let port = free_port();
        let child = Command::new(server)
            .env("LD_LIBRARY_PATH", lib_dir)
            .args(["-m", model.to_str().unwrap(), "--host", "127.0.0.1"])
            .args([
                "--port",
                &port.to_string(),
                "--metrics",
                "-t",
                "1",
                "-np",
                "4",
            ])
            // No host prompt cache: a replica keeps only what its slots hold,
            // as a GPU engine keeps only what its KV cache holds.
            .args(["-c", "8192", "--cache-ram", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        replicas.0.push(child);
        urls.push(format!("http://127.0.0.1:{port}"));
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    for u in &urls {
        loop {
            let req = http::Request::get(format!("{u}/health"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(2), client().request(req)).await
            {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "llama-server {u} never became healthy"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    (replicas, urls)
}

/// A chat of group `g`: a ~300-token system prompt, then question `q`.
fn chat(g: usize, q: usize) -> String {
    let system =
        format!("You are the support assistant of shop number {g}. Answer briefly and politely. ")
            .repeat(20);
    serde_json::json!({
        "model": "m",
        "max_tokens": 4,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": format!("Question {q}: where is my order?")}
        ]
    })
    .to_string()
}

async fn get_json(url: &str) -> serde_json::Value {
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap_or_default()
}

/// The server binary and model, or `None` (the test is skipped, saying why)
/// when they are not built and CI does not require them.
fn llama_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    let skip = std::env::var("INFERGATE_SKIP_LLAMA").as_deref() == Ok("1");
    match llama_paths() {
        Ok(p) => Some(p),
        Err(why) => {
            // CI without the cached build (too long to build within its budget)
            // says so explicitly; otherwise CI requires the tool.
            if !skip && std::env::var("INFERGATE_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
                panic!("required external tool missing: {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

async fn post_json(url: &str, body: &serde_json::Value) -> serde_json::Value {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap_or_default()
}

/// The precise index's engine token ids (`kv_events.tokenize: {api:
/// llama_cpp}`) against a real llama-server: the ids fetched for a
/// conversation (template without the generation prompt, then tokenize)
/// are a prefix of the ids the server evaluates for that chat (their count
/// is the chat answer's `usage.prompt_tokens` once the generation prompt is
/// added), and the system message's ids a prefix of the conversation's.
#[tokio::test]
#[ignore = "needs llama-server: bash loadtest/llama_server.sh build"]
async fn engine_token_ids_from_llama_server_are_the_ids_it_evaluates() {
    use infergate_core::discovery::{Endpoint, Update};
    use infergate_core::pool::Pool;
    use infergate_core::routing::kv_events::{EngineTokens, TokenizeApi, TokenizeConfig};
    use infergate_protocol::prompt::{render_chat, ChatMessage};
    use std::sync::Arc;

    let Some((server, model)) = llama_or_skip("engine_token_ids_from_llama_server") else {
        return;
    };
    let (_replicas, urls) = start_replicas(&server, &model, 1).await;
    let pool = Arc::new(Pool::new("p", infergate_protocol::EngineKind::LlamaCpp));
    pool.apply(Update::Reset(vec![Endpoint::from_url(&urls[0]).unwrap()]));
    let tokens = Arc::new(EngineTokens::new(TokenizeConfig {
        api: TokenizeApi::LlamaCpp,
        cache_entries: 16,
        queue: 8,
        max_in_flight: 2,
        timeout_ms: 30_000,
    }));
    let run = tokio::spawn(tokens.clone().run(pool.clone()));
    let msgs = serde_json::json!([
        {"role": "system", "content": "You are the support assistant of a shop. ".repeat(10)},
        {"role": "user", "content": "Where is my order?"}
    ]);
    let parsed: Vec<ChatMessage> = serde_json::from_value(msgs.clone()).unwrap();
    let rendered = render_chat(&parsed);
    let rendered_sys = render_chat(&parsed[..1]);
    assert!(
        tokens.lookup("m", &rendered).is_none(),
        "nothing fetched yet"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let (conv, sys) = loop {
        let conv = tokens.lookup("m", &rendered);
        let sys = tokens.lookup("m", &rendered_sys);
        match (conv, sys) {
            (Some(c), Some(s)) if c.ids().len() > s.ids().len() => break (c, s),
            _ if Instant::now() > deadline => panic!("not fetched: {:?}", tokens.stats()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(tokens.stats().errors, 0);
    assert!(
        conv.ids().starts_with(sys.ids()),
        "{:?} / {:?}",
        conv.ids(),
        sys.ids()
    );
    // What the server evaluates for the chat: the same ids, then the
    // generation prompt's.
    let templ = post_json(
        &format!("{}/apply-template", urls[0]),
        &serde_json::json!({"messages": msgs}),
    )
    .await;
    let full = post_json(
        &format!("{}/tokenize", urls[0]),
        &serde_json::json!({"content": templ["prompt"], "parse_special": true}),
    )
    .await;
    let full: Vec<u32> = full["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert!(full.starts_with(conv.ids()) && full.len() > conv.ids().len());
    let answer = post_json(
        &format!("{}/v1/chat/completions", urls[0]),
        &serde_json::json!({"messages": msgs, "max_tokens": 1}),
    )
    .await;
    assert_eq!(
        answer["usage"]["prompt_tokens"].as_u64(),
        Some(full.len() as u64),
        "{answer}"
    );
    run.abort();
}

#[tokio::test]
#[ignore = "needs llama-server: bash loadtest/llama_server.sh build"]
async fn shared_prefix_chats_stick_to_the_llama_server_holding_their_prompt() {
    let Some((server, model)) =
        llama_or_skip("shared_prefix_chats_stick_to_the_llama_server_holding_their_prompt")
    else {
        return;
    };
    let (_replicas, urls) = start_replicas(&server, &model, 2).await;
    let eps: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let yaml = format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: {{ address: \"127.0.0.1:0\" }}\n\
         pools:\n  - name: p\n    engine: llama.cpp\n    endpoints: [{}]\n\
         routes:\n  - model: m\n    pool: p\n    timeouts: {{ first_byte: 120s }}\n\
         \x20   routing: {{ scrape: {{ interval_ms: 50 }} }}\n",
        eps.join(", ")
    );
    let gw = gateway(infergate_core::config::Config::parse(&yaml, "t.yaml").unwrap()).await;
    let admin = gw.admin_url().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (groups, questions) = (3, 3);
    for q in 0..questions {
        for g in 0..groups {
            let (s, h, b) = post(&gw.url(), "/v1/chat/completions", &chat(g, q)).await;
            let body: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
            assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
            let id = h["x-request-id"].to_str().unwrap().to_string();
            let e = get_json(&format!("{admin}/routing/explain/{id}")).await;
            let d = &e["decision"];
            // The gateway read both replicas' llama.cpp metrics.
            let cands = d["candidates"].as_array().unwrap();
            assert_eq!(cands.len(), 2, "{e}");
            assert!(cands.iter().all(|c| c["fresh"] == true), "{e}");
            if q > 0 {
                // Routed to the replica holding the group's prompt...
                assert!(
                    d["cached_tokens"].as_u64().unwrap() > 200,
                    "group {g} q {q}: {e}"
                );
                // ... which served most of the prompt from its cache.
                let t = &body["timings"];
                let (cached, computed) = (
                    t["cache_n"].as_u64().unwrap(),
                    t["prompt_n"].as_u64().unwrap(),
                );
                assert!(
                    cached > 2 * computed,
                    "group {g} q {q}: cache_n {cached}, prompt_n {computed}"
                );
            }
        }
    }
    gw.shutdown().await;
}

//! The simulator's API surface: OpenAI JSON and SSE framing as vLLM sends it,
//! vLLM-like errors, and the side endpoints peer routers call.

mod sim_util;

use infergate_sim::{start_fleet, FleetConfig, Profile};
use serde_json::{json, Value};
use sim_util::*;

fn tiny() -> FleetConfig {
    FleetConfig {
        time_scale: 20.0,
        lora_adapters: vec!["sql-lora".into()],
        ..FleetConfig::with_profile(Profile::Tiny)
    }
}

#[tokio::test]
async fn chat_and_completions_json_with_usage() {
    let fleet = start_fleet(tiny()).await.unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    let (s, v) = post_json(
        &c,
        &format!("{url}/v1/chat/completions"),
        &chat("sim-tiny", "hello there", 7, false),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "sim-tiny");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let prompt =
        infergate_protocol::tokenizer::count_tokens("<|user|>\nhello there\n<|assistant|>\n");
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], prompt + 7);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(infergate_protocol::tokenizer::count_tokens(text), 7);

    let body = json!({"model": "sim-tiny", "prompt": "once upon a time", "max_tokens": 3});
    let (s, v) = post_json(&c, &format!("{url}/v1/completions"), &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    // A request without model goes to the served model.
    let (s, v) = post_json(
        &c,
        &format!("{url}/v1/completions"),
        &json!({"prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!((s.as_u16(), v["model"].clone()), (200, json!("sim-tiny")));
    fleet.shutdown().await;
}

#[tokio::test]
async fn chat_stream_is_framed_like_vllm() {
    let fleet = start_fleet(tiny()).await.unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    let mut body = chat("sim-tiny", "stream me", 5, true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = open_stream(&c, &format!("{url}/v1/chat/completions"), &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let events = read_events(resp.into_body()).await;
    // role chunk, 5 tokens, usage, [DONE]
    assert_eq!(events.len(), 8, "{events:?}");
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let v: Vec<Value> = events[..7]
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(v[0]["choices"][0]["delta"]["role"], "assistant");
    let id = v[0]["id"].clone();
    let mut text = String::new();
    for (i, c) in v[1..6].iter().enumerate() {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap());
        let fin = &c["choices"][0]["finish_reason"];
        if i == 4 {
            assert_eq!(fin, "length")
        } else {
            assert!(fin.is_null())
        }
        assert!(c.get("usage").is_none());
    }
    assert_eq!(infergate_protocol::tokenizer::count_tokens(&text), 5);
    assert_eq!(v[6]["choices"], json!([]));
    assert_eq!(v[6]["usage"]["completion_tokens"], 5);
    assert!(v[6]["usage"]["prompt_tokens_details"]["cached_tokens"].is_number());

    // Without include_usage there is no usage chunk; completions frame `text`.
    let body = json!({"prompt": "abc", "max_tokens": 2, "stream": true});
    let resp = open_stream(&c, &format!("{url}/v1/completions"), &body).await;
    let events = read_events(resp.into_body()).await;
    assert_eq!(events.len(), 3, "{events:?}");
    let v: Value = serde_json::from_str(&events[1].data).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["choices"][0]["text"].is_string());
    fleet.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_vllm_errors() {
    let fleet = start_fleet(tiny()).await.unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    let chat_url = format!("{url}/v1/chat/completions");
    let (s, _, b) = call(&c, "POST", &chat_url, None).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // Malformed JSON.
    let req = request(
        "POST",
        &chat_url,
        None,
        &[("content-type", "application/json")],
    );
    let req =
        req.map(|_| http_body_util::Full::new(bytes::Bytes::from_static(b"{\"messages\": [")));
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    // Missing messages, wrong types, max_tokens 0, stream_options without stream.
    for body in [
        json!({"model": "sim-tiny"}),
        json!({"messages": "hi"}),
        json!({"messages": [{"content": "no role"}]}),
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
        json!({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}),
    ] {
        let (s, v) = post_json(&c, &chat_url, &body).await;
        assert_eq!(s, 400, "{body} -> {v}");
        assert!(v["error"]["message"].is_string());
    }
    // Prompt longer than the context (tiny: 2048 tokens).
    let long = "x".repeat(4 * 2100);
    let (s, v) = post_json(&c, &chat_url, &chat("sim-tiny", &long, 10, false)).await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 2048"),
        "{v}"
    );
    let (s, v) = post_json(&c, &chat_url, &chat("sim-tiny", "short", 5000, false)).await;
    assert_eq!(s, 400, "{v}");
    // Unknown model: 404.
    let (s, v) = post_json(&c, &chat_url, &chat("gpt-nope", "x", 1, false)).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    // Unknown path, wrong method.
    let (s, _, _) = call(&c, "GET", &format!("{url}/nope"), None).await;
    assert_eq!(s, 404);
    let (s, _, _) = call(&c, "GET", &chat_url, None).await;
    assert_eq!(s, 405);
    // Still serving afterwards.
    let (s, _) = post_json(&c, &chat_url, &chat("sim-tiny", "ok", 1, false)).await;
    assert_eq!(s, 200);
    fleet.shutdown().await;
}

#[tokio::test]
async fn side_endpoints_models_tokenize_render_info_load() {
    let fleet = start_fleet(tiny()).await.unwrap();
    let url = fleet.urls()[0].clone();
    let c = client();
    let (s, _, b) = call(&c, "GET", &format!("{url}/v1/models"), None).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_slice(&b).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["sim-tiny", "sql-lora"]);
    assert_eq!(v["data"][1]["parent"], "sim-tiny");

    let (s, v) = post_json(
        &c,
        &format!("{url}/tokenize"),
        &json!({"model": "sim-tiny", "prompt": "abcdefgh"}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["count"], 2);
    assert_eq!(
        v["tokens"],
        json!(infergate_protocol::tokenizer::token_ids("abcdefgh"))
    );

    let msgs = json!({"model": "sim-tiny", "messages": [{"role": "user", "content": "hi"}]});
    let (s, v) = post_json(&c, &format!("{url}/v1/chat/completions/render"), &msgs).await;
    assert_eq!(s, 200);
    let text = infergate_protocol::prompt::render_chat(
        &serde_json::from_value::<Vec<infergate_protocol::prompt::ChatMessage>>(
            msgs["messages"].clone(),
        )
        .unwrap(),
    );
    assert_eq!(
        v["token_ids"],
        json!(infergate_protocol::tokenizer::token_ids(&text))
    );
    let (s, v) = post_json(
        &c,
        &format!("{url}/v1/completions/render"),
        &json!({"prompt": "abcd"}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v[0]["token_ids"].as_array().unwrap().len(), 1);

    for path in [
        "/server_info",
        "/get_server_info",
        "/model_info",
        "/get_model_info",
    ] {
        let (s, _, b) = call(&c, "GET", &format!("{url}{path}"), None).await;
        assert_eq!(s, 200, "{path}");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model_path"], "sim-tiny", "{path}");
    }
    let (s, _, b) = call(&c, "GET", &format!("{url}/get_load"), None).await;
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_slice::<Value>(&b).unwrap()["load"], 0);
    let (s, _, b) = call(&c, "GET", &format!("{url}/load"), None).await;
    assert_eq!(
        (
            s.as_u16(),
            serde_json::from_slice::<Value>(&b).unwrap()["server_load"].clone()
        ),
        (200, json!(0))
    );
    let (s, _, _) = call(&c, "GET", &format!("{url}/health"), None).await;
    assert_eq!(s, 200);
    let (s, v) = post_json(
        &c,
        &format!("{url}/v1/embeddings"),
        &json!({"input": ["a", "bb"]}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    fleet.shutdown().await;
}

#[tokio::test]
async fn replicas_have_their_own_ports_and_state_and_record_headers() {
    let fleet = start_fleet(FleetConfig {
        replicas: 3,
        ..tiny()
    })
    .await
    .unwrap();
    let urls = fleet.urls();
    assert_eq!(urls.len(), 3);
    assert!(urls[0] != urls[1] && urls[1] != urls[2]);
    let c = client();
    let (s, h, _) = call_with(
        &c,
        "POST",
        &format!("{}/v1/chat/completions", urls[1]),
        Some(&chat("sim-tiny", "hi", 2, false)),
        &[("x-request-id", "req-42")],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(h["x-request-id"], "req-42");
    assert_eq!(h["x-sim-replica"], "1");
    assert_eq!(fleet.replica(0).stats().requests_received, 0);
    let st = fleet.replica(1).stats();
    assert_eq!(st.requests_received, 1);
    assert_eq!(st.last_request_headers.unwrap()["x-request-id"], "req-42");
    assert_eq!(st.counters.generation_tokens, 2);
    fleet.shutdown().await;
}

//! The feature parser: fields, rewrites by splicing, and (property tests) the
//! one-pass prompt rendering equal to `protocol::prompt` on any JSON.

use super::*;
use infergate_protocol::prompt::{render_chat, render_completion_prompt, ChatMessage};
use proptest::prelude::*;
use serde_json::{json, Value};

#[test]
fn parses_responses_messages_rerank_and_score() {
    let r = parse_features(
        ApiKind::Responses,
        br#"{"model":"m","instructions":"S","input":"Q","max_output_tokens":9,"stream":true}"#,
    )
    .unwrap();
    assert_eq!(r.prompt_text, "<|system|>\nS\n<|user|>\nQ\n<|assistant|>\n");
    assert_eq!((r.max_tokens, r.stream), (Some(9), true));
    let m = parse_features(
        ApiKind::Messages,
        br#"{"model":"m","system":[{"type":"text","text":"S"}],"max_tokens":5,
            "messages":[{"role":"user","content":"Q"}]}"#,
    )
    .unwrap();
    assert_eq!(
        m.prompt_text, r.prompt_text,
        "the same chat, the same prefix"
    );
    assert_eq!(m.max_tokens, Some(5));
    let k = parse_features(
        ApiKind::Rerank,
        br#"{"model":"m","query":"q","documents":["a","b"]}"#,
    )
    .unwrap();
    assert_eq!(
        (k.prompt_text.as_str(), k.max_tokens),
        ("q\na\nb\n", Some(0))
    );
    let s = parse_features(
        ApiKind::Score,
        br#"{"model":"m","text_1":"q","text_2":["a"]}"#,
    )
    .unwrap();
    assert_eq!(s.prompt_text, "q\na\n");
    // A usage-injecting route leaves the non-OpenAI streams alone.
    let orig = Bytes::from_static(br#"{"model":"m","input":"Q","stream":true}"#);
    assert_eq!(upstream_body(&orig, &r, None, true, None).unwrap(), orig);
}

#[test]
fn parses_chat_features() {
    let body = br#"{"model":"m","stream":true,"max_completion_tokens":7,"user":"u",
        "messages":[{"role":"user","content":"hello world!"}],"temperature":0.5,
        "stream_options":{"include_usage":true}}"#;
    let f = parse_features(ApiKind::ChatCompletions, body).unwrap();
    assert_eq!(f.model, "m");
    assert!(f.stream && f.include_usage);
    assert_eq!(f.max_tokens, Some(7));
    assert_eq!(f.user.as_deref(), Some("u"));
    assert_eq!(f.prompt_text, "<|user|>\nhello world!\n<|assistant|>\n");
    assert_eq!(f.prompt_tokens, count_tokens(&f.prompt_text));
    assert_eq!(f.choices, 1);
}

#[test]
fn parses_completion_and_embedding_prompts() {
    let f = parse_features(
        ApiKind::Completions,
        br#"{"model":"m","prompt":"abcdefgh","max_tokens":3}"#,
    )
    .unwrap();
    assert_eq!(
        (f.prompt_tokens, f.max_tokens, f.stream),
        (2, Some(3), false)
    );
    let e = parse_features(ApiKind::Embeddings, br#"{"model":"m","input":["ab","cd"]}"#).unwrap();
    assert_eq!(e.prompt_text, "abcd");
}

#[test]
fn choices_are_the_larger_of_n_and_best_of() {
    let f = parse_features(ApiKind::Completions, br#"{"model":"m","n":4}"#).unwrap();
    assert_eq!(f.choices, 4);
    let f = parse_features(ApiKind::Completions, br#"{"model":"m","n":2,"best_of":5}"#).unwrap();
    assert_eq!(f.choices, 5);
    let e = parse_features(ApiKind::Completions, br#"{"model":"m","n":-1}"#).unwrap_err();
    assert_eq!(e.status, 400);
    let e = parse_features(ApiKind::Completions, br#"{"model":"m","n":1e30}"#).unwrap_err();
    assert_eq!(e.status, 400);
}

#[test]
fn rejects_bad_bodies() {
    let e = parse_features(ApiKind::Completions, b"{not json").unwrap_err();
    assert_eq!(e.status, 400);
    let e = parse_features(ApiKind::Completions, br#"{"prompt":"x"}"#).unwrap_err();
    assert_eq!((e.status.as_u16(), e.param), (400, Some("model")));
    let e = parse_features(ApiKind::Completions, b"[1,2]").unwrap_err();
    assert_eq!(e.status, 400);
    let e = parse_features(ApiKind::Completions, br#"["m"]"#).unwrap_err();
    assert_eq!(e.status, 400, "a positional array is not a request");
    let e = parse_features(ApiKind::Completions, br#"{"model":"a","model":"b"}"#).unwrap_err();
    assert_eq!(e.status, 400, "duplicate key");
    let e = parse_features(ApiKind::Completions, br#"{"model":7}"#).unwrap_err();
    assert_eq!((e.status.as_u16(), e.param), (400, Some("model")));
    let e = parse_features(
        ApiKind::ChatCompletions,
        br#"{"model":"m","messages":[{"content":"x"}]}"#,
    )
    .unwrap_err();
    assert_eq!(e.status, 400, "a message without a role");
    let deep = format!(
        "{{\"model\":\"m\",\"prompt\":{}{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let e = parse_features(ApiKind::Completions, deep.as_bytes()).unwrap_err();
    assert_eq!(e.status, 400, "nesting beyond serde_json's limit");
    let e = parse_features(ApiKind::Completions, b"{\"model\":\"\xff\"}").unwrap_err();
    assert_eq!(e.status, 400, "not UTF-8");
}

#[test]
fn rewrites_only_when_needed() {
    let orig = Bytes::from_static(br#"{"model":"a",  "stream":true}"#);
    let f = parse_features(ApiKind::Completions, &orig).unwrap();
    let same = upstream_body(&orig, &f, None, false, None).unwrap();
    assert_eq!(same, orig, "untouched bytes");
    let same = upstream_body(&orig, &f, Some("a"), false, None).unwrap();
    assert_eq!(same, orig, "same target model keeps bytes");
    let renamed = upstream_body(&orig, &f, Some("b"), true, None).unwrap();
    let v: Value = serde_json::from_slice(&renamed).unwrap();
    assert_eq!(v["model"], "b");
    assert_eq!(v["stream_options"]["include_usage"], true);
}

#[test]
fn rewrites_splice_the_original_bytes() {
    let orig = Bytes::from_static(
        br#" { "prompt": [1, 2,3], "model" : "a\u00e9", "stream":true, "stream_options": {"x": 1}, "z": {"k": [null]} }"#,
    );
    let f = parse_features(ApiKind::Completions, &orig).unwrap();
    assert_eq!(f.model, "a\u{e9}");
    let out = upstream_body(&orig, &f, Some("b\"q"), true, None).unwrap();
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#" { "prompt": [1, 2,3], "model" : "b\"q", "stream":true, "stream_options": {"include_usage":true,"x":1}, "z": {"k": [null]} }"#
    );
    let out = upstream_body(&orig, &f, Some("b"), false, None).unwrap();
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#" { "prompt": [1, 2,3], "model" : "b", "stream":true, "stream_options": {"x": 1}, "z": {"k": [null]} }"#
    );
}

/// Any JSON value, bounded in depth and size.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,5}|text|role|content", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A chat message: a role and content that is a string, parts, or anything.
fn message() -> impl Strategy<Value = Value> {
    let part = prop_oneof![
        ".{0,8}".prop_map(|t| json!({"type": "text", "text": t})),
        json_value(),
    ];
    let content = prop_oneof![
        ".{0,12}".prop_map(Value::String),
        prop::collection::vec(part, 0..4).prop_map(Value::Array),
        json_value(),
    ];
    ("[a-z]{1,9}", content, any::<bool>()).prop_map(|(role, content, content_first)| {
        // Both key orders: the rendering must not depend on it.
        let text = if content_first {
            format!(r#"{{"content":{content},"x":[1],"role":"{role}"}}"#)
        } else {
            format!(r#"{{"role":"{role}","content":{content}}}"#)
        };
        serde_json::from_str(&text).unwrap()
    })
}

proptest! {
    /// The one-pass rendering equals `protocol::prompt` (which the simulator
    /// uses) for any prompt.
    #[test]
    fn prompt_rendering_matches_the_value_rendering(prompt in json_value()) {
        let body = json!({"model": "m", "prompt": prompt.clone(), "input": prompt}).to_string();
        // The reference renders what serde_json reads back from the same text
        // (floats do not round-trip exactly through text).
        let read: Value = serde_json::from_str(&body).unwrap();
        let f = parse_features(ApiKind::Completions, body.as_bytes()).unwrap();
        prop_assert_eq!(&f.prompt_text, &render_completion_prompt(&read["prompt"]));
        let e = parse_features(ApiKind::Embeddings, body.as_bytes()).unwrap();
        prop_assert_eq!(&e.prompt_text, &render_completion_prompt(&read["input"]));
    }

    #[test]
    fn chat_rendering_matches_the_value_rendering(msgs in prop::collection::vec(message(), 0..5)) {
        let body = format!(
            r#"{{"model":"m","messages":[{}]}}"#,
            msgs.iter().map(Value::to_string).collect::<Vec<_>>().join(",")
        );
        let f = parse_features(ApiKind::ChatCompletions, body.as_bytes()).unwrap();
        let read: Value = serde_json::from_str(&body).unwrap();
        let typed: Vec<ChatMessage> = serde_json::from_value(read["messages"].clone()).unwrap();
        prop_assert_eq!(f.prompt_text, render_chat(&typed));
    }

    /// Any bytes: an answer (features or a 400), never a panic.
    #[test]
    fn any_bytes_parse_or_400(body in prop::collection::vec(any::<u8>(), 0..256)) {
        for kind in [ApiKind::ChatCompletions, ApiKind::Completions, ApiKind::Other] {
            if let Err(e) = parse_features(kind, &body) {
                prop_assert_eq!(e.status.as_u16(), 400);
            }
        }
    }

    /// Any JSON object with a model: a rewrite keeps every other field and
    /// sets exactly what was asked.
    #[test]
    fn rewrite_round_trips(
        extra in prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..5),
        target in ".{0,10}",
        stream in any::<bool>(),
    ) {
        let mut obj: serde_json::Map<String, Value> = extra.into_iter().collect();
        obj.insert("model".into(), json!("m"));
        obj.insert("stream".into(), json!(stream));
        obj.remove("stream_options");
        for k in ["max_tokens", "max_completion_tokens", "n", "best_of", "messages", "prompt", "input", "user"] {
            obj.remove(k);
        }
        let orig = Bytes::from(Value::Object(obj.clone()).to_string());
        // Chat: usage is injected only for the APIs with `stream_options`.
        let f = parse_features(ApiKind::ChatCompletions, &orig).unwrap();
        let out = upstream_body(&orig, &f, Some(&target), true, None).unwrap();
        let Value::Object(mut want) = serde_json::from_slice(&orig).unwrap() else {
            unreachable!("an object")
        };
        want.insert("model".into(), json!(target));
        if stream {
            want.insert("stream_options".into(), json!({"include_usage": true}));
        }
        let got: Value = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(got, Value::Object(want));
    }
}

#[test]
fn the_engine_priority_is_the_gateways_never_the_clients() {
    let orig = Bytes::from_static(br#"{"model":"a","priority":-100}"#);
    let f = parse_features(ApiKind::Completions, &orig).unwrap();
    assert!(f.priority_span.is_some());
    let body = |p| -> Value {
        serde_json::from_slice(&upstream_body(&orig, &f, None, false, p).unwrap()).unwrap()
    };
    assert_eq!(body(Some(1))["priority"], 1, "the band's, not the client's");
    assert_eq!(body(None)["priority"], 0, "vLLM's default elsewhere");
    let plain = Bytes::from_static(br#"{"model":"a"}"#);
    let f = parse_features(ApiKind::Completions, &plain).unwrap();
    let v: Value =
        serde_json::from_slice(&upstream_body(&plain, &f, None, false, Some(-1)).unwrap()).unwrap();
    assert_eq!(v["priority"], -1);
    assert_eq!(v["model"], "a");
    assert_eq!(upstream_body(&plain, &f, None, false, None).unwrap(), plain);
}

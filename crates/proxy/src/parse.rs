//! Parses only the request fields the gateway needs, and rewrites the body
//! only when a route asks for it (a different upstream model name, injected
//! `stream_options.include_usage`). Otherwise the client's bytes go upstream
//! untouched.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::context::{ApiKind, RequestFeatures};
use infergate_protocol::error::ApiError;
use infergate_protocol::prompt::{render_chat, render_completion_prompt, ChatMessage};
use infergate_protocol::tokenizer::count_tokens;

/// The subset of an OpenAI request body we read. Unknown fields are skipped.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    priority: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Parses the body of a `/v1/*` POST into [`RequestFeatures`].
/// 400 for malformed JSON, a non-object body, or a missing `model`.
pub(crate) fn parse_features(kind: ApiKind, body: &[u8]) -> Result<RequestFeatures, ApiError> {
    let probe: Probe<'_> = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
        .with_code("invalid_json")
    })?;
    let model = match probe.model {
        Some(m) if !m.is_empty() => m.into_owned(),
        _ => {
            return Err(
                ApiError::bad_request("You must provide a model parameter.").with_param("model")
            )
        }
    };
    let prompt_text = match kind {
        ApiKind::ChatCompletions => probe.messages.as_deref().map(render_chat),
        ApiKind::Completions => probe.prompt.as_ref().map(render_completion_prompt),
        ApiKind::Embeddings => probe.input.as_ref().map(render_completion_prompt),
        ApiKind::Other => probe
            .messages
            .as_deref()
            .map(render_chat)
            .or_else(|| probe.prompt.as_ref().map(render_completion_prompt)),
    }
    .unwrap_or_default();
    Ok(RequestFeatures {
        model,
        stream: probe.stream.unwrap_or(false),
        max_tokens: probe.max_completion_tokens.or(probe.max_tokens),
        prompt_tokens: count_tokens(&prompt_text),
        prompt_text,
        user: probe.user.map(Cow::into_owned),
        include_usage: probe
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        has_priority: probe.priority.is_some(),
    })
}

/// Returns the body to send upstream: the original bytes when nothing needs to
/// change, or a re-serialized body with `model` replaced, and/or
/// `stream_options.include_usage: true` added, and/or `priority` set to
/// `engine_priority` (the pool's engines take the band) or removed (they do
/// not: a client never picks its engine priority).
pub(crate) fn upstream_body(
    original: &Bytes,
    features: &RequestFeatures,
    target_model: Option<&str>,
    inject_usage: bool,
    engine_priority: Option<i64>,
) -> Result<Bytes, ApiError> {
    let rename = target_model.filter(|t| *t != features.model);
    let inject = inject_usage && features.stream && !features.include_usage;
    let priority = engine_priority.is_some() || features.has_priority;
    if rename.is_none() && !inject && !priority {
        return Ok(original.clone());
    }
    let mut obj: serde_json::Map<String, Value> = serde_json::from_slice(original)
        .map_err(|e| ApiError::bad_request(format!("We could not parse the JSON body: {e}")))?;
    if let Some(t) = rename {
        obj.insert("model".into(), Value::String(t.to_owned()));
    }
    match engine_priority {
        Some(p) => {
            obj.insert("priority".into(), Value::from(p));
        }
        None => {
            obj.remove("priority");
        }
    }
    if inject {
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if !opts.is_object() {
            *opts = Value::Object(Default::default());
        }
        if let Value::Object(o) = opts {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    serde_json::to_vec(&obj)
        .map(Bytes::from)
        .map_err(|e| ApiError::bad_request(format!("Could not re-encode the body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e =
            parse_features(ApiKind::Embeddings, br#"{"model":"m","input":["ab","cd"]}"#).unwrap();
        assert_eq!(e.prompt_text, "abcd");
    }

    #[test]
    fn rejects_bad_bodies() {
        let e = parse_features(ApiKind::Completions, b"{not json").unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_features(ApiKind::Completions, br#"{"prompt":"x"}"#).unwrap_err();
        assert_eq!((e.status.as_u16(), e.param), (400, Some("model")));
        let e = parse_features(ApiKind::Completions, b"[1,2]").unwrap_err();
        assert_eq!(e.status, 400);
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
    fn the_engine_priority_is_the_gateways_never_the_clients() {
        let orig = Bytes::from_static(br#"{"model":"a","priority":-100}"#);
        let f = parse_features(ApiKind::Completions, &orig).unwrap();
        assert!(f.has_priority);
        let body = |p| -> Value {
            serde_json::from_slice(&upstream_body(&orig, &f, None, false, p).unwrap()).unwrap()
        };
        assert_eq!(body(Some(1))["priority"], 1, "the band's, not the client's");
        assert!(body(None).get("priority").is_none(), "removed elsewhere");
        let plain = Bytes::from_static(br#"{"model":"a"}"#);
        let f = parse_features(ApiKind::Completions, &plain).unwrap();
        let v: Value =
            serde_json::from_slice(&upstream_body(&plain, &f, None, false, Some(-1)).unwrap())
                .unwrap();
        assert_eq!(v["priority"], -1);
        assert_eq!(upstream_body(&plain, &f, None, false, None).unwrap(), plain);
    }
}

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
use infergate_protocol::prompt::{
    render_anthropic, render_chat, render_completion_prompt, render_pair, render_responses,
    ChatMessage,
};
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
    /// Responses API.
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    instructions: Option<Value>,
    /// Anthropic messages.
    #[serde(default)]
    system: Option<Value>,
    /// Rerank (`query`, `documents`) and score (`text_1`, `text_2`).
    #[serde(default)]
    query: Option<Value>,
    #[serde(default)]
    documents: Option<Value>,
    #[serde(default)]
    text_1: Option<Value>,
    #[serde(default)]
    text_2: Option<Value>,
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
        ApiKind::Responses => Some(render_responses(
            probe.instructions.as_ref(),
            probe.input.as_ref(),
        )),
        ApiKind::Messages => probe
            .messages
            .as_deref()
            .map(|m| render_anthropic(probe.system.as_ref(), m)),
        ApiKind::Rerank => Some(render_pair(probe.query.as_ref(), probe.documents.as_ref())),
        ApiKind::Score => Some(render_pair(probe.text_1.as_ref(), probe.text_2.as_ref())),
        ApiKind::Other => probe
            .messages
            .as_deref()
            .map(render_chat)
            .or_else(|| probe.prompt.as_ref().map(render_completion_prompt)),
    }
    .unwrap_or_default();
    let max_tokens = match kind {
        // Nothing is generated: the whole cost is the prompt.
        ApiKind::Rerank | ApiKind::Score => Some(0),
        ApiKind::Responses => probe.max_output_tokens,
        _ => probe.max_completion_tokens.or(probe.max_tokens),
    };
    Ok(RequestFeatures {
        api: kind,
        model,
        stream: probe.stream.unwrap_or(false),
        max_tokens,
        prompt_tokens: count_tokens(&prompt_text),
        prompt_text,
        user: probe.user.map(Cow::into_owned),
        include_usage: probe
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// Returns the body to send upstream: the original bytes when nothing needs to
/// change, or a re-serialized body with `model` replaced and/or
/// `stream_options.include_usage: true` added.
pub(crate) fn upstream_body(
    original: &Bytes,
    features: &RequestFeatures,
    target_model: Option<&str>,
    inject_usage: bool,
) -> Result<Bytes, ApiError> {
    let rename = target_model.filter(|t| *t != features.model);
    let inject = inject_usage
        && features.stream
        && !features.include_usage
        && features.api.takes_stream_options();
    if rename.is_none() && !inject {
        return Ok(original.clone());
    }
    let mut obj: serde_json::Map<String, Value> = serde_json::from_slice(original)
        .map_err(|e| ApiError::bad_request(format!("We could not parse the JSON body: {e}")))?;
    if let Some(t) = rename {
        obj.insert("model".into(), Value::String(t.to_owned()));
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
        assert_eq!(upstream_body(&orig, &r, None, true).unwrap(), orig);
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
        let same = upstream_body(&orig, &f, None, false).unwrap();
        assert_eq!(same, orig, "untouched bytes");
        let same = upstream_body(&orig, &f, Some("a"), false).unwrap();
        assert_eq!(same, orig, "same target model keeps bytes");
        let renamed = upstream_body(&orig, &f, Some("b"), true).unwrap();
        let v: Value = serde_json::from_slice(&renamed).unwrap();
        assert_eq!(v["model"], "b");
        assert_eq!(v["stream_options"]["include_usage"], true);
    }
}

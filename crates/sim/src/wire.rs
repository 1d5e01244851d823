//! The OpenAI wire format as vLLM frames it: request parsing and validation
//! messages, deterministic output text, SSE chunks written into reusable
//! buffers, and the non-streaming JSON bodies.

use bytes::{BufMut, BytesMut};
use serde::Deserialize;
use serde_json::{json, Value};

use infergate_protocol::error::ApiError;
use infergate_protocol::prompt::ChatMessage;

/// Which generation endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApiKind {
    Chat,
    Completion,
}

impl ApiKind {
    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (ApiKind::Chat, true) => "chat.completion.chunk",
            (ApiKind::Chat, false) => "chat.completion",
            (ApiKind::Completion, _) => "text_completion",
        }
    }
    fn id_prefix(self) -> &'static str {
        match self {
            ApiKind::Chat => "chatcmpl-",
            ApiKind::Completion => "cmpl-",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The fields of a generation request the simulator acts on; others are ignored
/// (as vLLM ignores fields it does not use).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct GenRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub prompt: Option<Value>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Embeddings input.
    #[serde(default)]
    pub input: Option<Value>,
    /// vLLM's scheduling priority (lower first; priority scheduling only).
    #[serde(default)]
    pub priority: Option<i64>,
}

/// Parses a JSON body, answering malformed JSON and wrong field types with 400.
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "JSON decode error"
        } else {
            "Invalid request"
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// vLLM's message for a request that does not fit the context.
pub(crate) fn too_long(max_model_len: u32, prompt: u32, max_tokens: Option<u32>) -> ApiError {
    let msg = match max_tokens {
        Some(m) => format!(
            "'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's maximum context length is {max_model_len} tokens and your request has {prompt} input tokens ({m} > {max_model_len} - {prompt})."
        ),
        None => format!(
            "This model's maximum context length is {max_model_len} tokens. However, your request has {prompt} input tokens. Please reduce the length of the input messages."
        ),
    };
    ApiError::bad_request(msg)
}

/// Output vocabulary: each entry is exactly one token of the shared tokenizer
/// (4 characters), so re-tokenizing the output counts what `usage` says.
const WORDS: [&str; 16] = [
    " the", " and", " for", " not", " you", " all", " can", " her", " was", " one", " our", " out",
    " day", " get", " has", " him",
];

/// Text of output token `i` of a sequence with `seed`.
pub(crate) fn token_text(seed: u64, i: u32) -> &'static str {
    WORDS[((seed as usize).wrapping_add(i as usize)) % WORDS.len()]
}

/// The whole output text of `n` tokens.
pub(crate) fn output_text(seed: u64, n: u32) -> String {
    let mut s = String::with_capacity(n as usize * 4);
    for i in 0..n {
        s.push_str(token_text(seed, i));
    }
    s
}

/// `usage` with `prompt_tokens_details.cached_tokens`.
pub(crate) fn usage_json(prompt: u32, completion: u32, cached: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// Writes the SSE chunks of one streamed response. Everything that does not
/// change per token is rendered once, at request start.
#[derive(Debug)]
pub(crate) struct SseFramer {
    kind: ApiKind,
    /// `data: {"id":..,"object":..,"created":..,"model":..,`
    head: String,
    seed: u64,
}

const DONE: &[u8] = b"data: [DONE]\n\n";

impl SseFramer {
    pub(crate) fn new(kind: ApiKind, id: &str, created: u64, model: &str, seed: u64) -> Self {
        let model = serde_json::to_string(model).unwrap_or_else(|_| "\"\"".into());
        let head = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"{}\",\"created\":{created},\"model\":{model},",
            kind.object(true)
        );
        SseFramer { kind, head, seed }
    }

    /// Bytes a token chunk needs, for pre-sizing buffers.
    pub(crate) fn chunk_len(&self) -> usize {
        self.head.len() + 128
    }

    /// The chat stream's first chunk (`delta.role`), sent with the first token.
    pub(crate) fn role_chunk(&self, buf: &mut BytesMut) {
        if self.kind == ApiKind::Chat {
            buf.put_slice(self.head.as_bytes());
            buf.put_slice(br#""choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#);
            buf.put_slice(b"\n\n");
        }
    }

    /// Output token `i`; the last one carries its `finish_reason`.
    pub(crate) fn token_chunk(&self, buf: &mut BytesMut, i: u32, finish: Option<&str>) {
        buf.reserve(self.chunk_len());
        buf.put_slice(self.head.as_bytes());
        let text = token_text(self.seed, i).as_bytes();
        match self.kind {
            ApiKind::Chat => {
                buf.put_slice(br#""choices":[{"index":0,"delta":{"content":""#);
                buf.put_slice(text);
                buf.put_slice(br#""},"logprobs":null,"finish_reason":"#);
            }
            ApiKind::Completion => {
                buf.put_slice(br#""choices":[{"index":0,"text":""#);
                buf.put_slice(text);
                buf.put_slice(br#"","logprobs":null,"finish_reason":"#);
            }
        }
        match finish {
            None => buf.put_slice(b"null"),
            Some(r) => {
                buf.put_u8(b'"');
                buf.put_slice(r.as_bytes());
                buf.put_u8(b'"');
            }
        }
        buf.put_slice(b",\"stop_reason\":null}]}\n\n");
    }

    /// The `stream_options.include_usage` chunk (empty `choices`).
    pub(crate) fn usage_chunk(
        &self,
        buf: &mut BytesMut,
        prompt: u32,
        completion: u32,
        cached: u32,
    ) {
        buf.put_slice(self.head.as_bytes());
        buf.put_slice(b"\"choices\":[],\"usage\":");
        buf.put_slice(
            usage_json(prompt, completion, cached)
                .to_string()
                .as_bytes(),
        );
        buf.put_slice(b"}\n\n");
    }

    /// An error event (the engine dropped the request).
    pub(crate) fn error_chunk(&self, buf: &mut BytesMut, err: &ApiError) {
        buf.put_slice(b"data: ");
        buf.put_slice(&err.body());
        buf.put_slice(b"\n\n");
    }

    pub(crate) fn done(buf: &mut BytesMut) {
        buf.put_slice(DONE);
    }
}

/// The whole non-streaming response body.
#[allow(clippy::too_many_arguments)]
pub(crate) fn full_response(
    kind: ApiKind,
    id: &str,
    created: u64,
    model: &str,
    seed: u64,
    completion: u32,
    finish: &str,
    prompt: u32,
    cached: u32,
) -> Value {
    let text = output_text(seed, completion);
    let choice = match kind {
        ApiKind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": null,
            "finish_reason": finish,
            "stop_reason": null,
        }),
        ApiKind::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": finish,
            "stop_reason": null,
        }),
    };
    json!({
        "id": id,
        "object": kind.object(false),
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_json(prompt, completion, cached),
    })
}

/// A fresh response id for `kind`.
pub(crate) fn new_id(kind: ApiKind) -> String {
    format!("{}{}", kind.id_prefix(), uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use infergate_protocol::tokenizer::count_tokens;

    #[test]
    fn chunks_are_valid_json_framed_like_vllm() {
        let f = SseFramer::new(ApiKind::Chat, "chatcmpl-1", 7, "m\"q", 3);
        let mut buf = BytesMut::new();
        f.role_chunk(&mut buf);
        f.token_chunk(&mut buf, 0, None);
        f.token_chunk(&mut buf, 1, Some("length"));
        f.usage_chunk(&mut buf, 10, 2, 4);
        SseFramer::done(&mut buf);
        let text = std::str::from_utf8(&buf).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|s| !s.is_empty()).collect();
        assert_eq!(events.len(), 5);
        assert_eq!(events[4], "data: [DONE]");
        let v: Vec<Value> = events[..4]
            .iter()
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect();
        assert_eq!(v[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(v[1]["model"], "m\"q");
        assert_eq!(v[1]["object"], "chat.completion.chunk");
        assert!(v[1]["choices"][0]["finish_reason"].is_null());
        assert_eq!(v[2]["choices"][0]["finish_reason"], "length");
        assert_eq!(v[3]["choices"].as_array().unwrap().len(), 0);
        assert_eq!(v[3]["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
        assert_eq!(v[3]["usage"]["total_tokens"], 12);
    }

    #[test]
    fn output_text_has_one_token_per_word() {
        assert_eq!(count_tokens(&output_text(9, 37)), 37);
        let v = full_response(ApiKind::Completion, "cmpl-1", 1, "m", 0, 5, "length", 3, 0);
        assert_eq!(v["object"], "text_completion");
        assert_eq!(count_tokens(v["choices"][0]["text"].as_str().unwrap()), 5);
    }

    #[test]
    fn bad_json_is_a_400() {
        let e = parse::<GenRequest>(b"{nope").unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse::<GenRequest>(br#"{"messages": 3}"#).unwrap_err();
        assert_eq!(e.status, 400);
    }
}

//! The wire formats as vLLM frames them: request parsing and validation
//! messages, deterministic output text, SSE chunks written into reusable
//! buffers, and the non-streaming JSON bodies: OpenAI chat and completions,
//! the Responses API (typed `event:` stream ending in `response.completed`
//! with usage) and Anthropic messages (`message_start` with input usage ...
//! `message_delta` with output usage, `message_stop`).

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
    /// `/v1/responses`.
    Responses,
    /// `/v1/messages` (Anthropic).
    Messages,
}

impl ApiKind {
    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (ApiKind::Chat, true) => "chat.completion.chunk",
            (ApiKind::Chat, false) => "chat.completion",
            (ApiKind::Completion, _) => "text_completion",
            (ApiKind::Responses, _) => "response",
            (ApiKind::Messages, _) => "message",
        }
    }
    fn id_prefix(self) -> &'static str {
        match self {
            ApiKind::Chat => "chatcmpl-",
            ApiKind::Completion => "cmpl-",
            ApiKind::Responses => "resp_",
            ApiKind::Messages => "msg_",
        }
    }
    /// Whether the stream is typed events that carry their own usage and
    /// end (no `stream_options`, no `data: [DONE]`).
    pub(crate) fn has_typed_events(self) -> bool {
        matches!(self, ApiKind::Responses | ApiKind::Messages)
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
    /// `/tokenize` with `messages`: whether the chat template ends with the
    /// assistant's turn opening (vLLM's default: true).
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Embeddings and Responses API input.
    #[serde(default)]
    pub input: Option<Value>,
    /// vLLM's scheduling priority (lower first; priority scheduling only).
    #[serde(default)]
    pub priority: Option<i64>,
    /// Responses API.
    #[serde(default)]
    pub instructions: Option<Value>,
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    /// Anthropic messages.
    #[serde(default)]
    pub system: Option<Value>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub n: Option<i64>,
}

/// Roles vLLM's chat templates accept.
const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

/// Checks what vLLM's request validation checks before scheduling (roles,
/// content types, sampling ranges, `n`); the context length is checked once
/// the prompt is tokenized. A violation is vLLM's 400.
pub(crate) fn validate(r: &GenRequest) -> Result<(), ApiError> {
    for (i, m) in r.messages.iter().flatten().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].role: unknown role `{}` (expected one of {})",
                m.role,
                ROLES.join(", ")
            ))
            .with_param("messages"));
        }
        let ok = match &m.content {
            Value::String(_) | Value::Null => true,
            Value::Array(parts) => {
                parts
                    .iter()
                    .all(|p| match p.get("type").and_then(Value::as_str) {
                        Some("text") => p.get("text").is_some_and(Value::is_string),
                        Some(_) => true,
                        None => false,
                    })
            }
            _ => false,
        };
        if !ok {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].content: expected a string or a list of typed content parts"
            ))
            .with_param("messages"));
        }
    }
    if let Some(t) = r.temperature {
        if !(t >= 0.0 && t.is_finite()) {
            return Err(ApiError::bad_request(format!(
                "temperature must be non-negative, got {t}."
            ))
            .with_param("temperature"));
        }
    }
    if let Some(p) = r.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(
                ApiError::bad_request(format!("top_p must be in (0, 1], got {p}."))
                    .with_param("top_p"),
            );
        }
    }
    if let Some(n) = r.n {
        if n < 1 {
            return Err(
                ApiError::bad_request(format!("n must be at least 1, got {n}.")).with_param("n"),
            );
        }
    }
    Ok(())
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
    /// For the typed-event streams, which repeat them in their own shapes.
    id: String,
    created: u64,
    model: String,
    /// Prompt tokens (Anthropic's `message_start` reports them).
    prompt_tokens: u32,
}

const DONE: &[u8] = b"data: [DONE]\n\n";

impl SseFramer {
    pub(crate) fn new(kind: ApiKind, id: &str, created: u64, model: &str, seed: u64) -> Self {
        let quoted = serde_json::to_string(model).unwrap_or_else(|_| "\"\"".into());
        let head = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"{}\",\"created\":{created},\"model\":{quoted},",
            kind.object(true)
        );
        SseFramer {
            kind,
            head,
            seed,
            id: id.to_owned(),
            created,
            model: model.to_owned(),
            prompt_tokens: 0,
        }
    }

    /// Whether this stream is typed events (Responses API, Anthropic).
    pub(crate) fn has_typed_events(&self) -> bool {
        self.kind.has_typed_events()
    }

    /// Sets the prompt size (reported by Anthropic's first event).
    pub(crate) fn with_prompt_tokens(mut self, n: u32) -> Self {
        self.prompt_tokens = n;
        self
    }

    fn event(buf: &mut BytesMut, name: &str, data: &Value) {
        buf.put_slice(b"event: ");
        buf.put_slice(name.as_bytes());
        buf.put_slice(b"\ndata: ");
        buf.put_slice(data.to_string().as_bytes());
        buf.put_slice(b"\n\n");
    }

    fn item_id(&self) -> String {
        format!("msg_{}", self.id.trim_start_matches("resp_"))
    }

    /// Bytes a token chunk needs, for pre-sizing buffers.
    pub(crate) fn chunk_len(&self) -> usize {
        self.head.len() + 128
    }

    /// The chat stream's first chunk (`delta.role`), sent with the first
    /// token; the typed-event streams' opening events.
    pub(crate) fn role_chunk(&self, buf: &mut BytesMut) {
        match self.kind {
            ApiKind::Responses => {
                let resp = responses_body(
                    &self.id,
                    self.created,
                    &self.model,
                    "in_progress",
                    None,
                    None,
                );
                Self::event(
                    buf,
                    "response.created",
                    &json!({"type": "response.created", "sequence_number": 0, "response": resp}),
                );
                let item = json!({"type": "message", "id": self.item_id(), "status": "in_progress", "role": "assistant", "content": []});
                Self::event(
                    buf,
                    "response.output_item.added",
                    &json!({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": item}),
                );
                Self::event(
                    buf,
                    "response.content_part.added",
                    &json!({"type": "response.content_part.added", "sequence_number": 2, "item_id": self.item_id(), "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
                );
                return;
            }
            ApiKind::Messages => {
                let msg = json!({"id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.model,
                    "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 1}});
                Self::event(
                    buf,
                    "message_start",
                    &json!({"type": "message_start", "message": msg}),
                );
                Self::event(
                    buf,
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                );
                return;
            }
            ApiKind::Chat | ApiKind::Completion => {}
        }
        if self.kind == ApiKind::Chat {
            buf.put_slice(self.head.as_bytes());
            buf.put_slice(br#""choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#);
            buf.put_slice(b"\n\n");
        }
    }

    /// Output token `i`; the last one carries its `finish_reason`.
    pub(crate) fn token_chunk(&self, buf: &mut BytesMut, i: u32, finish: Option<&str>) {
        buf.reserve(self.chunk_len());
        let word = token_text(self.seed, i);
        match self.kind {
            ApiKind::Responses => {
                let e = json!({"type": "response.output_text.delta", "sequence_number": 3 + i, "item_id": self.item_id(),
                    "output_index": 0, "content_index": 0, "delta": word, "logprobs": []});
                return Self::event(buf, "response.output_text.delta", &e);
            }
            ApiKind::Messages => {
                let e = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}});
                return Self::event(buf, "content_block_delta", &e);
            }
            ApiKind::Chat | ApiKind::Completion => {}
        }
        buf.put_slice(self.head.as_bytes());
        let text = word.as_bytes();
        match self.kind {
            ApiKind::Chat => {
                buf.put_slice(br#""choices":[{"index":0,"delta":{"content":""#);
                buf.put_slice(text);
                buf.put_slice(br#""},"logprobs":null,"finish_reason":"#);
            }
            ApiKind::Completion | ApiKind::Responses | ApiKind::Messages => {
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

    /// The typed-event streams' closing events, with the usage.
    pub(crate) fn end_events(
        &self,
        buf: &mut BytesMut,
        completion: u32,
        cached: u32,
        finish: &str,
    ) {
        let prompt = self.prompt_tokens;
        match self.kind {
            ApiKind::Responses => {
                let text = output_text(self.seed, completion);
                let n = 3 + completion;
                let id = self.item_id();
                Self::event(
                    buf,
                    "response.output_text.done",
                    &json!({"type": "response.output_text.done", "sequence_number": n, "item_id": id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
                );
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                Self::event(
                    buf,
                    "response.content_part.done",
                    &json!({"type": "response.content_part.done", "sequence_number": n + 1, "item_id": id, "output_index": 0, "content_index": 0, "part": part}),
                );
                let item = json!({"type": "message", "id": id, "status": "completed", "role": "assistant", "content": [part]});
                Self::event(
                    buf,
                    "response.output_item.done",
                    &json!({"type": "response.output_item.done", "sequence_number": n + 2, "output_index": 0, "item": item}),
                );
                let resp = responses_body(
                    &self.id,
                    self.created,
                    &self.model,
                    "completed",
                    Some(item),
                    Some(responses_usage(prompt, completion, cached)),
                );
                Self::event(
                    buf,
                    "response.completed",
                    &json!({"type": "response.completed", "sequence_number": n + 3, "response": resp}),
                );
            }
            ApiKind::Messages => {
                Self::event(
                    buf,
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                );
                Self::event(
                    buf,
                    "message_delta",
                    &json!({"type": "message_delta", "delta": {"stop_reason": anthropic_stop(finish), "stop_sequence": null},
                    "usage": {"input_tokens": prompt, "output_tokens": completion, "cache_read_input_tokens": cached}}),
                );
                Self::event(buf, "message_stop", &json!({"type": "message_stop"}));
            }
            ApiKind::Chat | ApiKind::Completion => {}
        }
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

/// Anthropic's name for a finish reason.
fn anthropic_stop(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        _ => "end_turn",
    }
}

/// The Responses API's usage object.
fn responses_usage(prompt: u32, completion: u32, cached: u32) -> Value {
    json!({
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    })
}

/// A Responses API `response` object.
fn responses_body(
    id: &str,
    created: u64,
    model: &str,
    status: &str,
    item: Option<Value>,
    usage: Option<Value>,
) -> Value {
    json!({
        "id": id, "object": "response", "created_at": created, "model": model, "status": status,
        "output": item.map_or_else(Vec::new, |i| vec![i]), "usage": usage,
        "error": null, "incomplete_details": null, "instructions": null, "metadata": {},
        "parallel_tool_calls": true, "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0,
        "max_output_tokens": null, "previous_response_id": null, "reasoning": null,
        "text": {"format": {"type": "text"}}, "truncation": "disabled",
    })
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
    match kind {
        ApiKind::Responses => {
            let item = json!({"type": "message", "id": format!("msg_{}", id.trim_start_matches("resp_")), "status": "completed",
                "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]});
            return responses_body(
                id,
                created,
                model,
                "completed",
                Some(item),
                Some(responses_usage(prompt, completion, cached)),
            );
        }
        ApiKind::Messages => {
            return json!({
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": anthropic_stop(finish), "stop_sequence": null,
                "usage": {"input_tokens": prompt, "output_tokens": completion, "cache_read_input_tokens": cached},
            });
        }
        ApiKind::Chat | ApiKind::Completion => {}
    }
    let choice = match kind {
        ApiKind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": null,
            "finish_reason": finish,
            "stop_reason": null,
        }),
        _ => json!({
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

    /// `(event name, data)` of each typed event in `buf`.
    fn typed_events(buf: &[u8]) -> Vec<(String, Value)> {
        std::str::from_utf8(buf)
            .unwrap()
            .split("\n\n")
            .filter(|s| !s.is_empty())
            .map(|e| {
                let (name, data) = e.split_once("\ndata: ").unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_string();
                let data: Value = serde_json::from_str(data).unwrap();
                assert_eq!(data["type"], name.as_str(), "the type names the event");
                (name, data)
            })
            .collect()
    }

    #[test]
    fn responses_and_messages_streams_are_typed_events_ending_with_usage() {
        let f = SseFramer::new(ApiKind::Responses, "resp_1", 7, "m", 3).with_prompt_tokens(10);
        let mut buf = BytesMut::new();
        f.role_chunk(&mut buf);
        f.token_chunk(&mut buf, 0, None);
        f.token_chunk(&mut buf, 1, Some("length"));
        f.end_events(&mut buf, 2, 4, "length");
        let ev = typed_events(&buf);
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "response.created");
        assert_eq!(
            names
                .iter()
                .filter(|n| **n == "response.output_text.delta")
                .count(),
            2
        );
        let (last, done) = ev.last().unwrap();
        assert_eq!(last, "response.completed");
        let u = &done["response"]["usage"];
        assert_eq!(
            (u["input_tokens"].as_u64(), u["output_tokens"].as_u64()),
            (Some(10), Some(2))
        );
        assert_eq!(u["input_tokens_details"]["cached_tokens"], 4);
        assert_eq!(
            done["response"]["output"][0]["content"][0]["text"],
            output_text(3, 2)
        );
        assert!(!std::str::from_utf8(&buf).unwrap().contains("[DONE]"));

        let f = SseFramer::new(ApiKind::Messages, "msg_1", 7, "m", 3).with_prompt_tokens(10);
        let mut buf = BytesMut::new();
        f.role_chunk(&mut buf);
        f.token_chunk(&mut buf, 0, None);
        f.end_events(&mut buf, 1, 0, "stop");
        let ev = typed_events(&buf);
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(ev[0].1["message"]["usage"]["input_tokens"], 10);
        assert_eq!(ev[4].1["usage"]["output_tokens"], 1);
        assert_eq!(ev[4].1["delta"]["stop_reason"], "end_turn");
    }

    #[test]
    fn output_text_has_one_token_per_word() {
        assert_eq!(count_tokens(&output_text(9, 37)), 37);
        let v = full_response(ApiKind::Completion, "cmpl-1", 1, "m", 0, 5, "length", 3, 0);
        assert_eq!(v["object"], "text_completion");
        assert_eq!(count_tokens(v["choices"][0]["text"].as_str().unwrap()), 5);
    }

    #[test]
    fn validates_like_vllm() {
        let ok = |b: &str| validate(&parse::<GenRequest>(b.as_bytes()).unwrap());
        assert!(ok(r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"q"},{"type":"image_url","image_url":{"url":"x"}}]},{"role":"assistant","content":null},{"role":"tool","content":"r"},{"role":"developer","content":"d"}],"temperature":0,"top_p":1,"n":2}"#).is_ok());
        for (body, param) in [
            (
                r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
                "messages",
            ),
            (r#"{"messages":[{"role":"user","content":7}]}"#, "messages"),
            (
                r#"{"messages":[{"role":"user","content":[{"text":"no type"}]}]}"#,
                "messages",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":3}]}]}"#,
                "messages",
            ),
            (r#"{"prompt":"x","temperature":-0.5}"#, "temperature"),
            (r#"{"prompt":"x","top_p":0}"#, "top_p"),
            (r#"{"prompt":"x","top_p":1.5}"#, "top_p"),
            (r#"{"prompt":"x","n":0}"#, "n"),
        ] {
            let e = ok(body).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param), (400, Some(param)), "{body}");
        }
    }

    #[test]
    fn bad_json_is_a_400() {
        let e = parse::<GenRequest>(b"{nope").unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse::<GenRequest>(br#"{"messages": 3}"#).unwrap_err();
        assert_eq!(e.status, 400);
    }
}

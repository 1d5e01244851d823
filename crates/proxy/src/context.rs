//! The per-request context: what the gateway knows about one request as it
//! moves through the pipeline. Routing and admission read it; extend it here
//! when a step needs another parsed field or header.

use std::time::Instant;

use http::HeaderMap;

/// Header carrying the request id (generated when the client sends none).
pub const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
/// Header naming the replica that served the request (added to responses).
pub const REPLICA_HEADER: http::HeaderName = http::HeaderName::from_static("x-infergate-replica");
/// Request header with the client's priority (free-form; admission interprets it).
pub const PRIORITY_HEADER: &str = "x-infergate-priority";
/// Request header naming the tenant (free-form; admission interprets it).
pub const TENANT_HEADER: &str = "x-infergate-tenant";

/// Which OpenAI endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    ChatCompletions,
    Completions,
    Embeddings,
    /// Another `/v1/*` POST, passed through to the route's model.
    Other,
}

impl ApiKind {
    pub fn from_path(path: &str) -> ApiKind {
        match path {
            "/v1/chat/completions" => ApiKind::ChatCompletions,
            "/v1/completions" => ApiKind::Completions,
            "/v1/embeddings" => ApiKind::Embeddings,
            _ => ApiKind::Other,
        }
    }
}

/// The fields of the JSON body that the gateway needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFeatures {
    pub model: String,
    pub stream: bool,
    /// `max_tokens` or `max_completion_tokens`, when set.
    pub max_tokens: Option<u32>,
    /// The prompt rendered to text (see `protocol::prompt`).
    pub prompt_text: String,
    /// Tokens of `prompt_text` by the shared tokenizer.
    pub prompt_tokens: u32,
    pub user: Option<String>,
    /// The client asked for a usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
}

/// One request as it moves through the pipeline.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub received_at: Instant,
    pub kind: ApiKind,
    pub features: RequestFeatures,
    /// `x-infergate-priority` as sent.
    pub priority: Option<String>,
    /// `x-infergate-tenant` as sent.
    pub tenant: Option<String>,
    /// The model name sent upstream (the route's `target_model`, or as sent).
    pub upstream_model: String,
    /// Expected output tokens (request's max_tokens or the route default).
    pub expected_output_tokens: u32,
}

impl RequestContext {
    pub fn new(
        request_id: String,
        received_at: Instant,
        kind: ApiKind,
        headers: &HeaderMap,
    ) -> Self {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        RequestContext {
            request_id,
            received_at,
            kind,
            features: RequestFeatures::default(),
            priority: header(PRIORITY_HEADER),
            tenant: header(TENANT_HEADER),
            upstream_model: String::new(),
            expected_output_tokens: 0,
        }
    }
}

//! The per-request context: what the gateway knows about one request as it
//! moves through the pipeline. Routing and admission read it; extend it here
//! when a step needs another parsed field or header.

/// Header carrying the request id (generated when the client sends none).
pub(crate) const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
/// Header naming the replica that served the request (added to responses).
pub(crate) const REPLICA_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-infergate-replica");

/// Which OpenAI endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApiKind {
    ChatCompletions,
    Completions,
    Embeddings,
    /// Another `/v1/*` POST, passed through to the route's model.
    Other,
}

impl ApiKind {
    pub(crate) fn from_path(path: &str) -> ApiKind {
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
pub(crate) struct RequestFeatures {
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
    /// The body has a `priority` field (only the gateway sets the engine's).
    pub has_priority: bool,
}

/// One request as it moves through the pipeline.
#[derive(Debug, Clone)]
pub(crate) struct RequestContext {
    pub request_id: String,
    pub features: RequestFeatures,
    /// Expected output tokens (request's max_tokens or the route default).
    pub expected_output_tokens: u32,
}

impl RequestContext {
    pub(crate) fn new(request_id: String) -> Self {
        RequestContext {
            request_id,
            features: RequestFeatures::default(),
            expected_output_tokens: 0,
        }
    }
}

//! The per-request context: what the gateway knows about one request as it
//! moves through the pipeline. Routing and admission read it; extend it here
//! when a step needs another parsed field or header.

use infergate_core::endpoint::InferenceEndpoint;
use infergate_protocol::error::ErrorShape;

/// Header carrying the request id: the gateway's own, upstream and to the
/// client (a client's id would let two clients' requests share one).
pub(crate) const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
/// The id the client sent as `x-request-id`, kept apart (upstream, in the
/// log, echoed in the response).
pub(crate) const CLIENT_REQUEST_ID: http::HeaderName =
    http::HeaderName::from_static("x-client-request-id");
/// Header naming the replica that served the request (added to responses).
pub(crate) const REPLICA_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-infergate-replica");

/// Which inference API a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ApiKind {
    ChatCompletions,
    Completions,
    Embeddings,
    /// OpenAI Responses API (`/v1/responses`).
    Responses,
    /// Anthropic-style messages (`/v1/messages`).
    Messages,
    /// Rerank (`/v1/rerank`, `/rerank`, `/v2/rerank`): no output tokens.
    Rerank,
    /// Score (`/v1/score`, `/score`): no output tokens.
    Score,
    /// Another `/v1/*` POST, passed through to the route's model.
    #[default]
    Other,
}

impl ApiKind {
    /// The API of an allowed endpoint (`core::endpoint`'s path table).
    pub(crate) fn of(endpoint: InferenceEndpoint) -> ApiKind {
        match endpoint {
            InferenceEndpoint::ChatCompletions => ApiKind::ChatCompletions,
            InferenceEndpoint::Completions => ApiKind::Completions,
            InferenceEndpoint::Embeddings => ApiKind::Embeddings,
            InferenceEndpoint::Responses => ApiKind::Responses,
            InferenceEndpoint::Messages => ApiKind::Messages,
            InferenceEndpoint::Rerank => ApiKind::Rerank,
            InferenceEndpoint::Score => ApiKind::Score,
            InferenceEndpoint::Tokenize | InferenceEndpoint::Detokenize => ApiKind::Other,
        }
    }

    /// The GenAI semantic conventions' `gen_ai.operation.name` (`rerank`
    /// and `score` are not in the conventions yet; they keep their own names).
    pub(crate) fn operation(self) -> &'static str {
        match self {
            ApiKind::ChatCompletions | ApiKind::Responses | ApiKind::Messages => "chat",
            ApiKind::Completions => "text_completion",
            ApiKind::Embeddings => "embeddings",
            ApiKind::Rerank => "rerank",
            ApiKind::Score => "score",
            ApiKind::Other => "other",
        }
    }

    /// The error body its clients read (Anthropic's for messages).
    pub(crate) fn error_shape(self) -> ErrorShape {
        match self {
            ApiKind::Messages => ErrorShape::Anthropic,
            _ => ErrorShape::OpenAi,
        }
    }

    /// Whether the API takes `stream_options.include_usage` (the OpenAI
    /// chat and completions streams); the others report usage on their own.
    pub(crate) fn takes_stream_options(self) -> bool {
        matches!(self, ApiKind::ChatCompletions | ApiKind::Completions)
    }
}

/// The fields of the JSON body that the gateway needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RequestFeatures {
    pub api: ApiKind,
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
    /// Completions asked for: the larger of `n` and `best_of` (1 when unset).
    pub choices: u32,
    /// Where the `model` value sits in the body (for a rewrite by splicing).
    pub model_span: Option<std::ops::Range<usize>>,
    /// Where the `stream_options` value sits in the body, when present.
    pub stream_options_span: Option<std::ops::Range<usize>>,
    /// Where the client's `priority` value sits in the body (only the gateway
    /// sets the engine's).
    pub priority_span: Option<std::ops::Range<usize>>,
}

/// One request as it moves through the pipeline.
#[derive(Debug, Clone)]
pub(crate) struct RequestContext {
    pub request_id: std::sync::Arc<str>,
    pub features: RequestFeatures,
    /// Expected output tokens (request's max_tokens or the route default).
    pub expected_output_tokens: u32,
    /// The request's span, when tracing is on (its children start under it).
    pub trace: Option<crate::telemetry::trace::RequestTrace>,
}

impl RequestContext {
    pub(crate) fn new(request_id: std::sync::Arc<str>) -> Self {
        RequestContext {
            request_id,
            features: RequestFeatures::default(),
            expected_output_tokens: 0,
            trace: None,
        }
    }
}

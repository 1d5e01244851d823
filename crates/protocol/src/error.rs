//! OpenAI-style JSON errors: `{"error": {"message", "type", "param", "code"}}`,
//! and the same error in Anthropic's shape for the messages API
//! (`{"type": "error", "error": {"type", "message"}}`, [`ErrorShape`]).
//!
//! One type serves every place that answers a client with an error (gateway and
//! simulator alike), so bodies look the same everywhere and every status has one
//! `type` string.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI `type`, e.g. `invalid_request_error`.
    pub kind: &'static str,
    pub param: Option<&'static str>,
    /// Machine-readable code, e.g. `model_not_found`.
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429/503).
    pub retry_after_secs: Option<u64>,
}

/// Which API's error body a client reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ErrorShape {
    #[default]
    OpenAi,
    /// Anthropic-style messages (`/v1/messages`): its SDK reads `error.type`
    /// from `{"type": "error", "error": {...}}`.
    Anthropic,
}

#[derive(Serialize)]
struct AnthropicEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicBody<'a>,
}

#[derive(Serialize)]
struct AnthropicBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }
    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    /// 404 `model_not_found`.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let env = Envelope {
            error: Body {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        };
        // Serializing plain strings cannot fail.
        Bytes::from(serde_json::to_vec(&env).unwrap_or_default())
    }

    /// Anthropic's `error.type` for this error's status (its documented
    /// error types; the status itself is unchanged).
    pub fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            504 => "timeout_error",
            s if (400..500).contains(&s) => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// The JSON body in `shape`.
    pub fn body_as(&self, shape: ErrorShape) -> Bytes {
        match shape {
            ErrorShape::OpenAi => self.body(),
            ErrorShape::Anthropic => {
                let env = AnthropicEnvelope {
                    kind: "error",
                    error: AnthropicBody {
                        kind: self.anthropic_type(),
                        message: &self.message,
                    },
                };
                Bytes::from(serde_json::to_vec(&env).unwrap_or_default())
            }
        }
    }

    /// A full HTTP response with `content-type: application/json` and, where set,
    /// `retry-after`.
    pub fn into_response<B: From<Bytes>>(&self) -> Response<B> {
        self.into_response_as(ErrorShape::OpenAi)
    }

    /// [`Self::into_response`] with the body in `shape`.
    pub fn into_response_as<B: From<Bytes>>(&self, shape: ErrorShape) -> Response<B> {
        let mut resp = Response::new(B::from(self.body_as(shape)));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after_secs {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.kind,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_shape_names_its_error_types() {
        let e = ApiError::model_not_found("nope");
        let v: serde_json::Value =
            serde_json::from_slice(&e.body_as(ErrorShape::Anthropic)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "error", "error": {"type": "not_found_error", "message": "The model `nope` does not exist."}})
        );
        let r: Response<Bytes> = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "slow down",
        )
        .with_retry_after(3)
        .into_response_as(ErrorShape::Anthropic);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "3");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (413, "request_too_large"),
            (415, "invalid_request_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (504, "timeout_error"),
        ] {
            let e = ApiError::new(StatusCode::from_u16(status).unwrap(), "x", "m");
            assert_eq!(e.anthropic_type(), kind, "{status}");
        }
    }

    #[test]
    fn body_has_openai_shape() {
        let e = ApiError::model_not_found("m").with_retry_after(3);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        let r: Response<Bytes> = e.into_response();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(r.headers()["content-type"], "application/json");
    }
}

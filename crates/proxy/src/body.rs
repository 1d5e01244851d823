//! Reads a request body whole, within a byte limit, and checks its content type.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use infergate_protocol::error::ApiError;

/// Rejects a body that declares a type other than JSON (415). A missing
/// content type is accepted: many clients omit it.
pub(crate) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct.to_str().unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!("Content-Type must be application/json, got `{ct}`"),
        )
        .with_code("unsupported_media_type"))
    }
}

/// The 413 answered when a body is larger than `limit`.
pub(crate) fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("Request body is larger than the limit of {limit} bytes"),
    )
    .with_code("request_too_large")
}

/// Reads `body` whole; 413 past `limit` (early, from Content-Length, when it is
/// declared), 400 when the client's body breaks off.
pub(crate) async fn read_limited<B>(
    headers: &HeaderMap,
    body: B,
    limit: u64,
) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!(
            "Could not read the request body: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn limits_and_content_types() {
        let h = HeaderMap::new();
        let ok = read_limited(&h, Full::new(Bytes::from_static(b"12345")), 5).await;
        assert_eq!(ok.unwrap(), Bytes::from_static(b"12345"));
        let big = read_limited(&h, Full::new(Bytes::from_static(b"123456")), 5).await;
        assert_eq!(big.unwrap_err().status, 413);
        let mut declared = HeaderMap::new();
        declared.insert(http::header::CONTENT_LENGTH, "99".parse().unwrap());
        let early = read_limited(&declared, Full::new(Bytes::new()), 5).await;
        assert_eq!(early.unwrap_err().status, 413);

        let mut ct = HeaderMap::new();
        ct.insert(
            http::header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(check_content_type(&ct).is_ok());
        ct.insert(http::header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(check_content_type(&ct).unwrap_err().status, 415);
        assert!(check_content_type(&HeaderMap::new()).is_ok());
    }
}

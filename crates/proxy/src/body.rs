//! Reads a request body whole, within a byte limit, a deadline and the
//! process-wide budget of body bytes in flight, and checks its content type.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;

use infergate_protocol::error::ApiError;

/// Rejects a body that declares a type other than JSON (415). A missing
/// content type is accepted: many clients omit it.
pub(crate) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    // What nearly every client sends, without parsing the media type.
    if ct.as_bytes() == b"application/json" {
        return Ok(());
    }
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

/// Request-body bytes held by all requests at once, bounded by
/// `limits.max_inflight_body_bytes`: without it, many concurrent large bodies
/// (each under the per-request limit) exhaust memory together.
#[derive(Debug, Default)]
pub(crate) struct BodyBudget {
    used: AtomicU64,
}

impl BodyBudget {
    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// One request's share of the [`BodyBudget`]; returned on drop (when the body
/// is no longer held).
#[derive(Debug)]
pub(crate) struct BodyPermit {
    budget: Arc<BodyBudget>,
    bytes: u64,
}

impl BodyPermit {
    fn new(budget: &Arc<BodyBudget>) -> Self {
        BodyPermit {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Grows the share to `total` bytes, or fails (503) when the budget of
    /// `max` bytes cannot hold it.
    fn grow_to(&mut self, total: u64, max: u64) -> Result<(), ApiError> {
        let Some(more) = total.checked_sub(self.bytes).filter(|m| *m > 0) else {
            return Ok(());
        };
        let before = self.budget.used.fetch_add(more, Ordering::AcqRel);
        if before.saturating_add(more) > max {
            self.budget.used.fetch_sub(more, Ordering::AcqRel);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "The gateway is reading too many request bodies at once; retry shortly",
            )
            .with_code("body_budget_exhausted")
            .with_retry_after(1));
        }
        self.bytes = total;
        Ok(())
    }
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// How a body is read: its limit, the shared budget, the deadline.
pub(crate) struct BodyLimits<'a> {
    /// 413 beyond this many bytes.
    pub max_bytes: u64,
    pub budget: &'a Arc<BodyBudget>,
    /// The budget's size (`limits.max_inflight_body_bytes`).
    pub max_inflight: u64,
    /// 408 when the body is not complete by then.
    pub deadline: Instant,
    /// `limits.body_read_timeout`, for the message.
    pub timeout: Duration,
}

/// Reads `body` whole: 413 past `max_bytes` (early, from Content-Length, when
/// it is declared), 503 when the bodies in flight would exceed their budget,
/// 408 when it is not complete by the deadline (a slow client), 400 when the
/// client's body breaks off. The permit holds the body's bytes in the budget
/// and of the prompt text rendered from it (twice the body) for as long as
/// the caller keeps it.
pub(crate) async fn read_limited<B>(
    headers: &HeaderMap,
    body: B,
    limits: &BodyLimits<'_>,
) -> Result<(Bytes, BodyPermit), ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = limits.max_bytes;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let mut permit = BodyPermit::new(limits.budget);
    if let Some(n) = declared {
        permit.grow_to(n, limits.max_inflight)?;
    }
    let read = async {
        let mut body = std::pin::pin!(body);
        // A body in one frame (the common case) is kept as is, not copied.
        let mut single: Option<Bytes> = None;
        let mut joined: Vec<u8> = Vec::new();
        let mut len: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(format!("Could not read the request body: {}", e.into()))
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            len += data.len() as u64;
            if len > limit {
                return Err(too_large(limit));
            }
            permit.grow_to(len, limits.max_inflight)?;
            match single.take() {
                None if joined.is_empty() => single = Some(data),
                first => {
                    if let Some(first) = first {
                        let want = declared.unwrap_or(len).max(len);
                        joined.reserve(usize::try_from(want).unwrap_or(usize::MAX));
                        joined.extend_from_slice(&first);
                    }
                    joined.extend_from_slice(&data);
                }
            }
        }
        Ok(single.unwrap_or_else(|| Bytes::from(joined)))
    };
    match tokio::time::timeout_at(limits.deadline.into(), read).await {
        Ok(Ok(bytes)) => {
            // Parsing renders the prompt into a text at most as long as the
            // body (see `parse`): the permit holds room for both.
            permit.grow_to(2 * bytes.len() as u64, limits.max_inflight)?;
            Ok((bytes, permit))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "The request body did not arrive within {}",
                infergate_core::config::units::format_duration(limits.timeout)
            ),
        )
        .with_code("request_timeout")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn limits(budget: &Arc<BodyBudget>, max_bytes: u64, max_inflight: u64) -> BodyLimits<'_> {
        BodyLimits {
            max_bytes,
            budget,
            max_inflight,
            deadline: Instant::now() + Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn limits_and_content_types() {
        let b = Arc::new(BodyBudget::default());
        let h = HeaderMap::new();
        let ok = read_limited(
            &h,
            Full::new(Bytes::from_static(b"12345")),
            &limits(&b, 5, 100),
        )
        .await;
        let (bytes, permit) = ok.unwrap();
        assert_eq!(bytes, Bytes::from_static(b"12345"));
        assert_eq!(b.used(), 10, "the body and room for its rendered prompt");
        drop(permit);
        assert_eq!(b.used(), 0, "returned on drop");
        let big = read_limited(
            &h,
            Full::new(Bytes::from_static(b"123456")),
            &limits(&b, 5, 100),
        )
        .await;
        assert_eq!(big.unwrap_err().status, 413);
        let mut declared = HeaderMap::new();
        declared.insert(http::header::CONTENT_LENGTH, "99".parse().unwrap());
        let early = read_limited(&declared, Full::new(Bytes::new()), &limits(&b, 5, 100)).await;
        assert_eq!(early.unwrap_err().status, 413);
        assert_eq!(b.used(), 0);

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

    #[tokio::test]
    async fn the_budget_bounds_bodies_in_flight() {
        let b = Arc::new(BodyBudget::default());
        let h = HeaderMap::new();
        let (_a, held) = read_limited(
            &h,
            Full::new(Bytes::from(vec![b'x'; 60])),
            &limits(&b, 100, 200),
        )
        .await
        .unwrap();
        let e = read_limited(
            &h,
            Full::new(Bytes::from(vec![b'x'; 60])),
            &limits(&b, 100, 200),
        )
        .await
        .unwrap_err();
        assert_eq!((e.status.as_u16(), e.retry_after_secs), (503, Some(1)));
        assert_eq!(b.used(), 120, "the refused body gave its share back");
        drop(held);
        assert!(read_limited(
            &h,
            Full::new(Bytes::from(vec![b'x'; 60])),
            &limits(&b, 100, 200)
        )
        .await
        .is_ok());
    }

    #[tokio::test]
    async fn chunks_are_joined_and_a_slow_body_times_out() {
        let b = Arc::new(BodyBudget::default());
        let h = HeaderMap::new();
        let chunks =
            futures::stream::iter(["ab", "cd", "e"].map(|c| {
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(c)))
            }));
        let (bytes, _p) = read_limited(&h, StreamBody::new(chunks), &limits(&b, 10, 100))
            .await
            .unwrap();
        assert_eq!(bytes, Bytes::from_static(b"abcde"));

        let slow = futures::stream::unfold(0, |i| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            (i < 100).then(|| {
                (
                    Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(
                        b"x",
                    ))),
                    i + 1,
                )
            })
        });
        let mut l = limits(&b, 1000, 10_000);
        l.deadline = Instant::now() + Duration::from_millis(120);
        let e = read_limited(&h, StreamBody::new(slow), &l)
            .await
            .unwrap_err();
        assert_eq!(e.status, 408);
    }
}

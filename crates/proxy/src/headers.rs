//! Header hygiene between client and replica: hop-by-hop headers are not
//! forwarded (RFC 9110 §7.6.1; a response's are dropped as its head is
//! parsed, in `upstream::codec`), and the gateway sets Host, Content-Length and
//! the request ids itself (its own `x-request-id`; the client's in
//! `x-client-request-id`).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers plus the ones the gateway recomputes.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Headers listed in `Connection:` are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// W3C trace context: the gateway's attempt span replaces the client's
/// `traceparent` when tracing is on (`tracestate` passes through).
const TRACEPARENT: &str = "traceparent";

/// The headers the gateway sets on an upstream request.
pub(crate) struct GatewayHeaders<'a> {
    pub request_id: &'a HeaderValue,
    /// The client's own `x-request-id`, if it sent one.
    pub client_request_id: Option<&'a HeaderValue>,
    /// The attempt span's `traceparent` (tracing on).
    pub traceparent: Option<&'a HeaderValue>,
}

/// Calls `emit` with each header of the upstream request: the client's,
/// without hop-by-hop ones, Host, Content-Length, Expect and the request ids
/// (and its `traceparent` when the gateway sends its own), then the gateway's
/// request id, the client's own id (if it sent one) as `x-client-request-id`,
/// the gateway's `traceparent`, and the body's length. Written straight into
/// the request head, with no intermediate header map.
pub(crate) fn upstream_request_headers(
    client: &HeaderMap,
    ours: &GatewayHeaders<'_>,
    content_length: usize,
    mut emit: impl FnMut(&[u8], &[u8]),
) {
    let listed = connection_listed(client);
    for (name, value) in client {
        if is_hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::EXPECT
            || name == super::context::REQUEST_ID
            || name == super::context::CLIENT_REQUEST_ID
            || (ours.traceparent.is_some() && name.as_str() == TRACEPARENT)
            || listed.contains(name)
        {
            continue;
        }
        emit(name.as_str().as_bytes(), value.as_bytes());
    }
    emit(
        super::context::REQUEST_ID.as_str().as_bytes(),
        ours.request_id.as_bytes(),
    );
    if let Some(id) = ours.client_request_id {
        emit(
            super::context::CLIENT_REQUEST_ID.as_str().as_bytes(),
            id.as_bytes(),
        );
    }
    if let Some(tp) = ours.traceparent {
        emit(TRACEPARENT.as_bytes(), tp.as_bytes());
    }
    let mut length = itoa::Buffer::new();
    emit(b"content-length", length.format(content_length).as_bytes());
}

/// Whether a response is a server-sent event stream.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("host", "gw".parse().unwrap());
        h.insert("authorization", "Bearer k".parse().unwrap());
        h.insert("content-length", "3".parse().unwrap());
        h.insert("x-request-id", "client-chosen".parse().unwrap());
        h.insert("x-client-request-id", "spoofed".parse().unwrap());
        h.insert("traceparent", "00-client".parse().unwrap());
        h.insert("tracestate", "vendor=1".parse().unwrap());
        let mut out = Vec::new();
        let client_id = HeaderValue::from_static("client-chosen");
        let tp = HeaderValue::from_static("00-gateway");
        upstream_request_headers(
            &h,
            &GatewayHeaders {
                request_id: &HeaderValue::from_static("rid"),
                client_request_id: Some(&client_id),
                traceparent: Some(&tp),
            },
            10,
            |n, v| {
                out.push((
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                ))
            },
        );
        let pairs: Vec<(&str, &str)> = out.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("authorization", "Bearer k"),
                ("tracestate", "vendor=1"),
                ("x-request-id", "rid"),
                ("x-client-request-id", "client-chosen"),
                ("traceparent", "00-gateway"),
                ("content-length", "10")
            ]
        );
        // Tracing off: the client's trace context passes untouched.
        let mut names = Vec::new();
        upstream_request_headers(
            &h,
            &GatewayHeaders {
                request_id: &HeaderValue::from_static("rid"),
                client_request_id: None,
                traceparent: None,
            },
            0,
            |n, v| names.push((n.to_vec(), v.to_vec())),
        );
        assert!(names.contains(&(b"traceparent".to_vec(), b"00-client".to_vec())));
    }
}

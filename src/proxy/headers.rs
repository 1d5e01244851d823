//! Header hygiene between client and replica: hop-by-hop headers are not
//! forwarded (RFC 9110 §7.6.1), and the gateway sets Host, Content-Length and
//! the request id itself.

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

/// Copies the client's headers for the upstream request.
pub fn upstream_request_headers(
    client: &HeaderMap,
    request_id: &HeaderValue,
    content_length: usize,
) -> HeaderMap {
    let listed = connection_listed(client);
    let mut out = HeaderMap::with_capacity(client.len() + 2);
    for (name, value) in client {
        if is_hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::EXPECT
            || listed.contains(name)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(super::context::REQUEST_ID, request_id.clone());
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(content_length));
    out
}

/// Removes hop-by-hop headers from an upstream response in place.
pub fn clean_response_headers(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    for name in listed {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// Whether a response is a server-sent event stream.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
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
        let out = upstream_request_headers(&h, &HeaderValue::from_static("rid"), 10);
        assert!(out.get("x-secret").is_none() && out.get("host").is_none());
        assert_eq!(out["authorization"], "Bearer k");
        assert_eq!(out["content-length"], "10");
        assert_eq!(out["x-request-id"], "rid");
        let mut r = h.clone();
        clean_response_headers(&mut r);
        assert!(r.get("connection").is_none() && r.get("x-secret").is_none());
    }
}

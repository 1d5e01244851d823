//! Discovery: where a pool's replicas come from.
//!
//! Every source (the static list in the config file, a watched file, Kubernetes
//! EndpointSlices) produces the same stream of [`Update`]s, in the style of
//! linkerd2-proxy's `Resolve`: the pool applies them and never learns the source.
//! Kubernetes endpoints pass the first-scrape [`gate`] on their way;
//! [`ReplicaClient`] is the HTTP client every replica check (gate, scrape,
//! health probe) uses.

pub(crate) mod gate;
pub(crate) mod probe;

pub use gate::{run_gated, GateOptions};
pub use probe::ReplicaClient;

use std::sync::Arc;

/// One replica address as discovery sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Stable identity, `host:port`.
    pub key: Arc<str>,
    /// Base URL requests are sent to, `http://host:port`.
    pub base_url: Arc<str>,
}

impl Endpoint {
    /// Builds an endpoint from a base URL such as `http://127.0.0.1:8001` (a
    /// trailing slash is dropped). Returns `None` for a URL without a host.
    pub fn from_url(url: &str) -> Option<Endpoint> {
        let url = url.trim_end_matches('/');
        let uri: http::Uri = url.parse().ok()?;
        // `http::Uri::host` keeps an IPv6 literal's brackets; they are re-added below.
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let key: Arc<str> = if host.contains(':') {
            format!("[{host}]:{port}").into()
        } else {
            format!("{host}:{port}").into()
        };
        let scheme = uri.scheme_str().unwrap_or("http");
        Some(Endpoint {
            key: key.clone(),
            base_url: format!("{scheme}://{key}").into(),
        })
    }
}

/// A change to a pool's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The complete current set: anything not in it is removed.
    Reset(Vec<Endpoint>),
    /// These endpoints exist (adding one that exists is a no-op).
    Add(Vec<Endpoint>),
    /// These endpoint keys are gone (or terminating): no new requests go there;
    /// requests in flight on them finish.
    Remove(Vec<Arc<str>>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_from_url() {
        let e = Endpoint::from_url("http://127.0.0.1:8001/").unwrap();
        assert_eq!(&*e.key, "127.0.0.1:8001");
        assert_eq!(&*e.base_url, "http://127.0.0.1:8001");
        assert_eq!(&*Endpoint::from_url("http://vllm").unwrap().key, "vllm:80");
        assert!(Endpoint::from_url("not a url").is_none());
        let v6 = Endpoint::from_url("http://[fd00::1]:9000").unwrap();
        assert_eq!(&*v6.key, "[fd00::1]:9000");
        assert_eq!(&*v6.base_url, "http://[fd00::1]:9000");
    }
}

//! The one HTTP client that checks replicas. Discovery's gate (the first
//! probe), routing's scrape loops (`/metrics`) and outlier detection's health
//! probes all send the same kind of request, a `GET` of a path on a replica
//! with a timeout, so each pool has one [`ReplicaClient`] (`Pool::client`) and
//! its checks share its connections: the connection the gate opened is the
//! one the scraper reuses.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::Endpoint;

/// A replica's answer to a check.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: http::StatusCode,
    /// The body when it was asked for ([`BodyUse::Keep`]), else empty.
    pub(crate) body: Bytes,
}

/// What a check does with the response body. It is always read to its end,
/// so the connection goes back to the pool for the next check.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BodyUse {
    /// Only the status matters.
    Discard,
    /// Keep the body, failing when it is longer than `limit` bytes.
    Keep { limit: usize },
}

/// Why a check got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("body: {0}")]
    Body(String),
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
}

/// The HTTP client of a pool's replica checks (cheap to clone; clones share
/// the connections).
#[derive(Debug, Clone)]
pub struct ReplicaClient {
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for ReplicaClient {
    fn default() -> Self {
        ReplicaClient {
            http: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(HttpConnector::new()),
        }
    }
}

impl ReplicaClient {
    /// The URI of `path` on `endpoint`, or `None` when they do not form one.
    pub(crate) fn uri(endpoint: &Endpoint, path: &str) -> Option<http::Uri> {
        format!("{}{}", endpoint.base_url, path).parse().ok()
    }

    /// The status `GET uri` is answered with within `timeout` (the body is
    /// read and dropped), or `None` without an answer.
    pub(crate) async fn status(
        &self,
        uri: http::Uri,
        timeout: Duration,
    ) -> Option<http::StatusCode> {
        let reply = self.get(uri, timeout, BodyUse::Discard).await.ok()?;
        Some(reply.status)
    }

    /// `GET uri`, answered (status and body) within `timeout`.
    pub(crate) async fn get(
        &self,
        uri: http::Uri,
        timeout: Duration,
        body: BodyUse,
    ) -> Result<Reply, CheckError> {
        let exchange = async {
            let resp = self
                .http
                .get(uri)
                .await
                .map_err(|e| CheckError::Connect(e.to_string()))?;
            let status = resp.status();
            let body = match body {
                BodyUse::Discard => {
                    let mut b = resp.into_body();
                    while let Some(frame) = b.frame().await {
                        frame.map_err(|e| CheckError::Body(e.to_string()))?;
                    }
                    Bytes::new()
                }
                BodyUse::Keep { limit } => Limited::new(resp.into_body(), limit)
                    .collect()
                    .await
                    .map_err(|e| CheckError::Body(e.to_string()))?
                    .to_bytes(),
            };
            Ok(Reply { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(CheckError::TimedOut(timeout)))
    }
}

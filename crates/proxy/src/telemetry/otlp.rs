//! The OTLP/HTTP span export pipeline, off the request path: a finished span
//! is handed to the SDK's batch processor (a bounded channel drained by its
//! own thread); past `max_queue_size` spans waiting, a span is dropped and
//! counted, never waited for. The exporter is `opentelemetry-otlp`'s
//! HTTP/protobuf one; its HTTP client is ours ([`OtlpHttp`], hyper on the
//! gateway's runtime) rather than reqwest, which would be a second HTTP stack.
//!
//! `infergate_trace_spans_total{result}` counts every span: `exported`,
//! `failed` (the collector refused or did not answer) or `dropped` (queue full).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use opentelemetry::Context;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;

use infergate_core::config::OtlpConfig;

pub(crate) const SPANS: &str = "infergate_trace_spans_total";

/// A collector's answer larger than this is an error (it is only a status).
const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// The span processor of a gateway's tracer provider: the SDK's batch
/// processor behind a drop-counting bound.
pub(crate) fn processor(
    cfg: &OtlpConfig,
    runtime: tokio::runtime::Handle,
) -> Result<impl SpanProcessor, String> {
    let http = OtlpHttp {
        client: Client::builder(TokioExecutor::new()).build_http(),
        runtime,
        timeout: cfg.timeout,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(cfg.traces_url())
        .with_timeout(cfg.timeout)
        .with_http_client(http)
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let queued = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::builder(Counted {
        inner: exporter,
        queued: queued.clone(),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            // Our bound is checked first: the SDK's queue never fills.
            .with_max_queue_size(cfg.max_queue_size)
            .with_max_export_batch_size(cfg.max_queue_size.min(512))
            .with_scheduled_delay(cfg.export_interval)
            .build(),
    )
    .build();
    Ok(Bounded {
        inner: batch,
        queued,
        limit: cfg.max_queue_size,
    })
}

/// The resource every span of this process carries.
pub(crate) fn resource(cfg: &OtlpConfig) -> Resource {
    Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .build()
}

fn count(result: &'static str, n: usize) {
    let _ = super::metrics::handle();
    metrics::counter!(SPANS, "result" => result).increment(n as u64);
}

/// Spans handed to the batch processor and not yet exported are counted;
/// beyond `limit` a span is dropped here.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx)
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.limit {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            count("dropped", 1);
            return;
        }
        self.inner.on_end(span)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// The OTLP exporter, releasing the queue bound as batches leave.
#[derive(Debug)]
struct Counted {
    inner: opentelemetry_otlp::SpanExporter,
    queued: Arc<AtomicUsize>,
}

impl SpanExporter for Counted {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let r = self.inner.export(batch).await;
        self.queued.fetch_sub(n, Ordering::Relaxed);
        match &r {
            Ok(()) => count("exported", n),
            Err(e) => {
                tracing::debug!(error = %e, spans = n, "OTLP export failed");
                count("failed", n)
            }
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// The exporter's HTTP client: the batch processor's thread awaits a request
/// that runs on the gateway's Tokio runtime (the thread itself has none).
#[derive(Debug, Clone)]
struct OtlpHttp {
    client: Client<HttpConnector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

#[async_trait::async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let call = async move {
            let resp = client.request(request.map(Full::new)).await?;
            let (head, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, HttpError>(Response::from_parts(head, body))
        };
        let task = self.runtime.spawn(async move {
            tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| HttpError::from("OTLP export timed out"))?
        });
        task.await?
    }
}

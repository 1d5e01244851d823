//! The response body: relays the replica's answer to the client while enforcing
//! the stream timeouts, counting usage (which corrects the request's token
//! reservation), and releasing the reservation on every path (it is a field:
//! dropping the body drops it).
//!
//! Timeouts, in the style of linkerd2-proxy's stream-timeouts:
//! - first byte: from sending the request until the first body data;
//! - idle: the longest gap between two data frames after that;
//! - total (optional): the whole request.
//!
//! For an event stream, once the response is committed, a failure is sent as a
//! final SSE event `data: {"error": {...}}` rather than a silent truncation, and
//! while the first token is slow SSE comments (`: keep-alive`) keep the
//! connection busy. A body that is dropped before its end (client gone) drops
//! the upstream body, which closes the upstream connection so the engine frees
//! the sequence.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::execute::{ForwardError, Upstream};
use super::record::{Outcome, RequestRecord, ServedBy};
use super::upstream::UpstreamBody;
use super::usage::UsageCounter;
use crate::backpressure::StreamStallWatch;
use crate::telemetry::metrics::PairMetrics;
use crate::telemetry::trace;
use infergate_core::admission::Reservation;
use infergate_core::config::Timeouts;
use infergate_core::plan::{upstream_failed, upstream_timeout};
use infergate_core::quota::{Demand, Grant};
use infergate_protocol::error::{ApiError, ErrorShape};
use opentelemetry::trace::{Span as _, SpanKind};
use opentelemetry::KeyValue;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The forwarding future a committed-early stream waits on.
pub(crate) type PendingUpstream =
    Pin<Box<dyn Future<Output = Result<Upstream, ForwardError>> + Send>>;

const KEEPALIVE_COMMENT: &[u8] = b": keep-alive\n\n";

/// Every response body the gateway sends.
pub(crate) enum GatewayBody {
    /// A complete body (errors, `/v1/models`, admin answers).
    Full(Option<Bytes>),
    /// A relayed upstream body.
    Relay(Box<RelayBody>),
    /// A relayed body on an HTTP/2 stream, cut when the client stops reading
    /// it (see `admission::backpressure::StreamStallWatch`).
    Watched(StreamStallWatch<Box<RelayBody>>),
}

impl GatewayBody {
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        GatewayBody::Full(Some(b.into()))
    }

    /// For an HTTP/2 stream: a relayed body is cut when the client stops
    /// reading it for `limit` (HTTP/1 connections are watched by `StallIo`).
    pub(crate) fn watch_stream(self, limit: Option<Duration>) -> Self {
        match (self, limit) {
            (GatewayBody::Relay(r), Some(_)) => {
                GatewayBody::Watched(StreamStallWatch::new(r, limit))
            }
            (b, _) => b,
        }
    }
}

impl Body for Box<RelayBody> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut().poll_relay(cx)
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.phase {
            Phase::Streaming(b) if !self.sse => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl From<Bytes> for GatewayBody {
    fn from(b: Bytes) -> Self {
        GatewayBody::Full(Some(b))
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            GatewayBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            GatewayBody::Relay(r) => r.poll_relay(cx),
            GatewayBody::Watched(w) => Pin::new(w).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full(b) => b.is_none(),
            GatewayBody::Relay(r) => r.is_end_stream(),
            GatewayBody::Watched(w) => w.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            GatewayBody::Full(None) => SizeHint::with_exact(0),
            GatewayBody::Relay(r) => r.size_hint(),
            GatewayBody::Watched(w) => w.size_hint(),
        }
    }
}

enum Phase {
    /// Committed early (`200 text/event-stream`) while the replica has not answered.
    Waiting(PendingUpstream),
    Streaming(UpstreamBody),
    /// A final SSE error event to send.
    Failing(Bytes),
    Done,
}

/// Which deadline the timer is armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Armed {
    FirstByte,
    Idle,
    Total,
}

/// What a relay needs besides the upstream body.
pub struct RelaySetup {
    /// Boxed when the request arrived (see `handler`).
    pub record: Box<RequestRecord>,
    pub timeouts: Timeouts,
    pub first_byte_deadline: Instant,
    pub sse: bool,
    /// The client's API's error shape (for a final error event).
    pub shape: ErrorShape,
    /// The request's quota reservation, settled when the record is written.
    pub quota: Grant,
}

/// The relayed body of one request.
pub struct RelayBody {
    phase: Phase,
    sse: bool,
    shape: ErrorShape,
    timeouts: Timeouts,
    total_deadline: Option<Instant>,
    /// Fires no later than `deadline` whenever the relay waits; moved only
    /// when it fires early or, before a wait, the deadline came closer (a
    /// later deadline per data frame costs nothing).
    timer: Pin<Box<Sleep>>,
    /// When the armed timeout expires.
    deadline: Instant,
    armed: Armed,
    keepalive: Option<Pin<Box<Sleep>>>,
    last_frame: Option<Instant>,
    usage: UsageCounter,
    stream_metrics: Option<std::sync::Arc<PairMetrics>>,
    /// The replica connection permit (see `upstream`), declared before the
    /// reservation so it is dropped first: the waiter that the reservation's
    /// release admits finds the connection free.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    guard: Option<Reservation>,
    record: Box<RequestRecord>,
    /// The `stream` span (tracing on): from response headers to the end
    /// (boxed: tracing off, the relay stays small).
    span: Option<Box<opentelemetry_sdk::trace::Span>>,
    status: u16,
    outcome: Option<Outcome>,
    quota: Grant,
    /// The record was written (it is written once: at the end, or on drop).
    recorded: bool,
}

impl RelayBody {
    /// Relays a replica's body whose headers already arrived.
    ///
    /// Returned boxed and inlined into the caller, so the relay (about 1 KiB)
    /// is written into its box field by field: built on the stack and boxed
    /// afterwards, it was copied whole once per request.
    #[inline(always)]
    pub fn streaming(
        upstream: UpstreamBody,
        guard: Reservation,
        permit: tokio::sync::OwnedSemaphorePermit,
        status: u16,
        setup: RelaySetup,
    ) -> Box<Self> {
        let mut r = Self::new(Phase::Streaming(upstream), status, setup);
        r.set_guard(guard);
        r.permit = Some(permit);
        r
    }

    /// A stream committed before the replica answered: polls `pending` and sends
    /// SSE keep-alives meanwhile.
    pub fn waiting(pending: PendingUpstream, setup: RelaySetup) -> Box<Self> {
        Self::new(Phase::Waiting(pending), 200, setup)
    }

    #[inline(always)]
    fn new(phase: Phase, status: u16, s: RelaySetup) -> Box<Self> {
        let total_deadline = s.timeouts.total.map(|t| s.record.received_at + t);
        let (deadline, armed) = match total_deadline {
            Some(t) if t < s.first_byte_deadline => (t, Armed::Total),
            _ => (s.first_byte_deadline, Armed::FirstByte),
        };
        let keepalive = match (s.sse, s.timeouts.keepalive_after) {
            (true, Some(after)) => {
                let since_start = s.record.received_at.elapsed();
                let first = after
                    .saturating_sub(since_start)
                    .max(Duration::from_millis(1));
                Some(Box::pin(tokio::time::sleep(first)))
            }
            _ => None,
        };
        Box::new(RelayBody {
            phase,
            sse: s.sse,
            shape: s.shape,
            total_deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline.into())),
            deadline,
            armed,
            keepalive,
            last_frame: None,
            usage: UsageCounter::new(s.sse),
            stream_metrics: None,
            guard: None,
            permit: None,
            record: s.record,
            span: None,
            timeouts: s.timeouts,
            status,
            outcome: None,
            quota: s.quota,
            recorded: false,
        })
    }

    fn set_guard(&mut self, guard: Reservation) {
        self.record.replica = guard.replica().endpoint.key.clone();
        if let Some(t) = &self.record.trace {
            let replica = KeyValue::new(trace::REPLICA, self.record.replica.to_string());
            self.span = Some(Box::new(t.child(
                "stream",
                SpanKind::Internal,
                vec![replica],
            )));
        }
        if self.sse {
            self.stream_metrics = Some(crate::telemetry::metrics::pair(
                &self.record.route,
                &self.record.replica,
            ));
        }
        self.guard = Some(guard);
    }

    fn arm(&mut self, deadline: Instant, armed: Armed) {
        let (deadline, armed) = match self.total_deadline {
            Some(t) if t <= deadline => (t, Armed::Total),
            _ => (deadline, armed),
        };
        self.armed = armed;
        // The timer is moved to an earlier deadline only when the relay is
        // about to wait (`poll_relay`): a body that ends in the frame that
        // armed it (most non-streamed answers) never re-registers its timer,
        // which costs a lock on the timer wheel and, on a worker, a write to
        // its own runtime's eventfd.
        self.deadline = deadline;
    }

    fn on_data(&mut self, data: &Bytes) {
        let now = Instant::now();
        let events_before = self.usage.events;
        self.usage.observe(data);
        // Events that arrived together come in one frame (see
        // `ChunkedDecoder::decode_buffered`): the gap is counted for the
        // first, the others followed it at once, so the mean inter-token
        // latency stays per token. The histogram takes one sample per frame.
        let together = (self.usage.events - events_before).max(1);
        match self.last_frame {
            None => {
                self.record.ttft = Some(now - self.record.received_at);
                if let Some(s) = self.span.as_mut() {
                    s.add_event("first_token", Vec::new());
                }
                if let Some(g) = self.guard.as_mut() {
                    g.prefill_done();
                    g.replica().warmup.token_served();
                }
                self.keepalive = None;
                if self.stream_metrics.is_some() {
                    self.record.itl_count += together - 1;
                }
            }
            Some(prev) => {
                let gap = now - prev;
                if let Some(m) = &self.stream_metrics {
                    m.itl.record(gap.as_secs_f64());
                    self.record.itl_sum += gap;
                    self.record.itl_count += together;
                }
            }
        }
        self.last_frame = Some(now);
        // Correct the token reservation: the output so far, then the
        // engine's own usage once reported.
        if let Some(g) = self.guard.as_mut() {
            match self.usage.usage {
                Some(u) => g.observe_usage(u.prompt_tokens, u.completion_tokens),
                None => g.observe_generated(self.usage.events),
            }
        }
        self.arm(now + self.timeouts.idle, Armed::Idle);
    }

    /// Ends the stream with `error`: as an SSE event when the client reads an
    /// event stream, else as a body error (hyper aborts the connection).
    fn fail(
        &mut self,
        error: ApiError,
        outcome: Outcome,
    ) -> Option<Result<Frame<Bytes>, BoxError>> {
        tracing::warn!(request_id = %self.record.request_id, replica = %self.record.replica,
            error = %error, "stream failed after the response was committed");
        self.outcome = Some(outcome);
        self.keepalive = None;
        if self.sse {
            let body = error.body_as(self.shape);
            let mut ev = BytesMut::with_capacity(body.len() + 24);
            if self.usage.mid_line() {
                ev.extend_from_slice(b"\n\n");
            }
            // Anthropic's streams name their error event.
            if self.shape == ErrorShape::Anthropic {
                ev.extend_from_slice(b"event: error\n");
            }
            ev.extend_from_slice(b"data: ");
            ev.extend_from_slice(&body);
            ev.extend_from_slice(b"\n\n");
            self.phase = Phase::Failing(ev.freeze());
            None
        } else {
            self.phase = Phase::Done;
            Some(Err(Box::new(error)))
        }
    }

    fn timeout_error(&self) -> (ApiError, Outcome) {
        match self.armed {
            Armed::FirstByte => (
                upstream_timeout("first byte", self.timeouts.first_byte),
                Outcome::FirstByteTimeout,
            ),
            Armed::Idle => (
                upstream_timeout("idle (no token)", self.timeouts.idle),
                Outcome::IdleTimeout,
            ),
            Armed::Total => (
                upstream_timeout("total", self.timeouts.total.unwrap_or_default()),
                Outcome::TotalTimeout,
            ),
        }
    }

    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            match &mut self.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Failing(ev) => {
                    let ev = std::mem::take(ev);
                    self.phase = Phase::Done;
                    return Poll::Ready(Some(Ok(Frame::data(ev))));
                }
                Phase::Waiting(pending) => match pending.as_mut().poll(cx) {
                    Poll::Ready(Ok(up)) => {
                        self.record.attempts = up.attempts;
                        let status = up.response.status();
                        self.record.served = Some(ServedBy::of(&up.route, status));
                        let sse = super::headers::is_event_stream(up.response.headers());
                        let (_, body) = up.response.into_parts();
                        self.set_guard(up.guard);
                        self.permit = Some(up.permit);
                        if status.is_success() && sse {
                            self.phase = Phase::Streaming(body);
                        } else {
                            self.status = status.as_u16();
                            let e = upstream_failed(format!("replica answered status {status}"));
                            if let Some(end) = self.fail(e, Outcome::UpstreamError) {
                                return Poll::Ready(Some(end));
                            }
                        }
                        continue;
                    }
                    Poll::Ready(Err(fe)) => {
                        self.record.attempts = fe.attempts;
                        if let Some(r) = fe.replica {
                            self.record.replica = r;
                        }
                        self.status = fe.error.status.as_u16();
                        let outcome = if fe.error.status == http::StatusCode::GATEWAY_TIMEOUT {
                            Outcome::FirstByteTimeout
                        } else {
                            Outcome::UpstreamError
                        };
                        if let Some(end) = self.fail(fe.error, outcome) {
                            return Poll::Ready(Some(end));
                        }
                        continue;
                    }
                    Poll::Pending => {}
                },
                Phase::Streaming(body) => match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // With a Content-Length, hyper stops polling once that
                        // many bytes went out: end here, or the drop would look
                        // like a client disconnect.
                        let ended = body.is_end_stream();
                        if let Some(data) = frame.data_ref() {
                            if data.is_empty() && !ended {
                                continue;
                            }
                            let data = data.clone();
                            self.on_data(&data);
                        }
                        if ended {
                            self.phase = Phase::Done;
                            self.outcome = Some(Outcome::Ok);
                            self.write_record();
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Poll::Ready(Some(Err(e))) => {
                        if let Some(end) = self.fail(upstream_failed(e), Outcome::UpstreamError) {
                            return Poll::Ready(Some(end));
                        }
                        continue;
                    }
                    Poll::Ready(None) => {
                        self.phase = Phase::Done;
                        self.outcome = Some(Outcome::Ok);
                        self.write_record();
                        return Poll::Ready(None);
                    }
                    Poll::Pending => {}
                },
            }
            // Nothing to send now: check the timeouts, then the keep-alive.
            if self.deadline < self.timer.deadline().into_std() {
                self.timer.as_mut().reset(self.deadline.into());
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                if Instant::now() < self.deadline {
                    // Data came since the timer was set: wait for the rest.
                    self.timer.as_mut().reset(self.deadline.into());
                    continue;
                }
                let (e, outcome) = self.timeout_error();
                if let Some(end) = self.fail(e, outcome) {
                    return Poll::Ready(Some(end));
                }
                continue;
            }
            if let Some(ka) = self.keepalive.as_mut() {
                if ka.as_mut().poll(cx).is_ready() {
                    let next = tokio::time::Instant::now() + self.timeouts.keepalive_interval;
                    ka.as_mut().reset(next);
                    // Register the waker for the next keep-alive.
                    let _ = ka.as_mut().poll(cx);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        KEEPALIVE_COMMENT,
                    )))));
                }
            }
            return Poll::Pending;
        }
    }
}

impl RelayBody {
    /// Writes the log line and metrics, once. Called when the stream ends
    /// well (so they are visible before the client sees the end), and from
    /// `Drop` for every other path.
    fn write_record(&mut self) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let outcome = self.outcome.unwrap_or(Outcome::ClientGone);
        let status = if outcome == Outcome::ClientGone {
            499
        } else {
            self.status
        };
        self.record.completion_tokens = self.usage.completion_tokens();
        if let Some(u) = self.usage.usage {
            self.record.prompt_tokens = u.prompt_tokens;
            self.record.cached_tokens = u.cached_tokens;
        }
        if let Some(mut s) = self.span.take() {
            s.set_attribute(KeyValue::new(
                trace::OUTPUT_TOKENS,
                self.record.completion_tokens as i64,
            ));
            if let Some(t) = self.record.ttft {
                s.set_attribute(KeyValue::new(trace::TTFT, t.as_secs_f64()));
            }
            if outcome != Outcome::Ok {
                trace::fail(&mut s, outcome.as_str());
            }
            s.end();
        }
        // The engine's usage when reported, else the tokens counted; a
        // client gone mid-stream is settled for what was generated so far.
        self.quota.settle(Demand {
            input_tokens: self.record.prompt_tokens,
            output_tokens: self.record.completion_tokens,
            cost_micros: 0,
        });
        self.record.finish(status, outcome);
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        // The reservation is released right after, as a field.
        self.write_record();
    }
}

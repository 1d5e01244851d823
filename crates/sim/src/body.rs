//! Response bodies of a replica, and the guard that turns a client going away
//! into an engine abort.
//!
//! A streamed response is an [`SseBody`] polled by hyper: each poll reads the
//! sequence's token count (atomics), writes the chunks for the new tokens into
//! one buffer and returns them as one frame. When the client disconnects, hyper
//! drops the body; [`SeqGuard`]'s `Drop` then removes the sequence from the
//! engine and frees its KV blocks at once.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::engine::{SeqShared, SeqStatus};
use super::replica::Replica;
use super::wire::SseFramer;
use infergate_protocol::error::ApiError;

/// Aborts the sequence in the engine if it is dropped before the sequence ends.
pub(crate) struct SeqGuard {
    pub replica: Arc<Replica>,
    pub shared: Arc<SeqShared>,
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        if self.shared.progress().0 == SeqStatus::Active {
            self.replica.abort(self.shared.id);
        }
    }
}

impl SeqGuard {
    /// Waits until the sequence ends; returns its status and token count.
    pub(crate) async fn finished(&self) -> (SeqStatus, u32) {
        std::future::poll_fn(|cx| {
            self.shared.waker.register(cx.waker());
            match self.shared.progress() {
                (SeqStatus::Active, _) => Poll::Pending,
                done => Poll::Ready(done),
            }
        })
        .await
    }
}

/// A planned mid-stream stall.
pub(crate) struct Stall {
    pub after_tokens: u32,
    /// `None` = forever.
    pub duration: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stall {
    pub(crate) fn new(after_tokens: u32, duration: Option<Duration>) -> Self {
        Stall {
            after_tokens,
            duration,
            sleep: None,
        }
    }
}

/// A streamed (SSE) completion.
pub(crate) struct SseBody {
    guard: SeqGuard,
    framer: SseFramer,
    include_usage: bool,
    sent: u32,
    done: bool,
    stall: Option<Stall>,
    buf: BytesMut,
}

impl SseBody {
    pub(crate) fn new(
        guard: SeqGuard,
        framer: SseFramer,
        include_usage: bool,
        stall: Option<Stall>,
    ) -> Self {
        let buf = BytesMut::with_capacity(framer.chunk_len() * 8);
        SseBody {
            guard,
            framer,
            include_usage,
            sent: 0,
            done: false,
            stall,
            buf,
        }
    }

    /// Writes what is new; true if anything was written.
    fn fill(&mut self, status: SeqStatus, generated: u32, limit: u32) -> bool {
        let upto = generated.min(limit);
        let start = self.buf.len();
        if self.sent == 0 && upto > 0 {
            self.framer.role_chunk(&mut self.buf);
        }
        while self.sent < upto {
            let i = self.sent;
            self.sent += 1;
            let last = status != SeqStatus::Active && self.sent == generated;
            let finish = (last && status != SeqStatus::Failed).then(|| status.finish_reason());
            self.framer.token_chunk(&mut self.buf, i, finish);
        }
        if status != SeqStatus::Active && self.sent == generated {
            if status == SeqStatus::Failed {
                let err = ApiError::new(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_server_error",
                    "the engine dropped the request",
                );
                self.framer.error_chunk(&mut self.buf, &err);
            } else if self.framer.has_typed_events() {
                let s = &self.guard.shared;
                self.framer.end_events(
                    &mut self.buf,
                    generated,
                    s.cached_tokens(),
                    status.finish_reason(),
                );
            } else if self.include_usage {
                let s = &self.guard.shared;
                self.framer.usage_chunk(
                    &mut self.buf,
                    s.prompt_tokens,
                    generated,
                    s.cached_tokens(),
                );
            }
            if !self.framer.has_typed_events() {
                SseFramer::done(&mut self.buf);
            }
            self.done = true;
        }
        self.buf.len() > start
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut limit = u32::MAX;
        if let Some(stall) = &mut this.stall {
            if this.sent >= stall.after_tokens {
                match stall.duration {
                    None => return Poll::Pending, // stalled forever
                    Some(d) => {
                        let sleep = stall
                            .sleep
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
                        if sleep.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        this.stall = None;
                    }
                }
            } else {
                limit = stall.after_tokens;
            }
        }
        let mut wrote = false;
        for _ in 0..2 {
            let (status, generated) = this.guard.shared.progress();
            wrote |= this.fill(status, generated, limit);
            if wrote || this.done {
                break;
            }
            // Register, then look again so a token landing in between is not missed.
            this.guard.shared.waker.register(cx.waker());
        }
        if wrote {
            let frame = this.buf.split().freeze();
            if this.buf.capacity() < this.framer.chunk_len() {
                this.buf.reserve(this.framer.chunk_len() * 8);
            }
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.buf.is_empty()
    }
}

/// Every response body a replica sends.
pub(crate) enum SimBody {
    Full(Option<Bytes>),
    Sse(Box<SseBody>),
}

impl From<Bytes> for SimBody {
    fn from(b: Bytes) -> Self {
        SimBody::Full(Some(b))
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            SimBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Sse(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            SimBody::Full(b) => b.is_none(),
            SimBody::Sse(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            SimBody::Full(None) => SizeHint::with_exact(0),
            SimBody::Sse(_) => SizeHint::default(),
        }
    }
}

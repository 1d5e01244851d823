//! Streaming backpressure towards slow clients.
//!
//! The relay is pull-based: hyper asks the response body for the next frame
//! only when the client connection can take it, and the body reads the replica
//! only then, so a slow reader slows the upstream read (TCP backpressure) and
//! the gateway buffers at most hyper's write buffer per connection. What the
//! pull model cannot do on its own is notice a client that stopped reading
//! altogether: nothing is polled any more. [`StallIo`] wraps a client
//! connection and fails its writes once they have made no progress for the
//! configured time; hyper then closes the connection, drops the response body
//! and with it the upstream request, so the engine frees the sequence.
//! HTTP/2 needs more: flow control stops a stalled stream before the socket
//! does, so [`StreamStallWatch`] watches each HTTP/2 response body instead.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A client connection whose writes fail after `limit` without progress.
#[derive(Debug)]
pub(crate) struct StallIo<T> {
    inner: T,
    limit: Option<Duration>,
    /// Armed while a write is pending.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> StallIo<T> {
    /// `limit: None` disables the check (a plain pass-through).
    pub(crate) fn new(inner: T, limit: Option<Duration>) -> Self {
        StallIo {
            inner,
            limit,
            timer: None,
        }
    }

    /// Resets on progress; on a pending write, arms the timer and fails once
    /// it fires (the timer registers the waker, so the connection is polled
    /// again when it does).
    fn watch<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(v) => {
                self.timer = None;
                Poll::Ready(v)
            }
            Poll::Pending => {
                let Some(limit) = self.limit else {
                    return Poll::Pending;
                };
                let timer = self.timer.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + limit))
                });
                if timer.as_mut().poll(cx).is_ready() {
                    metrics::counter!("infergate_slow_client_disconnects_total").increment(1);
                    tracing::info!(
                        limit_ms = limit.as_millis() as u64,
                        "client stopped reading: connection closed, upstream cancelled"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Per-stream stall detection for HTTP/2.
///
/// With HTTP/2, a client that stops reading one stream stops sending window
/// updates for it; hyper then stops polling that stream's body (it waits for
/// send capacity first), so neither [`StallIo`] (its socket writes never go
/// pending) nor the body itself (it is not polled) can notice. The watched body
/// shares the inner body with a small watchdog task: when the body handed out
/// a frame and has not been asked for the next one for `limit`, the watchdog
/// drops the inner body (which drops the upstream request, so the engine frees
/// the sequence, and the reservation), and the stream ends with an error (hyper
/// resets it) if it is ever polled again. Waiting on a slow replica is not a
/// stall: the relay's own first-byte and idle timeouts cover that.
pub(crate) struct StreamStallWatch<B> {
    shared: Arc<Mutex<Watched<B>>>,
}

struct Watched<B> {
    body: Option<B>,
    /// When the body last handed out a frame (or started).
    last_frame: Instant,
    /// The last poll returned `Pending`: the body is waiting on its source.
    waiting_on_source: bool,
    /// The watchdog cut the stream.
    cut: bool,
}

impl<B: Send + 'static> StreamStallWatch<B> {
    /// Watches `body`; a no-op wrapper when `limit` is `None`. Needs a Tokio runtime.
    pub(crate) fn new(body: B, limit: Option<Duration>) -> Self {
        let shared = Arc::new(Mutex::new(Watched {
            body: Some(body),
            last_frame: Instant::now(),
            waiting_on_source: false,
            cut: false,
        }));
        if let Some(limit) = limit {
            tokio::spawn(watchdog(Arc::downgrade(&shared), limit));
        }
        StreamStallWatch { shared }
    }
}

fn lock<B>(m: &Mutex<Watched<B>>) -> MutexGuard<'_, Watched<B>> {
    // A panic while holding this lock leaves plain fields behind: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn watchdog<B>(shared: Weak<Mutex<Watched<B>>>, limit: Duration) {
    loop {
        let wake_at = {
            let Some(s) = shared.upgrade() else { return };
            let w = lock(&s);
            if w.body.is_none() {
                return;
            }
            if w.waiting_on_source {
                Instant::now() + limit
            } else {
                w.last_frame + limit
            }
        };
        tokio::time::sleep_until(wake_at).await;
        let Some(s) = shared.upgrade() else { return };
        let cut = {
            let mut w = lock(&s);
            if !w.waiting_on_source && w.body.is_some() && w.last_frame.elapsed() >= limit {
                w.cut = true;
                w.body.take()
            } else {
                None
            }
        };
        if let Some(body) = cut {
            // Dropped outside the lock: this cancels the upstream request.
            drop(body);
            metrics::counter!("infergate_slow_client_disconnects_total").increment(1);
            tracing::info!(
                limit_ms = limit.as_millis() as u64,
                "HTTP/2 client stopped reading a stream: stream cut, upstream cancelled"
            );
            return;
        }
    }
}

impl<B> Body for StreamStallWatch<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut w = lock(&self.shared);
        let w = &mut *w;
        let Some(body) = w.body.as_mut() else {
            return Poll::Ready(w.cut.then(|| {
                Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading").into())
            }));
        };
        match Pin::new(body).poll_frame(cx) {
            Poll::Pending => {
                w.waiting_on_source = true;
                Poll::Pending
            }
            Poll::Ready(frame) => {
                w.waiting_on_source = false;
                w.last_frame = Instant::now();
                if frame.is_none() {
                    w.body = None;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let w = lock(&self.shared);
        w.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let w = lock(&self.shared);
        w.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_reader_that_stops_is_cut_and_one_that_reads_is_not() {
        // A 1 KiB pipe whose far end reads nothing.
        let (a, _b) = tokio::io::duplex(1024);
        let mut w = StallIo::new(a, Some(Duration::from_millis(50)));
        let t0 = std::time::Instant::now();
        let err = w.write_all(&[0u8; 8192]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(50));

        // A slow but steady reader keeps the stream alive.
        let (a, mut b) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut n = 0;
            while n < 8192 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                n += tokio::io::AsyncReadExt::read(&mut b, &mut buf)
                    .await
                    .unwrap();
            }
        });
        let mut w = StallIo::new(a, Some(Duration::from_secs(2)));
        w.write_all(&[0u8; 8192]).await.unwrap();
        reader.await.unwrap();

        // No limit: a pass-through.
        let (a, _b) = tokio::io::duplex(1024);
        let mut w = StallIo::new(a, None);
        let r = tokio::time::timeout(Duration::from_millis(100), w.write_all(&[0u8; 8192])).await;
        assert!(r.is_err(), "still waiting: never cut");
    }

    /// An endless body that counts the frames it gave and notes its drop.
    struct Endless {
        frames: Arc<std::sync::atomic::AtomicU32>,
        dropped: Arc<std::sync::atomic::AtomicBool>,
        /// Never yields: a replica that is slow to answer.
        silent: bool,
    }

    impl Drop for Endless {
        fn drop(&mut self) {
            self.dropped
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Body for Endless {
        type Data = Bytes;
        type Error = io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            if self.silent {
                return Poll::Pending;
            }
            self.frames
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"data: x\n\n")))))
        }
    }

    fn endless(silent: bool) -> (Endless, Arc<std::sync::atomic::AtomicBool>) {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let body = Endless {
            frames: Arc::default(),
            dropped: dropped.clone(),
            silent,
        };
        (body, dropped)
    }

    #[tokio::test]
    async fn an_unpolled_stream_is_cut_a_steady_or_waiting_one_is_not() {
        use http_body_util::BodyExt;
        use std::sync::atomic::Ordering::SeqCst;
        // Real time (the test runtime has no paused clock): a short limit.
        let limit = Some(Duration::from_millis(100));

        // The client takes one frame, then stops asking.
        let (b, dropped) = endless(false);
        let mut w = StreamStallWatch::new(b, limit);
        assert!(w.frame().await.unwrap().is_ok());
        let t0 = std::time::Instant::now();
        while !dropped.load(SeqCst) {
            assert!(t0.elapsed() < Duration::from_secs(5), "never cut");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(90),
            "not before the limit"
        );
        assert!(
            w.frame().await.unwrap().is_err(),
            "the stream ends with an error"
        );

        // A client that keeps reading, slowly, is never cut.
        let (b, dropped) = endless(false);
        let mut w = StreamStallWatch::new(b, limit);
        for _ in 0..10 {
            assert!(w.frame().await.unwrap().is_ok());
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(!dropped.load(SeqCst));

        // A replica that is slow to answer is not the client's stall.
        let (b, dropped) = endless(true);
        let w = StreamStallWatch::new(b, limit);
        let mut w = std::pin::pin!(w);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(w.as_mut().poll_frame(&mut cx).is_pending());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!dropped.load(SeqCst));

        // No limit: never cut.
        let (b, dropped) = endless(false);
        let mut w = StreamStallWatch::new(b, None);
        assert!(w.frame().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!dropped.load(SeqCst));
        drop(w);
        assert!(dropped.load(SeqCst), "dropping the watch drops the body");
    }
}

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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A client connection whose writes fail after `limit` without progress.
#[derive(Debug)]
pub struct StallIo<T> {
    inner: T,
    limit: Option<Duration>,
    /// Armed while a write is pending.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> StallIo<T> {
    /// `limit: None` disables the check (a plain pass-through).
    pub fn new(inner: T, limit: Option<Duration>) -> Self {
        StallIo {
            inner,
            limit,
            timer: None,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
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
}

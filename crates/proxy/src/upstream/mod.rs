//! The HTTP/1.1 client to replicas: pooled keep-alive connections, one pool
//! per serving worker, and a response body that reads its connection directly.
//!
//! Why not hyper-util's pooled client: it runs each connection as its own task
//! and hands every request, and every body chunk, across a channel to it. On
//! the gateway's hot path that is two task switches per request and per
//! streamed chunk. Here the request's own future writes the request and reads
//! the response head, and the relayed body ([`UpstreamBody`]) decodes chunks
//! straight from the socket buffer when the client side asks for the next
//! frame, so several SSE events that arrive together go out in one write.
//! A connection returns to its worker's idle list when its body has been read
//! to the end; a body dropped early (client gone, timeout) drops, so closes,
//! the connection, and the engine frees the sequence.
//!
//! A request lost on a stale kept-alive connection (the replica closed it as
//! the request went out, and no byte came back) is sent once more on a fresh
//! connection: the replica never answered it.

pub(crate) mod codec;

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::codec::{ChunkedDecoder, Decoded, Framing, ProtocolError, ResponseHead};
use super::headers::{upstream_request_headers, GatewayHeaders};
use crate::telemetry::metrics::record_retry;

/// Requests (so HTTP/1 connections) in flight to one replica at most. It
/// bounds the connections a burst can open (each costs the replica an accept
/// and the gateway two buffers). Admission holds requests beyond it
/// (`budget.max_connections_per_replica`, at most this), so a request waits
/// here only when two pools share one replica address; such a wait is
/// counted in `infergate_upstream_connection_waits_total`.
const MAX_CONNECTIONS_PER_REPLICA: usize =
    infergate_core::admission::MAX_CONNECTIONS_PER_REPLICA as usize;
/// Idle keep-alive connections kept per replica and serving worker.
const MAX_IDLE_PER_REPLICA: usize = 256;
/// An idle connection older than this is closed instead of reused. Replicas
/// usually close theirs sooner (vLLM's uvicorn after 5 s by default): their
/// FIN is seen at checkout, and a close racing the request is the stale case.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Replicas remembered before the idle ones are forgotten.
const MAX_REPLICA_SLOTS: usize = 4096;
/// Idle lists per replica: one per serving worker (workers beyond share by modulo).
const MAX_WORKER_POOLS: usize = 64;
/// What a read offers the socket at first, and at most: a read that fills
/// what it was offered doubles the next one (a streamed answer arriving in
/// bulk is read in a few calls, not one per 8 KiB), one that takes less than
/// a quarter halves it. A pooled connection keeps at most `MAX_KEPT_BUFFER`.
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 64 * 1024;
const MAX_KEPT_BUFFER: usize = 64 * 1024;

/// A pooled keep-alive HTTP/1.1 client to replicas (one per connect timeout).
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    connect_timeout: Duration,
    /// Requests (so connections) in flight per replica at most.
    max_per_replica: usize,
    /// foldhash: looked up on every request (std's SipHash cost ~190
    /// instructions of it).
    replicas: RwLock<HashMap<Arc<str>, Arc<ReplicaSlot>, foldhash::fast::RandomState>>,
}

/// What the client keeps per replica: the connection bound, where to
/// connect, and the idle connections of each serving worker.
struct ReplicaSlot {
    permits: Arc<Semaphore>,
    /// `host:port` to connect to and to send as Host; `None` for a base URL
    /// that has no authority.
    authority: Option<Box<str>>,
    /// A connection's socket is registered with the runtime of the worker
    /// that opened it, so it is reused only there.
    idle: Box<[Mutex<Vec<Conn>>]>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamClient")
    }
}

/// One connection to a replica.
struct Conn {
    io: TcpStream,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// Responses it carried to the end: a reused connection is one with at
    /// least one.
    served: u32,
    idle_since: Instant,
    /// How much the next read offers (`READ_MIN`..=`READ_MAX`).
    read_size: usize,
}

/// What is sent upstream (the same for every try).
pub struct Outgoing<'a> {
    pub path_and_query: http::uri::PathAndQuery,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    pub request_id: &'a HeaderValue,
    /// The client's own `x-request-id`, sent as `x-client-request-id`.
    pub client_request_id: Option<&'a HeaderValue>,
    /// This try's `traceparent` (tracing on; else the client's passes).
    pub traceparent: Option<&'a HeaderValue>,
}

/// Why a send or a body read failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made: nothing reached the replica.
    Connect(io::Error),
    /// The connection failed while sending or reading.
    Io(io::Error),
    /// The replica closed the connection before the response ended.
    Closed,
    /// The replica's answer is not valid HTTP/1.1.
    Protocol(ProtocolError),
    /// The replica's base URL has no host.
    Uri,
    /// The client was shut down.
    ShutDown,
}

impl UpstreamError {
    /// No connection could be made: safe to try another replica.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "cannot connect: {e}"),
            UpstreamError::Io(e) => write!(f, "connection error: {e}"),
            UpstreamError::Closed => f.write_str("the replica closed the connection mid-response"),
            UpstreamError::Protocol(e) => write!(f, "invalid HTTP response: {e}"),
            UpstreamError::Uri => f.write_str("the replica's URL has no host"),
            UpstreamError::ShutDown => f.write_str("the upstream client is shut down"),
        }
    }
}

impl std::error::Error for UpstreamError {}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration) -> Self {
        Self::with_bound(connect_timeout, MAX_CONNECTIONS_PER_REPLICA)
    }

    /// A client allowing `max_per_replica` requests in flight per replica.
    fn with_bound(connect_timeout: Duration, max_per_replica: usize) -> Self {
        UpstreamClient {
            inner: Arc::new(ClientInner {
                connect_timeout,
                max_per_replica,
                replicas: RwLock::new(HashMap::default()),
            }),
        }
    }

    fn slot(&self, key: &Arc<str>, base_url: &str) -> Arc<ReplicaSlot> {
        let map = &self.inner.replicas;
        if let Some(s) = map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
            return s.clone();
        }
        let slot = Arc::new(ReplicaSlot {
            permits: Arc::new(Semaphore::new(self.inner.max_per_replica)),
            authority: authority_of(base_url),
            idle: (0..MAX_WORKER_POOLS).map(|_| Mutex::default()).collect(),
        });
        let mut map = map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_REPLICA_SLOTS {
            // Replicas come and go (discovery): forget the idle ones.
            let all = self.inner.max_per_replica;
            map.retain(|_, s| s.permits.available_permits() < all);
        }
        map.entry(key.clone()).or_insert(slot).clone()
    }

    /// Sends `out` to the replica at `base_url` and reads the response head,
    /// holding one of the replica's connection permits for as long as the
    /// returned permit lives. A request lost on a stale kept-alive
    /// connection is sent once more on a fresh one.
    pub async fn send(
        &self,
        key: &Arc<str>,
        base_url: &str,
        out: &Outgoing<'_>,
        route: &str,
    ) -> Result<(Response<UpstreamBody>, OwnedSemaphorePermit), UpstreamError> {
        let slot = self.slot(key, base_url);
        let permit = match slot.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(UpstreamError::ShutDown),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                metrics::counter!("infergate_upstream_connection_waits_total", "replica" => key.to_string())
                    .increment(1);
                slot.permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| UpstreamError::ShutDown)?
            }
        };
        let authority = slot.authority.as_deref().ok_or(UpstreamError::Uri)?;
        let mut head = BytesMut::new();
        codec::encode_request_line(&mut head, out.path_and_query.as_str(), authority);
        let ours = GatewayHeaders {
            request_id: out.request_id,
            client_request_id: out.client_request_id,
            traceparent: out.traceparent,
        };
        upstream_request_headers(out.headers, &ours, out.body.len(), |n, v| {
            codec::encode_header(&mut head, n, v)
        });
        codec::end_head(&mut head);
        let worker = crate::worker::current() % MAX_WORKER_POOLS;
        let conn = match slot.checkout(worker) {
            Some(c) => c,
            None => self.connect(authority).await?,
        };
        let (response, conn) = match exchange(conn, &head, &out.body).await {
            Ok(done) => done,
            Err(Lost::Stale(e)) => {
                tracing::debug!(replica = %key, error = %e, "stale keep-alive connection: sending again");
                record_retry(route, key, "stale_connection");
                let conn = self.connect(authority).await?;
                exchange(conn, &head, &out.body)
                    .await
                    .map_err(Lost::into_error)?
            }
            Err(Lost::Failed(e)) => return Err(e),
        };
        let body = UpstreamBody::new(conn, &response, (slot, worker));
        let mut resp = Response::new(body);
        *resp.status_mut() = response.status;
        *resp.headers_mut() = response.headers;
        Ok((resp, permit))
    }

    async fn connect(&self, authority: &str) -> Result<Conn, UpstreamError> {
        let io = tokio::time::timeout(self.inner.connect_timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| {
                UpstreamError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))
            })?
            .map_err(UpstreamError::Connect)?;
        // Small requests and SSE events go out at once; a replica that
        // vanished without a FIN is found by keep-alive probes.
        let _ = io.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(30));
        let _ = socket2::SockRef::from(&io).set_tcp_keepalive(&keepalive);
        Ok(Conn {
            io,
            buf: BytesMut::new(),
            served: 0,
            idle_since: Instant::now(),
            read_size: READ_MIN,
        })
    }
}

/// `host:port` of a base URL (port 80 when it names none).
fn authority_of(base_url: &str) -> Option<Box<str>> {
    let uri = base_url.parse::<Uri>().ok()?;
    let auth = uri.authority()?;
    Some(match auth.port_u16() {
        Some(_) => auth.as_str().into(),
        None => format!("{}:80", auth.host()).into(),
    })
}

impl ReplicaSlot {
    /// The most recently used live idle connection of `worker`, if any.
    fn checkout(&self, worker: usize) -> Option<Conn> {
        let mut idle = self.idle[worker].lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut conn) = idle.pop() {
            if conn.idle_since.elapsed() > IDLE_TIMEOUT {
                // The rest of the list is older still.
                idle.clear();
                return None;
            }
            // A replica that closed the connection left a FIN (or bytes it
            // should not have sent): checking costs no syscall unless the
            // socket became readable.
            match conn.io.try_read_buf(&mut conn.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(conn),
                _ => continue,
            }
        }
        None
    }

    fn put_idle(&self, worker: usize, mut conn: Conn) {
        if conn.buf.capacity() > MAX_KEPT_BUFFER {
            conn.buf = BytesMut::new();
        }
        conn.idle_since = Instant::now();
        let mut idle = self.idle[worker].lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_PER_REPLICA {
            idle.push(conn);
        }
    }
}

/// How an exchange failed.
enum Lost {
    /// On a reused connection, before any byte came back: the replica closed
    /// it as the request went out and never saw it.
    Stale(UpstreamError),
    Failed(UpstreamError),
}

impl Lost {
    fn into_error(self) -> UpstreamError {
        match self {
            Lost::Stale(e) | Lost::Failed(e) => e,
        }
    }
}

/// Writes the request and reads the response head (skipping 1xx answers).
async fn exchange(mut conn: Conn, head: &[u8], body: &[u8]) -> Result<(ResponseHead, Conn), Lost> {
    let reused = conn.served > 0;
    let lost = |e: UpstreamError, answered: bool| {
        if reused && !answered {
            Lost::Stale(e)
        } else {
            Lost::Failed(e)
        }
    };
    if let Err(e) = write_request(&mut conn.io, head, body).await {
        return Err(lost(UpstreamError::Io(e), false));
    }
    let mut answered = false;
    loop {
        if !conn.buf.is_empty() {
            match codec::parse_response_head(&conn.buf) {
                Ok(Some((h, n))) => {
                    conn.buf.advance(n);
                    if h.status.is_informational() {
                        if h.status == http::StatusCode::SWITCHING_PROTOCOLS {
                            return Err(Lost::Failed(UpstreamError::Protocol(ProtocolError(
                                "unexpected 101 Switching Protocols",
                            ))));
                        }
                        continue; // 100 Continue, 103 Early Hints: the answer follows
                    }
                    return Ok((h, conn));
                }
                Ok(None) => {}
                Err(e) => return Err(Lost::Failed(UpstreamError::Protocol(e))),
            }
        }
        match std::future::poll_fn(|cx| poll_fill(&mut conn, cx)).await {
            Ok(0) => return Err(lost(UpstreamError::Closed, answered)),
            Ok(_) => answered = true,
            Err(e) => return Err(lost(UpstreamError::Io(e), answered)),
        }
    }
}

/// Writes the head and the body, in one system call when the socket takes them.
async fn write_request(io: &mut TcpStream, mut head: &[u8], mut body: &[u8]) -> io::Result<()> {
    while !head.is_empty() || !body.is_empty() {
        let n = if head.is_empty() {
            io.write(body).await?
        } else {
            io.write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(body)])
                .await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    Ok(())
}

/// Where the body is in the response.
#[derive(Debug)]
enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// A replica's response body, read from its connection as the client side
/// asks for frames. Read to the end, the connection goes back to its pool.
pub struct UpstreamBody {
    conn: Option<Conn>,
    state: BodyState,
    keep_alive: bool,
    /// The pool to return the connection to, and the worker's list in it.
    home: (Arc<ReplicaSlot>, usize),
    /// A malformed chunk found after data already returned: the next poll's error.
    failed: Option<ProtocolError>,
}

impl UpstreamBody {
    fn new(conn: Conn, head: &ResponseHead, home: (Arc<ReplicaSlot>, usize)) -> Self {
        let state = match head.framing {
            Framing::Empty => BodyState::Length(0),
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
            Framing::UntilClose => BodyState::UntilClose,
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            state,
            keep_alive: head.keep_alive,
            home,
            failed: None,
        };
        if matches!(body.state, BodyState::Length(0)) {
            body.finish();
        }
        body
    }

    /// The body ended: the connection goes back to its pool if it can carry
    /// another request.
    fn finish(&mut self) {
        self.state = BodyState::Done;
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Bytes after the end are a replica speaking out of turn: close.
        if self.keep_alive && conn.buf.is_empty() {
            conn.served += 1;
            let (slot, worker) = &self.home;
            slot.put_idle(*worker, conn);
        }
    }

    fn fail(&mut self, e: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.state = BodyState::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            return this.fail(UpstreamError::Protocol(e));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let data = match &mut this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(left) => {
                    if conn.buf.is_empty() {
                        None
                    } else {
                        let n = (*left).min(conn.buf.len() as u64) as usize;
                        *left -= n as u64;
                        Some(conn.buf.split_to(n).freeze())
                    }
                }
                BodyState::Chunked(dec) => match dec.decode(&mut conn.buf) {
                    Ok(Decoded::Data(d)) => {
                        let (d, stop) = dec.decode_buffered(d, &mut conn.buf);
                        match stop {
                            Ok(Decoded::End) => this.finish(),
                            Err(e) => this.failed = Some(e),
                            Ok(_) => {}
                        }
                        return Poll::Ready(Some(Ok(Frame::data(d))));
                    }
                    Ok(Decoded::NeedMore) => None,
                    Ok(Decoded::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Err(e) => return this.fail(UpstreamError::Protocol(e)),
                },
                BodyState::UntilClose => (!conn.buf.is_empty()).then(|| conn.buf.split().freeze()),
            };
            if let Some(data) = data {
                if matches!(this.state, BodyState::Length(0)) {
                    this.finish();
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            match ready!(poll_fill(conn, cx)) {
                Ok(0) if matches!(this.state, BodyState::UntilClose) => {
                    this.state = BodyState::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(UpstreamError::Closed),
                Ok(_) => continue,
                Err(e) => return this.fail(UpstreamError::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Reads what the socket has into the connection's buffer. The buffer is
/// reserved only once the socket is readable, and an empty one is released
/// while the connection waits: an idle stream (a slow prefill, a long gap
/// between tokens) then holds no read buffer at all.
///
/// The read goes through tokio's `AsyncRead`, which takes a read that did not
/// fill the buffer as the socket drained (edge-triggered readiness): the next
/// call waits for the next event instead of making a `recv` that can only
/// answer `EAGAIN` (one such call per burst of the replica's writes, and one
/// more at the pool's checkout, with `try_read`).
fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    loop {
        if conn.io.poll_read_ready(cx)?.is_pending() {
            if conn.buf.is_empty() && conn.buf.capacity() > 0 {
                conn.buf = BytesMut::new();
            }
            return Poll::Pending;
        }
        if conn.buf.capacity() - conn.buf.len() < conn.read_size / 2 {
            conn.buf.reserve(conn.read_size);
        }
        let offered = conn.buf.capacity() - conn.buf.len();
        let n = match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
            // Readiness raced away: wait (the loop re-registers).
            Poll::Pending => continue,
            Poll::Ready(r) => r?,
        };
        if n == offered && offered >= conn.read_size / 2 {
            conn.read_size = (conn.read_size * 2).min(READ_MAX);
        } else if n < conn.read_size / 4 {
            conn.read_size = (conn.read_size / 2).max(READ_MIN);
        }
        return Poll::Ready(Ok(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A replica that answers each request on a connection with the next of
    /// `answers` (raw bytes), then keeps the connection open.
    async fn raw_replica(answers: Vec<&'static [u8]>) -> (String, tokio::task::JoinHandle<usize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut requests = 0;
            for answer in answers {
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap();
                    got.extend_from_slice(&chunk[..n]);
                    // Every test request has the body "{}".
                    if let Some(end) = got.windows(6).position(|w| w == b"\r\n\r\n{}") {
                        got.drain(..end + 6);
                        break;
                    }
                }
                requests += 1;
                s.write_all(answer).await.unwrap();
            }
            // Hold the connection until the client is done.
            let mut rest = [0u8; 64];
            let _ = s.read(&mut rest).await;
            requests
        });
        (url, task)
    }

    async fn send(
        client: &UpstreamClient,
        url: &str,
    ) -> Result<(Response<UpstreamBody>, OwnedSemaphorePermit), UpstreamError> {
        let headers = HeaderMap::new();
        let rid = HeaderValue::from_static("rid");
        let out = Outgoing {
            path_and_query: "/v1/completions".parse().unwrap(),
            headers: &headers,
            body: Bytes::from_static(b"{}"),
            request_id: &rid,
            client_request_id: None,
            traceparent: None,
        };
        client.send(&url.into(), url, &out, "r").await
    }

    async fn call(client: &UpstreamClient, url: &str) -> (u16, Vec<u8>) {
        let (resp, _permit) = send(client, url).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body.to_vec())
    }

    #[tokio::test]
    async fn reads_each_framing_and_reuses_the_connection() {
        let (url, replica) = raw_replica(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\nno",
        ])
        .await;
        let client = UpstreamClient::new(Duration::from_secs(1));
        assert_eq!(call(&client, &url).await, (200, b"hello".to_vec()));
        assert_eq!(call(&client, &url).await, (200, b"abcde".to_vec()));
        assert_eq!(call(&client, &url).await, (204, Vec::new()));
        assert_eq!(call(&client, &url).await, (503, b"no".to_vec()));
        drop(client);
        // All four on the one connection the replica accepted.
        assert_eq!(replica.await.unwrap(), 4);
    }

    /// A replica that reads one request, writes `answer` and closes.
    async fn one_shot_replica(answer: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(answer).await.unwrap();
        });
        url
    }

    #[tokio::test]
    async fn a_body_until_close_ends_at_eof() {
        let url = one_shot_replica(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
        let client = UpstreamClient::new(Duration::from_secs(1));
        assert_eq!(call(&client, &url).await, (200, b"until the end".to_vec()));
    }

    #[tokio::test]
    async fn a_truncated_body_is_an_error() {
        let url =
            one_shot_replica(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab").await;
        let client = UpstreamClient::new(Duration::from_secs(1));
        let (resp, _p) = send(&client, &url).await.unwrap();
        let err = resp.into_body().collect().await.unwrap_err();
        assert!(matches!(err, UpstreamError::Closed), "{err}");
    }

    /// Chunks that arrive together come out as one frame (so one write to
    /// the client); a chunk that arrives later is its own frame, relayed as
    /// it comes; a malformed chunk after good ones lets the good data out
    /// first, then fails the body.
    #[tokio::test]
    async fn chunks_that_arrive_together_are_one_frame_later_ones_their_own() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            let together = b"3\r\nabc\r\n2\r\nde\r\n1\r\nf\r\n";
            s.write_all(&[&head[..], &together[..]].concat())
                .await
                .unwrap();
            let _ = wait.await;
            s.write_all(b"2\r\ngh\r\n0\r\n\r\n").await.unwrap();
            let _ = s.read(&mut buf).await;
        });
        let client = UpstreamClient::new(Duration::from_secs(1));
        let (resp, _p) = send(&client, &url).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"abcdef");
        assert!(!body.is_end_stream());
        go.send(()).unwrap();
        let later = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&later[..], b"gh");
        // The last chunk came with the end: the body ended with that frame.
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());

        let url = one_shot_replica(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\ndeX\r\n",
        )
        .await;
        let (resp, _p) = send(&client, &url).await.unwrap();
        let mut body = resp.into_body();
        let good = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&good[..], b"abcde");
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(err, UpstreamError::Protocol(_)), "{err}");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn connect_failure_is_a_connect_error() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let client = UpstreamClient::new(Duration::from_secs(1));
        let err = send(&client, &url).await.err().unwrap();
        assert!(err.is_connect(), "{err}");
    }

    #[tokio::test]
    async fn requests_beyond_the_bound_wait_for_a_connection() {
        // A replica that accepts connections and answers each request only
        // when told to.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let (acc, rel) = (accepted.clone(), release.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let rel = rel.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        rel.notified().await;
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let client = UpstreamClient::with_bound(Duration::from_secs(1), 4);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (c, u) = (client.clone(), url.clone());
            calls.spawn(async move { call(&c, &u).await });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "the bound holds"
        );
        // Answer one at a time: the waiting requests reuse the 4 connections.
        let mut done = 0;
        for _ in 0..200 {
            if done == 10 {
                break;
            }
            release.notify_one();
            if let Ok(Some(r)) =
                tokio::time::timeout(Duration::from_millis(100), calls.join_next()).await
            {
                assert_eq!(r.unwrap(), (200, b"ok".to_vec()));
                done += 1;
            }
        }
        assert_eq!(done, 10, "every waiting request was answered");
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "no new connection"
        );
    }

    #[tokio::test]
    async fn an_idle_stream_holds_no_read_buffer() {
        // The head arrives, then the body waits (a long prefill or gap).
        let (url, _replica) = raw_replica(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ])
        .await;
        let client = UpstreamClient::new(Duration::from_secs(1));
        let (resp, _permit) = send(&client, &url).await.unwrap();
        let mut body = resp.into_body();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        let conn = body.conn.as_ref().unwrap();
        assert_eq!(conn.buf.capacity(), 0, "released while waiting");
    }

    #[tokio::test]
    async fn reads_grow_while_the_replica_is_ahead_and_shrink_when_it_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (io, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut replica = accepted.unwrap().0;
        let mut conn = Conn {
            io: io.unwrap(),
            buf: BytesMut::new(),
            served: 0,
            idle_since: Instant::now(),
            read_size: READ_MIN,
        };
        async fn read(conn: &mut Conn) -> usize {
            std::future::poll_fn(|cx| poll_fill(conn, cx))
                .await
                .unwrap()
        }
        // 56 KiB already there (under the loopback window): 8, 16 and 32 KiB
        // reads, each filling what it was offered, so the next offers 64 KiB.
        replica.write_all(&[b'x'; 56 * 1024]).await.unwrap();
        let mut sizes = Vec::new();
        let mut got = 0;
        while got < 56 * 1024 {
            let n = read(&mut conn).await;
            got += n;
            sizes.push(n);
            // Taken as the body takes it: split off as a frame.
            drop(conn.buf.split());
        }
        assert_eq!(sizes, [8 * 1024, 16 * 1024, 32 * 1024]);
        assert_eq!(conn.read_size, READ_MAX);
        // A token alone: the next read offers half.
        replica.write_all(b"data: x\n\n").await.unwrap();
        assert_eq!(read(&mut conn).await, 9);
        assert_eq!(conn.read_size, READ_MAX / 2);
    }

    #[test]
    fn authority_defaults_to_port_80() {
        assert_eq!(
            authority_of("http://replica").as_deref(),
            Some("replica:80")
        );
        assert_eq!(
            authority_of("http://10.0.0.1:8000/").as_deref(),
            Some("10.0.0.1:8000")
        );
        assert_eq!(authority_of("not a url"), None);
    }
}

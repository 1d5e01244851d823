//! The HTTP side: a loopback-only target, one keep-alive connection per slot (HTTP/1.1, or
//! h2c with prior knowledge), and one timed request.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::sse::{usage, SseScanner, Usage};

/// Where requests go: a loopback socket address and the URIs to put on requests.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub http2: bool,
    authority: HeaderValue,
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Target {
    /// Resolves `url` (`http://HOST:PORT[/prefix]`) and refuses anything that is not loopback:
    /// this tool may only ever load the machine it runs on.
    pub async fn new(
        url: &str,
        path: &str,
        http2: bool,
        headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Result<Self, String> {
        let base: Uri = url.parse().map_err(|e| format!("--url {url:?}: {e}"))?;
        if base.scheme_str() != Some("http") {
            return Err(format!("--url {url:?}: only http:// is supported"));
        }
        let host = base
            .host()
            .ok_or_else(|| format!("--url {url:?}: no host"))?;
        let port = base.port_u16().unwrap_or(80);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addr = match bare.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) if bare.eq_ignore_ascii_case("localhost") => {
                tokio::net::lookup_host((bare, port))
                    .await
                    .map_err(|e| format!("resolving {bare}: {e}"))?
                    .find(|a| a.ip().is_loopback())
                    .ok_or_else(|| format!("{bare} does not resolve to a loopback address"))?
            }
            Err(_) => {
                return Err(format!(
                    "--url {url:?}: host must be a loopback IP or localhost"
                ))
            }
        };
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--url {url:?}: {} is not a loopback address; refusing",
                addr.ip()
            ));
        }
        let authority = base
            .authority()
            .ok_or_else(|| format!("--url {url:?}: no authority"))?
            .as_str()
            .to_string();
        let prefix = base.path().trim_end_matches('/');
        let uri: Uri = if http2 {
            format!("http://{authority}{prefix}{path}")
        } else {
            format!("{prefix}{path}")
        }
        .parse()
        .map_err(|e| format!("request path: {e}"))?;
        Ok(Self {
            addr,
            http2,
            authority: HeaderValue::try_from(authority).map_err(|e| e.to_string())?,
            uri,
            headers,
        })
    }
}

/// One connection; the slot that owns it sends one request at a time over it.
pub enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

pub async fn connect(t: &Target) -> std::io::Result<Conn> {
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    let io = TokioIo::new(tcp);
    let err = |e: hyper::Error| std::io::Error::other(e.to_string());
    if t.http2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(err)?;
        tokio::spawn(conn);
        Ok(Conn::H2(send))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(err)?;
        tokio::spawn(conn);
        Ok(Conn::H1(send))
    }
}

type TrySend =
    Result<hyper::Response<Incoming>, hyper::client::conn::TrySendError<Request<Full<Bytes>>>>;

impl Conn {
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Conn::H1(s) => s.ready().await,
            Conn::H2(s) => s.ready().await,
        }
    }

    async fn try_send(&mut self, req: Request<Full<Bytes>>) -> TrySend {
        match self {
            Conn::H1(s) => s.try_send_request(req).await,
            Conn::H2(s) => s.try_send_request(req).await,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s) => s.is_closed(),
        }
    }
}

/// `GET` of the target's URL on a fresh connection: the whole body, within `timeout`.
pub async fn get(t: &Target, timeout: Duration) -> Result<Bytes, String> {
    let fetch = async {
        let mut conn = connect(t).await.map_err(|e| e.to_string())?;
        let mut req = Request::get(t.uri.clone());
        if let Some(h) = req.headers_mut() {
            if !t.http2 {
                h.insert(HOST, t.authority.clone());
            }
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        conn.ready().await.map_err(|e| e.to_string())?;
        let resp = conn
            .try_send(req)
            .await
            .map_err(|e| e.into_error().to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| "timeout".to_string())?
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// An HTTP status; a 2xx stream that did not end with `[DONE]` is [`Status::Truncated`].
    Http(u16),
    Connect,
    /// Transport error after connecting (reset, protocol error).
    Io,
    Timeout,
    /// A 2xx SSE stream that carried an error event or ended without `[DONE]`.
    Truncated,
}

impl Status {
    pub fn ok(self) -> bool {
        matches!(self, Status::Http(s) if (200..300).contains(&s))
    }

    pub fn label(self) -> String {
        match self {
            Status::Http(s) => s.to_string(),
            Status::Connect => "connect_error".into(),
            Status::Io => "io_error".into(),
            Status::Timeout => "timeout".into(),
            Status::Truncated => "truncated_stream".into(),
        }
    }
}

/// Measurements of one request; its inter-token gaps are left in [`Slot::itls`].
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub status: Status,
    pub ttft: Option<Duration>,
    pub e2e: Duration,
    pub tokens: u32,
    /// What the answer's `usage` said (prompt and cached prompt tokens), when present.
    pub usage: Option<Usage>,
    /// Sent a second time on a fresh connection (see [`Slot::exchange`]).
    pub retried: bool,
    pub end: Instant,
}

/// A POST of `body` to the target with the run's and the class's headers.
fn request(
    t: &Target,
    body: Bytes,
    class_headers: &[(HeaderName, HeaderValue)],
) -> Option<Request<Full<Bytes>>> {
    let mut req = Request::post(t.uri.clone());
    let h = req.headers_mut()?;
    if !t.http2 {
        h.insert(HOST, t.authority.clone());
    }
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in t.headers.iter().chain(class_headers) {
        h.append(k.clone(), v.clone());
    }
    req.body(Full::new(body)).ok()
}

/// What [`Slot::exchange`] measured so far (kept when a timeout cuts it short).
#[derive(Default)]
struct Measured {
    retried: bool,
    ttft: Option<Duration>,
    tokens: u32,
    usage: Option<Usage>,
}

/// A connection plus the buffers its requests reuse.
#[derive(Default)]
pub struct Slot {
    conn: Option<Conn>,
    /// Where `conn` goes (a run over several URLs: a slot moving to another
    /// one connects anew).
    conn_addr: Option<SocketAddr>,
    /// Whether `conn` already carried a whole exchange (keep-alive reuse).
    conn_used: bool,
    sse: SseScanner,
    body: Vec<u8>,
    /// Inter-token gaps of the last request, in nanoseconds.
    pub itls: Vec<u64>,
    /// The start of the body of the last non-2xx answer, for the report.
    pub error_body: Vec<u8>,
}

const ERROR_BODY_KEEP: usize = 300;

impl Slot {
    pub async fn preconnect(&mut self, t: &Target) {
        if self.conn.is_none() {
            self.conn = connect(t).await.ok();
            self.conn_addr = Some(t.addr);
            self.conn_used = false;
        }
    }

    /// Sends one request and reads the whole answer, all within `timeout`.
    pub async fn run(
        &mut self,
        t: &Target,
        body: Bytes,
        class_headers: &[(HeaderName, HeaderValue)],
        stream: bool,
        timeout: Duration,
    ) -> Outcome {
        self.itls.clear();
        self.error_body.clear();
        self.sse.reset();
        let start = Instant::now();
        let mut m = Measured::default();
        let status = tokio::time::timeout(
            timeout,
            self.exchange(t, body, class_headers, stream, start, &mut m),
        )
        .await
        .unwrap_or(Status::Timeout);
        // After a transport failure or timeout the connection may hold half a response:
        // never reuse it.
        if !matches!(status, Status::Http(_)) {
            self.conn = None;
        }
        let end = Instant::now();
        Outcome {
            status,
            ttft: m.ttft,
            e2e: end - start,
            tokens: m.tokens,
            usage: m.usage,
            retried: m.retried,
            end,
        }
    }

    /// Keeps a transport error's text as the request's error body (shown in the report).
    fn note(&mut self, e: &dyn std::fmt::Display) {
        use std::io::Write;
        self.error_body.clear();
        let _ = write!(self.error_body, "{e}");
        self.error_body.truncate(ERROR_BODY_KEEP);
    }

    async fn exchange(
        &mut self,
        t: &Target,
        body: Bytes,
        class_headers: &[(HeaderName, HeaderValue)],
        stream: bool,
        start: Instant,
        m: &mut Measured,
    ) -> Status {
        // Two attempts, and the second only when the first provably did not reach the server's
        // application: the request was never written (a kept-alive connection found closed),
        // or a REUSED connection was closed before a single response byte (the keep-alive
        // race; llama-server closes some connections right after a streamed answer, without
        // processing what came next). Each such retry is counted in the report.
        let mut attempts = 2;
        let resp = loop {
            attempts -= 1;
            if self.conn_addr != Some(t.addr) || self.conn.as_ref().is_none_or(Conn::is_closed) {
                self.conn_used = false;
                self.conn_addr = Some(t.addr);
                match connect(t).await {
                    Ok(c) => self.conn = Some(c),
                    Err(e) => {
                        self.conn = None;
                        self.note(&e);
                        return Status::Connect;
                    }
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return Status::Connect;
            };
            if let Err(e) = conn.ready().await {
                self.conn = None;
                if attempts > 0 {
                    continue;
                }
                self.note(&e);
                return Status::Io;
            }
            let Some(req) = request(t, body.clone(), class_headers) else {
                return Status::Io;
            };
            match conn.try_send(req).await {
                Ok(r) => {
                    self.conn_used = true;
                    break r;
                }
                Err(mut e) => {
                    self.conn = None;
                    let unsent = e.take_message().is_some();
                    let raced = self.conn_used && e.error().is_incomplete_message();
                    if attempts > 0 && (unsent || raced) {
                        m.retried = true;
                        continue;
                    }
                    self.note(e.error());
                    return Status::Io;
                }
            }
        };
        let code = resp.status().as_u16();
        let success = resp.status().is_success();
        let mut incoming = resp.into_body();
        let mut last = start;
        self.body.clear();
        while let Some(frame) = incoming.frame().await {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    self.note(&format!("reading the body: {e}"));
                    return Status::Io;
                }
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if !success {
                let keep = ERROR_BODY_KEEP
                    .saturating_sub(self.error_body.len())
                    .min(data.len());
                self.error_body.extend_from_slice(&data[..keep]);
            } else if stream {
                let now = Instant::now();
                let n = self.sse.feed(&data);
                if n > 0 {
                    match m.ttft {
                        None => m.ttft = Some(now - start),
                        Some(_) => self.itls.push((now - last).as_nanos() as u64),
                    }
                    // Events that arrived in the same frame are 0 apart, as the client saw them.
                    self.itls.extend(std::iter::repeat_n(0, n as usize - 1));
                    last = now;
                }
            } else {
                self.body.extend_from_slice(&data);
            }
        }
        if !success {
            return Status::Http(code);
        }
        if stream {
            m.usage = self.sse.usage;
            m.tokens = m.usage.map_or(self.sse.tokens, |u| u.completion);
            if self.sse.error || !self.sse.done {
                return Status::Truncated;
            }
        } else {
            m.usage = usage(&self.body);
            m.tokens = m.usage.map_or(0, |u| u.completion);
        }
        Status::Http(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_loopback_targets_are_accepted() {
        for ok in [
            "http://127.0.0.1:1",
            "http://127.0.0.2:1/base",
            "http://[::1]:1",
            "http://localhost:1",
        ] {
            let t = Target::new(ok, "/v1/completions", false, vec![]).await;
            assert!(t.is_ok(), "{ok}: {t:?}");
        }
        for bad in [
            "http://10.0.0.1:1",
            "http://8.8.8.8",
            "https://127.0.0.1:1",
            "http://example.com:1",
            "127.0.0.1:1",
        ] {
            assert!(
                Target::new(bad, "/v1/completions", false, vec![])
                    .await
                    .is_err(),
                "{bad}"
            );
        }
        let t = Target::new("http://127.0.0.1:9/base/", "/v1/x", false, vec![])
            .await
            .unwrap();
        assert_eq!(t.uri, "/base/v1/x");
        let t = Target::new("http://127.0.0.1:9", "/v1/x", true, vec![])
            .await
            .unwrap();
        assert_eq!(t.uri, "http://127.0.0.1:9/v1/x");
    }
}

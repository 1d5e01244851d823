//! HTTP/1.1 wire format for the upstream client: the request head it writes,
//! the response head it parses, how the response body is framed (RFC 9112
//! §6.3), and the chunked-transfer decoder. Pure functions over buffers, so
//! every edge is unit-tested without a socket.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use crate::context::REQUEST_ID;

/// Most response headers accepted (vLLM sends about ten).
const MAX_HEADERS: usize = 128;
/// Room kept in a response's map for the headers the gateway adds to a
/// replica's: its request ids and the served model always, the fallback,
/// canary and `x-ratelimit-*` headers when they apply (the map rounds up
/// to a power of two, so those usually fit as well; if not it grows once).
const ADDED_HEADERS: usize = 6;
/// Longest response head accepted.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE_BYTES: usize = 4 * 1024;

/// Why a replica's answer could not be read as HTTP/1.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub &'static str);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Appends `POST {path} HTTP/1.1` and Host to `out`; the headers follow
/// ([`encode_header`]), then [`end_head`].
pub(crate) fn encode_request_line(out: &mut BytesMut, path_and_query: &str, host: &str) {
    out.reserve(path_and_query.len() + host.len() + 512);
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends one `name: value` line.
pub(crate) fn encode_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Ends the head.
pub(crate) fn end_head(out: &mut BytesMut) {
    out.extend_from_slice(b"\r\n");
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// `Content-Length`: this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Neither: the body ends when the replica closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request after this body.
    pub keep_alive: bool,
}

/// Parses a response head at the start of `buf`: `Ok(None)` while it is
/// incomplete, else the head and the bytes it took.
pub(crate) fn parse_response_head(
    buf: &[u8],
) -> Result<Option<(ResponseHead, usize)>, ProtocolError> {
    // Uninitialised: httparse writes only the slots it fills (zeroing all
    // 128 took ~400 instructions a response).
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let parse = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    );
    let Some(len) = head_length(parse, buf.len())? else {
        return Ok(None);
    };
    let status = status_of(parsed.code)?;
    let raw = &*parsed.headers;
    let http10 = parsed.version == Some(0);
    // Each name is compared once, here; everything below reads the kinds.
    let scan = Scan::of(raw);
    let (framing, framing_reusable) = scan.framing(status, raw)?;
    let keep_alive = framing_reusable
        && if http10 {
            scan.connection_lists(raw, "keep-alive")
        } else {
            !scan.connection_lists(raw, "close")
        };
    // The map the client's response is built from, without the hop-by-hop
    // headers (RFC 9110 §7.6.1), those `Connection` names included: they
    // are dropped here, by their raw names, rather than looked up and
    // removed from the map afterwards.
    // With room for the headers the gateway adds (its request ids, the
    // served model, rate limits): a `HeaderMap` at capacity grows, rehashing
    // every entry, on any insert, even one that replaces a value.
    let mut headers = HeaderMap::with_capacity(raw.len() + ADDED_HEADERS);
    // The values share one copy of the head (`HeaderValue::from_bytes`
    // allocated one per value).
    let head = Bytes::copy_from_slice(&buf[..len]);
    for (h, kind) in raw.iter().zip(scan.kinds) {
        let name = match kind {
            Kind::Hop | Kind::TransferEncoding | Kind::Connection => continue,
            _ if scan.connection && scan.connection_lists(raw, h.name) => continue,
            Kind::ContentLength => http::header::CONTENT_LENGTH,
            Kind::ContentType => http::header::CONTENT_TYPE,
            Kind::Date => http::header::DATE,
            Kind::Server => http::header::SERVER,
            Kind::RequestId => REQUEST_ID,
            Kind::Other => HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| ProtocolError("invalid response header name"))?,
        };
        headers.append(name, shared_value(h.value, buf, &head, len)?);
    }
    Ok(Some((
        ResponseHead {
            status,
            headers,
            framing,
            keep_alive,
        },
        len,
    )))
}

/// The head's length once httparse has it all, `None` while it is
/// incomplete (and within `MAX_HEAD_BYTES`).
fn head_length(
    parse: httparse::Result<usize>,
    buffered: usize,
) -> Result<Option<usize>, ProtocolError> {
    match parse {
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if buffered > MAX_HEAD_BYTES => {
            Err(ProtocolError("response head too large"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(ProtocolError("too many response headers")),
        Err(_) => Err(ProtocolError("malformed response head")),
    }
}

/// The status of a parsed head.
fn status_of(code: Option<u16>) -> Result<StatusCode, ProtocolError> {
    let code = code.ok_or(ProtocolError("response without a status"))?;
    StatusCode::from_u16(code).map_err(|_| ProtocolError("invalid response status"))
}

/// A header value as a slice of `head`, the copy of `buf[..len]` the
/// values share: httparse's values are slices of `buf` (an empty one may
/// point elsewhere: copied, which costs nothing).
fn shared_value(
    value: &[u8],
    buf: &[u8],
    head: &Bytes,
    len: usize,
) -> Result<HeaderValue, ProtocolError> {
    match (value.as_ptr() as usize).checked_sub(buf.as_ptr() as usize) {
        Some(at) if !value.is_empty() && at + value.len() <= len => {
            HeaderValue::from_maybe_shared(head.slice(at..at + value.len()))
        }
        _ => HeaderValue::from_bytes(value),
    }
    .map_err(|_| ProtocolError("invalid response header value"))
}

/// What a response header name is to the proxy. The names an engine sends
/// on every response have their own kind, so they need no
/// `HeaderName::from_bytes` (which lowercases into a buffer and searches
/// the standard table: ~180 instructions a header, and an allocation for a
/// name outside it, such as vLLM's `x-request-id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Other,
    /// Hop-by-hop (RFC 9110 §7.6.1), not relayed: `keep-alive`,
    /// `proxy-connection`, `te`, `trailer`, `upgrade`.
    Hop,
    /// Hop-by-hop too, and read for the framing or the connection.
    TransferEncoding,
    Connection,
    ContentLength,
    ContentType,
    Date,
    Server,
    RequestId,
}

impl Kind {
    /// By length first: most names are ruled out by one comparison, and
    /// the rest are compared with one candidate.
    fn of(name: &str) -> Kind {
        let b = name.as_bytes();
        let (kind, text) = match b.len() {
            2 => (Kind::Hop, "te"),
            4 => (Kind::Date, "date"),
            6 => (Kind::Server, "server"),
            7 if b[0].eq_ignore_ascii_case(&b't') => (Kind::Hop, "trailer"),
            7 => (Kind::Hop, "upgrade"),
            10 if b[0].eq_ignore_ascii_case(&b'c') => (Kind::Connection, "connection"),
            10 => (Kind::Hop, "keep-alive"),
            12 if b[0].eq_ignore_ascii_case(&b'c') => (Kind::ContentType, "content-type"),
            12 => (Kind::RequestId, "x-request-id"),
            14 => (Kind::ContentLength, "content-length"),
            16 => (Kind::Hop, "proxy-connection"),
            17 => (Kind::TransferEncoding, "transfer-encoding"),
            _ => return Kind::Other,
        };
        // Engines send these names in lowercase: equal bytes first, which
        // is cheaper than folding the case of each.
        if b == text.as_bytes() || name.eq_ignore_ascii_case(text) {
            kind
        } else {
            Kind::Other
        }
    }
}

/// One pass over a head's raw headers: each one's [`Kind`], and what the
/// framing and the connection's reuse are read from.
struct Scan {
    kinds: [Kind; MAX_HEADERS],
    /// Some `Content-Length` was sent.
    has_length: bool,
    /// The `Content-Length` all of them agree on, or the first one's error
    /// in order (invalid, or conflicting with an earlier one).
    length: Result<Option<u64>, ProtocolError>,
    /// The last `Transfer-Encoding` header.
    last_te: Option<usize>,
    /// Some `Connection` header was sent.
    connection: bool,
}

impl Scan {
    fn of(raw: &[httparse::Header<'_>]) -> Scan {
        let mut scan = Scan {
            kinds: [Kind::Other; MAX_HEADERS],
            has_length: false,
            length: Ok(None),
            last_te: None,
            connection: false,
        };
        for (i, h) in raw.iter().enumerate() {
            let kind = Kind::of(h.name);
            scan.kinds[i] = kind;
            match kind {
                Kind::ContentLength => {
                    scan.has_length = true;
                    if let Ok(seen) = scan.length {
                        scan.length = match std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|s| s.trim().parse::<u64>().ok())
                        {
                            None => Err(ProtocolError("invalid Content-Length")),
                            Some(n) if seen.is_some_and(|l| l != n) => {
                                Err(ProtocolError("conflicting Content-Length values"))
                            }
                            Some(n) => Ok(Some(n)),
                        };
                    }
                }
                Kind::TransferEncoding => scan.last_te = Some(i),
                Kind::Connection => scan.connection = true,
                _ => {}
            }
        }
        scan
    }

    /// The body's framing, and whether the connection stays usable after it.
    fn framing(
        &self,
        status: StatusCode,
        raw: &[httparse::Header<'_>],
    ) -> Result<(Framing, bool), ProtocolError> {
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok((Framing::Empty, true));
        }
        if let Some(last) = self.last_te {
            let chunked_last = std::str::from_utf8(raw[last].value)
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            // Both headers at once is how responses get smuggled: read this one
            // by its chunks, then close the connection (RFC 9112 §6.3, item 3).
            return Ok(if chunked_last {
                (Framing::Chunked, !self.has_length)
            } else {
                (Framing::UntilClose, false)
            });
        }
        if self.has_length {
            let length = self.length.clone()?;
            return Ok((Framing::Length(length.unwrap_or(0)), true));
        }
        Ok((Framing::UntilClose, false))
    }

    /// Whether a `Connection` header lists `token` (case-insensitive).
    fn connection_lists(&self, raw: &[httparse::Header<'_>], token: &str) -> bool {
        self.connection
            && raw
                .iter()
                .zip(self.kinds)
                .filter(|(_, k)| *k == Kind::Connection)
                .filter_map(|(h, _)| std::str::from_utf8(h.value).ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// What the chunked decoder produced from the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Body bytes (a whole chunk or the part of one that arrived).
    Data(Bytes),
    /// The buffer holds no complete step: read more.
    NeedMore,
    /// The last chunk and the trailers were read.
    End,
}

/// Where the chunked decoder is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ChunkedDecoder {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk: this many data bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

impl ChunkedDecoder {
    /// Decodes the next step from the front of `buf`, consuming what it used.
    /// Data is split off the buffer without a copy.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        self.decode_at_most(buf, usize::MAX)
    }

    /// [`decode`](Self::decode), with at most `max` (> 0) data bytes taken:
    /// the rest of the chunk comes with the next call.
    fn decode_at_most(&mut self, buf: &mut BytesMut, max: usize) -> Result<Decoded, ProtocolError> {
        loop {
            match *self {
                ChunkedDecoder::Done => return Ok(Decoded::End),
                ChunkedDecoder::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = left.min(buf.len() as u64).min(max as u64) as usize;
                    let data = buf.split_to(n).freeze();
                    *self = if left == n as u64 {
                        ChunkedDecoder::DataEnd
                    } else {
                        ChunkedDecoder::Data(left - n as u64)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkedDecoder::Size => {
                    let Some(size) = take_line(buf, parse_chunk_size)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    *self = if size == 0 {
                        ChunkedDecoder::Trailers
                    } else {
                        ChunkedDecoder::Data(size)
                    };
                }
                ChunkedDecoder::DataEnd => {
                    let Some(empty) = take_line(buf, |l| Ok(l.is_empty()))? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if !empty {
                        return Err(ProtocolError("chunk data longer than its size"));
                    }
                    *self = ChunkedDecoder::Size;
                }
                ChunkedDecoder::Trailers => {
                    // Trailers are not forwarded: the gateway's responses carry none.
                    let Some(empty) = take_line(buf, |l| Ok(l.is_empty()))? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if empty {
                        *self = ChunkedDecoder::Done;
                    }
                }
            }
        }
    }
}

/// Data joined into one frame at most (see [`ChunkedDecoder::decode_buffered`]).
pub(crate) const JOIN_LIMIT: usize = 16 * 1024;

impl ChunkedDecoder {
    /// `first` (data just decoded) with the data of further chunks already
    /// in `buf`, in one buffer, up to [`JOIN_LIMIT`] bytes: when the
    /// replica's small chunks arrive together (the client side was behind,
    /// or the replica wrote them at once) they go on as one frame, so the
    /// relay and hyper spend once for them, where hyper queues at most 16
    /// frames per write. Copies only when a second piece is there, and never
    /// more than the limit: a `first` of that size or more goes on alone
    /// (uncopied; hyper queues the next frames behind it in the same
    /// write), and the piece that reaches the limit is cut there (the rest
    /// of its chunk is the next frame). Also returns what stopped it:
    /// `NeedMore`, `End`, the limit (`Data` of nothing), or an error in a
    /// later chunk (the caller reports it after the data).
    pub(crate) fn decode_buffered(
        &mut self,
        first: Bytes,
        buf: &mut BytesMut,
    ) -> (Bytes, Result<Decoded, ProtocolError>) {
        if first.len() >= JOIN_LIMIT {
            return (first, Ok(Decoded::Data(Bytes::new())));
        }
        let mut joined: Option<BytesMut> = None;
        let stop = loop {
            let have = joined.as_ref().map_or(first.len(), BytesMut::len);
            if have >= JOIN_LIMIT {
                break Ok(Decoded::Data(Bytes::new()));
            }
            match self.decode_at_most(buf, JOIN_LIMIT - have) {
                Ok(Decoded::Data(d)) => joined
                    .get_or_insert_with(|| {
                        let cap = (first.len() + d.len() + buf.len()).min(JOIN_LIMIT);
                        let mut j = BytesMut::with_capacity(cap);
                        j.extend_from_slice(&first);
                        j
                    })
                    .extend_from_slice(&d),
                other => break other,
            }
        };
        (joined.map_or(first, BytesMut::freeze), stop)
    }
}

/// Parses one line (without its CRLF or LF) at the front of `buf` with
/// `parse`, then consumes it; `None` while the line is incomplete.
fn take_line<T>(
    buf: &mut BytesMut,
    parse: impl FnOnce(&[u8]) -> Result<T, ProtocolError>,
) -> Result<Option<T>, ProtocolError> {
    let Some(lf) = memchr::memchr(b'\n', buf) else {
        if buf.len() > MAX_LINE_BYTES {
            return Err(ProtocolError("chunk line too long"));
        }
        return Ok(None);
    };
    let line = &buf[..lf];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let v = parse(line)?;
    buf.advance(lf + 1);
    Ok(Some(v))
}

/// A chunk-size line: hex digits, then optional `;extensions` (ignored).
fn parse_chunk_size(line: &[u8]) -> Result<u64, ProtocolError> {
    let digits = line.split(|&b| b == b';').next().unwrap_or(&[]);
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(ProtocolError("invalid chunk size"));
    }
    let mut size = 0u64;
    for &d in digits {
        let v = (d as char)
            .to_digit(16)
            .ok_or(ProtocolError("invalid chunk size"))?;
        size = size * 16 + v as u64;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> ResponseHead {
        parse_response_head(raw.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn encodes_the_request_head() {
        let mut out = BytesMut::new();
        encode_request_line(&mut out, "/v1/completions?x=1", "10.0.0.1:8000");
        encode_header(&mut out, b"content-type", b"application/json");
        encode_header(&mut out, b"content-length", b"2");
        end_head(&mut out);
        assert_eq!(
            &out[..],
            b"POST /v1/completions?x=1 HTTP/1.1\r\nhost: 10.0.0.1:8000\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
        );
    }

    /// Values are slices of one copy of the head; names and values come out
    /// as sent, the engine's `x-request-id` included, an empty value too.
    #[test]
    fn header_values_are_the_bytes_sent() {
        let raw = "HTTP/1.1 200 OK\r\nX-Request-ID: abc-1\r\nx-sim-replica: 3\r\nx-empty:\r\n\
                   content-type: application/json\r\nx-two: a\r\nX-Two: b \r\ncontent-length: 2\r\n\
                   Date: Mon, 07 Dec 2026 05:00:00 GMT\r\nSERVER: uvicorn\r\nx-date: d\r\n\r\n{}";
        let h = head(raw);
        assert_eq!(h.headers[REQUEST_ID], "abc-1");
        assert_eq!(h.headers["x-sim-replica"], "3");
        assert_eq!(h.headers["x-empty"], "");
        assert_eq!(h.headers["content-type"], "application/json");
        let two: Vec<_> = h.headers.get_all("x-two").iter().collect();
        assert_eq!(two, ["a", "b"]);
        assert_eq!(
            h.headers[http::header::DATE],
            "Mon, 07 Dec 2026 05:00:00 GMT"
        );
        assert_eq!(h.headers[http::header::SERVER], "uvicorn");
        assert_eq!(h.headers["x-date"], "d");
        assert_eq!(h.headers.len(), 10);
        // Bytes that are no header value are refused, as before.
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\nx: a\x7fb\r\n\r\n").is_err());
    }

    #[test]
    fn parses_heads_incrementally_and_picks_the_framing() {
        let raw = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\nrest";
        for cut in 0..raw.len() - 4 {
            assert!(parse_response_head(&raw.as_bytes()[..cut])
                .unwrap()
                .is_none());
        }
        let (h, n) = parse_response_head(raw.as_bytes()).unwrap().unwrap();
        assert_eq!(n, raw.len() - 4);
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.keep_alive);
        assert_eq!(h.headers["content-type"], "text/event-stream");

        let h = head("HTTP/1.1 404 Not Found\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(
            (h.status.as_u16(), h.framing, h.keep_alive),
            (404, Framing::Length(12), true)
        );
        let h = head("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n");
        assert!(!h.keep_alive, "HTTP/1.0 closes unless it says keep-alive");
        let h = head("HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n");
        assert!(h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(
            (h.framing, h.keep_alive),
            (Framing::Chunked, false),
            "smuggling guard"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_not_relayed() {
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nx-secret: 1\r\n\
             Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nTrailer: x\r\n\
             Upgrade: h2c\r\nProxy-Connection: close\r\nTE: trailers\r\n\
             content-type: text/event-stream\r\nx-other: 2\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked);
        let names: Vec<&str> = h.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-other"]);
    }

    #[test]
    fn rejects_malformed_heads() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "garbage\r\n\r\n",
            "HTTP/1.1 999x OK\r\n\r\n",
        ] {
            assert!(parse_response_head(raw.as_bytes()).is_err(), "{raw}");
        }
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES + 1));
        assert!(parse_response_head(huge.as_bytes()).is_err());
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: 1\r\n"))
            .collect();
        let raw = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(parse_response_head(raw.as_bytes()).is_err());
    }

    /// Decodes `wire` fed in pieces of `step` bytes; returns the body.
    fn decode_in_pieces(wire: &[u8], step: usize) -> Result<Vec<u8>, ProtocolError> {
        let mut dec = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match dec.decode(&mut buf)? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::End => return Ok(body),
                Decoded::NeedMore => {
                    if fed == wire.len() {
                        return Err(ProtocolError("eof"));
                    }
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn buffered_chunks_join_into_one_piece_and_say_what_stopped_them() {
        let dec_first = |wire: &[u8]| {
            let mut dec = ChunkedDecoder::default();
            let mut buf = BytesMut::from(wire);
            let Ok(Decoded::Data(first)) = dec.decode(&mut buf) else {
                panic!("no data first");
            };
            let at = first.as_ptr();
            let (data, stop) = dec.decode_buffered(first, &mut buf);
            let copied = data.as_ptr() != at;
            (data, stop, buf.len(), copied)
        };
        // Whole and partial chunks already buffered join; then more is needed.
        let (d, stop, left, _) = dec_first(b"3\r\nabc\r\n2\r\nde\r\n4\r\nfg");
        assert_eq!((&d[..], left), (&b"abcdefg"[..], 0));
        assert!(matches!(stop, Ok(Decoded::NeedMore)));
        // The end is seen with the data.
        let (d, stop, _, _) = dec_first(b"3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n");
        assert_eq!(&d[..], b"abcd");
        assert!(matches!(stop, Ok(Decoded::End)));
        // One chunk alone is not copied: the same bytes come back.
        let (d, stop, _, copied) = dec_first(b"3\r\nabc\r\n");
        assert_eq!((&d[..], copied), (&b"abc"[..], false));
        assert!(matches!(stop, Ok(Decoded::NeedMore)));
        // A malformed chunk after good ones: the good data, then the error.
        let (d, stop, _, _) = dec_first(b"3\r\nabc\r\n2\r\ndeX\r\n");
        assert_eq!(&d[..], b"abcde");
        assert!(stop.is_err());
    }

    #[test]
    fn joining_stops_at_the_limit_and_a_large_first_piece_goes_alone() {
        let chunk = |len: usize, byte: u8| {
            let mut w = format!("{len:x}\r\n").into_bytes();
            w.extend(std::iter::repeat_n(byte, len));
            w.extend_from_slice(b"\r\n");
            w
        };
        // A first piece at the limit is not joined (nor copied): the next
        // chunk stays buffered for the next frame.
        let mut wire = chunk(JOIN_LIMIT, b'a');
        wire.extend(chunk(10, b'b'));
        let mut buf = BytesMut::from(&wire[..]);
        let mut dec = ChunkedDecoder::default();
        let Ok(Decoded::Data(first)) = dec.decode(&mut buf) else {
            panic!("no data first");
        };
        let at = first.as_ptr();
        let (d, stop) = dec.decode_buffered(first, &mut buf);
        assert_eq!((d.len(), d.as_ptr()), (JOIN_LIMIT, at));
        assert!(matches!(stop, Ok(Decoded::Data(ref e)) if e.is_empty()));
        assert_eq!(
            buf.len(),
            2 + 3 + 10 + 2,
            "the next chunk is still buffered"
        );
        // Small pieces join up to the limit; the piece that reaches it is cut
        // there and its rest is the next frame.
        let mut wire = chunk(100, b'a');
        wire.extend(chunk(JOIN_LIMIT, b'b'));
        wire.extend(b"0\r\n\r\n");
        let mut buf = BytesMut::from(&wire[..]);
        let mut dec = ChunkedDecoder::default();
        let Ok(Decoded::Data(first)) = dec.decode(&mut buf) else {
            panic!("no data first");
        };
        let (d, _) = dec.decode_buffered(first, &mut buf);
        assert_eq!(d.len(), JOIN_LIMIT);
        assert_eq!(&d[..101], &[&[b'a'; 100][..], b"b"].concat()[..]);
        let Ok(Decoded::Data(rest)) = dec.decode(&mut buf) else {
            panic!("no rest");
        };
        let (rest, stop) = dec.decode_buffered(rest, &mut buf);
        assert_eq!(rest.len(), 100);
        assert!(matches!(stop, Ok(Decoded::End)));
    }

    #[test]
    fn decodes_chunks_split_at_every_byte() {
        let wire =
            b"6\r\ndata: \r\n18;ext=1\r\n{\"choices\":[]}\n\ndata: [D\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..wire.len() {
            let body = decode_in_pieces(wire, step).unwrap();
            assert_eq!(body, b"data: {\"choices\":[]}\n\ndata: [D", "step {step}");
        }
        // LF-only line ends are read too.
        assert_eq!(decode_in_pieces(b"3\nabc\n0\n\n", 64).unwrap(), b"abc");
    }

    #[test]
    fn leaves_the_next_response_in_the_buffer() {
        let mut buf = BytesMut::from(&b"1\r\na\r\n0\r\n\r\nHTTP/1.1 200 OK"[..]);
        let mut dec = ChunkedDecoder::default();
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"a"))
        );
        assert_eq!(dec.decode(&mut buf).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK");
    }

    #[test]
    fn rejects_bad_chunks() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"2\r\nabc\r\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(
                decode_in_pieces(wire, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = vec![b'1'; MAX_LINE_BYTES + 1];
        assert!(decode_in_pieces(&long, long.len()).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Feeds `input` to a decoder in pieces of `piece` bytes; returns the
        /// data decoded and whether the end was reached (or the first error).
        fn decode_all(input: &[u8], piece: usize) -> Result<(Vec<u8>, bool), ProtocolError> {
            let mut d = ChunkedDecoder::default();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for part in input.chunks(piece.max(1)) {
                buf.extend_from_slice(part);
                // Each step consumes bytes or asks for more: bounded by the input.
                for _ in 0..=input.len() * 2 + 4 {
                    match d.decode(&mut buf)? {
                        Decoded::Data(b) => out.extend_from_slice(&b),
                        Decoded::NeedMore => break,
                        Decoded::End => return Ok((out, true)),
                    }
                }
            }
            Ok((out, false))
        }

        /// Decodes `input` fed `piece` bytes at a time as the upstream body
        /// does: a piece, then what is buffered behind it, as one frame.
        fn decode_all_buffered(input: &[u8], piece: usize) -> (Vec<Bytes>, bool) {
            let mut d = ChunkedDecoder::default();
            let mut buf = BytesMut::new();
            let mut frames = Vec::new();
            for part in input.chunks(piece) {
                buf.extend_from_slice(part);
                loop {
                    match d.decode(&mut buf).unwrap() {
                        Decoded::Data(first) => {
                            let (frame, stop) = d.decode_buffered(first, &mut buf);
                            frames.push(frame);
                            if matches!(stop.unwrap(), Decoded::End) {
                                return (frames, true);
                            }
                        }
                        Decoded::NeedMore => break,
                        Decoded::End => return (frames, true),
                    }
                }
            }
            (frames, false)
        }

        /// The head parse of before the one-pass scan (a name compared
        /// with each name it could be, on every lookup), kept to check
        /// that the scan answers the same.
        mod before {
            use super::super::super::*;

            pub(crate) fn parse_response_head_before(
                buf: &[u8],
            ) -> Result<Option<(ResponseHead, usize)>, ProtocolError> {
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut parsed = httparse::Response::new(&mut slots);
                let Some(len) = head_length(parsed.parse(buf), buf.len())? else {
                    return Ok(None);
                };
                let status = status_of(parsed.code)?;
                let raw = &*parsed.headers;
                let http10 = parsed.version == Some(0);
                let (framing, framing_reusable) = framing_of(status, raw)?;
                let keep_alive = framing_reusable
                    && if http10 {
                        has_token(raw, "connection", "keep-alive")
                    } else {
                        !has_token(raw, "connection", "close")
                    };
                // The map the client's response is built from, without the hop-by-hop
                // headers (RFC 9110 §7.6.1), those `Connection` names included: they
                // are dropped here, by their raw names, rather than looked up and
                // removed from the map afterwards.
                let listed = values(raw, "connection").next().is_some();
                // With room for the headers the gateway adds (its request ids, the
                // served model, rate limits): a `HeaderMap` at capacity grows, rehashing
                // every entry, on any insert, even one that replaces a value.
                let mut headers = HeaderMap::with_capacity(raw.len() + ADDED_HEADERS);
                // The values share one copy of the head (`HeaderValue::from_bytes`
                // allocated one per value).
                let head = Bytes::copy_from_slice(&buf[..len]);
                for h in raw {
                    if is_hop_by_hop(h.name) || (listed && connection_lists(raw, h.name)) {
                        continue;
                    }
                    let name = match known_name(h.name) {
                        Some(n) => n,
                        None => HeaderName::from_bytes(h.name.as_bytes())
                            .map_err(|_| ProtocolError("invalid response header name"))?,
                    };
                    headers.append(name, shared_value(h.value, buf, &head, len)?);
                }
                Ok(Some((
                    ResponseHead {
                        status,
                        headers,
                        framing,
                        keep_alive,
                    },
                    len,
                )))
            }

            /// The names an engine sends on every response, found without
            /// `HeaderName::from_bytes` (which lowercases into a buffer and searches
            /// the standard table: ~180 instructions a header, and an allocation for
            /// a name outside it, such as vLLM's `x-request-id`).
            fn known_name(raw: &str) -> Option<HeaderName> {
                use http::header::{CONTENT_LENGTH, CONTENT_TYPE, DATE, SERVER};
                // By length first: most names are ruled out by one comparison.
                let (name, text) = match raw.len() {
                    4 => (DATE, "date"),
                    6 => (SERVER, "server"),
                    12 if raw.as_bytes()[0].eq_ignore_ascii_case(&b'c') => {
                        (CONTENT_TYPE, "content-type")
                    }
                    12 => (REQUEST_ID, "x-request-id"),
                    14 => (CONTENT_LENGTH, "content-length"),
                    _ => return None,
                };
                raw.eq_ignore_ascii_case(text).then_some(name)
            }

            /// Hop-by-hop headers, which describe one connection and are not relayed.
            fn is_hop_by_hop(name: &str) -> bool {
                const HOP: [&str; 7] = [
                    "connection",
                    "keep-alive",
                    "proxy-connection",
                    "te",
                    "trailer",
                    "transfer-encoding",
                    "upgrade",
                ];
                HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
            }

            /// Whether a `Connection` header names `name` (so it is hop-by-hop too).
            fn connection_lists(raw: &[httparse::Header<'_>], name: &str) -> bool {
                tokens(raw, "connection").any(|t| t.eq_ignore_ascii_case(name))
            }

            /// The values of the headers called `name`, in order.
            fn values<'a>(
                raw: &'a [httparse::Header<'a>],
                name: &'a str,
            ) -> impl Iterator<Item = &'a [u8]> {
                raw.iter()
                    .filter(move |h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value)
            }

            /// The comma-separated, trimmed tokens of the headers called `name`.
            fn tokens<'a>(
                raw: &'a [httparse::Header<'a>],
                name: &'a str,
            ) -> impl Iterator<Item = &'a str> {
                values(raw, name)
                    .filter_map(|v| std::str::from_utf8(v).ok())
                    .flat_map(|v| v.split(','))
                    .map(str::trim)
            }

            /// The body's framing, and whether the connection stays usable after it.
            fn framing_of(
                status: StatusCode,
                raw: &[httparse::Header<'_>],
            ) -> Result<(Framing, bool), ProtocolError> {
                if status.is_informational()
                    || status == StatusCode::NO_CONTENT
                    || status == StatusCode::NOT_MODIFIED
                {
                    return Ok((Framing::Empty, true));
                }
                let has_length = values(raw, "content-length").next().is_some();
                if let Some(last) = values(raw, "transfer-encoding").last() {
                    let chunked_last = std::str::from_utf8(last)
                        .ok()
                        .and_then(|v| v.rsplit(',').next())
                        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
                    // Both headers at once is how responses get smuggled: read this one
                    // by its chunks, then close the connection (RFC 9112 §6.3, item 3).
                    return Ok(if chunked_last {
                        (Framing::Chunked, !has_length)
                    } else {
                        (Framing::UntilClose, false)
                    });
                }
                if has_length {
                    let mut length = None;
                    for v in values(raw, "content-length") {
                        let n = std::str::from_utf8(v)
                            .ok()
                            .and_then(|s| s.trim().parse::<u64>().ok())
                            .ok_or(ProtocolError("invalid Content-Length"))?;
                        if length.is_some_and(|l| l != n) {
                            return Err(ProtocolError("conflicting Content-Length values"));
                        }
                        length = Some(n);
                    }
                    return Ok((Framing::Length(length.unwrap_or(0)), true));
                }
                Ok((Framing::UntilClose, false))
            }

            /// Whether the headers called `name` list `token` (case-insensitive).
            fn has_token(raw: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
                tokens(raw, name).any(|t| t.eq_ignore_ascii_case(token))
            }
        }

        /// Headers in any case and order, with the values that decide the
        /// framing and the connection's reuse.
        fn head_strategy() -> impl Strategy<Value = String> {
            let names = prop::sample::select(vec![
                "Content-Length",
                "content-length",
                "Transfer-Encoding",
                "transfer-encoding",
                "Connection",
                "connection",
                "Keep-Alive",
                "keep-alive",
                "Proxy-Connection",
                "TE",
                "Trailer",
                "Upgrade",
                "upgradE",
                "Content-Type",
                "X-Request-ID",
                "date",
                "Server",
                "x-secret",
                "X-Secret",
                "x-other",
                "x-requestid",
                "content-lengtx",
                "tf",
                "conneKtion",
                "x-sim-replica",
            ]);
            let values = prop::sample::select(vec![
                "close",
                "keep-alive",
                "Keep-Alive, X-Secret",
                "x-secret , close",
                "chunked",
                "gzip, chunked",
                "chunked, gzip",
                "5",
                " 7 ",
                "7",
                "x",
                "",
                "x-other",
                "trailers",
                "text/event-stream",
                "Content-Length",
            ]);
            (
                prop::sample::select(vec![
                    "HTTP/1.1 200 OK",
                    "HTTP/1.0 200 OK",
                    "HTTP/1.1 204 N",
                    "HTTP/1.1 304 N",
                    "HTTP/1.1 404 N",
                    "HTTP/1.1 101 S",
                ]),
                prop::collection::vec((names, values), 0..10),
            )
                .prop_map(|(line, hs)| {
                    let mut raw = format!("{line}\r\n");
                    for (n, v) in hs {
                        raw.push_str(&format!("{n}: {v}\r\n"));
                    }
                    raw.push_str("\r\n");
                    raw
                })
        }

        type Parsed = Result<
            Option<(StatusCode, Vec<(String, Vec<u8>)>, Framing, bool, usize)>,
            ProtocolError,
        >;

        fn flat(r: Result<Option<(ResponseHead, usize)>, ProtocolError>) -> Parsed {
            r.map(|o| {
                o.map(|(h, n)| {
                    let hs = h
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
                        .collect();
                    (h.status, hs, h.framing, h.keep_alive, n)
                })
            })
        }

        proptest! {
            /// Any bytes as a response head: an answer, never a panic.
            #[test]
            fn any_head_bytes_parse_or_fail(raw in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse_response_head(&raw);
            }

            /// The one-pass scan reads every head as the parse of before
            /// did: status, relayed headers in order, framing, reuse,
            /// length used, or the same error.
            #[test]
            fn the_scan_answers_as_before(raw in head_strategy()) {
                prop_assert_eq!(
                    flat(parse_response_head(raw.as_bytes())),
                    flat(before::parse_response_head_before(raw.as_bytes()))
                );
            }

            /// Heads built from random parts parse to what was written.
            #[test]
            fn written_heads_parse_back(
                status in 200u16..600,
                len in any::<u32>(),
                chunked in any::<bool>(),
                close in any::<bool>(),
                extra in prop::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,20}"), 0..6),
            ) {
                let mut raw = format!("HTTP/1.1 {status} X\r\n");
                if chunked {
                    raw.push_str("transfer-encoding: chunked\r\n");
                } else {
                    raw.push_str(&format!("content-length: {len}\r\n"));
                }
                if close {
                    raw.push_str("connection: close\r\n");
                }
                for (n, v) in &extra {
                    raw.push_str(&format!("{n}: {}\r\n", v.trim()));
                }
                raw.push_str("\r\n");
                let (h, used) = parse_response_head(raw.as_bytes()).unwrap().unwrap();
                prop_assert_eq!(used, raw.len());
                prop_assert_eq!(h.status.as_u16(), status);
                let no_body = status == 204 || status == 304;
                if !no_body {
                    let want = if chunked { Framing::Chunked } else { Framing::Length(u64::from(len)) };
                    prop_assert_eq!(h.framing, want);
                }
                if close {
                    prop_assert!(!h.keep_alive);
                }
            }

            /// Chunked encoding of any data, delivered in any pieces, decodes
            /// to the same data.
            #[test]
            fn chunked_round_trips(
                chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..64), 0..8),
                piece in 1usize..40,
                ext in any::<bool>(),
            ) {
                let mut wire = Vec::new();
                for c in &chunks {
                    wire.extend_from_slice(format!("{:x}", c.len()).as_bytes());
                    if ext {
                        wire.extend_from_slice(b";name=value");
                    }
                    wire.extend_from_slice(b"\r\n");
                    wire.extend_from_slice(c);
                    wire.extend_from_slice(b"\r\n");
                }
                wire.extend_from_slice(b"0\r\nx-trailer: 1\r\n\r\n");
                let (data, ended) = decode_all(&wire, piece).unwrap();
                prop_assert!(ended);
                prop_assert_eq!(data, chunks.concat());
            }

            /// Chunks of any size joined as the body joins them: the same data,
            /// and a frame past the join limit is a piece of one chunk (not a
            /// copy of several).
            #[test]
            fn buffered_frames_round_trip_within_the_join_limit(
                sizes in prop::collection::vec(1usize..40_000, 0..6),
                piece in 1usize..100_000,
            ) {
                let mut wire = Vec::new();
                let mut want = Vec::new();
                for (i, &n) in sizes.iter().enumerate() {
                    wire.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    wire.extend(std::iter::repeat_n(i as u8, n));
                    want.extend(std::iter::repeat_n(i as u8, n));
                    wire.extend_from_slice(b"\r\n");
                }
                wire.extend_from_slice(b"0\r\n\r\n");
                let (frames, ended) = decode_all_buffered(&wire, piece);
                prop_assert!(ended);
                prop_assert_eq!(frames.concat(), want);
                for f in &frames {
                    prop_assert!(!f.is_empty());
                    prop_assert!(f.len() <= JOIN_LIMIT || f.iter().all(|&b| b == f[0]));
                }
            }

            /// Any bytes as a chunked body: data, an end or an error, never a
            /// panic or an endless loop.
            #[test]
            fn any_chunked_bytes_decode_or_fail(
                raw in prop::collection::vec(any::<u8>(), 0..512),
                piece in 1usize..64,
            ) {
                let _ = decode_all(&raw, piece);
            }
        }
    }
}

//! Hostile input against the whole gateway (in-process, simulated vLLM
//! replicas behind it), over raw TCP so that malformed protocol reaches it as
//! sent: bad request lines, headers, framing, JSON, paths, sizes and slow
//! clients. Every case must get a 4xx or a closed connection (no 5xx the
//! gateway caused, no hang, no panic), and a valid request must still succeed
//! after each group. Cases come from tables; the slow ones run concurrently.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use infergate_core::config::Config;
use infergate_sim::{start_fleet, FleetConfig, Profile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bodies larger than this get 413 (the gateway's `max_body_bytes`).
const LIMIT: usize = 64 * 1024;
/// How long one case may take to be answered or closed.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// What a case sends: bytes, or a pause (slow clients).
#[derive(Clone)]
enum Part {
    Bytes(Vec<u8>),
    Pause(u64),
}

/// What a case may be answered with, besides a closed connection.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    /// Only 4xx.
    Reject,
    /// 4xx, or the HTTP version / transfer coding answers of RFC 9112 that
    /// hyper gives before the gateway sees a request (501, 505).
    RejectProtocol,
    /// The hostile part is harmless: any answer but a 5xx.
    NoServerError,
}

struct Case {
    name: String,
    parts: Vec<Part>,
    expect: Expect,
}

fn case(name: impl Into<String>, bytes: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        parts: vec![Part::Bytes(bytes.into())],
        expect,
    }
}

/// A POST with `body` and a correct Content-Length.
fn post(path: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

fn completion(body: &[u8]) -> Vec<u8> {
    post("/v1/completions", "", body)
}

const VALID: &str = r#"{"model":"m","prompt":"Hello there","max_tokens":2}"#;

/// What happened: the statuses read, and whether the connection closed.
#[derive(Debug)]
struct Answer {
    statuses: Vec<u16>,
    closed: bool,
}

async fn run(addr: std::net::SocketAddr, parts: &[Part]) -> Answer {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    for p in parts {
        match p {
            Part::Bytes(b) => {
                // The gateway may close early (a bad head): keep reading then.
                if s.write_all(b).await.is_err() {
                    break;
                }
            }
            Part::Pause(ms) => tokio::time::sleep(Duration::from_millis(*ms)).await,
        }
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let closed = loop {
        match tokio::time::timeout(ANSWER_WITHIN, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    Answer {
        statuses: statuses_of(&buf),
        closed,
    }
}

/// The status of every HTTP/1 response head in `buf`.
fn statuses_of(buf: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = find(&buf[i..], b"HTTP/1.") {
        let start = i + at;
        // Not only at a line start: a JSON body need not end with a newline.
        if buf.len() >= start + 12 {
            if let Ok(code) = std::str::from_utf8(&buf[start + 9..start + 12])
                .unwrap_or("")
                .parse()
            {
                out.push(code);
            }
        }
        i = start + 7;
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn judge(c: &Case, a: &Answer) -> Result<(), String> {
    let ok_status = |s: u16| match c.expect {
        Expect::Reject => (400..500).contains(&s),
        Expect::RejectProtocol => (400..500).contains(&s) || s == 501 || s == 505,
        Expect::NoServerError => s < 500,
    };
    if a.statuses.is_empty() && !a.closed {
        return Err(format!("{}: no answer and not closed (hung)", c.name));
    }
    // Pipelined cases start with a valid request: its 200 is expected.
    let judged: &[u16] = if c.name.starts_with("pipelined") {
        a.statuses.get(1..).unwrap_or(&[])
    } else {
        &a.statuses
    };
    match judged.iter().find(|s| !ok_status(**s)) {
        Some(s) => Err(format!("{}: answered {s} ({:?})", c.name, a.statuses)),
        None => Ok(()),
    }
}

async fn run_group(addr: std::net::SocketAddr, group: &str, cases: Vec<Case>) -> usize {
    let n = cases.len();
    let results = futures::future::join_all(cases.iter().map(|c| async move {
        let a = run(addr, &c.parts).await;
        if std::env::var_os("HOSTILE_VERBOSE").is_some() {
            eprintln!("{:<55} {:?} closed={}", c.name, a.statuses, a.closed);
        }
        judge(c, &a)
    }))
    .await;
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(failures.is_empty(), "{group}:\n{}", failures.join("\n"));
    // The gateway still serves a valid request after the group.
    let a = run(addr, &[Part::Bytes(completion(VALID.as_bytes()))]).await;
    assert_eq!(
        a.statuses,
        [200],
        "{group}: a valid request after the group"
    );
    n
}

fn protocol_cases() -> Vec<Case> {
    use Expect::*;
    let big_header = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n",
        "a".repeat(128 * 1024)
    );
    let many_headers = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: gw\r\n{}\r\n",
        (0..300)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let long_path = format!("GET /{} HTTP/1.1\r\nHost: gw\r\n\r\n", "a".repeat(70_000));
    let mut pipelined_junk = completion(VALID.as_bytes());
    // `Connection: close` is in the first request; make it keep-alive so the junk is read.
    pipelined_junk = String::from_utf8(pipelined_junk)
        .unwrap()
        .replace("Connection: close\r\n", "")
        .into_bytes();
    pipelined_junk.extend_from_slice(b"\x00\x01\x02 GARBAGE\r\n\r\n");
    let mut pipelined_bad_second = String::from_utf8(completion(VALID.as_bytes()))
        .unwrap()
        .replace("Connection: close\r\n", "")
        .into_bytes();
    pipelined_bad_second.extend_from_slice(&completion(b"{\"model\":"));
    vec![
        case("garbage request line", "GARBAGE\r\n\r\n", Reject),
        case("empty request line", "\r\n\r\n\r\n", Reject),
        case("method only", "GET\r\n\r\n", Reject),
        case("no version", "GET /v1/models\r\n\r\n", RejectProtocol),
        case("http/0.9 request", "GET /\r\n", RejectProtocol),
        case("http/2.0 in an h1 request line", "GET / HTTP/2.0\r\n\r\n", RejectProtocol),
        case("http/9.9", "GET / HTTP/9.9\r\nHost: gw\r\n\r\n", RejectProtocol),
        case("lowercase version", "GET / http/1.1\r\nHost: gw\r\n\r\n", RejectProtocol),
        case("binary request line", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec(), Reject),
        case("tls client hello on cleartext", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(), Reject),
        case("space in path", "GET /v1/mo dels HTTP/1.1\r\nHost: gw\r\n\r\n", RejectProtocol),
        case("control char in path", "GET /v1/\x01models HTTP/1.1\r\nHost: gw\r\n\r\n", Reject),
        case("header without colon", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nBadHeader\r\n\r\n", Reject),
        case("header name with space", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n", Reject),
        case("NUL in header value", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nX-A: a\x00b\r\n\r\n", Reject),
        case("non-ascii header name", b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nX-\xff: v\r\n\r\n".to_vec(), Reject),
        case("obs-fold header", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nX-A: a\r\n  folded\r\nContent-Length: 0\r\n\r\n", Reject),
        case("128 KiB header", big_header, Reject),
        case("300 headers", many_headers, Reject),
        case("70 KB path", long_path, Reject),
        case("bare LF line endings", "POST /v1/completions HTTP/1.1\nHost: gw\nContent-Length: 2\n\n{}", Reject),
        case("CL and TE both", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", Reject),
        case("two different CLs", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n{}{}{}", Reject),
        case("CL list", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2, 3\r\n\r\n{}", Reject),
        case("CL not a number", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: abc\r\n\r\n", Reject),
        case("CL negative", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n\r\n", Reject),
        case("CL plus sign", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: +2\r\n\r\n{}", Reject),
        case("CL overflow", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 99999999999999999999999\r\n\r\n", Reject),
        case("TE gzip only", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\nxx", RejectProtocol),
        case("TE chunked then gzip", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", RejectProtocol),
        case("TE with whitespace trick", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", Reject),
        case("bad chunk size", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", Reject),
        case("chunk size overflow", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\n{}\r\n0\r\n\r\n", Reject),
        case("chunk missing CRLF", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}XX0\r\n\r\n", Reject),
        case("negative chunk size", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n-2\r\n{}\r\n0\r\n\r\n", Reject),
        case("chunk extension junk", "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2;\x01\r\n{}\r\n0\r\n\r\n", Reject),
        case("h2 preface then junk", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(), Reject),
        case("absolute-form URI, body without model", post("http://evil.example/v1/completions", "", b"{\"prompt\":\"x\"}"), Reject),
        case("CONNECT", "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", Reject),
        case("OPTIONS *", "OPTIONS * HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", Reject),
        case("TRACE", "TRACE /v1/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", Reject),
        case("unknown method", "BREW /v1/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", Reject),
        case("pipelined junk after a valid request", pipelined_junk, Reject),
        case("pipelined truncated JSON after a valid request", pipelined_bad_second, Reject),
    ]
    .into_iter()
    .map(|mut c| {
        if c.name.starts_with("pipelined") {
            c.name = format!("pipelined: {}", c.name);
        }
        c
    })
    .collect()
}

fn json_cases() -> Vec<Case> {
    use Expect::*;
    let deep_prompt = format!(
        "{{\"model\":\"m\",\"prompt\":{}1{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let deep_object = format!("{}{}", "{\"a\":".repeat(5000), "1}".repeat(5000));
    let deep_messages = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":{}\"x\"{}}}]}}",
        "[".repeat(3000),
        "]".repeat(3000)
    );
    let long_model = format!("{{\"model\":\"{}\",\"prompt\":\"x\"}}", "z".repeat(60_000));
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", b"".to_vec()),
        ("open brace", b"{".to_vec()),
        ("close brace", b"}".to_vec()),
        ("missing value", br#"{"model":}"#.to_vec()),
        ("truncated string", br#"{"model":"m"#.to_vec()),
        (
            "trailing garbage",
            br#"{"model":"m","prompt":"x"} x"#.to_vec(),
        ),
        ("trailing comma", br#"{"model":"m","prompt":"x",}"#.to_vec()),
        ("single quotes", br#"{'model':'m'}"#.to_vec()),
        ("comment", b"{/* c */\"model\":\"m\"}".to_vec()),
        (
            "NaN literal",
            br#"{"model":"m","prompt":"x","temperature":NaN}"#.to_vec(),
        ),
        (
            "Infinity literal",
            br#"{"model":"m","prompt":"x","max_tokens":Infinity}"#.to_vec(),
        ),
        (
            "BOM prefix",
            b"\xef\xbb\xbf{\"model\":\"m\",\"prompt\":\"x\"}".to_vec(),
        ),
        (
            "UTF-16 body",
            b"\xff\xfe{\x00\"\x00m\x00\"\x00}\x00".to_vec(),
        ),
        ("array body", b"[]".to_vec()),
        ("positional array body", br#"["m","x"]"#.to_vec()),
        ("string body", br#""m""#.to_vec()),
        ("number body", b"123".to_vec()),
        ("true body", b"true".to_vec()),
        ("null body", b"null".to_vec()),
        ("deep prompt nesting", deep_prompt.into_bytes()),
        ("deep object nesting", deep_object.into_bytes()),
        ("deep content nesting", deep_messages.into_bytes()),
        (
            "max_tokens 1e400",
            br#"{"model":"m","prompt":"x","max_tokens":1e400}"#.to_vec(),
        ),
        (
            "max_tokens 2^70",
            br#"{"model":"m","prompt":"x","max_tokens":1180591620717411303424}"#.to_vec(),
        ),
        (
            "max_tokens negative",
            br#"{"model":"m","prompt":"x","max_tokens":-5}"#.to_vec(),
        ),
        (
            "max_tokens fraction",
            br#"{"model":"m","prompt":"x","max_tokens":1.5}"#.to_vec(),
        ),
        (
            "max_tokens string",
            br#"{"model":"m","prompt":"x","max_tokens":"10"}"#.to_vec(),
        ),
        (
            "max_tokens zero",
            br#"{"model":"m","prompt":"x","max_tokens":0}"#.to_vec(),
        ),
        (
            "n huge",
            br#"{"model":"m","prompt":"x","n":100000}"#.to_vec(),
        ),
        (
            "n negative",
            br#"{"model":"m","prompt":"x","n":-1}"#.to_vec(),
        ),
        ("n zero", br#"{"model":"m","prompt":"x","n":0}"#.to_vec()),
        (
            "n string",
            br#"{"model":"m","prompt":"x","n":"2"}"#.to_vec(),
        ),
        (
            "best_of huge",
            br#"{"model":"m","prompt":"x","best_of":4294967295}"#.to_vec(),
        ),
        ("model number", br#"{"model":1,"prompt":"x"}"#.to_vec()),
        ("model array", br#"{"model":["m"],"prompt":"x"}"#.to_vec()),
        (
            "model object",
            br#"{"model":{"m":1},"prompt":"x"}"#.to_vec(),
        ),
        ("model null", br#"{"model":null,"prompt":"x"}"#.to_vec()),
        ("model true", br#"{"model":true,"prompt":"x"}"#.to_vec()),
        ("model empty", br#"{"model":"","prompt":"x"}"#.to_vec()),
        (
            "model unknown",
            br#"{"model":"nope","prompt":"x"}"#.to_vec(),
        ),
        ("model 60 KB", long_model.into_bytes()),
        (
            "model with NUL escape",
            br#"{"model":"m\u0000","prompt":"x"}"#.to_vec(),
        ),
        (
            "model lone surrogate",
            br#"{"model":"\ud800","prompt":"x"}"#.to_vec(),
        ),
        (
            "duplicate model key",
            br#"{"model":"m","model":"m","prompt":"x"}"#.to_vec(),
        ),
        (
            "duplicate stream key",
            br#"{"model":"m","prompt":"x","stream":true,"stream":false}"#.to_vec(),
        ),
        (
            "stream string",
            br#"{"model":"m","prompt":"x","stream":"yes"}"#.to_vec(),
        ),
        (
            "stream number",
            br#"{"model":"m","prompt":"x","stream":1}"#.to_vec(),
        ),
        (
            "stream_options number",
            br#"{"model":"m","prompt":"x","stream":true,"stream_options":5}"#.to_vec(),
        ),
        (
            "user number",
            br#"{"model":"m","prompt":"x","user":5}"#.to_vec(),
        ),
        (
            "non-UTF-8 in model",
            b"{\"model\":\"\xff\",\"prompt\":\"x\"}".to_vec(),
        ),
        (
            "non-UTF-8 in prompt",
            b"{\"model\":\"m\",\"prompt\":\"\xc3\x28\"}".to_vec(),
        ),
        (
            "overlong UTF-8",
            b"{\"model\":\"m\",\"prompt\":\"\xc0\xaf\"}".to_vec(),
        ),
        (
            "prompt object",
            br#"{"model":"m","prompt":{"a":1}}"#.to_vec(),
        ),
        ("prompt empty", br#"{"model":"m","prompt":""}"#.to_vec()),
        (
            "temperature negative",
            br#"{"model":"m","prompt":"x","temperature":-1}"#.to_vec(),
        ),
        (
            "top_p zero",
            br#"{"model":"m","prompt":"x","top_p":0}"#.to_vec(),
        ),
        (
            "top_p above one",
            br#"{"model":"m","prompt":"x","top_p":1.5}"#.to_vec(),
        ),
        (
            "prompt beyond the context",
            format!(
                "{{\"model\":\"m\",\"prompt\":\"{}\"}}",
                "word ".repeat(12_000)
            )
            .into_bytes(),
        ),
    ];
    let chat: Vec<(&str, Vec<u8>)> = vec![
        (
            "messages string",
            br#"{"model":"m","messages":"hi"}"#.to_vec(),
        ),
        (
            "messages object",
            br#"{"model":"m","messages":{"role":"user"}}"#.to_vec(),
        ),
        (
            "messages of numbers",
            br#"{"model":"m","messages":[1,2]}"#.to_vec(),
        ),
        (
            "message without role",
            br#"{"model":"m","messages":[{"content":"x"}]}"#.to_vec(),
        ),
        (
            "role number",
            br#"{"model":"m","messages":[{"role":1,"content":"x"}]}"#.to_vec(),
        ),
        (
            "unknown role",
            br#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#.to_vec(),
        ),
        (
            "content number",
            br#"{"model":"m","messages":[{"role":"user","content":5}]}"#.to_vec(),
        ),
        (
            "content part without type",
            br#"{"model":"m","messages":[{"role":"user","content":[{"text":"x"}]}]}"#.to_vec(),
        ),
        (
            "text part not a string",
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":[1]}]}]}"#
                .to_vec(),
        ),
        (
            "duplicate role",
            br#"{"model":"m","messages":[{"role":"user","role":"system","content":"x"}]}"#.to_vec(),
        ),
        ("empty messages", br#"{"model":"m","messages":[]}"#.to_vec()),
    ];
    bodies
        .into_iter()
        .map(|(name, body)| case(format!("json: {name}"), completion(&body), Reject))
        .chain(chat.into_iter().map(|(name, body)| {
            case(
                format!("chat: {name}"),
                post("/v1/chat/completions", "", &body),
                Reject,
            )
        }))
        .collect()
}

fn header_and_path_cases() -> Vec<Case> {
    use Expect::*;
    let no_model = br#"{"prompt":"x"}"#;
    let valid = VALID.as_bytes();
    let long_id = format!("X-Request-Id: {}\r\n", "r".repeat(4096));
    let mut v = vec![
        case("content-type text/plain", post("/v1/completions", "", valid).replace_ct("text/plain"), Reject),
        case("content-type form", post("/v1/completions", "", valid).replace_ct("application/x-www-form-urlencoded"), Reject),
        case("content-type garbage bytes", post("/v1/completions", "", valid).replace_ct("\x7f\x7f"), Reject),
        case("GET with a body", "GET /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", Reject),
        case("PUT", "PUT /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", Reject),
        case("DELETE", "DELETE /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", Reject),
        case("no Host header", "POST /v1/completions HTTP/1.1\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{\"prompt\":\"x\"}", Reject),
        case("two Host headers", "POST /v1/completions HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{\"prompt\":\"x\"}", Reject),
        case("Expect 100-continue over the limit", format!("POST /v1/completions HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", LIMIT * 4), Reject),
        case("Expect unknown", post("/v1/completions", "Expect: 200-ok\r\n", no_model), Reject),
        case("Upgrade websocket", post("/v1/completions", "Upgrade: websocket\r\n", no_model), Reject),
        case("Upgrade h2c", post("/v1/completions", "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n", no_model), Reject),
        case("Connection lists Content-Length", post("/v1/completions", "Connection: Content-Length\r\n", no_model), Reject),
        case("Content-Encoding gzip (not gzipped)", post("/v1/completions", "Content-Encoding: gzip\r\n", no_model), Reject),
        case("path ../", post("/v1/../../etc/passwd", "", no_model), Reject),
        case("path %2e%2e", post("/v1/%2e%2e/%2e%2e/admin", "", no_model), Reject),
        case("path //", post("//v1//completions", "", no_model), Reject),
        case("path %00", post("/v1/completions%00", "", no_model), Reject),
        case("path backslash", post("/v1\\..\\completions", "", no_model), Reject),
        case("path outside /v1", post("/admin/config", "", valid), Reject),
        case("path metrics on the API port", "GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", Reject),
        case("path query junk", post("/v1/completions?%ff%fe=%00", "", no_model), Reject),
        case("path 8 KB", post(&format!("/v1/{}", "a".repeat(8192)), "", no_model), Reject),
        case("path fragment", post("/v1/completions#frag", "", no_model), Reject),
    ];
    // Hostile headers on an otherwise valid request: any non-5xx answer.
    for (name, h) in [
        ("x-request-id 4 KB", long_id.as_str()),
        ("x-request-id with spaces", "X-Request-Id: a b c\r\n"),
        (
            "x-client-request-id spoofed",
            "X-Client-Request-Id: spoof\r\n",
        ),
        ("priority garbage", "X-Infergate-Priority: \u{7f}\u{1}\r\n"),
        (
            "priority huge",
            "X-Infergate-Priority: 99999999999999999999\r\n",
        ),
        (
            "objective garbage",
            "X-Gateway-Inference-Objective: ../../x\r\n",
        ),
        ("deadline negative", "X-Infergate-Deadline-Ms: -1\r\n"),
        ("deadline huge", "X-Infergate-Deadline-Ms: 1e30\r\n"),
        ("canary garbage", "X-Infergate-Canary: maybe\r\n"),
        (
            "fairness id path-like",
            "X-Gateway-Inference-Fairness-Id: ../../AAAA\r\n",
        ),
        (
            "hop-by-hop in Connection",
            "Connection: x-secret, keep-alive\r\nX-Secret: 1\r\n",
        ),
        ("TE trailers", "TE: trailers\r\n"),
    ] {
        v.push(case(
            format!("header: {name}"),
            post("/v1/completions", h, valid),
            NoServerError,
        ));
    }
    v
}

trait ReplaceCt {
    fn replace_ct(&self, ct: &str) -> Vec<u8>;
}

impl ReplaceCt for Vec<u8> {
    fn replace_ct(&self, ct: &str) -> Vec<u8> {
        let s = String::from_utf8_lossy(self).into_owned();
        s.replace("application/json", ct).into_bytes()
    }
}

fn size_and_slow_cases() -> Vec<Case> {
    use Expect::*;
    // A valid completion padded with spaces to exactly `len` bytes.
    let padded = |len: usize| {
        let mut b = VALID.as_bytes().to_vec();
        b.truncate(b.len() - 1);
        let pad = len - b.len() - 1;
        b.extend(std::iter::repeat_n(b' ', pad));
        b.push(b'}');
        assert_eq!(b.len(), len);
        b
    };
    let head = |cl: usize| {
        format!("POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {cl}\r\nConnection: close\r\n\r\n")
            .into_bytes()
    };
    let chunked_over = {
        let mut v = b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        for _ in 0..5 {
            v.extend_from_slice(format!("{:x}\r\n", 16 * 1024).as_bytes());
            v.extend(std::iter::repeat_n(b' ', 16 * 1024));
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b"0\r\n\r\n");
        v
    };
    let mut short_body = head(100);
    short_body.extend_from_slice(&VALID.as_bytes()[..40]);
    let mut long_body = head(10);
    long_body.extend_from_slice(VALID.as_bytes());
    let slow_body = {
        let mut parts = vec![Part::Bytes(head(200))];
        for _ in 0..30 {
            parts.push(Part::Bytes(b" ".to_vec()));
            parts.push(Part::Pause(100));
        }
        parts
    };
    let slowloris = {
        let mut parts = vec![Part::Bytes(b"POST /v1/completions HTTP/1.1\r\n".to_vec())];
        for i in 0..30 {
            parts.push(Part::Bytes(format!("X-{i}: a\r\n").into_bytes()));
            parts.push(Part::Pause(100));
        }
        parts
    };
    let slow_byte_by_byte = {
        let mut parts = Vec::new();
        for b in b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n".iter() {
            parts.push(Part::Bytes(vec![*b]));
            parts.push(Part::Pause(60));
        }
        parts
    };
    let mut cases = vec![
        case(
            "body exactly at the limit",
            completion(&padded(LIMIT)),
            NoServerError,
        ),
        case(
            "body one over the limit",
            completion(&padded(LIMIT + 1)),
            Reject,
        ),
        case(
            "body 10x the limit",
            completion(&padded(LIMIT * 10)),
            Reject,
        ),
        case(
            "declared over the limit, nothing sent",
            head(LIMIT + 1),
            Reject,
        ),
        case("declared 1 GB", head(1 << 30), Reject),
        case("chunked over the limit", chunked_over, Reject),
        case("content-length lying short", short_body, Reject),
        case("content-length lying long", long_body, Reject),
        case("content-length zero", head(0), Reject),
        case("headers only, body never sent", head(50), Reject),
    ];
    for (name, parts) in [
        ("slow body (408)", slow_body),
        ("slowloris headers", slowloris),
        ("request line byte by byte", slow_byte_by_byte),
    ] {
        cases.push(Case {
            name: format!("slow: {name}"),
            parts,
            expect: Reject,
        });
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_4xx_or_a_closed_connection() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let fleet = start_fleet(FleetConfig {
        replicas: 2,
        served_model_name: Some("m".into()),
        time_scale: 50.0,
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    let eps = fleet
        .urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let yaml = format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: null\n\
         max_body_bytes: {LIMIT}\n\
         limits: {{ header_read_timeout: 1s, body_read_timeout: 1s }}\n\
         pools:\n  - name: p\n    endpoints: [{eps}]\n\
         routes:\n  - model: m\n    pool: p\n    routing: {{ policy: least_request }}\n"
    );
    let gw = infergate_proxy::start(Config::parse(&yaml, "hostile.yaml").unwrap())
        .await
        .unwrap();
    let addr = gw.local_addr;
    let started = std::time::Instant::now();
    let mut total = 0;
    total += run_group(addr, "protocol", protocol_cases()).await;
    total += run_group(addr, "json", json_cases()).await;
    total += run_group(addr, "headers and paths", header_and_path_cases()).await;
    total += run_group(addr, "sizes and slow clients", size_and_slow_cases()).await;
    assert!(total >= 100, "{total} cases");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic while serving");
    eprintln!("{total} hostile cases in {:?}", started.elapsed());
    gw.shutdown().await;
}

/// The header read timeout holds for every head on a kept-alive connection,
/// not only the first (the vendored hyper keeps one timer per connection and
/// resets it for each head): a head left unfinished after two answered
/// requests is cut after about the timeout, not before it and not never.
#[tokio::test]
async fn a_later_head_left_unfinished_is_cut_at_the_header_timeout() {
    let fleet = start_fleet(FleetConfig {
        replicas: 1,
        served_model_name: Some("m".into()),
        time_scale: 1000.0,
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    let yaml = format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: null\n\
         limits: {{ header_read_timeout: 1s }}\n\
         pools:\n  - name: p\n    endpoints: [\"{}\"]\n\
         routes:\n  - model: m\n    pool: p\n",
        fleet.urls()[0]
    );
    let gw = infergate_proxy::start(Config::parse(&yaml, "timeout.yaml").unwrap())
        .await
        .unwrap();
    let mut s = TcpStream::connect(gw.local_addr).await.unwrap();
    let body = r#"{"model":"m","prompt":"hi","max_tokens":1}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..2 {
        s.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // One whole answer: the head, then its Content-Length of body.
        let done = |got: &[u8]| {
            let text = String::from_utf8_lossy(got);
            let Some(end) = text.find("\r\n\r\n") else {
                return false;
            };
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap();
            got.len() >= end + 4 + len
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while !done(&got) {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the answer");
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap();
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\n")
        .await
        .unwrap();
    let stalled = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    let waited = stalled.elapsed();
    assert!(closed.is_ok(), "the unfinished head was never cut");
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(5),
        "cut after {waited:?}, the timeout is 1 s"
    );
    gw.shutdown().await;
}

//! Streaming backpressure through the real gateway, on a simulated replica: a
//! client that stops reading a stream is cut after the configured stall time
//! and its upstream request is cancelled (the engine frees the sequence); a
//! slow client that keeps reading is served to the end.

#[path = "admission_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup() -> (infergate_sim::Fleet, infergate_proxy::ServerHandle) {
    // An 8B-like engine (long context) at 100x: about 70 us per token.
    let f = infergate_sim::start_fleet(infergate_sim::FleetConfig {
        time_scale: 100.0,
        served_model_name: Some("m".into()),
        ..infergate_sim::FleetConfig::default()
    })
    .await
    .unwrap();
    let yaml = format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\", client_stall: 300ms }}\n  admin: {{ address: \"127.0.0.1:0\" }}\n\
pools:\n  - name: p\n    endpoints: [{}]\nroutes:\n  - model: m\n    pool: p\n",
        urls(&f)
    );
    let cfg = infergate_core::config::Config::parse(&yaml, "test.yaml").unwrap();
    (f, infergate_proxy::start(cfg).await.unwrap())
}

/// Opens a raw HTTP/1.1 connection with a small receive buffer and sends a
/// streaming request for `tokens` tokens.
async fn open_stream(gw: &infergate_proxy::ServerHandle, tokens: u32) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    let mut s = sock.connect(gw.local_addr).await.unwrap();
    let body = completion("m", "stream to a slow reader", tokens, true);
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_and_its_upstream_cancelled() {
    let (f, gw) = setup().await;
    let r = route(&gw, "m");
    // 100,000 tokens take about 7 s to generate: ~15 MB of SSE, more than
    // the kernel's socket buffers hold (4 MB send + the small receive buffer).
    let mut s = open_stream(&gw, 100_000).await;
    let mut head = [0u8; 512];
    let n = s.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    let t0 = Instant::now();
    // Stop reading: the gateway stops reading the replica, then cuts.
    until("upstream cancelled", || {
        f.replica(0).stats().requests_aborted == 1
    })
    .await;
    let cut_after = t0.elapsed();
    assert!(cut_after < Duration::from_secs(5), "{cut_after:?}");
    until("load released", || {
        r.pool.replicas()[0].load.requests() == 0
    })
    .await;
    assert_eq!(r.pool.replicas()[0].load.tokens(), 0);
    // The connection was closed by the gateway: reading drains what was
    // buffered, then ends (or is reset).
    let mut sink = Vec::new();
    // (Generous: on a loaded CI machine the drain of ~4 MB of buffers is slow.)
    let drained = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut sink)).await;
    assert!(drained.is_ok(), "connection still open");
    assert!(
        sink.len() < 10_000_000,
        "the gateway relayed the whole stream to a client that stopped reading: {}",
        sink.len()
    );
}

#[tokio::test]
async fn a_slow_client_that_keeps_reading_is_served_to_the_end() {
    let (f, gw) = setup().await;
    let mut s = open_stream(&gw, 100).await;
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    let t0 = Instant::now();
    loop {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let n = s.read(&mut buf).await.unwrap();
        all.extend_from_slice(&buf[..n]);
        if n == 0
            || all.ends_with(b"data: [DONE]\n\n\r\n0\r\n\r\n")
            || all.windows(12).any(|w| w == b"data: [DONE]")
        {
            break;
        }
    }
    assert!(String::from_utf8_lossy(&all).contains("data: [DONE]"));
    assert_eq!(f.replica(0).stats().requests_aborted, 0);
}

/// HTTP/2: flow control stops a stream the client does not read before the
/// socket fills, so the connection looks healthy; the stream itself is cut
/// and its upstream cancelled, while another stream on the same connection
/// is served to the end.
#[tokio::test]
async fn an_http2_stream_the_client_stops_reading_is_cut_and_its_neighbour_is_not() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (f, gw) = setup().await;
    let r = route(&gw, "m");
    let tcp = tokio::net::TcpStream::connect(gw.local_addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = |tokens: u32| {
        http::Request::post(format!("http://{}/v1/completions", gw.local_addr))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(completion(
                "m",
                "h2 stream",
                tokens,
                true,
            ))))
            .unwrap()
    };
    // Stream A: ~15 MB of SSE; the client takes the head and reads nothing more.
    let stalled = send.send_request(request(100_000)).await.unwrap();
    assert_eq!(stalled.status(), 200);
    assert_eq!(stalled.version(), http::Version::HTTP_2);
    // Stream B, on the same connection, read to the end meanwhile.
    let served = send.send_request(request(2_000)).await.unwrap();
    let body = served.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    let t0 = Instant::now();
    until("the stalled stream's upstream is cancelled", || {
        f.replica(0).stats().requests_aborted == 1
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    until("load released", || {
        r.pool.replicas()[0].load.requests() == 0
    })
    .await;
    // The stalled stream ends with an error (reset), not a clean end.
    let rest = tokio::time::timeout(Duration::from_secs(5), stalled.into_body().collect()).await;
    assert!(matches!(rest, Ok(Err(_))), "the stream was reset");
}

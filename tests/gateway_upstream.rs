//! The upstream side of the data plane: a request lost on a stale kept-alive
//! connection is sent again (the replica never saw it), a request the replica
//! read and then dropped is not; the gateway served by several worker threads
//! answers and drains like the single-runtime one.

#[path = "support_gateway/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one HTTP/1.1 request (head and Content-Length body); false at EOF.
async fn read_request(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return true;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

const ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

/// A raw upstream: `policy(conn_no, request_no_on_conn)` says whether to
/// answer a request (true) or close the connection without a byte (false).
/// Returns its URL and the count of requests it read.
async fn raw_upstream(
    policy: impl Fn(usize, usize) -> bool + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let (seen2, policy) = (seen.clone(), Arc::new(policy));
    tokio::spawn(async move {
        let mut conn_no = 0;
        while let Ok((mut s, _)) = l.accept().await {
            conn_no += 1;
            let (seen, policy) = (seen2.clone(), policy.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while read_request(&mut s).await {
                    n += 1;
                    seen.fetch_add(1, Ordering::SeqCst);
                    if !policy(conn_no, n) {
                        return; // close without answering
                    }
                    if s.write_all(ANSWER).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn a_request_lost_on_a_stale_keepalive_connection_is_sent_again() {
    // The first connection answers one request, then drops the next one
    // unanswered, as a replica closing an idle keep-alive connection does.
    let (url, seen) = raw_upstream(|conn, n| !(conn == 1 && n == 2)).await;
    let gw = gateway(config(&[url], "")).await;
    let (s1, _, b1) = complete(&gw.url()).await;
    assert_eq!((s1.as_u16(), &b1[..]), (200, &b"{\"ok\":true}"[..]));
    let (s2, _, b2) = complete(&gw.url()).await;
    assert_eq!(
        (s2.as_u16(), &b2[..]),
        (200, &b"{\"ok\":true}"[..]),
        "{}",
        String::from_utf8_lossy(&b2)
    );
    // The lost request was read once on the stale connection, then again.
    assert_eq!(seen.load(Ordering::SeqCst), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_request_dropped_on_a_fresh_connection_is_not_sent_again() {
    // Every connection reads its request and closes: the replica saw it (it
    // may have crashed on it), so it must not be sent twice.
    let (url, seen) = raw_upstream(|_, _| false).await;
    let gw = gateway(config(&[url], "")).await;
    let (status, _, body) = complete(&gw.url()).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(error_of(&body)["code"], "upstream_error");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn worker_threads_serve_requests_and_drain_a_stream() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let mut cfg = config(&[up.url()], "");
    cfg.listeners.main.workers = Some(2);
    let gw = gateway(cfg).await;
    let url = gw.url();
    let mut calls = Vec::new();
    for _ in 0..16 {
        let url = url.clone();
        calls.push(tokio::spawn(async move { complete(&url).await }));
    }
    for c in calls {
        let (status, h, _) = c.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(h["x-infergate-replica"], up.key().as_str());
    }
    // A 0.5 s stream in flight while the gateway drains is finished.
    let body = r#"{"model":"m","prompt":"p","stream":true,"max_tokens":10,"x_itl_ms":50}"#;
    let resp = post_stream(&url, "/v1/completions", body, &[]).await;
    let drain = tokio::spawn(gw.drain(Duration::from_secs(10)));
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(text.matches("data: {\"choices\"").count(), 10, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .expect("drain finished")
        .unwrap();
    // The listener is closed once drained.
    assert!(TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .is_err());
}

//! Heap held per open stream: a counting allocator measures the bytes live
//! while N streaming completions wait on a replica that sent one token and
//! went quiet (the shape of `dataplane_bench.sh`'s idle-stream phase, whose
//! RSS figure is the benchmark; this is the regression test). The replica
//! and the clients are raw sockets, so nearly all that is counted is the
//! gateway's: its client connection (hyper's), the relay body and request
//! record, and its upstream connection.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support_gateway;
use support_gateway::{config, gateway};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

fn size(l: Layout) -> isize {
    isize::try_from(l.size()).unwrap_or(isize::MAX)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(size(l), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(size(l), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(size(l), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(
            isize::try_from(new).unwrap_or(isize::MAX) - size(l),
            Ordering::Relaxed,
        );
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A replica on a raw socket: answers every request with an event stream's
/// head and one token, then holds the connection open without a word.
async fn quiet_replica() -> (String, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            // The head, then the body its content-length announces.
            loop {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if let Some(end) = find(&got, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if got.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let token = b"data: {\"choices\":[{\"index\":0,\"text\":\"a\"}]}\n\n";
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{}\r\n",
                token.len(),
                String::from_utf8_lossy(token)
            );
            if s.write_all(answer.as_bytes()).await.is_ok() {
                held.push(s);
            }
        }
    });
    (url, task)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Opens one streaming completion through the gateway and reads until its
/// first token arrived; the socket is returned open.
async fn open_stream(gw: std::net::SocketAddr) -> TcpStream {
    let body = r#"{"model":"m","prompt":"p","stream":true,"max_tokens":1000}"#;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 2048];
    let mut got = Vec::new();
    while find(&got, b"data:").is_none() {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "the gateway closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_holds_little_heap() {
    const N: usize = 200;
    let (up, _replica) = quiet_replica().await;
    let gw = gateway(config(&[up], "")).await;
    // Warm up: lazily built state (pools, metrics, the upstream client).
    let mut open = Vec::with_capacity(N + 1);
    open.push(open_stream(gw.local_addr).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..N {
        open.push(open_stream(gw.local_addr).await);
    }
    // Let every connection settle into its idle wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let per_stream = (LIVE.load(Ordering::Relaxed) - before) / isize::try_from(N).unwrap();
    eprintln!("heap held per open stream: {per_stream} bytes");
    // hyper 1.12 unpatched holds an 8 KiB read and an 8 KiB write buffer
    // per connection (vendor/hyper/PATCHED.md): 16 KiB on their own.
    assert!(
        per_stream < 8 * 1024,
        "an open stream holds {per_stream} bytes of heap"
    );
    drop(open);
}

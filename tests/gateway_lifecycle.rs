//! The real `infergate serve` binary: SIGTERM turns readiness off, stops
//! accepting, lets a stream in flight finish, then exits without waiting out
//! the grace period.

#[path = "support_gateway/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::*;

#[tokio::test]
async fn sigterm_drains_a_stream_in_flight() {
    let up = mini_upstream("a", Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: {{ address: \"127.0.0.1:0\" }}\n\
             shutdown_grace: 20s\n\
             pools:\n  - name: p\n    endpoints: [\"{}\"]\n\
             routes:\n  - model: m\n    pool: p\n",
            up.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "infergate listening on http://127.0.0.1:P (admin http://127.0.0.1:Q)"
    let mut urls = line
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter(|w| w.starts_with("http://"));
    let (url, admin) = (
        urls.next().unwrap().to_string(),
        urls.next().unwrap().to_string(),
    );

    // A 1-second stream: 20 tokens, 50 ms apart.
    let body = r#"{"model":"m","prompt":"p","stream":true,"max_tokens":20,"x_itl_ms":50}"#;
    let resp = post_stream(&url, "/v1/completions", body, &[]).await;
    let mut stream = resp.into_body();
    let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
    let mut got = first.to_vec();

    let term_at = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    // Readiness turns off while the stream still runs; new connections are refused.
    let mut saw_draining = false;
    while term_at.elapsed() < Duration::from_millis(500) {
        if let Ok(r) = client()
            .get(format!("{admin}/readyz").parse().unwrap())
            .await
        {
            if r.status() == 503 {
                saw_draining = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_draining, "/readyz never said draining");
    let port = url.rsplit(':').next().unwrap();
    // Each serving thread closes its listener when it sees the stop signal,
    // a moment after readiness turned off: allow it that moment.
    let refused = async {
        while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(500), refused)
            .await
            .is_ok(),
        "still accepting 500 ms after SIGTERM"
    );

    while let Some(f) = stream.frame().await {
        got.extend_from_slice(&f.unwrap().into_data().unwrap_or_default());
    }
    let text = String::from_utf8(got).unwrap();
    assert_eq!(text.matches("\"text\":\"t").count(), 20, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    let done_at = Instant::now();

    // Exits promptly once idle, far before the 20 s grace.
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(done_at.elapsed() < Duration::from_secs(5), "did not exit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status:?}");
}

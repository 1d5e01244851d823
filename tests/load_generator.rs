//! `infergate-load` against an in-test upstream on loopback: it must count what the upstream
//! did (requests, tokens, statuses per priority class), measure streams, speak HTTP/1.1 and
//! h2c, run both loop shapes, and refuse non-loopback targets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

/// What the upstream saw.
#[derive(Default)]
struct Seen {
    requests: AtomicU64,
    critical: AtomicU64,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r
}

/// A fake engine: completions as JSON, chat as SSE (role chunk, one chunk per token 1 ms
/// apart, finish chunk, usage chunk when asked, `[DONE]`). Header `x-gateway-inference-objective:
/// sheddable` gets a 429; `x-test-cut` gets a 200 stream without `[DONE]`. `GET /metrics`
/// counts the requests so far.
async fn handle(req: Request<Incoming>, seen: Arc<Seen>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/metrics" {
        let n = seen.requests.load(Ordering::Relaxed);
        return Ok(full(
            200,
            format!("# TYPE test_requests counter\ntest_requests_total{{engine=\"0\"}} {n}\ntest_running 1\n"),
        ));
    }
    seen.requests.fetch_add(1, Ordering::Relaxed);
    let objective = req
        .headers()
        .get("x-gateway-inference-objective")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let cut = req.headers().contains_key("x-test-cut");
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    let n = v["max_tokens"].as_u64().unwrap();
    if objective == "critical" {
        seen.critical.fetch_add(1, Ordering::Relaxed);
    }
    if objective == "sheddable" {
        return Ok(full(
            429,
            r#"{"error":{"message":"shed","type":"rate_limit","param":null,"code":"429"}}"#.into(),
        ));
    }
    if path == "/v1/completions" {
        let text = "x ".repeat(n as usize);
        return Ok(full(
            200,
            format!(
                r#"{{"choices":[{{"text":"{text}"}}],"usage":{{"prompt_tokens":4,"completion_tokens":{n},"prompt_tokens_details":{{"cached_tokens":1}}}}}}"#
            ),
        ));
    }
    let usage = v["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut events =
            vec![r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#.to_string()];
        for i in 0..n {
            events.push(format!(
                r#"{{"choices":[{{"delta":{{"content":"t{i} "}}}}]}}"#
            ));
        }
        events.push(r#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#.into());
        if usage {
            events.push(format!(
                r#"{{"choices":[],"usage":{{"prompt_tokens":4,"completion_tokens":{n}}}}}"#
            ));
        }
        if !cut {
            events.push("[DONE]".into());
        }
        for e in events {
            if tx
                .send(Bytes::from(format!("data: {e}\n\n")))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    Ok(r)
}

async fn upstream() -> (SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, s.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Runs the binary (bounded) and returns its exit code, stdout and stderr.
async fn load(args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_infergate-load"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("infergate-load did not finish in 30 s")
    .expect("infergate-load runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn load_json(args: &[&str]) -> Value {
    let (code, out, err) = load(args).await;
    assert_eq!(code, 0, "stderr: {err}\nstdout: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_small_completions_are_all_counted() {
    let (addr, seen) = upstream().await;
    let url = format!("http://{addr}");
    let metrics = format!("{url}/metrics");
    let r = load_json(&[
        "--url",
        &url,
        "-c",
        "3",
        "-n",
        "30",
        "--max-tokens",
        "5",
        "--scrape",
        &metrics,
        "--json",
    ])
    .await;
    assert_eq!(r["requests"], 30);
    assert_eq!(r["ok"], 30);
    assert_eq!(r["output_tokens"], 150);
    assert_eq!(r["e2e_ms"]["count"], 30);
    assert_eq!(
        r["ttft_ms"]["count"], 0,
        "no TTFT for non-streaming answers"
    );
    assert!(r["req_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(r["run"]["mode"], "closed");
    assert_eq!(seen.requests.load(Ordering::Relaxed), 30);
    assert_eq!(r["usage_prompt_tokens"], 120);
    assert_eq!(r["usage_cached_tokens"], 30);
    assert_eq!(r["usage_cache_hit_rate"], 0.25);
    // The replica's own counter grew by exactly the requests sent; gauges are left out.
    assert_eq!(r["replicas"]["total"]["test_requests_total"], 30.0);
    assert_eq!(
        r["replicas"]["per_url"][&metrics]["test_requests_total"],
        30.0
    );
    assert!(r["replicas"]["total"].get("test_running").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_h2c_are_measured_per_priority_class() {
    let (addr, seen) = upstream().await;
    let url = format!("http://{addr}");
    let r = load_json(&[
        "--url",
        &url,
        "--workload",
        "stream",
        "--http2",
        "-c",
        "4",
        "-n",
        "60",
        "--max-tokens",
        "4",
        "--class",
        "crit=1,x-gateway-inference-objective:critical",
        "--class",
        "shed=1,x-gateway-inference-objective:sheddable",
        "--class",
        "cut=1,x-test-cut:1",
        "--json",
    ])
    .await;
    let classes = &r["classes"];
    let (crit, shed, cut) = (&classes["crit"], &classes["shed"], &classes["cut"]);
    let n_crit = crit["requests"].as_u64().unwrap();
    let n_shed = shed["requests"].as_u64().unwrap();
    let n_cut = cut["requests"].as_u64().unwrap();
    assert!(n_crit > 0 && n_shed > 0 && n_cut > 0, "{classes}");
    assert_eq!(n_crit + n_shed + n_cut, 60);
    assert_eq!(seen.requests.load(Ordering::Relaxed), 60);
    assert_eq!(seen.critical.load(Ordering::Relaxed), n_crit);

    assert_eq!(crit["ok"], n_crit);
    assert_eq!(crit["output_tokens"], 4 * n_crit);
    assert_eq!(crit["ttft_ms"]["count"], n_crit);
    assert_eq!(
        crit["itl_ms"]["count"],
        3 * n_crit,
        "4 tokens = 3 gaps per stream"
    );
    assert!(crit["itl_ms"]["p50"].as_f64().unwrap() > 0.0);

    assert_eq!(shed["ok"], 0);
    assert_eq!(shed["errors"]["429"], n_shed);
    assert!(shed["error_samples"]["429"]
        .as_str()
        .unwrap()
        .contains("shed"));
    assert_eq!(
        cut["errors"]["truncated_stream"], n_cut,
        "a stream without [DONE] is an error"
    );

    assert_eq!(r["requests"], 60);
    assert_eq!(r["ok"], n_crit);
    assert_eq!(r["errors"]["429"], n_shed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_and_counted_chunks_without_usage() {
    let (addr, seen) = upstream().await;
    let url = format!("http://{addr}");
    let r = load_json(&[
        "--url",
        &url,
        "--workload",
        "prefix",
        "--groups",
        "2",
        "--users",
        "2",
        "--turns",
        "2",
        "--system-tokens",
        "50",
        "--question-tokens",
        "5",
        "--max-tokens",
        "3",
        "--no-usage",
        "--rate",
        "400",
        "-n",
        "16",
        "--json",
    ])
    .await;
    assert_eq!(r["run"]["mode"], "open");
    assert_eq!(r["requests"], 16);
    assert_eq!(r["ok"], 16);
    assert_eq!(r["output_tokens"], 48, "counted content chunks");
    assert_eq!(r["schedule_lag_ms"]["count"], 16);
    assert_eq!(seen.requests.load(Ordering::Relaxed), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_non_loopback_and_unbounded_runs() {
    let (code, _, err) = load(&["--url", "http://192.0.2.1:80", "-c", "1", "-n", "1"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("not a loopback address"), "{err}");
    let (code, _, err) = load(&["--url", "http://127.0.0.1:9", "-c", "1"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("bounded"), "{err}");
}

/// A raw HTTP/1.1 server that answers one request per connection and then, like llama-server
/// after some streamed answers, closes the kept-alive connection when the next request comes,
/// without processing it. With `close_first`, it closes every connection unanswered.
async fn one_shot_server(close_first: bool) -> (SocketAddr, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let processed = Arc::new(AtomicU64::new(0));
    let p = processed.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let p = p.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut answered = close_first;
                loop {
                    // Read one whole request: headers, then content-length bytes of body.
                    let (head_end, len) = loop {
                        let text = String::from_utf8_lossy(&buf).to_lowercase();
                        if let Some(i) = text.find("\r\n\r\n") {
                            let len = text[..i]
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                            if buf.len() >= i + 4 + len {
                                break (i + 4, len);
                            }
                        }
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    buf.drain(..head_end + len);
                    if answered {
                        return; // closes without a byte of answer
                    }
                    answered = true;
                    p.fetch_add(1, Ordering::Relaxed);
                    let body = r#"{"choices":[{"text":"x"}],"usage":{"prompt_tokens":4,"completion_tokens":1}}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tcp.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, processed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_unanswered_is_retried_once_on_a_fresh_one() {
    let (addr, processed) = one_shot_server(false).await;
    let url = format!("http://{addr}");
    let r = load_json(&["--url", &url, "-c", "1", "-n", "4", "--json"]).await;
    assert_eq!(r["ok"], 4, "{r}");
    assert_eq!(
        processed.load(Ordering::Relaxed),
        4,
        "nothing processed twice"
    );
    assert_eq!(
        r["keepalive_retries"], 3,
        "every request after the first raced a close"
    );

    // A request whose first connection is closed unanswered may have been processed: no retry.
    let (addr, processed) = one_shot_server(true).await;
    let url = format!("http://{addr}");
    let (code, out, _) = load(&["--url", &url, "-c", "1", "-n", "2", "--json"]).await;
    assert_eq!(code, 1, "nothing succeeded");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["errors"]["io_error"], 2, "{r}");
    assert_eq!(r["keepalive_retries"], 0);
    assert_eq!(processed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_several_urls_and_the_oracle_is_reported() {
    let ups = [upstream().await, upstream().await, upstream().await];
    let urls: Vec<String> = ups.iter().map(|(a, _)| format!("http://{a}")).collect();
    let joined = urls.join(",");
    for loop_args in [["--rate", "400"], ["-c", "3"]] {
        let before: Vec<u64> = ups
            .iter()
            .map(|(_, s)| s.requests.load(Ordering::Relaxed))
            .collect();
        let r = load_json(&[
            "--url",
            &joined,
            "--workload",
            "prefix",
            "--groups",
            "2",
            "--users",
            "2",
            "--turns",
            "2",
            "--system-tokens",
            "200",
            "--question-tokens",
            "5",
            "--max-tokens",
            "3",
            "--group-skew",
            "1",
            "--skew-shift-rounds",
            "1",
            loop_args[0],
            loop_args[1],
            "-n",
            "48",
            "--oracle-blocks",
            "1000",
            "--json",
        ])
        .await;
        assert_eq!(r["ok"], 48, "{loop_args:?}");
        // Every URL got a share, and together exactly the requests sent.
        let got: Vec<u64> = ups
            .iter()
            .zip(&before)
            .map(|((_, s), b)| s.requests.load(Ordering::Relaxed) - b)
            .collect();
        assert_eq!(got.iter().sum::<u64>(), 48, "{got:?}");
        assert!(got.iter().all(|n| *n >= 5), "{got:?}");
        // 48 requests over 2 system prompts of 200 tokens, a cache that holds
        // them all: most prompt tokens are repeats.
        let oracle = &r["oracle"];
        assert_eq!(oracle["requests"], 48);
        let hit = oracle["hit_rate"].as_f64().unwrap();
        assert!(hit > 0.5 && hit < 1.0, "{oracle}");
    }
}

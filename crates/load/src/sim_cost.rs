//! `infergate-sim-cost`: what the simulator itself costs.
//!
//! Starts `infergate sim` as a child process (so its CPU is measured alone,
//! from /proc/PID/stat), drives `--replicas` x `--concurrency` concurrent
//! streaming chat requests for `--duration` seconds (then lets the in-flight
//! ones finish), and reports:
//! - CPU seconds of the simulator per 1,000 streamed tokens, and its average
//!   share of one core;
//! - the error between modelled and observed step times, from every replica's
//!   `/admin/stats` (per step: mean |observed - modelled| / modelled; overall:
//!   sum observed / sum modelled).
//!
//! Usage: infergate-sim-cost [--replicas 8] [--concurrency 64] [--duration 20]
//!   [--profile llama-8b-h100] [--max-tokens 256] [--prompt-chars 2000]
//!   [--time-scale 1] [--bin PATH-TO-infergate]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

struct Opts {
    replicas: usize,
    concurrency: usize,
    duration: f64,
    profile: String,
    max_tokens: u32,
    prompt_chars: usize,
    time_scale: f64,
    bin: String,
}

fn parse_opts() -> anyhow::Result<Opts> {
    let exe = std::env::current_exe()?;
    let sibling = exe.with_file_name("infergate");
    let mut o = Opts {
        replicas: 8,
        concurrency: 64,
        duration: 20.0,
        profile: "llama-8b-h100".into(),
        max_tokens: 256,
        prompt_chars: 2000,
        time_scale: 1.0,
        bin: sibling.to_string_lossy().into_owned(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--replicas" => o.replicas = val()?.parse()?,
            "--concurrency" => o.concurrency = val()?.parse()?,
            "--duration" => o.duration = val()?.parse()?,
            "--profile" => o.profile = val()?,
            "--max-tokens" => o.max_tokens = val()?.parse()?,
            "--prompt-chars" => o.prompt_chars = val()?.parse()?,
            "--time-scale" => o.time_scale = val()?.parse()?,
            "--bin" => o.bin = val()?,
            "-h" | "--help" => {
                println!("see the header of loadtest/sim_cost.rs");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(o)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("bad /proc stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// CPU seconds of this process (the load client), for context.
fn self_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn get_json(c: &HttpClient, url: &str) -> anyhow::Result<Value> {
    let resp = c.get(url.parse()?).await?;
    let b = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&b)?)
}

#[derive(Default, Clone, Copy)]
struct StepStats {
    steps: f64,
    modelled: f64,
    observed: f64,
    abs_err: f64,
}

async fn step_stats(c: &HttpClient, urls: &[String]) -> anyhow::Result<StepStats> {
    let mut s = StepStats::default();
    for u in urls {
        let v = get_json(c, &format!("{u}/admin/stats")).await?;
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        s.steps += f("steps");
        s.modelled += f("modelled_step_us");
        s.observed += f("observed_step_us");
        s.abs_err += f("step_abs_error_us");
    }
    Ok(s)
}

/// One client loop: streaming requests back to back until `until`.
/// Counters shared by the client loops.
#[derive(Default)]
struct Totals {
    tokens: AtomicU64,
    errors: AtomicU64,
    requests: AtomicU64,
}

async fn worker(
    c: HttpClient,
    url: String,
    body_base: Value,
    prompt: String,
    until: Instant,
    totals: Arc<Totals>,
) {
    while Instant::now() < until {
        let n = totals.requests.fetch_add(1, Ordering::Relaxed);
        let mut body = body_base.clone();
        // A distinct first block per request: no prefix-cache hits.
        body["messages"] = json!([{"role": "user", "content": format!("{n:016} {prompt}")}]);
        let req = hyper::Request::post(format!("{url}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())));
        let Ok(req) = req else { return };
        let resp = match tokio::time::timeout(Duration::from_secs(60), c.request(req)).await {
            Ok(Ok(r)) if r.status() == 200 => r,
            _ => {
                totals.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut b = resp.into_body();
        let mut tail: Vec<u8> = Vec::with_capacity(1024);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match tokio::time::timeout_at(deadline.into(), b.frame()).await {
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        if tail.len() + d.len() > 4096 {
                            tail.clear();
                        }
                        tail.extend_from_slice(&d);
                    }
                }
                Ok(None) => break,
                _ => {
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        let t = String::from_utf8_lossy(&tail);
        if let Some(i) = t.find("\"completion_tokens\":") {
            let digits: String = t[i + 20..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            totals
                .tokens
                .fetch_add(digits.parse().unwrap_or(0), Ordering::Relaxed);
        }
    }
}

/// The `infergate-sim-cost` command (the binary crate's `src/bin/infergate-sim-cost.rs` calls it).
pub fn main() -> anyhow::Result<()> {
    let o = parse_opts()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let child = KillOnDrop(
        Command::new(&o.bin)
            .args([
                "sim",
                "--profile",
                &o.profile,
                "--replicas",
                &o.replicas.to_string(),
                "--base-port",
                "0",
                "--time-scale",
                &o.time_scale.to_string(),
                "--max-num-seqs",
                &o.concurrency.max(1).to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", o.bin))?,
    );
    let mut child = child;
    let pid = child.0.id();
    // `infergate sim` prints "replica I URL model=M" per replica once listening.
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut urls = Vec::with_capacity(o.replicas);
    while urls.len() < o.replicas {
        let line = lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("sim exited before listening"))??;
        if let Some(u) = line.split_whitespace().nth(2) {
            urls.push(u.to_owned());
        }
    }
    rt.block_on(async {
        let c: HttpClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(o.concurrency + 4)
            .build_http();
        // Wait for every replica.
        let start = Instant::now();
        for u in &urls {
            loop {
                if get_json(&c, &format!("{u}/admin/stats")).await.is_ok() {
                    break;
                }
                anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "sim did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let prompt = "lorem ipsum dolor sit amet ".repeat(o.prompt_chars / 27 + 1);
        let prompt = prompt[..o.prompt_chars.min(prompt.len())].to_owned();
        let body = json!({"model": null, "max_tokens": o.max_tokens, "stream": true,
                          "stream_options": {"include_usage": true}});
        let body = {
            let mut b = body;
            b.as_object_mut().map(|m| m.remove("model"));
            b
        };
        let s0 = step_stats(&c, &urls).await?;
        let cpu0 = cpu_seconds(pid)?;
        let self0 = self_cpu_seconds();
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs_f64(o.duration);
        let totals = Arc::new(Totals::default());
        let mut tasks = Vec::new();
        for u in &urls {
            for _ in 0..o.concurrency {
                tasks.push(tokio::spawn(worker(c.clone(), u.clone(), body.clone(), prompt.clone(), until, totals.clone())));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid)? - cpu0;
        let self_cpu = self_cpu_seconds() - self0;
        let s1 = step_stats(&c, &urls).await?;
        let toks = totals.tokens.load(Ordering::Relaxed);
        let steps = s1.steps - s0.steps;
        let modelled = s1.modelled - s0.modelled;
        let observed = s1.observed - s0.observed;
        let abs_err = s1.abs_err - s0.abs_err;
        println!("sim cost: {} replicas x {} concurrent streams, profile {}, time scale {}, max_tokens {}, prompt {} chars",
            o.replicas, o.concurrency, o.profile, o.time_scale, o.max_tokens, o.prompt_chars);
        println!("  wall {wall:.1} s, requests {}, errors {}, streamed tokens {toks} ({:.0} tok/s)",
            totals.requests.load(Ordering::Relaxed), totals.errors.load(Ordering::Relaxed), toks as f64 / wall);
        println!("  simulator CPU {cpu:.2} s = {:.3} core; {:.4} CPU s per 1000 streamed tokens",
            cpu / wall, if toks > 0 { cpu * 1000.0 / toks as f64 } else { f64::NAN });
        println!("  load client CPU {self_cpu:.2} s = {:.3} core (not part of the simulator)", self_cpu / wall);
        println!("  steps {steps:.0}, mean modelled step {:.3} ms, mean observed {:.3} ms",
            modelled / steps / 1000.0, observed / steps / 1000.0);
        println!("  step time error: per step mean |obs-model|/model {:.2}%, overall sum(obs)/sum(model) - 1 = {:+.2}%",
            abs_err / modelled * 100.0, (observed / modelled - 1.0) * 100.0);
        anyhow::Ok(())
    })?;
    drop(child);
    Ok(())
}

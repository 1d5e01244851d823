//! `infergate-load`: a small load generator for OpenAI-compatible endpoints on loopback.
//!
//! Closed loop (`--concurrency N`) or open loop (`--rate R`, Poisson arrivals), bounded by
//! `--requests` and/or `--duration`; workloads `small` (non-streaming completions), `stream`
//! (streaming chat) and `prefix` (shared-prefix multi-turn chat sessions); optional priority
//! classes with their own headers. Reports status counts, req/s, output tok/s and TTFT / ITL /
//! end-to-end percentiles, overall and per class, as text or `--json`. It shares the CPU with
//! what it measures, so it keeps one keep-alive connection per worker, pre-builds bodies and
//! scans SSE bytes instead of parsing JSON. See loadtest/README.md.

#[path = "load/client.rs"]
mod client;
#[path = "load/hist.rs"]
mod hist;
#[path = "load/oracle.rs"]
mod oracle;
#[path = "load/oracle_partition.rs"]
mod oracle_partition;
#[path = "load/report.rs"]
mod report;
#[path = "load/run.rs"]
mod run;
#[path = "load/scrape.rs"]
mod scrape;
#[path = "load/sse.rs"]
mod sse;
#[path = "load/workload.rs"]
mod workload;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use workload::{Class, ClassPicker, Kind, Spec, Workload};

#[derive(Debug, Parser)]
#[command(
    name = "infergate-load",
    version,
    about = "Load generator for OpenAI-compatible endpoints on loopback (closed or open loop)"
)]
struct Args {
    /// Base URL of the endpoint, loopback only (e.g. http://127.0.0.1:8080). Several
    /// (repeated or comma-separated): each request goes to one of them, by a hash of its
    /// number (a client spreading traffic over gateway instances).
    #[arg(long, value_delimiter = ',', required_unless_present = "oracle_only")]
    url: Vec<String>,
    /// Request shape.
    #[arg(long, value_enum, default_value = "small")]
    workload: Kind,
    /// `model` field of every request.
    #[arg(long, default_value = "fake-model")]
    model: String,
    /// Closed loop: this many workers, each with one connection, one request at a time.
    #[arg(long, short = 'c', conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many requests.
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Stop sending after this many seconds (answers in flight still finish).
    #[arg(long, short = 'd')]
    duration: Option<f64>,
    /// Seconds at the start whose requests are sent but not measured.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Per-request timeout in seconds (connect to last byte).
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Open loop: most requests in flight (and connections); later arrivals wait (schedule lag).
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// Prompt tokens (small, stream).
    #[arg(long, default_value_t = 16)]
    prompt_tokens: u32,
    /// Output tokens asked for per request (`max_tokens`).
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Distinct prompts cycled through (small, stream).
    #[arg(long, default_value_t = 64)]
    distinct: u32,
    /// Prefix: groups, each sharing one system prompt.
    #[arg(long, default_value_t = 8)]
    groups: u32,
    /// Prefix: users (sessions) per group.
    #[arg(long, default_value_t = 8)]
    users: u32,
    /// Prefix: system prompt tokens.
    #[arg(long, default_value_t = 1000)]
    system_tokens: u32,
    /// Prefix: question tokens per turn.
    #[arg(long, default_value_t = 50)]
    question_tokens: u32,
    /// Prefix: turns per session; each turn resends the previous turns (questions and answers).
    #[arg(long, default_value_t = 3)]
    turns: u32,
    /// Prefix: Zipf exponent of group popularity (0: every group alike; 1: the most popular
    /// of 32 groups gets a quarter of the sessions).
    #[arg(long, default_value_t = 0.0)]
    group_skew: f64,
    /// Prefix, with skew: every K rounds the group popularity ranking rotates by 3/8 of the
    /// groups (the hottest turn cold); 0 = never.
    #[arg(long, default_value_t = 0)]
    skew_shift_rounds: u32,
    /// Also report the oracle hit rate: the run's requests, in order, through one LRU prefix
    /// cache of this many blocks (the fleet's total: replicas x blocks each). See oracle.rs.
    #[arg(long)]
    oracle_blocks: Option<usize>,
    /// Also report what placement alone reaches: the same requests through this many
    /// LRU caches of `--oracle-blocks / N` blocks each (see oracle_partition.rs).
    #[arg(long, value_name = "N")]
    oracle_replicas: Option<usize>,
    /// Blocks of each partitioned cache (default: `--oracle-blocks / --oracle-replicas`);
    /// smaller models what the engines keep for running requests and outputs.
    #[arg(long, value_name = "BLOCKS")]
    oracle_partition_blocks: Option<usize>,
    /// Only compute the oracle (and partition) for the first `--requests` requests; send nothing.
    #[arg(long)]
    oracle_only: bool,
    /// Block size (tokens) of the oracle's cache.
    #[arg(long, default_value_t = 16)]
    oracle_block_size: usize,
    /// Do not ask for a usage chunk on streams (output tokens are then counted chunks).
    #[arg(long)]
    no_usage: bool,
    /// Send `ignore_eos: true` (real engines then generate exactly `--max-tokens`).
    #[arg(long)]
    ignore_eos: bool,
    /// Priority class `NAME=SHARE[,HEADER:VALUE]...` (repeatable); reported per class.
    #[arg(long = "class")]
    classes: Vec<Class>,
    /// Extra header `NAME:VALUE` on every request (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Speak h2c (HTTP/2 with prior knowledge) instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// Runtime threads (1 = single-threaded, the lightest on a shared machine).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Varies all prompt text and the arrival sequence; use a new one per run on a shared fleet
    /// so runs do not hit each other's prefix caches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A replica's Prometheus URL (e.g. http://127.0.0.1:8001/metrics), read before and after
    /// the run; the report gets the growth of its `*_total` counters and the prefix-cache hit
    /// rate (repeatable, or comma-separated).
    #[arg(long, value_delimiter = ',')]
    scrape: Vec<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Print the first N requests (class, path, headers, body) and exit without sending.
    #[arg(long, value_name = "N")]
    dry_run: Option<u64>,
}

enum Mode {
    Closed(usize),
    Open(f64),
}

/// Lets the process hold as many sockets as the hard limit allows (10k-stream tests).
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read/write the struct passed by pointer.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn secs(name: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("--{name} {v}: not a valid number of seconds"))
}

async fn run(args: Args) -> Result<bool, String> {
    if args.requests.is_none() && args.duration.is_none() && args.dry_run.is_none() {
        return Err("give --requests and/or --duration: every run is bounded".into());
    }
    let classes = if args.classes.is_empty() {
        vec![Class {
            name: "default".into(),
            share: 1.0,
            headers: vec![],
        }]
    } else {
        args.classes.clone()
    };
    let headers = args
        .headers
        .iter()
        .map(|h| workload::parse_header(h))
        .collect::<Result<Vec<_>, _>>()?;
    let workload = Workload::new(Spec {
        kind: args.workload,
        model: args.model.clone(),
        prompt_tokens: args.prompt_tokens,
        max_tokens: args.max_tokens,
        distinct: args.distinct,
        groups: args.groups,
        users: args.users,
        system_tokens: args.system_tokens,
        question_tokens: args.question_tokens,
        turns: args.turns,
        group_skew: args.group_skew,
        skew_shift_rounds: args.skew_shift_rounds,
        usage: !args.no_usage,
        ignore_eos: args.ignore_eos,
        seed: args.seed,
    })?;
    if args.oracle_only {
        let (Some(n), Some(_)) = (args.requests, args.oracle_blocks) else {
            return Err("--oracle-only needs --requests and --oracle-blocks".into());
        };
        let o = oracle_report(&args, &workload, n).unwrap_or_default();
        println!(
            "{}",
            json!({ "requests": n, "seed": args.seed, "oracle": o })
        );
        return Ok(true);
    }
    let picker = ClassPicker::new(&classes, args.seed);
    let mut targets = Vec::with_capacity(args.url.len());
    for url in &args.url {
        targets.push(client::Target::new(url, workload.path, args.http2, headers.clone()).await?);
    }
    if let Some(n) = args.dry_run {
        for seq in 0..n {
            let class = &classes[picker.pick(seq)];
            let hdrs: Vec<String> = class
                .headers
                .iter()
                .map(|(k, v)| format!("{k}: {v:?}"))
                .collect();
            println!(
                "{}",
                json!({
                    "seq": seq,
                    "class": class.name,
                    "path": workload.path,
                    "headers": hdrs,
                    "body": serde_json::from_slice::<serde_json::Value>(&workload.body(seq)).unwrap_or_default(),
                })
            );
        }
        return Ok(true);
    }
    let duration = args.duration.map(|d| secs("duration", d)).transpose()?;
    let timeout = secs("timeout", args.timeout)?;
    let warmup = secs("warmup", args.warmup)?;
    let max_requests = args.requests.unwrap_or(u64::MAX);
    let (mode, desc) = match (args.concurrency, args.rate) {
        (Some(c), None) if c > 0 => (Mode::Closed(c), json!({"mode": "closed", "concurrency": c})),
        (None, Some(r)) if r > 0.0 && r.is_finite() => (
            Mode::Open(r),
            json!({"mode": "open", "rate": r, "max_in_flight": args.max_in_flight}),
        ),
        (None, None) => {
            return Err("give --concurrency N (closed loop) or --rate R (open loop)".into())
        }
        _ => return Err("--concurrency and --rate must be > 0".into()),
    };
    let scraper = scrape::Scraper::new(&args.scrape).await?;
    let before = scraper.read().await;
    let plan = Arc::new(run::Plan {
        targets,
        workload,
        classes,
        picker,
        timeout,
        max_requests,
        duration,
        warmup,
    });
    let finished = match mode {
        Mode::Closed(c) => plan.clone().closed(c).await,
        Mode::Open(r) => {
            plan.clone()
                .open(r, args.max_in_flight.max(1), args.seed)
                .await
        }
    };
    let replicas = if scraper.is_empty() {
        None
    } else {
        Some(scraper.report(&before, &scraper.read().await))
    };
    let oracle = oracle_report(&args, &plan.workload, finished.sent);
    let mut desc = desc;
    desc["workload"] = json!(format!("{:?}", args.workload).to_lowercase());
    desc["url"] = json!(args.url.join(","));
    desc["model"] = json!(args.model);
    desc["http2"] = json!(args.http2);
    desc["max_tokens"] = json!(args.max_tokens);
    desc["requests_limit"] = json!(args.requests);
    desc["duration_limit_s"] = json!(args.duration);
    desc["warmup_s"] = json!(args.warmup);
    desc["seed"] = json!(args.seed);
    let stats = &finished.stats;
    if args.json {
        let mut v = report::to_json(stats, desc, finished.unfinished);
        if let Some(r) = replicas {
            v["replicas"] = r;
        }
        if let Some(o) = oracle {
            v["oracle"] = o;
        }
        println!("{v}");
    } else {
        let header = format!("infergate-load {desc}");
        print!("{}", report::to_text(stats, &header, finished.unfinished));
        if let Some(r) = replicas {
            println!("replicas (counter growth during the run): {r}");
        }
        if let Some(o) = oracle {
            println!("oracle (pooled LRU prefix cache): {o}");
        }
    }
    Ok(stats.classes.iter().any(|c| c.ok > 0))
}

/// The oracle hit rate of the first `sent` requests (and, with `--oracle-replicas`, what
/// placement alone reaches on a partition of its blocks); `None` without `--oracle-blocks`.
fn oracle_report(args: &Args, workload: &Workload, sent: u64) -> Option<serde_json::Value> {
    let blocks = args.oracle_blocks?;
    let mut pooled = oracle::Oracle::new(blocks, args.oracle_block_size);
    let mut parts = args.oracle_replicas.filter(|&n| n > 0).map(|n| {
        let each = args.oracle_partition_blocks.unwrap_or(blocks / n);
        let make = |p| oracle_partition::Partitioned::new(n, each, args.oracle_block_size, p);
        (
            make(oracle_partition::Placement::Plain),
            make(oracle_partition::Placement::ByTurnover),
        )
    });
    // Each prompt tokenized and hashed once, for the pool and both partitions.
    for seq in 0..sent {
        let Some(p) = oracle::Prompt::of(&workload.body(seq), pooled.block_size()) else {
            continue;
        };
        pooled.add(&p);
        if let Some((plain, weighted)) = &mut parts {
            plain.add(&p);
            weighted.add(&p);
        }
    }
    let mut v = pooled.report();
    if let Some((plain, weighted)) = &parts {
        v["partitioned"] = oracle_partition::report(plain, weighted);
    }
    Some(v)
}

/// The `infergate-load` command (the binary crate's `src/bin/infergate-load.rs` calls it).
pub fn main() -> ExitCode {
    let args = Args::parse();
    raise_fd_limit();
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("infergate-load: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("infergate-load: no request succeeded");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("infergate-load: {e}");
            ExitCode::from(2)
        }
    }
}

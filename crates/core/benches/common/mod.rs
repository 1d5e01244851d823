//! What the routing benchmarks share: 64 replicas with fresh signals, an
//! 8,000-token chat prompt per prefix group, and this thread's CPU time.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Instant;

use infergate_core::discovery::Endpoint;
use infergate_core::pool::Replica;
use infergate_core::routing::Signals;
use infergate_protocol::tokenizer;

pub const REPLICAS: u16 = 64;
pub const PROMPT_TOKENS: usize = 8_000;

pub fn replicas() -> Vec<Arc<Replica>> {
    (0..REPLICAS)
        .map(|i| {
            let r = Arc::new(Replica::new(
                Endpoint::from_url(&format!("http://10.0.{}.{}:8000", i / 200, i % 200)).unwrap(),
            ));
            r.signals.store(Some(Arc::new(Signals {
                at: Instant::now() + std::time::Duration::from_secs(3600),
                error: None,
                waiting: f64::from(i % 3),
                running: 8.0,
                kv_usage: Some(0.5),
                block_size: Some(16),
                num_blocks: Some(20_000),
                lora: None,
                prefix_hit_rate: None,
                preemptions: None,
                tokens_generated: None,
                own_requests_at_scrape: 0,
                batch_limit: None,
                saturated_batch: None,
                slow_start_cap: 0,
                queue_plateau: 0,
                most_running: 0.0,
                foreign_load_at: None,
                smoothed_requests: 8.0 + f64::from(i % 3),
            })));
            r
        })
        .collect()
}

/// A chat prompt of about `PROMPT_TOKENS` tokens: a 6,000-token system prompt
/// shared by group `g`, then a question.
pub fn prompt(g: usize, q: usize) -> String {
    let sys_chars = 6_000 * tokenizer::CHARS_PER_TOKEN;
    let q_chars = (PROMPT_TOKENS - 6_000) * tokenizer::CHARS_PER_TOKEN;
    let sys = format!("group {g} system prompt, long and detailed. ").repeat(sys_chars / 40 + 1);
    let question = format!("question {q} from a user of group {g}. ").repeat(q_chars / 30 + 1);
    format!(
        "<|system|>\n{}\n<|user|>\n{}\n<|assistant|>\n",
        &sys[..sys_chars],
        &question[..q_chars]
    )
}

/// This thread's CPU time: wall time is noisy on a shared machine.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The count of a count mode (`ROUTING_COUNT=N`, `KV_COUNT=N`): run N
/// decisions and exit, for instruction counts under callgrind (subtract a
/// run with N=0). `None`: the variable is unset, so benchmark as usual.
pub fn count_mode(var: &str) -> Option<usize> {
    std::env::var(var).ok().and_then(|v| v.parse().ok())
}

/// Calls `f` `n` times, then exits the process (see [`count_mode`]).
pub fn run_and_exit(n: usize, mut f: impl FnMut()) -> ! {
    for _ in 0..n {
        f();
    }
    std::process::exit(0)
}

/// Mean thread CPU time of `n` calls of `f`, in microseconds, printed as
/// `{label} cpu time: ... us` (robust to a busy machine, unlike wall time).
pub fn report_cpu_us(label: &str, n: u32, mut f: impl FnMut()) -> f64 {
    let t0 = thread_cpu_ns();
    for _ in 0..n {
        f();
    }
    let us = (thread_cpu_ns() - t0) as f64 / f64::from(n) / 1000.0;
    eprintln!("{label} cpu time: {us:.1} us (thread CPU time, mean of {n})");
    us
}

//! Routing decision cost: one inference-aware decision for an 8,000-token prompt
//! over 64 replicas with a warm prefix index, and the index memory per cached block.
//!
//! Run: `cargo bench --bench routing` (prints `index memory: ... bytes/entry`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use infergate_core::routing::{InferenceAware, Picker, RouteRequest, RoutingConfig};
use infergate_protocol::tokenizer;

mod common;
use common::{count_mode, prompt, replicas, report_cpu_us, run_and_exit};

const GROUPS: usize = 256;

fn bench(c: &mut Criterion) {
    let count_only = count_mode("ROUTING_COUNT");
    let rs = replicas();
    let picker = InferenceAware::new(RoutingConfig::default());
    // Warm the index: every group routed a few times.
    let prompts: Vec<String> = (0..GROUPS).map(|g| prompt(g, 0)).collect();
    for round in 0..4 {
        for (g, p) in prompts.iter().enumerate() {
            let text = if round == 0 {
                p.clone()
            } else {
                prompt(g, round)
            };
            let req = RouteRequest {
                request_id: "warm",
                model: "m",
                prompt_text: &text,
                prompt_tokens: tokenizer::count_tokens(&text),
                max_tokens: 256,
                lora: None,
                hashes: Default::default(),
            };
            black_box(picker.pick(&rs, &req, &[]));
        }
    }
    let st = picker.index().stats();
    eprintln!(
        "index memory: {} bytes for {} entries ({} distinct blocks, {} replicas) = {:.1} bytes/entry",
        st.memory_bytes,
        st.entries,
        st.blocks,
        st.replicas,
        st.memory_bytes as f64 / st.entries.max(1) as f64
    );
    let text = prompt(7, 99);
    let tokens = tokenizer::count_tokens(&text);
    eprintln!("prompt tokens: {tokens}");
    let req = RouteRequest {
        request_id: "bench",
        model: "m",
        prompt_text: &text,
        prompt_tokens: tokens,
        max_tokens: 256,
        lora: None,
        hashes: Default::default(),
    };
    // Each decision gets a fresh request, so the prompt is hashed every time
    // (a request reuses its hashes only within one admission).
    let fresh = || RouteRequest {
        hashes: Default::default(),
        ..req
    };
    // The same policy without explanations, warmed the same way.
    let quiet = InferenceAware::new(RoutingConfig {
        explain_buffer: 0,
        ..RoutingConfig::default()
    });
    for p in &prompts {
        let req = RouteRequest {
            prompt_text: p,
            prompt_tokens: tokenizer::count_tokens(p),
            hashes: Default::default(),
            ..req
        };
        black_box(quiet.pick(&rs, &req, &[]));
    }
    // ROUTING_COUNT=N: run N decisions (ROUTING_WHICH=explain or no_explain) and
    // exit, for instruction counts under callgrind (subtract a run with N=0).
    if let Some(n) = count_only {
        let chosen = match std::env::var("ROUTING_WHICH").as_deref() {
            Ok("explain") => &picker,
            _ => &quiet,
        };
        run_and_exit(n, || {
            black_box(chosen.pick_and_begin(&rs, black_box(&fresh()), &[]));
        });
    }
    // Wall time is noisy on a shared machine: also report this thread's CPU time.
    report_cpu_us("decision", 2_000, || {
        black_box(picker.pick_and_begin(&rs, black_box(&fresh()), &[]));
    });
    c.bench_function("decision_8k_tokens_64_replicas", |b| {
        b.iter(|| black_box(picker.pick_and_begin(&rs, black_box(&fresh()), &[])))
    });
    c.bench_function("decision_8k_tokens_64_replicas_no_explain", |b| {
        b.iter(|| black_box(quiet.pick_and_begin(&rs, black_box(&fresh()), &[])))
    });
    c.bench_function("block_hashes_8k_tokens", |b| {
        b.iter(|| black_box(tokenizer::block_hashes(black_box(&text), 16, 1, 1024)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

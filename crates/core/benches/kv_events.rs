//! Precise prefix index costs: one routing decision for an 8,000-token prompt
//! over 64 replicas whose caches are known from KV events, and applying the
//! events of 64 replicas on one core (blocks stored, then removed again).
//!
//! Run: `cargo bench -p infergate-core --bench kv_events` (prints the
//! decision's CPU time, the apply rate in blocks per second of one thread's
//! CPU time, and the index memory per block).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use infergate_core::routing::kv_events::{key_seed, KvEvent, KvEventsConfig, PreciseIndex};
use infergate_core::routing::{InferenceAware, RouteRequest, RoutingConfig};
use infergate_protocol::tokenizer;

mod common;
use common::{count_mode, prompt, replicas, report_cpu_us, run_and_exit, thread_cpu_ns, REPLICAS};

const BS: usize = 16;
/// Blocks each replica holds in the apply benchmark (its steady state).
const HELD: u64 = 10_000;
/// Blocks per BlockStored event (one prefill chunk of 256 tokens).
const PER_EVENT: usize = 16;
/// Rounds of one event per replica per benchmark iteration.
const ROUNDS: u64 = 20;

fn stored(replica: u64, first: u64, n: usize, parent: Option<u64>, tokens: &[u32]) -> KvEvent {
    KvEvent::Stored {
        hashes: (first..first + n as u64)
            .map(|b| replica << 40 | b)
            .collect(),
        parent,
        token_ids: tokens[..n * BS].to_vec(),
        block_size: BS as u32,
        lora_name: None,
        medium: None,
    }
}

fn bench(c: &mut Criterion) {
    let rs = replicas();
    let picker = InferenceAware::new(RoutingConfig {
        kv_events: Some(KvEventsConfig::default()),
        ..RoutingConfig::default()
    });
    let ix = picker.precise_index().expect("kv_events set").clone();
    // Replica i's engine holds the system prompts of groups 4i..4i+4 (as the
    // engine reported them: token ids, its own hashes).
    for (i, r) in rs.iter().enumerate() {
        for g in 4 * i..4 * i + 4 {
            let ids = tokenizer::token_ids(&prompt(g, 0));
            let blocks = 6_000 / BS;
            ix.apply(
                &r.endpoint.key,
                &[stored(i as u64, (g as u64) << 16, blocks, None, &ids)],
            );
        }
        ix.set_live(&r.endpoint.key, true);
    }
    let st = ix.stats();
    eprintln!(
        "precise index: {} entries, {} bytes = {:.1} bytes/entry",
        st.entries,
        st.memory_bytes,
        st.memory_bytes as f64 / st.entries.max(1) as f64
    );
    let text = prompt(7, 99);
    let req = RouteRequest {
        request_id: "bench",
        model: "m",
        prompt_text: &text,
        prompt_tokens: tokenizer::count_tokens(&text),
        max_tokens: 256,
        lora: None,
        hashes: Default::default(),
    };
    // A fresh request each time: the prompt is tokenized and keyed every time.
    let fresh = || RouteRequest {
        hashes: Default::default(),
        ..req
    };
    let check = fresh();
    picker.pick_and_begin(&rs, &check, &[]);
    let keys = check.token_block_keys(BS, key_seed(None), 1024);
    let mut best = 0;
    ix.longest_prefix(&keys, |_, n| best = best.max(n));
    assert_eq!(
        best as usize,
        6_000 / BS,
        "replica 1 holds group 7's system prompt"
    );
    // KV_COUNT=N: run N precise decisions and exit, for instruction counts
    // under callgrind (subtract a run with N=0), as the routing bench's
    // ROUTING_COUNT.
    if let Some(n) = count_mode("KV_COUNT") {
        run_and_exit(n, || {
            black_box(picker.pick_and_begin(&rs, black_box(&fresh()), &[]));
        });
    }
    report_cpu_us("precise decision", 2_000, || {
        black_box(picker.pick_and_begin(&rs, black_box(&fresh()), &[]));
    });
    c.bench_function("precise_decision_8k_tokens_64_replicas", |b| {
        b.iter(|| black_box(picker.pick_and_begin(&rs, black_box(&fresh()), &[])))
    });
    c.bench_function("token_block_keys_8k_tokens", |b| {
        b.iter(|| black_box(fresh().token_block_keys(BS, 0, 1024).len()))
    });

    // Applying events: 64 replicas each holding HELD blocks; an iteration
    // stores PER_EVENT new blocks per replica per round (chained, with their
    // token ids) and then removes them again, so the state stays put.
    let apply_ix = PreciseIndex::new();
    let keys: Vec<Arc<str>> = rs.iter().map(|r| r.endpoint.key.clone()).collect();
    let tokens: Vec<u32> = (0..(HELD as usize * BS) as u32).collect();
    for (i, k) in keys.iter().enumerate() {
        apply_ix.apply(k, &[stored(i as u64, 0, HELD as usize, None, &tokens)]);
    }
    let batches: Vec<(usize, Vec<KvEvent>, Vec<KvEvent>)> = (0..ROUNDS)
        .flat_map(|round| {
            let tokens = &tokens;
            (0..u64::from(REPLICAS)).map(move |i| {
                let first = HELD + round * PER_EVENT as u64;
                let parent = Some(i << 40 | (first - 1));
                let store = stored(i, first, PER_EVENT, parent, &tokens[(round as usize) * 7..]);
                let hashes = (first..first + PER_EVENT as u64)
                    .map(|b| i << 40 | b)
                    .collect();
                let remove = KvEvent::Removed {
                    hashes,
                    medium: None,
                };
                (i as usize, vec![store], vec![remove])
            })
        })
        .collect();
    let blocks_per_iter = ROUNDS * u64::from(REPLICAS) * PER_EVENT as u64;
    let run = |ix: &PreciseIndex| {
        for (i, store, _) in &batches {
            ix.apply(&keys[*i], store);
        }
        for (i, _, remove) in &batches {
            ix.apply(&keys[*i], remove);
        }
    };
    let iters = 50;
    let t0 = thread_cpu_ns();
    for _ in 0..iters {
        run(&apply_ix);
    }
    let secs = (thread_cpu_ns() - t0) as f64 / 1e9;
    let rate = (blocks_per_iter * iters) as f64 / secs;
    eprintln!(
        "apply: {rate:.0} blocks stored+removed per CPU second on one thread \
         ({:.1}x the 640,000 blocks/s of 64 replicas x 10,000 blocks/s)",
        rate / 640_000.0
    );
    let mut g = c.benchmark_group("apply_events");
    g.throughput(Throughput::Elements(blocks_per_iter));
    g.bench_function("store_then_remove_64_replicas", |b| {
        b.iter(|| run(&apply_ix))
    });
    g.finish();
    assert_eq!(apply_ix.stats().entries as u64, HELD * u64::from(REPLICAS));
}

criterion_group!(benches, bench);
criterion_main!(benches);

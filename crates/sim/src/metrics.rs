//! `GET /metrics` of a simulated replica: the engine's state in Prometheus text,
//! under vLLM's, SGLang's or llama.cpp's metric names (one state, three
//! contracts), including the histograms the engine fills (`histogram.rs`).

use std::fmt::Write;

use super::engine::{Engine, EngineSnapshot};
use infergate_protocol::EngineKind;

/// What the renderer needs besides the engine.
pub(crate) struct MetricsContext<'a> {
    pub model: &'a str,
    pub flavor: EngineKind,
    pub lora_names: &'a [String],
    pub max_loras: u32,
    /// Seconds since the Unix epoch (value of `vllm:lora_requests_info`).
    pub now_unix: f64,
}

fn gauge(out: &mut String, name: &str, help: &str, labels: &str, v: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {v}"
    );
}

/// A counter: `# TYPE` names the family without `_total`, as prometheus_client does.
fn counter(out: &mut String, family: &str, help: &str, labels: &str, v: f64) {
    let _ = writeln!(
        out,
        "# HELP {family}_total {help}\n# TYPE {family} counter\n{family}_total{{{labels}}} {v}"
    );
}

fn names(ids: &[u16], lora_names: &[String]) -> String {
    let mut s = String::new();
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        if let Some(n) = lora_names.get(usize::from(*id)) {
            s.push_str(n);
        }
    }
    s
}

/// Renders `/metrics` for `engine` in the context's flavour.
pub(crate) fn render(engine: &Engine, ctx: &MetricsContext<'_>) -> String {
    let s = engine.snapshot();
    let mut out = String::with_capacity(8192);
    match ctx.flavor {
        EngineKind::Vllm => render_vllm(&mut out, engine, &s, ctx),
        EngineKind::Sglang => render_sglang(&mut out, engine, &s, ctx),
        EngineKind::LlamaCpp => render_llamacpp(&mut out, &s),
    }
    out
}

fn kv_usage(s: &EngineSnapshot) -> f64 {
    if s.kv_blocks_total == 0 {
        0.0
    } else {
        f64::from(s.kv_blocks_used) / f64::from(s.kv_blocks_total)
    }
}

fn render_vllm(out: &mut String, e: &Engine, s: &EngineSnapshot, ctx: &MetricsContext<'_>) {
    let l = format!("engine=\"0\",model_name=\"{}\"", ctx.model);
    let c = &s.counters;
    let p = e.params();
    gauge(
        out,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        &l,
        s.running as f64,
    );
    gauge(
        out,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        &l,
        s.waiting as f64,
    );
    gauge(
        out,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        &l,
        kv_usage(s),
    );
    gauge(
        out,
        "vllm:gpu_cache_usage_perc",
        "GPU KV-cache usage. 1 means 100 percent usage.",
        &l,
        kv_usage(s),
    );
    let info = format!(
        "block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"0\",num_gpu_blocks=\"{}\"",
        p.block_size, p.num_gpu_blocks
    );
    gauge(
        out,
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        &info,
        1.0,
    );
    let lora = format!(
        "max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"",
        ctx.max_loras,
        names(&s.running_loras, ctx.lora_names),
        names(&s.waiting_loras, ctx.lora_names)
    );
    gauge(
        out,
        "vllm:lora_requests_info",
        "Running stats on lora requests.",
        &lora,
        ctx.now_unix,
    );
    counter(
        out,
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        &l,
        c.prefix_cache_queries as f64,
    );
    counter(
        out,
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        &l,
        c.prefix_cache_hits as f64,
    );
    counter(
        out,
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        &l,
        c.preemptions as f64,
    );
    counter(
        out,
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        &l,
        c.prompt_tokens as f64,
    );
    counter(
        out,
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        &l,
        c.generation_tokens as f64,
    );
    let _ = writeln!(
        out,
        "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success counter\nvllm:request_success_total{{{l},finished_reason=\"length\"}} {}\nvllm:request_success_total{{{l},finished_reason=\"stop\"}} {}",
        c.success_length, c.success_stop
    );
    e.ttft.write(
        out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &l,
    );
    e.itl.write(
        out,
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &l,
    );
    e.e2e.write(
        out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &l,
    );
}

fn render_sglang(out: &mut String, e: &Engine, s: &EngineSnapshot, ctx: &MetricsContext<'_>) {
    let l = format!("model_name=\"{}\"", ctx.model);
    let c = &s.counters;
    let p = e.params();
    gauge(
        out,
        "sglang:num_running_reqs",
        "The number of running requests.",
        &l,
        s.running as f64,
    );
    gauge(
        out,
        "sglang:num_queue_reqs",
        "The number of requests in the waiting queue.",
        &l,
        s.waiting as f64,
    );
    gauge(
        out,
        "sglang:token_usage",
        "The token usage.",
        &l,
        kv_usage(s),
    );
    gauge(
        out,
        "sglang:num_used_tokens",
        "The number of used tokens.",
        &l,
        f64::from(s.kv_blocks_used * p.block_size),
    );
    gauge(
        out,
        "sglang:max_total_num_tokens",
        "Maximum total number of tokens in the KV cache pool.",
        &l,
        f64::from(p.num_gpu_blocks * p.block_size),
    );
    let hit_rate = if c.prefix_cache_queries == 0 {
        0.0
    } else {
        c.prefix_cache_hits as f64 / c.prefix_cache_queries as f64
    };
    gauge(
        out,
        "sglang:cache_hit_rate",
        "The prefix cache hit rate.",
        &l,
        hit_rate,
    );
    let info = format!(
        "{l},num_pages=\"{}\",page_size=\"{}\"",
        p.num_gpu_blocks, p.block_size
    );
    gauge(
        out,
        "sglang:cache_config_info",
        "Cache configuration.",
        &info,
        1.0,
    );
    counter(
        out,
        "sglang:prompt_tokens",
        "Number of prefill tokens processed.",
        &l,
        c.prompt_tokens as f64,
    );
    counter(
        out,
        "sglang:generation_tokens",
        "Number of generation tokens processed.",
        &l,
        c.generation_tokens as f64,
    );
    counter(
        out,
        "sglang:cached_tokens",
        "Number of cached prompt tokens.",
        &l,
        c.prefix_cache_hits as f64,
    );
    counter(
        out,
        "sglang:num_requests",
        "Number of requests processed.",
        &l,
        (c.success_length + c.success_stop) as f64,
    );
    e.ttft.write(
        out,
        "sglang:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &l,
    );
    e.itl.write(
        out,
        "sglang:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &l,
    );
    e.e2e.write(
        out,
        "sglang:e2e_request_latency_seconds",
        "Histogram of End-to-end request latency in seconds",
        &l,
    );
}

fn render_llamacpp(out: &mut String, s: &EngineSnapshot) {
    let c = &s.counters;
    let model_secs = c.modelled_step_us / 1e6;
    let _ = writeln!(out, "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total {}", c.prompt_tokens);
    let _ = writeln!(out, "# HELP llamacpp:prompt_seconds_total Prompt process time\n# TYPE llamacpp:prompt_seconds_total counter\nllamacpp:prompt_seconds_total {model_secs}");
    let _ = writeln!(out, "# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.\n# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total {}", c.generation_tokens);
    let _ = writeln!(out, "# HELP llamacpp:tokens_predicted_seconds_total Predict process time\n# TYPE llamacpp:tokens_predicted_seconds_total counter\nllamacpp:tokens_predicted_seconds_total {model_secs}");
    let _ = writeln!(out, "# HELP llamacpp:n_decode_total Total number of llama_decode() calls\n# TYPE llamacpp:n_decode_total counter\nllamacpp:n_decode_total {}", c.steps);
    let tps = if model_secs > 0.0 {
        c.generation_tokens as f64 / model_secs
    } else {
        0.0
    };
    let _ = writeln!(out, "# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s.\n# TYPE llamacpp:predicted_tokens_seconds gauge\nllamacpp:predicted_tokens_seconds {tps}");
    let _ = writeln!(out, "# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.\n# TYPE llamacpp:kv_cache_usage_ratio gauge\nllamacpp:kv_cache_usage_ratio {}", kv_usage(s));
    let _ = writeln!(out, "# HELP llamacpp:kv_cache_tokens KV-cache tokens.\n# TYPE llamacpp:kv_cache_tokens gauge\nllamacpp:kv_cache_tokens {}", s.tokens_in_use);
    let _ = writeln!(out, "# HELP llamacpp:requests_processing Number of requests processing.\n# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing {}", s.running);
    let _ = writeln!(out, "# HELP llamacpp:requests_deferred Number of requests deferred.\n# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred {}", s.waiting);
}

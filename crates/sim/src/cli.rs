//! `infergate sim`: its flags (engine parameters default to the profile's,
//! faults to none) and the run loop that serves a fleet until interrupted.

use infergate_protocol::EngineKind;

use super::config::{Faults, FleetConfig, OutputLen, Profile};
use super::events::KvEventsConfig;
use super::fleet::start_fleet;

/// Flags of `infergate sim`. Engine parameters default to the profile's.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Serve simulated vLLM-like replicas (no GPU). See docs/sim.md for the cost model."
)]
pub struct SimArgs {
    /// Engine profile (sets every engine parameter below unless overridden).
    #[arg(long, value_enum, default_value = "llama-8b-h100")]
    pub profile: Profile,
    /// Number of replicas, each with its own port and state.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Port of replica 0; replica i listens on base-port + i. 0 = ephemeral ports (printed).
    #[arg(long, default_value_t = 8001)]
    pub base_port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Run N times faster: every modelled duration is divided by N.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Model name served (default: the profile's model name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Path reported as model_path/tokenizer_path by /server_info (sglang-router
    /// loads a tokenizer from it). Default: the served model name.
    #[arg(long)]
    pub model_path: Option<String>,
    /// A LoRA adapter every replica serves (repeatable).
    #[arg(long = "lora")]
    pub lora: Vec<String>,
    /// Which engine's metric names /metrics uses: vllm, sglang or llama.cpp.
    #[arg(long, default_value = "vllm", value_parser = parse_flavor)]
    pub metrics_flavor: EngineKind,
    /// Output length: `max-tokens` (exactly max_tokens) or `uniform:MIN:MAX` (capped by max_tokens).
    #[arg(long, default_value = "max-tokens")]
    pub output_len: OutputLen,
    /// max_tokens for requests that give none (capped by the context left).
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: u32,
    /// Seed of the fault dice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Publish KV-cache events as vLLM does (same JSON as vLLM's flag, e.g.
    /// `{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558"}`);
    /// replica i binds the ports + i. Extra keys: `encoding` (`map` or
    /// `array`), `int_block_hashes` (false = 32-byte hashes).
    #[arg(long, value_parser = KvEventsConfig::parse)]
    pub kv_events_config: Option<KvEventsConfig>,

    /// Tokens per KV block.
    #[arg(long)]
    pub block_size: Option<u32>,
    /// KV cache size in blocks.
    #[arg(long)]
    pub num_gpu_blocks: Option<u32>,
    /// Most sequences running at once.
    #[arg(long)]
    pub max_num_seqs: Option<u32>,
    /// Token budget of one step (prefill chunks plus decodes).
    #[arg(long)]
    pub max_num_batched_tokens: Option<u32>,
    /// Longest prompt + output accepted.
    #[arg(long)]
    pub max_model_len: Option<u32>,
    /// Cost model: fixed part of every step (microseconds).
    #[arg(long)]
    pub step_fixed_us: Option<f64>,
    /// Cost model: per prompt token computed in a step (microseconds).
    #[arg(long)]
    pub prefill_us_per_token: Option<f64>,
    /// Cost model: per sequence decoding in a step (microseconds).
    #[arg(long)]
    pub decode_us_per_seq: Option<f64>,
    /// Cost model: per context token of the decoding sequences (nanoseconds).
    #[arg(long)]
    pub kv_read_ns_per_token: Option<f64>,
    /// LoRA adapters resident at once.
    #[arg(long)]
    pub max_loras: Option<u32>,
    /// vLLM's scheduling policy: `fcfs`, `priority` (vLLM V1: the waiting
    /// queue by the request's `priority` field, lower first; a full KV cache
    /// preempts the lowest) or `priority-preemptive` (also preempts the
    /// lowest-ranked running sequence for a higher-ranked waiting one when
    /// the batch is full: vLLM V0, SGLang).
    #[arg(long, default_value = "fcfs", value_parser = ["fcfs", "priority", "priority-preemptive"])]
    pub scheduling_policy: String,
    /// Time to load a non-resident LoRA adapter (milliseconds).
    #[arg(long)]
    pub lora_load_ms: Option<f64>,

    /// Fault: fraction of generation requests answered with --fault-error-status.
    #[arg(long, default_value_t = 0.0)]
    pub fault_error_rate: f64,
    /// Fault: the status of injected errors.
    #[arg(long, default_value_t = 500)]
    pub fault_error_status: u16,
    /// Fault: fraction of generation requests answered 429 (retry-after: 1).
    #[arg(long, default_value_t = 0.0)]
    pub fault_429_rate: f64,
    /// Fault: fraction of streams that stall mid-stream.
    #[arg(long, default_value_t = 0.0)]
    pub fault_stall_rate: f64,
    /// Fault: tokens sent before a stall.
    #[arg(long, default_value_t = 1)]
    pub fault_stall_after_tokens: u32,
    /// Fault: stall length in milliseconds (0 = forever).
    #[arg(long, default_value_t = 0)]
    pub fault_stall_ms: u64,
    /// Fault: crash on the Nth generation request (connections cut, port closed).
    #[arg(long)]
    pub fault_crash_after: Option<u64>,
    /// Fault: refuse connections (port closed) from the start.
    #[arg(long)]
    pub fault_refuse: bool,
    /// Model load time in milliseconds: /health and generation answer 503 until then.
    #[arg(long, default_value_t = 0)]
    pub load_delay_ms: u64,
}

fn parse_flavor(s: &str) -> Result<EngineKind, String> {
    serde_yaml_ng::from_str::<EngineKind>(s)
        .map_err(|_| format!("`{s}`: expected vllm, sglang or llama.cpp"))
}

impl SimArgs {
    /// The fleet config these flags describe.
    pub fn to_config(&self) -> FleetConfig {
        let mut p = self.profile.params();
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = self.$f { p.$f = v; })* };
        }
        set!(
            block_size,
            num_gpu_blocks,
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            step_fixed_us,
            prefill_us_per_token,
            decode_us_per_seq,
            kv_read_ns_per_token,
            max_loras,
            lora_load_ms
        );
        p.priority_scheduling = self.scheduling_policy.starts_with("priority");
        p.priority_preemption = self.scheduling_policy == "priority-preemptive";
        FleetConfig {
            profile: self.profile,
            params: p,
            replicas: self.replicas,
            base_port: self.base_port,
            host: self.host,
            time_scale: self.time_scale,
            served_model_name: self.served_model_name.clone(),
            model_path: self.model_path.clone(),
            lora_adapters: self.lora.clone(),
            metrics_flavor: self.metrics_flavor,
            faults: Faults {
                error_rate: self.fault_error_rate,
                error_status: Some(self.fault_error_status),
                rate_limit_rate: self.fault_429_rate,
                stall_rate: self.fault_stall_rate,
                stall_after_tokens: self.fault_stall_after_tokens,
                stall_ms: self.fault_stall_ms,
                crash_after: self.fault_crash_after,
                refuse_connections: self.fault_refuse,
                load_delay_ms: self.load_delay_ms,
            },
            output_len: self.output_len,
            default_max_tokens: self.default_max_tokens,
            seed: self.seed,
            kv_events: self
                .kv_events_config
                .clone()
                .filter(|c| c.enable_kv_cache_events),
        }
    }
}

/// Runs `infergate sim` until interrupted.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let cfg = args.to_config();
    let fleet = start_fleet(cfg.clone()).await?;
    for r in fleet.replicas() {
        match r.kv_event_ports() {
            Some((port, replay)) => println!(
                "replica {} {} model={} kv_events=tcp://{}:{port} replay={}",
                r.index(),
                r.url(),
                cfg.model(),
                cfg.host,
                replay.map_or("-".into(), |p| format!("tcp://{}:{p}", cfg.host)),
            ),
            None => println!("replica {} {} model={}", r.index(), r.url(), cfg.model()),
        }
    }
    tracing::info!(
        replicas = fleet.len(),
        profile = ?cfg.profile,
        time_scale = cfg.time_scale,
        "simulated replicas ready"
    );
    tokio::signal::ctrl_c().await?;
    fleet.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn flags_override_profile_parameters() {
        let cli = Cli::parse_from([
            "x",
            "--profile",
            "tiny",
            "--num-gpu-blocks",
            "99",
            "--metrics-flavor",
            "llama.cpp",
            "--lora",
            "a",
            "--lora",
            "b",
            "--output-len",
            "uniform:2:5",
            "--kv-events-config",
            r#"{"enable_kv_cache_events":true,"endpoint":"tcp://*:0","encoding":"array"}"#,
        ]);
        let cfg = cli.sim.to_config();
        assert_eq!(cfg.params.num_gpu_blocks, 99);
        assert_eq!(cfg.params.block_size, Profile::Tiny.params().block_size);
        assert_eq!(cfg.metrics_flavor, EngineKind::LlamaCpp);
        assert_eq!(cfg.lora_adapters, vec!["a", "b"]);
        assert_eq!(cfg.output_len, OutputLen::Uniform { min: 2, max: 5 });
        let ev = cfg.kv_events.expect("kv events on");
        assert_eq!(ev.encoding, super::super::events::EventEncoding::Array);
        assert!(Cli::try_parse_from(["x", "--kv-events-config", "{"]).is_err());
    }
}

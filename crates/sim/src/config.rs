//! What a simulated fleet is: engine parameters, the profiles they come from,
//! output-length policy and fault settings. Pure data; no I/O.
//!
//! Profile figures are derived from public model configs (layers, KV heads,
//! head size, parameter count) and GPU datasheets (HBM bandwidth, dense BF16
//! FLOPS) with stated efficiency assumptions; docs/sim.md shows each derivation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use infergate_protocol::EngineKind;

use super::events::KvEventsConfig;

/// A named set of engine parameters modelled on a real deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Llama-3.1-8B-Instruct, BF16, one H100 SXM 80 GB.
    #[default]
    #[value(name = "llama-8b-h100")]
    Llama8bH100,
    /// Llama-3.1-70B-Instruct, BF16, four H100 SXM 80 GB (tensor parallel 4).
    #[value(name = "llama-70b-4xh100")]
    Llama70b4xH100,
    /// Llama-3.2-1B-Instruct, BF16, one L4 24 GB.
    #[value(name = "llama-1b-l4")]
    Llama1bL4,
    /// A deliberately small engine for tests: tiny KV cache, small batches.
    #[value(name = "tiny")]
    Tiny,
}

impl Profile {
    /// The engine parameters of this profile (see docs/sim.md for sources).
    pub fn params(self) -> EngineParams {
        match self {
            // KV/token = 2 (K,V) x 32 layers x 8 KV heads x 128 dims x 2 B = 128 KiB.
            // 0.9 x 80 GiB - 15 GiB weights - ~3 GiB activations ~= 54 GiB -> ~27k blocks of 16.
            // Decode: 16.1 GB weights / (3.35 TB/s x 0.8) ~= 6.0 ms per step.
            // KV read: 128 KiB / 2.68 TB/s ~= 49 ns per context token per step.
            // Prefill: 2 x 8.03 GFLOP / (989 TFLOPS x 0.55) ~= 30 us per token.
            Profile::Llama8bH100 => EngineParams {
                model_name: "meta-llama/Llama-3.1-8B-Instruct".into(),
                block_size: 16,
                num_gpu_blocks: 27_000,
                max_num_seqs: 256,
                max_num_batched_tokens: 8192,
                max_model_len: 131_072,
                step_fixed_us: 6000.0,
                prefill_us_per_token: 30.0,
                decode_us_per_seq: 20.0,
                kv_read_ns_per_token: 49.0,
                max_loras: 4,
                lora_load_ms: 30.0,
                priority_scheduling: false,
                priority_preemption: false,
            },
            // KV/token = 2 x 80 x 8 x 128 x 2 B = 320 KiB, 80 KiB per GPU at TP4.
            // Per GPU: 0.9 x 80 GiB - 33 GiB weights - ~3 GiB ~= 36 GiB -> ~29k blocks.
            // Decode: 35.3 GB / 2.68 TB/s ~= 13.2 ms + ~1.6 ms all-reduce ~= 15 ms.
            // Prefill: 2 x 70.6 GFLOP / (4 x 989 TFLOPS x 0.55 x 0.85 TP eff.) ~= 76 us/token.
            Profile::Llama70b4xH100 => EngineParams {
                model_name: "meta-llama/Llama-3.1-70B-Instruct".into(),
                block_size: 16,
                num_gpu_blocks: 29_000,
                max_num_seqs: 256,
                max_num_batched_tokens: 8192,
                max_model_len: 131_072,
                step_fixed_us: 15_000.0,
                prefill_us_per_token: 76.0,
                decode_us_per_seq: 40.0,
                kv_read_ns_per_token: 31.0,
                max_loras: 4,
                lora_load_ms: 120.0,
                priority_scheduling: false,
                priority_preemption: false,
            },
            // KV/token = 2 x 16 x 8 x 64 x 2 B = 32 KiB.
            // 0.9 x 24 GB - 2.5 GB weights - ~1.5 GB ~= 17.6 GB -> ~33k blocks.
            // Decode: 2.47 GB / (300 GB/s x 0.8) ~= 10.3 ms per step.
            // KV read: 32 KiB / 240 GB/s ~= 137 ns per context token.
            // Prefill: 2 x 1.24 GFLOP / (121 TFLOPS x 0.5) ~= 41 us per token.
            Profile::Llama1bL4 => EngineParams {
                model_name: "meta-llama/Llama-3.2-1B-Instruct".into(),
                block_size: 16,
                num_gpu_blocks: 33_000,
                max_num_seqs: 256,
                max_num_batched_tokens: 2048,
                max_model_len: 131_072,
                step_fixed_us: 10_300.0,
                prefill_us_per_token: 41.0,
                decode_us_per_seq: 15.0,
                kv_read_ns_per_token: 137.0,
                max_loras: 4,
                lora_load_ms: 10.0,
                priority_scheduling: false,
                priority_preemption: false,
            },
            Profile::Tiny => EngineParams {
                model_name: "sim-tiny".into(),
                block_size: 16,
                num_gpu_blocks: 256,
                max_num_seqs: 16,
                max_num_batched_tokens: 512,
                max_model_len: 2048,
                step_fixed_us: 2000.0,
                prefill_us_per_token: 20.0,
                decode_us_per_seq: 50.0,
                kv_read_ns_per_token: 0.0,
                max_loras: 2,
                lora_load_ms: 20.0,
                priority_scheduling: false,
                priority_preemption: false,
            },
        }
    }
}

/// The engine of one replica: cache geometry, batching limits and cost model.
///
/// Step duration (modelled) = `step_fixed_us`
///   + `prefill_us_per_token` x prompt tokens computed in the step
///   + `decode_us_per_seq` x sequences decoding one token in the step
///   + `kv_read_ns_per_token` x context tokens of those decoding sequences / 1000
///   + `lora_load_ms` x 1000 per adapter loaded in the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineParams {
    /// The model name the profile describes (default served name).
    pub model_name: String,
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV cache size in blocks.
    pub num_gpu_blocks: u32,
    /// Most sequences running at once.
    pub max_num_seqs: u32,
    /// Token budget of one step (prefill chunks plus decodes).
    pub max_num_batched_tokens: u32,
    /// Longest prompt plus output accepted.
    pub max_model_len: u32,
    pub step_fixed_us: f64,
    pub prefill_us_per_token: f64,
    pub decode_us_per_seq: f64,
    pub kv_read_ns_per_token: f64,
    /// LoRA adapters resident at once.
    pub max_loras: u32,
    /// Time to load a non-resident adapter.
    pub lora_load_ms: f64,
    /// vLLM's `--scheduling-policy priority`: the waiting queue is ordered by
    /// each request's `priority` (lower first), then arrival; a full KV cache
    /// preempts the lowest-ranked running sequence (recomputed later), not
    /// the newest (vLLM V1's `Scheduler.schedule`). Off (FCFS), a request
    /// with a non-zero `priority` is refused with 400, as vLLM does.
    #[serde(default)]
    pub priority_scheduling: bool,
    /// With `priority_scheduling`: a waiting request that outranks a running
    /// one when the batch is full (`max_num_seqs` running) preempts the
    /// lowest-ranked running sequence for its slot. vLLM V0 did this
    /// (`_schedule_priority_preemption`), and SGLang's priority scheduling
    /// does (past its preemption threshold); vLLM V1 does not (a waiting
    /// request only goes first when a slot frees; only a full KV cache
    /// preempts), so `--scheduling-policy priority` leaves it off and
    /// `priority-preemptive` turns it on.
    #[serde(default)]
    pub priority_preemption: bool,
}

impl EngineParams {
    /// Modelled duration of a step with the given work, in microseconds.
    pub fn step_us(
        &self,
        prefill_tokens: u64,
        decode_seqs: u64,
        decode_ctx_tokens: u64,
        lora_loads: u32,
    ) -> f64 {
        self.step_fixed_us
            + self.prefill_us_per_token * prefill_tokens as f64
            + self.decode_us_per_seq * decode_seqs as f64
            + self.kv_read_ns_per_token * decode_ctx_tokens as f64 / 1000.0
            + self.lora_load_ms * 1000.0 * f64::from(lora_loads)
    }
}

impl Default for EngineParams {
    fn default() -> Self {
        Profile::default().params()
    }
}

/// How many tokens a request generates.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutputLen {
    /// Exactly the request's `max_tokens` (finish_reason `length`).
    #[default]
    MaxTokens,
    /// Uniform in `[min, max]`, capped by `max_tokens` (finish_reason `stop`
    /// when the draw ends first). Deterministic per prompt.
    Uniform { min: u32, max: u32 },
}

impl std::str::FromStr for OutputLen {
    type Err = String;
    /// `max-tokens` or `uniform:MIN:MAX`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max-tokens" {
            return Ok(OutputLen::MaxTokens);
        }
        let mut it = s.split(':');
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some("uniform"), Some(a), Some(b), None) => {
                let min: u32 = a.parse().map_err(|e| format!("{a}: {e}"))?;
                let max: u32 = b.parse().map_err(|e| format!("{b}: {e}"))?;
                if min == 0 || min > max {
                    return Err("uniform:MIN:MAX needs 1 <= MIN <= MAX".into());
                }
                Ok(OutputLen::Uniform { min, max })
            }
            _ => Err(format!("`{s}`: expected `max-tokens` or `uniform:MIN:MAX`")),
        }
    }
}

/// Injected faults of one replica; settable by flag and at run time (admin
/// endpoint `POST /admin/faults`, or [`super::ReplicaHandle::set_faults`]).
/// Durations are modelled: divided by the time scale.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Fraction of generation requests answered with `error_status` (5xx).
    pub error_rate: f64,
    /// Status for `error_rate` (default 500).
    pub error_status: Option<u16>,
    /// Fraction of generation requests answered 429 with `retry-after: 1`.
    pub rate_limit_rate: f64,
    /// Fraction of streaming requests that stall after `stall_after_tokens` tokens.
    pub stall_rate: f64,
    pub stall_after_tokens: u32,
    /// How long a stall lasts; 0 = forever.
    pub stall_ms: u64,
    /// Crash (close the listener and every connection) on the Nth generation
    /// request counted from when this is set; that request's connection is cut.
    pub crash_after: Option<u64>,
    /// Refuse TCP connections (the listener is closed) while true.
    pub refuse_connections: bool,
    /// Model load time: `/health` and generation answer 503 for this long
    /// after start (or after this is set at run time).
    pub load_delay_ms: u64,
}

/// Everything needed to start a fleet of simulated replicas.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub profile: Profile,
    /// Engine parameters (defaults from `profile`; override freely).
    pub params: EngineParams,
    pub replicas: usize,
    /// Port of replica 0 (replica i listens on base_port + i); 0 = ephemeral ports.
    pub base_port: u16,
    /// Address to bind; tests and the defaults use 127.0.0.1.
    pub host: std::net::IpAddr,
    /// Every modelled duration is divided by this.
    pub time_scale: f64,
    /// Model name served (default: the profile's model name).
    pub served_model_name: Option<String>,
    /// Path reported as `model_path`/`tokenizer_path` by /server_info (sglang-router
    /// loads a tokenizer from it); default: the served model name.
    pub model_path: Option<String>,
    /// LoRA adapters every replica lists and serves.
    pub lora_adapters: Vec<String>,
    /// Which engine's metric names `/metrics` uses.
    pub metrics_flavor: EngineKind,
    pub faults: Faults,
    pub output_len: OutputLen,
    /// `max_tokens` when a request gives none (capped by the context left).
    pub default_max_tokens: u32,
    /// Seed of the fault dice.
    pub seed: u64,
    /// Publish KV-cache events (vLLM's `--kv-events-config`); `None` = off.
    pub kv_events: Option<KvEventsConfig>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            profile: Profile::default(),
            params: Profile::default().params(),
            replicas: 1,
            base_port: 0,
            host: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            time_scale: 1.0,
            served_model_name: None,
            model_path: None,
            lora_adapters: Vec::new(),
            metrics_flavor: EngineKind::Vllm,
            faults: Faults::default(),
            output_len: OutputLen::MaxTokens,
            default_max_tokens: 256,
            seed: 0,
            kv_events: None,
        }
    }
}

impl FleetConfig {
    /// A config for `profile` with its parameters.
    pub fn with_profile(profile: Profile) -> Self {
        FleetConfig {
            profile,
            params: profile.params(),
            ..FleetConfig::default()
        }
    }

    /// The model name replicas serve.
    pub fn model(&self) -> &str {
        self.served_model_name
            .as_deref()
            .unwrap_or(&self.params.model_name)
    }

    /// Wall-clock time of a modelled duration in microseconds.
    pub fn wall(&self, modelled_us: f64) -> Duration {
        Duration::from_secs_f64((modelled_us / self.time_scale.max(1e-9)).max(0.0) / 1e6)
    }

    /// Wall-clock time of a modelled duration in milliseconds.
    pub fn wall_ms(&self, modelled_ms: u64) -> Duration {
        self.wall(modelled_ms as f64 * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_cost_adds_its_parts() {
        let p = Profile::Tiny.params();
        assert_eq!(p.step_us(0, 0, 0, 0), 2000.0);
        assert_eq!(p.step_us(100, 2, 0, 1), 2000.0 + 2000.0 + 100.0 + 20_000.0);
        let big = Profile::Llama8bH100.params();
        // A bigger batch decodes slower per step.
        assert!(big.step_us(0, 64, 64 * 1000, 0) > big.step_us(0, 8, 8 * 1000, 0));
    }

    #[test]
    fn output_len_parses() {
        assert_eq!("max-tokens".parse::<OutputLen>(), Ok(OutputLen::MaxTokens));
        assert_eq!(
            "uniform:3:9".parse::<OutputLen>(),
            Ok(OutputLen::Uniform { min: 3, max: 9 })
        );
        assert!("uniform:9:3".parse::<OutputLen>().is_err());
        assert!("x".parse::<OutputLen>().is_err());
    }

    #[test]
    fn time_scale_divides_durations() {
        let cfg = FleetConfig {
            time_scale: 10.0,
            ..FleetConfig::default()
        };
        assert_eq!(cfg.wall(10_000.0), Duration::from_millis(1));
        assert_eq!(cfg.wall_ms(100), Duration::from_millis(10));
    }
}

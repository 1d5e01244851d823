//! `infergate sim`: simulated model replicas faithful to vLLM.
//!
//! Each replica is an HTTP server on its own 127.0.0.1 port with its own engine:
//! continuous batching with chunked prefill, a paged KV cache with prefix
//! caching and preemption, a documented step-cost model, vLLM/SGLang/llama.cpp
//! metric names, LoRA slots and injectable faults. docs/sim.md describes the
//! model and the profiles' sources.
//!
//! Modules, each depending only on those before it: `events` (vLLM KV-event
//! settings, the cache's events and their msgpack encoding), `config` (what
//! a fleet is), `error`, `kv` (block pool + prefix cache, raising events), `histogram` and `engine`
//! (the scheduler, clock-free), `metrics` (Prometheus text), `replica`
//! (run-time state and faults), `clock` (one thread pacing every replica's
//! steps), `publish` (the KV events' ZMQ publisher and replay socket), `wire` and `body` (framing, streamed responses, disconnect =
//! abort), `http` (the API surface), `serve` (listener and connections),
//! `fleet` (start/stop in-process), `cli` (`infergate sim`). Only the items
//! re-exported below are public.

mod body;
mod cli;
mod clock;
mod config;
mod engine;
mod error;
mod events;
mod fleet;
mod histogram;
mod http;
mod kv;
mod metrics;
mod publish;
mod replica;
mod serve;
mod wire;

pub use cli::{run, SimArgs};
pub use config::{EngineParams, Faults, FleetConfig, OutputLen, Profile};
pub use engine::Counters;
pub use error::SimError;
pub use events::{EventEncoding, KvEventsConfig};
pub use fleet::{start_fleet, Fleet, ReplicaHandle};
pub use replica::ReplicaStats;

//! Configuration: the YAML model of listeners, pools and routes, parsed with
//! errors that name the file, line and what was expected.
//!
//! The shape, top-down:
//! - `listeners`: the client-facing `main` listener (HTTP/1.1 + h2c, or TLS with
//!   ALPN h2) and the `admin` listener (`/metrics`, `/healthz`, `/readyz`, `/routes`).
//! - `pools`: named sets of replicas of one engine type, from a static
//!   `endpoints:` list or a Kubernetes `service:` reference (watched by discovery).
//! - `routes`: a model name and its aliases, mapped to a pool, with per-route
//!   timeouts, retries, body limit, usage injection, and the `routing:` and
//!   `admission:` sections owned by those modules.
//! - `limits`: bounds that protect the gateway itself from its clients (bodies
//!   in flight, slow bodies, `n`, connections, TLS handshakes, HTTP/2 streams).
//! - `pricing`, `accounting`, `audit`: prices per model and pool
//!   (`crate::cost`), the usage ledger's retention and pool sampling, and the
//!   audit log ([`governance`]).
//! - `telemetry`: OpenTelemetry traces over OTLP/HTTP (off unless
//!   `telemetry.otlp.endpoint` is set).
//!
//! Unknown keys are errors everywhere (`deny_unknown_fields`), so a typo never
//! silently falls back to a default. See docs/config.md for the reference.

mod governance;
pub mod units;

pub use governance::{AccountingConfig, AuditConfig, AuditOutput};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::admission::AdmissionConfig;
use crate::cost::PricingConfig;
use crate::endpoint::InferenceEndpoint;
use crate::identity::{AuthConfig, ADMIN_TOKEN_ENV};
use crate::quota::{GovernanceConfig, QuotasConfig};
use crate::routing::RoutingConfig;
use infergate_protocol::EngineKind;

/// The embedded default config used by `infergate quickstart`.
pub const QUICKSTART_YAML: &str = include_str!("../../../../config/quickstart.yaml");

/// A config that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not match the expected shape.
    #[error("{file}:{line}:{column}: {message}")]
    Parse {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// The YAML is well formed but inconsistent (unknown pool, duplicate model...).
    #[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        file: String,
        line: Option<usize>,
        message: String,
    },
}

/// The whole gateway config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listeners: Listeners,
    /// Request-body limit of a route that sets none (413 beyond). A route's
    /// own `max_body_bytes` replaces it, larger or smaller.
    #[serde(default = "default_max_body", with = "units::size")]
    pub max_body_bytes: u64,
    #[serde(default)]
    pub limits: Limits,
    /// Answer `x-infergate-replica` (the replica's `host:port`) on responses.
    /// Off by default: replica addresses are internal to the deployment.
    #[serde(default)]
    pub expose_replica_header: bool,
    /// How long in-flight requests may run after SIGTERM before the process exits.
    #[serde(default = "default_grace", with = "units::duration")]
    pub shutdown_grace: Duration,
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Traces (OTLP); off by default. Read at start: a reload does not
    /// change it.
    #[serde(default, skip_serializing_if = "TelemetryConfig::is_off")]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Who callers are and what they may do; `mode: none` when absent.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Token prices per model and GPU-hour prices per pool (`crate::cost`).
    #[serde(default)]
    pub pricing: PricingConfig,
    /// Usage ledger retention and pool sampling (`/usage`, `/capacity`).
    #[serde(default)]
    pub accounting: AccountingConfig,
    /// The audit log (off unless `audit.output` is set).
    #[serde(default)]
    pub audit: AuditConfig,
    /// Limits and budgets per team and per key (none when absent).
    #[serde(default, skip_serializing_if = "QuotasConfig::is_empty")]
    pub quotas: QuotasConfig,
    /// Where replicas share quota counters (`redis:`); local when absent.
    #[serde(default, skip_serializing_if = "GovernanceConfig::is_empty")]
    pub governance: GovernanceConfig,
}

/// 4 MiB: a 128k-token prompt is about 0.5 MiB of text, or about 0.9 MiB as
/// token ids (`[12345, ...]`); 4x that covers long chat histories. Requests
/// carrying images as base64 need more: raise it on their route.
fn default_max_body() -> u64 {
    4 << 20
}

/// Bounds that keep one client (or many) from exhausting the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Request-body bytes held by all requests at once, counting each body
    /// twice (the body and the prompt text rendered from it) until it has
    /// gone upstream; a request that would exceed it is answered 503 with
    /// `Retry-After`. At least twice every body limit.
    #[serde(default = "Limits::default_inflight", with = "units::size")]
    pub max_inflight_body_bytes: u64,
    /// An HTTP/1 request head must arrive within this long (slow-header
    /// clients, "slowloris", are cut).
    #[serde(default = "Limits::default_header_read", with = "units::duration")]
    pub header_read_timeout: Duration,
    /// The whole body must arrive within this long after the request head
    /// (408 beyond): a client trickling its body holds memory and a slot.
    #[serde(default = "Limits::default_body_read", with = "units::duration")]
    pub body_read_timeout: Duration,
    /// The largest `n` (and `best_of`) a request may ask for (400 beyond); the
    /// cost estimate reserves `n` times the output.
    #[serde(default = "Limits::default_max_n")]
    pub max_n: u32,
    /// Open client connections per listener; more are closed at accept.
    #[serde(default = "Limits::default_max_connections")]
    pub max_connections: usize,
    /// A TLS client must finish its handshake within this long.
    #[serde(default = "Limits::default_tls_handshake", with = "units::duration")]
    pub tls_handshake_timeout: Duration,
    /// Concurrent streams an HTTP/2 client may open on one connection.
    #[serde(default = "Limits::default_h2_streams")]
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 PING interval on idle connections; `off` disables it.
    #[serde(default = "Limits::default_h2_keepalive", with = "units::opt_duration")]
    pub http2_keepalive_interval: Option<Duration>,
    /// A PING unanswered for this long closes the connection.
    #[serde(
        default = "Limits::default_h2_keepalive_timeout",
        with = "units::duration"
    )]
    pub http2_keepalive_timeout: Duration,
}

impl Limits {
    fn default_inflight() -> u64 {
        256 << 20
    }
    fn default_body_read() -> Duration {
        Duration::from_secs(30)
    }
    fn default_header_read() -> Duration {
        Duration::from_secs(30)
    }
    fn default_max_n() -> u32 {
        128
    }
    fn default_max_connections() -> usize {
        10_000
    }
    fn default_tls_handshake() -> Duration {
        Duration::from_secs(10)
    }
    fn default_h2_streams() -> u32 {
        256
    }
    fn default_h2_keepalive() -> Option<Duration> {
        Some(Duration::from_secs(30))
    }
    fn default_h2_keepalive_timeout() -> Duration {
        Duration::from_secs(10)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inflight_body_bytes: Self::default_inflight(),
            header_read_timeout: Self::default_header_read(),
            body_read_timeout: Self::default_body_read(),
            max_n: Self::default_max_n(),
            max_connections: Self::default_max_connections(),
            tls_handshake_timeout: Self::default_tls_handshake(),
            http2_max_concurrent_streams: Self::default_h2_streams(),
            http2_keepalive_interval: Self::default_h2_keepalive(),
            http2_keepalive_timeout: Self::default_h2_keepalive_timeout(),
        }
    }
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    #[serde(default = "Listener::default_main")]
    pub main: Listener,
    /// `null` turns the admin listener off.
    #[serde(default = "Listener::default_admin")]
    pub admin: Option<Listener>,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            main: Listener::default_main(),
            admin: Listener::default_admin(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// `host:port` to bind; port 0 picks a free port.
    pub address: SocketAddr,
    /// Serve TLS (HTTP/1.1 and h2 by ALPN) instead of cleartext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// A client whose connection takes no bytes for this long (it stopped
    /// reading a stream) is disconnected and its upstream request cancelled
    /// (see `admission::backpressure`); `null` turns the check off.
    #[serde(
        default = "Listener::default_client_stall",
        with = "units::opt_duration"
    )]
    pub client_stall: Option<Duration>,
    /// Threads serving this listener, each with its own runtime, accept loop
    /// and upstream connections (no cross-thread hand-off on the request
    /// path). `0`: the process's shared work-stealing runtime (better when
    /// the gateway shares its CPUs with other busy processes). `null`: one
    /// per CPU for `infergate serve`; `proxy::start` (embedding, tests)
    /// serves on the caller's runtime.
    #[serde(default)]
    pub workers: Option<usize>,
}

impl Listener {
    fn default_main() -> Listener {
        Listener {
            address: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: None,
            client_stall: Self::default_client_stall(),
            workers: None,
        }
    }
    fn default_admin() -> Option<Listener> {
        Some(Listener {
            address: SocketAddr::from(([127, 0, 0, 1], 9090)),
            tls: None,
            client_stall: Self::default_client_stall(),
            workers: None,
        })
    }
    fn default_client_stall() -> Option<Duration> {
        Some(Duration::from_secs(60))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `infergate=debug` (RUST_LOG wins).
    #[serde(default)]
    pub level: Option<String>,
}

/// `telemetry:`: what the gateway exports besides logs and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OpenTelemetry traces over OTLP/HTTP (protobuf); none: no traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp: Option<OtlpConfig>,
}

impl TelemetryConfig {
    fn is_off(&self) -> bool {
        self.otlp.is_none()
    }
}

/// `telemetry.otlp`: where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans go
    /// to `{endpoint}/v1/traces` unless the URL already ends with it.
    pub endpoint: String,
    /// `service.name` of the exported resource.
    #[serde(default = "OtlpConfig::default_service_name")]
    pub service_name: String,
    #[serde(default)]
    pub sampling: Sampling,
    /// Finished spans waiting for export; beyond it spans are dropped (and
    /// counted), never waited for.
    #[serde(default = "OtlpConfig::default_max_queue")]
    pub max_queue_size: usize,
    /// How often queued spans are sent (sooner when a batch of 512 is full).
    #[serde(
        default = "OtlpConfig::default_export_interval",
        with = "units::duration"
    )]
    pub export_interval: Duration,
    /// The longest one export request may take.
    #[serde(default = "OtlpConfig::default_timeout", with = "units::duration")]
    pub timeout: Duration,
}

impl OtlpConfig {
    fn default_service_name() -> String {
        "infergate".into()
    }
    fn default_max_queue() -> usize {
        2048
    }
    fn default_export_interval() -> Duration {
        Duration::from_secs(5)
    }
    fn default_timeout() -> Duration {
        Duration::from_secs(10)
    }

    /// The URL spans are POSTed to.
    pub fn traces_url(&self) -> String {
        let base = self.endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        }
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        let e = &self.endpoint;
        let authority = e.strip_prefix("http://").map(|r| r.split('/').next());
        if !matches!(authority, Some(Some(a)) if !a.is_empty()) {
            return Err((
                "endpoint:",
                format!("`telemetry.otlp.endpoint`: expected an OTLP/HTTP URL like `http://collector:4318` (plain HTTP: use a local collector or agent for TLS), found `{e}`"),
            ));
        }
        if !(0.0..=1.0).contains(&self.sampling.ratio) {
            return Err((
                "ratio:",
                format!(
                    "`telemetry.otlp.sampling.ratio` must be between 0 and 1, found {}",
                    self.sampling.ratio
                ),
            ));
        }
        if self.max_queue_size == 0 {
            return Err((
                "max_queue_size:",
                "`telemetry.otlp.max_queue_size` must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Which requests are traced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// Share of new traces recorded (by trace id, so every span of a trace
    /// agrees).
    #[serde(default = "Sampling::default_ratio")]
    pub ratio: f64,
    /// A request carrying a `traceparent` follows its caller's decision
    /// (sampled flag) instead of the ratio.
    #[serde(default = "Sampling::default_parent_based")]
    pub parent_based: bool,
}

impl Sampling {
    fn default_ratio() -> f64 {
        1.0
    }
    fn default_parent_based() -> bool {
        true
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            ratio: 1.0,
            parent_based: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A named set of replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    #[serde(default)]
    pub engine: EngineKind,
    /// Static replica base URLs (`http://host:port`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// A Kubernetes Service whose ready endpoints are the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// The engines schedule by the request's own priority (`vllm`: vLLM's
    /// `--scheduling-policy priority`); the gateway then sends each request's
    /// band as that priority. Unset: a client's `priority` field is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_priority: Option<crate::admission::EnginePriority>,
}

/// Where a pool's replicas come from.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolSource<'a> {
    Static(&'a [String]),
    Service(&'a ServiceRef),
}

impl PoolConfig {
    pub fn source(&self) -> PoolSource<'_> {
        match &self.service {
            Some(s) => PoolSource::Service(s),
            None => PoolSource::Static(&self.endpoints),
        }
    }
}

/// A Kubernetes Service reference (`service:` of a pool).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRef {
    pub name: String,
    /// Defaults to the gateway's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub port: PortRef,
}

/// A Service port, by name or number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// One model route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The model name clients send.
    pub model: String,
    /// Other names clients may send for the same route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The pool (by name) serving this route.
    pub pool: String,
    /// The model name sent upstream (the body is rewritten when it differs
    /// from what the client sent); by default the route's `model`, so a client
    /// using an alias reaches an engine that serves only the canonical name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_model: Option<String>,
    /// Send an alias upstream as the client sent it (for engines started with
    /// that extra name) instead of rewriting it to `target_model` / `model`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_alias: bool,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retries: RetryConfig,
    /// This route's body limit, larger or smaller than the global `max_body_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_size")]
    pub max_body_bytes: Option<u64>,
    #[serde(default)]
    pub usage: UsageConfig,
    /// The inference endpoints this route serves (default: every one, see
    /// `endpoint`); a request to another is answered 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<InferenceEndpoint>>,
    /// Expected output tokens when a request sets no `max_tokens` (load estimates).
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
    /// Write the request's prompt (as rendered for routing) into its audit
    /// line. Off by default: prompts are the clients' data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit_prompts: bool,
}

fn default_max_tokens() -> u32 {
    256
}

impl RouteConfig {
    /// Whether this route serves `endpoint`.
    pub fn serves(&self, endpoint: InferenceEndpoint) -> bool {
        self.endpoints
            .as_ref()
            .is_none_or(|e| e.contains(&endpoint))
    }

    /// The route's model name and its aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.model.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

mod opt_size {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::units::size")] u64);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }

    pub(super) fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_u64(*v),
            None => s.serialize_none(),
        }
    }
}

/// Per-route upstream timeouts, kept apart because an LLM request has phases of
/// very different lengths: connecting (fast), prefill until the first token
/// (long: minutes under load), gaps between tokens (short), and the whole
/// generation (unbounded by default: a long answer is not an error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect to a replica (a failure is retried on another replica).
    #[serde(default = "Timeouts::default_connect", with = "units::duration")]
    pub connect: Duration,
    /// From sending the request to the first body byte (time to first token).
    #[serde(default = "Timeouts::default_first_byte", with = "units::duration")]
    pub first_byte: Duration,
    /// Longest gap between two body chunks once the first arrived.
    #[serde(default = "Timeouts::default_idle", with = "units::duration")]
    pub idle: Duration,
    /// The whole request; off by default.
    #[serde(default, with = "units::opt_duration")]
    pub total: Option<Duration>,
    /// For streaming requests: when the first byte takes longer than this,
    /// answer `200 text/event-stream` at once and send SSE comment keep-alives
    /// until tokens flow. Off by default.
    #[serde(default, with = "units::opt_duration")]
    pub keepalive_after: Option<Duration>,
    /// Interval between SSE keep-alive comments.
    #[serde(
        default = "Timeouts::default_keepalive_interval",
        with = "units::duration"
    )]
    pub keepalive_interval: Duration,
}

impl Timeouts {
    fn default_connect() -> Duration {
        Duration::from_secs(2)
    }
    fn default_first_byte() -> Duration {
        Duration::from_secs(300)
    }
    fn default_idle() -> Duration {
        Duration::from_secs(60)
    }
    fn default_keepalive_interval() -> Duration {
        Duration::from_secs(10)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Self::default_connect(),
            first_byte: Self::default_first_byte(),
            idle: Self::default_idle(),
            total: None,
            keepalive_after: None,
            keepalive_interval: Self::default_keepalive_interval(),
        }
    }
}

/// Retries before any response byte went to the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Total tries including the first (1 = no retry). Each goes to a replica
    /// not tried before for this request.
    #[serde(default = "RetryConfig::default_attempts")]
    pub attempts: u32,
    /// Upstream statuses that are retried (connect failures always are).
    #[serde(default = "RetryConfig::default_statuses")]
    pub on_status: Vec<u16>,
}

impl RetryConfig {
    fn default_attempts() -> u32 {
        3
    }
    fn default_statuses() -> Vec<u16> {
        vec![502, 503]
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: Self::default_attempts(),
            on_status: Self::default_statuses(),
        }
    }
}

/// Token accounting options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// Add `stream_options: {include_usage: true}` to streaming requests that
    /// lack it, so the replica reports exact token counts (the body is rewritten).
    #[serde(default)]
    pub include_usage: bool,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        Config::parse(&text, &file)
    }

    /// Parses and validates YAML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            // The YAML error's own path stops at the enclosing map; the
            // tracked one names the field (`routes[0].timeouts.first_byte`).
            let path = e.path().to_string();
            let e = e.into_inner();
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            let mut message = e.to_string();
            if let Some(i) = message.rfind(" at line ") {
                message.truncate(i);
            }
            message = with_full_path(message, &path);
            ConfigError::Parse {
                file: file.to_string(),
                line,
                column,
                message,
            }
        })?;
        cfg.validate_in(Some(text), file)?;
        Ok(cfg)
    }

    /// Checks what the YAML shape cannot express (references between sections,
    /// duplicates, one source per pool).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_in(None, "<config>")
    }

    fn validate_in(&self, text: Option<&str>, file: &str) -> Result<(), ConfigError> {
        let invalid = |needle: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            line: text.and_then(|t| line_of(t, needle)),
            message,
        };
        let mut pool_names = HashSet::new();
        for p in &self.pools {
            if p.name.is_empty() {
                return Err(invalid("name:", "a pool needs a non-empty `name`".into()));
            }
            if !pool_names.insert(p.name.as_str()) {
                return Err(invalid(
                    &p.name,
                    format!("pool `{}` is defined twice", p.name),
                ));
            }
            match (&p.service, p.endpoints.is_empty()) {
                (Some(_), false) => {
                    return Err(invalid(
                        &p.name,
                        format!(
                            "pool `{}`: expected either `endpoints` or `service`, not both",
                            p.name
                        ),
                    ))
                }
                (None, true) => {
                    return Err(invalid(
                        &p.name,
                        format!(
                            "pool `{}`: expected `endpoints: [urls]` or `service: {{name, port}}`",
                            p.name
                        ),
                    ))
                }
                _ => {}
            }
            for url in &p.endpoints {
                if url.starts_with("https://") {
                    // The upstream client speaks plain HTTP/1.1: sending a
                    // request meant for TLS in clear text to port 443 would
                    // leak it and fail, so it is refused here.
                    return Err(invalid(
                        url,
                        format!(
                            "pool `{}`: `https://` endpoints are not supported (the upstream client speaks plain HTTP); use `http://` on a trusted network or a TLS sidecar, found `{url}`",
                            p.name
                        ),
                    ));
                }
                if crate::discovery::Endpoint::from_url(url).is_none()
                    || !(url.starts_with("http://") || url.starts_with("https://"))
                {
                    return Err(invalid(
                        url,
                        format!(
                            "pool `{}`: expected an endpoint URL like `http://10.0.0.1:8000`, found `{url}`",
                            p.name
                        ),
                    ));
                }
            }
        }
        let mut models = HashSet::new();
        for r in &self.routes {
            if r.model.is_empty() {
                return Err(invalid(
                    "model:",
                    "a route needs a non-empty `model`".into(),
                ));
            }
            for name in std::iter::once(&r.model).chain(&r.aliases) {
                if !models.insert(name.as_str()) {
                    return Err(invalid(
                        name,
                        format!("model name `{name}` is served by two routes"),
                    ));
                }
            }
            if !pool_names.contains(r.pool.as_str()) {
                return Err(invalid(
                    &format!("pool: {}", r.pool),
                    format!(
                        "route `{}`: unknown pool `{}` (expected one of: {})",
                        r.model,
                        r.pool,
                        self.pools
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            if r.retries.attempts == 0 {
                return Err(invalid(
                    "attempts:",
                    format!("route `{}`: `retries.attempts` must be at least 1", r.model),
                ));
            }
        }
        for r in &self.routes {
            r.admission
                .check(&r.model, |m| models.contains(m), |p| pool_names.contains(p))
                .map_err(|(needle, message)| invalid(&needle, message))?;
            r.check_bounds(&self.limits)
                .map_err(|(needle, message)| invalid(needle, message))?;
        }
        self.limits
            .check(self.max_body_bytes)
            .map_err(|(needle, message)| invalid(needle, message))?;
        if let Some(o) = &self.telemetry.otlp {
            o.check()
                .map_err(|(needle, message)| invalid(needle, message))?;
        }
        let admin_token_set = self.auth.admin.token_file.is_some()
            || std::env::var_os(ADMIN_TOKEN_ENV).is_some_and(|v| !v.is_empty());
        self.auth
            .check(
                |m| models.contains(m),
                self.listeners.admin.as_ref().map(|a| a.address),
                admin_token_set,
            )
            .map_err(|(needle, message)| invalid(&needle, message))?;
        self.quotas
            .check(&self.governance)
            .map_err(|(needle, message)| invalid(&needle, message))?;
        let priced = |m: &str| {
            self.routes.iter().any(|r| {
                r.names().any(|n| n == m)
                    || r.target_model.as_deref() == Some(m)
                    || r.admission
                        .canary
                        .as_ref()
                        .is_some_and(|c| c.model.as_deref() == Some(m))
            })
        };
        self.pricing
            .check(priced, |p| pool_names.contains(p))
            .map_err(|(needle, message)| invalid(&needle, message))?;
        self.accounting
            .check()
            .map_err(|(needle, message)| invalid(needle, message))?;
        Ok(())
    }

    /// The largest body any route accepts: bodies are read up to this before
    /// the route (named inside the body) is known.
    pub fn max_read_body_bytes(&self) -> u64 {
        self.routes
            .iter()
            .filter_map(|r| r.max_body_bytes)
            .fold(self.max_body_bytes, u64::max)
    }
}

impl Limits {
    /// Checks the limits; the error is (a text to find its line, message).
    fn check(&self, max_body_bytes: u64) -> Result<(), (&'static str, String)> {
        let at_least_one = [
            ("max_n", self.max_n as u64),
            ("max_connections", self.max_connections as u64),
            (
                "http2_max_concurrent_streams",
                u64::from(self.http2_max_concurrent_streams),
            ),
        ];
        for (key, v) in at_least_one {
            if v == 0 {
                return Err((key, format!("limits.{key}: must be at least 1")));
            }
        }
        if self.max_inflight_body_bytes < max_body_bytes.saturating_mul(2) {
            return Err((
                "max_inflight_body_bytes",
                format!(
                    "limits.max_inflight_body_bytes ({}) is smaller than twice max_body_bytes ({max_body_bytes}; a body and its rendered prompt): a body of the maximum size could never be accepted",
                    self.max_inflight_body_bytes
                ),
            ));
        }
        Ok(())
    }
}

impl RouteConfig {
    /// Bounds that the YAML shape cannot express: durations given as whole
    /// milliseconds or seconds (capped like the others, see
    /// [`units::MAX_DURATION`]) and a body limit the in-flight bound can hold.
    fn check_bounds(&self, limits: &Limits) -> Result<(), (&'static str, String)> {
        let route = &self.model;
        let q = &self.admission.queue;
        let o = &self.admission.outlier;
        let s = &self.routing.scrape;
        let millis = [
            ("admission.queue.timeout_ms", q.timeout_ms),
            ("admission.queue.max_timeout_ms", q.max_timeout_ms),
            (
                "admission.queue.retry_after_secs",
                q.retry_after_secs.saturating_mul(1000),
            ),
            ("admission.outlier.base_ejection_ms", o.base_ejection_ms),
            ("admission.outlier.max_ejection_ms", o.max_ejection_ms),
            ("admission.outlier.probe_interval_ms", o.probe_interval_ms),
            ("admission.outlier.probe_timeout_ms", o.probe_timeout_ms),
            ("routing.scrape.interval_ms", s.interval_ms),
            ("routing.scrape.timeout_ms", s.timeout_ms),
            ("routing.scrape.stale_after_ms", s.stale_after_ms),
            (
                "routing.rendezvous.shared_window_ms",
                self.routing.rendezvous.shared_window_ms,
            ),
        ];
        let canary_window = self
            .admission
            .canary
            .as_ref()
            .map(|c| c.rollback.window_secs.saturating_mul(1000));
        let canary = canary_window.map(|w| ("admission.canary.rollback.window_secs", w));
        for (key, ms) in millis.into_iter().chain(canary) {
            if let Err(e) = units::check_millis(ms) {
                let short = key.rsplit('.').next().unwrap_or(key);
                return Err((short, format!("route `{route}`: {key}: {e}")));
            }
        }
        let margin = self.routing.sticky.max_margin_ms;
        if !(margin.is_finite() && margin >= 0.0) {
            return Err((
                "max_margin_ms",
                format!("route `{route}`: routing.sticky.max_margin_ms must be a non-negative finite number"),
            ));
        }
        if let Some(b) = self.max_body_bytes {
            if b.saturating_mul(2) > limits.max_inflight_body_bytes {
                return Err((
                    "max_body_bytes",
                    format!(
                        "route `{route}`: twice max_body_bytes ({b}; a body and its rendered prompt) is larger than limits.max_inflight_body_bytes ({})",
                        limits.max_inflight_body_bytes
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Replaces the leading `path: ` of a YAML error message with `full` when
/// `full` extends it (or adds it when the message has none).
fn with_full_path(message: String, full: &str) -> String {
    if full.is_empty() || full == "." {
        return message;
    }
    match message.split_once(": ") {
        Some((prefix, rest)) if full.starts_with(prefix) && !prefix.contains(' ') => {
            format!("{full}: {rest}")
        }
        _ if message.starts_with(full) => message,
        _ => format!("{full}: {message}"),
    }
}

/// The 1-based line where `needle` first appears, for pointing at semantic errors.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listeners:
  main: { address: "127.0.0.1:0" }
  admin: { address: "127.0.0.1:0" }
pools:
  - name: llama
    engine: vllm
    endpoints: ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
  - name: k8s
    engine: sglang
    service: { name: qwen, port: http }
routes:
  - model: llama-3-8b
    aliases: [llama]
    pool: llama
    timeouts: { first_byte: 5m, idle: 30s, keepalive_after: 10s }
    usage: { include_usage: true }
  - model: qwen
    pool: k8s
    max_body_bytes: 1MiB
"#;

    #[test]
    fn otlp_traces_are_off_by_default_and_on_with_one_line() {
        let off = Config::parse(GOOD, "g.yaml").unwrap();
        assert_eq!(off.telemetry.otlp, None);
        let on = Config::parse(
            &format!("telemetry: {{ otlp: {{ endpoint: http://collector:4318 }} }}\n{GOOD}"),
            "g.yaml",
        )
        .unwrap();
        let o = on.telemetry.otlp.unwrap();
        assert_eq!(o.traces_url(), "http://collector:4318/v1/traces");
        assert_eq!(o.sampling, Sampling::default());
        assert_eq!(o.service_name, "infergate");
        let full = OtlpConfig {
            endpoint: "http://c:4318/v1/traces/".into(),
            ..o
        };
        assert_eq!(full.traces_url(), "http://c:4318/v1/traces");
        for (bad, says) in [
            ("endpoint: https://c:4318", "plain HTTP"),
            ("endpoint: c:4318", "expected an OTLP/HTTP URL"),
            (
                "endpoint: http://c:4318, sampling: { ratio: 1.5 }",
                "between 0 and 1",
            ),
        ] {
            let e = Config::parse(
                &format!("telemetry: {{ otlp: {{ {bad} }} }}\n{GOOD}"),
                "g.yaml",
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_a_full_config() {
        let c = Config::parse(GOOD, "g.yaml").unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].timeouts.first_byte, Duration::from_secs(300));
        assert_eq!(c.routes[0].timeouts.idle, Duration::from_secs(30));
        assert_eq!(c.routes[0].timeouts.total, None);
        assert_eq!(
            c.routes[0].timeouts.keepalive_after,
            Some(Duration::from_secs(10))
        );
        assert!(c.routes[0].usage.include_usage);
        assert_eq!(c.routes[1].max_body_bytes, Some(1 << 20));
        assert_eq!(
            c.pools[1].service.as_ref().unwrap().port,
            PortRef::Name("http".into())
        );
        assert_eq!(c.pools[1].engine, EngineKind::Sglang);
    }

    #[test]
    fn unknown_field_names_file_line_and_expected() {
        let bad = GOOD.replace("first_byte: 5m", "first_bite: 5m");
        let e = Config::parse(&bad, "g.yaml").unwrap_err().to_string();
        assert!(e.starts_with("g.yaml:16:"), "{e}");
        assert!(e.contains("unknown field `first_bite`"), "{e}");
        assert!(e.contains("first_byte"), "{e}");
    }

    #[test]
    fn bad_duration_is_reported_with_line() {
        let bad = GOOD.replace("idle: 30s", "idle: soon");
        let e = Config::parse(&bad, "g.yaml").unwrap_err().to_string();
        assert!(e.starts_with("g.yaml:16:"), "{e}");
        assert!(e.contains("expected a duration"), "{e}");
    }

    #[test]
    fn unknown_pool_points_at_its_line() {
        let bad = GOOD.replace("pool: k8s", "pool: nope");
        let e = Config::parse(&bad, "g.yaml").unwrap_err().to_string();
        assert_eq!(
            e,
            "g.yaml:19: route `qwen`: unknown pool `nope` (expected one of: llama, k8s)"
        );
    }

    #[test]
    fn duplicate_model_and_bad_pools_are_rejected() {
        let dup = GOOD.replace("aliases: [llama]", "aliases: [qwen]");
        assert!(Config::parse(&dup, "g")
            .unwrap_err()
            .to_string()
            .contains("served by two routes"));
        let both = GOOD.replace(
            "service: { name: qwen, port: http }",
            "service: { name: qwen, port: 80 }\n    endpoints: [\"http://a:1\"]",
        );
        assert!(Config::parse(&both, "g")
            .unwrap_err()
            .to_string()
            .contains("not both"));
        let url = GOOD.replace("http://127.0.0.1:8002", "127.0.0.1:8002");
        assert!(Config::parse(&url, "g")
            .unwrap_err()
            .to_string()
            .contains("expected an endpoint URL"));
    }

    #[test]
    fn absurd_durations_are_errors_naming_the_field() {
        for v in [
            "1e20",
            "-1",
            ".nan",
            ".inf",
            "-.inf",
            "1e300s",
            "\"99999999999h\"",
        ] {
            let bad = GOOD.replace("first_byte: 5m", &format!("first_byte: {v}"));
            let e = Config::parse(&bad, "g.yaml").unwrap_err().to_string();
            assert!(e.contains("first_byte"), "{v}: {e}");
            assert!(
                e.contains("out of range")
                    || e.contains("expected a duration")
                    || e.contains("unknown duration unit"),
                "{v}: {e}"
            );
        }
        let near = GOOD.replace("first_byte: 5m", "first_byte: 8760h");
        assert_eq!(
            Config::parse(&near, "g.yaml").unwrap().routes[0]
                .timeouts
                .first_byte,
            units::MAX_DURATION
        );
        let ms = GOOD.replace(
            "usage: { include_usage: true }",
            "usage: { include_usage: true }\n    admission: { queue: { max_timeout_ms: 18446744073709551615 } }",
        );
        let e = Config::parse(&ms, "g.yaml").unwrap_err().to_string();
        assert!(e.contains("admission.queue.max_timeout_ms"), "{e}");
    }

    #[test]
    fn https_endpoints_are_refused() {
        let bad = GOOD.replace("http://127.0.0.1:8002", "https://127.0.0.1:8002");
        let e = Config::parse(&bad, "g.yaml").unwrap_err().to_string();
        assert!(e.contains("`https://` endpoints are not supported"), "{e}");
    }

    #[test]
    fn limits_default_and_validate() {
        let c = Config::parse(GOOD, "g.yaml").unwrap();
        assert_eq!(c.max_body_bytes, 4 << 20);
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.max_read_body_bytes(), 4 << 20);
        let big = GOOD.replace("max_body_bytes: 1MiB", "max_body_bytes: 32MiB");
        assert_eq!(
            Config::parse(&big, "g").unwrap().max_read_body_bytes(),
            32 << 20
        );
        let small = format!("{GOOD}limits: {{ max_inflight_body_bytes: 6MiB }}\n");
        let e = Config::parse(&small, "g").unwrap_err().to_string();
        assert!(e.contains("limits.max_inflight_body_bytes"), "{e}");
        let zero = format!("{GOOD}limits: {{ max_n: 0 }}\n");
        let e = Config::parse(&zero, "g").unwrap_err().to_string();
        assert!(e.contains("limits.max_n"), "{e}");
    }

    #[test]
    fn pricing_names_known_models_and_pools() {
        let priced = format!(
            "{GOOD}pricing:\n  models:\n    llama: {{ input: 0.1, output: 0.4 }}\n  pools:\n    k8s: {{ gpu_hour: 2.5 }}\n"
        );
        let c = Config::parse(&priced, "g.yaml").unwrap();
        assert_eq!(c.pricing.models["llama"].output.0, 400_000);
        let bad = priced.replace("    llama: {", "    nope: {");
        let e = Config::parse(&bad, "g.yaml").unwrap_err().to_string();
        assert!(e.starts_with("g.yaml:23:") && e.contains("`nope`"), "{e}");
        let bad = priced.replace("k8s: {", "gpus: {");
        let e = Config::parse(&bad, "g.yaml").unwrap_err().to_string();
        assert!(e.contains("unknown pool `gpus`"), "{e}");
    }

    #[test]
    fn quickstart_config_is_valid() {
        Config::parse(QUICKSTART_YAML, "quickstart.yaml").unwrap();
    }
}

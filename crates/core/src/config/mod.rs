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
//!
//! Unknown keys are errors everywhere (`deny_unknown_fields`), so a typo never
//! silently falls back to a default. See docs/config.md for the reference.

pub mod units;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::admission::AdmissionConfig;
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
    /// Request-size limit applied while the body is read (before the route is
    /// known); a route may set a smaller one.
    #[serde(default = "default_max_body", with = "units::size")]
    pub max_body_bytes: u64,
    /// How long in-flight requests may run after SIGTERM before the process exits.
    #[serde(default = "default_grace", with = "units::duration")]
    pub shutdown_grace: Duration,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

fn default_max_body() -> u64 {
    16 << 20
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
    /// The model name sent upstream when it differs from what the client sent
    /// (the body is rewritten); by default the body goes untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_model: Option<String>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retries: RetryConfig,
    /// A smaller body limit for this route (the global `max_body_bytes` applies first).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_size")]
    pub max_body_bytes: Option<u64>,
    #[serde(default)]
    pub usage: UsageConfig,
    /// Expected output tokens when a request sets no `max_tokens` (load estimates).
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
}

fn default_max_tokens() -> u32 {
    256
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
        let cfg: Config = serde_yaml_ng::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            let mut message = e.to_string();
            if let Some(i) = message.rfind(" at line ") {
                message.truncate(i);
            }
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
        }
        Ok(())
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
    fn quickstart_config_is_valid() {
        Config::parse(QUICKSTART_YAML, "quickstart.yaml").unwrap();
    }
}

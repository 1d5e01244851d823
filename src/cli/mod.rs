//! The subcommands of the `infergate` binary other than `sim` (which lives with
//! the simulator): `serve`, `quickstart`, `check-config`, `hash-key`.

use std::path::PathBuf;

use anyhow::Context;

use infergate_core::config::Config;

/// Flags of `infergate serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Path of the YAML config (watched: valid changes apply without a restart).
    #[arg(
        long,
        short,
        required_unless_present = "configmap",
        conflicts_with = "configmap"
    )]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub kube: crate::control_plane::KubeArgs,
}

/// Flags of `infergate quickstart`.
#[derive(Debug, Clone, clap::Args)]
pub struct QuickstartArgs {
    /// Port of the OpenAI API (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Port of the admin listener (0 picks a free one).
    #[arg(long, default_value_t = 9090)]
    pub admin_port: u16,
    /// Number of simulated replicas.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
}

/// Flags of `infergate check-config`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckConfigArgs {
    /// Path of the YAML config to validate.
    pub file: PathBuf,
}

/// Flags of `infergate hash-key`.
#[derive(Debug, Clone, clap::Args)]
pub struct HashKeyArgs {
    /// The API key; `-` (or nothing) reads it from stdin, which keeps it out
    /// of the shell history.
    pub key: Option<String>,
    /// Key id for the printed key-file entry.
    #[arg(long, default_value = "KEY-ID")]
    pub id: String,
    /// Team for the printed key-file entry.
    #[arg(long, default_value = "TEAM")]
    pub team: String,
}

/// `infergate hash-key [KEY|-]`: prints a key-file entry with the key's
/// SHA-256 (the key itself is never stored).
pub fn hash_key(args: HashKeyArgs) -> anyhow::Result<()> {
    let key = match args.key.as_deref() {
        Some(k) if k != "-" => k.to_string(),
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_line(&mut s)
                .context("reading the key from stdin")?;
            s
        }
    };
    println!("{}", key_entry(&key, &args.id, &args.team)?);
    Ok(())
}

/// One key-file entry for `key` (trimmed; an empty key is an error).
pub fn key_entry(key: &str, id: &str, team: &str) -> anyhow::Result<String> {
    let key = key.trim();
    anyhow::ensure!(!key.is_empty(), "the key is empty");
    let sha = infergate_core::identity::hash_key(key);
    Ok(format!("- id: {id}\n  sha256: {sha}\n  team: {team}"))
}

/// `infergate serve --config FILE | --configmap NAME`: runs until SIGTERM or
/// Ctrl-C, then drains. The config source is watched and hot-reloaded; Service
/// pools are discovered from EndpointSlices (see `kube::serve`).
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use crate::control_plane::{load, ControlOptions, ControlPlane};
    let loaded = load(args.config.as_deref(), &args.kube).await?;
    let config = loaded.config.clone();
    infergate_proxy::init_logging(config.logging.format, config.logging.level.as_deref());
    let grace = config.shutdown_grace;
    let gateway = infergate_proxy::Gateway::new(config.clone())?;
    attach_quota_counters(&gateway, &config).await?;
    let control = ControlPlane::start(gateway.clone(), loaded, ControlOptions::default()).await;
    // `serve` runs one serving worker per CPU unless the config says otherwise.
    let mut main = config.listeners.main.clone();
    main.workers
        .get_or_insert(infergate_proxy::available_cpus());
    let handle = infergate_proxy::start_with(gateway, &main, config.listeners.admin.as_ref())
        .await
        .context("starting the listeners")?;
    announce(&handle);
    wait_for_signal().await;
    tracing::info!(?grace, "shutting down: draining requests in flight");
    handle.drain(grace).await;
    drop(control);
    tracing::info!("stopped");
    infergate_proxy::flush_logs();
    Ok(())
}

/// With `governance.redis`, quota counters are shared through Redis (an
/// unreachable Redis starts down and is probed; limits fail open or closed as
/// configured). Changing `governance.redis` later takes a restart.
pub async fn attach_quota_counters(
    gateway: &infergate_proxy::Gateway,
    config: &Config,
) -> anyhow::Result<()> {
    if let Some(redis) = &config.governance.redis {
        let counters = infergate_quota::RedisCounters::start(redis)
            .await
            .map_err(anyhow::Error::msg)?;
        gateway.quotas().set_backend(Box::new(counters));
    }
    Ok(())
}

/// `infergate check-config FILE`: validates and prints a summary.
pub fn check_config(args: CheckConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.file)?;
    println!(
        "{}: ok ({} pools, {} routes)",
        args.file.display(),
        config.pools.len(),
        config.routes.len()
    );
    for r in &config.routes {
        let names = std::iter::once(r.model.as_str())
            .chain(r.aliases.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(", ");
        println!("  {names} -> pool {}", r.pool);
    }
    Ok(())
}

/// `infergate quickstart`: simulated replicas plus the gateway on the embedded config.
pub async fn quickstart(args: QuickstartArgs) -> anyhow::Result<()> {
    let config = Config::parse(infergate_core::config::QUICKSTART_YAML, "quickstart.yaml")?;
    infergate_proxy::init_logging(config.logging.format, config.logging.level.as_deref());
    let grace = config.shutdown_grace;
    let (fleet, handle) = start_quickstart(config, &args).await?;
    println!("{}", quickstart_banner(&handle, &fleet.urls()));
    wait_for_signal().await;
    handle.drain(grace).await;
    fleet.shutdown().await;
    Ok(())
}

/// Starts the simulated fleet and the gateway in front of it: `config`'s
/// first pool gets the replicas' addresses, its listeners the requested ports.
pub async fn start_quickstart(
    mut config: Config,
    args: &QuickstartArgs,
) -> anyhow::Result<(infergate_sim::Fleet, infergate_proxy::ServerHandle)> {
    let model = config
        .routes
        .first()
        .map(|r| r.model.clone())
        .context("the quickstart config has no route")?;
    let fleet = infergate_sim::start_fleet(infergate_sim::FleetConfig {
        replicas: args.replicas.max(1),
        served_model_name: Some(model),
        ..Default::default()
    })
    .await
    .context("starting the simulated replicas")?;
    let pool = config
        .pools
        .first_mut()
        .context("the quickstart config has no pool")?;
    pool.endpoints = fleet.urls();
    pool.service = None;
    config.listeners.main.address.set_port(args.port);
    if let Some(admin) = config.listeners.admin.as_mut() {
        admin.address.set_port(args.admin_port);
    }
    let handle = infergate_proxy::start(config)
        .await
        .context("starting the gateway")?;
    Ok((fleet, handle))
}

/// What quickstart prints: the endpoint and ready-to-paste examples.
pub fn quickstart_banner(handle: &infergate_proxy::ServerHandle, replicas: &[String]) -> String {
    let url = handle.url();
    let admin = handle.admin_url().unwrap_or_else(|| "off".into());
    let model = handle
        .gateway
        .routes()
        .routes
        .first()
        .map(|r| r.name.to_string())
        .unwrap_or_default();
    format!(
        r#"infergate is up.
  OpenAI API: {url}/v1   (model "{model}")
  status:     {admin}/   (live status page, open it in a browser)
  admin:      {admin}/metrics  {admin}/routes  {admin}/readyz
  replicas:   {replicas} (simulated, vLLM-like)

Try it:
  curl -s {url}/v1/chat/completions -H 'content-type: application/json'     -d '{{"model":"{model}","messages":[{{"role":"user","content":"Hello!"}}],"max_tokens":16}}'

  curl -sN {url}/v1/chat/completions -H 'content-type: application/json'     -d '{{"model":"{model}","messages":[{{"role":"user","content":"Hello!"}}],"max_tokens":16,"stream":true}}'

  python3 - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="unused")
for chunk in client.chat.completions.create(model="{model}", stream=True, max_tokens=16,
        messages=[{{"role": "user", "content": "Hello!"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY

Ctrl-C stops it."#,
        replicas = replicas.join(" "),
    )
}

/// Prints where the gateway listens (one line on stdout, for people and scripts).
fn announce(handle: &infergate_proxy::ServerHandle) {
    use std::io::Write;
    let admin = handle.admin_url().unwrap_or_else(|| "off".into());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "infergate listening on {} (admin {admin})",
        handle.url()
    );
    let _ = out.flush();
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod hash_key_tests {
    use super::key_entry;
    use infergate_core::identity::KeyFile;

    #[test]
    fn the_printed_entry_is_a_valid_key_file_for_that_key() {
        let entry = key_entry(" sk-abc\n", "ci", "search").unwrap();
        assert!(!entry.contains("sk-abc"), "only the hash is printed");
        let f = KeyFile::parse(&entry, "stdout").unwrap();
        assert_eq!(f.keys[0].id, "ci");
        assert_eq!(f.keys[0].team, "search");
        assert!(entry.contains(&infergate_core::identity::hash_key("sk-abc")));
        assert!(key_entry("  \n", "a", "b").is_err());
    }
}

//! The subcommands of the `infergate` binary other than `sim` (which lives with
//! the simulator): `serve`, `quickstart`, `check-config`.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;
use crate::proxy::server;
use crate::telemetry;

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
    pub kube: crate::kube::serve::KubeArgs,
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

/// `infergate serve --config FILE | --configmap NAME`: runs until SIGTERM or
/// Ctrl-C, then drains. The config source is watched and hot-reloaded; Service
/// pools are discovered from EndpointSlices (see `kube::serve`).
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use crate::kube::serve::{load, ControlOptions, ControlPlane};
    let loaded = load(args.config.as_deref(), &args.kube).await?;
    let config = loaded.config.clone();
    telemetry::log::init(config.logging.format, config.logging.level.as_deref());
    let grace = config.shutdown_grace;
    let gateway = crate::proxy::gateway::Gateway::new(config.clone())?;
    let control = ControlPlane::start(gateway.clone(), loaded, ControlOptions::default()).await;
    let handle = server::start_with(
        gateway,
        &config.listeners.main,
        config.listeners.admin.as_ref(),
    )
    .await
    .context("starting the listeners")?;
    wait_for_signal().await;
    tracing::info!(?grace, "shutting down: draining requests in flight");
    handle.drain(grace).await;
    drop(control);
    tracing::info!("stopped");
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
    let _ = args;
    anyhow::bail!("infergate quickstart needs the simulator (not merged yet)")
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

//! The subcommands of the `infergate` binary other than `sim` (which lives with
//! the simulator): `serve`, `quickstart`, `check-config`.

/// Flags of `infergate serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Path of the YAML config.
    #[arg(long, short)]
    pub config: std::path::PathBuf,
}

/// Flags of `infergate quickstart`.
#[derive(Debug, Clone, clap::Args)]
pub struct QuickstartArgs {}

/// Flags of `infergate check-config`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckConfigArgs {
    /// Path of the YAML config to validate.
    pub file: std::path::PathBuf,
}

pub async fn serve(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("infergate serve is not built yet")
}

pub async fn quickstart(_args: QuickstartArgs) -> anyhow::Result<()> {
    anyhow::bail!("infergate quickstart is not built yet")
}

pub fn check_config(_args: CheckConfigArgs) -> anyhow::Result<()> {
    anyhow::bail!("infergate check-config is not built yet")
}

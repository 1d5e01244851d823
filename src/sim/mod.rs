//! `infergate sim`: simulated model replicas faithful to vLLM.
//!
//! (Being built by the simulator issue.)

/// Flags of `infergate sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {}

/// Runs `infergate sim` until interrupted.
pub async fn run(_args: SimArgs) -> anyhow::Result<()> {
    anyhow::bail!("infergate sim is not built yet")
}

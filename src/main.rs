//! The `infergate` binary: parses the command line and hands off to a subcommand.

use clap::{Parser, Subcommand};

mod allocator;

// mimalloc: per-thread free lists (glibc's arenas locked and consolidated on
// the request path, ~12% of a saturated gateway's profile) and no RSS for
// buffers reserved but never written (hyper's per-connection read buffers).
#[global_allocator]
static GLOBAL: allocator::MiMalloc = allocator::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "infergate",
    version,
    about = "Inference-aware L7 gateway for LLM serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Command {
    /// Run the gateway from a YAML config.
    Serve(infergate::cli::ServeArgs),
    /// Serve simulated model replicas (vLLM-like engines, no GPU).
    Sim(infergate_sim::SimArgs),
    /// Start simulated replicas and the gateway in front of them on the embedded default config.
    Quickstart(infergate::cli::QuickstartArgs),
    /// Validate a config file without starting.
    CheckConfig(infergate::cli::CheckConfigArgs),
    /// Print the SHA-256 of an API key, for the key file (`auth.key_file`).
    HashKey(infergate::cli::HashKeyArgs),
}

fn main() -> std::process::ExitCode {
    // No transparent huge pages: a gateway holds many small per-connection
    // buffers, mostly untouched; with 2 MiB pages (mimalloc asks for them)
    // every touched buffer makes its whole huge page resident (10,000 idle
    // streams: ~45 KiB each instead of ~30 KiB).
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let cli = Cli::parse();
    let result = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(async move {
            match cli.command {
                Command::Serve(args) => infergate::cli::serve(args).await,
                Command::Sim(args) => infergate_sim::run(args).await,
                Command::Quickstart(args) => infergate::cli::quickstart(args).await,
                Command::CheckConfig(args) => infergate::cli::check_config(args),
                Command::HashKey(args) => infergate::cli::hash_key(args),
            }
        }),
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infergate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! `kiln`: the one binary. Servers (`up`, `coordinator`) and, as they land, the worker
//! and the client commands.

mod config;
mod servers;
mod storage;

use clap::{Parser, Subcommand};

use config::{CommonArgs, KilnConfig};
use servers::Servers;
use storage::Storage;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "A distributed build farm with a built-in OCI registry"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in one process with embedded storage: coordinator, registry, local workers.
    Up,
    /// The coordinator alone: REAPI cache and execution services over gRPC.
    Coordinator,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = KilnConfig::resolve(&cli.common)?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command, config))
}

async fn run(command: Command, config: KilnConfig) -> anyhow::Result<()> {
    match command {
        Command::Up => {
            let storage = Storage::open(&config.data_dir)?;
            let mut servers = Servers::new();
            servers.start_coordinator(&config, &storage).await?;
            tracing::info!(data_dir = %config.data_dir.display(), "kiln is up");
            servers.run_until_signalled().await
        }
        Command::Coordinator => {
            let storage = Storage::open(&config.data_dir)?;
            let mut servers = Servers::new();
            servers.start_coordinator(&config, &storage).await?;
            servers.run_until_signalled().await
        }
    }
}

//! `kiln`: the one binary. Servers (`up`, `coordinator`) and, as they land, the worker
//! and the client commands.

mod client_args;
mod config;
mod join_token;
mod key_value;
mod probes;
mod publish;
mod publish_bars;
mod ready_file;
mod run;
mod servers;
mod status;
mod storage;
mod storage_config;
mod token;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use config::{CommonArgs, KilnConfig, MetricsRole};
use probes::MetricsSources;
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
    /// The OCI registry alone.
    Registry,
    /// A worker that joins a coordinator's pool and runs actions.
    Worker(WorkerArgs),
    /// Run a command on the farm (kiln's own REAPI client).
    Run(run::RunArgs),
    /// Turn build outputs into an OCI image and push it.
    Publish(Box<publish::PublishArgs>),
    /// Workers, queue, cache hit ratio, storage and registry of a running coordinator.
    Status(status::StatusArgs),
    /// Retire a worker: it takes no new work, finishes what it runs, then leaves.
    Drain(status::DrainArgs),
    /// Create, list and revoke the API tokens of a coordinator whose auth is on.
    #[command(subcommand)]
    Token(token::TokenCommand),
}

/// Opens the embedded storage and starts `/metrics` and the probes, before any server
/// starts recording.
async fn open_server(config: &KilnConfig, role: MetricsRole) -> anyhow::Result<(Storage, Servers)> {
    let storage = Storage::open(
        &config.data_dir,
        &config.cas,
        &config.storage,
        &config.metadata,
    )
    .await?;
    let mut servers = Servers::new();
    servers
        .start_metrics(config, role, servers.metrics_sources(&storage))
        .await?;
    servers.start_eviction(&storage);
    Ok((storage, servers))
}

/// `kiln worker` flags; the `[worker]` table of the configuration file sets the rest.
#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// The coordinator's gRPC endpoint.
    #[arg(long, env = "KILN_COORDINATOR", value_name = "URL")]
    coordinator: Option<String>,
    /// Actions run at once [default: one per core].
    #[arg(long, env = "KILN_SLOTS")]
    slots: Option<usize>,
    /// A platform property this worker offers (repeatable).
    #[arg(long = "platform", value_name = "KEY=VALUE", value_parser = key_value::parse_key_value)]
    platform: Vec<(String, String)>,
    /// Where the worker keeps its blob cache and action directories [default: DATA_DIR/worker].
    #[arg(long, env = "KILN_WORK_DIR")]
    work_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: client_args::ClientTlsArgs,
    /// How actions are confined [default: bubblewrap, and the worker refuses to start
    /// without a working one]. `none` runs them unconfined, as the worker's user.
    #[arg(long, env = "KILN_SANDBOX", value_enum)]
    sandbox: Option<SandboxArg>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SandboxArg {
    Bubblewrap,
    None,
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let config = KilnConfig::resolve(&cli.common, &config::known_variables(&Cli::command()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The span exporter's gRPC channel lives on the runtime.
    let telemetry = {
        let _runtime = runtime.enter();
        kiln_telemetry::init(cli.command.service_name(), &config.telemetry_options())?
    };
    if !config.unknown_variables.is_empty() {
        tracing::warn!(
            ignored = %config.unknown_variables.join(", "),
            "the environment has KILN_* variables that name no kiln setting; a typo of one of {}?",
            config::known_variables(&Cli::command()).join(", ")
        );
    }
    let ready_file = cli.common.ready_file.clone();
    let outcome = runtime.block_on(run(cli.command, config, ready_file.as_deref()));
    // Export the last spans (after Ctrl-C or SIGTERM too) while the runtime still runs.
    drop(telemetry);
    outcome
}

impl Command {
    /// The OpenTelemetry `service.name` this command reports as.
    fn service_name(&self) -> &'static str {
        match self {
            Command::Up => "kiln",
            Command::Coordinator => "kiln-coordinator",
            Command::Registry => "kiln-registry",
            Command::Worker(_) => "kiln-worker",
            Command::Run(_) => "kiln-run",
            Command::Publish(_) => "kiln-publish",
            Command::Status(_) | Command::Drain(_) | Command::Token(_) => "kiln-admin",
        }
    }
}

async fn run(
    command: Command,
    config: KilnConfig,
    ready_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Up => {
            let (storage, mut servers) = open_server(&config, MetricsRole::Coordinator).await?;
            let join_token = match config.join_token.clone() {
                Some(token) => token,
                None => join_token::read_or_create(&config.data_dir)?,
            };
            let config = KilnConfig {
                join_token: Some(join_token),
                ..config
            };
            let registry = servers.start_registry(&config, &storage).await?;
            let grpc = servers
                .start_coordinator(&config, &storage, Some(registry))
                .await?;
            let workers = config
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            servers.start_local_workers(&config, grpc, workers);
            servers.announce(ready_file)?;
            tracing::info!(data_dir = %config.data_dir.display(), "kiln is up");
            servers.run_until_signalled().await?;
        }
        Command::Coordinator => {
            let (storage, mut servers) = open_server(&config, MetricsRole::Coordinator).await?;
            servers.start_coordinator(&config, &storage, None).await?;
            servers.announce(ready_file)?;
            servers.run_until_signalled().await?;
        }
        Command::Registry => {
            let (storage, mut servers) = open_server(&config, MetricsRole::Registry).await?;
            servers.start_registry(&config, &storage).await?;
            servers.announce(ready_file)?;
            servers.run_until_signalled().await?;
        }
        Command::Worker(args) => {
            let mut worker = config.worker.clone();
            if let Some(coordinator) = args.coordinator {
                worker.coordinator = coordinator;
            }
            if let Some(slots) = args.slots {
                worker.slots = slots;
            }
            worker.platform.extend(args.platform);
            // A worker serves strangers' actions: sandboxed unless told otherwise, here
            // or in the file (`kiln up`'s local workers sandbox when they can).
            worker.sandbox = match (args.sandbox, worker.sandbox) {
                (Some(SandboxArg::None), _) | (None, kiln_worker::SandboxMode::None) => {
                    tracing::warn!("sandbox none: actions run UNCONFINED, as this worker's user, and can read and change everything it can");
                    kiln_worker::SandboxMode::None
                }
                (Some(SandboxArg::Bubblewrap), _)
                | (None, kiln_worker::SandboxMode::Auto | kiln_worker::SandboxMode::Bubblewrap) => {
                    kiln_worker::SandboxMode::Bubblewrap
                }
            };
            for (flag, setting) in [
                (args.tls.ca_cert, &mut worker.ca_cert),
                (args.tls.client_cert, &mut worker.client_cert),
                (args.tls.client_key, &mut worker.client_key),
            ] {
                if flag.is_some() {
                    *setting = flag;
                }
            }
            worker.work_dir = args
                .work_dir
                .unwrap_or_else(|| config.data_dir.join("worker"));
            if let Some(token) = &config.join_token {
                worker.join_token = token.clone();
            }
            let mut servers = Servers::new();
            let (registered, ready) = tokio::sync::watch::channel(false);
            let sources = MetricsSources::worker(ready);
            servers
                .start_metrics(&config, MetricsRole::Worker, sources)
                .await?;
            servers.start_worker(worker, registered);
            servers.announce(ready_file)?;
            servers.run_until_signalled().await?;
        }
        Command::Run(args) => return run::run(args).await,
        Command::Publish(args) => publish::run(*args).await?,
        Command::Status(args) => return status::status(args).await,
        Command::Token(command) => return token::run(command).await,
        Command::Drain(args) => {
            let token = match config.join_token.clone() {
                Some(token) => Some(token),
                None => join_token::read(&config.data_dir)?,
            };
            return status::drain(args, token.as_deref()).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_variable_is_known() {
        let known = config::known_variables(&Cli::command());
        for name in [
            "KILN_DATA_DIR",
            "KILN_JOIN_TOKEN",
            "KILN_COORDINATOR",
            "KILN_METRICS_ADDR",
            "KILN_REGISTRY_USER",
        ] {
            assert!(
                known.iter().any(|k| k == name),
                "{name} missing from {known:?}"
            );
        }
    }

    /// Every command's `KEY=VALUE` flag refuses what `kiln run` refuses.
    #[test]
    fn key_value_flags_are_strict_everywhere() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["kiln"], args].concat());
        let platform = match parse(&["worker", "--platform", "OSFamily=Linux"])
            .unwrap()
            .command
        {
            Command::Worker(worker) => worker.platform,
            other => panic!("parsed as {other:?}"),
        };
        assert_eq!(platform, [("OSFamily".to_string(), "Linux".to_string())]);
        for args in [
            &["worker", "--platform", "=Linux"][..],
            &["worker", "--platform", "cores"],
            &["run", "--platform", "=Linux", "--", "true"],
            &[
                "publish", "--repo", "app", "--from", ".", "--label", "novalue",
            ],
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains("expected KEY=VALUE"), "{args:?}: {err}");
        }
    }
}

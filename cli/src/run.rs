//! `kiln run`: run a command on the build farm, as kiln's own REAPI client.
//!
//! The work is done by kiln-client ([`kiln_client::run`]); this module parses flags,
//! draws progress with indicatif (only when stderr is a terminal), prints each shard's
//! stdout and stderr (prefixed `[shard K/N]` when there are several), says per shard
//! whether it was a cache hit and how it exited, and turns the merged exit code into the
//! process's.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_client::{
    GrpcExecutor, HashStats, Invocation, Progress, RemoteCas, RunRequest, ShardOutcome, UploadStats,
};
use kiln_store::DigestFunction;

use crate::client_args::CoordinatorArg;
use crate::key_value::parse_key_value;

/// Run a command remotely: hash the input tree, upload what is missing, execute (one
/// action per shard), stream the results and download the outputs.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Split the command into N actions, which differ only in TEST_SHARD_INDEX /
    /// TEST_TOTAL_SHARDS and in `{shard}` / `{total}` in the arguments and output paths.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub shards: u32,
    /// An output file or directory to download, relative to the working directory.
    /// With several shards, outputs without `{shard}` land under `shard-K/`.
    #[arg(long = "output", value_name = "PATH")]
    pub outputs: Vec<String>,
    /// A platform property the worker must offer.
    #[arg(long = "platform", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub platform: Vec<(String, String)>,
    #[command(flatten)]
    pub target: CoordinatorArg,
    /// The REAPI instance name (a separate action cache namespace).
    #[arg(
        long,
        env = "KILN_INSTANCE_NAME",
        default_value = "",
        value_name = "NAME"
    )]
    pub instance_name: String,
    #[arg(long, value_enum, default_value_t = DigestFunctionArg::Sha256)]
    pub digest_function: DigestFunctionArg,
    /// The action's timeout on the worker.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// An environment variable for the command.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// The directory whose tree (minus .gitignore'd files) is the action's input.
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub input: PathBuf,
    /// Where outputs are placed [default: the working directory inside --input].
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// The working directory of the command, relative to --input.
    #[arg(long, default_value = "", value_name = "PATH")]
    pub working_directory: String,
    /// Run even if a cached result exists, and do not cache the result.
    #[arg(long)]
    pub no_cache: bool,
    /// Re-hash every file instead of trusting `<input>/.kiln/digest-cache`.
    #[arg(long)]
    pub no_digest_cache: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DigestFunctionArg {
    Sha256,
    Blake3,
}

impl From<DigestFunctionArg> for DigestFunction {
    fn from(arg: DigestFunctionArg) -> Self {
        match arg {
            DigestFunctionArg::Sha256 => DigestFunction::Sha256,
            DigestFunctionArg::Blake3 => DigestFunction::Blake3,
        }
    }
}

/// Runs `kiln run`. The exit code is the worst shard's (see kiln-client's `remote_run`).
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let credentials = args.target.credentials()?;
    let invocation = Invocation::new().with_credentials(credentials.clone());
    let cas = RemoteCas::connect_with_tls(
        &args.target.coordinator,
        &args.target.tls.load()?,
        &args.instance_name,
        args.digest_function.into(),
        invocation,
    )
    .await
    .with_context(|| {
        format!(
            "kiln run: cannot use the coordinator at {}",
            args.target.coordinator
        )
    })?;
    let executor = GrpcExecutor::new(cas.channel().clone(), credentials);

    let mut request = RunRequest::new(&args.input, args.command);
    request.output_dir = args.output_dir;
    request.working_directory = args.working_directory;
    request.environment = args.env;
    request.output_paths = args.outputs;
    request.platform = args.platform;
    request.timeout = args.timeout.map(Duration::from_secs);
    request.no_cache = args.no_cache;
    request.shards = args.shards;
    request.use_digest_cache = !args.no_digest_cache;

    let progress = Arc::new(TerminalProgress::new(args.shards));
    let report = kiln_client::run(&cas, &executor, &request, progress.clone())
        .await
        .context("kiln run")?;
    progress.clear();
    tracing::info!(
        input_root = %report.input_root,
        files = report.hash_stats.files,
        rehashed = report.hash_stats.hashed_files,
        uploaded_blobs = report.upload_stats.uploaded_blobs,
        uploaded_bytes = report.upload_stats.uploaded_bytes,
        manifest = %report.manifest_path.display(),
        "kiln run finished"
    );
    let exit_code = report.exit_code();
    Ok(ExitCode::from(u8::try_from(exit_code).unwrap_or(1)))
}

/// Progress bars on stderr, hidden when stderr is not a terminal, plus the per-shard
/// output, which is always printed.
struct TerminalProgress {
    bars: MultiProgress,
    hashing: ProgressBar,
    upload: ProgressBar,
    shards: ProgressBar,
    total_shards: u32,
}

impl TerminalProgress {
    fn new(total_shards: u32) -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bars = MultiProgress::with_draw_target(target);
        let bytes_style =
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {msg}")
                .expect("a valid template")
                .progress_chars("=> ");
        let count_style = ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> ");
        let bar = |style: &ProgressStyle, prefix: &'static str| {
            let bar = bars.add(
                ProgressBar::new(0)
                    .with_style(style.clone())
                    .with_prefix(prefix),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        };
        TerminalProgress {
            hashing: bar(&bytes_style, "hashing"),
            upload: bar(&bytes_style, "uploading"),
            shards: bar(&count_style, "executing"),
            bars,
            total_shards,
        }
    }

    fn clear(&self) {
        let _ = self.bars.clear();
    }

    fn print_shard(&self, outcome: &ShardOutcome) {
        let prefix = if self.total_shards > 1 {
            format!("[shard {}/{}] ", outcome.index, outcome.total)
        } else {
            String::new()
        };
        let summary = match &outcome.result {
            Ok(result) => {
                let source = if result.cached {
                    "cache hit"
                } else {
                    "executed"
                };
                let mut line = format!(
                    "{}: {source}, exit code {}",
                    outcome.label(),
                    result.exit_code
                );
                if let Some(status) = &result.error_status {
                    line.push_str(&format!(" ({:?}: {})", status.code(), status.message()));
                }
                line
            }
            Err(err) => format!("{}: failed: {err}", outcome.label()),
        };
        self.bars.suspend(|| {
            if let Ok(result) = &outcome.result {
                write_prefixed(&mut std::io::stdout().lock(), &prefix, &result.stdout);
                write_prefixed(&mut std::io::stderr().lock(), &prefix, &result.stderr);
            }
            eprintln!("kiln: {summary}");
        });
    }
}

/// Writes `bytes` line by line, each line after `prefix`.
fn write_prefixed(out: &mut impl Write, prefix: &str, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if prefix.is_empty() {
        let _ = out.write_all(bytes);
    } else {
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            let _ = out.write_all(prefix.as_bytes());
            let _ = out.write_all(line);
        }
    }
    if !bytes.ends_with(b"\n") {
        let _ = out.write_all(b"\n");
    }
    let _ = out.flush();
}

impl Progress for TerminalProgress {
    fn hashing_started(&self, files: u64, bytes: u64) {
        self.hashing.set_length(bytes);
        self.hashing.set_message(format!("{files} changed files"));
    }

    fn hashed_bytes(&self, bytes: u64) {
        self.hashing.inc(bytes);
    }

    fn hashing_finished(&self, stats: &HashStats) {
        self.hashing.finish_with_message(format!(
            "{} files, {} re-hashed",
            stats.files, stats.hashed_files
        ));
    }

    fn upload_started(&self, blobs: u64, bytes: u64) {
        self.upload.set_length(bytes);
        self.upload.set_message(format!("{blobs} missing blobs"));
    }

    fn uploaded_bytes(&self, bytes: u64) {
        self.upload.inc(bytes);
    }

    fn upload_finished(&self, stats: &UploadStats) {
        self.upload.finish_with_message(format!(
            "{} of {} blobs were missing",
            stats.uploaded_blobs, stats.checked
        ));
    }

    fn execution_started(&self, shards: u32) {
        self.shards.set_length(u64::from(shards));
    }

    fn shard_finished(&self, outcome: &ShardOutcome) {
        self.print_shard(outcome);
        self.shards.inc(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_are_prefixed() {
        let mut out = Vec::new();
        write_prefixed(&mut out, "[shard 1/2] ", b"one\ntwo");
        assert_eq!(out, b"[shard 1/2] one\n[shard 1/2] two\n");
        let mut out = Vec::new();
        write_prefixed(&mut out, "", b"plain\n");
        assert_eq!(out, b"plain\n");
    }

    #[test]
    fn flags_parse() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let cli = Cli::try_parse_from([
            "kiln",
            "--shards",
            "4",
            "--output",
            "out/{shard}.xml",
            "--platform",
            "os=linux",
            "--env",
            "A=1",
            "--digest-function",
            "blake3",
            "--",
            "cargo",
            "test",
            "--",
            "x",
        ])
        .unwrap();
        assert_eq!(cli.run.shards, 4);
        assert_eq!(cli.run.command, ["cargo", "test", "--", "x"]);
        assert_eq!(cli.run.platform, [("os".to_string(), "linux".to_string())]);
        assert!(matches!(cli.run.digest_function, DigestFunctionArg::Blake3));
        assert!(
            Cli::try_parse_from(["kiln", "--shards", "2"]).is_err(),
            "a command is required"
        );
    }
}

//! Running an action's command: its own process group, a timeout, rlimits, and bubblewrap
//! when available.
//!
//! [`CommandRunner`] is the seam between deciding what to run and running it, so the
//! action runner can be exercised with another implementation; [`ProcessRunner`] is the
//! real one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::config::BubblewrapMode;
use crate::WorkerError;

/// One command to run.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    /// argv; the first element is the program.
    pub arguments: Vec<String>,
    /// The complete environment (REAPI: nothing is inherited from the worker).
    pub environment: Vec<(String, String)>,
    /// The action's input root, the only directory the command may write to when sandboxed.
    pub exec_root: PathBuf,
    /// Where the command starts: `exec_root` joined with the Command's working_directory.
    pub working_dir: PathBuf,
    pub timeout: Duration,
    /// Open files that receive the command's stdout and stderr (the action runner uses
    /// anonymous in-memory files, so capturing logs creates nothing on disk).
    pub stdout: Arc<File>,
    pub stderr: Arc<File>,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandExit {
    /// It exited by itself with this code.
    Exited(i32),
    /// A signal killed it (REAPI has no field for it; it is reported as exit code 128+n).
    Signalled(i32),
    /// It outlived its timeout and its process group was killed.
    TimedOut,
    /// It was cancelled and its process group was killed.
    Cancelled,
}

impl CommandExit {
    /// The exit code to report in an ActionResult, shell-style for signals.
    pub fn exit_code(self) -> i32 {
        match self {
            CommandExit::Exited(code) => code,
            CommandExit::Signalled(signal) => 128 + signal,
            CommandExit::TimedOut | CommandExit::Cancelled => 128 + libc::SIGKILL,
        }
    }
}

#[async_trait]
pub trait CommandRunner: Send + Sync {
    /// Runs `spec` to completion, its timeout, or `cancel`, whichever comes first. Whatever
    /// the outcome, no process of the command is left running when this returns.
    async fn run(
        &self,
        spec: &CommandSpec,
        cancel: &CancellationToken,
    ) -> Result<CommandExit, WorkerError>;
}

/// Resource limits applied to every action process with setrlimit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceLimits {
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_AS, when set.
    pub memory_bytes: Option<u64>,
    /// RLIMIT_FSIZE, when set.
    pub file_bytes: Option<u64>,
}

/// Runs commands as child processes of the worker.
pub struct ProcessRunner {
    limits: ResourceLimits,
    /// The `bwrap` binary, when actions are sandboxed.
    bubblewrap: Option<PathBuf>,
}

impl ProcessRunner {
    /// Decides on bubblewrap per `mode`: `Auto` uses it when `bwrap` is on PATH and a
    /// trial sandbox starts; `Always` fails without a working one.
    pub fn new(limits: ResourceLimits, mode: BubblewrapMode) -> Result<Self, WorkerError> {
        let bubblewrap = match mode {
            BubblewrapMode::Never => None,
            BubblewrapMode::Auto => match working_bubblewrap() {
                Ok(path) => Some(path),
                Err(reason) => {
                    tracing::info!(%reason, "running actions without bubblewrap");
                    None
                }
            },
            BubblewrapMode::Always => Some(working_bubblewrap().map_err(WorkerError::Sandbox)?),
        };
        Ok(ProcessRunner { limits, bubblewrap })
    }

    pub fn uses_bubblewrap(&self) -> bool {
        self.bubblewrap.is_some()
    }

    fn command(&self, spec: &CommandSpec) -> Result<tokio::process::Command, WorkerError> {
        let (program, rest) = spec
            .arguments
            .split_first()
            .ok_or_else(|| WorkerError::InvalidAction("the command has no arguments".into()))?;
        let mut command = match &self.bubblewrap {
            Some(bwrap) => {
                let mut command = tokio::process::Command::new(bwrap);
                command.args(bubblewrap_args(&spec.exec_root, &spec.working_dir));
                command.arg("--").arg(program).args(rest);
                command
            }
            None => {
                let mut command = tokio::process::Command::new(program);
                command.args(rest).current_dir(&spec.working_dir);
                command
            }
        };
        let stdout = spec
            .stdout
            .try_clone()
            .map_err(WorkerError::io("passing the stdout file on"))?;
        let stderr = spec
            .stderr
            .try_clone()
            .map_err(WorkerError::io("passing the stderr file on"))?;
        command
            .env_clear()
            .envs(spec.environment.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        let limits = self.limits;
        // SAFETY: the closure runs in the forked child before exec and only calls
        // setrlimit, which is async-signal-safe; it allocates nothing and takes no locks.
        unsafe {
            command.pre_exec(move || apply_limits(&limits));
        }
        Ok(command)
    }
}

#[async_trait]
impl CommandRunner for ProcessRunner {
    async fn run(
        &self,
        spec: &CommandSpec,
        cancel: &CancellationToken,
    ) -> Result<CommandExit, WorkerError> {
        let mut command = self.command(spec)?;
        let mut child = command.spawn().map_err(|e| {
            WorkerError::InvalidAction(format!("cannot start {:?}: {e}", spec.arguments[0]))
        })?;
        let group = ProcessGroup(child.id().map(|pid| pid as libc::pid_t));
        let exit = tokio::select! {
            status = child.wait() => {
                let status = status.map_err(WorkerError::io("waiting for the action"))?;
                use std::os::unix::process::ExitStatusExt;
                match (status.code(), status.signal()) {
                    (Some(code), _) => CommandExit::Exited(code),
                    (None, Some(signal)) => CommandExit::Signalled(signal),
                    (None, None) => CommandExit::Exited(-1),
                }
            }
            _ = tokio::time::sleep(spec.timeout) => CommandExit::TimedOut,
            _ = cancel.cancelled() => CommandExit::Cancelled,
        };
        // Also after a normal exit: daemons the command left behind must not outlive it.
        group.kill();
        if matches!(exit, CommandExit::TimedOut | CommandExit::Cancelled) {
            let _ = child.wait().await;
        }
        Ok(exit)
    }
}

/// A child's process group, killed as a whole.
struct ProcessGroup(Option<libc::pid_t>);

impl ProcessGroup {
    fn kill(&self) {
        if let Some(pgid) = self.0.filter(|p| *p > 0) {
            // SAFETY: kill has no memory-safety preconditions. A negative pid addresses the
            // process group this runner created for the child; ESRCH (already gone) is fine.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for ProcessGroup {
    /// A dropped run (its task aborted) must not leave the action running.
    fn drop(&mut self) {
        self.kill();
    }
}

fn apply_limits(limits: &ResourceLimits) -> std::io::Result<()> {
    set_limit(libc::RLIMIT_CORE, 0)?;
    set_limit(libc::RLIMIT_NOFILE, limits.open_files)?;
    if let Some(bytes) = limits.memory_bytes {
        set_limit(libc::RLIMIT_AS, bytes)?;
    }
    if let Some(bytes) = limits.file_bytes {
        set_limit(libc::RLIMIT_FSIZE, bytes)?;
    }
    Ok(())
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    // SAFETY: `limit` is a valid rlimit that outlives the call.
    if unsafe { libc::setrlimit(resource, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A read-only view of the host with private /tmp, /dev and /proc, in fresh namespaces
/// (network excepted: `kiln run` actions such as `cargo test` may need it), with only the
/// action's own directory writable.
fn bubblewrap_args(exec_root: &Path, working_dir: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut push = |parts: &[&std::ffi::OsStr]| args.extend(parts.iter().map(|p| p.to_os_string()));
    push(&["--ro-bind".as_ref(), "/".as_ref(), "/".as_ref()]);
    push(&["--dev".as_ref(), "/dev".as_ref()]);
    push(&["--proc".as_ref(), "/proc".as_ref()]);
    push(&["--tmpfs".as_ref(), "/tmp".as_ref()]);
    push(&[
        "--bind".as_ref(),
        exec_root.as_os_str(),
        exec_root.as_os_str(),
    ]);
    push(&["--unshare-all".as_ref(), "--share-net".as_ref()]);
    push(&["--die-with-parent".as_ref()]);
    push(&["--chdir".as_ref(), working_dir.as_os_str()]);
    args
}

/// Finds `bwrap` on PATH and checks that it can create a sandbox on this host (it cannot
/// in some containers without user namespaces).
fn working_bubblewrap() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let bwrap = std::env::split_paths(&path)
        .map(|dir| dir.join("bwrap"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| "bwrap is not installed".to_string())?;
    let root = std::env::temp_dir();
    let status = std::process::Command::new(&bwrap)
        .args(bubblewrap_args(&root, &root))
        .args(["--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", bwrap.display()))?;
    if status.success() {
        Ok(bwrap)
    } else {
        Err(format!(
            "{} cannot create a sandbox here ({status})",
            bwrap.display()
        ))
    }
}

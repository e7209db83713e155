//! Running an action's command: its own process group, a timeout, rlimits, and bubblewrap
//! when available.
//!
//! [`CommandRunner`] is the seam between deciding what to run and running it, so the
//! action runner can be exercised with another implementation; [`ProcessRunner`] is the
//! real one.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::config::{SandboxMode, DEFAULT_SANDBOX_UID_BASE};
use crate::log_capture::LogCapture;
use crate::process_spawn::{self, SpawnRequest};
use crate::sandbox::{self, Bubblewrap, UidLease, WarmPool};
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
    /// Whether the sandbox shares the host's network (the platform property
    /// `network=on`); otherwise the action has only a loopback of its own.
    pub network: bool,
    /// The container image's root filesystem the action runs in, instead of the host's
    /// system directories (sandboxed runners only).
    pub image_root: Option<PathBuf>,
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
    /// RLIMIT_CPU (seconds), when set.
    pub cpu_secs: Option<u64>,
    /// RLIMIT_NPROC, when set; applied only in the sandbox, where the action has a uid of
    /// its own (the limit counts a uid's processes, and root ignores it).
    pub processes: Option<u64>,
    /// The most of stdout, and of stderr, kept per action; the rest is dropped.
    pub log_bytes: u64,
}

/// How a [`ProcessRunner`] confines actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxSettings {
    pub mode: SandboxMode,
    /// The first host uid sandboxed actions run as (`worker.sandbox_uid_base`).
    pub uid_base: u32,
}

impl SandboxSettings {
    /// `mode` with the default uid range.
    pub fn new(mode: SandboxMode) -> Self {
        SandboxSettings {
            mode,
            uid_base: DEFAULT_SANDBOX_UID_BASE,
        }
    }
}

/// Runs commands as child processes of the worker.
pub struct ProcessRunner {
    limits: ResourceLimits,
    /// bubblewrap, when actions are sandboxed.
    bubblewrap: Option<Bubblewrap>,
}

impl ProcessRunner {
    /// Decides on bubblewrap per the mode: `Auto` uses it when `bwrap` is on PATH and a
    /// trial sandbox starts; `Bubblewrap` fails without a working one.
    pub fn new(limits: ResourceLimits, sandbox: &SandboxSettings) -> Result<Self, WorkerError> {
        let working_bubblewrap = || Bubblewrap::find(sandbox.uid_base);
        let bubblewrap = match sandbox.mode {
            SandboxMode::None => None,
            SandboxMode::Auto => match working_bubblewrap() {
                Ok(path) => Some(path),
                Err(reason) => {
                    tracing::warn!(
                        %reason,
                        "actions run WITHOUT a sandbox: they see the host, other actions and \
                         this process's files, as this process's user"
                    );
                    None
                }
            },
            SandboxMode::Bubblewrap => Some(working_bubblewrap().map_err(|reason| {
                WorkerError::Sandbox(format!(
                    "{reason}; install bubblewrap, or pass --sandbox none to run actions \
                     unconfined"
                ))
            })?),
        };
        Ok(ProcessRunner { limits, bubblewrap })
    }

    pub fn uses_bubblewrap(&self) -> bool {
        self.bubblewrap.is_some()
    }

    /// How actions are confined, in words: which sandbox, and which uid actions have.
    pub fn sandbox_description(&self) -> &'static str {
        self.bubblewrap.as_ref().map_or(
            "none: actions run unconfined, as the worker's user",
            Bubblewrap::describe,
        )
    }

    /// argv as started: the command itself, or bubblewrap wrapping it (started as `uid`).
    fn argv(&self, spec: &CommandSpec, uid: Option<u32>) -> Result<Vec<OsString>, WorkerError> {
        let command = spec.arguments.iter().map(OsStr::new);
        match (&self.bubblewrap, &spec.image_root) {
            (Some(bwrap), image_root) => bwrap.argv(
                &spec.exec_root,
                &spec.working_dir,
                spec.network,
                uid,
                image_root.as_deref(),
                command,
            ),
            (None, None) => Ok(command.map(OsString::from).collect()),
            (None, Some(_)) => Err(WorkerError::Sandbox(
                "an unsandboxed worker cannot run an action in a container image".into(),
            )),
        }
    }

    /// The rlimits; RLIMIT_NPROC only for an action with a uid of its own (`own_uid`).
    fn rlimits(&self, own_uid: bool) -> Vec<(libc::__rlimit_resource_t, libc::rlimit)> {
        let limits = self.limits;
        let both = |value: u64| libc::rlimit {
            rlim_cur: value as libc::rlim_t,
            rlim_max: value as libc::rlim_t,
        };
        let mut rlimits = vec![
            (libc::RLIMIT_CORE, both(0)),
            (libc::RLIMIT_NOFILE, both(limits.open_files)),
        ];
        if let Some(bytes) = limits.memory_bytes {
            rlimits.push((libc::RLIMIT_AS, both(bytes)));
        }
        if let Some(bytes) = limits.file_bytes {
            rlimits.push((libc::RLIMIT_FSIZE, both(bytes)));
        }
        if let Some(seconds) = limits.cpu_secs {
            // SIGXCPU at the soft limit, which names the cause; SIGKILL a second later
            // for a process that ignores it. (Equal limits would send only SIGKILL.)
            let limit = libc::rlimit {
                rlim_cur: seconds as libc::rlim_t,
                rlim_max: seconds.saturating_add(1) as libc::rlim_t,
            };
            rlimits.push((libc::RLIMIT_CPU, limit));
        }
        if let (Some(processes), true) = (limits.processes, own_uid) {
            rlimits.push((libc::RLIMIT_NPROC, both(processes)));
        }
        rlimits
    }
}

#[async_trait]
impl CommandRunner for ProcessRunner {
    async fn run(
        &self,
        spec: &CommandSpec,
        cancel: &CancellationToken,
    ) -> Result<CommandExit, WorkerError> {
        if spec.arguments.is_empty() {
            return Err(WorkerError::InvalidAction(
                "the command has no arguments".into(),
            ));
        }
        let warm = self
            .bubblewrap
            .as_ref()
            .and_then(Bubblewrap::warm_pool)
            .filter(|_| spec.image_root.is_none() && !spec.network);
        match warm {
            Some(pool) => self.run_warm(pool, spec, cancel).await,
            None => self.run_cold(spec, cancel).await,
        }
    }
}

/// How to start an action's process.
struct Launch<'a> {
    argv: Vec<OsString>,
    working_dir: &'a std::path::Path,
    /// Whether the action has a host uid of its own (RLIMIT_NPROC then applies).
    own_uid: bool,
    identity: Option<u32>,
    enter: Option<libc::c_int>,
}

impl ProcessRunner {
    /// In a sandbox built for this action (or none).
    async fn run_cold(
        &self,
        spec: &CommandSpec,
        cancel: &CancellationToken,
    ) -> Result<CommandExit, WorkerError> {
        // Declared first, so it is given back last, after the processes are killed.
        let uid = match &self.bubblewrap {
            Some(bwrap) => bwrap.lease_uid()?,
            None => None,
        };
        if let Some(uid) = &uid {
            sandbox::hand_over(&spec.exec_root, uid.uid())?;
        }
        let argv = self.argv(spec, uid.as_ref().map(UidLease::uid))?;
        // bwrap enters the working directory itself, inside the sandbox; one it cannot
        // enter is then its failure, reported as such.
        let working_dir = match &self.bubblewrap {
            Some(_) => &spec.exec_root,
            None => &spec.working_dir,
        };
        let launch = Launch {
            argv,
            working_dir,
            own_uid: uid.is_some(),
            identity: self
                .bubblewrap
                .as_ref()
                .and_then(|bwrap| bwrap.starts_as(uid.as_ref().map(UidLease::uid))),
            enter: None,
        };
        self.execute(launch, spec, cancel).await
    }

    /// In a warm sandbox: the action's directory is renamed into its slot for the run,
    /// and back once nothing of the action is left running.
    async fn run_warm(
        &self,
        pool: &Arc<WarmPool>,
        spec: &CommandSpec,
        cancel: &CancellationToken,
    ) -> Result<CommandExit, WorkerError> {
        let parent = spec.exec_root.parent().ok_or_else(|| {
            WorkerError::SandboxSetup("the action's directory has no parent".into())
        })?;
        let sandbox = match pool.take_idle(parent) {
            Some(sandbox) => sandbox,
            None => {
                let (pool, parent) = (Arc::clone(pool), parent.to_path_buf());
                tokio::task::spawn_blocking(move || pool.build(&parent))
                    .await
                    .map_err(|e| {
                        WorkerError::SandboxSetup(format!("building a warm sandbox: {e}"))
                    })??
            }
        };
        let inside = sandbox.exec_root();
        std::fs::rename(&spec.exec_root, &inside).map_err(WorkerError::io(
            "moving the action's directory into its sandbox",
        ))?;
        let relative = spec
            .working_dir
            .strip_prefix(&spec.exec_root)
            .unwrap_or(std::path::Path::new(""));
        let working_dir = inside.join(relative);
        let run = async {
            sandbox::hand_over(&inside, sandbox.uid())?;
            let launch = Launch {
                argv: spec.arguments.iter().map(OsString::from).collect(),
                working_dir: &working_dir,
                own_uid: true,
                identity: Some(sandbox.uid()),
                enter: Some(sandbox.namespaces()),
            };
            self.execute(launch, spec, cancel).await
        };
        let outcome = run.await;
        // Nothing of the action may write to its directory once it is back.
        let swept = sandbox.sweep().await;
        let moved_back = std::fs::rename(&inside, &spec.exec_root);
        match (swept, moved_back) {
            (Ok(reusable), Ok(())) => pool.give_back(sandbox, reusable),
            (swept, moved_back) => {
                // Dropping the sandbox ends every process in it.
                drop(sandbox);
                let problems: Vec<String> = [
                    swept.err().map(|e| format!("killing what it left: {e}")),
                    moved_back
                        .err()
                        .map(|e| format!("moving its directory back: {e}")),
                ]
                .into_iter()
                .flatten()
                .collect();
                return Err(WorkerError::SandboxSetup(format!(
                    "ending the action in its warm sandbox: {}",
                    problems.join("; ")
                )));
            }
        }
        outcome
    }

    async fn execute(
        &self,
        launch: Launch<'_>,
        spec: &CommandSpec,
        cancel: &CancellationToken,
    ) -> Result<CommandExit, WorkerError> {
        let argv: Vec<&OsStr> = launch.argv.iter().map(OsString::as_os_str).collect();
        let stdin = File::open("/dev/null").map_err(WorkerError::io("opening /dev/null"))?;
        let mut stdout = LogCapture::start(spec.stdout.clone(), self.limits.log_bytes, "stdout")?;
        let mut stderr = LogCapture::start(spec.stderr.clone(), self.limits.log_bytes, "stderr")?;
        let spawned = process_spawn::spawn(&SpawnRequest {
            arguments: &argv,
            environment: &spec.environment,
            working_dir: launch.working_dir,
            stdin: &stdin,
            stdout: stdout
                .writer
                .as_ref()
                .expect("a fresh capture has its writer"),
            stderr: stderr
                .writer
                .as_ref()
                .expect("a fresh capture has its writer"),
            rlimits: &self.rlimits(launch.own_uid),
            identity: launch.identity,
            enter: launch.enter,
        });
        // The child holds its own copies: the pipes end when the command's processes do.
        (stdout.writer, stderr.writer) = (None, None);
        let mut child = spawned.map_err(|e| match launch.enter {
            // Not the action's fault: entering its sandbox failed.
            Some(_) if !e.is_exec() => WorkerError::SandboxSetup(format!(
                "starting the action in its warm sandbox: {}: {}",
                e.step, e.source
            )),
            _ => WorkerError::InvalidAction(format!(
                "cannot start {:?}: {}",
                spec.arguments[0], e.source
            )),
        })?;
        // Declared after the child, so it is dropped first: kill, then reap.
        let group = ProcessGroup(child.id());
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
        let (stdout_dropped, stderr_dropped) = tokio::join!(stdout.finish(), stderr.finish());
        if self.bubblewrap.is_some() && launch.enter.is_none() && exit == CommandExit::Exited(1) {
            if let Some(reason) = sandbox::setup_failure(&spec.stderr) {
                return Err(WorkerError::SandboxSetup(reason));
            }
        }
        if let Some(note) = limit_note(exit) {
            // REAPI's ActionResult has no field for it: the log says it, last.
            use std::io::Write;
            let _ = (&*spec.stderr).write_all(note.as_bytes());
        }
        if stdout_dropped + stderr_dropped > 0 {
            tracing::warn!(
                stdout_dropped,
                stderr_dropped,
                "the action's output passed worker.max_log_bytes and was truncated"
            );
        }
        Ok(exit)
    }
}

/// A child's process group, killed as a whole.
struct ProcessGroup(libc::pid_t);

impl ProcessGroup {
    fn kill(&self) {
        // SAFETY: kill has no memory-safety preconditions. A negative pid addresses the
        // process group this runner created for the child (its pid, always positive);
        // ESRCH (already gone) is fine.
        unsafe {
            libc::kill(-self.0, libc::SIGKILL);
        }
    }
}

impl Drop for ProcessGroup {
    /// A dropped run (its task aborted) must not leave the action running.
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a limit did to the action, for the end of its stderr: a process killed by the
/// signal a limit sends (or by SIGKILL, which the kernel's OOM killer uses) says so,
/// rather than leaving the user an exit code of 152 to decode. (With bubblewrap, the
/// action's own exit status is what bwrap reports: a signal shows as 128+n there.)
fn limit_note(exit: CommandExit) -> Option<String> {
    let signal = match exit {
        CommandExit::Signalled(signal) => signal,
        CommandExit::Exited(code) if code > 128 => code - 128,
        _ => return None,
    };
    let what = match signal {
        libc::SIGXCPU => "exceeded its CPU time limit (worker.max_cpu_secs)",
        libc::SIGXFSZ => "wrote a file past its size limit (worker.max_file_bytes)",
        libc::SIGKILL => "was killed with SIGKILL (out of memory, or killed from outside)",
        _ => return None,
    };
    Some(format!("\nkiln: the action {what}\n"))
}

//! Running one REAPI action end to end: fetch Action and Command, materialise the input
//! root, run the command, collect and upload the outputs, and report an ActionResult with
//! every ExecutedActionMetadata timestamp.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kiln_client::{BlobSet, BlobSource, NoProgress, OpenFileReader, RemoteCas};
use kiln_proto::prost::Message;
use kiln_proto::{protobuf, reapi};
use kiln_store::{Digest, DigestFunction};
use kiln_telemetry::{InStage, StageSpan};
use tokio_util::sync::CancellationToken;

use crate::action_platform::{image_used, wanted_image, wants_network};
use crate::cas_connection::CasConnection;
use crate::command_runner::{CommandExit, CommandRunner, CommandSpec};
use crate::container_image::{ImageRoot, ImageStore};
use crate::input_tree::{fetch_messages, from_reapi, materialise};
use crate::local_cache::{CacheKey, FetchStats, LocalCache};
use crate::output_collector;
use crate::WorkerError;

/// What to run: the fields of an Assign.
#[derive(Clone, Debug)]
pub struct ActionRequest {
    pub instance_name: String,
    pub action_digest: Digest,
    /// Overrides the Action's own timeout when set (the coordinator's effective timeout).
    pub timeout: Option<Duration>,
    /// When the action was queued, copied into the metadata.
    pub queued_timestamp: Option<protobuf::Timestamp>,
    /// When the worker received the Assign (the metadata's worker_start_timestamp); the
    /// start of the run when unset.
    pub received_timestamp: Option<protobuf::Timestamp>,
    /// The encoded Action and Command when the Assign carried them (checked against their
    /// digests before use; fetched from the CAS when absent or wrong).
    pub inline_action: Option<Vec<u8>>,
    pub inline_command: Option<Vec<u8>>,
}

impl ActionRequest {
    pub fn digest_function(&self) -> DigestFunction {
        self.action_digest.function
    }
}

/// How one action went.
#[derive(Debug)]
pub struct ActionOutcome {
    /// Set whenever the command ran, including on timeout (with the output so far).
    pub action_result: Option<reapi::ActionResult>,
    /// Why the action did not complete; `None` when it ran to completion, whatever its
    /// exit code. [`WorkerError::Timeout`] and [`WorkerError::MissingInputs`] are the ones
    /// REAPI gives their own codes (see [`WorkerError::to_rpc_status`]).
    pub error: Option<WorkerError>,
    /// The timestamps reached, also when there is no ActionResult.
    pub execution_metadata: reapi::ExecutedActionMetadata,
    /// Blobs downloaded to materialise the action (0 when the local cache had them all).
    pub inputs_fetched: FetchStats,
}

/// Runs actions on this worker. Cheap to share between concurrent actions.
pub struct ActionRunner {
    cas: CasConnection,
    cache: Arc<LocalCache>,
    command_runner: Arc<dyn CommandRunner>,
    /// Each action gets a directory of its own under here.
    actions_dir: PathBuf,
    /// Empty directories that finished actions left behind, ready for the next: on ext4,
    /// creating and removing a directory costs more than a short action's own work.
    spare_dirs: Mutex<Vec<PathBuf>>,
    worker_id: String,
    default_timeout: Duration,
    /// Root filesystems of container images, when this worker runs actions in them.
    images: Option<Arc<ImageStore>>,
}

/// The most empty action directories kept for reuse.
const MAX_SPARE_DIRS: usize = 64;

pub(crate) fn timestamp(time: SystemTime) -> protobuf::Timestamp {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    protobuf::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

fn now() -> Option<protobuf::Timestamp> {
    Some(timestamp(SystemTime::now()))
}

/// The pieces of a run that succeeded before an error, so the outcome keeps them.
struct Progress {
    metadata: reapi::ExecutedActionMetadata,
    fetched: FetchStats,
    result: Option<reapi::ActionResult>,
}

impl ActionRunner {
    pub fn new(
        cas: CasConnection,
        cache: Arc<LocalCache>,
        command_runner: Arc<dyn CommandRunner>,
        actions_dir: PathBuf,
        worker_id: String,
        default_timeout: Duration,
    ) -> Result<Self, WorkerError> {
        // Directories left by a worker that died mid-action hold nothing anyone will read.
        if actions_dir.exists() {
            remove_action_dir(&actions_dir);
        }
        std::fs::create_dir_all(&actions_dir)
            .map_err(WorkerError::io("creating the actions directory"))?;
        Ok(ActionRunner {
            cas,
            cache,
            command_runner,
            actions_dir,
            spare_dirs: Mutex::new(Vec::new()),
            worker_id,
            default_timeout,
            images: None,
        })
    }

    /// Runs actions that name a `container-image` in that image's root filesystem.
    pub fn with_images(mut self, images: Arc<ImageStore>) -> Self {
        self.images = Some(images);
        self
    }

    pub fn cache(&self) -> &LocalCache {
        &self.cache
    }

    /// Runs one action. Its directory is removed afterwards, whatever happened, unless
    /// the action left it empty (then the next action reuses it).
    pub async fn run(&self, request: &ActionRequest, cancel: &CancellationToken) -> ActionOutcome {
        let mut progress = Progress {
            metadata: reapi::ExecutedActionMetadata {
                worker: self.worker_id.clone(),
                queued_timestamp: request.queued_timestamp,
                worker_start_timestamp: request.received_timestamp.or_else(now),
                ..Default::default()
            },
            fetched: FetchStats::default(),
            result: None,
        };
        let spare = self.spare_dirs().pop();
        let reused = spare.is_some();
        let action_dir =
            spare.unwrap_or_else(|| self.actions_dir.join(uuid::Uuid::new_v4().to_string()));
        let error = self
            .run_in(request, &action_dir, reused, cancel, &mut progress)
            .await
            .err();
        self.release_action_dir(action_dir);
        progress.metadata.worker_completed_timestamp = now();
        if let Some(result) = &mut progress.result {
            result.execution_metadata = Some(progress.metadata.clone());
        }
        ActionOutcome {
            action_result: progress.result,
            error,
            execution_metadata: progress.metadata,
            inputs_fetched: progress.fetched,
        }
    }

    /// One action in `action_dir`, in its phases: prepare (read the Action and Command,
    /// build the input root), execute, upload the outputs. The caller cleans up.
    async fn run_in(
        &self,
        request: &ActionRequest,
        action_dir: &std::path::Path,
        reused_dir: bool,
        cancel: &CancellationToken,
        progress: &mut Progress,
    ) -> Result<(), WorkerError> {
        let cas = self
            .cas
            .for_action(&request.instance_name, request.digest_function())
            .await?;
        let prepared = self
            .prepare(&cas, request, action_dir, reused_dir, progress)
            .await?;
        let (logs, exit) = self
            .execute(&prepared, action_dir, cancel, progress)
            .await?;
        let result = self
            .upload_outputs(&cas, action_dir, &prepared.command, logs, exit, progress)
            .await?;
        progress.result = Some(result);
        if exit == CommandExit::TimedOut {
            return Err(WorkerError::Timeout(prepared.timeout));
        }
        Ok(())
    }

    /// Reads the Action and Command (inline or from the cache and CAS) and builds the
    /// input root in `exec_root`, with the outputs' parent directories.
    async fn prepare(
        &self,
        cas: &RemoteCas,
        request: &ActionRequest,
        exec_root: &std::path::Path,
        reused_dir: bool,
        progress: &mut Progress,
    ) -> Result<Prepared, WorkerError> {
        progress.metadata.input_fetch_start_timestamp = now();
        // Stage spans end when dropped, early returns included.
        let input_fetch = StageSpan::under_current("input_fetch");
        let (action, command, input_root) = self
            .read_action(cas, request, &input_fetch, progress)
            .await?;
        let working_dir = output_collector::check_paths(exec_root, &command)?;
        if !reused_dir {
            std::fs::create_dir(exec_root)
                .map_err(WorkerError::io("creating the action directory"))?;
        }
        // An empty Directory encodes to the empty blob: nothing to fetch or build.
        if !input_root.is_empty_blob() {
            let fetched = materialise(&self.cache, cas, input_root, exec_root)
                .in_stage(&input_fetch)
                .await?;
            add(&mut progress.fetched, fetched);
        }
        output_collector::create_output_parents(exec_root, &command)?;
        let image = match wanted_image(&action, &command) {
            Some(text) => {
                let images = self
                    .images
                    .as_ref()
                    .ok_or_else(|| WorkerError::ImageUnavailable {
                        image: text.to_string(),
                        reason: "this worker does not run container images (it has no sandbox)"
                            .into(),
                    })?;
                let root = images.root_for(text).await?;
                progress.metadata.auxiliary_metadata.push(image_used(&root));
                Some(root)
            }
            None => None,
        };
        progress.metadata.input_fetch_completed_timestamp = now();
        input_fetch.end();
        let timeout = request
            .timeout
            .or_else(|| action.timeout.and_then(|t| duration(&t)))
            .unwrap_or(self.default_timeout);
        Ok(Prepared {
            network: wants_network(&action, &command),
            image,
            command,
            working_dir,
            timeout,
        })
    }

    /// The Action, its Command and its input root's digest.
    async fn read_action(
        &self,
        cas: &RemoteCas,
        request: &ActionRequest,
        input_fetch: &StageSpan,
        progress: &mut Progress,
    ) -> Result<(reapi::Action, reapi::Command, Digest), WorkerError> {
        let function = request.digest_function();
        let action = match inline_message(
            request.inline_action.as_deref(),
            request.action_digest,
            "Action",
        )? {
            Some(action) => action,
            None => {
                let (mut actions, fetched) = fetch_messages::<reapi::Action>(
                    &self.cache,
                    cas,
                    &[request.action_digest],
                    "Action",
                )
                .in_stage(input_fetch)
                .await?;
                add(&mut progress.fetched, fetched);
                actions.pop().expect("one digest, one message")
            }
        };
        let command_digest = from_reapi(
            function,
            action.command_digest.as_ref(),
            "Action.command_digest",
        )?;
        let input_root = from_reapi(
            function,
            action.input_root_digest.as_ref(),
            "Action.input_root_digest",
        )?;
        let command =
            match inline_message(request.inline_command.as_deref(), command_digest, "Command")? {
                Some(command) => command,
                None => {
                    // One round trip for the Command and the input root's top Directory.
                    let mut keys = vec![CacheKey::file(command_digest)];
                    if !input_root.is_empty_blob() {
                        keys.push(CacheKey::file(input_root));
                    }
                    let (_, fetched) = self
                        .cache
                        .fetch_missing(cas, &keys)
                        .in_stage(input_fetch)
                        .await?;
                    add(&mut progress.fetched, fetched);
                    let (mut commands, _) = fetch_messages::<reapi::Command>(
                        &self.cache,
                        cas,
                        &[command_digest],
                        "Command",
                    )
                    .in_stage(input_fetch)
                    .await?;
                    commands.pop().expect("one digest, one message")
                }
            };
        if command.arguments.is_empty() {
            return Err(WorkerError::InvalidAction(
                "Command.arguments is empty".into(),
            ));
        }
        Ok((action, command, input_root))
    }

    /// Runs the command; returns its logs and how it ended.
    async fn execute(
        &self,
        prepared: &Prepared,
        exec_root: &std::path::Path,
        cancel: &CancellationToken,
        progress: &mut Progress,
    ) -> Result<(Logs, CommandExit), WorkerError> {
        let command = &prepared.command;
        let spec = CommandSpec {
            arguments: command.arguments.clone(),
            environment: command
                .environment_variables
                .iter()
                .map(|v| (v.name.clone(), v.value.clone()))
                .collect(),
            working_dir: prepared.working_dir.clone(),
            exec_root: exec_root.to_path_buf(),
            timeout: prepared.timeout,
            network: prepared.network,
            image_root: prepared.image.as_ref().map(|image| image.rootfs.clone()),
            stdout: Arc::new(log_file(c"stdout")?),
            stderr: Arc::new(log_file(c"stderr")?),
        };
        progress.metadata.execution_start_timestamp = now();
        let execute = StageSpan::under_current("execute");
        let exit = self
            .command_runner
            .run(&spec, cancel)
            .in_stage(&execute)
            .await?;
        execute.end();
        progress.metadata.execution_completed_timestamp = now();
        if exit == CommandExit::Cancelled {
            return Err(WorkerError::Cancelled);
        }
        let logs = Logs {
            stdout: spec.stdout,
            stderr: spec.stderr,
        };
        Ok((logs, exit))
    }

    /// Hashes the logs and the outputs the Command names, uploads what the CAS lacks and
    /// returns the ActionResult.
    async fn upload_outputs(
        &self,
        cas: &RemoteCas,
        exec_root: &std::path::Path,
        command: &reapi::Command,
        logs: Logs,
        exit: CommandExit,
        progress: &mut Progress,
    ) -> Result<reapi::ActionResult, WorkerError> {
        let function = cas.digest_function();
        progress.metadata.output_upload_start_timestamp = now();
        let output_upload = StageSpan::under_current("output_upload");
        let (stdout, stderr) = (
            hash_log(function, &logs.stdout)?,
            hash_log(function, &logs.stderr)?,
        );
        let mut blobs = BlobSet::new();
        blobs.insert(stdout, BlobSource::Open(logs.stdout));
        blobs.insert(stderr, BlobSource::Open(logs.stderr));
        let mut result = reapi::ActionResult {
            exit_code: exit.exit_code(),
            stdout_digest: Some(stdout.to_reapi()),
            stderr_digest: Some(stderr.to_reapi()),
            ..Default::default()
        };
        // A timed-out action's outputs may be half-written: report only its logs.
        if exit != CommandExit::TimedOut && output_collector::wants_outputs(command) {
            // Hashing outputs is blocking file I/O; keep it off the async workers.
            let (root, wanted) = (exec_root.to_path_buf(), command.clone());
            let outputs = tokio::task::spawn_blocking(move || {
                output_collector::collect(function, &root, &wanted)
            })
            .in_stage(&output_upload)
            .await
            .map_err(|e| WorkerError::Protocol(format!("output collection failed: {e}")))??;
            result.output_files = outputs.output_files;
            result.output_directories = outputs.output_directories;
            result.output_symlinks = outputs.output_symlinks;
            for (digest, source) in outputs.blobs {
                blobs.insert(digest, source);
            }
        }
        cas.upload_missing(&blobs, &NoProgress)
            .in_stage(&output_upload)
            .await?;
        progress.metadata.output_upload_completed_timestamp = now();
        output_upload.end();
        Ok(result)
    }
}

/// An action ready to run: its Command, where it runs, and for how long at most.
struct Prepared {
    command: reapi::Command,
    working_dir: std::path::PathBuf,
    timeout: Duration,
    /// `network=on`: the sandbox shares the host's network.
    network: bool,
    /// The container image the action runs in, held in the cache until it ends.
    image: Option<ImageRoot>,
}

/// An action's captured stdout and stderr (in-memory files).
struct Logs {
    stdout: Arc<std::fs::File>,
    stderr: Arc<std::fs::File>,
}

/// Decodes a message the Assign carried, after checking it against the digest it claims
/// to be; `None` (fetch it from the CAS instead) when absent or not matching.
fn inline_message<M: Message + Default>(
    bytes: Option<&[u8]>,
    digest: Digest,
    what: &str,
) -> Result<Option<M>, WorkerError> {
    let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
        return Ok(None);
    };
    if Digest::of_bytes(digest.function, bytes) != digest {
        tracing::warn!(%digest, "the Assign carried a {what} that does not match its digest");
        return Ok(None);
    }
    M::decode(bytes).map(Some).map_err(|e| {
        WorkerError::InvalidAction(format!("{what} {digest} is not a valid message: {e}"))
    })
}

/// An anonymous in-memory file for one of the command's output streams: capturing logs
/// this way creates and deletes nothing on the worker's disk.
fn log_file(name: &std::ffi::CStr) -> Result<File, WorkerError> {
    // SAFETY: `name` is a valid NUL-terminated string; the returned descriptor is new and
    // owned by nobody else, so the File may own it.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(WorkerError::io("creating a log file")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: see above; `fd` is a valid, open descriptor.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn hash_log(function: DigestFunction, log: &Arc<File>) -> Result<Digest, WorkerError> {
    let size = log
        .metadata()
        .map_err(WorkerError::io("inspecting a captured log"))?
        .len();
    if size == 0 {
        return Ok(function.empty_digest());
    }
    output_collector::hash_reader(function, OpenFileReader::new(log.clone()))
        .map_err(WorkerError::io("reading a captured log"))
}

impl ActionRunner {
    fn spare_dirs(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        // A list of paths holds no invariant a panicking holder could break.
        self.spare_dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a finished action's directory for the next action when the action left it
    /// exactly as it found it (empty, owner may read, write and enter); removes it
    /// otherwise. The action's processes are dead by now, so nothing writes to it.
    fn release_action_dir(&self, dir: PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let pristine = std::fs::symlink_metadata(&dir)
            .is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o700 == 0o700)
            && std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_none());
        if pristine {
            let mut spare = self.spare_dirs();
            if spare.len() < MAX_SPARE_DIRS {
                spare.push(dir);
                return;
            }
        }
        remove_action_dir(&dir);
    }
}

fn add(total: &mut FetchStats, more: FetchStats) {
    total.blobs += more.blobs;
    total.bytes += more.bytes;
}

fn duration(d: &protobuf::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Removes an action's directory. Inputs are read-only and an action may have made its
/// directories read-only too, so permissions are restored first when a plain removal fails.
fn remove_action_dir(dir: &std::path::Path) {
    if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
        return;
    }
    make_writable(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove an action directory");
    }
}

fn make_writable(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&entry.path());
            }
        }
    }
}

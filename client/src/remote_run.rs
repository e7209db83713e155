//! `kiln run` as a library: hash the input root, upload what is missing, execute one
//! action per shard in parallel, collect stdout/stderr, download outputs, and record a
//! [`RunManifest`].
//!
//! Shards. With `shards > 1`, shard `k` of `n` gets `TEST_SHARD_INDEX=k` and
//! `TEST_TOTAL_SHARDS=n` (Bazel's convention), and `{shard}` / `{total}` are replaced in
//! its arguments and output paths. With one shard neither variable is set, as in Bazel.
//!
//! Where outputs land. An output path is relative to the working directory, and lands
//! under the output directory (default: the working directory inside the input root).
//! With several shards, an output whose declared path contains `{shard}` is already
//! distinct per shard and lands at its own path; any other output would collide between
//! shards, so shard `k`'s copy lands under `shard-k/` inside the output directory
//! instead. Nothing is silently overwritten by another shard.
//!
//! Exit codes. A shard's exit code is its action's. A shard whose action could not run
//! or whose outputs could not be fetched counts as exit code 1, and so does one whose
//! ExecuteResponse carries an error status (a timeout, say) with exit code 0. The run's
//! exit code is the highest shard exit code (0 only if every shard exited 0).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use kiln_proto::reapi;
use kiln_store::Digest;

use crate::blob_set::BlobSet;
use crate::digest_cache::DigestCache;
use crate::execution::{
    execute_to_completion, missing_blobs, rpc_status_to_tonic, Executor, ResumePolicy,
};
use crate::outcomes::{HashStats, ShardOutcome, ShardResult, UploadStats};
use crate::output_download::download_outputs;
use crate::progress::{NoProgress, Progress};
use crate::reapi_digest::from_reapi;
use crate::remote_cas::RemoteCas;
use crate::run_manifest::{RunManifest, ShardRecord, MANIFEST_VERSION};
use crate::tree_hasher::{hash_tree, TreeHashOptions, STATE_DIR};
use crate::{ClientError, Result};

/// Shards whose Execute streams are open at once.
const MAX_CONCURRENT_SHARDS: usize = 64;
const SHARD_INDEX_VAR: &str = "TEST_SHARD_INDEX";
const TOTAL_SHARDS_VAR: &str = "TEST_TOTAL_SHARDS";

/// What to run and how.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// The directory whose tree is the action's input root.
    pub input_root: PathBuf,
    /// Where outputs land; `None` means the working directory inside the input root.
    pub output_dir: Option<PathBuf>,
    /// The working directory inside the input root (`""` for the root itself).
    pub working_directory: String,
    pub arguments: Vec<String>,
    pub environment: Vec<(String, String)>,
    /// Output paths relative to the working directory; may contain `{shard}`/`{total}`.
    pub output_paths: Vec<String>,
    pub platform: Vec<(String, String)>,
    pub timeout: Option<Duration>,
    /// Marks the actions `do_not_cache`: they run, and their results are not cached.
    pub no_cache: bool,
    pub shards: u32,
    /// Keep file digests in `<input root>/.kiln/digest-cache` between runs.
    pub use_digest_cache: bool,
    pub resume: ResumePolicy,
}

impl RunRequest {
    /// A single-shard run of `arguments` over `input_root`, outputs next to the inputs.
    pub fn new(input_root: impl Into<PathBuf>, arguments: Vec<String>) -> Self {
        RunRequest {
            input_root: input_root.into(),
            output_dir: None,
            working_directory: String::new(),
            arguments,
            environment: Vec::new(),
            output_paths: Vec::new(),
            platform: Vec::new(),
            timeout: None,
            no_cache: false,
            shards: 1,
            use_digest_cache: true,
            resume: ResumePolicy::default(),
        }
    }
}

/// Everything one run did.
#[derive(Debug)]
pub struct RunReport {
    pub tool_invocation_id: String,
    pub input_root: Digest,
    pub hash_stats: HashStats,
    pub upload_stats: UploadStats,
    /// Ordered by shard index.
    pub shards: Vec<ShardOutcome>,
    pub manifest_path: PathBuf,
}

impl RunReport {
    /// The highest shard exit code; 0 only if every shard exited 0.
    pub fn exit_code(&self) -> i32 {
        merge_exit_codes(self.shards.iter().map(ShardOutcome::exit_code))
    }
}

/// The worst of several exit codes: any non-zero code beats 0, and a higher one beats a
/// lower one. Codes outside 1..=255 (negative ones, say) count as 1 among the non-zero.
pub fn merge_exit_codes(codes: impl IntoIterator<Item = i32>) -> i32 {
    codes
        .into_iter()
        .map(|code| match code {
            0 => 0,
            1..=255 => code,
            _ => 1,
        })
        .max()
        .unwrap_or(0)
}

/// One shard's action, ready to submit.
struct ShardPlan {
    index: u32,
    action_digest: Digest,
    /// Declared output paths (after substitution) and the directory each lands under.
    placements: Vec<(String, PathBuf)>,
    default_base: PathBuf,
}

impl ShardPlan {
    fn destination(&self, path: &str) -> PathBuf {
        self.placements
            .iter()
            .find(|(declared, _)| {
                path == declared
                    || path
                        .strip_prefix(declared.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            })
            .map(|(_, base)| base.clone())
            .unwrap_or_else(|| self.default_base.clone())
    }
}

/// Runs `request`: see the module documentation.
pub async fn run(
    cas: &RemoteCas,
    executor: &dyn Executor,
    request: &RunRequest,
    progress: Arc<dyn Progress>,
) -> Result<RunReport> {
    validate(request)?;
    let function = cas.digest_function();
    let input_root = request
        .input_root
        .canonicalize()
        .map_err(|e| ClientError::io(&request.input_root, e))?;
    let output_dir = match &request.output_dir {
        Some(dir) => std::path::absolute(dir).map_err(|e| ClientError::io(dir, e))?,
        None => input_root.join(&request.working_directory),
    };
    let total = request.shards;

    // Outputs placed inside the input root are not inputs of the next run.
    let mut excluded_outputs = Vec::new();
    let mut shard_outputs = Vec::new();
    for index in 0..total {
        let placements = placements(request, index, &output_dir);
        for (path, base) in &placements {
            if let Ok(relative) = base.join(path).strip_prefix(&input_root) {
                if let Some(relative) = relative.to_str() {
                    excluded_outputs.push(relative.to_string());
                }
            }
        }
        shard_outputs.push(placements);
    }

    let tree = {
        let options = TreeHashOptions {
            function,
            excluded_outputs,
        };
        let use_cache = request.use_digest_cache;
        let root = input_root.clone();
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || {
            let mut cache = if use_cache {
                DigestCache::load(root.join(STATE_DIR).join("digest-cache"))
            } else {
                DigestCache::disabled()
            };
            let tree = hash_tree(&root, &options, &mut cache, progress.as_ref())?;
            if let Err(err) = cache.save() {
                tracing::warn!(path = %cache.path().display(), %err, "cannot save the digest cache");
            }
            Ok::<_, ClientError>(tree)
        })
        .await
        .map_err(|e| ClientError::InvalidRequest(format!("hashing stopped: {e}")))??
    };

    let mut blobs: BlobSet = tree.blobs.clone();
    let mut plans = Vec::new();
    for (index, placements) in (0..total).zip(shard_outputs) {
        let command = command_for(request, index);
        let command_digest = blobs.add_bytes(
            function,
            Bytes::from(prost::Message::encode_to_vec(&command)),
        );
        let action = reapi::Action {
            command_digest: Some(command_digest.to_reapi()),
            input_root_digest: Some(tree.root.to_reapi()),
            timeout: request.timeout.map(|t| kiln_proto::protobuf::Duration {
                seconds: t.as_secs() as i64,
                nanos: t.subsec_nanos() as i32,
            }),
            do_not_cache: request.no_cache,
            salt: Vec::new(),
            platform: platform(&request.platform),
        };
        let action_digest = blobs.add_bytes(
            function,
            Bytes::from(prost::Message::encode_to_vec(&action)),
        );
        let default_base = if total > 1 {
            output_dir.join(format!("shard-{index}"))
        } else {
            output_dir.clone()
        };
        plans.push(ShardPlan {
            index,
            action_digest,
            placements,
            default_base,
        });
    }

    let upload_stats = cas.upload_missing(&blobs, progress.as_ref()).await?;

    progress.execution_started(total);
    let blobs = &blobs;
    let progress_ref = progress.as_ref();
    let mut jobs: Vec<BoxFuture<'_, ShardOutcome>> = Vec::with_capacity(plans.len());
    for plan in &plans {
        jobs.push(Box::pin(async move {
            let outcome = ShardOutcome {
                index: plan.index,
                total,
                action_digest: plan.action_digest,
                result: run_shard(cas, executor, request, plan, blobs).await,
            };
            progress_ref.shard_finished(&outcome);
            outcome
        }));
    }
    let mut shards: Vec<ShardOutcome> = futures::stream::iter(jobs)
        .buffer_unordered(MAX_CONCURRENT_SHARDS)
        .collect()
        .await;
    shards.sort_by_key(|s| s.index);

    let report = RunReport {
        tool_invocation_id: cas.invocation().tool_invocation_id.clone(),
        input_root: tree.root,
        hash_stats: tree.stats,
        upload_stats,
        shards,
        manifest_path: RunManifest::path_for(&input_root),
    };
    manifest(cas, &report, &output_dir).save(&report.manifest_path)?;
    Ok(report)
}

fn validate(request: &RunRequest) -> Result<()> {
    let invalid = |message: String| Err(ClientError::InvalidRequest(message));
    if request.arguments.is_empty() {
        return invalid("no command to run".into());
    }
    if request.shards == 0 {
        return invalid("--shards must be at least 1".into());
    }
    if !request.working_directory.is_empty() {
        check_relative("the working directory", &request.working_directory)?;
    }
    for path in &request.output_paths {
        check_relative("output path", path)?;
    }
    let mut names: Vec<&str> = request
        .environment
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    names.sort_unstable();
    for pair in names.windows(2) {
        if pair[0] == pair[1] {
            return invalid(format!("environment variable {} is set twice", pair[0]));
        }
    }
    for name in names {
        if name.is_empty() || name.contains('=') {
            return invalid(format!("{name:?} is not a valid environment variable name"));
        }
        if request.shards > 1 && (name == SHARD_INDEX_VAR || name == TOTAL_SHARDS_VAR) {
            return invalid(format!("{name} is set by kiln when --shards is above 1"));
        }
    }
    Ok(())
}

fn check_relative(what: &str, path: &str) -> Result<()> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(ClientError::InvalidRequest(format!(
            "{what} {path:?} must be a relative path without `.`, `..` or empty segments"
        )));
    }
    Ok(())
}

fn substitute(template: &str, index: u32, total: u32) -> String {
    template
        .replace("{shard}", &index.to_string())
        .replace("{total}", &total.to_string())
}

fn placements(request: &RunRequest, index: u32, output_dir: &Path) -> Vec<(String, PathBuf)> {
    let total = request.shards;
    let mut placements: Vec<(String, PathBuf)> = request
        .output_paths
        .iter()
        .map(|template| {
            let base = if total > 1 && !template.contains("{shard}") {
                output_dir.join(format!("shard-{index}"))
            } else {
                output_dir.to_path_buf()
            };
            (substitute(template, index, total), base)
        })
        .collect();
    placements.sort();
    placements.dedup_by(|a, b| a.0 == b.0);
    placements
}

fn platform(properties: &[(String, String)]) -> Option<reapi::Platform> {
    if properties.is_empty() {
        return None;
    }
    let mut properties: Vec<reapi::platform::Property> = properties
        .iter()
        .map(|(name, value)| reapi::platform::Property {
            name: name.clone(),
            value: value.clone(),
        })
        .collect();
    properties.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
    properties.dedup();
    Some(reapi::Platform { properties })
}

fn command_for(request: &RunRequest, index: u32) -> reapi::Command {
    let total = request.shards;
    let mut environment: Vec<reapi::command::EnvironmentVariable> = request
        .environment
        .iter()
        .map(|(name, value)| reapi::command::EnvironmentVariable {
            name: name.clone(),
            value: value.clone(),
        })
        .collect();
    if total > 1 {
        for (name, value) in [(SHARD_INDEX_VAR, index), (TOTAL_SHARDS_VAR, total)] {
            environment.push(reapi::command::EnvironmentVariable {
                name: name.to_string(),
                value: value.to_string(),
            });
        }
    }
    environment.sort_by(|a, b| a.name.cmp(&b.name));
    let mut output_paths: Vec<String> = request
        .output_paths
        .iter()
        .map(|p| substitute(p, index, total))
        .collect();
    output_paths.sort();
    output_paths.dedup();
    // Command.platform is deprecated since REAPI 2.2 in favour of Action.platform, but
    // older servers read only this one; set both.
    #[allow(deprecated)]
    reapi::Command {
        arguments: request
            .arguments
            .iter()
            .map(|a| substitute(a, index, total))
            .collect(),
        environment_variables: environment,
        output_paths,
        platform: platform(&request.platform),
        working_directory: request.working_directory.clone(),
        ..Default::default()
    }
}

async fn run_shard(
    cas: &RemoteCas,
    executor: &dyn Executor,
    request: &RunRequest,
    plan: &ShardPlan,
    blobs: &BlobSet,
) -> Result<ShardResult> {
    let function = cas.digest_function();
    let metadata = cas.invocation().metadata(
        &plan.action_digest.hex(),
        &format!("shard-{}-of-{}", plan.index, request.shards),
    );
    let execute = reapi::ExecuteRequest {
        instance_name: cas.instance_name().to_string(),
        skip_cache_lookup: false,
        action_digest: Some(plan.action_digest.to_reapi()),
        execution_policy: None,
        results_cache_policy: None,
        digest_function: function.reapi_value(),
        inline_stdout: true,
        inline_stderr: true,
        inline_output_files: Vec::new(),
    };

    // A server that lost some inputs says FAILED_PRECONDITION with MISSING violations;
    // upload those once more and retry once, as Bazel does.
    let mut reuploaded = false;
    let response = loop {
        let response = execute_to_completion(executor, &execute, &metadata, request.resume).await;
        let precondition = match &response {
            Err(err) => err.status().cloned(),
            Ok(response) => response.status.as_ref().map(rpc_status_to_tonic),
        };
        let missing = precondition.and_then(|status| missing_blobs(&status, function));
        match missing {
            Some(missing) if !reuploaded => {
                reuploaded = true;
                tracing::info!(
                    count = missing.len(),
                    "the server is missing inputs; uploading them again"
                );
                if !missing.is_empty() && missing.iter().all(|d| blobs.get(d).is_some()) {
                    cas.upload(blobs, &missing, &NoProgress).await?;
                } else {
                    cas.upload_missing(blobs, &NoProgress).await?;
                }
            }
            _ => break response?,
        }
    };

    let error_status = response
        .status
        .as_ref()
        .filter(|s| s.code != tonic::Code::Ok as i32)
        .map(rpc_status_to_tonic);
    let Some(action_result) = response.result else {
        return Err(match error_status {
            Some(status) => ClientError::rpc("Execute", status),
            None => ClientError::InvalidResponse("an ExecuteResponse without a result".into()),
        });
    };
    let stdout = log_bytes(
        cas,
        &action_result.stdout_raw,
        action_result.stdout_digest.as_ref(),
        "stdout",
    )
    .await?;
    let stderr = log_bytes(
        cas,
        &action_result.stderr_raw,
        action_result.stderr_digest.as_ref(),
        "stderr",
    )
    .await?;

    // Keep the ActionResult itself in the CAS, so the run manifest can point at it even
    // when the action cache does not hold it (do_not_cache, or a failed action).
    let mut result_blob = BlobSet::new();
    let action_result_digest = result_blob.add_bytes(
        function,
        Bytes::from(prost::Message::encode_to_vec(&action_result)),
    );
    cas.upload_missing(&result_blob, &NoProgress).await?;

    let outputs = download_outputs(cas, &action_result, &|path| plan.destination(path)).await?;
    Ok(ShardResult {
        exit_code: action_result.exit_code,
        cached: response.cached_result,
        error_status,
        message: response.message,
        stdout,
        stderr,
        action_result,
        action_result_digest,
        outputs,
    })
}

/// Inlined bytes if the server sent them, else the blob named by `digest`.
async fn log_bytes(
    cas: &RemoteCas,
    raw: &[u8],
    digest: Option<&reapi::Digest>,
    what: &str,
) -> Result<Bytes> {
    if !raw.is_empty() {
        return Ok(Bytes::copy_from_slice(raw));
    }
    match digest {
        Some(digest) => {
            let digest = from_reapi(cas.digest_function(), Some(digest), what)?;
            cas.read_blob(&digest).await
        }
        None => Ok(Bytes::new()),
    }
}

fn manifest(cas: &RemoteCas, report: &RunReport, output_dir: &Path) -> RunManifest {
    RunManifest {
        version: MANIFEST_VERSION,
        tool_invocation_id: report.tool_invocation_id.clone(),
        instance_name: cas.instance_name().to_string(),
        digest_function: cas.digest_function().name().to_string(),
        input_root_digest: report.input_root.reapi(),
        output_dir: output_dir.to_path_buf(),
        exit_code: report.exit_code(),
        shards: report
            .shards
            .iter()
            .map(|shard| ShardRecord {
                index: shard.index,
                action_digest: shard.action_digest.reapi(),
                action_result_digest: shard
                    .result
                    .as_ref()
                    .ok()
                    .map(|r| r.action_result_digest.reapi()),
                exit_code: shard.exit_code(),
                cached: shard.result.as_ref().is_ok_and(|r| r.cached),
                error: shard.result.as_ref().err().map(ToString::to_string),
                outputs: shard
                    .result
                    .as_ref()
                    .map(|r| r.outputs.clone())
                    .unwrap_or_default(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_exit_code_wins() {
        assert_eq!(merge_exit_codes([0, 0, 0]), 0);
        assert_eq!(merge_exit_codes([0, 3, 1]), 3);
        assert_eq!(merge_exit_codes([0, -9]), 1);
        assert_eq!(merge_exit_codes([137, 2]), 137);
        assert_eq!(merge_exit_codes([]), 0);
    }

    #[test]
    #[allow(deprecated)] // reads Command.platform, which kiln still sets for old servers
    fn shards_differ_only_in_their_index() {
        let mut request =
            RunRequest::new("/tmp", vec!["test".into(), "--part={shard}/{total}".into()]);
        request.shards = 3;
        request.environment = vec![("ZED".into(), "1".into()), ("ALPHA".into(), "2".into())];
        request.output_paths = vec!["out/{shard}.xml".into(), "log".into()];
        request.platform = vec![("os".into(), "linux".into()), ("cores".into(), "2".into())];
        let command = command_for(&request, 1);
        assert_eq!(command.arguments, ["test", "--part=1/3"]);
        let env: Vec<_> = command
            .environment_variables
            .iter()
            .map(|v| format!("{}={}", v.name, v.value))
            .collect();
        assert_eq!(
            env,
            [
                "ALPHA=2",
                "TEST_SHARD_INDEX=1",
                "TEST_TOTAL_SHARDS=3",
                "ZED=1"
            ]
        );
        assert_eq!(command.output_paths, ["log", "out/1.xml"]);
        let names: Vec<_> = command
            .platform
            .unwrap()
            .properties
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["cores", "os"]);

        let single = command_for(&RunRequest::new("/tmp", vec!["x".into()]), 0);
        assert!(single.environment_variables.is_empty());
    }

    #[test]
    fn colliding_outputs_go_to_per_shard_directories() {
        let mut request = RunRequest::new("/in", vec!["x".into()]);
        request.shards = 2;
        request.output_paths = vec!["report-{shard}.xml".into(), "logs".into()];
        let placed = placements(&request, 1, Path::new("/out"));
        assert_eq!(
            placed,
            [
                ("logs".to_string(), PathBuf::from("/out/shard-1")),
                ("report-1.xml".to_string(), PathBuf::from("/out")),
            ]
        );
        request.shards = 1;
        let placed = placements(&request, 0, Path::new("/out"));
        assert!(placed.iter().all(|(_, base)| base == Path::new("/out")));
    }

    #[test]
    fn bad_requests_are_refused() {
        let ok = RunRequest::new("/in", vec!["x".into()]);
        assert!(validate(&ok).is_ok());
        let mut bad = ok.clone();
        bad.arguments.clear();
        assert!(validate(&bad).is_err());
        let mut bad = ok.clone();
        bad.output_paths = vec!["../escape".into()];
        assert!(validate(&bad).is_err());
        let mut bad = ok.clone();
        bad.environment = vec![("A".into(), "1".into()), ("A".into(), "2".into())];
        assert!(validate(&bad).is_err());
        let mut bad = ok.clone();
        bad.shards = 2;
        bad.environment = vec![("TEST_SHARD_INDEX".into(), "1".into())];
        assert!(validate(&bad).is_err());
    }
}

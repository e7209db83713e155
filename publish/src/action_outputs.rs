//! Build outputs as layer content: the ActionResult of one action (`--from-action`), or
//! of every shard a `kiln run` recorded in its run manifest (`--from-run`), written out
//! as one directory tree. kiln-client does the REAPI side (reading results and blobs,
//! placing outputs safely); this module decides which results to use and merges the
//! outputs of several actions.

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use kiln_client::output_download::download_outputs;
use kiln_client::{ClientError, ClientTls, Credentials, Invocation, RemoteCas, RunManifest};
use kiln_proto::reapi::ActionResult;
use kiln_store::{Digest, DigestFunction};

use crate::error::{PublishError, Result};

/// Where action results and blobs come from.
#[derive(Clone, Debug)]
pub struct CoordinatorSource {
    /// `grpc://host:port` or `http://host:port`.
    pub address: String,
    pub instance_name: String,
    pub digest_function: DigestFunction,
    /// The token to present, when the coordinator's auth is on.
    pub credentials: Option<Credentials>,
    /// For a `grpcs://` address: the CA to trust and a client certificate.
    pub tls: ClientTls,
}

/// One action whose outputs go into the layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedAction {
    pub action: Digest,
    /// The ActionResult blob `kiln run` stored in the CAS. It names the outputs even
    /// when the action cache does not (`kiln run --no-cache`); without it, or when the
    /// CAS no longer holds it, the action cache is asked.
    pub recorded_result: Option<Digest>,
}

/// What the layer holds.
#[derive(Clone, Debug)]
pub enum LayerContent {
    /// The content of a directory.
    Directory(PathBuf),
    /// The outputs of actions, read from a coordinator. Several actions' outputs land in
    /// one tree; two actions placing different content at one path is an error.
    ActionOutputs {
        coordinator: CoordinatorSource,
        actions: Vec<PublishedAction>,
    },
}

impl LayerContent {
    /// The same content, read from the coordinator with `credentials` and `tls` (a
    /// directory needs neither).
    pub fn with_credentials(mut self, credentials: Option<Credentials>, tls: ClientTls) -> Self {
        if let LayerContent::ActionOutputs { coordinator, .. } = &mut self {
            coordinator.credentials = credentials;
            coordinator.tls = tls;
        }
        self
    }

    /// The outputs of the cached action `digest` (`<hex>/<size>`, as Bazel prints it).
    pub fn from_action(coordinator: CoordinatorSource, digest: &str) -> Result<Self> {
        let action =
            Digest::parse_hash_slash_size(coordinator.digest_function, digest).map_err(|e| {
                PublishError::Action {
                    action: digest.to_string(),
                    reason: format!("expected <hex>/<size>: {e}"),
                }
            })?;
        Ok(LayerContent::ActionOutputs {
            coordinator,
            actions: vec![PublishedAction {
                action,
                recorded_result: None,
            }],
        })
    }

    /// The outputs of every shard of the run recorded at `manifest_path` (the
    /// [`RunManifest`] `kiln run` writes), read from the coordinator at `address`. A run
    /// with a failed shard is refused: its outputs are not a release.
    pub fn from_run(address: &str, manifest_path: &Path) -> Result<Self> {
        let manifest = RunManifest::load(manifest_path).map_err(PublishError::RunManifest)?;
        let invalid = |reason: String| PublishError::Source {
            path: manifest_path.to_path_buf(),
            reason,
        };
        let function = DigestFunction::from_name(&manifest.digest_function).ok_or_else(|| {
            invalid(format!(
                "unknown digest_function {:?}",
                manifest.digest_function
            ))
        })?;
        let parse = |text: &str| {
            Digest::parse_hash_slash_size(function, text)
                .map_err(|e| invalid(format!("digest {text:?}: {e}")))
        };
        let mut actions = Vec::with_capacity(manifest.shards.len());
        for shard in &manifest.shards {
            if shard.exit_code != 0 || shard.error.is_some() {
                return Err(invalid(format!(
                    "shard {} (action {}) {}; outputs of a failed run are not published",
                    shard.index,
                    shard.action_digest,
                    match &shard.error {
                        Some(error) => format!("did not run: {error}"),
                        None => format!("exited with {}", shard.exit_code),
                    }
                )));
            }
            actions.push(PublishedAction {
                action: parse(&shard.action_digest)?,
                recorded_result: shard
                    .action_result_digest
                    .as_deref()
                    .map(parse)
                    .transpose()?,
            });
        }
        if actions.is_empty() {
            return Err(invalid("the run has no shards".into()));
        }
        Ok(LayerContent::ActionOutputs {
            coordinator: CoordinatorSource {
                address: address.to_string(),
                instance_name: manifest.instance_name,
                digest_function: function,
                credentials: None,
                tls: ClientTls::default(),
            },
            actions,
        })
    }
}

/// Action outputs written out as one tree, in a temporary directory removed on drop.
pub(crate) struct StagedOutputs {
    staging: tempfile::TempDir,
}

impl StagedOutputs {
    pub(crate) fn tree(&self) -> PathBuf {
        self.staging.path().join("tree")
    }
}

/// Writes the outputs of `actions` into a new temporary directory.
pub(crate) async fn stage_outputs(
    coordinator: &CoordinatorSource,
    actions: &[PublishedAction],
) -> Result<StagedOutputs> {
    let cas = RemoteCas::connect_with_tls(
        &coordinator.address,
        &coordinator.tls,
        &coordinator.instance_name,
        coordinator.digest_function,
        Invocation::new().with_credentials(coordinator.credentials.clone()),
    )
    .await
    .map_err(|error| coordinator.error(error))?;
    let staged = StagedOutputs {
        staging: tempfile::Builder::new()
            .prefix("kiln-publish-")
            .tempdir()
            .map_err(|e| PublishError::io("creating a staging directory", e))?,
    };
    let tree = staged.tree();
    std::fs::create_dir(&tree)
        .map_err(|e| PublishError::io(format!("creating {}", tree.display()), e))?;
    for (index, action) in actions.iter().enumerate() {
        let result = action_result(&cas, coordinator, action).await?;
        // Each action lands apart first: placing outputs replaces what is at their
        // paths, and another action's files there must be compared, not replaced.
        let part = staged.staging.path().join(format!("action-{index}"));
        download_outputs(&cas, &result, &|_| part.clone())
            .await
            .map_err(|error| coordinator.error(error))?;
        merge_into(&part, &tree)?;
    }
    Ok(staged)
}

impl CoordinatorSource {
    fn error(&self, error: ClientError) -> PublishError {
        PublishError::Coordinator {
            address: self.address.clone(),
            error,
        }
    }
}

/// The successful ActionResult of `action`: the recorded one, else the cached one.
async fn action_result(
    cas: &RemoteCas,
    coordinator: &CoordinatorSource,
    action: &PublishedAction,
) -> Result<ActionResult> {
    let failed = |reason: String| PublishError::Action {
        action: action.action.reapi(),
        reason,
    };
    let recorded = match &action.recorded_result {
        Some(digest) => match cas.read_message::<ActionResult>(digest).await {
            Ok(result) => Some(result),
            Err(error) if is_not_found(&error) => {
                tracing::debug!(result = %digest, "the recorded ActionResult is gone from the CAS");
                None
            }
            Err(error) => return Err(coordinator.error(error)),
        },
        None => None,
    };
    let result = match recorded {
        Some(result) => result,
        None => cas
            .get_action_result(&action.action)
            .await
            .map_err(|error| coordinator.error(error))?
            .ok_or_else(|| failed("no cached result in the coordinator's action cache".into()))?,
    };
    if result.exit_code != 0 {
        return Err(failed(format!(
            "the action failed (exit code {})",
            result.exit_code
        )));
    }
    Ok(result)
}

fn is_not_found(error: &ClientError) -> bool {
    error
        .status()
        .is_some_and(|status| status.code() == tonic::Code::NotFound)
}

/// Moves everything under `from` into `into`. Where `into` already has an entry, both
/// must be directories (merged in turn) or the same file or symlink.
fn merge_into(from: &Path, into: &Path) -> Result<()> {
    let entries = std::fs::read_dir(from)
        .map_err(|e| PublishError::io(format!("reading {}", from.display()), e))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| PublishError::io(format!("reading {}", from.display()), e))?;
        let source = entry.path();
        let target = into.join(entry.file_name());
        let Ok(existing) = std::fs::symlink_metadata(&target) else {
            std::fs::rename(&source, &target)
                .map_err(|e| PublishError::io(format!("moving {}", source.display()), e))?;
            continue;
        };
        let incoming = std::fs::symlink_metadata(&source)
            .map_err(|e| PublishError::io(format!("reading {}", source.display()), e))?;
        if existing.is_dir() && incoming.is_dir() {
            merge_into(&source, &target)?;
        } else if !same_entry(&source, &incoming, &target, &existing)? {
            return Err(PublishError::Source {
                path: target,
                reason: "two actions produced this path with different content".into(),
            });
        }
    }
    Ok(())
}

fn same_entry(
    a: &Path,
    a_meta: &std::fs::Metadata,
    b: &Path,
    b_meta: &std::fs::Metadata,
) -> Result<bool> {
    let io = |path: &Path, e| PublishError::io(format!("reading {}", path.display()), e);
    let (a_type, b_type) = (a_meta.file_type(), b_meta.file_type());
    if a_type.is_symlink() && b_type.is_symlink() {
        return Ok(std::fs::read_link(a).map_err(|e| io(a, e))?
            == std::fs::read_link(b).map_err(|e| io(b, e))?);
    }
    let executable = |meta: &std::fs::Metadata| meta.permissions().mode() & 0o111 != 0;
    if !(a_type.is_file() && b_type.is_file())
        || a_meta.len() != b_meta.len()
        || executable(a_meta) != executable(b_meta)
    {
        return Ok(false);
    }
    let open = |path: &Path| {
        std::fs::File::open(path)
            .map(BufReader::new)
            .map_err(|e| io(path, e))
    };
    let (mut a_reader, mut b_reader) = (open(a)?, open(b)?);
    loop {
        let a_chunk = a_reader.fill_buf().map_err(|e| io(a, e))?;
        let b_chunk = b_reader.fill_buf().map_err(|e| io(b, e))?;
        if a_chunk.is_empty() || b_chunk.is_empty() {
            return Ok(a_chunk.is_empty() && b_chunk.is_empty());
        }
        let common = a_chunk.len().min(b_chunk.len());
        if a_chunk[..common] != b_chunk[..common] {
            return Ok(false);
        }
        a_reader.consume(common);
        b_reader.consume(common);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, data: &[u8], mode: u32) {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, data).unwrap();
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Two actions' outputs and the tree they merge into.
    fn temp_dirs() -> [tempfile::TempDir; 3] {
        std::array::from_fn(|_| tempfile::tempdir().unwrap())
    }

    #[test]
    fn outputs_of_several_actions_merge_into_one_tree() {
        let [first, second, tree] = temp_dirs();
        write(first.path(), "bin/a", b"a", 0o755);
        write(first.path(), "share/same.txt", b"same", 0o644);
        std::os::unix::fs::symlink("bin/a", first.path().join("a")).unwrap();
        write(second.path(), "bin/b", b"b", 0o755);
        write(second.path(), "share/same.txt", b"same", 0o644);
        std::os::unix::fs::symlink("bin/a", second.path().join("a")).unwrap();
        merge_into(first.path(), tree.path()).unwrap();
        merge_into(second.path(), tree.path()).unwrap();
        for (path, data) in [("bin/a", "a"), ("bin/b", "b"), ("share/same.txt", "same")] {
            assert_eq!(
                std::fs::read_to_string(tree.path().join(path)).unwrap(),
                data
            );
        }
        assert_eq!(
            std::fs::read_link(tree.path().join("a")).unwrap(),
            Path::new("bin/a")
        );
    }

    #[test]
    fn different_content_at_one_path_is_a_conflict() {
        let cases: [(&str, &[u8], u32); 3] = [
            ("same length, other bytes", b"xbcd", 0o644),
            ("other length", b"abcde", 0o644),
            ("other mode", b"abcd", 0o755),
        ];
        for (case, data, mode) in cases {
            let [first, second, tree] = temp_dirs();
            write(first.path(), "out/file", b"abcd", 0o644);
            write(second.path(), "out/file", data, mode);
            merge_into(first.path(), tree.path()).unwrap();
            let err = merge_into(second.path(), tree.path()).unwrap_err();
            assert!(
                matches!(&err, PublishError::Source { path, .. } if path.ends_with("out/file")),
                "{case}: {err}"
            );
        }
        let [first, second, tree] = temp_dirs();
        write(first.path(), "out", b"a file", 0o644);
        write(second.path(), "out/inner", b"a directory", 0o644);
        merge_into(first.path(), tree.path()).unwrap();
        assert!(merge_into(second.path(), tree.path()).is_err());
    }
}

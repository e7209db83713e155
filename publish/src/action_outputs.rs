//! Build outputs as layer content: an ActionResult from the coordinator's action cache
//! (`--from-action`), or every action a `kiln run` recorded in its run manifest
//! (`--from-run`), written out as a directory tree.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use futures::StreamExt as _;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::ReadRequest;
use kiln_proto::prost::Message as _;
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    self, ActionResult, BatchReadBlobsRequest, Directory, GetActionResultRequest, Tree,
};
use kiln_store::DigestFunction;
use tokio::io::AsyncWriteExt as _;
use tonic::transport::Channel;

use crate::error::{PublishError, Result};

/// Blobs up to this size are fetched with BatchReadBlobs, larger ones streamed.
const BATCH_BLOB_LIMIT: i64 = 1 << 20;
/// Stays under the coordinator's default max_batch_total_size_bytes (4 MiB).
const BATCH_TOTAL_LIMIT: i64 = 3 << 20;

/// Where action results and blobs come from.
#[derive(Clone, Debug)]
pub struct CoordinatorSource {
    /// `grpc://host:port` or `http://host:port`.
    pub address: String,
    pub instance_name: String,
    pub digest_function: DigestFunction,
}

/// What `kiln publish --from-run` reads: the manifest `kiln run` writes
/// (`.kiln/last-run.json`, whose `shards` carry more fields than this reader needs), or
/// the minimal form
///
/// ```json
/// {"instance_name": "", "digest_function": "sha256",
///  "actions": [{"action_digest": "<hex>/<size>"}]}
/// ```
///
/// Every action's outputs land in one tree; two actions writing the same path with
/// different content is an error.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct RunManifest {
    #[serde(default)]
    pub instance_name: String,
    /// `sha256` or `blake3`.
    pub digest_function: String,
    #[serde(alias = "shards")]
    pub actions: Vec<RunAction>,
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct RunAction {
    /// `<hex>/<size>`, as Bazel prints digests.
    pub action_digest: String,
    /// The action's exit code, when the manifest records it (`kiln run` does): outputs
    /// of a failed action are not published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

impl RunManifest {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PublishError::io(format!("reading {}", path.display()), e))?;
        let manifest: RunManifest =
            serde_json::from_str(&text).map_err(|e| PublishError::Source {
                path: path.to_path_buf(),
                reason: format!("not a run manifest: {e}"),
            })?;
        if let Some(failed) = manifest
            .actions
            .iter()
            .find(|a| a.exit_code.is_some_and(|c| c != 0))
        {
            return Err(PublishError::Source {
                path: path.to_path_buf(),
                reason: format!(
                    "action {} exited with {}; outputs of a failed run are not published",
                    failed.action_digest,
                    failed.exit_code.unwrap_or_default()
                ),
            });
        }
        Ok(manifest)
    }
}

/// Parses `<hex>/<size>`.
pub fn parse_action_digest(text: &str) -> Result<reapi::Digest> {
    // Both digest functions kiln speaks have 32-byte hashes: one grammar for either.
    kiln_store::Digest::parse_hash_slash_size(DigestFunction::Sha256, text)
        .map(|digest| digest.to_reapi())
        .map_err(|e| PublishError::Action {
            action: text.to_string(),
            reason: format!("expected <hex>/<size>: {e}"),
        })
}

/// Writes the outputs of `actions` (cached results in the coordinator) into a new
/// temporary directory, which is removed when the returned handle is dropped.
pub async fn fetch_outputs(
    source: CoordinatorSource,
    actions: &[reapi::Digest],
) -> Result<tempfile::TempDir> {
    let staging = tempfile::Builder::new()
        .prefix("kiln-publish-")
        .tempdir()
        .map_err(|e| PublishError::io("creating a staging directory", e))?;
    let mut fetcher = ActionFetcher::connect(source).await?;
    for action in actions {
        fetcher.materialise_action(action, staging.path()).await?;
    }
    Ok(staging)
}

/// A connection to the coordinator's cache services.
pub struct ActionFetcher {
    source: CoordinatorSource,
    action_cache: ActionCacheClient<Channel>,
    cas: ContentAddressableStorageClient<Channel>,
    byte_stream: ByteStreamClient<Channel>,
    /// Files already written, by path, with the digest they hold.
    written: HashMap<PathBuf, String>,
}

impl ActionFetcher {
    pub async fn connect(source: CoordinatorSource) -> Result<Self> {
        let unavailable = |reason: String| PublishError::Coordinator {
            address: source.address.clone(),
            reason,
        };
        let uri = match source.address.strip_prefix("grpc://") {
            Some(rest) => format!("http://{rest}"),
            None => source.address.clone(),
        };
        let channel = Channel::from_shared(uri)
            .map_err(|e| unavailable(format!("not a URI: {e}")))?
            .connect()
            .await
            .map_err(|e| unavailable(format!("cannot connect: {e}")))?;
        Ok(ActionFetcher {
            action_cache: ActionCacheClient::new(channel.clone()),
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(16 << 20),
            byte_stream: ByteStreamClient::new(channel),
            source,
            written: HashMap::new(),
        })
    }

    fn status_error(&self, what: &str, status: tonic::Status) -> PublishError {
        PublishError::Coordinator {
            address: self.source.address.clone(),
            reason: format!("{what}: {} ({:?})", status.message(), status.code()),
        }
    }

    /// Writes the outputs of the cached result of `action_digest` under `dest`.
    pub async fn materialise_action(
        &mut self,
        action_digest: &reapi::Digest,
        dest: &Path,
    ) -> Result<()> {
        let action = format!("{}/{}", action_digest.hash, action_digest.size_bytes);
        let request = GetActionResultRequest {
            instance_name: self.source.instance_name.clone(),
            action_digest: Some(action_digest.clone()),
            digest_function: self.source.digest_function.reapi_value(),
            ..Default::default()
        };
        let result: ActionResult = match self.action_cache.get_action_result(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Err(PublishError::Action {
                    action,
                    reason: "no cached result in the coordinator's action cache".into(),
                })
            }
            Err(status) => return Err(self.status_error("GetActionResult", status)),
        };
        if result.exit_code != 0 {
            return Err(PublishError::Action {
                action,
                reason: format!("the action failed (exit code {})", result.exit_code),
            });
        }
        let mut files = Vec::new();
        for file in &result.output_files {
            let digest = file.digest.clone().ok_or_else(|| PublishError::Action {
                action: action.clone(),
                reason: format!("output file {} has no digest", file.path),
            })?;
            files.push((safe_join(dest, &file.path)?, digest, file.is_executable));
        }
        for dir in &result.output_directories {
            let root = safe_join(dest, &dir.path)?;
            let tree_digest = dir
                .tree_digest
                .clone()
                .ok_or_else(|| PublishError::Action {
                    action: action.clone(),
                    reason: format!("output directory {} has no tree digest", dir.path),
                })?;
            let tree =
                Tree::decode(self.read_blob(&tree_digest).await?.as_slice()).map_err(|e| {
                    PublishError::Action {
                        action: action.clone(),
                        reason: format!("tree of {} does not decode: {e}", dir.path),
                    }
                })?;
            self.plan_tree(&tree, &root, &mut files)?;
        }
        // REAPI 2.0 servers fill the deprecated per-kind lists, newer ones output_symlinks.
        #[allow(deprecated)]
        let symlinks = result
            .output_symlinks
            .iter()
            .chain(&result.output_file_symlinks)
            .chain(&result.output_directory_symlinks);
        let mut links = Vec::new();
        for link in symlinks {
            links.push((safe_join(dest, &link.path)?, link.target.clone()));
        }
        self.write_files(files).await?;
        for (path, target) in links {
            create_parent(&path)?;
            match std::fs::symlink_metadata(&path) {
                Ok(_) => continue, // reported under two of the symlink lists
                Err(_) => std::os::unix::fs::symlink(&target, &path)
                    .map_err(|e| PublishError::io(format!("linking {}", path.display()), e))?,
            }
        }
        Ok(())
    }

    /// Adds the files of a Tree to `files` and creates its directories and symlinks.
    fn plan_tree(
        &self,
        tree: &Tree,
        root: &Path,
        files: &mut Vec<(PathBuf, reapi::Digest, bool)>,
    ) -> Result<()> {
        let children: HashMap<String, &Directory> = tree
            .children
            .iter()
            .map(|child| {
                let mut hasher = self.source.digest_function.hasher();
                hasher.update(&child.encode_to_vec());
                (hex::encode(hasher.finalize()), child)
            })
            .collect();
        let root_dir = tree.root.as_ref().ok_or_else(|| PublishError::Action {
            action: root.display().to_string(),
            reason: "tree without a root".into(),
        })?;
        let mut pending = vec![(root.to_path_buf(), root_dir)];
        while let Some((path, dir)) = pending.pop() {
            std::fs::create_dir_all(&path)
                .map_err(|e| PublishError::io(format!("creating {}", path.display()), e))?;
            for file in &dir.files {
                let digest = file.digest.clone().ok_or_else(|| PublishError::Action {
                    action: path.display().to_string(),
                    reason: format!("file {} has no digest", file.name),
                })?;
                files.push((safe_join(&path, &file.name)?, digest, file.is_executable));
            }
            for link in &dir.symlinks {
                let link_path = safe_join(&path, &link.name)?;
                std::os::unix::fs::symlink(&link.target, &link_path)
                    .map_err(|e| PublishError::io(format!("linking {}", link_path.display()), e))?;
            }
            for sub in &dir.directories {
                let digest = sub
                    .digest
                    .as_ref()
                    .map(|d| d.hash.as_str())
                    .unwrap_or_default();
                let child = children.get(digest).ok_or_else(|| PublishError::Action {
                    action: path.display().to_string(),
                    reason: format!("tree is missing directory {} ({digest})", sub.name),
                })?;
                pending.push((safe_join(&path, &sub.name)?, child));
            }
        }
        Ok(())
    }

    /// Fetches and writes files: small blobs in batches, large ones streamed.
    async fn write_files(&mut self, files: Vec<(PathBuf, reapi::Digest, bool)>) -> Result<()> {
        let mut batch: Vec<(PathBuf, reapi::Digest, bool)> = Vec::new();
        let mut batch_bytes = 0;
        for (path, digest, executable) in files {
            if let Some(existing) = self.written.get(&path) {
                if *existing == digest.hash {
                    continue;
                }
                return Err(PublishError::Source {
                    path,
                    reason: "two actions produced this path with different content".into(),
                });
            }
            self.written.insert(path.clone(), digest.hash.clone());
            if digest.size_bytes > BATCH_BLOB_LIMIT {
                self.stream_to_file(&digest, &path, executable).await?;
                continue;
            }
            if batch_bytes + digest.size_bytes > BATCH_TOTAL_LIMIT {
                self.write_batch(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
            batch_bytes += digest.size_bytes;
            batch.push((path, digest, executable));
        }
        self.write_batch(batch).await
    }

    async fn write_batch(&mut self, batch: Vec<(PathBuf, reapi::Digest, bool)>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut wanted: Vec<reapi::Digest> = batch.iter().map(|(_, d, _)| d.clone()).collect();
        wanted.sort_by(|a, b| a.hash.cmp(&b.hash));
        wanted.dedup();
        let contents = self.read_batch(wanted).await?;
        for (path, digest, executable) in batch {
            let data = contents
                .get(&digest.hash)
                .ok_or_else(|| PublishError::Coordinator {
                    address: self.source.address.clone(),
                    reason: format!("BatchReadBlobs left out {}", digest.hash),
                })?;
            create_parent(&path)?;
            std::fs::write(&path, data)
                .map_err(|e| PublishError::io(format!("writing {}", path.display()), e))?;
            set_executable(&path, executable)?;
        }
        Ok(())
    }

    async fn read_batch(
        &mut self,
        digests: Vec<reapi::Digest>,
    ) -> Result<HashMap<String, Vec<u8>>> {
        let request = BatchReadBlobsRequest {
            instance_name: self.source.instance_name.clone(),
            digests,
            digest_function: self.source.digest_function.reapi_value(),
            ..Default::default()
        };
        let response = self
            .cas
            .batch_read_blobs(request)
            .await
            .map_err(|status| self.status_error("BatchReadBlobs", status))?
            .into_inner();
        let mut out = HashMap::new();
        for blob in response.responses {
            let digest = blob.digest.unwrap_or_default();
            let code = blob.status.as_ref().map_or(0, |s| s.code);
            if code != 0 {
                return Err(PublishError::Coordinator {
                    address: self.source.address.clone(),
                    reason: format!(
                        "blob {}/{} unreadable: {}",
                        digest.hash,
                        digest.size_bytes,
                        blob.status.map(|s| s.message).unwrap_or_default()
                    ),
                });
            }
            self.verify(&digest, &blob.data)?;
            out.insert(digest.hash, blob.data);
        }
        Ok(out)
    }

    /// Reads a whole blob (a Tree) into memory.
    async fn read_blob(&mut self, digest: &reapi::Digest) -> Result<Vec<u8>> {
        if digest.size_bytes <= BATCH_BLOB_LIMIT {
            let mut blobs = self.read_batch(vec![digest.clone()]).await?;
            return blobs
                .remove(&digest.hash)
                .ok_or_else(|| PublishError::Coordinator {
                    address: self.source.address.clone(),
                    reason: format!("BatchReadBlobs left out {}", digest.hash),
                });
        }
        let mut data = Vec::new();
        let mut stream = self.open_read(digest).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|status| self.status_error("ByteStream.Read", status))?;
            data.extend_from_slice(&chunk.data);
        }
        self.verify(digest, &data)?;
        Ok(data)
    }

    async fn open_read(
        &mut self,
        digest: &reapi::Digest,
    ) -> Result<tonic::Streaming<kiln_proto::bytestream::ReadResponse>> {
        let function = match self.source.digest_function {
            DigestFunction::Sha256 => String::new(),
            other => format!("{}/", other.name()),
        };
        let instance = match self.source.instance_name.as_str() {
            "" => String::new(),
            name => format!("{name}/"),
        };
        let request = ReadRequest {
            resource_name: format!(
                "{instance}blobs/{function}{}/{}",
                digest.hash, digest.size_bytes
            ),
            read_offset: 0,
            read_limit: 0,
        };
        Ok(self
            .byte_stream
            .read(request)
            .await
            .map_err(|status| self.status_error("ByteStream.Read", status))?
            .into_inner())
    }

    /// Streams a large blob into a file, hashing it on the way.
    async fn stream_to_file(
        &mut self,
        digest: &reapi::Digest,
        path: &Path,
        executable: bool,
    ) -> Result<()> {
        create_parent(path)?;
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| PublishError::io(format!("creating {}", path.display()), e))?;
        let mut hasher = self.source.digest_function.hasher();
        let mut size = 0i64;
        let mut stream = self.open_read(digest).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|status| self.status_error("ByteStream.Read", status))?;
            hasher.update(&chunk.data);
            size += chunk.data.len() as i64;
            file.write_all(&chunk.data)
                .await
                .map_err(|e| PublishError::io(format!("writing {}", path.display()), e))?;
        }
        file.flush()
            .await
            .map_err(|e| PublishError::io(format!("writing {}", path.display()), e))?;
        let actual = hex::encode(hasher.finalize());
        if actual != digest.hash || size != digest.size_bytes {
            return Err(PublishError::DigestMismatch {
                what: format!("blob streamed into {}", path.display()),
                expected: format!("{}/{}", digest.hash, digest.size_bytes),
                actual: format!("{actual}/{size}"),
            });
        }
        set_executable(path, executable)
    }

    fn verify(&self, digest: &reapi::Digest, data: &[u8]) -> Result<()> {
        let mut hasher = self.source.digest_function.hasher();
        hasher.update(data);
        let actual = hex::encode(hasher.finalize());
        if actual != digest.hash || data.len() as i64 != digest.size_bytes {
            return Err(PublishError::DigestMismatch {
                what: "blob from the coordinator".into(),
                expected: format!("{}/{}", digest.hash, digest.size_bytes),
                actual: format!("{actual}/{}", data.len()),
            });
        }
        Ok(())
    }
}

/// Joins a relative output path onto `root`, refusing absolute paths and `..`.
fn safe_join(root: &Path, relative: &str) -> Result<PathBuf> {
    let path = Path::new(relative);
    let clean = !relative.is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !clean {
        return Err(PublishError::Source {
            path: path.to_path_buf(),
            reason: "output paths must be relative and stay inside the output root".into(),
        });
    }
    Ok(root.join(path))
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| PublishError::io(format!("creating {}", parent.display()), e))?;
    }
    Ok(())
}

fn set_executable(path: &Path, executable: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| PublishError::io(format!("setting the mode of {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_digests_parse() {
        let hash = "a".repeat(64);
        let digest = parse_action_digest(&format!("{hash}/42")).unwrap();
        assert_eq!(
            (digest.hash.as_str(), digest.size_bytes),
            (hash.as_str(), 42)
        );
        assert!(parse_action_digest(&hash).is_err());
        assert!(parse_action_digest(&format!("{hash}/-1")).is_err());
        assert!(parse_action_digest(&format!("{}/1", "A".repeat(64))).is_err());
    }

    #[test]
    fn output_paths_stay_inside() {
        let root = Path::new("/out");
        assert_eq!(safe_join(root, "a/b").unwrap(), Path::new("/out/a/b"));
        assert!(safe_join(root, "../x").is_err());
        assert!(safe_join(root, "/etc/passwd").is_err());
        assert!(safe_join(root, "").is_err());
    }
}

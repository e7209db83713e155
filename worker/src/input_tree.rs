//! Materialising an action's input root: walk its Directory tree from the CAS (through the
//! local cache), then build it in a fresh directory with files copied from the cache
//! (never hardlinked: see `local_cache`).

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};

use kiln_client::tree_layout::TreeLimits;
use kiln_client::RemoteCas;
use kiln_proto::prost::Message;
use kiln_proto::reapi;
use kiln_store::{Digest, DigestFunction};

use crate::local_cache::{CacheKey, FetchStats, LocalCache};
use crate::WorkerError;

/// How far the walk of one action's input tree may go before it is refused. A tree is a
/// DAG: a directory that lists one child twice at every level is `2^depth` paths, so the
/// walk counts paths, not distinct directories, and stops at `nodes` rather than at the
/// worker's memory. Names are unbounded, so a small DAG repeating long names at every
/// level reaches `nodes` paths of kilobytes each: `path_bytes` bounds what the worker
/// holds before anything is created. Paths nested `depth` deep approach PATH_MAX anyway.
pub(crate) const ACTION_TREE_LIMITS: TreeLimits = TreeLimits {
    nodes: 1_000_000,
    depth: 256,
    path_bytes: 256 << 20,
};
/// The largest Directory message read into memory.
const MAX_DIRECTORY_BYTES: u64 = 4 << 20;

/// Parses a digest found in an Action, Command or Directory; `what` names the field.
pub(crate) fn from_reapi(
    function: DigestFunction,
    digest: Option<&reapi::Digest>,
    what: &str,
) -> Result<Digest, WorkerError> {
    let digest =
        digest.ok_or_else(|| WorkerError::InvalidAction(format!("{what} has no digest")))?;
    Digest::from_reapi(function, digest)
        .map_err(|e| WorkerError::InvalidAction(format!("{what}: {e}")))
}

/// Fetches (if not cached) and decodes the messages with these digests, in order.
pub(crate) async fn fetch_messages<M: Message + Default>(
    cache: &LocalCache,
    cas: &RemoteCas,
    digests: &[Digest],
    what: &str,
) -> Result<(Vec<M>, FetchStats), WorkerError> {
    let keys: Vec<CacheKey> = digests.iter().copied().map(CacheKey::file).collect();
    let (pins, stats) = cache.fetch_missing(cas, &keys).await?;
    let mut messages = Vec::with_capacity(pins.len());
    for pin in &pins {
        let bytes = cache.read(pin)?;
        let message = M::decode(bytes.as_slice()).map_err(|e| {
            WorkerError::InvalidAction(format!(
                "{what} {} is not a valid message: {e}",
                pin.key().digest
            ))
        })?;
        messages.push(message);
    }
    Ok((messages, stats))
}

/// Checks a file, directory or symlink name from a Directory message: one path component.
fn check_node_name(name: &str) -> Result<(), WorkerError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(WorkerError::InvalidAction(format!(
            "{name:?} is not a valid file name in an input Directory"
        )));
    }
    Ok(())
}

/// What an input tree expands to: every path is relative to the action root, made of
/// names `check_node_name` accepted, and named once; parents come before children.
#[derive(Debug, Default)]
pub struct InputPlan {
    pub files: Vec<(PathBuf, CacheKey)>,
    pub symlinks: Vec<(PathBuf, String)>,
    pub directories: Vec<PathBuf>,
    /// What fetching the Directory messages downloaded.
    pub stats: FetchStats,
}

/// Walks the tree rooted at `root_digest`, asking `fetch` for the Directory messages of
/// each level at once, and checks it as it goes (names, duplicates, `limits`, message
/// size). Apart from `materialise`, so that the checks can be exercised without a CAS.
pub async fn plan<F, Fut>(
    root_digest: Digest,
    limits: TreeLimits,
    mut fetch: F,
) -> Result<InputPlan, WorkerError>
where
    F: FnMut(Vec<Digest>) -> Fut,
    Fut: Future<Output = Result<(Vec<reapi::Directory>, FetchStats), WorkerError>>,
{
    let function = root_digest.function;
    let mut plan = InputPlan::default();
    let InputPlan {
        files,
        symlinks,
        directories,
        stats,
    } = &mut plan;

    // Breadth-first, one batch of Directory fetches per level.
    let mut level: Vec<(PathBuf, Digest)> = vec![(PathBuf::new(), root_digest)];
    let mut depth = 0;
    let mut path_bytes = 0usize;
    while !level.is_empty() {
        depth += 1;
        if depth > limits.depth {
            return Err(WorkerError::InvalidAction(format!(
                "the input tree is more than {} directories deep",
                limits.depth
            )));
        }
        let digests: Vec<Digest> = level.iter().map(|(_, d)| *d).collect();
        if let Some(large) = digests.iter().find(|d| d.size > MAX_DIRECTORY_BYTES) {
            return Err(WorkerError::InvalidAction(format!(
                "input Directory {large} is larger than {MAX_DIRECTORY_BYTES} bytes"
            )));
        }
        let (messages, fetched) = fetch(digests).await?;
        stats.blobs += fetched.blobs;
        stats.bytes += fetched.bytes;
        let mut next = Vec::new();
        for ((path, _), directory) in level.into_iter().zip(messages) {
            let mut names = HashSet::new();
            let mut claim = |name: &str| {
                check_node_name(name)?;
                if names.insert(name.to_string()) {
                    let joined = path.join(name);
                    path_bytes += joined.as_os_str().len();
                    Ok(joined)
                } else {
                    Err(WorkerError::InvalidAction(format!(
                        "{name:?} appears twice in input directory {}",
                        path.display()
                    )))
                }
            };
            for file in &directory.files {
                let digest = from_reapi(function, file.digest.as_ref(), "an input file")?;
                let key = CacheKey {
                    digest,
                    executable: file.is_executable,
                };
                files.push((claim(&file.name)?, key));
            }
            for symlink in &directory.symlinks {
                if symlink.target.is_empty() {
                    return Err(WorkerError::InvalidAction(format!(
                        "input symlink {:?} has no target",
                        symlink.name
                    )));
                }
                symlinks.push((claim(&symlink.name)?, symlink.target.clone()));
            }
            for child in &directory.directories {
                let digest = from_reapi(function, child.digest.as_ref(), "an input directory")?;
                let child_path = claim(&child.name)?;
                directories.push(child_path.clone());
                next.push((child_path, digest));
            }
            // Checked per directory, so a tree that doubles at each level is refused
            // before its last level is held in memory.
            if files.len() + symlinks.len() + directories.len() > limits.nodes {
                return Err(WorkerError::InvalidAction(format!(
                    "the input tree expands to more than {} files, directories and symlinks",
                    limits.nodes
                )));
            }
            if path_bytes > limits.path_bytes {
                return Err(WorkerError::InvalidAction(format!(
                    "the input tree's paths take more than {} bytes",
                    limits.path_bytes
                )));
            }
        }
        level = next;
    }
    Ok(plan)
}

/// Builds the input tree rooted at `root_digest` in `exec_root` (which must exist and be
/// empty). Returns what had to be downloaded.
pub async fn materialise(
    cache: &LocalCache,
    cas: &RemoteCas,
    root_digest: Digest,
    exec_root: &Path,
) -> Result<FetchStats, WorkerError> {
    let InputPlan {
        files,
        symlinks,
        directories,
        mut stats,
    } = plan(root_digest, ACTION_TREE_LIMITS, |digests| async move {
        fetch_messages::<reapi::Directory>(cache, cas, &digests, "Directory").await
    })
    .await?;

    let keys: Vec<CacheKey> = files.iter().map(|(_, key)| *key).collect();
    let (pins, fetched) = cache.fetch_missing(cas, &keys).await?;
    stats.blobs += fetched.blobs;
    stats.bytes += fetched.bytes;

    // Parents come before children: the walk above is breadth-first.
    for directory in &directories {
        let path = exec_root.join(directory);
        std::fs::create_dir(&path).map_err(WorkerError::io(format!(
            "creating input directory {}",
            path.display()
        )))?;
    }
    for ((path, _), pin) in files.iter().zip(&pins) {
        cache.copy_into(pin, &exec_root.join(path))?;
    }
    for (path, target) in &symlinks {
        let link = exec_root.join(path);
        std::os::unix::fs::symlink(target, &link).map_err(WorkerError::io(format!(
            "creating input symlink {}",
            link.display()
        )))?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzz/input_tree: a directory listing itself twice under long names is a
    /// few hundred bytes, and expanded to paths of gigabytes before the node limit.
    #[tokio::test]
    async fn a_tree_of_long_repeated_names_is_refused_by_its_path_bytes() {
        let itself = Digest::of_bytes(DigestFunction::Sha256, b"any").to_reapi();
        let child = |name: char| reapi::DirectoryNode {
            name: name.to_string().repeat(4000),
            digest: Some(itself.clone()),
        };
        let directory = reapi::Directory {
            directories: vec![child('x'), child('y')],
            ..Default::default()
        };
        let root = Digest::of_bytes(DigestFunction::Sha256, b"root");
        let refused = plan(root, ACTION_TREE_LIMITS, |digests| {
            let level = vec![directory.clone(); digests.len()];
            async move { Ok((level, FetchStats::default())) }
        })
        .await
        .unwrap_err();
        assert!(refused.to_string().contains("bytes"), "{refused}");
    }
}

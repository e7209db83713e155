//! Placing an ActionResult's outputs on the local disk.
//!
//! - Every path the server sends is checked: relative, no `..`, no `.`, and no existing
//!   symlink on the way down from the output directory (a symlink there could redirect
//!   a write outside it).
//! - Each output file and symlink is written to a temporary name next to its
//!   destination and renamed over it, so a reader sees the old or the new version,
//!   never half of one.
//! - Each output directory is built complete in a temporary sibling, then swapped in,
//!   so it holds exactly the action's tree (no stale files from an earlier run).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use kiln_proto::reapi;
use kiln_store::Digest;

use crate::reapi_digest::from_reapi;
use crate::remote_cas::RemoteCas;
use crate::tree_layout::{self, TreeLimits};
use crate::{ClientError, Result};

const DOWNLOAD_CONCURRENCY: usize = 8;

/// Downloads every output of `result`. `destination` maps an output path (as the
/// ActionResult names it, relative to the working directory) to the directory it is
/// placed under, which must exist or be creatable; the output lands at
/// `destination(path).join(path)`. Returns the paths written.
pub async fn download_outputs(
    cas: &RemoteCas,
    result: &reapi::ActionResult,
    destination: &(dyn Fn(&str) -> PathBuf + Sync),
) -> Result<Vec<PathBuf>> {
    let function = cas.digest_function();
    let mut written = Vec::new();
    for file in &result.output_files {
        let digest = from_reapi(
            function,
            file.digest.as_ref(),
            &format!("output file {}", file.path),
        )?;
        let path = prepare_destination(&destination(&file.path), &file.path)?;
        write_file_atomically(cas, &path, &digest, &file.contents, file.is_executable).await?;
        written.push(path);
    }
    for directory in &result.output_directories {
        let tree_digest = from_reapi(
            function,
            directory.tree_digest.as_ref(),
            &format!("output directory {}", directory.path),
        )?;
        let path = prepare_destination(&destination(&directory.path), &directory.path)?;
        let tree: reapi::Tree = cas.read_message(&tree_digest).await?;
        write_tree_atomically(cas, &path, &tree).await?;
        written.push(path);
    }
    // The deprecated per-kind lists are what REAPI 2.0 servers (and Bazel's results)
    // fill; newer ones use output_symlinks. Accept both.
    #[allow(deprecated)]
    let symlinks = result
        .output_symlinks
        .iter()
        .chain(&result.output_file_symlinks)
        .chain(&result.output_directory_symlinks);
    for symlink in symlinks {
        let path = prepare_destination(&destination(&symlink.path), &symlink.path)?;
        write_symlink_atomically(&path, &symlink.target)?;
        written.push(path);
    }
    Ok(written)
}

/// Checks `relative` and creates the directories leading to it under `base`, refusing
/// to pass through symlinks. Returns the full destination path.
pub fn prepare_destination(base: &Path, relative: &str) -> Result<PathBuf> {
    let unsafe_path = |reason| ClientError::UnsafeOutputPath {
        path: relative.to_string(),
        reason,
    };
    if relative.is_empty() {
        return Err(unsafe_path("it is empty"));
    }
    if relative.starts_with('/') {
        return Err(unsafe_path("it is absolute"));
    }
    let parts: Vec<&str> = relative.split('/').collect();
    for part in &parts {
        match *part {
            "" => return Err(unsafe_path("it has an empty segment")),
            "." => return Err(unsafe_path("it contains `.`")),
            ".." => return Err(unsafe_path("it contains `..`")),
            _ if part.contains('\0') => return Err(unsafe_path("it contains NUL")),
            _ => {}
        }
    }
    let (_, parents) = parts.split_last().expect("split yields at least one part");
    std::fs::create_dir_all(base).map_err(|e| ClientError::io(base, e))?;
    let mut current = base.to_path_buf();
    for part in parents {
        current.push(part);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(unsafe_path("a directory on its way is a symlink"))
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                // A file where the action produced a directory: the action's layout wins.
                std::fs::remove_file(&current).map_err(|e| ClientError::io(&current, e))?;
                std::fs::create_dir(&current).map_err(|e| ClientError::io(&current, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&current).map_err(|e| ClientError::io(&current, e))?;
            }
            Err(e) => return Err(ClientError::io(&current, e)),
        }
    }
    Ok(base.join(relative))
}

fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

async fn write_file_atomically(
    cas: &RemoteCas,
    path: &Path,
    digest: &Digest,
    inline: &[u8],
    executable: bool,
) -> Result<()> {
    let temp = tempfile::Builder::new()
        .prefix(".kiln-download-")
        .tempfile_in(parent_of(path))
        .map_err(|e| ClientError::io(parent_of(path), e))?;
    if !inline.is_empty() || digest.size == 0 {
        let actual = Digest::of_bytes(digest.function, inline);
        if actual != *digest {
            return Err(ClientError::InvalidResponse(format!(
                "inlined contents of {} do not match {digest}",
                path.display()
            )));
        }
        std::fs::write(temp.path(), inline).map_err(|e| ClientError::io(temp.path(), e))?;
    } else {
        cas.read_blob_to_file(digest, temp.path()).await?;
    }
    set_executable(temp.path(), executable)?;
    remove_directory_in_the_way(path)?;
    temp.persist(path)
        .map_err(|e| ClientError::io(path, e.error))?;
    Ok(())
}

fn set_executable(path: &Path, executable: bool) -> Result<()> {
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ClientError::io(path, e))
}

/// A rename cannot replace a directory with a file; remove a directory at `path` first.
fn remove_directory_in_the_way(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            std::fs::remove_dir_all(path).map_err(|e| ClientError::io(path, e))
        }
        _ => Ok(()),
    }
}

fn write_symlink_atomically(path: &Path, target: &str) -> Result<()> {
    let temp = parent_of(path).join(format!(".kiln-link-{}", uuid::Uuid::new_v4()));
    std::os::unix::fs::symlink(target, &temp).map_err(|e| ClientError::io(&temp, e))?;
    remove_directory_in_the_way(path)?;
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        ClientError::io(path, e)
    })
}

/// Builds `tree` in a temporary sibling of `path`, then swaps it in.
async fn write_tree_atomically(cas: &RemoteCas, path: &Path, tree: &reapi::Tree) -> Result<()> {
    let parent = parent_of(path);
    let staging = tempfile::Builder::new()
        .prefix(".kiln-tree-")
        .tempdir_in(parent)
        .map_err(|e| ClientError::io(parent, e))?;
    let files = lay_out_tree(cas, staging.path(), tree)?;
    let mut downloads: Vec<BoxFuture<'_, Result<()>>> = Vec::with_capacity(files.len());
    for (digest, file_path, executable) in files {
        downloads.push(Box::pin(async move {
            cas.read_blob_to_file(&digest, &file_path).await?;
            set_executable(&file_path, executable)
        }));
    }
    futures::stream::iter(downloads)
        .buffer_unordered(DOWNLOAD_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;

    let staged = staging.keep();
    let old = match std::fs::symlink_metadata(path) {
        Ok(_) => {
            let old = parent.join(format!(".kiln-old-{}", uuid::Uuid::new_v4()));
            std::fs::rename(path, &old).map_err(|e| ClientError::io(path, e))?;
            Some(old)
        }
        Err(_) => None,
    };
    std::fs::rename(&staged, path).map_err(|e| ClientError::io(path, e))?;
    if let Some(old) = old {
        let removed = match std::fs::symlink_metadata(&old) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&old),
            _ => std::fs::remove_file(&old),
        };
        removed.map_err(|e| ClientError::io(&old, e))?;
    }
    Ok(())
}

/// Creates the directories and symlinks of `tree` under `root` and returns the files
/// still to download. Nothing is created unless the whole Tree plans cleanly.
fn lay_out_tree(
    cas: &RemoteCas,
    root: &Path,
    tree: &reapi::Tree,
) -> Result<Vec<(Digest, PathBuf, bool)>> {
    let layout = tree_layout::plan(cas.digest_function(), tree, TreeLimits::OUTPUT)?;
    for directory in &layout.directories {
        let path = root.join(directory);
        std::fs::create_dir(&path).map_err(|e| ClientError::io(&path, e))?;
    }
    for (link, target) in &layout.symlinks {
        let path = root.join(link);
        std::os::unix::fs::symlink(target, &path).map_err(|e| ClientError::io(&path, e))?;
    }
    Ok(layout
        .files
        .into_iter()
        .map(|(path, digest, executable)| (digest, root.join(path), executable))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "",
            "../x",
            "a/../../x",
            "/etc/passwd",
            "./x",
            "a/./b",
            "a//b",
            "a/",
        ] {
            assert!(
                matches!(
                    prepare_destination(dir.path(), bad),
                    Err(ClientError::UnsafeOutputPath { .. })
                ),
                "{bad:?} was accepted"
            );
        }
        let ok = prepare_destination(dir.path(), "a/b/c.txt").unwrap();
        assert_eq!(ok, dir.path().join("a/b/c.txt"));
        assert!(dir.path().join("a/b").is_dir());
    }

    #[test]
    fn symlinks_on_the_way_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("link")).unwrap();
        let err = prepare_destination(dir.path(), "link/x").unwrap_err();
        assert!(matches!(err, ClientError::UnsafeOutputPath { .. }), "{err}");
    }
}

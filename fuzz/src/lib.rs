//! Helpers the fuzz targets share. Each target in `fuzz_targets/` checks invariants of one
//! network-facing parser; see docs/FUZZING.md.

use std::path::{Component, Path};

use kiln_store::{Digest, DigestFunction};

/// Runs a future that never waits on I/O (the targets' fetches answer from memory).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    futures::executor::block_on(future)
}

/// A stand-in digest naming node `index` of a generated tree, so that a fetch can find the
/// node again from the digest alone.
pub fn node_digest(index: usize, size: u64) -> Digest {
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&(index as u64).to_le_bytes());
    Digest::new(DigestFunction::Sha256, hash, size)
}

/// The node index `node_digest` put in `digest`.
pub fn node_index(digest: &Digest) -> usize {
    u64::from_le_bytes(digest.hash[..8].try_into().unwrap()) as usize
}

/// Panics unless `path` is relative and made of plain names only: joined to any root, it
/// stays beneath it whatever the root is.
pub fn assert_plain_relative(path: &Path) {
    assert!(
        path.components().all(|c| matches!(c, Component::Normal(_))),
        "{} is not a plain relative path",
        path.display()
    );
}

/// Panics unless `path` lies strictly beneath `root`, lexically, with no `.`/`..` left.
pub fn assert_beneath(root: &Path, path: &Path) {
    let relative = path
        .strip_prefix(root)
        .unwrap_or_else(|_| panic!("{} is outside {}", path.display(), root.display()));
    assert_plain_relative(relative);
}

/// Input split at the first `sep`: the parts before and after (or all of it, and None).
pub fn split_once(data: &[u8], sep: u8) -> (&[u8], Option<&[u8]>) {
    match data.iter().position(|&b| b == sep) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    }
}

/// Gives the owner every right on `dir` and the directories below it, not following
/// links, so that a tree unpacked with an image's modes (a 0o000 directory) can be removed.
pub fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_removable(&entry.path());
        }
    }
}

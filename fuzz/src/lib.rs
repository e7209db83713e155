//! Helpers the fuzz targets share. Each target in `fuzz_targets/` checks invariants of one
//! network-facing parser; see docs/FUZZING.md.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use arbitrary::Arbitrary;
use kiln_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
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

/// Panics unless a planned tree's paths are plain relative names (so they stay beneath
/// any root), each named once, every directory and leaf after its parent directory.
/// Returns how many paths there were.
pub fn assert_planned_tree<'a>(
    directories: &'a [PathBuf],
    leaves: impl Iterator<Item = &'a PathBuf>,
) -> usize {
    let mut seen: HashSet<&Path> = HashSet::new();
    for path in directories.iter().chain(leaves) {
        assert_plain_relative(path);
        let parent = path.parent().unwrap();
        assert!(
            parent.as_os_str().is_empty() || seen.contains(parent),
            "{} before its parent",
            path.display()
        );
        assert!(seen.insert(path), "{} twice", path.display());
    }
    seen.len()
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

/// One entry of a generated REAPI Directory message.
#[derive(Arbitrary, Debug)]
pub enum Entry {
    File {
        name: String,
        executable: bool,
    },
    Symlink {
        name: String,
        target: String,
    },
    /// A child directory, named by an index whose meaning the target gives.
    Directory {
        name: String,
        child: u8,
    },
}

/// The Directory message listing `entries`: each file's digest is `file_digest(name)`,
/// each directory's `child_digest(child)`.
pub fn directory_message(
    entries: &[Entry],
    file_digest: impl Fn(&str) -> Digest,
    child_digest: impl Fn(u8) -> Digest,
) -> Directory {
    let mut directory = Directory::default();
    for entry in entries {
        match entry {
            Entry::File { name, executable } => directory.files.push(FileNode {
                name: name.clone(),
                digest: Some(file_digest(name).to_reapi()),
                is_executable: *executable,
                ..Default::default()
            }),
            Entry::Symlink { name, target } => directory.symlinks.push(SymlinkNode {
                name: name.clone(),
                target: target.clone(),
                ..Default::default()
            }),
            Entry::Directory { name, child } => directory.directories.push(DirectoryNode {
                name: name.clone(),
                digest: Some(child_digest(*child).to_reapi()),
            }),
        }
    }
    directory
}

/// Directory messages named by the digests of their encodings, as a client stores them,
/// from `directories` (SHA-256): a child entry names a later directory of the list, or,
/// when its index points at or before its parent, a digest no message has. Encoded from
/// the last to the first, so each can name the digests of those after it; only a DAG can
/// be built. Returns the messages and their digests, in the list's order.
pub fn directory_dag(directories: &[Vec<Entry>]) -> (Vec<Directory>, Vec<Digest>) {
    use kiln_proto::prost::Message;
    const FUNCTION: DigestFunction = DigestFunction::Sha256;
    let count = directories.len();
    let mut messages = vec![Directory::default(); count];
    let mut digests = vec![Digest::of_bytes(FUNCTION, b""); count];
    for index in (0..count).rev() {
        let directory = directory_message(
            &directories[index],
            |name| Digest::of_bytes(FUNCTION, name.as_bytes()),
            |child| {
                let child = child as usize % count;
                if child > index {
                    digests[child]
                } else {
                    Digest::of_bytes(FUNCTION, &(child as u64).to_le_bytes())
                }
            },
        );
        digests[index] = Digest::of_bytes(FUNCTION, &directory.encode_to_vec());
        messages[index] = directory;
    }
    (messages, digests)
}

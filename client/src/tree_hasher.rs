//! Hashing a working tree into REAPI `Directory` protos.
//!
//! - The walk respects `.gitignore` (inside a git repository or not), `.ignore` and git's
//!   global excludes; hidden files are inputs like any other. `.git` and the root's
//!   `.kiln/` (kiln's own state) never are.
//! - Declared outputs are not inputs: they are excluded, and so is a directory that is an
//!   ancestor of an output and holds nothing else. Without that, the outputs a run
//!   downloads into the tree would change the next run's input root and defeat the cache.
//! - Directories are built bottom-up with entries sorted by name (byte order of the
//!   UTF-8 name, which is code-point order, as REAPI requires). Empty directories are
//!   kept, symlinks stay symlinks, and a file is executable when its owner-execute bit is
//!   set. Sockets, FIFOs and devices are skipped with a warning.
//! - File digests come from the [`DigestCache`] when a file's stamp is unchanged; the
//!   rest are hashed in parallel on a small thread pool.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use kiln_proto::reapi;
use kiln_store::{Digest, DigestFunction};

use crate::blob_set::{BlobSet, BlobSource};
use crate::digest_cache::{DigestCache, FileStamp};
use crate::outcomes::HashStats;
use crate::progress::Progress;
use crate::{ClientError, Result};

/// The directory under the input root where kiln keeps its own state.
pub const STATE_DIR: &str = ".kiln";

/// The most threads that hash at once; hashing is disk- or memory-bound past this.
const MAX_HASH_THREADS: usize = 8;
const READ_BUFFER: usize = 256 << 10;

#[derive(Clone, Debug)]
pub struct TreeHashOptions {
    pub function: DigestFunction,
    /// Paths relative to the root, `/`-separated, that are outputs rather than inputs.
    pub excluded_outputs: Vec<String>,
}

/// A hashed input root: its digest and every blob it references.
#[derive(Clone, Debug)]
pub struct InputTree {
    pub root: Digest,
    pub blobs: BlobSet,
    pub stats: HashStats,
}

#[derive(Default)]
struct DirNode {
    dirs: BTreeMap<String, DirNode>,
    files: BTreeMap<String, (Digest, bool)>,
    symlinks: BTreeMap<String, String>,
}

struct PendingFile {
    relative: String,
    absolute: PathBuf,
    stamp: FileStamp,
    executable: bool,
}

/// Walks and hashes `root`. Blocking: call it from `spawn_blocking` in async code.
pub fn hash_tree(
    root: &Path,
    options: &TreeHashOptions,
    cache: &mut DigestCache,
    progress: &dyn Progress,
) -> Result<InputTree> {
    let root = root.canonicalize().map_err(|e| ClientError::io(root, e))?;
    let mut tree = DirNode::default();
    let mut stats = HashStats::default();
    let mut pending = Vec::new();
    let mut known = Vec::new();

    for entry in walk(&root, &options.excluded_outputs) {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => return Err(walk_error(&root, err)),
        };
        if entry.depth() == 0 {
            continue;
        }
        let absolute = entry.path().to_path_buf();
        let relative = relative_name(&root, &absolute)?;
        let metadata = entry.metadata().map_err(|e| walk_error(&root, e))?;
        let file_type = metadata.file_type();
        let (parent, name) = split_parent(&relative);
        if file_type.is_dir() {
            stats.directories += 1;
            node_at(&mut tree, parent)
                .dirs
                .entry(name.to_string())
                .or_default();
        } else if file_type.is_symlink() {
            let target =
                std::fs::read_link(&absolute).map_err(|e| ClientError::io(&absolute, e))?;
            let target = target
                .to_str()
                .ok_or_else(|| ClientError::UnsupportedInput {
                    path: absolute.clone(),
                    reason: "symlink target is not UTF-8".into(),
                })?;
            stats.symlinks += 1;
            node_at(&mut tree, parent)
                .symlinks
                .insert(name.to_string(), target.to_string());
        } else if file_type.is_file() {
            let stamp = FileStamp::of(&metadata);
            let executable = metadata.permissions().mode() & 0o100 != 0;
            stats.files += 1;
            stats.bytes += stamp.size;
            match cache.lookup(&relative, stamp, options.function) {
                Some(digest) => {
                    stats.cached_files += 1;
                    known.push((relative, absolute, digest, executable));
                }
                None => pending.push(PendingFile {
                    relative,
                    absolute,
                    stamp,
                    executable,
                }),
            }
        } else {
            tracing::warn!(path = %absolute.display(), "skipping a special file (not a file, directory or symlink)");
        }
    }

    progress.hashing_started(
        pending.len() as u64,
        pending.iter().map(|p| p.stamp.size).sum(),
    );
    let hashed = hash_in_parallel(&pending, options.function, progress);
    for (file, digest) in pending.into_iter().zip(hashed) {
        let digest = digest?;
        stats.hashed_files += 1;
        if digest.size == file.stamp.size {
            cache.record(&file.relative, file.stamp, digest);
        }
        known.push((file.relative, file.absolute, digest, file.executable));
    }

    let mut blobs = BlobSet::new();
    for (relative, absolute, digest, executable) in known {
        let (parent, name) = split_parent(&relative);
        node_at(&mut tree, parent)
            .files
            .insert(name.to_string(), (digest, executable));
        blobs.insert(digest, BlobSource::File(absolute));
    }
    prune_output_ancestors(&mut tree, "", &output_ancestors(&options.excluded_outputs));
    let root_digest = encode_tree(&tree, options.function, &mut blobs);
    progress.hashing_finished(&stats);
    Ok(InputTree {
        root: root_digest,
        blobs,
        stats,
    })
}

fn walk(root: &Path, excluded_outputs: &[String]) -> ignore::Walk {
    let excluded: HashSet<PathBuf> = excluded_outputs.iter().map(|p| root.join(p)).collect();
    let state_dir = root.join(STATE_DIR);
    ignore::WalkBuilder::new(root)
        .hidden(false)
        .require_git(false)
        .follow_links(false)
        .filter_entry(move |entry| {
            entry.file_name() != ".git"
                && entry.path() != state_dir
                && !excluded.contains(entry.path())
        })
        .build()
}

fn walk_error(root: &Path, err: ignore::Error) -> ClientError {
    let path = match &err {
        ignore::Error::WithPath { path, .. } => path.clone(),
        _ => root.to_path_buf(),
    };
    match err.into_io_error() {
        Some(io) => ClientError::io(path, io),
        None => ClientError::UnsupportedInput {
            path,
            reason: "cannot walk the input tree".into(),
        },
    }
}

fn relative_name(root: &Path, path: &Path) -> Result<String> {
    let relative = path.strip_prefix(root).unwrap_or(path);
    let mut name = String::new();
    for component in relative.components() {
        let part = component
            .as_os_str()
            .to_str()
            .ok_or_else(|| ClientError::UnsupportedInput {
                path: path.to_path_buf(),
                reason: "file name is not UTF-8, which REAPI cannot express".into(),
            })?;
        if !name.is_empty() {
            name.push('/');
        }
        name.push_str(part);
    }
    Ok(name)
}

/// `a/b/c` → (`a/b`, `c`); `c` → (``, `c`).
fn split_parent(relative: &str) -> (&str, &str) {
    relative.rsplit_once('/').unwrap_or(("", relative))
}

fn node_at<'a>(root: &'a mut DirNode, path: &str) -> &'a mut DirNode {
    path.split('/')
        .filter(|part| !part.is_empty())
        .fold(root, |node, part| {
            node.dirs.entry(part.to_string()).or_default()
        })
}

fn hash_in_parallel(
    files: &[PendingFile],
    function: DigestFunction,
    progress: &dyn Progress,
) -> Vec<Result<Digest>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_HASH_THREADS)
        .min(files.len().max(1));
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<Result<Digest>>> = (0..files.len()).map(|_| None).collect();
    let per_thread: Vec<Vec<(usize, Result<Digest>)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    let mut buffer = vec![0u8; READ_BUFFER];
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(file) = files.get(index) else { break };
                        let digest = hash_file(&file.absolute, function, &mut buffer, progress);
                        done.push((index, digest));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("hashing threads do not panic"))
            .collect()
    });
    for (index, digest) in per_thread.into_iter().flatten() {
        results[index] = Some(digest);
    }
    results
        .into_iter()
        .map(|r| r.expect("every file was hashed by some thread"))
        .collect()
}

fn hash_file(
    path: &Path,
    function: DigestFunction,
    buffer: &mut [u8],
    progress: &dyn Progress,
) -> Result<Digest> {
    let mut file = std::fs::File::open(path).map_err(|e| ClientError::io(path, e))?;
    let mut hasher = function.hasher();
    let mut size = 0u64;
    loop {
        let n = match file.read(buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ClientError::io(path, e)),
        };
        hasher.update(&buffer[..n]);
        size += n as u64;
        progress.hashed_bytes(n as u64);
    }
    Ok(Digest::new(function, hasher.finalize(), size))
}

/// Every proper ancestor directory of every excluded output, `/`-separated.
fn output_ancestors(outputs: &[String]) -> HashSet<String> {
    let mut ancestors = HashSet::new();
    for output in outputs {
        let mut path = output.as_str();
        while let Some((parent, _)) = path.rsplit_once('/') {
            ancestors.insert(parent.to_string());
            path = parent;
        }
    }
    ancestors
}

/// Drops directories that are ancestors of outputs and hold nothing else. Returns
/// whether `node` itself ended up empty.
fn prune_output_ancestors(node: &mut DirNode, path: &str, ancestors: &HashSet<String>) -> bool {
    if !ancestors.is_empty() {
        node.dirs.retain(|name, child| {
            let child_path = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}/{name}")
            };
            let empty = prune_output_ancestors(child, &child_path, ancestors);
            !(empty && ancestors.contains(&child_path))
        });
    }
    node.dirs.is_empty() && node.files.is_empty() && node.symlinks.is_empty()
}

fn encode_tree(node: &DirNode, function: DigestFunction, blobs: &mut BlobSet) -> Digest {
    let directories = node
        .dirs
        .iter()
        .map(|(name, child)| reapi::DirectoryNode {
            name: name.clone(),
            digest: Some((encode_tree(child, function, blobs)).to_reapi()),
        })
        .collect();
    let files = node
        .files
        .iter()
        .map(|(name, (digest, executable))| reapi::FileNode {
            name: name.clone(),
            digest: Some(digest.to_reapi()),
            is_executable: *executable,
            node_properties: None,
        })
        .collect();
    let symlinks = node
        .symlinks
        .iter()
        .map(|(name, target)| reapi::SymlinkNode {
            name: name.clone(),
            target: target.clone(),
            node_properties: None,
        })
        .collect();
    let directory = reapi::Directory {
        files,
        directories,
        symlinks,
        node_properties: None,
    };
    blobs.add_bytes(
        function,
        Bytes::from(prost::Message::encode_to_vec(&directory)),
    )
}

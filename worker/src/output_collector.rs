//! Collecting an action's outputs into ActionResult fields and the blobs to upload, and
//! refusing any output path that leads out of the action's directory.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use kiln_client::BlobSource;
use kiln_proto::prost::Message;
use kiln_proto::reapi;
use kiln_store::{Digest, DigestFunction};

use crate::WorkerError;

/// The outputs of one action, ready to upload.
#[derive(Debug, Default)]
pub struct CollectedOutputs {
    pub output_files: Vec<reapi::OutputFile>,
    pub output_directories: Vec<reapi::OutputDirectory>,
    pub output_symlinks: Vec<reapi::OutputSymlink>,
    /// Every blob the fields above refer to (files, Trees and their Directory messages).
    pub blobs: Vec<(Digest, BlobSource)>,
}

/// Which kind of output the Command asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Requested {
    /// REAPI 2.0 `output_files`: a file; symlinks are followed.
    File,
    /// REAPI 2.0 `output_directories`: a directory; symlinks are followed.
    Directory,
    /// REAPI 2.1 `output_paths`: whatever is there; symlinks are reported as symlinks.
    Path,
}

/// Lexically normalises `relative` under `base`: `.` is dropped, `..` pops. Fails when the
/// path is absolute or climbs out of `base`.
fn join_inside(base: &Path, relative: &str) -> Result<PathBuf, String> {
    if relative.starts_with('/') {
        return Err("it is absolute".into());
    }
    let mut depth = 0usize;
    let mut joined = base.to_path_buf();
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(part) => {
                joined.push(part);
                depth += 1;
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return Err("its `..` leads out of the action directory".into());
                }
                joined.pop();
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return Err("it is absolute".into()),
        }
    }
    Ok(joined)
}

/// Where output `path` (relative to the working directory) lies, lexically.
pub(crate) fn output_location(
    exec_root: &Path,
    working_directory: &str,
    path: &str,
) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("it is empty".into());
    }
    if path.starts_with('/') {
        return Err("it is absolute".into());
    }
    if working_directory.is_empty() {
        join_inside(exec_root, path)
    } else {
        join_inside(exec_root, &format!("{working_directory}/{path}"))
    }
}

/// Resolves the working directory and every output path of `command` lexically, before
/// the command runs, rejecting absolute paths and `..` escapes. Returns the working
/// directory.
pub fn check_paths(exec_root: &Path, command: &reapi::Command) -> Result<PathBuf, WorkerError> {
    let working_dir = join_inside(exec_root, &command.working_directory).map_err(|reason| {
        WorkerError::OutputPathEscapes {
            path: command.working_directory.clone(),
            reason: format!("the working directory is invalid: {reason}"),
        }
    })?;
    for (path, _) in requested_paths(command) {
        let full = output_location(exec_root, &command.working_directory, path)
            .map_err(|reason| escape(path, reason))?;
        if full == exec_root {
            return Err(escape(path, "it names the action directory itself".into()));
        }
    }
    Ok(working_dir)
}

/// Creates the parent directories of every output, as REAPI asks of the worker.
pub fn create_output_parents(
    exec_root: &Path,
    command: &reapi::Command,
) -> Result<(), WorkerError> {
    let working_dir = check_paths(exec_root, command)?;
    create_dirs_beneath(exec_root, &working_dir, "the working directory")?;
    for (path, _) in requested_paths(command) {
        let full = output_location(exec_root, &command.working_directory, path)
            .map_err(|reason| escape(path, reason))?;
        if let Some(parent) = full.parent() {
            create_dirs_beneath(exec_root, parent, &format!("output {path:?}"))?;
        }
    }
    Ok(())
}

/// Creates `dir` and its missing parents below `root`, one component at a time, refusing
/// to follow a symlink: the input tree may place one (`out -> /etc`), and the worker,
/// which creates these directories with its own rights, must never create anything
/// outside the action's directory. Nothing runs in the directory yet, so nothing can swap
/// a component between the check and the creation.
fn create_dirs_beneath(root: &Path, dir: &Path, what: &str) -> Result<(), WorkerError> {
    let relative = dir
        .strip_prefix(root)
        .map_err(|_| WorkerError::InvalidAction(format!("{what} is outside the input root")))?;
    let mut current = root.to_path_buf();
    for component in relative.components() {
        current.push(component);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(WorkerError::InvalidAction(format!(
                    "{what}: {} is a symlink in the input tree; an output's parent directory \
                     must be a real directory",
                    current.strip_prefix(root).unwrap_or(&current).display()
                )))
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(WorkerError::InvalidAction(format!(
                    "{what}: {} is a file, not a directory",
                    current.strip_prefix(root).unwrap_or(&current).display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&current)
                    .map_err(WorkerError::io(format!("creating the directory of {what}")))?;
            }
            Err(e) => {
                return Err(WorkerError::io(format!(
                    "looking at the directory of {what}"
                ))(e))
            }
        }
    }
    Ok(())
}

/// Whether `command` names any output at all (most test and no-op actions do not).
pub fn wants_outputs(command: &reapi::Command) -> bool {
    !requested_paths(command).is_empty()
}

// Bazel before 3.x sends only the REAPI 2.0 fields, so they must still be read.
#[allow(deprecated)]
fn requested_paths(command: &reapi::Command) -> Vec<(&str, Requested)> {
    // REAPI 2.1: output_paths, when present, supersedes output_files and output_directories.
    if !command.output_paths.is_empty() {
        return command
            .output_paths
            .iter()
            .map(|p| (p.as_str(), Requested::Path))
            .collect();
    }
    let files = command
        .output_files
        .iter()
        .map(|p| (p.as_str(), Requested::File));
    let dirs = command
        .output_directories
        .iter()
        .map(|p| (p.as_str(), Requested::Directory));
    files.chain(dirs).collect()
}

fn escape(path: &str, reason: String) -> WorkerError {
    WorkerError::OutputPathEscapes {
        path: path.to_string(),
        reason,
    }
}

/// Collects the outputs `command` names from `exec_root` after the command ran. Outputs
/// the command did not create are left out, as REAPI specifies.
pub fn collect(
    function: DigestFunction,
    exec_root: &Path,
    command: &reapi::Command,
) -> Result<CollectedOutputs, WorkerError> {
    check_paths(exec_root, command)?;
    let root = exec_root
        .canonicalize()
        .map_err(WorkerError::io("resolving the action directory"))?;
    let collector = Collector { function, root };
    let mut outputs = CollectedOutputs::default();
    for (path, requested) in requested_paths(command) {
        let full = output_location(exec_root, &command.working_directory, path)
            .map_err(|reason| escape(path, reason))?;
        collector.collect_one(path, &full, requested, &mut outputs)?;
    }
    Ok(outputs)
}

struct Collector {
    function: DigestFunction,
    /// The canonical action directory; nothing may resolve outside it.
    root: PathBuf,
}

impl Collector {
    fn collect_one(
        &self,
        path: &str,
        full: &Path,
        requested: Requested,
        outputs: &mut CollectedOutputs,
    ) -> Result<(), WorkerError> {
        // A symlinked parent (`out -> /etc`) would make `out/passwd` a host file.
        if let Some(parent) = full.parent() {
            match parent.canonicalize() {
                Ok(real) if !real.starts_with(&self.root) => {
                    return Err(escape(
                        path,
                        format!("a parent directory resolves to {}", real.display()),
                    ));
                }
                Ok(_) => {}
                Err(_) => return Ok(()), // the parent is gone, so is the output
            }
        }
        let metadata = match std::fs::symlink_metadata(full) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(WorkerError::io(format!("inspecting output {path:?}"))(e)),
        };
        if metadata.file_type().is_symlink() {
            let target = self.check_symlink(path, full)?;
            if requested == Requested::Path {
                outputs.output_symlinks.push(reapi::OutputSymlink {
                    path: path.to_string(),
                    target,
                    node_properties: None,
                });
                return Ok(());
            }
        }
        // Follows a symlink, which check_symlink has confined to the action directory.
        let metadata = match std::fs::metadata(full) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(WorkerError::io(format!("inspecting output {path:?}"))(e)),
        };
        if metadata.is_dir() {
            if requested == Requested::File {
                return Err(WorkerError::OutputWrongType {
                    path: path.to_string(),
                    expected: "a file",
                });
            }
            let mut tree = TreeBuilder::default();
            let root = self.directory(full, &mut tree, outputs)?;
            let root_digest = self.store_message(&root, outputs);
            let tree_message = reapi::Tree {
                root: Some(root),
                children: tree.children.into_values().collect(),
            };
            let tree_digest = self.store_message(&tree_message, outputs);
            outputs.output_directories.push(reapi::OutputDirectory {
                path: path.to_string(),
                tree_digest: Some(tree_digest.to_reapi()),
                is_topologically_sorted: false,
                root_directory_digest: Some(root_digest.to_reapi()),
            });
        } else if metadata.is_file() {
            if requested == Requested::Directory {
                return Err(WorkerError::OutputWrongType {
                    path: path.to_string(),
                    expected: "a directory",
                });
            }
            let (digest, is_executable) = self.file(full, &metadata, outputs)?;
            outputs.output_files.push(reapi::OutputFile {
                path: path.to_string(),
                digest: Some(digest.to_reapi()),
                is_executable,
                contents: Vec::new(),
                node_properties: None,
            });
        }
        // Sockets, fifos and devices are not outputs REAPI can express; leave them out.
        Ok(())
    }

    /// Returns the target of the symlink at `full` after checking that it resolves inside
    /// the action directory (lexically for a dangling link, really for an existing one).
    fn check_symlink(&self, path: &str, full: &Path) -> Result<String, WorkerError> {
        let target = std::fs::read_link(full)
            .map_err(WorkerError::io(format!("reading symlink {path:?}")))?;
        let target_text = target
            .to_str()
            .ok_or_else(|| escape(path, "its symlink target is not UTF-8".into()))?
            .to_string();
        if target.is_absolute() {
            return Err(escape(
                path,
                format!("it is a symlink to the absolute path {target_text:?}"),
            ));
        }
        let link_dir = full.parent().unwrap_or(&self.root);
        let link_dir = link_dir
            .canonicalize()
            .unwrap_or_else(|_| link_dir.to_path_buf());
        let relative_dir = link_dir
            .strip_prefix(&self.root)
            .map_err(|_| escape(path, "the symlink lies outside the action directory".into()))?;
        let relative_dir = relative_dir.to_str().unwrap_or_default();
        let lexical = format!("{relative_dir}/{target_text}");
        join_inside(&self.root, lexical.trim_start_matches('/')).map_err(|_| {
            escape(
                path,
                format!("it is a symlink to {target_text:?}, outside the action directory"),
            )
        })?;
        if let Ok(real) = full.canonicalize() {
            if !real.starts_with(&self.root) {
                return Err(escape(
                    path,
                    format!("it is a symlink that resolves to {}", real.display()),
                ));
            }
        }
        Ok(target_text)
    }

    fn file(
        &self,
        full: &Path,
        metadata: &std::fs::Metadata,
        outputs: &mut CollectedOutputs,
    ) -> Result<(Digest, bool), WorkerError> {
        let digest = hash_file(self.function, full)?;
        outputs
            .blobs
            .push((digest, BlobSource::File(full.to_path_buf())));
        Ok((digest, metadata.permissions().mode() & 0o111 != 0))
    }

    fn directory(
        &self,
        dir: &Path,
        tree: &mut TreeBuilder,
        outputs: &mut CollectedOutputs,
    ) -> Result<reapi::Directory, WorkerError> {
        let mut entries: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(WorkerError::io(format!(
            "listing output directory {}",
            dir.display()
        )))? {
            let entry = entry.map_err(WorkerError::io("listing an output directory"))?;
            let name = entry.file_name().into_string().map_err(|name| {
                escape(
                    &dir.display().to_string(),
                    format!("{name:?} is not a UTF-8 name"),
                )
            })?;
            entries.push((name, entry.path()));
        }
        // REAPI's canonical form: every node list sorted by name.
        entries.sort();
        let mut directory = reapi::Directory::default();
        for (name, path) in entries {
            let metadata = std::fs::symlink_metadata(&path)
                .map_err(WorkerError::io(format!("inspecting {}", path.display())))?;
            let file_type = metadata.file_type();
            if file_type.is_symlink() {
                let display = path
                    .strip_prefix(&self.root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                let target = self.check_symlink(&display, &path)?;
                directory.symlinks.push(reapi::SymlinkNode {
                    name,
                    target,
                    node_properties: None,
                });
            } else if file_type.is_dir() {
                let child = self.directory(&path, tree, outputs)?;
                let digest = self.store_message(&child, outputs);
                tree.children.insert(digest, child);
                directory.directories.push(reapi::DirectoryNode {
                    name,
                    digest: Some(digest.to_reapi()),
                });
            } else if file_type.is_file() {
                let (digest, is_executable) = self.file(&path, &metadata, outputs)?;
                directory.files.push(reapi::FileNode {
                    name,
                    digest: Some(digest.to_reapi()),
                    is_executable,
                    node_properties: None,
                });
            }
        }
        Ok(directory)
    }

    fn store_message(&self, message: &impl Message, outputs: &mut CollectedOutputs) -> Digest {
        let bytes = message.encode_to_vec();
        let digest = Digest::of_bytes(self.function, &bytes);
        outputs
            .blobs
            .push((digest, BlobSource::Bytes(bytes.into())));
        digest
    }
}

/// The distinct child directories of a Tree, keyed by digest.
#[derive(Default)]
struct TreeBuilder {
    children: BTreeMap<Digest, reapi::Directory>,
}

/// Hashes a file by streaming it.
pub fn hash_file(function: DigestFunction, path: &Path) -> Result<Digest, WorkerError> {
    let file = std::fs::File::open(path)
        .map_err(WorkerError::io(format!("opening {}", path.display())))?;
    hash_reader(function, file).map_err(WorkerError::io(format!("reading {}", path.display())))
}

/// Hashes everything `reader` yields.
pub fn hash_reader(function: DigestFunction, mut reader: impl Read) -> std::io::Result<Digest> {
    let mut hasher = function.hasher();
    let mut buffer = vec![0u8; 64 << 10];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok(Digest::new(function, hasher.finalize(), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_joins_stay_inside() {
        let base = Path::new("/r");
        assert_eq!(
            join_inside(base, "a/./b/../c").unwrap(),
            Path::new("/r/a/c")
        );
        assert!(join_inside(base, "../x").is_err());
        assert!(join_inside(base, "a/../../x").is_err());
        assert!(join_inside(base, "/etc/passwd").is_err());
        assert_eq!(join_inside(base, "").unwrap(), Path::new("/r"));
    }
}

//! Unpacking an image's layers into a root filesystem, in order, as OCI's image spec
//! says: each layer is a tar (plain, gzip or zstd) applied on top of the ones before,
//! where `.wh.NAME` removes NAME from the lower layers and `.wh..wh..opq` empties its
//! directory of what the lower layers put there.
//!
//! An image is anyone's upload, so unpacking trusts nothing in it: paths stay inside the
//! root (the `tar` crate refuses `..` and writes through no symlink), device nodes and
//! FIFOs are skipped (the sandbox has its own `/dev`), setuid and setgid bits are dropped
//! (the root sits on the worker's disk, owned by the worker), and the bytes written and
//! the entries made are counted against limits (a layer of empty entries compresses to
//! almost nothing, yet each costs an inode and memory here).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// What went wrong unpacking; the caller names the image.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("the unpacked image is larger than the image cache's {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the image has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("layer {layer}: {source}")]
    Layer {
        layer: usize,
        #[source]
        source: std::io::Error,
    },
}

/// The most an image may unpack to.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of regular files.
    pub bytes: u64,
    /// Entries of every kind, whiteouts included, over all layers.
    pub entries: u64,
}

/// Entries per image: as many paths as an input tree may have (`ACTION_TREE_LIMITS`).
pub const MAX_ENTRIES: u64 = 1_000_000;

/// What has been unpacked so far.
#[derive(Default)]
struct Unpacked {
    bytes: u64,
    entries: u64,
}

/// Applies `layers` (open files, lowest first) to `root`; returns the bytes of the
/// regular files written.
pub fn unpack_layers(root: &Path, layers: Vec<File>, limits: Limits) -> Result<u64, UnpackError> {
    let mut unpacked = Unpacked::default();
    for (index, layer) in layers.into_iter().enumerate() {
        let layer_error = |source| UnpackError::Layer {
            layer: index,
            source,
        };
        let reader = decompressed(layer).map_err(layer_error)?;
        apply_layer(root, reader, &mut unpacked, limits).map_err(|e| match e {
            ApplyError::TooLarge => UnpackError::TooLarge {
                limit: limits.bytes,
            },
            ApplyError::TooManyEntries => UnpackError::TooManyEntries {
                limit: limits.entries,
            },
            ApplyError::Io(source) => layer_error(source),
        })?;
    }
    Ok(unpacked.bytes)
}

enum ApplyError {
    TooLarge,
    TooManyEntries,
    Io(std::io::Error),
}

impl From<std::io::Error> for ApplyError {
    fn from(e: std::io::Error) -> Self {
        ApplyError::Io(e)
    }
}

/// The layer's tar stream, whatever its compression: told apart by magic bytes, since
/// media types vary between registries and tools (docker's, OCI's, none).
fn decompressed(mut layer: File) -> std::io::Result<Box<dyn Read>> {
    let mut magic = [0u8; 4];
    let read = layer.read(&mut magic)?;
    layer.rewind()?;
    let buffered = BufReader::with_capacity(1 << 20, layer);
    Ok(match &magic[..read] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::Decoder::with_buffer(buffered)?),
        _ => Box::new(buffered),
    })
}

fn apply_layer(
    root: &Path,
    reader: Box<dyn Read>,
    unpacked: &mut Unpacked,
    limits: Limits,
) -> Result<(), ApplyError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    // What this layer itself put in place: an opaque whiteout hides the lower layers'
    // entries only, wherever in the layer it comes.
    let mut added: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        unpacked.entries += 1;
        if unpacked.entries > limits.entries {
            return Err(ApplyError::TooManyEntries);
        }
        let Some(path) = relative_path(&entry.path()?) else {
            continue;
        };
        // Everything below resolves paths in the root from the worker: through a link a
        // lower layer planted, it could reach the host.
        refuse_links_above(root, &path)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parent = path.parent().unwrap_or(Path::new(""));
        if name == OPAQUE_WHITEOUT {
            empty_lower(&root.join(parent), parent, &added)?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            // `.wh.`, `.wh..` and `.wh...` would name the directory itself or its parent
            // (at the top, the root or the directory holding it): nothing a lower layer
            // made, so they remove nothing.
            if !matches!(hidden, "" | "." | "..") {
                remove_any(&root.join(parent).join(hidden))?;
            }
            continue;
        }
        match entry.header().entry_type() {
            EntryType::Block | EntryType::Char | EntryType::Fifo => continue,
            EntryType::Regular | EntryType::Continuous => {
                unpacked.bytes = unpacked.bytes.saturating_add(entry.size());
                if unpacked.bytes > limits.bytes {
                    return Err(ApplyError::TooLarge);
                }
            }
            _ => {}
        }
        // A file replacing a directory of a lower layer (or the reverse) replaces it whole.
        let target = root.join(&path);
        if let Ok(existing) = std::fs::symlink_metadata(&target) {
            let directory_over_directory =
                existing.is_dir() && entry.header().entry_type() == EntryType::Directory;
            if !directory_over_directory {
                remove_any(&target)?;
            }
        }
        entry.unpack_in(root)?;
        drop_special_bits(&target, entry.header().entry_type())?;
        added.insert(path);
    }
    Ok(())
}

/// `path` as a relative path of normal components (leading `/` and `./` removed), or
/// none for the root itself or a path that climbs (`unpack_in` would refuse it too).
fn relative_path(path: &Path) -> Option<PathBuf> {
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!relative.as_os_str().is_empty()).then_some(relative)
}

/// Fails when a directory above `path` in `root` is a symbolic link.
fn refuse_links_above(root: &Path, path: &Path) -> std::io::Result<()> {
    let mut current = root.to_path_buf();
    let mut components = path.components().peekable();
    while let Some(component) = components.next() {
        if components.peek().is_none() {
            break;
        }
        current.push(component);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} lies under a symbolic link", path.display()),
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes what lower layers put in `dir` (`relative` to the root), keeping what this
/// layer added.
fn empty_lower(dir: &Path, relative: &Path, added: &HashSet<PathBuf>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if !added.contains(&relative.join(entry.file_name())) {
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}

/// Removes a file, link or whole directory, if there.
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Clears setuid and setgid on what was just unpacked (never on a link's target).
fn drop_special_bits(path: &Path, kind: EntryType) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if kind == EntryType::Symlink {
        return Ok(());
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mode = meta.permissions().mode();
    if mode & 0o6000 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o6000))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer holding `entries`: (path, Some(contents)) for a file, None for a directory.
    fn layer(dir: &Path, name: &str, entries: &[(&str, Option<&str>)]) -> File {
        let path = dir.join(name);
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        for (entry_path, contents) in entries {
            let mut header = tar::Header::new_gnu();
            match contents {
                Some(text) => {
                    header.set_entry_type(EntryType::Regular);
                    header.set_size(text.len() as u64);
                    header.set_mode(0o4755);
                    builder
                        .append_data(&mut header, entry_path, text.as_bytes())
                        .unwrap();
                }
                None => {
                    header.set_entry_type(EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    builder
                        .append_data(&mut header, entry_path, std::io::empty())
                        .unwrap();
                }
            }
        }
        builder.into_inner().unwrap();
        File::open(path).unwrap()
    }

    #[test]
    fn whiteouts_remove_and_opaque_directories_hide_only_lower_layers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let lower = layer(
            dir.path(),
            "lower.tar",
            &[
                ("etc", None),
                ("etc/keep", Some("lower")),
                ("etc/gone", Some("lower")),
                ("opt", None),
                ("opt/old", Some("lower")),
            ],
        );
        let upper = layer(
            dir.path(),
            "upper.tar",
            &[
                ("etc/.wh.gone", Some("")),
                ("opt/new", Some("upper")),
                ("opt/.wh..wh..opq", Some("")),
                ("etc/keep", Some("upper")),
            ],
        );
        let written = unpack_layers(&root, vec![lower, upper], limits(1 << 20)).unwrap();
        assert_eq!(written, 5 * 5);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/keep")).unwrap(),
            "upper"
        );
        assert!(!root.join("etc/gone").exists());
        assert!(
            !root.join("opt/old").exists(),
            "the opaque directory hides the lower layer"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("opt/new")).unwrap(),
            "upper"
        );
        assert!(!root.join("etc/.wh.gone").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("opt/new"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755, "setuid dropped");
    }

    #[test]
    fn whiteouts_of_dot_and_dot_dot_remove_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("beside-the-root"), "kept").unwrap();
        let lower = layer(dir.path(), "lower.tar", &[("a/", None), ("a/f", Some("x"))]);
        // Found by fuzz/layer_unpack: `/.wh...` removed the directory holding the root.
        let upper = layer(
            dir.path(),
            "upper.tar",
            &[
                (".wh...", Some("")),
                (".wh..", Some("")),
                (".wh.", Some("")),
                ("a/.wh...", Some("")),
                ("a/.wh..", Some("")),
            ],
        );
        unpack_layers(&root, vec![lower, upper], limits(1 << 20)).unwrap();
        assert!(dir.path().join("beside-the-root").exists());
        assert_eq!(std::fs::read_to_string(root.join("a/f")).unwrap(), "x");
    }

    #[test]
    fn an_image_past_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let big = "x".repeat(4096);
        let layer = layer(
            dir.path(),
            "big.tar",
            &[("a", Some(&big)), ("b", Some(&big))],
        );
        let refused = unpack_layers(&root, vec![layer], limits(6000));
        assert!(
            matches!(refused, Err(UnpackError::TooLarge { limit: 6000 })),
            "{refused:?}"
        );
    }

    #[test]
    fn an_entry_under_a_lower_layers_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), "host").unwrap();
        let path = dir.path().join("link.tar");
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(EntryType::Symlink);
        header.set_size(0);
        builder
            .append_link(&mut header, "escape", &outside)
            .unwrap();
        builder.into_inner().unwrap();
        let upper = layer(dir.path(), "upper.tar", &[("escape/.wh.victim", Some(""))]);
        std::fs::create_dir(&root).unwrap();
        let refused = unpack_layers(
            &root,
            vec![File::open(&path).unwrap(), upper],
            limits(1 << 20),
        );
        assert!(refused.is_err());
        assert_eq!(
            std::fs::read_to_string(outside.join("victim")).unwrap(),
            "host"
        );
    }

    fn limits(bytes: u64) -> Limits {
        Limits {
            bytes,
            entries: MAX_ENTRIES,
        }
    }

    #[test]
    fn an_image_of_too_many_entries_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let lower = layer(dir.path(), "lower.tar", &[("a", None), ("b", None)]);
        let upper = layer(dir.path(), "upper.tar", &[("c", Some(""))]);
        let limits = Limits {
            bytes: 1 << 20,
            entries: 2,
        };
        let refused = unpack_layers(&root, vec![lower, upper], limits);
        assert!(
            matches!(refused, Err(UnpackError::TooManyEntries { limit: 2 })),
            "{refused:?}"
        );
    }

    #[test]
    fn paths_that_climb_out_are_skipped() {
        assert_eq!(relative_path(Path::new("../etc/passwd")), None);
        assert_eq!(relative_path(Path::new("/")), None);
        assert_eq!(
            relative_path(Path::new("./usr/bin/sh")),
            Some(PathBuf::from("usr/bin/sh"))
        );
    }
}

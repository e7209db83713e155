//! Reproducible image layers: a directory becomes a tar stream whose bytes depend only on
//! the content, never on mtimes, owners, umask or the order the filesystem lists entries.
//!
//! The tar is compressed as it is written, and both digests — the compressed blob's (the
//! layer digest) and the uncompressed tar's (the diff_id) — are computed on the way to a
//! temporary file, so a layer is never held in memory.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_store::{ContentHash, DigestFunction, Hasher};

use crate::error::{PublishError, Result};

/// How a layer's tar stream is compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// tar+gzip: what every client pulls, docker 20.10 included.
    #[default]
    Gzip,
    /// tar+zstd: smaller and faster, but docker 20.10 cannot pull it.
    Zstd,
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = PublishError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            other => Err(PublishError::Option(format!(
                "unknown compression {other:?} (expected gzip or zstd)"
            ))),
        }
    }
}

/// A built layer, kept in a temporary file that disappears when this is dropped.
#[derive(Debug)]
pub struct LayerBlob {
    file: tempfile::NamedTempFile,
    /// SHA-256 of the compressed bytes: the layer's name in the registry.
    pub digest: ContentHash,
    /// Size of the compressed bytes.
    pub size: u64,
    /// SHA-256 of the uncompressed tar: the image config's rootfs diff_id.
    pub diff_id: ContentHash,
    pub compression: Compression,
    /// How many tar entries (files, directories, symlinks) the layer holds.
    pub entries: usize,
}

impl LayerBlob {
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn media_type(&self) -> &'static str {
        self.compression.media_type()
    }
}

/// Builds a reproducible layer from everything under `root`.
///
/// Entries are sorted by name (parents first), carry `mtime` as their modification time,
/// uid/gid 0 with empty user and group names, and mode 0755 (directories and files with
/// any execute bit) or 0644; symlinks are kept as links. Devices, fifos and sockets are
/// left out: they cannot be shipped in an image meaningfully. This blocks; call it from
/// `spawn_blocking` in async code.
pub fn build_layer(root: &Path, compression: Compression, mtime: u64) -> Result<LayerBlob> {
    let metadata =
        fs::metadata(root).map_err(|e| PublishError::io(root.display().to_string(), e))?;
    if !metadata.is_dir() {
        return Err(PublishError::Source {
            path: root.to_path_buf(),
            reason: "is not a directory".into(),
        });
    }
    let file = tempfile::Builder::new()
        .prefix("kiln-layer-")
        .tempfile()
        .map_err(|e| PublishError::io("creating a temporary layer file", e))?;
    let writer = io::BufWriter::new(
        file.reopen()
            .map_err(|e| PublishError::io("opening the temporary layer file", e))?,
    );
    let compressed = HashingWriter::new(writer);
    let (tar_hash, compressed) = match compression {
        Compression::Gzip => {
            // No file name and mtime 0 in the gzip header: it must not vary between runs.
            let encoder = flate2::GzBuilder::new()
                .mtime(0)
                .write(compressed, flate2::Compression::default());
            let (tar_hash, encoder) = write_tar(root, mtime, encoder)?;
            let compressed = encoder
                .finish()
                .map_err(|e| PublishError::io("compressing the layer", e))?;
            (tar_hash, compressed)
        }
        Compression::Zstd => {
            let encoder = zstd::stream::write::Encoder::new(compressed, 3)
                .map_err(|e| PublishError::io("starting zstd", e))?;
            let (tar_hash, encoder) = write_tar(root, mtime, encoder)?;
            let compressed = encoder
                .finish()
                .map_err(|e| PublishError::io("compressing the layer", e))?;
            (tar_hash, compressed)
        }
    };
    let (digest, size, mut writer) = compressed.finish();
    writer
        .flush()
        .and_then(|()| writer.get_ref().sync_all())
        .map_err(|e| PublishError::io("writing the temporary layer file", e))?;
    Ok(LayerBlob {
        file,
        digest,
        size,
        diff_id: tar_hash.digest,
        compression,
        entries: tar_hash.entries,
    })
}

struct TarSummary {
    digest: ContentHash,
    entries: usize,
}

/// Writes the tar stream of `root` into `out`, hashing it on the way.
fn write_tar<W: Write>(root: &Path, mtime: u64, out: W) -> Result<(TarSummary, W)> {
    let mut builder = tar::Builder::new(HashingWriter::new(out));
    let mut entries = Vec::new();
    collect_entries(root, Path::new(""), &mut entries)?;
    for entry in &entries {
        append_entry(&mut builder, root, entry, mtime)?;
    }
    let hashed = builder
        .into_inner()
        .map_err(|e| PublishError::io("finishing the tar stream", e))?;
    let (digest, _, out) = hashed.finish();
    Ok((
        TarSummary {
            digest,
            entries: entries.len(),
        },
        out,
    ))
}

enum EntryKind {
    Directory,
    File { size: u64, executable: bool },
    Symlink { target: PathBuf },
}

struct Entry {
    /// Relative to the layer root.
    path: PathBuf,
    kind: EntryKind,
}

/// Depth-first, each directory's children sorted by their bytes, so parents precede
/// children and the order never depends on the filesystem.
fn collect_entries(root: &Path, relative: &Path, out: &mut Vec<Entry>) -> Result<()> {
    let dir = root.join(relative);
    let mut names = fs::read_dir(&dir)
        .map_err(|e| PublishError::io(format!("listing {}", dir.display()), e))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| PublishError::io(format!("listing {}", dir.display()), e))?;
    names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    for name in names {
        let path = relative.join(&name);
        let full = root.join(&path);
        let metadata = fs::symlink_metadata(&full)
            .map_err(|e| PublishError::io(full.display().to_string(), e))?;
        let file_type = metadata.file_type();
        if file_type.is_symlink() {
            let target = fs::read_link(&full)
                .map_err(|e| PublishError::io(format!("reading link {}", full.display()), e))?;
            out.push(Entry {
                path,
                kind: EntryKind::Symlink { target },
            });
        } else if file_type.is_dir() {
            out.push(Entry {
                path: path.clone(),
                kind: EntryKind::Directory,
            });
            collect_entries(root, &path, out)?;
        } else if file_type.is_file() {
            out.push(Entry {
                path,
                kind: EntryKind::File {
                    size: metadata.len(),
                    executable: metadata.permissions().mode() & 0o111 != 0,
                },
            });
        } else {
            tracing::warn!(path = %full.display(), "leaving a device, fifo or socket out of the layer");
        }
    }
    Ok(())
}

fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    entry: &Entry,
    mtime: u64,
) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    let full = root.join(&entry.path);
    let context = || format!("archiving {}", full.display());
    match &entry.kind {
        EntryKind::Directory => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder
                .append_data(&mut header, &entry.path, io::empty())
                .map_err(|e| PublishError::io(context(), e))
        }
        EntryKind::File { size, executable } => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if *executable { 0o755 } else { 0o644 });
            header.set_size(*size);
            let file = fs::File::open(&full).map_err(|e| PublishError::io(context(), e))?;
            let reader = ExactReader {
                inner: file.take(*size),
                remaining: *size,
            };
            builder
                .append_data(&mut header, &entry.path, reader)
                .map_err(|e| PublishError::io(context(), e))
        }
        EntryKind::Symlink { target } => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            builder
                .append_link(&mut header, &entry.path, target)
                .map_err(|e| PublishError::io(context(), e))
        }
    }
}

/// Reads exactly the size announced in the tar header; a file that shrank while being
/// archived is an error rather than a corrupt archive.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while it was being archived",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Passes bytes through while computing their SHA-256 and counting them.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    bytes: u64,
}

impl<W> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            // SHA-256, not BLAKE3: every OCI client verifies layers and diff_ids with it.
            hasher: DigestFunction::Sha256.hasher(),
            bytes: 0,
        }
    }

    /// Returns the SHA-256 of what was written, the byte count and the inner writer.
    pub(crate) fn finish(self) -> (ContentHash, u64, W) {
        let digest = ContentHash {
            function: self.hasher.function(),
            bytes: self.hasher.finalize(),
        };
        (digest, self.bytes, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The SHA-256 of a byte string: manifests and configs are named this way.
pub(crate) fn sha256_digest(bytes: &[u8]) -> ContentHash {
    content_hash_of(DigestFunction::Sha256, bytes)
}

/// The hash of a byte string under `function`.
pub(crate) fn content_hash_of(function: DigestFunction, bytes: &[u8]) -> ContentHash {
    kiln_store::Digest::of_bytes(function, bytes).content_hash()
}

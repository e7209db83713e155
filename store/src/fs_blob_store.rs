//! The filesystem blob store: one file per blob under `blobs/<function>/<2 hex>/<hex>`.
//!
//! Writes go to a temp file (or a named upload file) under the same root, are hashed as
//! they stream, then fsynced and renamed into place, so a crash never leaves a partial
//! blob visible. An in-memory index of present blobs answers existence checks without a
//! syscall per digest (FindMissingBlobs asks about thousands at a time).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::blob_store::{
    check_upload_id, read_all_streamed, read_len, BlobInfo, BlobStore, BlobWriter, ChunkStream,
};
use crate::{ContentHash, Digest, DigestFunction, Result, StoreError};

/// Reads and writes move through memory in pieces of this size: large enough that the
/// per-piece cost of a blocking-pool hop vanishes, small enough to keep memory flat.
pub(crate) const IO_CHUNK: usize = 1 << 20;
/// Blobs up to this size are read without the blocking pool (see `read_all`).
const SMALL_READ_BYTES: u64 = 64 << 10;

#[derive(Clone)]
pub struct FsBlobStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// Keyed by a randomly seeded fast hasher: FindMissingBlobs probes it 10,000 times a
    /// call, and the seed keeps clients from choosing blobs that collide.
    index: DashMap<ContentHash, u64, foldhash::fast::RandomState>,
    stored_bytes: AtomicU64,
    /// One writer at a time per resumable upload, including a dropped writer's last append.
    upload_locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

impl FsBlobStore {
    /// Opens (creating if needed) a store rooted at `root` and indexes what it holds.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for dir in ["blobs", "tmp", "uploads"] {
            fs::create_dir_all(root.join(dir))?;
        }
        // Temp files belong to writes that died with the previous process.
        for entry in fs::read_dir(root.join("tmp"))? {
            let _ = fs::remove_file(entry?.path());
        }
        let inner = Inner {
            root,
            index: DashMap::default(),
            stored_bytes: AtomicU64::new(0),
            upload_locks: DashMap::new(),
        };
        for info in scan_blobs(&inner.root)? {
            inner.add_to_index(info.hash, info.size);
        }
        tracing::debug!(blobs = inner.index.len(), bytes = inner.stored_bytes.load(Ordering::Relaxed), root = %inner.root.display(), "blob store opened");
        Ok(FsBlobStore {
            inner: Arc::new(inner),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where a blob lives on disk (for hardlinking into action directories).
    pub fn blob_path(&self, hash: &ContentHash) -> PathBuf {
        self.inner.blob_path(hash)
    }
}

impl Inner {
    fn blob_path(&self, hash: &ContentHash) -> PathBuf {
        let hex = hash.hex();
        self.root
            .join("blobs")
            .join(hash.function.name())
            .join(&hex[..2])
            .join(hex)
    }

    fn upload_path(&self, upload_id: &str) -> PathBuf {
        self.root.join("uploads").join(upload_id)
    }

    fn add_to_index(&self, hash: ContentHash, size: u64) {
        if self.index.insert(hash, size).is_none() {
            self.stored_bytes.fetch_add(size, Ordering::Relaxed);
        }
    }

    fn size_of(&self, hash: &ContentHash) -> Option<u64> {
        if hash.is_empty_blob() {
            return Some(0);
        }
        self.index.get(hash).map(|size| *size)
    }
}

fn scan_blobs(root: &Path) -> io::Result<Vec<BlobInfo>> {
    let mut found = Vec::new();
    for function in DigestFunction::ALL {
        let function_dir = root.join("blobs").join(function.name());
        let Ok(prefixes) = fs::read_dir(&function_dir) else {
            continue;
        };
        for prefix in prefixes {
            for entry in fs::read_dir(prefix?.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(hash) = name
                    .to_str()
                    .and_then(|n| ContentHash::parse_hex(function, n).ok())
                else {
                    continue;
                };
                let meta = entry.metadata()?;
                let accessed = meta
                    .accessed()
                    .or_else(|_| meta.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                found.push(BlobInfo {
                    hash,
                    size: meta.len(),
                    accessed,
                });
            }
        }
    }
    Ok(found)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn not_found_as(hash: ContentHash) -> impl FnOnce(io::Error) -> StoreError {
    move |e| {
        if e.kind() == io::ErrorKind::NotFound {
            StoreError::NotFound(hash)
        } else {
            StoreError::Io(e)
        }
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn size_of(&self, hash: &ContentHash) -> Result<Option<u64>> {
        Ok(self.inner.size_of(hash))
    }

    async fn has_many(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        Ok(digests
            .iter()
            .map(|d| self.inner.size_of(&d.content_hash()) == Some(d.size))
            .collect())
    }

    async fn read(
        &self,
        hash: &ContentHash,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<ChunkStream> {
        let size = self
            .inner
            .size_of(hash)
            .ok_or(StoreError::NotFound(*hash))?;
        let mut remaining = read_len(size, offset, limit)?;
        if remaining == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        let path = self.inner.blob_path(hash);
        let hash = *hash;
        let mut file = tokio::task::spawn_blocking(move || -> Result<File> {
            let mut file = File::open(&path).map_err(not_found_as(hash))?;
            file.seek(SeekFrom::Start(offset))?;
            Ok(file)
        })
        .await
        .map_err(io::Error::other)??;
        // One blocking reader per stream, a few chunks ahead of the consumer.
        let (tx, rx) = mpsc::channel::<Result<Bytes>>(4);
        tokio::task::spawn_blocking(move || {
            while remaining > 0 {
                let want = remaining.min(IO_CHUNK as u64) as usize;
                // read_to_end fills spare capacity without zeroing it first.
                let mut buf = Vec::with_capacity(want);
                let result = match (&mut file).take(want as u64).read_to_end(&mut buf) {
                    Ok(n) if n == want => Ok(Bytes::from(buf)),
                    Ok(_) => Err(StoreError::Io(io::ErrorKind::UnexpectedEof.into())),
                    Err(e) => Err(StoreError::Io(e)),
                };
                let failed = result.is_err();
                if tx.blocking_send(result).is_err() || failed {
                    return;
                }
                remaining -= want as u64;
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }

    /// Small blobs (the Action, Command and Directory messages Execute and the workers
    /// read all the time) are read in one go on the calling thread: a page-cache read of
    /// a few KiB costs less than the two hand-offs to the blocking pool a stream takes.
    async fn read_all(&self, digest: &Digest) -> Result<Bytes> {
        if digest.size == 0 || digest.size > SMALL_READ_BYTES {
            return read_all_streamed(self, digest).await;
        }
        let hash = digest.content_hash();
        if self.inner.size_of(&hash) != Some(digest.size) {
            return Err(StoreError::NotFound(hash));
        }
        let data = fs::read(self.inner.blob_path(&hash)).map_err(not_found_as(hash))?;
        if data.len() as u64 != digest.size {
            return Err(StoreError::NotFound(hash));
        }
        Ok(Bytes::from(data))
    }

    async fn begin_write(
        &self,
        function: DigestFunction,
        upload_id: Option<&str>,
    ) -> Result<Box<dyn BlobWriter>> {
        let (path, upload) = match upload_id {
            Some(id) => {
                check_upload_id(id)?;
                let lock = self
                    .inner
                    .upload_locks
                    .entry(id.to_string())
                    .or_default()
                    .clone();
                let guard = lock.lock_owned().await;
                (self.inner.upload_path(id), Some((id.to_string(), guard)))
            }
            None => (
                self.inner
                    .root
                    .join("tmp")
                    .join(uuid::Uuid::new_v4().to_string()),
                None,
            ),
        };
        writer::open(self.inner.clone(), path, upload, function).await
    }

    async fn delete(&self, hash: &ContentHash) -> Result<bool> {
        if hash.is_empty_blob() {
            return Ok(false);
        }
        let Some((_, size)) = self.inner.index.remove(hash) else {
            return Ok(false);
        };
        self.inner.stored_bytes.fetch_sub(size, Ordering::Relaxed);
        let path = self.inner.blob_path(hash);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self) -> BoxStream<'static, Result<BlobInfo>> {
        let root = self.inner.root.clone();
        futures::stream::once(async move {
            let listed = tokio::task::spawn_blocking(move || scan_blobs(&root))
                .await
                .map_err(io::Error::other)?;
            Ok::<_, StoreError>(futures::stream::iter(listed?.into_iter().map(Ok)))
        })
        .map(|r| match r {
            Ok(s) => s.boxed(),
            Err(e) => futures::stream::once(async { Err(e) }).boxed(),
        })
        .flatten()
        .boxed()
    }

    async fn touch(&self, hashes: &[ContentHash]) -> Result<()> {
        let paths: Vec<PathBuf> = hashes
            .iter()
            .filter(|h| !h.is_empty_blob())
            .map(|h| self.inner.blob_path(h))
            .collect();
        if paths.is_empty() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || {
            // By path, access time only: blobs are read-only files, which a non-root
            // owner cannot open for writing to set times through a handle.
            let times = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_NOW,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
            };
            for path in paths {
                // A blob deleted meanwhile is not an error for a touch.
                let _ = rustix::fs::utimensat(
                    rustix::fs::CWD,
                    &path,
                    &times,
                    rustix::fs::AtFlags::empty(),
                );
            }
        })
        .await
        .map_err(io::Error::other)?;
        Ok(())
    }

    async fn stored_bytes(&self) -> Result<u64> {
        let blobs = self.inner.stored_bytes.load(Ordering::Relaxed);
        // Kept uploads are few (they are swept) and live only in `uploads/`: one listing.
        let dir = self.inner.root.join("uploads");
        let uploads = tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let mut total = 0;
            for entry in fs::read_dir(&dir)? {
                // A file removed while listing no longer counts.
                if let Ok(metadata) = entry?.metadata() {
                    total += metadata.len();
                }
            }
            Ok(total)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(blobs + uploads)
    }

    async fn sweep_uploads(&self, idle: std::time::Duration) -> Result<u64> {
        let dir = self.inner.root.join("uploads");
        let listed =
            tokio::task::spawn_blocking(move || -> io::Result<Vec<(String, SystemTime)>> {
                let mut found = Vec::new();
                for entry in fs::read_dir(&dir)? {
                    let entry = entry?;
                    let modified = entry.metadata()?.modified()?;
                    if let Some(id) = entry.file_name().to_str() {
                        found.push((id.to_string(), modified));
                    }
                }
                Ok(found)
            })
            .await
            .map_err(io::Error::other)??;
        let cutoff = SystemTime::now()
            .checked_sub(idle)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = 0;
        for (id, modified) in listed {
            if modified >= cutoff {
                continue;
            }
            // Holding the upload's lock keeps a resuming writer out while it goes; one
            // that holds it already is in use.
            let lock = self
                .inner
                .upload_locks
                .entry(id.clone())
                .or_default()
                .clone();
            let Ok(_guard) = lock.try_lock_owned() else {
                continue;
            };
            match tokio::fs::remove_file(self.inner.upload_path(&id)).await {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            self.inner.upload_locks.remove(&id);
        }
        Ok(removed)
    }
}

mod writer;

#[cfg(test)]
mod tests;

//! The filesystem store's writer: chunks are hashed and appended on the blocking pool
//! while the caller receives the next ones; a commit checks the digest, fsyncs and
//! renames the file into place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use super::{sync_dir, Inner, IO_CHUNK};
use crate::blob_store::{BlobWriter, ExpectedDigest};
use crate::{Digest, DigestFunction, Hasher, Result, StoreError};

/// Chunks from this size on are kept as they came (no copy) until written; smaller
/// ones are gathered into one buffer, so that a stream of tiny chunks costs neither a
/// piece per byte nor a system call per chunk.
const GATHER_BELOW: usize = 64 << 10;

/// Opens (or reopens, to resume) the file at `path` for a write hashed with `function`.
pub(super) async fn open(
    store: Arc<Inner>,
    path: PathBuf,
    upload: Option<(String, tokio::sync::OwnedMutexGuard<()>)>,
    function: DigestFunction,
) -> Result<Box<dyn BlobWriter>> {
    let open_path = path.clone();
    let state = tokio::task::spawn_blocking(move || -> Result<WriteState> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&open_path)?;
        let mut hasher = function.hasher();
        // Resuming: the hash state is not persisted, so hash what is already on disk.
        let mut written = 0u64;
        let mut buf = vec![0u8; IO_CHUNK];
        file.seek(SeekFrom::Start(0))?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            written += n as u64;
        }
        Ok(WriteState {
            file,
            hasher,
            flushed: written,
        })
    })
    .await
    .map_err(io::Error::other)??;
    let written = state.flushed;
    Ok(Box::new(FsBlobWriter {
        store,
        path,
        upload,
        state: Some(WriterSlot::Idle(Box::new(state))),
        pending: Pending::default(),
        written,
        finished: false,
    }))
}

struct WriteState {
    file: File,
    hasher: Hasher,
    /// Bytes hashed and handed to the file.
    flushed: u64,
}

impl WriteState {
    fn append(&mut self, pieces: &[Bytes]) -> io::Result<()> {
        let mut len = 0;
        for piece in pieces {
            self.hasher.update(piece);
            len += piece.len() as u64;
        }
        write_all_pieces(&mut self.file, pieces)?;
        start_writeback(&self.file, self.flushed, len);
        self.flushed += len;
        Ok(())
    }
}

/// Writes every piece, in order, with as few system calls as the kernel allows.
fn write_all_pieces(file: &mut File, pieces: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice> = pieces.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What a writer has accepted and not yet handed to the blocking pool: large chunks as
/// they arrived (the socket's buffers, not copied again), small ones gathered.
#[derive(Default)]
struct Pending {
    pieces: Vec<Bytes>,
    gathering: BytesMut,
    len: usize,
}

impl Pending {
    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        if chunk.len() < GATHER_BELOW {
            self.gathering.extend_from_slice(&chunk);
            return;
        }
        self.seal_gathered();
        self.pieces.push(chunk);
    }

    fn seal_gathered(&mut self) {
        if !self.gathering.is_empty() {
            self.pieces
                .push(std::mem::take(&mut self.gathering).freeze());
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Everything pending, in order, leaving nothing behind.
    fn take(&mut self) -> Vec<Bytes> {
        self.seal_gathered();
        self.len = 0;
        std::mem::take(&mut self.pieces)
    }
}

/// Asks the kernel to start writing a range back to disk without waiting for it, so that
/// the fsync before a commit finds most of a large blob already on disk instead of
/// writing it all at the end.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor we own; it touches none of our memory.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

enum WriterSlot {
    Idle(Box<WriteState>),
    /// Hashing and writing the previous buffer on the blocking pool while the caller
    /// receives the next one.
    Busy(JoinHandle<io::Result<Box<WriteState>>>),
}

struct FsBlobWriter {
    store: Arc<Inner>,
    path: PathBuf,
    /// For a resumable upload: its id and the lock that keeps other writers out.
    upload: Option<(String, tokio::sync::OwnedMutexGuard<()>)>,
    state: Option<WriterSlot>,
    pending: Pending,
    written: u64,
    finished: bool,
}

impl FsBlobWriter {
    async fn settle(&mut self) -> Result<Box<WriteState>> {
        match self.state.take() {
            Some(WriterSlot::Idle(state)) => Ok(state),
            Some(WriterSlot::Busy(handle)) => Ok(handle.await.map_err(io::Error::other)??),
            None => Err(StoreError::Io(io::Error::other("writer failed earlier"))),
        }
    }

    /// Hands the pending buffer to the blocking pool without waiting for it.
    async fn flush_pending_in_background(&mut self) -> Result<()> {
        let mut state = self.settle().await?;
        let pieces = self.pending.take();
        self.state = Some(WriterSlot::Busy(tokio::task::spawn_blocking(move || {
            state.append(&pieces)?;
            Ok(state)
        })));
        Ok(())
    }

    fn release_upload(&mut self) {
        if let Some((id, _guard)) = self.upload.take() {
            self.store.upload_locks.remove(&id);
        }
    }

    async fn finish_writes(&mut self) -> Result<Box<WriteState>> {
        if !self.pending.is_empty() {
            self.flush_pending_in_background().await?;
        }
        self.settle().await
    }
}

#[async_trait]
impl BlobWriter for FsBlobWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.written += chunk.len() as u64;
        self.pending.push(chunk);
        if self.pending.len() >= IO_CHUNK {
            self.flush_pending_in_background().await?;
        }
        Ok(())
    }

    fn bytes_written(&self) -> u64 {
        self.written
    }

    async fn commit(mut self: Box<Self>, expected: ExpectedDigest) -> Result<Digest> {
        let state = self.finish_writes().await?;
        self.finished = true;
        self.release_upload();
        let WriteState {
            file,
            hasher,
            flushed,
        } = *state;
        let function = hasher.function();
        let actual = Digest::new(function, hasher.finalize(), flushed);
        let temp_path = self.path.clone();
        if let Err(e) = expected.check(actual) {
            drop(file);
            let _ = tokio::fs::remove_file(&temp_path).await;
            return Err(e);
        }
        let final_path = self.store.blob_path(&actual.content_hash());
        let made_visible = tokio::task::spawn_blocking(move || -> io::Result<()> {
            file.sync_all()?;
            drop(file);
            let dir = final_path.parent().expect("blob paths have a parent");
            if !dir.exists() {
                fs::create_dir_all(dir)?;
                sync_dir(dir.parent().expect("prefix dirs have a parent"))?;
            }
            fs::rename(&temp_path, &final_path)?;
            // The rename is durable only once its directory is.
            sync_dir(dir)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|outcome| outcome);
        if let Err(e) = made_visible {
            // fsync, mkdir or rename failed (ENOSPC, EIO): nothing was acknowledged, so
            // nothing may stay behind, a named upload's file included.
            let _ = tokio::fs::remove_file(&self.path).await;
            return Err(e.into());
        }
        self.store.add_to_index(actual.content_hash(), actual.size);
        Ok(actual)
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        let _ = self.settle().await;
        self.finished = true;
        self.release_upload();
        match tokio::fs::remove_file(&self.path).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

impl Drop for FsBlobWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some((_, guard)) = self.upload.take() else {
            // A background append may still hold the file open; unlinking is safe anyway.
            let _ = fs::remove_file(&self.path);
            return;
        };
        // Keep what the caller handed us so that a resumed upload continues after it. The
        // upload's lock is held until the last byte is appended, so a resuming writer
        // never hashes a file that is still growing.
        let pending = self.pending.take();
        let path = self.path.clone();
        let write_rest = move || {
            if !pending.is_empty() {
                if let Ok(mut file) = OpenOptions::new().append(true).open(&path) {
                    let _ = write_all_pieces(&mut file, &pending);
                }
            }
            drop(guard);
        };
        match (self.state.take(), tokio::runtime::Handle::try_current()) {
            (Some(WriterSlot::Busy(handle)), Ok(rt)) => {
                rt.spawn(async move {
                    let _ = handle.await;
                    let _ = tokio::task::spawn_blocking(write_rest).await;
                });
            }
            _ => write_rest(),
        }
    }
}

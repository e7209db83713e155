//! An in-memory blob store: for tests where durability is not what is tested, and the
//! plainest statement of the [`BlobStore`] contract (the conformance suite runs on it as
//! on every backend). Resumable uploads survive a dropped writer within the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::blob_store::{
    check_upload_id, read_len, BlobInfo, BlobStore, BlobWriter, ChunkStream, ExpectedDigest,
};
use crate::{ContentHash, Digest, DigestFunction, Hasher, Result, StoreError};

/// Reads are served in pieces of this size, as a streaming backend would.
const READ_CHUNK: usize = 256 << 10;

#[derive(Clone, Default)]
pub struct MemoryBlobStore {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    blobs: Mutex<HashMap<ContentHash, Stored>>,
    /// Upload id → the bytes a dropped writer left, the function they were hashed for,
    /// and when they were left.
    uploads: Mutex<HashMap<String, KeptUpload>>,
}

struct KeptUpload {
    function: DigestFunction,
    data: BytesMut,
    left: SystemTime,
}

struct Stored {
    data: Bytes,
    accessed: SystemTime,
}

impl MemoryBlobStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Inner {
    fn blobs(&self) -> MutexGuard<'_, HashMap<ContentHash, Stored>> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn uploads(&self) -> MutexGuard<'_, HashMap<String, KeptUpload>> {
        self.uploads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn data(&self, hash: &ContentHash) -> Option<Bytes> {
        if hash.is_empty_blob() {
            return Some(Bytes::new());
        }
        self.blobs().get(hash).map(|stored| stored.data.clone())
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    async fn size_of(&self, hash: &ContentHash) -> Result<Option<u64>> {
        Ok(self.inner.data(hash).map(|data| data.len() as u64))
    }

    async fn has_many(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        Ok(digests
            .iter()
            .map(|d| self.inner.data(&d.content_hash()).map(|b| b.len() as u64) == Some(d.size))
            .collect())
    }

    async fn read(
        &self,
        hash: &ContentHash,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<ChunkStream> {
        let data = self.inner.data(hash).ok_or(StoreError::NotFound(*hash))?;
        let len = read_len(data.len() as u64, offset, limit)?;
        let range = data.slice(offset as usize..(offset + len) as usize);
        let chunks: Vec<Result<Bytes>> = (0..range.len())
            .step_by(READ_CHUNK)
            .map(|start| Ok(range.slice(start..range.len().min(start + READ_CHUNK))))
            .collect();
        Ok(futures::stream::iter(chunks).boxed())
    }

    async fn begin_write(
        &self,
        function: DigestFunction,
        upload_id: Option<&str>,
    ) -> Result<Box<dyn BlobWriter>> {
        let mut hasher = function.hasher();
        let mut data = BytesMut::new();
        if let Some(id) = upload_id {
            check_upload_id(id)?;
            if let Some(kept) = self.inner.uploads().remove(id) {
                // A prefix hashed for another function is no prefix of this upload.
                if kept.function == function {
                    hasher.update(&kept.data);
                    data = kept.data;
                }
            }
        }
        Ok(Box::new(MemoryBlobWriter {
            store: self.inner.clone(),
            upload_id: upload_id.map(str::to_string),
            function,
            hasher: Some(hasher),
            data,
        }))
    }

    async fn delete(&self, hash: &ContentHash) -> Result<bool> {
        Ok(!hash.is_empty_blob() && self.inner.blobs().remove(hash).is_some())
    }

    fn list(&self) -> BoxStream<'static, Result<BlobInfo>> {
        let listed: Vec<Result<BlobInfo>> = self
            .inner
            .blobs()
            .iter()
            .map(|(hash, stored)| {
                Ok(BlobInfo {
                    hash: *hash,
                    size: stored.data.len() as u64,
                    accessed: stored.accessed,
                })
            })
            .collect();
        futures::stream::iter(listed).boxed()
    }

    async fn touch(&self, hashes: &[ContentHash]) -> Result<()> {
        let now = SystemTime::now();
        let mut blobs = self.inner.blobs();
        for hash in hashes {
            if let Some(stored) = blobs.get_mut(hash) {
                stored.accessed = now;
            }
        }
        Ok(())
    }

    async fn sweep_uploads(&self, idle: std::time::Duration) -> Result<u64> {
        let cutoff = SystemTime::now()
            .checked_sub(idle)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut uploads = self.inner.uploads();
        let before = uploads.len();
        // Only dropped writers' bytes are kept here: an open writer holds its own.
        uploads.retain(|_, kept| kept.left >= cutoff);
        Ok((before - uploads.len()) as u64)
    }

    async fn stored_bytes(&self) -> Result<u64> {
        let blobs: u64 = self
            .inner
            .blobs()
            .values()
            .map(|stored| stored.data.len() as u64)
            .sum();
        let uploads: u64 = self
            .inner
            .uploads()
            .values()
            .map(|kept| kept.data.len() as u64)
            .sum();
        Ok(blobs + uploads)
    }
}

struct MemoryBlobWriter {
    store: Arc<Inner>,
    upload_id: Option<String>,
    function: DigestFunction,
    /// None once committed or aborted.
    hasher: Option<Hasher>,
    data: BytesMut,
}

#[async_trait]
impl BlobWriter for MemoryBlobWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&chunk);
        }
        self.data.extend_from_slice(&chunk);
        Ok(())
    }

    fn bytes_written(&self) -> u64 {
        self.data.len() as u64
    }

    async fn commit(mut self: Box<Self>, expected: ExpectedDigest) -> Result<Digest> {
        let hasher = self.hasher.take().expect("a writer commits once");
        let data = std::mem::take(&mut self.data).freeze();
        let actual = Digest::new(self.function, hasher.finalize(), data.len() as u64);
        expected.check(actual)?;
        if let Some(id) = &self.upload_id {
            self.store.uploads().remove(id);
        }
        if !actual.content_hash().is_empty_blob() {
            self.store.blobs().insert(
                actual.content_hash(),
                Stored {
                    data,
                    accessed: SystemTime::now(),
                },
            );
        }
        Ok(actual)
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.hasher = None;
        if let Some(id) = &self.upload_id {
            self.store.uploads().remove(id);
        }
        Ok(())
    }
}

impl Drop for MemoryBlobWriter {
    fn drop(&mut self) {
        // Still open (neither committed nor aborted): a resumable upload keeps its bytes.
        if self.hasher.is_some() {
            if let Some(id) = self.upload_id.take() {
                let kept = KeptUpload {
                    function: self.function,
                    data: std::mem::take(&mut self.data),
                    left: SystemTime::now(),
                };
                self.store.uploads().insert(id, kept);
            }
        }
    }
}

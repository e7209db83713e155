//! A size limit in front of any [`BlobStore`]: writes past the limit are refused with
//! [`StoreError::Full`], and a background pass ([`BoundedBlobStore::evict_once`], see
//! `eviction`) removes the least recently used blobs once the store passes its high
//! watermark, down to its low one.
//!
//! The wrapper is itself a `BlobStore`, so the coordinator and the registry hold it as
//! they hold any backend and never learn that eviction exists. It keeps two things of its
//! own:
//! - **usage**: what the backend reported at the last measurement, plus bytes committed
//!   since, plus bytes that open writers hold. A write checks this before every chunk,
//!   so it never waits for an eviction pass: it either fits or is refused at once;
//! - **recent accesses**: reads, committed writes, FindMissingBlobs hits and touches are
//!   noted in memory and handed to [`BlobStore::touch`] in batches, so that a read does
//!   not cost a metadata write, and a blob noted since the last hand-off is never evicted.

mod eviction;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::blob_store::{BlobInfo, BlobStore, BlobWriter, ChunkStream, ExpectedDigest};
use crate::{ContentHash, Digest, DigestFunction, Result, StoreError};

pub use eviction::{EvictionPolicy, EvictionReport, RetainedBlobs};

/// Accesses noted before they are handed to the backend early, whatever the schedule:
/// bounds the memory a burst of FindMissingBlobs calls can take.
const MAX_PENDING_ACCESSES: usize = 100_000;

/// A [`BlobStore`] bounded to [`EvictionPolicy::max_bytes`].
pub struct BoundedBlobStore {
    inner: Arc<dyn BlobStore>,
    shared: Arc<Shared>,
}

/// What the store and its writers share.
struct Shared {
    /// The `store` label of this store's metrics.
    label: &'static str,
    policy: EvictionPolicy,
    /// The backend's `stored_bytes` at the last measurement.
    measured: AtomicU64,
    /// Bytes committed since that measurement.
    committed: AtomicU64,
    /// Bytes that open writers have accepted and not yet committed or dropped.
    pending: AtomicU64,
    /// Blobs used since the last hand-off to the backend's `touch`.
    recent: Mutex<HashSet<ContentHash>>,
    /// What eviction must keep whatever its age (the registry's blobs).
    retained: RwLock<Vec<Arc<dyn RetainedBlobs>>>,
    /// Wakes the eviction loop early (the high watermark was crossed, or a write refused).
    wake: tokio::sync::Notify,
    /// One eviction pass at a time.
    pass: tokio::sync::Mutex<()>,
}

impl Shared {
    fn used(&self) -> u64 {
        self.measured.load(Ordering::Relaxed)
            + self.committed.load(Ordering::Relaxed)
            + self.pending.load(Ordering::Relaxed)
    }

    fn note_used(&self, hashes: impl IntoIterator<Item = ContentHash>) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.extend(hashes);
        if recent.len() > MAX_PENDING_ACCESSES {
            self.wake.notify_one();
        }
    }

    fn was_used_recently(&self, hash: &ContentHash) -> bool {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(hash)
    }

    fn take_recent(&self) -> Vec<ContentHash> {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.drain().collect()
    }
}

impl BoundedBlobStore {
    /// Wraps `inner`, measuring what it holds now. Its metrics carry `store="local"`.
    pub async fn new(inner: Arc<dyn BlobStore>, policy: EvictionPolicy) -> Result<Self> {
        Self::labelled(inner, policy, "local").await
    }

    /// [`BoundedBlobStore::new`] with metrics labelled `store=label`, for a second bounded
    /// store in one process (an object store behind the local one).
    pub async fn labelled(
        inner: Arc<dyn BlobStore>,
        policy: EvictionPolicy,
        label: &'static str,
    ) -> Result<Self> {
        let measured = inner.stored_bytes().await?;
        metrics::gauge!("kiln_cas_limit_bytes", "store" => label).set(policy.max_bytes as f64);
        let shared = Arc::new(Shared {
            label,
            policy,
            measured: AtomicU64::new(measured),
            committed: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            recent: Mutex::new(HashSet::new()),
            retained: RwLock::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            pass: tokio::sync::Mutex::new(()),
        });
        Ok(BoundedBlobStore { inner, shared })
    }

    pub fn policy(&self) -> &EvictionPolicy {
        &self.shared.policy
    }

    /// The bytes the store holds by its own account (see the module doc).
    pub fn used_bytes(&self) -> u64 {
        self.shared.used()
    }

    /// Adds a source of blobs that eviction must never remove.
    pub fn retain(&self, retained: Arc<dyn RetainedBlobs>) {
        self.shared
            .retained
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(retained);
    }

    fn wake_if_over_high_watermark(&self) {
        if self.shared.used() > self.shared.policy.high_bytes() {
            self.shared.wake.notify_one();
        }
    }
}

#[async_trait]
impl BlobStore for BoundedBlobStore {
    async fn size_of(&self, hash: &ContentHash) -> Result<Option<u64>> {
        let size = self.inner.size_of(hash).await?;
        if size.is_some() {
            self.shared.note_used([*hash]);
        }
        Ok(size)
    }

    async fn has_many(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        let present = self.inner.has_many(digests).await?;
        // A hit is a promise to the caller (FindMissingBlobs: "no need to upload").
        self.shared.note_used(
            digests
                .iter()
                .zip(&present)
                .filter(|(_, present)| **present)
                .map(|(digest, _)| digest.content_hash()),
        );
        Ok(present)
    }

    async fn read(
        &self,
        hash: &ContentHash,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<ChunkStream> {
        let stream = self.inner.read(hash, offset, limit).await?;
        self.shared.note_used([*hash]);
        Ok(stream)
    }

    async fn begin_write(
        &self,
        function: DigestFunction,
        upload_id: Option<&str>,
    ) -> Result<Box<dyn BlobWriter>> {
        let inner = self.inner.begin_write(function, upload_id).await?;
        self.wake_if_over_high_watermark();
        Ok(Box::new(BoundedWriter {
            inner: Some(inner),
            shared: self.shared.clone(),
            reserved: 0,
        }))
    }

    async fn delete(&self, hash: &ContentHash) -> Result<bool> {
        // One more request to the backend, for the account; deletes outside eviction are
        // the registry GC's and the sweeps', which are rare next to reads and writes.
        let size = self.inner.size_of(hash).await?;
        let deleted = self.inner.delete(hash).await?;
        if let (true, Some(size)) = (deleted, size) {
            saturating_sub(&self.shared.measured, size);
        }
        Ok(deleted)
    }

    fn list(&self) -> BoxStream<'static, Result<BlobInfo>> {
        self.inner.list()
    }

    async fn touch(&self, hashes: &[ContentHash]) -> Result<()> {
        self.shared.note_used(hashes.iter().copied());
        Ok(())
    }

    async fn stored_bytes(&self) -> Result<u64> {
        self.inner.stored_bytes().await
    }

    async fn sweep_uploads(&self, idle: std::time::Duration) -> Result<u64> {
        self.inner.sweep_uploads(idle).await
    }
}

/// A write that counts its bytes against the limit before the backend sees them.
struct BoundedWriter {
    /// `None` once committed or aborted.
    inner: Option<Box<dyn BlobWriter>>,
    shared: Arc<Shared>,
    /// Bytes this writer added to `pending`.
    reserved: u64,
}

impl BoundedWriter {
    fn full(&self) -> StoreError {
        StoreError::Full {
            limit: self.shared.policy.max_bytes,
        }
    }
}

#[async_trait]
impl BlobWriter for BoundedWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let len = chunk.len() as u64;
        let used = self.shared.used();
        if used.saturating_add(len) > self.shared.policy.max_bytes {
            self.shared.wake.notify_one();
            metrics::counter!("kiln_cas_writes_refused_total", "store" => self.shared.label)
                .increment(1);
            // A refused write keeps nothing, not even a resumable upload's prefix: a
            // full store must not fill further with uploads no pass can evict.
            if let Some(inner) = self.inner.take() {
                let _ = inner.abort().await;
            }
            // Its bytes are gone now, not when the writer is dropped: a registry upload
            // session may keep a refused writer until the session expires.
            saturating_sub(&self.shared.pending, self.reserved);
            self.reserved = 0;
            return Err(self.full());
        }
        let Some(inner) = self.inner.as_mut() else {
            return Err(self.full());
        };
        self.shared.pending.fetch_add(len, Ordering::Relaxed);
        self.reserved += len;
        if used + len > self.shared.policy.high_bytes() {
            self.shared.wake.notify_one();
        }
        inner.write(chunk).await
    }

    fn bytes_written(&self) -> u64 {
        self.inner.as_ref().map_or(0, |inner| inner.bytes_written())
    }

    async fn commit(mut self: Box<Self>, expected: ExpectedDigest) -> Result<Digest> {
        let Some(inner) = self.inner.take() else {
            return Err(self.full());
        };
        let digest = inner.commit(expected).await?;
        // A resumed upload's earlier bytes were counted by a measurement already.
        self.shared
            .committed
            .fetch_add(self.reserved, Ordering::Relaxed);
        self.shared.note_used([digest.content_hash()]);
        Ok(digest)
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        match self.inner.take() {
            Some(inner) => inner.abort().await,
            None => Ok(()),
        }
    }

    async fn suspend(mut self: Box<Self>) -> Result<u64> {
        // The kept bytes leave `pending` on drop, as a dropped writer's do.
        match self.inner.take() {
            Some(inner) => inner.suspend().await,
            None => Err(self.full()),
        }
    }
}

impl Drop for BoundedWriter {
    fn drop(&mut self) {
        // Committed bytes moved to `committed`; anything else is gone or kept as an
        // upload, which the next measurement counts.
        saturating_sub(&self.shared.pending, self.reserved);
    }
}

fn saturating_sub(counter: &AtomicU64, amount: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |value| {
        Some(value.saturating_sub(amount))
    });
}

/// The retained sets of every source, as one set; an error from any stops the pass.
async fn retained_union(sources: Vec<Arc<dyn RetainedBlobs>>) -> Result<HashSet<ContentHash>> {
    let mut all = HashSet::new();
    for source in sources {
        let retained = source.retained().await.map_err(|reason| {
            StoreError::Io(std::io::Error::other(format!(
                "cannot tell which blobs to keep: {reason}"
            )))
        })?;
        all.extend(retained);
    }
    Ok(all)
}

#[cfg(test)]
mod tests;

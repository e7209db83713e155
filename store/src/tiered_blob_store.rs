//! A fast local tier in front of a slow shared store (an object store), as one
//! [`BlobStore`]:
//! - the slow store is the truth: writes are acknowledged only once it has committed
//!   them, existence and listing are its answers, and its eviction decides what is kept;
//! - the fast store is a cache of it: a write fills it as the bytes pass, a read is served
//!   from it when it has the blob and fills it on a miss, so hot blobs (a worker's inputs,
//!   a layer pulled by every node) cost no request to the slow store. It is bounded by
//!   its own eviction, and a failure in it never fails a request.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::blob_store::{BlobInfo, BlobStore, BlobWriter, ChunkStream, ExpectedDigest};
use crate::{ContentHash, Digest, DigestFunction, Result, StoreError};

pub struct TieredBlobStore {
    fast: Arc<dyn BlobStore>,
    slow: Arc<dyn BlobStore>,
}

impl TieredBlobStore {
    pub fn new(fast: Arc<dyn BlobStore>, slow: Arc<dyn BlobStore>) -> Self {
        TieredBlobStore { fast, slow }
    }

    /// A read of the whole blob from the slow store that fills the fast one as it passes.
    /// The fill commits only if the bytes match the name, and a fill that fails (the
    /// tier is full) is dropped without failing the read.
    async fn read_through(&self, hash: &ContentHash) -> Result<ChunkStream> {
        let stream = self.slow.read(hash, 0, None).await?;
        let filler = match self.fast.begin_write(hash.function, None).await {
            Ok(writer) => Some(writer),
            Err(error) => {
                tracing::debug!(%error, "not filling the local tier");
                None
            }
        };
        let expected = ExpectedDigest::Hash(*hash);
        let state = (stream, filler, expected);
        Ok(
            futures::stream::unfold(state, |(mut stream, mut filler, expected)| async move {
                match stream.next().await {
                    Some(Ok(chunk)) => {
                        if let Some(writer) = &mut filler {
                            if writer.write(chunk.clone()).await.is_err() {
                                filler = None;
                            }
                        }
                        Some((Ok(chunk), (stream, filler, expected)))
                    }
                    Some(Err(error)) => Some((Err(error), (stream, None, expected))),
                    None => {
                        if let Some(writer) = filler {
                            if let Err(error) = writer.commit(expected).await {
                                tracing::debug!(%error, "filling the local tier");
                            }
                        }
                        None
                    }
                }
            })
            .boxed(),
        )
    }
}

#[async_trait]
impl BlobStore for TieredBlobStore {
    async fn size_of(&self, hash: &ContentHash) -> Result<Option<u64>> {
        match self.fast.size_of(hash).await {
            Ok(Some(size)) => Ok(Some(size)),
            _ => self.slow.size_of(hash).await,
        }
    }

    async fn has_many(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        self.slow.has_many(digests).await
    }

    async fn read(
        &self,
        hash: &ContentHash,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<ChunkStream> {
        match self.fast.read(hash, offset, limit).await {
            Ok(stream) => return Ok(stream),
            // Past the end is past the end in either tier.
            Err(error @ StoreError::OffsetOutOfRange { .. }) => return Err(error),
            Err(_) => {}
        }
        if offset == 0 && limit.is_none() {
            self.read_through(hash).await
        } else {
            // A range (a resumed download) reads straight through; the next whole read
            // fills the tier.
            self.slow.read(hash, offset, limit).await
        }
    }

    async fn read_all(&self, digest: &Digest) -> Result<Bytes> {
        if let Ok(data) = self.fast.read_all(digest).await {
            return Ok(data);
        }
        let data = self.slow.read_all(digest).await?;
        if let Err(error) = self
            .fast
            .put(ExpectedDigest::Exact(*digest), data.clone())
            .await
        {
            tracing::debug!(%error, "filling the local tier");
        }
        Ok(data)
    }

    async fn begin_write(
        &self,
        function: DigestFunction,
        upload_id: Option<&str>,
    ) -> Result<Box<dyn BlobWriter>> {
        // Resumable uploads are the slow store's to keep (any replica may resume them);
        // the tier copies only a write it sees from the first byte.
        let slow = self.slow.begin_write(function, upload_id).await?;
        let fast = if slow.bytes_written() == 0 {
            self.fast.begin_write(function, None).await.ok()
        } else {
            None
        };
        Ok(Box::new(TieredWriter { slow, fast }))
    }

    async fn delete(&self, hash: &ContentHash) -> Result<bool> {
        let in_fast = self.fast.delete(hash).await.unwrap_or(false);
        Ok(self.slow.delete(hash).await? || in_fast)
    }

    fn list(&self) -> BoxStream<'static, Result<BlobInfo>> {
        self.slow.list()
    }

    async fn touch(&self, hashes: &[ContentHash]) -> Result<()> {
        if let Err(error) = self.fast.touch(hashes).await {
            tracing::debug!(%error, "touching the local tier");
        }
        self.slow.touch(hashes).await
    }

    async fn stored_bytes(&self) -> Result<u64> {
        self.slow.stored_bytes().await
    }

    async fn sweep_uploads(&self, idle: std::time::Duration) -> Result<u64> {
        let _ = self.fast.sweep_uploads(idle).await;
        self.slow.sweep_uploads(idle).await
    }
}

/// Writes through to the slow store, and copies into the fast one while it can.
struct TieredWriter {
    slow: Box<dyn BlobWriter>,
    fast: Option<Box<dyn BlobWriter>>,
}

#[async_trait]
impl BlobWriter for TieredWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        // Both tiers at once: the local disk's write and the bucket's upload overlap.
        let slow = &mut self.slow;
        let Some(fast) = &mut self.fast else {
            return slow.write(chunk).await;
        };
        let (copied, written) = futures::join!(fast.write(chunk.clone()), slow.write(chunk));
        if copied.is_err() {
            self.fast = None;
        }
        written
    }

    fn bytes_written(&self) -> u64 {
        self.slow.bytes_written()
    }

    async fn commit(self: Box<Self>, expected: ExpectedDigest) -> Result<Digest> {
        let Some(fast) = self.fast else {
            return self.slow.commit(expected).await;
        };
        // Together: a tier copy whose bucket commit fails is harmless (its bytes were
        // verified; the bucket still says "missing", so clients upload again).
        let (copied, committed) = futures::join!(fast.commit(expected), self.slow.commit(expected));
        if let Err(error) = copied {
            tracing::debug!(%error, "filling the local tier");
        }
        committed
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        if let Some(fast) = self.fast {
            let _ = fast.abort().await;
        }
        self.slow.abort().await
    }

    async fn suspend(self: Box<Self>) -> Result<u64> {
        // The resume may happen anywhere; the tier copies only whole writes.
        if let Some(fast) = self.fast {
            let _ = fast.abort().await;
        }
        self.slow.suspend().await
    }
}

/// Drains a stream, for the tests' reads.
#[cfg(test)]
async fn read_whole(stream: ChunkStream) -> Result<Vec<u8>> {
    use futures::TryStreamExt;
    stream
        .try_fold(Vec::new(), |mut all, chunk| async move {
            all.extend_from_slice(&chunk);
            Ok(all)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryBlobStore;

    fn tiers() -> (MemoryBlobStore, MemoryBlobStore, TieredBlobStore) {
        let (fast, slow) = (MemoryBlobStore::new(), MemoryBlobStore::new());
        let tiered = TieredBlobStore::new(Arc::new(fast.clone()), Arc::new(slow.clone()));
        (fast, slow, tiered)
    }

    #[tokio::test]
    async fn writes_reach_both_tiers_and_reads_fill_the_fast_one() {
        let (fast, slow, tiered) = tiers();
        let data = Bytes::from_static(b"written through");
        let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
        tiered
            .put(ExpectedDigest::Exact(digest), data.clone())
            .await
            .unwrap();
        assert_eq!(slow.read_all(&digest).await.unwrap(), data);
        assert_eq!(fast.read_all(&digest).await.unwrap(), data);

        // Only in the slow store (written by another replica): a whole read fills the tier.
        let other = Bytes::from_static(b"from another replica");
        let other_digest = Digest::of_bytes(DigestFunction::Sha256, &other);
        slow.put(ExpectedDigest::Exact(other_digest), other.clone())
            .await
            .unwrap();
        let hash = other_digest.content_hash();
        let ranged = read_whole(tiered.read(&hash, 5, Some(7)).await.unwrap()).await;
        assert_eq!(ranged.unwrap(), &other[5..12]);
        assert_eq!(
            fast.size_of(&hash).await.unwrap(),
            None,
            "ranges do not fill"
        );
        let whole = read_whole(tiered.read(&hash, 0, None).await.unwrap()).await;
        assert_eq!(whole.unwrap(), other);
        assert_eq!(fast.read_all(&other_digest).await.unwrap(), other);
    }

    #[tokio::test]
    async fn the_slow_store_is_the_truth() {
        let (fast, slow, tiered) = tiers();
        let data = Bytes::from_static(b"cached locally, gone remotely");
        let digest = Digest::of_bytes(DigestFunction::Blake3, &data);
        tiered
            .put(ExpectedDigest::Exact(digest), data.clone())
            .await
            .unwrap();
        // Evicted from the shared store: clients are told to upload it again, even though
        // a copy is still cached here.
        slow.delete(&digest.content_hash()).await.unwrap();
        assert_eq!(tiered.has_many(&[digest]).await.unwrap(), [false]);
        assert!(fast
            .size_of(&digest.content_hash())
            .await
            .unwrap()
            .is_some());
        assert!(tiered.delete(&digest.content_hash()).await.unwrap());
        assert_eq!(fast.size_of(&digest.content_hash()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_resumed_upload_is_the_slow_stores_alone() {
        let (fast, slow, tiered) = tiers();
        let data = Bytes::from(vec![7u8; 10_000]);
        let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
        let mut first = tiered
            .begin_write(DigestFunction::Sha256, Some("resumed"))
            .await
            .unwrap();
        first.write(data.slice(..4000)).await.unwrap();
        drop(first);
        let mut second = tiered
            .begin_write(DigestFunction::Sha256, Some("resumed"))
            .await
            .unwrap();
        assert_eq!(second.bytes_written(), 4000);
        second.write(data.slice(4000..)).await.unwrap();
        second.commit(ExpectedDigest::Exact(digest)).await.unwrap();
        assert_eq!(slow.read_all(&digest).await.unwrap(), data);
        assert_eq!(fast.size_of(&digest.content_hash()).await.unwrap(), None);
    }
}

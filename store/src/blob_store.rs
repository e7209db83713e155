//! The blob store interface shared by the CAS, the registry and the workers.

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::TryStreamExt;

use crate::{ContentHash, Digest, DigestFunction, Result, StoreError};

/// A blob's content as a stream of chunks.
pub type ChunkStream = BoxStream<'static, Result<Bytes>>;

/// What a finished write must hash to before it may become visible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedDigest {
    /// REAPI: the hash and the size are both known up front.
    Exact(Digest),
    /// OCI: the digest carries no size (a `Content-Length` may still be checked by the caller).
    Hash(ContentHash),
}

impl ExpectedDigest {
    pub fn function(&self) -> DigestFunction {
        match self {
            ExpectedDigest::Exact(d) => d.function,
            ExpectedDigest::Hash(h) => h.function,
        }
    }

    pub fn content_hash(&self) -> ContentHash {
        match self {
            ExpectedDigest::Exact(d) => d.content_hash(),
            ExpectedDigest::Hash(h) => *h,
        }
    }

    /// Checks a computed digest against this expectation.
    pub fn check(&self, actual: Digest) -> Result<()> {
        let matches = match self {
            ExpectedDigest::Exact(expected) => *expected == actual,
            ExpectedDigest::Hash(expected) => *expected == actual.content_hash(),
        };
        if matches {
            Ok(())
        } else {
            let expected = match self {
                ExpectedDigest::Exact(d) => *d,
                ExpectedDigest::Hash(h) => h.with_size(actual.size),
            };
            Err(StoreError::DigestMismatch { expected, actual })
        }
    }
}

/// One stored blob, as listed for garbage collection and eviction.
#[derive(Clone, Debug)]
pub struct BlobInfo {
    pub hash: ContentHash,
    pub size: u64,
    /// When the blob was last written or read through [`BlobStore::touch`].
    pub accessed: SystemTime,
}

/// A write in progress. Bytes are hashed as they arrive; nothing is visible under the
/// blob's name until [`BlobWriter::commit`] has checked the digest and made the data durable.
#[async_trait]
pub trait BlobWriter: Send {
    /// Appends a chunk.
    async fn write(&mut self, chunk: Bytes) -> Result<()>;

    /// How many bytes have been accepted so far, including any resumed prefix.
    fn bytes_written(&self) -> u64;

    /// Checks the content against `expected`, makes it durable and visible, and returns
    /// its digest. On a mismatch nothing is stored and the partial data is discarded.
    async fn commit(self: Box<Self>, expected: ExpectedDigest) -> Result<Digest>;

    /// Discards the partial data, including a resumable upload's file.
    async fn abort(self: Box<Self>) -> Result<()>;

    /// Ends this writer but keeps what it received for a later resume under its upload
    /// id, durably and visibly to every process sharing the store before it returns (a
    /// dropped writer may finish keeping its bytes in the background). Returns how many
    /// bytes a resume will start after. Without an upload id, the same as a drop.
    async fn suspend(self: Box<Self>) -> Result<u64> {
        let kept = self.bytes_written();
        drop(self);
        Ok(kept)
    }
}

/// A content-addressed blob store.
///
/// Blobs are named by [`ContentHash`]; the empty blob of each function is always present.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The size of a stored blob, or `None` when it is absent.
    async fn size_of(&self, hash: &ContentHash) -> Result<Option<u64>>;

    /// For each digest, whether a blob with that hash and size is present. A store may
    /// answer from a presence index that lags behind writes made elsewhere (another
    /// replica on the same bucket): it may call a present blob missing, never the
    /// reverse. That costs FindMissingBlobs a re-upload at most; where a false "missing"
    /// would fail a request instead, use [`confirm_presence`].
    async fn has_many(&self, digests: &[Digest]) -> Result<Vec<bool>>;

    /// Streams `limit` bytes (or the rest) of a blob from `offset`.
    async fn read(
        &self,
        hash: &ContentHash,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<ChunkStream>;

    /// Starts a write for a blob hashed with `function`.
    ///
    /// With an `upload_id`, the backend keeps what it can of the partial data under that
    /// id when the writer is dropped, and a later call with the same id resumes after it;
    /// [`BlobWriter::bytes_written`] says where (the ByteStream and OCI offsets callers
    /// report come from there). How much survives is the backend's to say: the
    /// filesystem keeps every byte across restarts, the memory store within the process;
    /// a backend that cannot keep a prefix (an object store without a staged part) starts
    /// again at 0, which both protocols let a client recover from. Without an id, a
    /// dropped writer leaves nothing behind.
    async fn begin_write(
        &self,
        function: DigestFunction,
        upload_id: Option<&str>,
    ) -> Result<Box<dyn BlobWriter>>;

    /// Removes a blob. Returns whether it was there.
    async fn delete(&self, hash: &ContentHash) -> Result<bool>;

    /// Lists every stored blob (for garbage collection and eviction), as a stream so that
    /// a large store is never held in memory.
    fn list(&self) -> BoxStream<'static, Result<BlobInfo>>;

    /// Marks blobs as used now, so that eviction keeps them. A backend without access
    /// times of its own keeps them itself (or reports the write time in [`BlobInfo`]);
    /// an absent blob is not an error.
    async fn touch(&self, hashes: &[ContentHash]) -> Result<()>;

    /// Total bytes the store holds: its blobs, and the kept bytes of named uploads (what a
    /// disk or a bucket really holds). Fallible: a remote backend has to ask.
    async fn stored_bytes(&self) -> Result<u64>;

    /// Removes the kept bytes of named uploads nobody has written to for `idle` (a client
    /// that went away mid-upload leaves them behind), skipping any with a writer open.
    /// Returns how many were removed.
    async fn sweep_uploads(&self, idle: std::time::Duration) -> Result<u64>;

    /// Reads a whole blob into memory, checking its size.
    async fn read_all(&self, digest: &Digest) -> Result<Bytes> {
        read_all_streamed(self, digest).await
    }

    /// Stores an in-memory blob, checking it against `expected`.
    async fn put(&self, expected: ExpectedDigest, data: Bytes) -> Result<Digest> {
        if let ExpectedDigest::Exact(digest) = expected {
            if self.size_of(&digest.content_hash()).await? == Some(digest.size) {
                // Content-addressed: a blob already present needs no second copy, but the
                // claim that `data` matches must still hold or the caller is confused.
                let actual = Digest::of_bytes(digest.function, &data);
                expected.check(actual)?;
                return Ok(digest);
            }
        }
        let mut writer = self.begin_write(expected.function(), None).await?;
        writer.write(data).await?;
        writer.commit(expected).await
    }
}

/// How many bytes a read of `limit` (or the rest) from `offset` of a `size`-byte blob
/// returns; an offset past the end is out of range, one at the end reads nothing.
pub fn read_len(size: u64, offset: u64, limit: Option<u64>) -> Result<u64> {
    if offset > size {
        return Err(StoreError::OffsetOutOfRange { offset, size });
    }
    Ok(limit.map_or(size - offset, |l| l.min(size - offset)))
}

/// Upload ids name files and object keys, so they are `[A-Za-z0-9_-]+` in every backend.
pub fn check_upload_id(id: &str) -> Result<()> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(StoreError::InvalidDigest(format!(
            "upload id {id:?} is not [A-Za-z0-9_-]+"
        )));
    }
    Ok(())
}

/// [`BlobStore::read_all`] through [`BlobStore::read`]: what every store does unless it
/// has a faster way.
pub(crate) async fn read_all_streamed<S: BlobStore + ?Sized>(
    store: &S,
    digest: &Digest,
) -> Result<Bytes> {
    // The digest's size is the caller's claim: check it against the store before sizing
    // a buffer by it.
    if store.size_of(&digest.content_hash()).await? != Some(digest.size) {
        return Err(StoreError::NotFound(digest.content_hash()));
    }
    let stream = store.read(&digest.content_hash(), 0, None).await?;
    let data: BytesMut = stream
        .try_fold(
            BytesMut::with_capacity(digest.size as usize),
            |mut acc, chunk| async move {
                acc.extend_from_slice(&chunk);
                Ok(acc)
            },
        )
        .await?;
    if data.len() as u64 != digest.size {
        return Err(StoreError::NotFound(digest.content_hash()));
    }
    Ok(data.freeze())
}

/// How many blobs [`confirm_presence`] asks about at once.
const CONFIRMATIONS_IN_FLIGHT: usize = 16;

/// Which of `digests` are present, asking [`BlobStore::size_of`] (which asks the backend
/// itself) about each one [`BlobStore::has_many`] calls missing: for the checks where a
/// false "missing" would fail a request or lose a cached result (Execute's inputs, an
/// action result's outputs), not only cost an upload.
pub async fn confirm_presence(store: &dyn BlobStore, digests: &[Digest]) -> Result<Vec<bool>> {
    use futures::StreamExt;
    let mut present = store.has_many(digests).await?;
    let doubtful: Vec<usize> = (0..digests.len()).filter(|&i| !present[i]).collect();
    let confirmed: Vec<(usize, bool)> = futures::stream::iter(doubtful)
        .map(|i| async move {
            let digest = &digests[i];
            let size = store.size_of(&digest.content_hash()).await?;
            Ok::<_, StoreError>((i, size == Some(digest.size)))
        })
        .buffer_unordered(CONFIRMATIONS_IN_FLIGHT)
        .try_collect()
        .await?;
    for (i, found) in confirmed {
        present[i] = found;
    }
    Ok(present)
}

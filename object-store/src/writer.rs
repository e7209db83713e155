//! Writes: verified before visible, resumable from any replica.
//!
//! A writer hashes what it receives and keeps it in memory up to one part; past that it
//! streams parts of a multipart upload to its own object (a staging key, or for a
//! resumable upload the segment key of its offset). On commit:
//! - with no earlier segments, the hash is already known: a small blob is PUT under its
//!   content key, a large one's upload is completed and copied there server side; a
//!   mismatch aborts the upload and nothing is visible;
//! - after a resume, this writer's bytes become one more segment and the segments are
//!   read back in order, hashed and written under the content key as a multipart upload
//!   that is completed only if they match (`assemble`).
//!
//! A resumable writer that is dropped keeps its bytes as a segment; any other is aborted.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use kiln_store::{
    check_upload_id, BlobWriter, Digest, DigestFunction, ExpectedDigest, Hasher, Result, StoreError,
};
use object_store::path::Path;
use object_store::{PutPayload, WriteMultipart};
use tokio::sync::OwnedMutexGuard;

use crate::layout::SegmentKey;
use crate::object_blob_store::{store_error, Inner};
use crate::tracked_upload;

/// The size of one multipart part (S3 wants at least 5 MiB) and of the in-memory buffer
/// below which a blob is written with a single PUT.
const PART_BYTES: usize = 8 << 20;
/// Parts in flight per writer: bounds a writer's memory to about this many parts.
const PARTS_IN_FLIGHT: usize = 4;
/// The most pieces one resumable upload may be kept in (one per writer that went away).
const MAX_SEGMENTS: usize = 1_000;
/// S3's limit for a single server-side copy; larger blobs are assembled instead.
const MAX_COPY_BYTES: u64 = 5 << 30;

pub(crate) struct ObjectBlobWriter {
    inner: Arc<Inner>,
    function: DigestFunction,
    /// Where this writer's own bytes go.
    target: Path,
    resumable: Option<Resumable>,
    /// The hash of everything so far; `None` after a resume, whose kept bytes are hashed
    /// when the commit reads them back.
    hasher: Option<Hasher>,
    own_bytes: u64,
    sink: Sink,
    /// Committed or aborted: nothing to keep or clean up on drop.
    finished: bool,
}

struct Resumable {
    id: String,
    /// Earlier writers' segments, in order: (key, size).
    kept: Vec<(Path, u64)>,
    kept_bytes: u64,
    /// Held for the writer's life, and by a drop's background save after it.
    _lock: OwnedMutexGuard<()>,
}

enum Sink {
    Buffer(BytesMut),
    Multipart(WriteMultipart),
}

impl ObjectBlobWriter {
    pub async fn begin(
        inner: Arc<Inner>,
        function: DigestFunction,
        upload_id: Option<&str>,
    ) -> Result<Self> {
        let (target, resumable) = match upload_id {
            None => (inner.layout.staging(), None),
            Some(id) => {
                check_upload_id(id)?;
                let lock = inner
                    .upload_locks
                    .entry(id.to_string())
                    .or_default()
                    .clone();
                let guard = lock.lock_owned().await;
                let kept = kept_segments(&inner, id, function).await?;
                let kept_bytes = kept.iter().map(|(_, size)| size).sum();
                let target = inner.layout.segment(&SegmentKey {
                    upload_id: id.to_string(),
                    function,
                    start: kept_bytes,
                });
                let resumable = Resumable {
                    id: id.to_string(),
                    kept,
                    kept_bytes,
                    _lock: guard,
                };
                (target, Some(resumable))
            }
        };
        let resumed = resumable.as_ref().is_some_and(|r| r.kept_bytes > 0);
        Ok(ObjectBlobWriter {
            inner,
            function,
            target,
            resumable,
            hasher: (!resumed).then(|| function.hasher()),
            own_bytes: 0,
            sink: Sink::Buffer(BytesMut::new()),
            finished: false,
        })
    }

    /// Saves this writer's bytes under its target key; returns their size.
    async fn save_own(&mut self) -> Result<u64> {
        let sink = std::mem::replace(&mut self.sink, Sink::Buffer(BytesMut::new()));
        save(&self.inner, &self.target, sink).await?;
        Ok(self.own_bytes)
    }

    async fn discard_own(&mut self) {
        let sink = std::mem::replace(&mut self.sink, Sink::Buffer(BytesMut::new()));
        if let Sink::Multipart(parts) = sink {
            if let Err(error) = parts.abort().await {
                tracing::warn!(%error, "aborting a multipart upload");
            }
        }
    }

    /// Lets the next writer of this upload in.
    fn release_upload(&mut self) {
        if let Some(resumable) = self.resumable.take() {
            let id = resumable.id.clone();
            drop(resumable);
            release_lock(&self.inner, &id);
        }
    }

    /// Commit when no earlier writer left bytes: the hash is known now.
    async fn commit_whole(&mut self, expected: ExpectedDigest) -> Result<Digest> {
        let hasher = self
            .hasher
            .take()
            .expect("a writer without a resume hashes");
        let actual = Digest::new(self.function, hasher.finalize(), self.own_bytes);
        if let Err(mismatch) = expected.check(actual) {
            self.discard_own().await;
            return Err(mismatch);
        }
        let hash = actual.content_hash();
        if hash.is_empty_blob() {
            self.discard_own().await;
            return Ok(actual);
        }
        let content = self.inner.layout.content(&hash);
        match std::mem::replace(&mut self.sink, Sink::Buffer(BytesMut::new())) {
            Sink::Buffer(buffer) => {
                let payload = PutPayload::from(buffer.freeze());
                self.inner
                    .store
                    .put(&content, payload)
                    .await
                    .map_err(|e| store_error("writing a blob", None, e))?;
            }
            Sink::Multipart(parts) => {
                parts
                    .finish()
                    .await
                    .map_err(|e| store_error("completing a blob's upload", None, e))?;
                if actual.size <= MAX_COPY_BYTES {
                    self.inner
                        .store
                        .copy(&self.target, &content)
                        .await
                        .map_err(|e| store_error("copying a blob into place", None, e))?;
                } else {
                    let staged = [(self.target.clone(), actual.size)];
                    assemble(&self.inner, &staged, expected, self.function).await?;
                }
                delete_quietly(&self.inner, &self.target).await;
            }
        }
        Ok(actual)
    }

    /// Commit after a resume: every byte is in segments now, read back and checked.
    async fn commit_segments(&mut self, expected: ExpectedDigest) -> Result<Digest> {
        let own = self.save_own().await?;
        let resumable = self.resumable.as_ref().expect("a resumed writer");
        let mut segments = resumable.kept.clone();
        if own > 0 {
            segments.push((self.target.clone(), own));
        }
        let assembled = assemble(&self.inner, &segments, expected, self.function).await;
        // Verified or not, the segments have served: a mismatch fails the upload.
        for (segment, _) in &segments {
            delete_quietly(&self.inner, segment).await;
        }
        assembled
    }
}

#[async_trait]
impl BlobWriter for ObjectBlobWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&chunk);
        }
        self.own_bytes += chunk.len() as u64;
        match &mut self.sink {
            Sink::Buffer(buffer) => {
                buffer.extend_from_slice(&chunk);
                if buffer.len() >= PART_BYTES {
                    let upload =
                        tracked_upload::start(&self.inner.store, &self.inner.layout, &self.target)
                            .await
                            .map_err(|e| store_error("starting an upload", None, e))?;
                    let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
                    parts.put(buffer.split().freeze());
                    self.sink = Sink::Multipart(parts);
                }
            }
            Sink::Multipart(parts) => put_part(parts, chunk).await?,
        }
        Ok(())
    }

    fn bytes_written(&self) -> u64 {
        self.resumable.as_ref().map_or(0, |r| r.kept_bytes) + self.own_bytes
    }

    async fn commit(mut self: Box<Self>, expected: ExpectedDigest) -> Result<Digest> {
        self.finished = true;
        let digest = if self.hasher.is_some() {
            self.commit_whole(expected).await
        } else {
            self.commit_segments(expected).await
        };
        if let Ok(digest) = &digest {
            if !digest.is_empty_blob() {
                self.inner
                    .presence
                    .confirm(digest.content_hash(), digest.size);
            }
        }
        self.release_upload();
        digest
    }

    async fn suspend(mut self: Box<Self>) -> Result<u64> {
        self.finished = true;
        let kept = self.bytes_written();
        if self.resumable.is_some() {
            // Saved before returning, so the next request may land on any replica.
            self.save_own().await?;
        } else {
            self.discard_own().await;
        }
        self.release_upload();
        Ok(kept)
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.finished = true;
        self.discard_own().await;
        if let Some(resumable) = &self.resumable {
            for (segment, _) in &resumable.kept {
                delete_quietly(&self.inner, segment).await;
            }
        }
        self.release_upload();
        Ok(())
    }
}

impl Drop for ObjectBlobWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        let target = self.target.clone();
        let sink = std::mem::replace(&mut self.sink, Sink::Buffer(BytesMut::new()));
        match self.resumable.take() {
            // A resumable upload keeps what it received, under its lock until saved.
            Some(resumable) => {
                runtime.spawn(async move {
                    if let Err(error) = save(&inner, &target, sink).await {
                        tracing::warn!(%error, "keeping a resumable upload's bytes");
                    }
                    let id = resumable.id.clone();
                    drop(resumable);
                    release_lock(&inner, &id);
                });
            }
            None => {
                if let Sink::Multipart(parts) = sink {
                    runtime.spawn(async move {
                        if let Err(error) = parts.abort().await {
                            tracing::warn!(%error, "aborting an abandoned upload");
                        }
                    });
                }
            }
        }
    }
}

/// Hands `chunk` to a multipart upload once fewer than `PARTS_IN_FLIGHT` parts are in
/// flight, which bounds a writer's memory.
async fn put_part(parts: &mut WriteMultipart, chunk: Bytes) -> Result<()> {
    parts
        .wait_for_capacity(PARTS_IN_FLIGHT)
        .await
        .map_err(|e| store_error("uploading a part", None, e))?;
    parts.put(chunk);
    Ok(())
}

/// Writes a sink's bytes to `target` (nothing for an empty buffer).
async fn save(inner: &Inner, target: &Path, sink: Sink) -> Result<()> {
    match sink {
        Sink::Buffer(buffer) if buffer.is_empty() => Ok(()),
        Sink::Buffer(buffer) => inner
            .store
            .put(target, PutPayload::from(buffer.freeze()))
            .await
            .map(drop)
            .map_err(|e| store_error("keeping upload bytes", None, e)),
        Sink::Multipart(parts) => parts
            .finish()
            .await
            .map(drop)
            .map_err(|e| store_error("keeping upload bytes", None, e)),
    }
}

/// Reads `segments` back in order, hashing them into a multipart upload under the
/// expected content key that is completed only if the hash and size match.
async fn assemble(
    inner: &Inner,
    segments: &[(Path, u64)],
    expected: ExpectedDigest,
    function: DigestFunction,
) -> Result<Digest> {
    let content = inner.layout.content(&expected.content_hash());
    let upload = tracked_upload::start(&inner.store, &inner.layout, &content)
        .await
        .map_err(|e| store_error("starting an upload", None, e))?;
    let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut hasher = function.hasher();
    let mut size = 0u64;
    let copied: Result<()> = async {
        for (segment, _) in segments {
            let mut chunks = inner
                .store
                .get(segment)
                .await
                .map_err(|e| store_error("reading kept upload bytes", None, e))?
                .into_stream();
            while let Some(chunk) = chunks
                .try_next()
                .await
                .map_err(|e| store_error("reading kept upload bytes", None, e))?
            {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                put_part(&mut parts, chunk).await?;
            }
        }
        Ok(())
    }
    .await;
    let actual = Digest::new(function, hasher.finalize(), size);
    if let Err(error) = copied.and_then(|()| expected.check(actual)) {
        if let Err(abort) = parts.abort().await {
            tracing::warn!(error = %abort, "aborting an assembly");
        }
        return Err(error);
    }
    if actual.is_empty_blob() {
        parts.abort().await.ok();
        return Ok(actual);
    }
    parts
        .finish()
        .await
        .map_err(|e| store_error("completing a blob's upload", None, e))?;
    Ok(actual)
}

/// The segments earlier writers of `upload_id` kept for `function`, contiguous from 0;
/// anything else under the upload (another function, a gap) is deleted.
async fn kept_segments(
    inner: &Inner,
    upload_id: &str,
    function: DigestFunction,
) -> Result<Vec<(Path, u64)>> {
    let mut found: Vec<(SegmentKey, Path, u64)> = inner
        .store
        .list(Some(&inner.layout.upload(upload_id)))
        .map_err(|e| store_error("listing an upload", None, e))
        .try_filter_map(|meta| async move {
            Ok(inner
                .layout
                .parse_segment(&meta.location)
                .map(|key| (key, meta.location, meta.size)))
        })
        .try_collect()
        .await?;
    // Each request of a chunked upload across replicas keeps a piece, and the commit
    // reads them all back: bound how many one upload may leave.
    if found.len() > MAX_SEGMENTS {
        return Err(StoreError::LimitExceeded(format!(
            "upload {upload_id} is kept in more than {MAX_SEGMENTS} pieces; start it again \
             with fewer, larger chunks"
        )));
    }
    found.sort_by_key(|(key, _, _)| key.start);
    let mut kept = Vec::new();
    let mut end = 0;
    for (key, path, size) in found {
        if key.function == function && key.start == end && size > 0 {
            end += size;
            kept.push((path, size));
        } else {
            delete_quietly(inner, &path).await;
        }
    }
    Ok(kept)
}

/// Removes what uploads and writes left behind: resumable uploads nobody has written to
/// for `idle` and that no writer here holds, and staging objects older than that (their
/// writer died between completing and copying). Returns how many uploads went.
pub(crate) async fn sweep_uploads(inner: &Inner, idle: Duration, now: SystemTime) -> Result<u64> {
    let cutoff = now.checked_sub(idle).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut newest: std::collections::BTreeMap<String, (SystemTime, Vec<Path>)> =
        Default::default();
    let mut listing = inner.store.list(Some(&inner.layout.uploads_root()));
    while let Some(meta) = listing
        .try_next()
        .await
        .map_err(|e| store_error("listing uploads", None, e))?
    {
        let Some(key) = inner.layout.parse_segment(&meta.location) else {
            continue;
        };
        let written: SystemTime = meta.last_modified.into();
        let entry = newest
            .entry(key.upload_id)
            .or_insert((SystemTime::UNIX_EPOCH, Vec::new()));
        entry.0 = entry.0.max(written);
        entry.1.push(meta.location);
    }
    let mut swept = 0;
    for (id, (last_write, paths)) in newest {
        if last_write >= cutoff || inner.upload_locks.contains_key(&id) {
            continue;
        }
        for path in &paths {
            delete_quietly(inner, path).await;
        }
        swept += 1;
    }
    let stale: Vec<Path> = inner
        .store
        .list(Some(&inner.layout.staging_root()))
        .map_err(|e| store_error("listing staged writes", None, e))
        .try_filter_map(|meta| async move {
            let written: SystemTime = meta.last_modified.into();
            Ok((written < cutoff).then_some(meta.location))
        })
        .try_collect()
        .await?;
    for path in &stale {
        delete_quietly(inner, path).await;
    }
    // Multipart uploads whose process died before completing or aborting them.
    let orphans: Vec<Path> = inner
        .store
        .list(Some(&inner.layout.multipart_root()))
        .map_err(|e| store_error("listing multipart uploads", None, e))
        .try_filter_map(|meta| async move {
            let written: SystemTime = meta.last_modified.into();
            Ok((written < cutoff).then_some(meta.location))
        })
        .try_collect()
        .await?;
    for marker in &orphans {
        match tracked_upload::abort_recorded(inner.store.as_ref(), marker).await {
            Ok(()) => swept += 1,
            Err(error) => tracing::warn!(%error, "aborting an abandoned multipart upload"),
        }
    }
    Ok(swept)
}

async fn delete_quietly(inner: &Inner, path: &Path) {
    match inner.store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(error) => tracing::warn!(%error, "deleting {path}"),
    }
}

/// Forgets the upload's lock once no writer holds or waits for it.
fn release_lock(inner: &Inner, id: &str) {
    inner
        .upload_locks
        .remove_if(id, |_, lock| Arc::strong_count(lock) == 1);
}

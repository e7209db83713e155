//! [`ObjectBlobStore`]: reads, existence, listing and the upload sweep. Writes are in
//! `writer`, access times in `access_marks`, key names in `layout`.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use kiln_store::{
    read_len, BlobInfo, BlobStore, BlobWriter, ChunkStream, ContentHash, Digest, DigestFunction,
    Result, StoreError,
};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore};

use crate::tracked_upload::Bucket;

use crate::access_marks::AccessMarks;
use crate::layout::Layout;
use crate::presence::PresenceIndex;
use crate::writer::ObjectBlobWriter;

/// How the store trades freshness for requests.
#[derive(Clone, Debug)]
pub struct ObjectStoreOptions {
    /// Keys are made under this prefix.
    pub prefix: String,
    /// How long a blob known to be in the bucket is believed present without asking
    /// again; the bucket is listed twice per period to confirm what is still there.
    pub presence_ttl: Duration,
    /// A blob's access marker is rewritten at most this often per process.
    pub touch_interval: Duration,
}

impl Default for ObjectStoreOptions {
    fn default() -> Self {
        ObjectStoreOptions {
            prefix: String::new(),
            presence_ttl: Duration::from_secs(600),
            touch_interval: Duration::from_secs(3600),
        }
    }
}

/// A [`BlobStore`] on an object store (see the crate doc for how).
#[derive(Clone)]
pub struct ObjectBlobStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub store: Arc<dyn Bucket>,
    pub layout: Layout,
    pub presence: PresenceIndex,
    pub marks: AccessMarks,
    /// One writer at a time per resumable upload in this process, and the sweep skips
    /// uploads that have one.
    pub upload_locks: dashmap::DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

/// An object store error as the store's own: a missing object is `NotFound`, anything
/// else means the bucket could not answer.
pub(crate) fn store_error(
    what: &str,
    hash: Option<&ContentHash>,
    error: object_store::Error,
) -> StoreError {
    match (error, hash) {
        (object_store::Error::NotFound { .. }, Some(hash)) => StoreError::NotFound(*hash),
        (error, _) => StoreError::Unavailable(format!("object store: {what}: {error}")),
    }
}

impl ObjectBlobStore {
    /// Opens the store on `store`, listing what it holds to fill the presence index, and
    /// keeps that index fresh in the background for as long as the store is alive.
    pub async fn open(store: Arc<dyn Bucket>, options: ObjectStoreOptions) -> Result<Self> {
        let layout = Layout::new(&options.prefix);
        let inner = Arc::new(Inner {
            marks: AccessMarks::new(
                store.clone() as Arc<dyn ObjectStore>,
                layout.clone(),
                options.touch_interval,
            ),
            store,
            layout,
            presence: PresenceIndex::new(options.presence_ttl),
            upload_locks: dashmap::DashMap::new(),
        });
        let started = Instant::now();
        let count = inner.refresh_presence().await?;
        tracing::info!(
            blobs = count,
            bytes = inner.presence.bytes(),
            took_ms = started.elapsed().as_millis() as u64,
            "object store listed"
        );
        tokio::spawn(keep_presence_fresh(
            Arc::downgrade(&inner),
            options.presence_ttl / 2,
        ));
        Ok(ObjectBlobStore { inner })
    }
}

impl Inner {
    /// Lists every blob, confirms each in the index and forgets what is gone.
    async fn refresh_presence(&self) -> Result<u64> {
        let started = Instant::now();
        let mut listing = self.store.list(Some(&self.layout.content_root()));
        let mut count = 0;
        while let Some(meta) = listing
            .try_next()
            .await
            .map_err(|e| store_error("listing blobs", None, e))?
        {
            if let Some(hash) = self.layout.parse_content(&meta.location) {
                self.presence.confirm_at(hash, meta.size, started);
                count += 1;
            }
        }
        self.presence.forget_unconfirmed_since(started);
        Ok(count)
    }

    /// The blob's size by asking the bucket, which also refreshes the index.
    async fn head(&self, hash: &ContentHash) -> Result<Option<u64>> {
        match self.store.head(&self.layout.content(hash)).await {
            Ok(meta) => {
                self.presence.confirm(*hash, meta.size);
                Ok(Some(meta.size))
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.presence.forget(hash);
                Ok(None)
            }
            Err(e) => Err(store_error("reading a blob's size", Some(hash), e)),
        }
    }

    /// Bytes of objects under `root` (kept uploads, staging).
    async fn bytes_under(&self, root: &Path) -> Result<u64> {
        self.store
            .list(Some(root))
            .map_err(|e| store_error("listing uploads", None, e))
            .try_fold(0, |sum, meta| async move { Ok(sum + meta.size) })
            .await
    }
}

async fn keep_presence_fresh(inner: Weak<Inner>, every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_secs(1)));
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Err(error) = inner.refresh_presence().await {
            // Entries age out on their own, so a failed listing only makes answers more
            // cautious ("missing") until the next one works.
            tracing::warn!(%error, "refreshing the object store's presence index");
        }
    }
}

fn empty_stream() -> ChunkStream {
    futures::stream::empty().boxed()
}

#[async_trait]
impl BlobStore for ObjectBlobStore {
    async fn size_of(&self, hash: &ContentHash) -> Result<Option<u64>> {
        if hash.is_empty_blob() {
            return Ok(Some(0));
        }
        match self.inner.presence.fresh_size(hash) {
            Some(size) => Ok(Some(size)),
            None => self.inner.head(hash).await,
        }
    }

    async fn has_many(&self, digests: &[Digest]) -> Result<Vec<bool>> {
        Ok(digests.iter().map(|d| self.inner.presence.has(d)).collect())
    }

    async fn read(
        &self,
        hash: &ContentHash,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<ChunkStream> {
        let size = self
            .size_of(hash)
            .await?
            .ok_or(StoreError::NotFound(*hash))?;
        let len = read_len(size, offset, limit)?;
        if len == 0 {
            return Ok(empty_stream());
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(offset..offset + len)),
            ..Default::default()
        };
        let got = match self
            .inner
            .store
            .get_opts(&self.inner.layout.content(hash), options)
            .await
        {
            Ok(got) => got,
            Err(e) => {
                if matches!(e, object_store::Error::NotFound { .. }) {
                    self.inner.presence.forget(hash);
                }
                return Err(store_error("reading a blob", Some(hash), e));
            }
        };
        // The HTTP body's frames are handed on as they come (mostly 64 KiB here): no copy.
        // Regrouping them into 1 MiB pieces cost a copy of every byte and measured no gain
        // (BENCHMARKS.md, "Object storage on Garage").
        let hash = *hash;
        Ok(got
            .into_stream()
            .map_err(move |e| store_error("reading a blob", Some(&hash), e))
            .boxed())
    }

    async fn begin_write(
        &self,
        function: DigestFunction,
        upload_id: Option<&str>,
    ) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(
            ObjectBlobWriter::begin(self.inner.clone(), function, upload_id).await?,
        ))
    }

    async fn delete(&self, hash: &ContentHash) -> Result<bool> {
        if hash.is_empty_blob() || self.inner.head(hash).await?.is_none() {
            return Ok(false);
        }
        let inner = &self.inner;
        match inner.store.delete(&inner.layout.content(hash)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_error("deleting a blob", Some(hash), e)),
        }
        inner.presence.forget(hash);
        inner.marks.forget(hash).await;
        Ok(true)
    }

    fn list(&self) -> BoxStream<'static, Result<BlobInfo>> {
        self.inner
            .marks
            .list_with_access_times(&(self.inner.store.clone() as Arc<dyn ObjectStore>))
    }

    async fn touch(&self, hashes: &[ContentHash]) -> Result<()> {
        self.inner.marks.touch(hashes).await
    }

    async fn stored_bytes(&self) -> Result<u64> {
        let kept = self
            .inner
            .bytes_under(&self.inner.layout.uploads_root())
            .await?;
        let staged = self
            .inner
            .bytes_under(&self.inner.layout.staging_root())
            .await?;
        Ok(self.inner.presence.bytes() + kept + staged)
    }

    async fn sweep_uploads(&self, idle: Duration) -> Result<u64> {
        crate::writer::sweep_uploads(&self.inner, idle, SystemTime::now()).await
    }
}

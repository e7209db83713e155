//! Access times in the bucket, shared by every replica.
//!
//! An object's own modification time is when it was written; S3 has no access time, and
//! rewriting a blob to refresh it would cost its size. So a use is recorded as an empty
//! marker object, `touched/<function>/<hex>`, whose modification time is the blob's last
//! use. A blob's access time is the later of the two. Markers are written at most once
//! per `interval` per blob per process, so a hot blob costs one small PUT an hour.

use std::cmp::Ordering as KeyOrder;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use futures::stream::{BoxStream, Peekable};
use futures::{StreamExt, TryStreamExt};
use kiln_store::{BlobInfo, ContentHash, Result};
use object_store::{ObjectMeta, ObjectStore, PutPayload};

use crate::layout::Layout;
use crate::object_blob_store::store_error;

/// Marker writes in flight at once for one batch of touches.
const CONCURRENT_MARKS: usize = 32;
/// Remembered marker writes, past which the memory is cleared (and a few markers written
/// again early): bounds what a huge build can make this map hold.
const MAX_REMEMBERED: usize = 1_000_000;

pub(crate) struct AccessMarks {
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    interval: Duration,
    written: DashMap<ContentHash, Instant>,
}

impl AccessMarks {
    pub fn new(store: Arc<dyn ObjectStore>, layout: Layout, interval: Duration) -> Self {
        AccessMarks {
            store,
            layout,
            interval,
            written: DashMap::new(),
        }
    }

    /// Records a use of each blob (the caller passes only blobs it knows are stored).
    pub async fn touch(&self, hashes: &[ContentHash]) -> Result<()> {
        if self.written.len() > MAX_REMEMBERED {
            self.written.clear();
        }
        let now = Instant::now();
        let due: Vec<ContentHash> = hashes
            .iter()
            .filter(|hash| !hash.is_empty_blob())
            .filter(|hash| {
                let mut fresh = true;
                self.written
                    .entry(**hash)
                    .and_modify(|last| {
                        if now.duration_since(*last) < self.interval {
                            fresh = false;
                        } else {
                            *last = now;
                        }
                    })
                    .or_insert(now);
                fresh
            })
            .copied()
            .collect();
        futures::stream::iter(due)
            .map(|hash| async move {
                let marker = self.layout.touched(&hash);
                let written = self.store.put(&marker, PutPayload::new()).await;
                if written.is_err() {
                    // Try again at the next touch rather than after the interval.
                    self.written.remove(&hash);
                }
                written.map_err(|e| store_error("recording a blob's use", None, e))
            })
            .buffer_unordered(CONCURRENT_MARKS)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// Removes a deleted blob's marker.
    pub async fn forget(&self, hash: &ContentHash) {
        self.written.remove(hash);
        if let Err(error) = self.store.delete(&self.layout.touched(hash)).await {
            if !matches!(error, object_store::Error::NotFound { .. }) {
                tracing::warn!(%error, "removing an access marker");
            }
        }
    }

    /// Every blob with its access time: the blob listing and the marker listing, both in
    /// key order, walked side by side.
    pub fn list_with_access_times(
        &self,
        store: &Arc<dyn ObjectStore>,
    ) -> BoxStream<'static, Result<BlobInfo>> {
        let walk = Walk {
            layout: self.layout.clone(),
            blobs: store.list(Some(&self.layout.content_root())),
            marks: store.list(Some(&self.layout.touched_root())).peekable(),
        };
        futures::stream::unfold(walk, |mut walk| async move {
            let next = walk.next_blob().await.transpose()?;
            Some((next, walk))
        })
        .boxed()
    }
}

struct Walk {
    layout: Layout,
    blobs: BoxStream<'static, object_store::Result<ObjectMeta>>,
    marks: Peekable<BoxStream<'static, object_store::Result<ObjectMeta>>>,
}

/// A blob's place in both listings' order.
fn sort_key(hash: &ContentHash) -> String {
    format!("{}/{}", hash.function.name(), hash.hex())
}

impl Walk {
    async fn next_blob(&mut self) -> Result<Option<BlobInfo>> {
        loop {
            let Some(meta) = self
                .blobs
                .try_next()
                .await
                .map_err(|e| store_error("listing blobs", None, e))?
            else {
                return Ok(None);
            };
            let Some(hash) = self.layout.parse_content(&meta.location) else {
                continue;
            };
            let written: SystemTime = meta.last_modified.into();
            let marked = self.mark_for(&sort_key(&hash)).await?;
            return Ok(Some(BlobInfo {
                hash,
                size: meta.size,
                accessed: marked.map_or(written, |marked| marked.max(written)),
            }));
        }
    }

    /// The marker time of the blob at `key`, skipping markers of blobs before it (their
    /// blobs are gone).
    async fn mark_for(&mut self, key: &str) -> Result<Option<SystemTime>> {
        loop {
            let peeked = match Pin::new(&mut self.marks).peek().await {
                None => return Ok(None),
                Some(Err(_)) => {
                    let error = self.marks.next().await.and_then(|r| r.err());
                    return Err(store_error(
                        "listing access markers",
                        None,
                        error.expect("a peeked error is there"),
                    ));
                }
                Some(Ok(meta)) => meta,
            };
            let Some(marked) = self.layout.parse_touched(&peeked.location) else {
                self.marks.next().await;
                continue;
            };
            match sort_key(&marked).as_str().cmp(key) {
                KeyOrder::Less => {
                    self.marks.next().await;
                }
                KeyOrder::Equal => {
                    let time = peeked.last_modified.into();
                    self.marks.next().await;
                    return Ok(Some(time));
                }
                KeyOrder::Greater => return Ok(None),
            }
        }
    }
}

//! Multipart uploads that a crash cannot leave behind for good.
//!
//! An incomplete multipart upload is invisible to listings, yet its parts are stored (and
//! billed) until someone aborts it, and `object_store` cannot list them. So each upload's
//! id is written down first, as a small marker object `multipart/<uuid>` holding the key
//! and the id; completing or aborting it removes the marker, and the upload sweep aborts
//! the uploads whose markers outlived the upload TTL (their process died).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, MultipartUpload, ObjectStore, PutPayload, PutResult, UploadPart};

use crate::layout::Layout;

/// What the bucket must do for kiln: objects, and multipart uploads by id.
pub trait Bucket: ObjectStore + MultipartStore {}

impl<T: ObjectStore + MultipartStore> Bucket for T {}

#[derive(Debug)]
pub(crate) struct TrackedUpload {
    bucket: Arc<dyn Bucket>,
    path: Path,
    id: MultipartId,
    marker: Path,
    /// Part `i`'s id once its upload finished; parts finish in any order.
    parts: Arc<Mutex<Vec<Option<PartId>>>>,
    next_part: usize,
}

/// Starts a multipart upload to `path`, recorded before any part is sent.
pub(crate) async fn start(
    bucket: &Arc<dyn Bucket>,
    layout: &Layout,
    path: &Path,
) -> object_store::Result<Box<dyn MultipartUpload>> {
    let id = bucket.create_multipart(path).await?;
    let marker = layout.multipart_marker();
    let record = format!("{path}\n{id}");
    if let Err(error) = bucket.put(&marker, PutPayload::from(record)).await {
        let _ = bucket.abort_multipart(path, &id).await;
        return Err(error);
    }
    Ok(Box::new(TrackedUpload {
        bucket: bucket.clone(),
        path: path.clone(),
        id,
        marker,
        parts: Arc::default(),
        next_part: 0,
    }))
}

/// Aborts the upload a marker records, then removes the marker.
pub(crate) async fn abort_recorded(bucket: &dyn Bucket, marker: &Path) -> object_store::Result<()> {
    let record = bucket.get(marker).await?.bytes().await?;
    let record = String::from_utf8_lossy(&record);
    if let Some((path, id)) = record.split_once('\n') {
        match bucket
            .abort_multipart(&Path::from(path), &id.to_string())
            .await
        {
            // Already gone (completed or aborted by its writer just before): fine.
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    bucket.delete(marker).await
}

impl TrackedUpload {
    async fn forget_marker(&self) {
        if let Err(error) = self.bucket.delete(&self.marker).await {
            tracing::warn!(%error, "removing a multipart upload's marker");
        }
    }
}

#[async_trait]
impl MultipartUpload for TrackedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let index = self.next_part;
        self.next_part += 1;
        let (bucket, path, id, parts) = (
            self.bucket.clone(),
            self.path.clone(),
            self.id.clone(),
            self.parts.clone(),
        );
        Box::pin(async move {
            let part = bucket.put_part(&path, &id, index, data).await?;
            let mut parts = parts.lock().unwrap_or_else(|e| e.into_inner());
            if parts.len() <= index {
                parts.resize(index + 1, None);
            }
            parts[index] = Some(part);
            Ok(())
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let parts: Option<Vec<PartId>> =
            std::mem::take(&mut *self.parts.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        let parts = parts.ok_or_else(|| object_store::Error::Generic {
            store: "kiln",
            source: "a part of the upload never finished".into(),
        })?;
        let done = self
            .bucket
            .complete_multipart(&self.path, &self.id, parts)
            .await?;
        self.forget_marker().await;
        Ok(done)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        let aborted = self.bucket.abort_multipart(&self.path, &self.id).await;
        self.forget_marker().await;
        aborted
    }
}

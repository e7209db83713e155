//! The storage every server command opens: blobs on the filesystem behind a size limit
//! with LRU eviction (or, with `[storage] backend = "s3"`, in a bucket behind that same
//! filesystem store as a local tier), and metadata on sled under the data directory.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use kiln_object_store::{ObjectBlobStore, ObjectStoreOptions};
use kiln_store::{
    BlobStore, BoundedBlobStore, FsBlobStore, MetadataStore, SledMetadataStore, TieredBlobStore,
};

use crate::config::CasConfig;
use crate::storage_config::StorageConfig;

pub struct Storage {
    /// What the servers hold, as any `BlobStore`.
    pub blobs: Arc<dyn BlobStore>,
    /// The bounded filesystem store, for its eviction loop and what it must retain: the
    /// whole blob store, or the local tier in front of the bucket.
    pub bounded: Arc<BoundedBlobStore>,
    /// Whether `bounded` holds the only copy of a blob. A local tier does not, so the
    /// registry's blobs need not be kept in it.
    pub bounded_is_authoritative: bool,
    pub metadata: Arc<dyn MetadataStore>,
}

impl Storage {
    pub async fn open(
        data_dir: &Path,
        cas: &CasConfig,
        backend: &StorageConfig,
    ) -> anyhow::Result<Self> {
        let files = FsBlobStore::open(data_dir.join("cas"))
            .with_context(|| format!("opening the blob store in {}", data_dir.display()))?;
        let stored = files.stored_bytes().await?;
        let policy = cas.policy(data_dir, stored)?;
        tracing::info!(
            max = %bytesize::ByteSize::b(policy.max_bytes),
            held = %bytesize::ByteSize::b(stored),
            "blob store limit (cas.max_bytes)"
        );
        let bounded = Arc::new(BoundedBlobStore::new(Arc::new(files), policy).await?);
        let metadata = SledMetadataStore::open(data_dir.join("metadata"))
            .with_context(|| format!("opening the metadata store in {}", data_dir.display()))?;
        let (blobs, bounded_is_authoritative): (Arc<dyn BlobStore>, bool) = match backend {
            StorageConfig::Fs => (bounded.clone(), true),
            StorageConfig::S3(settings) => {
                let client = kiln_object_store::connect_s3(settings)
                    .context("configuring the S3 client ([storage])")?;
                let options = ObjectStoreOptions {
                    prefix: settings.prefix.clone(),
                    ..Default::default()
                };
                let bucket = ObjectBlobStore::open(client, options)
                    .await
                    .with_context(|| format!("opening bucket {:?}", settings.bucket))?;
                tracing::info!(
                    bucket = %settings.bucket,
                    endpoint = settings.endpoint.as_deref().unwrap_or("AWS"),
                    prefix = %settings.prefix,
                    "blobs in S3, with a local tier in the data directory"
                );
                let tiered = TieredBlobStore::new(bounded.clone(), Arc::new(bucket));
                (Arc::new(tiered), false)
            }
        };
        Ok(Storage {
            blobs,
            bounded,
            bounded_is_authoritative,
            metadata: Arc::new(metadata),
        })
    }
}

//! The storage every server command opens: blobs on the filesystem behind a size limit
//! with LRU eviction (or, with `[storage] backend = "s3"`, in a bucket behind that same
//! filesystem store as a local tier), and metadata on sled under the data directory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_object_store::{ObjectBlobStore, ObjectStoreOptions, S3Settings};
use kiln_postgres::PostgresMetadataStore;
use kiln_store::{
    BlobStore, BoundedBlobStore, EvictionPolicy, FsBlobStore, MetadataStore, SledMetadataStore,
    TieredBlobStore,
};

use crate::config::CasConfig;
use crate::storage_config::{MetadataConfig, StorageConfig};

/// How often the bucket is listed for blobs past their age: a listing of a large bucket
/// is thousands of requests.
const BUCKET_EVICTION_INTERVAL: Duration = Duration::from_secs(3600);

pub struct Storage {
    /// What the servers hold, as any `BlobStore`.
    pub blobs: Arc<dyn BlobStore>,
    /// Every bounded store, each with its own eviction loop: the filesystem store (the
    /// whole blob store, or the local tier), then the bucket's.
    pub bounded: Vec<Arc<BoundedBlobStore>>,
    /// The one that holds the only copy of each blob: its eviction must keep what the
    /// registry answers for (a local tier need not: the bucket keeps it).
    pub authoritative: Arc<BoundedBlobStore>,
    pub metadata: Arc<dyn MetadataStore>,
}

impl Storage {
    pub async fn open(
        data_dir: &Path,
        cas: &CasConfig,
        backend: &StorageConfig,
        metadata: &MetadataConfig,
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
        let local = Arc::new(BoundedBlobStore::new(Arc::new(files), policy.clone()).await?);
        let metadata = open_metadata(data_dir, metadata).await?;
        match backend {
            StorageConfig::Fs => Ok(Storage {
                blobs: local.clone(),
                bounded: vec![local.clone()],
                authoritative: local,
                metadata,
            }),
            StorageConfig::S3(settings) => {
                let bucket = Arc::new(open_bucket(settings, &policy).await?);
                let tiered = TieredBlobStore::new(local.clone(), bucket.clone());
                Ok(Storage {
                    blobs: Arc::new(tiered),
                    bounded: vec![local, bucket.clone()],
                    authoritative: bucket,
                    metadata,
                })
            }
        }
    }
}

async fn open_metadata(
    data_dir: &Path,
    config: &MetadataConfig,
) -> anyhow::Result<Arc<dyn MetadataStore>> {
    Ok(match config {
        MetadataConfig::Sled => Arc::new(
            SledMetadataStore::open(data_dir.join("metadata"))
                .with_context(|| format!("opening the metadata store in {}", data_dir.display()))?,
        ),
        MetadataConfig::Postgres(settings) => Arc::new(
            PostgresMetadataStore::connect(settings)
                .await
                .context("opening the metadata store in PostgreSQL ([metadata])")?,
        ),
    })
}

/// The bucket, with no size limit and eviction by age (`evict_unused_after_days`), within
/// the same grace as the local store.
async fn open_bucket(
    settings: &S3Settings,
    local: &EvictionPolicy,
) -> anyhow::Result<BoundedBlobStore> {
    let client =
        kiln_object_store::connect_s3(settings).context("configuring the S3 client ([storage])")?;
    let options = ObjectStoreOptions {
        prefix: settings.prefix.clone(),
        ..Default::default()
    };
    let bucket = ObjectBlobStore::open(client, options)
        .await
        .with_context(|| format!("opening bucket {:?}", settings.bucket))?;
    let days = settings.evict_unused_after_days;
    tracing::info!(
        bucket = %settings.bucket,
        endpoint = settings.endpoint.as_deref().unwrap_or("AWS"),
        prefix = %settings.prefix,
        evict_unused_after_days = days,
        "blobs in S3, with a local tier in the data directory"
    );
    let policy = EvictionPolicy {
        max_age: (days > 0).then(|| Duration::from_secs(days * 86_400)),
        interval: BUCKET_EVICTION_INTERVAL,
        grace: local.grace,
        ..EvictionPolicy::with_max_bytes(u64::MAX)
    };
    Ok(BoundedBlobStore::labelled(Arc::new(bucket), policy, "bucket").await?)
}

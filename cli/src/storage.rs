//! The embedded storage every server command opens: blobs on the filesystem behind a
//! size limit with LRU eviction, metadata on sled, both under the data directory.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use kiln_store::{BlobStore, BoundedBlobStore, FsBlobStore, MetadataStore, SledMetadataStore};

use crate::config::CasConfig;

pub struct Storage {
    /// What the servers hold: the bounded store, as any `BlobStore`.
    pub blobs: Arc<dyn BlobStore>,
    /// The same store, for its eviction loop and the registry's retained blobs.
    pub bounded: Arc<BoundedBlobStore>,
    pub metadata: Arc<dyn MetadataStore>,
}

impl Storage {
    pub async fn open(data_dir: &Path, cas: &CasConfig) -> anyhow::Result<Self> {
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
        Ok(Storage {
            blobs: bounded.clone(),
            bounded,
            metadata: Arc::new(metadata),
        })
    }
}

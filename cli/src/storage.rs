//! The embedded storage every server command opens: blobs on the filesystem, metadata
//! on sled, both under the data directory.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use kiln_store::{BlobStore, FsBlobStore, MetadataStore, SledMetadataStore};

pub struct Storage {
    pub blobs: Arc<dyn BlobStore>,
    pub metadata: Arc<dyn MetadataStore>,
}

impl Storage {
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let blobs = FsBlobStore::open(data_dir.join("cas"))
            .with_context(|| format!("opening the blob store in {}", data_dir.display()))?;
        let metadata = SledMetadataStore::open(data_dir.join("metadata"))
            .with_context(|| format!("opening the metadata store in {}", data_dir.display()))?;
        Ok(Storage {
            blobs: Arc::new(blobs),
            metadata: Arc::new(metadata),
        })
    }
}

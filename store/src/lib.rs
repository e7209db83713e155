//! kiln-store: content-addressed blob storage and the metadata store.
//!
//! - [`Digest`] and [`ContentHash`] name blobs by SHA-256 or BLAKE3.
//! - [`BlobStore`] is the trait every blob backend implements; [`FsBlobStore`] keeps one
//!   file per blob and makes a blob visible only after it was hashed, checked and fsynced.
//! - [`BoundedBlobStore`] puts a size limit in front of any backend: writes past it are
//!   refused, and least recently used blobs are evicted between two watermarks.
//! - [`TieredBlobStore`] puts a fast local store in front of a slow shared one (an
//!   object store): writes go through, reads fill the fast tier.
//! - [`MetadataStore`] holds small records (the action cache, tags, sessions):
//!   [`SledMetadataStore`] embedded, [`MemoryMetadataStore`] for tests. Blobs never go
//!   there.
//! - [`validate_repository_name`] and [`validate_tag`] are the OCI grammar for names.

mod action_cache;
mod blob_store;
mod bounded_blob_store;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod digest;
mod error;
mod fs_blob_store;
mod memory_blob_store;
mod metadata;
mod oci_name;
mod reapi_names;
mod tiered_blob_store;

pub use action_cache::{ActionCache, TrimReport};
pub use blob_store::{
    check_upload_id, confirm_presence, read_len, BlobInfo, BlobStore, BlobWriter, ChunkStream,
    ExpectedDigest,
};
pub use bounded_blob_store::{BoundedBlobStore, EvictionPolicy, EvictionReport, RetainedBlobs};
pub use digest::{ContentHash, Digest, DigestFunction, Hasher};
pub use error::{Result, StoreError};
pub use fs_blob_store::FsBlobStore;
pub use memory_blob_store::MemoryBlobStore;
pub use metadata::{
    scan_stream, scan_stream_after, Entry, Keyspace, MemoryMetadataStore, MetadataError,
    MetadataResult, MetadataStore, SledMetadataStore, WriteBatch, MAX_SCAN_PAGE,
};
pub use oci_name::{
    validate_repository_name, validate_tag, NameError, MAX_REPOSITORY_NAME_LEN, MAX_TAG_LEN,
};
pub use reapi_names::{
    missing_blob_subject, parse_missing_blob_subject, Compression, ResourceName, ResourceNameError,
    MISSING_VIOLATION, RESERVED_SEGMENTS,
};
pub use tiered_blob_store::TieredBlobStore;

/// Both conformance suites on each of this crate's backends.
#[cfg(test)]
mod conformance_tests {
    use std::sync::Arc;

    use crate::conformance;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fs_blob_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::FsBlobStore::open(dir.path()).unwrap();
        conformance::blob_store::all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tiered_blob_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let fast = crate::FsBlobStore::open(dir.path()).unwrap();
        let slow = crate::MemoryBlobStore::new();
        let store = crate::TieredBlobStore::new(Arc::new(fast), Arc::new(slow));
        conformance::blob_store::all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_blob_store_conforms() {
        conformance::blob_store::all(&crate::MemoryBlobStore::new()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sled_metadata_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::SledMetadataStore::open(dir.path()).unwrap();
        conformance::metadata_store::all(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_metadata_store_conforms() {
        conformance::metadata_store::all(Arc::new(crate::MemoryMetadataStore::new())).await;
    }
}

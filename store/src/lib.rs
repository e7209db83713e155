//! kiln-store: content-addressed blob storage and the metadata store.
//!
//! - [`Digest`] and [`ContentHash`] name blobs by SHA-256 or BLAKE3.
//! - [`BlobStore`] is the trait every blob backend implements; [`FsBlobStore`] keeps one
//!   file per blob and makes a blob visible only after it was hashed, checked and fsynced.
//! - [`MetadataStore`] holds small records (the action cache, tags, sessions) on sled.
//!   Blobs never go there.
//! - [`validate_repository_name`] and [`validate_tag`] are the OCI grammar for names.

mod action_cache;
mod blob_store;
mod digest;
mod error;
mod fs_blob_store;
mod metadata;
mod oci_name;

pub use action_cache::ActionCache;
pub use blob_store::{BlobInfo, BlobStore, BlobWriter, ChunkStream, ExpectedDigest};
pub use digest::{ContentHash, Digest, DigestFunction, Hasher};
pub use error::{Result, StoreError};
pub use fs_blob_store::FsBlobStore;
pub use metadata::{Keyspace, MetadataStore, SledMetadataStore};
pub use oci_name::{
    validate_repository_name, validate_tag, NameError, MAX_REPOSITORY_NAME_LEN, MAX_TAG_LEN,
};

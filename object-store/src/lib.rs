//! kiln-object-store: the [`BlobStore`](kiln_store::BlobStore) on object storage.
//!
//! [`ObjectBlobStore`] keeps blobs in any `object_store` backend that also offers
//! multipart uploads by id ([`Bucket`]). kiln builds it with S3
//! only ([`S3Settings`]: AWS, Garage, MinIO, Ceph and the like), which is what its tests run
//! against (Garage). It implements the same trait as the filesystem store, so the
//! coordinator and the registry hold it without knowing; put it behind a
//! `TieredBlobStore` so hot blobs are served from local disk.
//!
//! How it keeps the trait's promises on a store without rename or append:
//! - **nothing unverified is visible**: a small blob is hashed in memory and then written
//!   under its content key with one PUT; a large one streams as a multipart upload to a
//!   staging key, is completed only once its hash and size match, and is then copied under
//!   its content key (server side) and the staging object deleted; every multipart
//!   upload is recorded first, so one a crash interrupts is aborted by the sweep;
//! - **resumable uploads** keep what a writer received as a segment object per writer,
//!   so any replica can resume them; the commit reads the segments back, hashes them,
//!   and writes the content key only if they match;
//! - **FindMissingBlobs** is answered from a presence index with bounded staleness
//!   (`presence`), never one request per digest;
//! - **access times** live in the bucket as empty markers (`access_marks`), shared by
//!   every replica, so eviction by age sees any replica's use.

mod access_marks;
mod layout;
mod object_blob_store;
mod presence;
mod s3;
mod tracked_upload;
mod writer;

pub use object_blob_store::{ObjectBlobStore, ObjectStoreOptions};
pub use s3::{connect_s3, S3Settings, SecretString};
pub use tracked_upload::Bucket;

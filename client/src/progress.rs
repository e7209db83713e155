//! Progress callbacks. The library reports; the CLI draws (with indicatif), tests count.

use crate::outcomes::{HashStats, ShardOutcome, UploadStats};

/// Receives progress events from hashing, uploading and executing. Every method has a
/// no-op default, so an implementation picks what it shows.
pub trait Progress: Send + Sync {
    /// Hashing begins: `files` files with `bytes` bytes are not in the digest cache.
    fn hashing_started(&self, _files: u64, _bytes: u64) {}
    fn hashed_bytes(&self, _bytes: u64) {}
    fn hashing_finished(&self, _stats: &HashStats) {}

    /// Uploading begins: `blobs` blobs with `bytes` bytes are missing from the CAS.
    fn upload_started(&self, _blobs: u64, _bytes: u64) {}
    fn uploaded_bytes(&self, _bytes: u64) {}
    fn upload_finished(&self, _stats: &UploadStats) {}

    fn execution_started(&self, _shards: u32) {}
    /// One shard finished (successfully or not), outputs already downloaded.
    fn shard_finished(&self, _outcome: &ShardOutcome) {}
}

/// Shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {}

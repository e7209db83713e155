//! What the client's passes report: hashing, uploading, and how each shard ended. A leaf
//! module, so that the passes and the [`Progress`](crate::Progress) trait that receives
//! these reports both depend on it and not on each other.

use std::path::PathBuf;

use bytes::Bytes;
use kiln_proto::reapi;
use kiln_store::Digest;

use crate::Result;

/// Counts from one hashing pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashStats {
    pub files: u64,
    pub bytes: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Files whose contents were read and hashed this time.
    pub hashed_files: u64,
    /// Files whose digest came from the digest cache.
    pub cached_files: u64,
}

/// What one upload pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Blobs the server was asked about.
    pub checked: u64,
    /// Blobs it was missing, and that were uploaded.
    pub uploaded_blobs: u64,
    pub uploaded_bytes: u64,
    /// Of those, how many went through BatchUpdateBlobs (the rest through ByteStream).
    pub batched_blobs: u64,
}

/// How one shard ended.
#[derive(Debug)]
pub struct ShardOutcome {
    pub index: u32,
    pub total: u32,
    pub action_digest: Digest,
    pub result: Result<ShardResult>,
}

/// A shard whose action ran (or was found in the cache) and whose outputs were placed.
#[derive(Debug)]
pub struct ShardResult {
    pub exit_code: i32,
    /// Served from the action cache rather than executed.
    pub cached: bool,
    /// The ExecuteResponse's status when it was not OK (a timeout, say).
    pub error_status: Option<tonic::Status>,
    /// The server's message for humans (ExecuteResponse.message), if any.
    pub message: String,
    pub stdout: Bytes,
    pub stderr: Bytes,
    pub action_result: reapi::ActionResult,
    pub action_result_digest: Digest,
    /// The local paths written.
    pub outputs: Vec<PathBuf>,
}

impl ShardOutcome {
    /// The shard's exit code under the rules in the module documentation.
    pub fn exit_code(&self) -> i32 {
        match &self.result {
            Err(_) => 1,
            Ok(result) if result.error_status.is_some() && result.exit_code == 0 => 1,
            Ok(result) => result.exit_code,
        }
    }

    pub fn label(&self) -> String {
        format!("shard {}/{}", self.index, self.total)
    }
}

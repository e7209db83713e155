use crate::{ContentHash, Digest};

/// Everything that can go wrong in kiln-store. The protocol crates map these to
/// `tonic::Status` and OCI error bodies at their edges.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid digest: {0}")]
    InvalidDigest(String),
    #[error("unsupported digest function: {0}")]
    UnsupportedDigestFunction(String),
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob not found: {0}")]
    NotFound(ContentHash),
    #[error("offset {offset} is past the end of a {size}-byte blob")]
    OffsetOutOfRange { offset: u64, size: u64 },
    /// The store is at its size limit and eviction cannot free space now (everything left
    /// is retained or recently used). A client may retry later.
    #[error("the blob store is full ({limit} bytes); eviction cannot free space now")]
    Full { limit: u64 },
    /// A request went past a bound the store keeps (e.g. the pieces one resumable upload
    /// may be kept in); the client must start over rather than retry as is.
    #[error("{0}")]
    LimitExceeded(String),
    /// A remote backend (an object store) could not be reached or failed after its
    /// retries. Says what failed, never credentials; the client may retry later.
    #[error("the blob backend is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Metadata(#[from] crate::MetadataError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

//! Reading a REAPI message (Action, Command, Directory, Tree) out of the CAS into memory,
//! within a size limit checked against the digest before a byte is read: the digest's
//! size is the client's claim, and a multi-GB blob named as an Action must not become a
//! multi-GB buffer.

use bytes::Bytes;
use kiln_store::{BlobStore, Digest};

use crate::CoordinatorError;

/// The blob `digest` names, if it is at most `max_bytes` long; `field` names the request
/// field that referenced it, for the INVALID_ARGUMENT otherwise.
pub(crate) async fn read_message_blob(
    blobs: &dyn BlobStore,
    digest: &Digest,
    max_bytes: u64,
    field: impl FnOnce() -> String,
) -> Result<Bytes, CoordinatorError> {
    check_message_size(digest, max_bytes, field)?;
    Ok(blobs.read_all(digest).await?)
}

/// INVALID_ARGUMENT when `digest` is larger than a message read into memory may be.
pub(crate) fn check_message_size(
    digest: &Digest,
    max_bytes: u64,
    field: impl FnOnce() -> String,
) -> Result<(), CoordinatorError> {
    if digest.size > max_bytes {
        return Err(CoordinatorError::bad_request(
            field(),
            format!(
                "names a {}-byte message; messages read into memory are limited to {max_bytes} bytes (coordinator.max_message_bytes)",
                digest.size
            ),
        ));
    }
    Ok(())
}

//! Conversions between REAPI's wire digests and kiln-store's [`Digest`].

use kiln_proto::reapi;
use kiln_store::{Digest, DigestFunction};

use crate::ClientError;

pub fn to_reapi(digest: &Digest) -> reapi::Digest {
    reapi::Digest {
        hash: digest.hex(),
        size_bytes: digest.size as i64,
    }
}

/// Parses a digest the server sent; `what` names the field in the error.
pub fn from_reapi(
    function: DigestFunction,
    digest: Option<&reapi::Digest>,
    what: &str,
) -> Result<Digest, ClientError> {
    let digest =
        digest.ok_or_else(|| ClientError::InvalidResponse(format!("{what} has no digest")))?;
    Digest::parse_reapi(function, &digest.hash, digest.size_bytes)
        .map_err(|e| ClientError::InvalidResponse(format!("{what}: {e}")))
}

//! Parsing the digests a server sends, with errors that name the field
//! ([`Digest::to_reapi`] is the other direction).

use kiln_proto::reapi;
use kiln_store::{Digest, DigestFunction};

use crate::ClientError;

/// Parses a digest the server sent; `what` names the field in the error.
pub fn from_reapi(
    function: DigestFunction,
    digest: Option<&reapi::Digest>,
    what: &str,
) -> Result<Digest, ClientError> {
    let digest =
        digest.ok_or_else(|| ClientError::InvalidResponse(format!("{what} has no digest")))?;
    Digest::from_reapi(function, digest)
        .map_err(|e| ClientError::InvalidResponse(format!("{what}: {e}")))
}

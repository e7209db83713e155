//! Conversions between REAPI's wire digests and kiln-store's [`Digest`].

use kiln_proto::reapi;
use kiln_store::{Digest, DigestFunction};

use crate::CoordinatorError;

/// The digest function a request names in its `digest_function` field.
///
/// UNKNOWN (0) means SHA-256: clients older than REAPI 2.3 never set the field, and both
/// supported functions have 64-hex-digit hashes, so the hash length cannot tell them apart.
pub(crate) fn digest_function(value: i32) -> Result<DigestFunction, CoordinatorError> {
    DigestFunction::from_reapi_value(value).map_err(|_| {
        let name = reapi::digest_function::Value::try_from(value)
            .map(|v| v.as_str_name().to_string())
            .unwrap_or_else(|_| value.to_string());
        CoordinatorError::bad_request(
            "digest_function",
            format!("{name} is not supported; use SHA256 or BLAKE3"),
        )
    })
}

/// Parses a digest field, naming `field` in the error when it is absent or malformed.
pub(crate) fn parse(
    function: DigestFunction,
    digest: Option<&reapi::Digest>,
    field: impl FnOnce() -> String,
) -> Result<Digest, CoordinatorError> {
    let Some(digest) = digest else {
        return Err(CoordinatorError::bad_request(field(), "is required"));
    };
    Digest::parse_reapi(function, &digest.hash, digest.size_bytes)
        .map_err(|e| CoordinatorError::bad_request(field(), e))
}

/// Parses a repeated digest field; errors name the entry, e.g. `blob_digests[3]`.
pub(crate) fn parse_all(
    function: DigestFunction,
    digests: &[reapi::Digest],
    field: &str,
) -> Result<Vec<Digest>, CoordinatorError> {
    digests
        .iter()
        .enumerate()
        .map(|(i, d)| parse(function, Some(d), || format!("{field}[{i}]")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_means_sha256_and_unknown_functions_are_refused() {
        assert_eq!(digest_function(0).unwrap(), DigestFunction::Sha256);
        assert_eq!(digest_function(9).unwrap(), DigestFunction::Blake3);
        let err = digest_function(reapi::digest_function::Value::Md5 as i32).unwrap_err();
        assert!(err.to_string().contains("MD5"), "{err}");
        assert!(digest_function(1234).is_err());
    }

    #[test]
    fn round_trips_and_names_the_field() {
        let digest = Digest::of_bytes(DigestFunction::Blake3, b"abc");
        let wire = digest.to_reapi();
        assert_eq!(
            parse(DigestFunction::Blake3, Some(&wire), || "x".into()).unwrap(),
            digest
        );
        let err = parse(DigestFunction::Sha256, None, || "blob_digests[3]".into()).unwrap_err();
        assert!(err.to_string().contains("blob_digests[3]"), "{err}");
    }
}

//! The one place kiln's [`ContentHash`] and oci-spec's descriptor digest meet: where
//! manifests and configs are written or read. Everywhere else digests are `ContentHash`.

use kiln_store::ContentHash;

use crate::error::{PublishError, Result};

/// The digest an OCI descriptor carries for `hash`.
pub(crate) fn oci_digest(hash: &ContentHash) -> oci_spec::image::Digest {
    // `sha256:` or `blake3:` and 64 lower-case hex digits always fit the OCI digest
    // grammar, so this cannot fail.
    oci_spec::image::Digest::try_from(hash.oci())
        .expect("a ContentHash is always a well-formed OCI digest")
}

/// The hash an OCI descriptor names; `what` says whose digest it is, for the error when
/// kiln cannot use it (a function other than sha256 or blake3).
pub(crate) fn content_hash(digest: &oci_spec::image::Digest, what: &str) -> Result<ContentHash> {
    ContentHash::parse_oci(digest.as_ref()).map_err(|source| PublishError::InvalidDigest {
        what: format!("{what} {digest}"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_convert_both_ways() {
        let hash: ContentHash = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let oci = oci_digest(&hash);
        assert_eq!(oci.to_string(), hash.to_string());
        assert_eq!(content_hash(&oci, "layer").unwrap(), hash);
    }

    #[test]
    fn digests_kiln_cannot_name_are_refused() {
        let sha512: oci_spec::image::Digest =
            format!("sha512:{}", "a".repeat(128)).parse().unwrap();
        let err = content_hash(&sha512, "base layer").unwrap_err();
        assert!(
            matches!(&err, PublishError::InvalidDigest { what, .. } if what.starts_with("base layer sha512:")),
            "{err}"
        );
    }
}

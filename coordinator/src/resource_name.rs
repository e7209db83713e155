//! ByteStream resource names, as REAPI defines them:
//!
//! - reads: `{instance}/blobs/{function/}{hash}/{size}` and
//!   `{instance}/compressed-blobs/{compressor}/{function/}{hash}/{size}`;
//! - writes: `{instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}{/metadata}` and
//!   `{instance}/uploads/{uuid}/compressed-blobs/{compressor}/{function/}{hash}/{size}{/metadata}`.
//!
//! The instance name may span several segments (or none); REAPI reserves the keywords
//! below so that the first one found marks where the instance name ends. The function
//! segment is omitted for SHA-256 (and accepted when present).

use kiln_store::{Digest, DigestFunction};

use crate::CoordinatorError;

const RESERVED: [&str; 7] = [
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// How the bytes of a ByteStream call are encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    Identity,
    Zstd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResourceName {
    pub instance_name: String,
    /// The client's upload id; present on writes only.
    pub upload_uuid: Option<String>,
    pub compression: Compression,
    /// The digest of the uncompressed blob.
    pub digest: Digest,
}

impl ResourceName {
    pub(crate) fn parse_read(name: &str) -> Result<Self, CoordinatorError> {
        let parsed = Self::parse(name, false)?;
        if parsed.upload_uuid.is_some() {
            return Err(invalid(name, "a read names blobs/…, not uploads/…"));
        }
        Ok(parsed)
    }

    pub(crate) fn parse_write(name: &str) -> Result<Self, CoordinatorError> {
        let parsed = Self::parse(name, true)?;
        if parsed.upload_uuid.is_none() {
            return Err(invalid(name, "a write names uploads/{uuid}/…"));
        }
        Ok(parsed)
    }

    fn parse(name: &str, trailing_metadata_allowed: bool) -> Result<Self, CoordinatorError> {
        let segments: Vec<&str> = name.split('/').collect();
        let keyword_at = segments
            .iter()
            .position(|s| RESERVED.contains(s))
            .ok_or_else(|| invalid(name, "no blobs/, compressed-blobs/ or uploads/ segment"))?;
        let instance_name = segments[..keyword_at].join("/");
        let mut rest = segments[keyword_at..].iter().copied();
        let mut next = |what: &str| {
            rest.next()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| invalid(name, format!("{what} is missing")))
        };

        let mut keyword = next("blobs")?;
        let upload_uuid = if keyword == "uploads" {
            let uuid = next("the upload uuid")?;
            keyword = next("blobs")?;
            Some(uuid.to_string())
        } else {
            None
        };
        let compression = match keyword {
            "blobs" => Compression::Identity,
            "compressed-blobs" => match next("the compressor")? {
                "zstd" => Compression::Zstd,
                other => {
                    return Err(invalid(
                        name,
                        format!("compressor {other:?} is not supported; use zstd"),
                    ))
                }
            },
            other => {
                return Err(invalid(
                    name,
                    format!("{other:?} is not a blob resource; expected blobs or compressed-blobs"),
                ))
            }
        };

        let mut hash = next("the hash")?;
        let mut function = DigestFunction::Sha256;
        // A 64-character segment is a hash; anything else in its place names the function.
        if hash.len() != 64 {
            function = DigestFunction::from_name(hash).ok_or_else(|| {
                invalid(
                    name,
                    format!("digest function {hash:?} is not supported; use sha256 or blake3"),
                )
            })?;
            hash = next("the hash")?;
        }
        let size = next("the size")?;
        let size: i64 = size
            .parse()
            .map_err(|_| invalid(name, format!("size {size:?} is not a number")))?;
        let digest = Digest::parse_reapi(function, hash, size).map_err(|e| invalid(name, e))?;
        if !trailing_metadata_allowed && rest.next().is_some() {
            return Err(invalid(name, "unexpected segments after the size"));
        }
        Ok(ResourceName {
            instance_name,
            upload_uuid,
            compression,
            digest,
        })
    }
}

fn invalid(name: &str, why: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::bad_request(
        "resource_name",
        format!("{name:?} is not a valid resource name: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(function: DigestFunction) -> Digest {
        Digest::of_bytes(function, b"hello")
    }

    #[test]
    fn plain_read_without_instance() {
        let d = digest(DigestFunction::Sha256);
        let parsed = ResourceName::parse_read(&format!("blobs/{}", d.reapi())).unwrap();
        assert_eq!(parsed.instance_name, "");
        assert_eq!(parsed.upload_uuid, None);
        assert_eq!(parsed.compression, Compression::Identity);
        assert_eq!(parsed.digest, d);
    }

    #[test]
    fn instance_names_may_span_segments() {
        let d = digest(DigestFunction::Sha256);
        let parsed = ResourceName::parse_read(&format!("team/a/main/blobs/{}", d.reapi())).unwrap();
        assert_eq!(parsed.instance_name, "team/a/main");
    }

    #[test]
    fn blake3_segment_selects_the_function() {
        let d = digest(DigestFunction::Blake3);
        let parsed = ResourceName::parse_read(&format!("i/blobs/blake3/{}", d.reapi())).unwrap();
        assert_eq!(parsed.digest, d);
        let explicit_sha = digest(DigestFunction::Sha256);
        let parsed =
            ResourceName::parse_read(&format!("blobs/sha256/{}", explicit_sha.reapi())).unwrap();
        assert_eq!(parsed.digest, explicit_sha);
    }

    #[test]
    fn compressed_reads_and_writes() {
        let d = digest(DigestFunction::Blake3);
        let read = ResourceName::parse_read(&format!("compressed-blobs/zstd/blake3/{}", d.reapi()))
            .unwrap();
        assert_eq!(read.compression, Compression::Zstd);
        assert_eq!(read.digest, d);

        let sha = digest(DigestFunction::Sha256);
        let write = ResourceName::parse_write(&format!(
            "x/uploads/0b7c/compressed-blobs/zstd/{}",
            sha.reapi()
        ))
        .unwrap();
        assert_eq!(write.instance_name, "x");
        assert_eq!(write.upload_uuid.as_deref(), Some("0b7c"));
        assert_eq!(write.compression, Compression::Zstd);
        assert_eq!(write.digest, sha);
    }

    #[test]
    fn writes_may_carry_trailing_metadata() {
        let d = digest(DigestFunction::Sha256);
        let name = format!("uploads/u-1/blobs/{}/some/metadata", d.reapi());
        let parsed = ResourceName::parse_write(&name).unwrap();
        assert_eq!(parsed.upload_uuid.as_deref(), Some("u-1"));
        assert_eq!(parsed.digest, d);
        // …but reads may not.
        assert!(ResourceName::parse_read(&format!("blobs/{}/extra", d.reapi())).is_err());
    }

    #[test]
    fn malformed_names_are_refused() {
        let d = digest(DigestFunction::Sha256);
        let hash = d.hex();
        for name in [
            String::new(),
            "blobs".to_string(),
            format!("blobs/{hash}"),
            format!("blobs/{hash}/-1"),
            format!("blobs/{hash}/five"),
            format!("blobs/{}/5", &hash[..10]),
            format!("blobs/{}/5", hash.to_uppercase()),
            format!("blobs/md5/{hash}/5"),
            format!("compressed-blobs/gzip/{hash}/5"),
            format!("compressed-blobs//{hash}/5"),
            format!("actions/{hash}/5"),
            format!("instance/{hash}/5"),
        ] {
            let err = ResourceName::parse_read(&name).unwrap_err();
            assert!(
                matches!(err, CoordinatorError::BadRequest { ref field, .. } if field == "resource_name"),
                "{name:?}: {err}"
            );
        }
    }

    #[test]
    fn reads_and_writes_are_not_interchangeable() {
        let d = digest(DigestFunction::Sha256);
        assert!(ResourceName::parse_write(&format!("blobs/{}", d.reapi())).is_err());
        assert!(ResourceName::parse_read(&format!("uploads/u/blobs/{}", d.reapi())).is_err());
        assert!(ResourceName::parse_write(&format!("uploads//blobs/{}", d.reapi())).is_err());
    }
}

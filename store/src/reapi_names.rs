//! REAPI's names for blobs, built and parsed in one place for every client and server:
//!
//! - ByteStream resource names ([`ResourceName`]):
//!   - reads: `{instance}/blobs/{function/}{hash}/{size}` and
//!     `{instance}/compressed-blobs/{compressor}/{function/}{hash}/{size}`;
//!   - writes: `{instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}{/metadata}` and
//!     `{instance}/uploads/{uuid}/compressed-blobs/{compressor}/{function/}{hash}/{size}{/metadata}`.
//! - the subject of a `MISSING` precondition violation ([`missing_blob_subject`],
//!   [`parse_missing_blob_subject`]): `blobs/{hash}/{size}`.
//!
//! The instance name may span several segments (or none); REAPI reserves the keywords
//! below so that the first one found marks where the instance name ends. The function
//! segment is omitted for SHA-256 when formatting, and accepted when present.

use std::fmt;

use crate::{Digest, DigestFunction};

/// Path segments that end an instance name in a resource name (an instance name cannot
/// contain them).
pub const RESERVED_SEGMENTS: [&str; 7] = [
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// The `type` of a precondition violation naming a blob the CAS lacks.
pub const MISSING_VIOLATION: &str = "MISSING";

/// How the bytes of a ByteStream call are encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Identity,
    Zstd,
}

/// A ByteStream resource name, parsed or to be formatted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceName {
    pub instance_name: String,
    /// The client's upload id; present on writes only.
    pub upload_uuid: Option<String>,
    pub compression: Compression,
    /// The digest of the uncompressed blob.
    pub digest: Digest,
}

/// Why a resource name was refused (a message for the client).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not a valid resource name: {reason}")]
pub struct ResourceNameError {
    pub name: String,
    pub reason: String,
}

impl ResourceName {
    /// The name to read `digest` under, uncompressed.
    pub fn read(instance_name: &str, digest: Digest) -> Self {
        ResourceName {
            instance_name: instance_name.to_string(),
            upload_uuid: None,
            compression: Compression::Identity,
            digest,
        }
    }

    /// The name to upload `digest` under, with a fresh upload id.
    pub fn write(instance_name: &str, digest: Digest) -> Self {
        ResourceName {
            upload_uuid: Some(uuid::Uuid::new_v4().to_string()),
            ..Self::read(instance_name, digest)
        }
    }

    pub fn parse_read(name: &str) -> Result<Self, ResourceNameError> {
        let parsed = Self::parse(name, false)?;
        if parsed.upload_uuid.is_some() {
            return Err(invalid(name, "a read names blobs/…, not uploads/…"));
        }
        Ok(parsed)
    }

    pub fn parse_write(name: &str) -> Result<Self, ResourceNameError> {
        let parsed = Self::parse(name, true)?;
        if parsed.upload_uuid.is_none() {
            return Err(invalid(name, "a write names uploads/{uuid}/…"));
        }
        Ok(parsed)
    }

    fn parse(name: &str, trailing_metadata_allowed: bool) -> Result<Self, ResourceNameError> {
        let segments: Vec<&str> = name.split('/').collect();
        let keyword_at = segments
            .iter()
            .position(|s| RESERVED_SEGMENTS.contains(s))
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

impl fmt::Display for ResourceName {
    /// The canonical form: the function segment only where it is not SHA-256, no
    /// trailing metadata.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.instance_name.is_empty() {
            write!(f, "{}/", self.instance_name)?;
        }
        if let Some(uuid) = &self.upload_uuid {
            write!(f, "uploads/{uuid}/")?;
        }
        match self.compression {
            Compression::Identity => f.write_str("blobs/")?,
            Compression::Zstd => f.write_str("compressed-blobs/zstd/")?,
        }
        if self.digest.function != DigestFunction::Sha256 {
            write!(f, "{}/", self.digest.function.name())?;
        }
        write!(f, "{}/{}", self.digest.hex(), self.digest.size)
    }
}

/// The subject of a `MISSING` violation for `digest`.
pub fn missing_blob_subject(digest: &Digest) -> String {
    format!("blobs/{}", digest.reapi())
}

/// The blob a `MISSING` violation's subject names, for an action hashed with
/// `function`. Some servers name the function too (`blobs/blake3/{hash}/{size}`).
pub fn parse_missing_blob_subject(function: DigestFunction, subject: &str) -> Option<Digest> {
    let subject = subject.strip_prefix("blobs/")?;
    let subject = subject
        .strip_prefix(function.name())
        .and_then(|s| s.strip_prefix('/'))
        .unwrap_or(subject);
    Digest::parse_hash_slash_size(function, subject).ok()
}

fn invalid(name: &str, why: impl fmt::Display) -> ResourceNameError {
    ResourceNameError {
        name: name.to_string(),
        reason: why.to_string(),
    }
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
            assert_eq!(err.name, name);
        }
    }

    #[test]
    fn reads_and_writes_are_not_interchangeable() {
        let d = digest(DigestFunction::Sha256);
        assert!(ResourceName::parse_write(&format!("blobs/{}", d.reapi())).is_err());
        assert!(ResourceName::parse_read(&format!("uploads/u/blobs/{}", d.reapi())).is_err());
        assert!(ResourceName::parse_write(&format!("uploads//blobs/{}", d.reapi())).is_err());
    }

    #[test]
    fn formatting_round_trips_through_parsing() {
        for function in DigestFunction::ALL {
            let d = digest(function);
            for instance in ["", "main", "team/a/main"] {
                let read = ResourceName::read(instance, d);
                assert_eq!(ResourceName::parse_read(&read.to_string()).unwrap(), read);
                let zstd = ResourceName {
                    compression: Compression::Zstd,
                    ..read.clone()
                };
                assert_eq!(ResourceName::parse_read(&zstd.to_string()).unwrap(), zstd);
                let write = ResourceName::write(instance, d);
                assert_eq!(
                    ResourceName::parse_write(&write.to_string()).unwrap(),
                    write
                );
                assert_ne!(
                    ResourceName::write(instance, d).upload_uuid,
                    write.upload_uuid,
                    "each write gets its own upload id"
                );
            }
        }
        // SHA-256 names carry no function segment, as REAPI's own examples do.
        let sha = digest(DigestFunction::Sha256);
        assert_eq!(
            ResourceName::read("", sha).to_string(),
            format!("blobs/{}", sha.reapi())
        );
    }

    #[test]
    fn missing_blob_subjects_round_trip() {
        for function in DigestFunction::ALL {
            let d = digest(function);
            let subject = missing_blob_subject(&d);
            assert_eq!(parse_missing_blob_subject(function, &subject), Some(d));
            let named = format!("blobs/{}/{}", function.name(), d.reapi());
            assert_eq!(parse_missing_blob_subject(function, &named), Some(d));
        }
        assert_eq!(
            parse_missing_blob_subject(DigestFunction::Sha256, "actions/x/1"),
            None
        );
    }
}

//! Image references as users write them: `[host[:port]/]repository[:tag][@digest]`.

use kiln_store::ContentHash;

use crate::error::{PublishError, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageReference {
    /// `host[:port]`.
    pub registry: String,
    pub repository: String,
    pub reference: ManifestReference,
}

/// What names a manifest within a repository, as the `/v2/<name>/manifests/<reference>`
/// path takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestReference {
    Tag(String),
    Digest(ContentHash),
}

impl std::fmt::Display for ManifestReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestReference::Tag(tag) => f.write_str(tag),
            ManifestReference::Digest(digest) => digest.fmt(f),
        }
    }
}

impl ImageReference {
    /// Parses `text`; without a host part, the image is in `default_registry`. The first
    /// path component is a host when it has a `.` or `:` or is `localhost`, as docker
    /// decides it.
    pub fn parse(text: &str, default_registry: &str) -> Result<Self> {
        let invalid = |reason: &str| PublishError::Reference {
            reference: text.to_string(),
            reason: reason.to_string(),
        };
        let (name, digest) = match text.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (text, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest)
            }
            _ => (default_registry.to_string(), name),
        };
        // A ':' after the last '/' starts the tag.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (path, None),
        };
        kiln_store::validate_repository_name(repository)
            .map_err(|e| invalid(&format!("bad repository name: {e}")))?;
        let reference = match (digest, tag) {
            (Some(digest), _) => ManifestReference::Digest(
                ContentHash::parse_oci(digest)
                    .map_err(|e| invalid(&format!("bad digest after '@': {e}")))?,
            ),
            (None, Some(tag)) => {
                kiln_store::validate_tag(tag)?;
                ManifestReference::Tag(tag.to_string())
            }
            (None, None) => return Err(invalid("needs a tag or a digest")),
        };
        Ok(ImageReference {
            registry,
            repository: repository.to_string(),
            reference,
        })
    }
}

impl std::fmt::Display for ImageReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let separator = match self.reference {
            ManifestReference::Tag(_) => ':',
            ManifestReference::Digest(_) => '@',
        };
        write!(
            f,
            "{}/{}{separator}{}",
            self.registry, self.repository, self.reference
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        let r = ImageReference::parse("base:v1", "127.0.0.1:5000").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), &r.reference),
            (
                "127.0.0.1:5000",
                "base",
                &ManifestReference::Tag("v1".into())
            )
        );
        let r = ImageReference::parse("registry.example:443/org/base:1.0", "x").unwrap();
        assert_eq!(r.registry, "registry.example:443");
        assert_eq!(r.repository, "org/base");
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = ImageReference::parse(&format!("localhost/base@{digest}"), "x").unwrap();
        assert_eq!(r.registry, "localhost");
        assert_eq!(
            r.reference,
            ManifestReference::Digest(digest.parse().unwrap())
        );
        assert_eq!(r.to_string(), format!("localhost/base@{digest}"));
    }

    #[test]
    fn bad_references_are_refused() {
        assert!(ImageReference::parse("base", "x").is_err());
        assert!(ImageReference::parse("Base:v1", "x").is_err());
        assert!(ImageReference::parse("base@sha256:zz", "x").is_err());
        // Only digests kiln can verify: sha256 and blake3.
        let sha512 = format!("base@sha512:{}", "a".repeat(128));
        assert!(ImageReference::parse(&sha512, "x").is_err());
        assert!(ImageReference::parse("base:.bad", "x").is_err());
        // `._` is not one of the grammar's separators.
        assert!(ImageReference::parse("team/a._b:v1", "x").is_err());
    }
}

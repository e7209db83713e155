//! Parsing request paths into endpoints.
//!
//! Repository names contain slashes (`/v2/team/app/manifests/v1`), so the path cannot be
//! routed segment by segment: the name is whatever precedes the last recognised suffix.

use kiln_store::ContentHash;

use crate::error::{RegistryError, Result};

/// One of the registry's HTTP resources, independent of the method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/token`: the Docker token service.
    Token,
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: String, reference: Reference },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: String, digest: ContentHash },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart { name: String },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: String, id: String },
    /// `/v2/<name>/tags/list`
    TagList { name: String },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: String, digest: ContentHash },
}

/// How an endpoint is named where names must be few: metrics (`kind`) and span names
/// (`route`, OpenTelemetry's `http.route`). Neither carries a repository name or digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointLabels {
    pub kind: &'static str,
    pub route: &'static str,
}

impl EndpointLabels {
    /// A path that names no endpoint (or names one invalidly).
    pub const UNMATCHED: EndpointLabels = EndpointLabels {
        kind: "unknown",
        route: "unmatched",
    };

    const fn new(kind: &'static str, route: &'static str) -> Self {
        EndpointLabels { kind, route }
    }
}

impl Endpoint {
    pub fn labels(&self) -> EndpointLabels {
        match self {
            Endpoint::Base => EndpointLabels::new("base", "/v2/"),
            Endpoint::Catalog => EndpointLabels::new("catalog", "/v2/_catalog"),
            Endpoint::Token => EndpointLabels::new("token", "/token"),
            Endpoint::Manifest { .. } => {
                EndpointLabels::new("manifest", "/v2/{name}/manifests/{reference}")
            }
            Endpoint::Blob { .. } => EndpointLabels::new("blob", "/v2/{name}/blobs/{digest}"),
            Endpoint::UploadStart { .. } => {
                EndpointLabels::new("upload_start", "/v2/{name}/blobs/uploads/")
            }
            Endpoint::Upload { .. } => {
                EndpointLabels::new("upload", "/v2/{name}/blobs/uploads/{id}")
            }
            Endpoint::TagList { .. } => EndpointLabels::new("tags", "/v2/{name}/tags/list"),
            Endpoint::Referrers { .. } => {
                EndpointLabels::new("referrers", "/v2/{name}/referrers/{digest}")
            }
        }
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(ContentHash),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(tag) => f.write_str(tag),
            Reference::Digest(digest) => write!(f, "{digest}"),
        }
    }
}

/// Checks a repository name against the spec's grammar (kiln-store holds it, shared with
/// `kiln publish`).
pub fn validate_name(name: &str) -> Result<()> {
    kiln_store::validate_repository_name(name)
        .map_err(|e| RegistryError::NameInvalid(e.to_string()))
}

/// Parses an OCI digest (`sha256:<hex>`), accepting a percent-encoded colon.
pub fn parse_digest(text: &str) -> Result<ContentHash> {
    let text = text.replace("%3A", ":").replace("%3a", ":");
    ContentHash::parse_oci(&text).map_err(|e| RegistryError::DigestInvalid(e.to_string()))
}

impl Reference {
    pub fn parse(text: &str) -> Result<Self> {
        if kiln_store::validate_tag(text).is_ok() {
            return Ok(Reference::Tag(text.to_string()));
        }
        if text.contains(':') || text.to_ascii_lowercase().contains("%3a") {
            return parse_digest(text).map(Reference::Digest);
        }
        Err(RegistryError::ManifestInvalid(format!(
            "reference {text:?} is neither a tag ([a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}) nor a digest"
        )))
    }
}

impl Endpoint {
    /// Parses a request path (without the query string).
    pub fn parse(path: &str) -> Result<Self> {
        if path == "/token" {
            return Ok(Endpoint::Token);
        }
        let rest = match path.strip_prefix("/v2") {
            Some("") | Some("/") => return Ok(Endpoint::Base),
            Some(rest) => rest
                .strip_prefix('/')
                .ok_or_else(|| RegistryError::NotFound(path.to_string()))?,
            None => return Err(RegistryError::NotFound(path.to_string())),
        };
        if rest == "_catalog" {
            return Ok(Endpoint::Catalog);
        }
        let segments: Vec<&str> = rest.split('/').collect();
        let n = segments.len();
        let name_before = |suffix_len: usize| -> Result<String> {
            if n <= suffix_len {
                return Err(RegistryError::NotFound(path.to_string()));
            }
            let name = segments[..n - suffix_len].join("/");
            validate_name(&name)?;
            Ok(name)
        };
        let tail = |k: usize| segments.get(n.wrapping_sub(k)).copied();
        match (tail(3), tail(2), tail(1)) {
            (Some("blobs"), Some("uploads"), Some("")) => Ok(Endpoint::UploadStart {
                name: name_before(3)?,
            }),
            (Some("blobs"), Some("uploads"), Some(id)) => Ok(Endpoint::Upload {
                name: name_before(3)?,
                id: id.to_string(),
            }),
            (_, Some("blobs"), Some("uploads")) => Ok(Endpoint::UploadStart {
                name: name_before(2)?,
            }),
            (_, Some("tags"), Some("list")) => Ok(Endpoint::TagList {
                name: name_before(2)?,
            }),
            (_, Some("manifests"), Some(reference)) if !reference.is_empty() => {
                Ok(Endpoint::Manifest {
                    name: name_before(2)?,
                    reference: Reference::parse(reference)?,
                })
            }
            (_, Some("blobs"), Some(digest)) if !digest.is_empty() => Ok(Endpoint::Blob {
                name: name_before(2)?,
                digest: parse_digest(digest)?,
            }),
            (_, Some("referrers"), Some(digest)) if !digest.is_empty() => Ok(Endpoint::Referrers {
                name: name_before(2)?,
                digest: parse_digest(digest)?,
            }),
            _ => Err(RegistryError::NotFound(path.to_string())),
        }
    }

    /// The repository the endpoint acts on, if any.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Endpoint::Base | Endpoint::Catalog | Endpoint::Token => None,
            Endpoint::Manifest { name, .. }
            | Endpoint::Blob { name, .. }
            | Endpoint::UploadStart { name }
            | Endpoint::Upload { name, .. }
            | Endpoint::TagList { name }
            | Endpoint::Referrers { name, .. } => Some(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn hash() -> ContentHash {
        ContentHash::parse_oci(DIGEST).unwrap()
    }

    #[test]
    fn base_catalog_and_token() {
        assert_eq!(Endpoint::parse("/v2/").unwrap(), Endpoint::Base);
        assert_eq!(Endpoint::parse("/v2").unwrap(), Endpoint::Base);
        assert_eq!(Endpoint::parse("/v2/_catalog").unwrap(), Endpoint::Catalog);
        assert_eq!(Endpoint::parse("/token").unwrap(), Endpoint::Token);
        assert!(matches!(
            Endpoint::parse("/v1/x"),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn names_with_slashes_route_by_their_suffix() {
        assert_eq!(
            Endpoint::parse("/v2/team/app/manifests/v1.2.3").unwrap(),
            Endpoint::Manifest {
                name: "team/app".into(),
                reference: Reference::Tag("v1.2.3".into())
            }
        );
        assert_eq!(
            Endpoint::parse(&format!("/v2/a/b/c/manifests/{DIGEST}")).unwrap(),
            Endpoint::Manifest {
                name: "a/b/c".into(),
                reference: Reference::Digest(hash())
            }
        );
        assert_eq!(
            Endpoint::parse(&format!("/v2/x/blobs/{DIGEST}")).unwrap(),
            Endpoint::Blob {
                name: "x".into(),
                digest: hash()
            }
        );
        assert_eq!(
            Endpoint::parse("/v2/x/y/tags/list").unwrap(),
            Endpoint::TagList { name: "x/y".into() }
        );
        assert_eq!(
            Endpoint::parse(&format!("/v2/x/referrers/{DIGEST}")).unwrap(),
            Endpoint::Referrers {
                name: "x".into(),
                digest: hash()
            }
        );
    }

    #[test]
    fn upload_paths_with_and_without_trailing_slash() {
        assert_eq!(
            Endpoint::parse("/v2/a/b/blobs/uploads/").unwrap(),
            Endpoint::UploadStart { name: "a/b".into() }
        );
        assert_eq!(
            Endpoint::parse("/v2/a/blobs/uploads").unwrap(),
            Endpoint::UploadStart { name: "a".into() }
        );
        assert_eq!(
            Endpoint::parse("/v2/a/blobs/uploads/abc-123").unwrap(),
            Endpoint::Upload {
                name: "a".into(),
                id: "abc-123".into()
            }
        );
    }

    #[test]
    fn a_repository_may_be_named_like_a_keyword() {
        assert_eq!(
            Endpoint::parse("/v2/blobs/manifests/manifests/v1").unwrap(),
            Endpoint::Manifest {
                name: "blobs/manifests".into(),
                reference: Reference::Tag("v1".into())
            }
        );
        assert_eq!(
            Endpoint::parse("/v2/tags/tags/list").unwrap(),
            Endpoint::TagList {
                name: "tags".into()
            }
        );
    }

    #[test]
    fn invalid_names_are_name_invalid() {
        for path in [
            "/v2/UPPER/tags/list",
            "/v2/a//b/tags/list",
            "/v2/-a/tags/list",
            "/v2/a-/manifests/v1",
            "/v2/a..b/blobs/uploads/",
        ] {
            assert!(
                matches!(Endpoint::parse(path), Err(RegistryError::NameInvalid(_))),
                "{path}"
            );
        }
        let long = format!("/v2/{}/tags/list", "a".repeat(256));
        assert!(matches!(
            Endpoint::parse(&long),
            Err(RegistryError::NameInvalid(_))
        ));
        assert!(validate_name("a.b_c__d--e/f").is_ok());
    }

    #[test]
    fn bad_digests_and_references() {
        assert!(matches!(
            Endpoint::parse("/v2/a/blobs/sha256:abc"),
            Err(RegistryError::DigestInvalid(_))
        ));
        assert!(matches!(
            Endpoint::parse("/v2/a/blobs/md5:abc"),
            Err(RegistryError::DigestInvalid(_))
        ));
        assert!(matches!(
            Endpoint::parse("/v2/a/manifests/-bad"),
            Err(RegistryError::ManifestInvalid(_))
        ));
        assert_eq!(
            Endpoint::parse(&format!("/v2/a/blobs/{}", DIGEST.replace(':', "%3A"))).unwrap(),
            Endpoint::Blob {
                name: "a".into(),
                digest: hash()
            }
        );
        assert!(matches!(
            Endpoint::parse("/v2/tags/list"),
            Err(RegistryError::NotFound(_))
        ));
    }
}

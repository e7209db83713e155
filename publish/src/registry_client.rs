//! A client for the OCI Distribution API: blob existence checks, monolithic uploads,
//! cross-repository mounts, manifest reads and writes. Authentication (the Docker token
//! flow) is [`crate::registry_auth`]'s.

use std::path::Path;

use futures::TryStreamExt as _;
use kiln_store::ContentHash;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode, Url};

use crate::credentials::Credentials;
use crate::error::{PublishError, Result};
use crate::image_reference::ManifestReference;
use crate::layer::{content_hash_of, sha256_digest};
use crate::progress::BlobProgress;
use crate::registry_auth::{repository_scope, AuthenticatedHttp};
use crate::registry_tls::RegistryTls;

/// Manifest media types kiln reads (and, for the OCI manifest, writes).
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The most of a manifest or index read into memory: distribution's and containerd's
/// limit. A registry (any registry an action names) sending more is refused.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// The most of a small blob (an image config) read into memory.
pub const MAX_SMALL_BLOB_BYTES: u64 = 8 << 20;

/// A registry's answer to a manifest GET.
#[derive(Debug)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    /// From `Content-Type`, or the document's own `mediaType`.
    pub media_type: String,
    /// The SHA-256 of `bytes`.
    pub digest: ContentHash,
}

/// What a mount request achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum MountOutcome {
    Mounted,
    /// The registry could not mount and opened an upload session instead.
    UploadStarted(Url),
}

/// Where a blob is copied from: a repository in some registry.
#[derive(Clone, Copy)]
pub struct SourceRepository<'a> {
    pub client: &'a RegistryClient,
    pub repository: &'a str,
}

/// A client for one registry host.
pub struct RegistryClient {
    http: AuthenticatedHttp,
}

impl RegistryClient {
    /// A client for `registry` (`host[:port]`). Plain HTTP is used with `insecure` and for
    /// loopback hosts; everything else is HTTPS.
    pub fn new(registry: &str, insecure: bool, credentials: Option<Credentials>) -> Result<Self> {
        Self::new_with_tls(registry, insecure, credentials, &RegistryTls::default())
    }

    /// [`Self::new`], reaching the registry over HTTPS as `tls` says (on loopback too with
    /// `force_https`).
    pub fn new_with_tls(
        registry: &str,
        insecure: bool,
        credentials: Option<Credentials>,
        tls: &RegistryTls,
    ) -> Result<Self> {
        let host = registry
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(registry, |(host, _)| host);
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let scheme = if tls.force_https {
            "https"
        } else if insecure || loopback {
            "http"
        } else {
            "https"
        };
        let base = Url::parse(&format!("{scheme}://{registry}/")).map_err(|e| {
            PublishError::Reference {
                reference: registry.to_string(),
                reason: format!("not a registry host: {e}"),
            }
        })?;
        Ok(RegistryClient {
            http: AuthenticatedHttp::new(base, registry, credentials, tls)?,
        })
    }

    /// Lets credentials go to token realms on `hosts` besides the registry's own.
    pub fn trusting_realm_hosts(mut self, hosts: Vec<String>) -> Self {
        self.http.trust_realm_hosts(hosts);
        self
    }

    pub fn registry(&self) -> &str {
        self.http.registry()
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.http
            .base()
            .join(path)
            .map_err(|e| PublishError::Reference {
                reference: path.to_string(),
                reason: e.to_string(),
            })
    }

    /// Whether `repository` holds the blob `digest`.
    pub async fn blob_exists(&self, repository: &str, digest: &ContentHash) -> Result<bool> {
        let url = self.url(&format!("v2/{repository}/blobs/{digest}"))?;
        let scopes = [repository_scope(repository, "pull")];
        let response = self
            .http
            .send(&scopes, || {
                Ok(self.http.client().request(Method::HEAD, url.clone()))
            })
            .await?;
        match response.status() {
            status if status.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refusal(format!("HEAD blob {digest}"), response).await),
        }
    }

    /// Asks the registry to mount `digest` from `from` into `repository`.
    pub async fn mount_blob(
        &self,
        repository: &str,
        digest: &ContentHash,
        from: &str,
    ) -> Result<MountOutcome> {
        let mut url = self.url(&format!("v2/{repository}/blobs/uploads/"))?;
        url.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", from);
        let scopes = [
            repository_scope(repository, "pull,push"),
            repository_scope(from, "pull"),
        ];
        let response = self
            .http
            .send(&scopes, || {
                Ok(self
                    .http
                    .client()
                    .post(url.clone())
                    .header(CONTENT_LENGTH, 0))
            })
            .await?;
        match response.status() {
            StatusCode::CREATED => Ok(MountOutcome::Mounted),
            StatusCode::ACCEPTED => Ok(MountOutcome::UploadStarted(self.location(&response)?)),
            _ => Err(self
                .refusal(format!("mount of {digest} from {from}"), response)
                .await),
        }
    }

    /// Opens an upload session; returns its location.
    pub async fn start_upload(&self, repository: &str) -> Result<Url> {
        let url = self.url(&format!("v2/{repository}/blobs/uploads/"))?;
        let scopes = [repository_scope(repository, "pull,push")];
        let response = self
            .http
            .send(&scopes, || {
                Ok(self
                    .http
                    .client()
                    .post(url.clone())
                    .header(CONTENT_LENGTH, 0))
            })
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(self.refusal("starting an upload".into(), response).await);
        }
        self.location(&response)
    }

    /// Uploads a file as one monolithic PUT to an upload session, reporting bytes sent
    /// to `progress`.
    pub async fn upload_file(
        &self,
        repository: &str,
        session: Url,
        path: &Path,
        digest: &ContentHash,
        size: u64,
        progress: &BlobProgress,
    ) -> Result<()> {
        let url = with_digest(session, digest);
        let scopes = [repository_scope(repository, "pull,push")];
        let make = || {
            let file = std::fs::File::open(path)
                .map_err(|e| PublishError::io(format!("opening {}", path.display()), e))?;
            // Each attempt counts from 0 again.
            progress.start();
            let progress = progress.clone();
            let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file))
                .inspect_ok(move |chunk| progress.advance(chunk.len() as u64));
            Ok(self
                .http
                .client()
                .put(url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, size)
                .body(reqwest::Body::wrap_stream(stream)))
        };
        let response = self.http.send(&scopes, make).await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.refusal(format!("upload of {digest}"), response).await);
        }
        Ok(())
    }

    /// Uploads small bytes (a config) with POST then PUT.
    pub async fn upload_bytes(
        &self,
        repository: &str,
        digest: &ContentHash,
        bytes: Vec<u8>,
    ) -> Result<()> {
        let session = self.start_upload(repository).await?;
        let url = with_digest(session, digest);
        let response = self
            .put_bytes(repository, &url, "application/octet-stream", &bytes)
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.refusal(format!("upload of {digest}"), response).await);
        }
        Ok(())
    }

    /// Streams a blob from `source` (another registry, or a repository mounts could not
    /// reach) into the upload session `session` of this one.
    pub async fn copy_blob_from(
        &self,
        source: SourceRepository<'_>,
        repository: &str,
        session: Url,
        digest: &ContentHash,
        size: u64,
        progress: &BlobProgress,
    ) -> Result<()> {
        let download = source.client.get_blob(source.repository, digest).await?;
        let progress = progress.clone();
        let body = reqwest::Body::wrap_stream(
            download
                .bytes_stream()
                .inspect_ok(move |chunk| progress.advance(chunk.len() as u64)),
        );
        let request = self
            .http
            .client()
            .put(with_digest(session, digest))
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(body);
        // The session's POST already authenticated us; a streamed body cannot be replayed.
        let scopes = [repository_scope(repository, "pull,push")];
        let response = self.http.send_once(request, &scopes).await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.refusal(format!("upload of {digest}"), response).await);
        }
        Ok(())
    }

    /// Starts downloading a blob.
    pub async fn get_blob(
        &self,
        repository: &str,
        digest: &ContentHash,
    ) -> Result<reqwest::Response> {
        let url = self.url(&format!("v2/{repository}/blobs/{digest}"))?;
        let scopes = [repository_scope(repository, "pull")];
        let response = self
            .http
            .send(&scopes, || Ok(self.http.client().get(url.clone())))
            .await?;
        if !response.status().is_success() {
            return Err(self.refusal(format!("GET blob {digest}"), response).await);
        }
        Ok(response)
    }

    /// Downloads a small blob (a config) and checks its digest.
    pub async fn get_blob_bytes(&self, repository: &str, digest: &ContentHash) -> Result<Vec<u8>> {
        let response = self.get_blob(repository, digest).await?;
        let what = format!("blob {digest}");
        let bytes = read_capped(response, MAX_SMALL_BLOB_BYTES, &what).await?;
        check_digest(&what, digest, &bytes)?;
        Ok(bytes)
    }

    /// Fetches a manifest or index by tag or digest.
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &ManifestReference,
    ) -> Result<FetchedManifest> {
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"))?;
        let scopes = [repository_scope(repository, "pull")];
        let accept = [
            OCI_MANIFEST,
            OCI_INDEX,
            DOCKER_MANIFEST,
            DOCKER_MANIFEST_LIST,
        ]
        .join(", ");
        let response = self
            .http
            .send(&scopes, || {
                Ok(self.http.client().get(url.clone()).header(ACCEPT, &accept))
            })
            .await?;
        if !response.status().is_success() {
            return Err(self
                .refusal(format!("GET manifest {repository}:{reference}"), response)
                .await);
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let bytes = read_capped(
            response,
            MAX_MANIFEST_BYTES,
            &format!("manifest {repository}:{reference}"),
        )
        .await?;
        let digest = sha256_digest(&bytes);
        if let ManifestReference::Digest(expected) = reference {
            check_digest(&format!("manifest {reference}"), expected, &bytes)?;
        }
        let media_type = match content_type {
            Some(media_type) if media_type != "application/json" => media_type,
            _ => serde_json::from_slice::<serde_json::Value>(&bytes)?
                .get("mediaType")
                .and_then(|v| v.as_str())
                .unwrap_or(OCI_MANIFEST)
                .to_string(),
        };
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// PUTs a manifest under `reference` (a tag or its digest); returns its digest.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &ManifestReference,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<ContentHash> {
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"))?;
        let what = format!("manifest {repository}:{reference}");
        let response = self.put_bytes(repository, &url, media_type, bytes).await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.refusal(what, response).await);
        }
        let digest = sha256_digest(bytes);
        if let Some(answered) = answered_digest(response.headers(), &what)? {
            if answered != digest {
                return Err(PublishError::DigestMismatch {
                    what,
                    expected: digest,
                    actual: answered,
                });
            }
        }
        Ok(digest)
    }

    /// PUTs a small body with push access to `repository`.
    async fn put_bytes(
        &self,
        repository: &str,
        url: &Url,
        content_type: &str,
        bytes: &[u8],
    ) -> Result<reqwest::Response> {
        let scopes = [repository_scope(repository, "pull,push")];
        self.http
            .send(&scopes, || {
                Ok(self
                    .http
                    .client()
                    .put(url.clone())
                    .header(CONTENT_TYPE, content_type)
                    .body(bytes.to_vec()))
            })
            .await
    }

    fn location(&self, response: &reqwest::Response) -> Result<Url> {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| PublishError::Registry {
                what: "an upload session without a Location header".into(),
                status: response.status().as_u16(),
                code: None,
                message: None,
            })?;
        self.url(location)
    }

    /// Turns an unexpected answer into an error, with the OCI error body's first code.
    async fn refusal(&self, what: String, response: reqwest::Response) -> PublishError {
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        #[derive(serde::Deserialize)]
        struct ErrorBody {
            errors: Vec<ErrorEntry>,
        }
        #[derive(serde::Deserialize)]
        struct ErrorEntry {
            code: Option<String>,
            message: Option<String>,
        }
        let first = serde_json::from_str::<ErrorBody>(&body)
            .ok()
            .and_then(|b| b.errors.into_iter().next());
        let (code, message) = match first {
            Some(entry) => (entry.code, entry.message),
            None if body.trim().is_empty() => (None, None),
            None => (None, Some(body.chars().take(200).collect())),
        };
        PublishError::Registry {
            what,
            status,
            code,
            message,
        }
    }
}

/// The `Docker-Content-Digest` the registry answered with, if any. The header is
/// optional, but one that is there and not a digest means the registry is broken, and
/// ignoring it would hide that.
fn answered_digest(headers: &HeaderMap, what: &str) -> Result<Option<ContentHash>> {
    let Some(value) = headers.get("docker-content-digest") else {
        return Ok(None);
    };
    let invalid = |source| PublishError::InvalidDigest {
        what: format!("the registry's Docker-Content-Digest for {what}"),
        source,
    };
    let text = value.to_str().map_err(|_| {
        invalid(kiln_store::StoreError::InvalidDigest(format!(
            "{value:?} is not text"
        )))
    })?;
    text.parse().map(Some).map_err(invalid)
}

fn with_digest(mut session: Url, digest: &ContentHash) -> Url {
    session
        .query_pairs_mut()
        .append_pair("digest", &digest.to_string());
    session
}

/// Checks `bytes` against `expected`, hashing them with `expected`'s function.
fn check_digest(what: &str, expected: &ContentHash, bytes: &[u8]) -> Result<()> {
    let actual = content_hash_of(expected.function, bytes);
    if actual != *expected {
        return Err(PublishError::DigestMismatch {
            what: what.to_string(),
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

/// A response's body, refused past `limit` bytes before more than that is held: the
/// declared length is checked first, and the bytes as they arrive.
async fn read_capped(mut response: reqwest::Response, limit: u64, what: &str) -> Result<Vec<u8>> {
    let url = response.url().clone();
    let too_large = || PublishError::TooLarge {
        what: what.to_string(),
        url: url.to_string(),
        limit,
    };
    if response
        .content_length()
        .is_some_and(|length| length > limit)
    {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| PublishError::http(&url, e))?
    {
        if bytes.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(value: Option<&str>) -> Result<Option<ContentHash>> {
        let mut headers = HeaderMap::new();
        if let Some(value) = value {
            headers.insert("docker-content-digest", value.parse().unwrap());
        }
        answered_digest(&headers, "manifest app:v1")
    }

    #[test]
    fn docker_content_digest_is_parsed_and_malformed_ones_are_errors() {
        assert!(answered(None).unwrap().is_none());
        let digest = sha256_digest(b"manifest");
        assert_eq!(answered(Some(&digest.to_string())).unwrap(), Some(digest));
        for malformed in ["sha256:zz", "md5:00", "not a digest"] {
            let err = answered(Some(malformed)).unwrap_err();
            assert!(
                matches!(&err, PublishError::InvalidDigest { what, .. } if what.contains("app:v1")),
                "{malformed}: {err}"
            );
        }
    }

    #[test]
    fn blobs_are_checked_with_their_own_hash_function() {
        let sha256 = sha256_digest(b"config");
        assert!(check_digest("blob", &sha256, b"config").is_ok());
        assert!(matches!(
            check_digest("blob", &sha256, b"other"),
            Err(PublishError::DigestMismatch { .. })
        ));
        let blake3 = content_hash_of(kiln_store::DigestFunction::Blake3, b"config");
        assert!(check_digest("blob", &blake3, b"config").is_ok());
    }
}

//! A client for the OCI Distribution API: blob existence checks, monolithic uploads,
//! cross-repository mounts, manifest reads and writes, and the Docker token flow.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use base64::Engine as _;
use futures::TryStreamExt as _;
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode, Url};

use crate::credentials::Credentials;
use crate::error::{PublishError, Result};
use crate::layer::sha256_digest;
use crate::progress::BlobProgress;

/// Manifest media types kiln reads (and, for the OCI manifest, writes).
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A registry's answer to a manifest GET.
#[derive(Debug)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    /// From `Content-Type`, or the document's own `mediaType`.
    pub media_type: String,
    pub digest: String,
}

/// What a mount request achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum MountOutcome {
    Mounted,
    /// The registry could not mount and opened an upload session instead.
    UploadStarted(Url),
}

/// How a registry asked us to authenticate.
#[derive(Clone, Debug)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

#[derive(Default)]
struct AuthState {
    challenge: Option<Challenge>,
    /// Bearer tokens by the scopes they were issued for.
    tokens: HashMap<String, String>,
}

/// Where a blob is copied from: a repository in some registry.
#[derive(Clone, Copy)]
pub struct SourceRepository<'a> {
    pub client: &'a RegistryClient,
    pub repository: &'a str,
}

/// A client for one registry host.
pub struct RegistryClient {
    http: reqwest::Client,
    base: Url,
    registry: String,
    credentials: Option<Credentials>,
    auth: tokio::sync::Mutex<AuthState>,
}

/// `repository:<name>:<actions>`, the scope grammar of the token flow.
pub fn repository_scope(repository: &str, actions: &str) -> String {
    format!("repository:{repository}:{actions}")
}

impl RegistryClient {
    /// A client for `registry` (`host[:port]`). Plain HTTP is used with `insecure` and for
    /// loopback hosts; everything else is HTTPS.
    pub fn new(registry: &str, insecure: bool, credentials: Option<Credentials>) -> Result<Self> {
        let host = registry
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(registry, |(host, _)| host);
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let scheme = if insecure || loopback {
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
        let http = reqwest::Client::builder()
            .user_agent(concat!("kiln-publish/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| PublishError::http(&base, e))?;
        Ok(RegistryClient {
            http,
            base,
            registry: registry.to_string(),
            credentials,
            auth: Default::default(),
        })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.base.join(path).map_err(|e| PublishError::Reference {
            reference: path.to_string(),
            reason: e.to_string(),
        })
    }

    /// Whether `repository` holds the blob `digest`.
    pub async fn blob_exists(&self, repository: &str, digest: &str) -> Result<bool> {
        let url = self.url(&format!("v2/{repository}/blobs/{digest}"))?;
        let scopes = [repository_scope(repository, "pull")];
        let response = self
            .send(&scopes, || Ok(self.http.request(Method::HEAD, url.clone())))
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
        digest: &str,
        from: &str,
    ) -> Result<MountOutcome> {
        let mut url = self.url(&format!("v2/{repository}/blobs/uploads/"))?;
        url.query_pairs_mut()
            .append_pair("mount", digest)
            .append_pair("from", from);
        let scopes = [
            repository_scope(repository, "pull,push"),
            repository_scope(from, "pull"),
        ];
        let response = self
            .send(&scopes, || {
                Ok(self.http.post(url.clone()).header(CONTENT_LENGTH, 0))
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
            .send(&scopes, || {
                Ok(self.http.post(url.clone()).header(CONTENT_LENGTH, 0))
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
        digest: &str,
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
                .put(url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, size)
                .body(reqwest::Body::wrap_stream(stream)))
        };
        let response = self.send(&scopes, make).await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.refusal(format!("upload of {digest}"), response).await);
        }
        Ok(())
    }

    /// Uploads small bytes (a config) with POST then PUT.
    pub async fn upload_bytes(&self, repository: &str, digest: &str, bytes: Vec<u8>) -> Result<()> {
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
        digest: &str,
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
            .put(with_digest(session, digest))
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(body);
        // The session's POST already authenticated us; a streamed body cannot be replayed.
        let scopes = [repository_scope(repository, "pull,push")];
        let request = self.authorize(request, &scopes).await?;
        let response = self.execute(request).await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.refusal(format!("upload of {digest}"), response).await);
        }
        Ok(())
    }

    /// Starts downloading a blob.
    pub async fn get_blob(&self, repository: &str, digest: &str) -> Result<reqwest::Response> {
        let url = self.url(&format!("v2/{repository}/blobs/{digest}"))?;
        let scopes = [repository_scope(repository, "pull")];
        let response = self
            .send(&scopes, || Ok(self.http.get(url.clone())))
            .await?;
        if !response.status().is_success() {
            return Err(self.refusal(format!("GET blob {digest}"), response).await);
        }
        Ok(response)
    }

    /// Downloads a small blob (a config) and checks its digest.
    pub async fn get_blob_bytes(&self, repository: &str, digest: &str) -> Result<Vec<u8>> {
        let response = self.get_blob(repository, digest).await?;
        let url = response.url().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| PublishError::http(&url, e))?
            .to_vec();
        check_digest(&format!("blob {digest}"), digest, &bytes)?;
        Ok(bytes)
    }

    /// Fetches a manifest or index by tag or digest.
    pub async fn get_manifest(&self, repository: &str, reference: &str) -> Result<FetchedManifest> {
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
            .send(&scopes, || {
                Ok(self.http.get(url.clone()).header(ACCEPT, &accept))
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
        let bytes = response
            .bytes()
            .await
            .map_err(|e| PublishError::http(&url, e))?
            .to_vec();
        let digest = sha256_digest(&bytes);
        if reference.contains(':') {
            check_digest(&format!("manifest {reference}"), reference, &bytes)?;
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
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String> {
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"))?;
        let response = self.put_bytes(repository, &url, media_type, bytes).await?;
        if response.status() != StatusCode::CREATED {
            return Err(self
                .refusal(format!("manifest {repository}:{reference}"), response)
                .await);
        }
        let digest = sha256_digest(bytes);
        if let Some(answered) = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if answered != digest {
                return Err(PublishError::DigestMismatch {
                    what: format!("manifest {repository}:{reference}"),
                    expected: digest,
                    actual: answered.to_string(),
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
        self.send(&scopes, || {
            Ok(self
                .http
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

    /// Sends a request built by `make`, authenticating as the registry demands: on a 401
    /// it reads the challenge, obtains a bearer token for `scopes` (or uses basic auth)
    /// and sends a fresh request once more.
    async fn send<F>(&self, scopes: &[String], make: F) -> Result<reqwest::Response>
    where
        F: Fn() -> Result<reqwest::RequestBuilder>,
    {
        let request = self.authorize(make()?, scopes).await?;
        let response = self.execute(request).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let Some(challenge) = parse_challenge(response.headers()) else {
            return Ok(response);
        };
        let mut scopes = scopes.to_vec();
        if let Challenge::Bearer {
            scope: Some(extra), ..
        } = &challenge
        {
            scopes.push(extra.clone());
        }
        {
            let mut state = self.auth.lock().await;
            state.challenge = Some(challenge);
            state.tokens.remove(&scope_key(&scopes));
        }
        let request = self.authorize(make()?, &scopes).await?;
        let response = self.execute(request).await?;
        if response.status() == StatusCode::UNAUTHORIZED && self.credentials.is_none() {
            return Err(PublishError::Auth {
                registry: self.registry.clone(),
                reason: "the registry requires credentials; set KILN_REGISTRY_USER and \
                         KILN_REGISTRY_PASSWORD or log in with docker"
                    .into(),
            });
        }
        Ok(response)
    }

    /// Sends one request in a client span of its own, whose context the registry's request
    /// span adopts as its parent.
    async fn execute(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let mut request = request
            .build()
            .map_err(|e| PublishError::http(&self.base, e))?;
        let (url, method) = (request.url().clone(), request.method().clone());
        let span = kiln_telemetry::HttpClientSpan::start(
            &method,
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or_default(),
            request.headers_mut(),
        );
        let response = self.http.execute(request).await;
        span.end(response.as_ref().ok().map(|r| r.status().as_u16()));
        response.map_err(|e| PublishError::http(&url, e))
    }

    /// Adds the `Authorization` header the last challenge calls for, fetching a bearer
    /// token for `scopes` if none is cached.
    async fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        scopes: &[String],
    ) -> Result<reqwest::RequestBuilder> {
        let mut state = self.auth.lock().await;
        let Some(challenge) = state.challenge.clone() else {
            return Ok(request);
        };
        match challenge {
            Challenge::Basic => Ok(match &self.credentials {
                Some(credentials) => request.header(AUTHORIZATION, basic_header(credentials)),
                None => request,
            }),
            Challenge::Bearer { realm, service, .. } => {
                let key = scope_key(scopes);
                let token = match state.tokens.get(&key) {
                    Some(token) => token.clone(),
                    None => {
                        let token = self.fetch_token(&realm, service.as_deref(), scopes).await?;
                        state.tokens.insert(key, token.clone());
                        token
                    }
                };
                Ok(request.header(AUTHORIZATION, format!("Bearer {token}")))
            }
        }
    }

    /// The Docker token flow: GET the realm with service and scopes, with basic
    /// credentials when we have them (anonymous tokens otherwise).
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<String> {
        let auth_error = |reason: String| PublishError::Auth {
            registry: self.registry.clone(),
            reason,
        };
        let mut url = Url::parse(realm)
            .map_err(|e| auth_error(format!("token realm {realm:?} is not a URL: {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for scope in scopes.iter().collect::<BTreeSet<_>>() {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.http.get(url);
        if let Some(credentials) = &self.credentials {
            request = request.header(AUTHORIZATION, basic_header(credentials));
        }
        let response = self.execute(request).await?;
        if !response.status().is_success() {
            return Err(auth_error(format!(
                "the token service at {realm} answered HTTP {}",
                response.status().as_u16()
            )));
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = response
            .json()
            .await
            .map_err(|e| auth_error(format!("unreadable token response: {e}")))?;
        answer
            .token
            .or(answer.access_token)
            .ok_or_else(|| auth_error("the token response holds no token".into()))
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

fn scope_key(scopes: &[String]) -> String {
    scopes
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .cloned()
        .collect::<Vec<_>>()
        .join(" ")
}

fn basic_header(credentials: &Credentials) -> String {
    let raw = format!("{}:{}", credentials.username, credentials.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn with_digest(mut session: Url, digest: &str) -> Url {
    session.query_pairs_mut().append_pair("digest", digest);
    session
}

fn check_digest(what: &str, expected: &str, bytes: &[u8]) -> Result<()> {
    let actual = sha256_digest(bytes);
    if expected.starts_with("sha256:") && actual != expected {
        return Err(PublishError::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Parses `WWW-Authenticate: Bearer realm="…",service="…",scope="…"` or `Basic …`.
fn parse_challenge(headers: &HeaderMap) -> Option<Challenge> {
    let value = headers
        .get(reqwest::header::WWW_AUTHENTICATE)?
        .to_str()
        .ok()?;
    let (scheme, params) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_auth_params(params);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `key="value",key=value` pairs; quoted values may hold commas (scopes do).
fn parse_auth_params(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_string());
        rest = remaining.trim_start_matches([',', ' ']);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_parse() {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::WWW_AUTHENTICATE,
            r#"Bearer realm="http://127.0.0.1:1/token",service="kiln",scope="repository:app:pull,push""#
                .parse()
                .unwrap(),
        );
        match parse_challenge(&headers).unwrap() {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                assert_eq!(realm, "http://127.0.0.1:1/token");
                assert_eq!(service.as_deref(), Some("kiln"));
                assert_eq!(scope.as_deref(), Some("repository:app:pull,push"));
            }
            other => panic!("expected a bearer challenge, got {other:?}"),
        }
        headers.insert(
            reqwest::header::WWW_AUTHENTICATE,
            r#"Basic realm="x""#.parse().unwrap(),
        );
        assert!(matches!(parse_challenge(&headers), Some(Challenge::Basic)));
    }
}

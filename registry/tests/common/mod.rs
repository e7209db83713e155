//! Shared setup for the registry's integration tests: a real server on 127.0.0.1:0 over a
//! temp-dir FsBlobStore and SledMetadataStore, and a plain HTTP/1 client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{HeaderMap, Method, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_registry::{
    Action, AuthConfig, GrantConfig, ManualClock, Registry, RegistryConfig, UserConfig,
};
use kiln_store::{
    BlobStore, BoundedBlobStore, Digest, DigestFunction, EvictionPolicy, FsBlobStore,
    SledMetadataStore,
};
use serde_json::json;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

pub type RequestBody = BoxBody<Bytes, Infallible>;

/// A registry served on a loopback port, with its storage in `root`.
pub struct TestRegistry {
    pub addr: SocketAddr,
    pub registry: Registry,
    /// The registry's clock; it moves only when a test advances it.
    pub clock: Arc<ManualClock>,
    pub blobs: Arc<FsBlobStore>,
    /// Set by [`TestRegistry::start_bounded`]: the size-limited store the registry uses.
    pub bounded: Option<Arc<BoundedBlobStore>>,
    pub root: PathBuf,
    client: Client<HttpConnector, RequestBody>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// A response, read to the end.
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The OCI error code of an error body.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", String::from_utf8_lossy(&self.body)))
            .to_string()
    }

    #[track_caller]
    pub fn expect(self, status: StatusCode) -> Self {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        self
    }

    /// Asserts an error response with the given status and OCI code.
    #[track_caller]
    pub fn expect_error(self, status: StatusCode, code: &str) -> Self {
        let this = self.expect(status);
        assert_eq!(this.error_code(), code);
        this
    }
}

pub fn full(data: impl Into<Bytes>) -> RequestBody {
    Full::new(data.into()).boxed()
}

pub fn empty() -> RequestBody {
    full(Bytes::new())
}

/// A body of unknown length (sent chunked), from pieces.
pub fn streamed(pieces: Vec<Bytes>) -> RequestBody {
    let stream = futures::stream::iter(
        pieces
            .into_iter()
            .map(|p| Ok::<_, Infallible>(Frame::data(p))),
    );
    StreamBody::new(stream).boxed()
}

pub fn sha256(data: &[u8]) -> String {
    Digest::of_bytes(DigestFunction::Sha256, data).oci()
}

/// Deterministic test content.
pub fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<_>>()
        .into()
}

impl TestRegistry {
    pub async fn start(config: RegistryConfig) -> (tempfile::TempDir, Self) {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = Self::start_in(dir.path(), config).await;
        (dir, registry)
    }

    /// Starts a registry over the storage under `root` (kept across restarts).
    pub async fn start_in(root: &Path, config: RegistryConfig) -> Self {
        let blobs = Arc::new(FsBlobStore::open(root.join("blobs")).expect("blob store"));
        Self::serve(root, config, blobs.clone(), blobs, None).await
    }

    /// Starts a registry whose blob store has a size limit, as `kiln up` runs it: the
    /// registry's blobs are retained from eviction.
    pub async fn start_bounded(
        config: RegistryConfig,
        policy: EvictionPolicy,
    ) -> (tempfile::TempDir, Self) {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = Arc::new(FsBlobStore::open(dir.path().join("blobs")).expect("blob store"));
        let bounded = Arc::new(
            BoundedBlobStore::new(files.clone(), policy)
                .await
                .expect("bounded store"),
        );
        let registry = Self::serve(
            dir.path(),
            config,
            bounded.clone(),
            files,
            Some(bounded.clone()),
        )
        .await;
        bounded.retain(Arc::new(registry.registry.clone()));
        (dir, registry)
    }

    async fn serve(
        root: &Path,
        config: RegistryConfig,
        served: Arc<dyn BlobStore>,
        blobs: Arc<FsBlobStore>,
        bounded: Option<Arc<BoundedBlobStore>>,
    ) -> Self {
        let metadata =
            Arc::new(SledMetadataStore::open(root.join("metadata")).expect("metadata store"));
        // The tests decide what time it is: GC and retention cut-offs, push order.
        let clock = Arc::new(ManualClock::new());
        let registry = Registry::open_with_clock(config, served, metadata, clock.clone())
            .expect("registry opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let serving = registry.clone();
        let server = tokio::spawn(async move {
            serving
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await
                .expect("registry serves");
        });
        TestRegistry {
            addr,
            registry,
            clock,
            blobs,
            bounded,
            root: root.to_path_buf(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Stops the server and releases the stores, so the same root can be reopened.
    pub async fn stop(mut self) {
        drop(self.client);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task");
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: RequestBody,
    ) -> TestResponse {
        let uri = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("http://{}{path}", self.addr)
        };
        let mut request = hyper::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .client
            .request(request.body(body).expect("request"))
            .await
            .expect("request reaches the registry");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        assert_eq!(
            parts
                .headers
                .get("docker-distribution-api-version")
                .map(|v| v.to_str().unwrap()),
            Some("registry/2.0"),
            "every response carries the API version"
        );
        TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> TestResponse {
        self.send(Method::GET, path, &[], empty()).await
    }

    pub async fn head(&self, path: &str) -> TestResponse {
        self.send(Method::HEAD, path, &[], empty()).await
    }

    pub async fn delete(&self, path: &str) -> TestResponse {
        self.send(Method::DELETE, path, &[], empty()).await
    }

    /// Opens an upload session and returns its location.
    pub async fn start_upload(&self, repo: &str) -> String {
        let response = self
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                empty(),
            )
            .await
            .expect(StatusCode::ACCEPTED);
        response.header("location").expect("Location").to_string()
    }

    /// Appends the query parameter `digest` to an upload location.
    pub fn with_digest(location: &str, digest: &str) -> String {
        let separator = if location.contains('?') { '&' } else { '?' };
        format!("{location}{separator}digest={digest}")
    }

    /// Closes an upload session with an empty PUT, expecting the blob to be created.
    pub async fn finish_upload(&self, location: &str, digest: &str) -> TestResponse {
        self.send(
            Method::PUT,
            &Self::with_digest(location, digest),
            &[],
            empty(),
        )
        .await
        .expect(StatusCode::CREATED)
    }

    /// Pushes a blob with POST then a monolithic PUT; returns its digest.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let location = self.start_upload(repo).await;
        self.send(
            Method::PUT,
            &Self::with_digest(&location, &digest),
            &[("content-type", "application/octet-stream")],
            full(Bytes::copy_from_slice(data)),
        )
        .await
        .expect(StatusCode::CREATED);
        digest
    }

    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> TestResponse {
        self.send(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", media_type)],
            full(Bytes::copy_from_slice(body)),
        )
        .await
    }

    /// Pushes a config and one layer, then an image manifest tagged `tag`; returns the
    /// manifest bytes and digest.
    pub async fn push_image(&self, repo: &str, tag: &str, seed: u8) -> (Vec<u8>, String) {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
        let layer = pattern(1000 + seed as usize, seed);
        let config_digest = self.push_blob(repo, config.as_bytes()).await;
        let layer_digest = self.push_blob(repo, &layer).await;
        let manifest = image_manifest(
            OCI_MANIFEST,
            (OCI_CONFIG, &config_digest, config.len()),
            &[(&layer_digest, layer.len())],
            None,
            None,
        );
        let response = self.put_manifest(repo, tag, OCI_MANIFEST, &manifest).await;
        let response = response.expect(StatusCode::CREATED);
        let digest = response
            .header("docker-content-digest")
            .expect("digest")
            .to_string();
        assert_eq!(digest, sha256(&manifest));
        (manifest, digest)
    }

    pub async fn has_blob_on_disk(&self, digest: &str) -> bool {
        let hash = kiln_store::ContentHash::parse_oci(digest).unwrap();
        self.blobs.size_of(&hash).await.unwrap().is_some()
    }
}

/// An image manifest: (config media type, digest, size), layers, optional subject
/// (media type, digest, size) and artifactType.
pub fn image_manifest(
    media_type: &str,
    config: (&str, &str, usize),
    layers: &[(&str, usize)],
    subject: Option<(&str, &str, usize)>,
    artifact_type: Option<&str>,
) -> Vec<u8> {
    let layer_type = if media_type == DOCKER_MANIFEST {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    } else {
        OCI_LAYER
    };
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config.0, "digest": config.1, "size": config.2},
        "layers": layers.iter().map(|(d, s)| json!({"mediaType": layer_type, "digest": d, "size": s})).collect::<Vec<_>>(),
    });
    if let Some((mt, digest, size)) = subject {
        manifest["subject"] = json!({"mediaType": mt, "digest": digest, "size": size});
    }
    if let Some(t) = artifact_type {
        manifest["artifactType"] = json!(t);
    }
    serde_json::to_vec(&manifest).unwrap()
}

/// An index over `(media type, digest, size)` children.
pub fn index_manifest(media_type: &str, children: &[(&str, &str, usize)]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": children.iter().map(|(mt, d, s)| json!({
            "mediaType": mt, "digest": d, "size": s,
            "platform": {"architecture": "amd64", "os": "linux"}
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// A configuration whose tag policy accepts anything (for tests about other things).
pub fn permissive_config() -> RegistryConfig {
    let mut config = RegistryConfig::default();
    config.tag_policies.push(kiln_registry::TagPolicyConfig {
        repositories: "*".into(),
        allowed_tags: vec![".*".into()],
        immutable_semver: true,
        allow_latest: true,
    });
    config
}

// Auth: two users with argon2-hashed passwords, and requests sent as one of them.

pub fn argon2_hash(password: &str) -> String {
    let salt = SaltString::encode_b64(b"integration-salt").unwrap();
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

pub fn auth_config() -> RegistryConfig {
    let mut config = permissive_config();
    config.auth = AuthConfig {
        enabled: true,
        users: vec![
            UserConfig {
                name: "ci".into(),
                password_hash: argon2_hash("ci-secret"),
                grants: vec![GrantConfig {
                    repositories: "team/*".into(),
                    actions: vec![Action::Pull, Action::Push],
                }],
            },
            UserConfig {
                name: "admin".into(),
                password_hash: argon2_hash("admin-secret"),
                grants: vec![GrantConfig {
                    repositories: "*".into(),
                    actions: vec![Action::Pull, Action::Push, Action::Delete],
                }],
            },
        ],
        anonymous_pull: vec!["public/*".into()],
        ..AuthConfig::default()
    };
    config
}

pub fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

/// Sends with an Authorization header.
pub async fn send_as(
    reg: &TestRegistry,
    auth: &str,
    method: Method,
    path: &str,
    body: RequestBody,
) -> TestResponse {
    reg.send(
        method,
        path,
        &[("authorization", auth), ("content-type", OCI_MANIFEST)],
        body,
    )
    .await
}

/// Fetches a bearer token for `scope` from `/token` as `auth` (expecting 200); returns
/// the token itself.
pub async fn issue_token(reg: &TestRegistry, auth: &str, scope: &str) -> String {
    let issued = send_as(
        reg,
        auth,
        Method::GET,
        &format!("/token?service=kiln-registry&scope={scope}"),
        empty(),
    )
    .await
    .expect(StatusCode::OK);
    issued.json()["token"]
        .as_str()
        .expect("a token")
        .to_string()
}

/// Pushes a one-layer image as `auth`; returns its manifest.
pub async fn push_image_as(reg: &TestRegistry, auth: &str, repo: &str, tag: &str) -> Vec<u8> {
    let mut digests = Vec::new();
    for data in [&b"{}"[..], &b"layer"[..]] {
        let digest = sha256(data);
        send_as(
            reg,
            auth,
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            full(bytes::Bytes::copy_from_slice(data)),
        )
        .await
        .expect(StatusCode::CREATED);
        digests.push(digest);
    }
    let manifest = image_manifest(
        OCI_MANIFEST,
        (OCI_CONFIG, &digests[0], 2),
        &[(&digests[1], 5)],
        None,
        None,
    );
    send_as(
        reg,
        auth,
        Method::PUT,
        &format!("/v2/{repo}/manifests/{tag}"),
        full(manifest.clone()),
    )
    .await
    .expect(StatusCode::CREATED);
    manifest
}

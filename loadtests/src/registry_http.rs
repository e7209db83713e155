//! A registry reached over HTTP on loopback, driven the way push and pull clients drive
//! one: monolithic blob uploads, streamed blob pulls, one-layer images, tags.

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_store::{Digest, DigestFunction};
use std::time::{Duration, Instant};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A registry under test, reached over HTTP on loopback.
pub struct RegistryTarget {
    pub name: &'static str,
    /// `http://host:port`.
    pub base: String,
    pub client: HttpClient,
}

/// A pooled HTTP/1.1 client with Nagle off, as registry clients use.
pub fn http_client(connections: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build(connector)
}

/// GETs `uri` and returns the body; anything but 200 is an error.
pub async fn get(client: &HttpClient, uri: hyper::Uri, accept: &str) -> anyhow::Result<Bytes> {
    let request = Request::get(uri)
        .header("accept", accept)
        .body(Full::new(Bytes::new()))?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    ensure!(
        status == StatusCode::OK,
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(body)
}

impl RegistryTarget {
    /// Sends one request and returns the response's headers and body; any status but
    /// `expect` is an error.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Bytes,
        expect: StatusCode,
    ) -> anyhow::Result<(hyper::HeaderMap, Bytes)> {
        let uri = if path_and_query.starts_with("http") {
            path_and_query.to_string()
        } else {
            format!("{}{path_and_query}", self.base)
        };
        let mut request = Request::builder().method(&method).uri(uri);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = self.client.request(request.body(Full::new(body))?).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        ensure!(
            status == expect,
            "{method} {path_and_query}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        Ok((headers, body))
    }

    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self
                .send(Method::GET, "/v2/", None, Bytes::new(), StatusCode::OK)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => bail!("GET /v2/ still fails: {e:#}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// A monolithic upload: POST for a session, then one PUT with the whole blob.
    pub async fn push_blob(
        &self,
        repository: &str,
        data: Bytes,
        digest: &Digest,
    ) -> anyhow::Result<()> {
        let (headers, _) = self
            .send(
                Method::POST,
                &format!("/v2/{repository}/blobs/uploads/"),
                None,
                Bytes::new(),
                StatusCode::ACCEPTED,
            )
            .await?;
        let location = headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .context("upload without Location")?;
        let separator = if location.contains('?') { '&' } else { '?' };
        self.send(
            Method::PUT,
            &format!("{location}{separator}digest={}", digest.oci()),
            Some("application/octet-stream"),
            data,
            StatusCode::CREATED,
        )
        .await?;
        Ok(())
    }

    /// The blob's body as the client received it, piece by piece.
    pub async fn pull_blob(&self, repository: &str, digest: &Digest) -> anyhow::Result<Vec<Bytes>> {
        let mut pieces = Vec::new();
        self.pull_blob_with(repository, digest, |piece| {
            pieces.push(piece);
            Ok(())
        })
        .await?;
        Ok(pieces)
    }

    /// Pulls a blob, handing each piece of the body to `receive` as it arrives.
    pub async fn pull_blob_with(
        &self,
        repository: &str,
        digest: &Digest,
        mut receive: impl FnMut(Bytes) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let uri = format!("{}/v2/{repository}/blobs/{}", self.base, digest.oci());
        let request = Request::get(uri).body(Full::new(Bytes::new()))?;
        let response = self.client.request(request).await?;
        ensure!(
            response.status() == StatusCode::OK,
            "blob GET: {}",
            response.status()
        );
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                receive(data)?;
            }
        }
        Ok(())
    }

    /// Pushes a one-layer image tagged `tag` and returns its manifest.
    pub async fn push_image(&self, repository: &str, tag: &str) -> anyhow::Result<Bytes> {
        let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
        let layer = Bytes::from(format!("a small layer for {repository}").into_bytes());
        let mut descriptors = Vec::new();
        for (media_type, data) in [(OCI_CONFIG, config), (OCI_LAYER, layer)] {
            let digest = Digest::of_bytes(DigestFunction::Sha256, &data);
            self.push_blob(repository, data, &digest).await?;
            descriptors.push(serde_json::json!({
                "mediaType": media_type,
                "digest": digest.oci(),
                "size": digest.size,
            }));
        }
        let manifest = Bytes::from(serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptors[0],
            "layers": [descriptors[1]],
        }))?);
        self.put_manifest(repository, tag, manifest.clone()).await?;
        Ok(manifest)
    }

    pub async fn put_manifest(
        &self,
        repository: &str,
        tag: &str,
        manifest: Bytes,
    ) -> anyhow::Result<()> {
        self.send(
            Method::PUT,
            &format!("/v2/{repository}/manifests/{tag}"),
            Some(OCI_MANIFEST),
            manifest,
            StatusCode::CREATED,
        )
        .await?;
        Ok(())
    }

    /// Tags `manifest` `count` times with git-SHA-like tags (12 hex digits), which
    /// kiln's default tag policy accepts, from `concurrency` tasks.
    pub async fn put_tags(
        &self,
        repository: &str,
        manifest: Bytes,
        count: usize,
        concurrency: usize,
    ) -> anyhow::Result<()> {
        use futures::StreamExt;
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..count)
            .map(|i| {
                let tag = Digest::of_bytes(DigestFunction::Sha256, &i.to_le_bytes()).hex()[..12]
                    .to_string();
                let manifest = manifest.clone();
                async move { self.put_manifest(repository, &tag, manifest).await }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

//! Manifest endpoints: pull by tag or digest, push with validation and tag policy,
//! delete, and the referrers API.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use kiln_store::{ContentHash, Digest, DigestFunction, ExpectedDigest};

use crate::call::{
    empty_response, json_response, Call, DOCKER_CONTENT_DIGEST, OCI_FILTERS_APPLIED, OCI_SUBJECT,
};
use crate::config::LimitsConfig;
use crate::endpoint::Reference;
use crate::error::{RegistryError, Result};
use crate::manifest::{self, OCI_INDEX};
use crate::repository_index::{ManifestPut, ManifestRecord};
use crate::request_body::{BodyError, BodyReader};
use crate::RegistryState;

/// Resolves a reference to a manifest digest and its record.
async fn resolve(
    state: &RegistryState,
    name: &str,
    reference: &Reference,
) -> Result<(ContentHash, ManifestRecord)> {
    state.index.require_repository(name).await?;
    let unknown = || RegistryError::ManifestUnknown(format!("{reference} in {name}"));
    let digest = match reference {
        Reference::Tag(tag) => {
            state
                .index
                .tag(name, tag)
                .await?
                .ok_or_else(unknown)?
                .digest
        }
        Reference::Digest(digest) => *digest,
    };
    let record = state
        .index
        .manifest(name, &digest)
        .await?
        .ok_or_else(unknown)?;
    Ok((digest, record))
}

pub async fn get(
    state: &Arc<RegistryState>,
    name: &str,
    reference: &Reference,
    call: Call,
) -> Result<Response> {
    let (hash, record) = resolve(state, name, reference).await?;
    let digest = hash.oci();
    let body = if call.method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(state.blobs.read_all(&hash.with_size(record.size)).await?)
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(record.size));
    if let Ok(value) = HeaderValue::from_str(&record.media_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Ok(value) = HeaderValue::from_str(&digest) {
        headers.insert(DOCKER_CONTENT_DIGEST, value.clone());
        headers.insert(
            header::ETAG,
            HeaderValue::from_str(&format!("\"{digest}\"")).unwrap_or(value),
        );
    }
    Ok(response)
}

/// Reads a manifest body, refusing anything over the limit without buffering it.
async fn read_limited(body: Body, limits: &LimitsConfig, declared: Option<u64>) -> Result<Bytes> {
    let limit = limits.max_manifest_bytes;
    if let Some(size) = declared.filter(|size| *size > limit) {
        return Err(RegistryError::ManifestTooLarge { size, limit });
    }
    let mut buffer = BytesMut::new();
    let mut body = BodyReader::new(body, limits);
    while let Some(chunk) = body.next().await.map_err(|e| match e {
        BodyError::Slow(reason) => RegistryError::SlowBody(reason),
        BodyError::Failed(reason) => {
            RegistryError::ManifestInvalid(format!("request body failed: {reason}"))
        }
    })? {
        buffer.extend_from_slice(&chunk);
        if buffer.len() as u64 > limit {
            return Err(RegistryError::ManifestTooLarge {
                size: declared.unwrap_or(buffer.len() as u64),
                limit,
            });
        }
    }
    Ok(buffer.freeze())
}

pub async fn put(
    state: &Arc<RegistryState>,
    name: &str,
    reference: &Reference,
    call: Call,
) -> Result<Response> {
    let declared = call
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = read_limited(call.body, &state.config.limits, declared).await?;
    let function = match reference {
        Reference::Digest(d) => d.function,
        Reference::Tag(_) => DigestFunction::Sha256,
    };
    let digest = Digest::of_bytes(function, &body);
    if let Reference::Digest(expected) = reference {
        if *expected != digest.content_hash() {
            return Err(RegistryError::DigestInvalid(format!(
                "manifest hashes to {}, not {expected}",
                digest.oci()
            )));
        }
    }
    let content_type = call
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let parsed = manifest::parse(content_type, &body)?;
    let tag = match reference {
        Reference::Tag(tag) => {
            state.policy.check_push(name, tag)?;
            Some(tag.as_str())
        }
        Reference::Digest(_) => None,
    };
    let immutable = tag.is_some_and(|t| state.policy.is_immutable(name, t));
    let digest_text = digest.oci();
    if let Some(tag) = tag.filter(|_| immutable) {
        // Checked up front too, so a refused re-push does not even store the manifest blob.
        if let Some(existing) = state.index.tag(name, tag).await? {
            if existing.digest != digest.content_hash() {
                return Err(RegistryError::Denied(format!(
                    "tag {tag:?} in {name} is immutable and already points to {}",
                    existing.digest
                )));
            }
        }
    }

    let _fence = state.gc_fence.read().await;
    for blob in &parsed.blobs {
        if !state.index.is_linked(name, &blob.hash).await? {
            return Err(RegistryError::ManifestBlobUnknown(format!(
                "blob {} is not in {name}",
                blob.hash
            )));
        }
        match state.blobs.size_of(&blob.hash).await? {
            Some(size) if size == blob.size => {}
            Some(size) => {
                return Err(RegistryError::ManifestInvalid(format!(
                    "blob {} is {size} bytes, but the manifest says {}",
                    blob.hash, blob.size
                )))
            }
            None => {
                return Err(RegistryError::ManifestBlobUnknown(format!(
                    "blob {} is not stored",
                    blob.hash
                )))
            }
        }
    }
    for child in &parsed.children {
        if state.index.manifest(name, &child.hash).await?.is_none() {
            return Err(RegistryError::ManifestBlobUnknown(format!(
                "child manifest {} is not in {name}",
                child.hash
            )));
        }
    }
    let manifest_hash = digest.content_hash();
    let was_present = state.blobs.size_of(&manifest_hash).await?.is_some();
    state
        .blobs
        .put(ExpectedDigest::Exact(digest), body)
        .await
        .map_err(RegistryError::from_commit)?;
    if !was_present {
        state.index.mark_owned(&manifest_hash).await?;
    }
    let subject = parsed.subject.as_ref().map(|s| s.hash);
    let record = ManifestRecord {
        media_type: parsed.media_type,
        size: digest.size,
        artifact_type: parsed.artifact_type,
        subject,
        blobs: parsed.blobs.iter().map(|b| b.hash).collect(),
        children: parsed.children.iter().map(|c| c.hash).collect(),
        // Only the referrers API reads annotations, and only of manifests with a subject.
        annotations: parsed.annotations.filter(|_| subject.is_some()),
        pushed_at_ms: state.clock.now_millis(),
    };
    state
        .index
        .put_manifest(ManifestPut {
            repository: name,
            digest: manifest_hash,
            record: &record,
            tag: tag.map(|tag| (tag, immutable)),
        })
        .await?;
    state.index.flush().await?;
    let mut headers = vec![
        (
            header::LOCATION,
            format!("/v2/{name}/manifests/{digest_text}"),
        ),
        (DOCKER_CONTENT_DIGEST, digest_text),
    ];
    if let Some(subject) = subject {
        headers.push((OCI_SUBJECT, subject.oci()));
    }
    Ok(empty_response(StatusCode::CREATED, &headers))
}

pub async fn delete(
    state: &Arc<RegistryState>,
    name: &str,
    reference: &Reference,
) -> Result<Response> {
    state.index.require_repository(name).await?;
    match reference {
        Reference::Tag(tag) => {
            if state.policy.is_immutable(name, tag) {
                return Err(RegistryError::Denied(format!(
                    "tag {tag:?} in {name} is immutable"
                )));
            }
            if !state.index.remove_tag(name, tag).await? {
                return Err(RegistryError::ManifestUnknown(format!("{tag} in {name}")));
            }
        }
        Reference::Digest(digest) => {
            let mut tags = state.index.all_tags(name);
            while let Some((tag, record)) = tags.try_next().await? {
                if record.digest == *digest && state.policy.is_immutable(name, &tag) {
                    return Err(RegistryError::Denied(format!(
                        "{digest} carries the immutable tag {tag:?}"
                    )));
                }
            }
            if state.index.remove_manifest(name, digest).await?.is_none() {
                return Err(RegistryError::ManifestUnknown(format!(
                    "{digest} in {name}"
                )));
            }
        }
    }
    state.index.flush().await?;
    Ok(empty_response(StatusCode::ACCEPTED, &[]))
}

/// A referrers-API descriptor.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ReferrerDescriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ReferrersIndex {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<ReferrerDescriptor>,
}

pub async fn referrers(
    state: &Arc<RegistryState>,
    name: &str,
    subject: &ContentHash,
    call: Call,
) -> Result<Response> {
    // An unknown repository or subject has no referrers: the answer is an empty index.
    let filter = call.query.get("artifactType").filter(|t| !t.is_empty());
    let mut manifests = Vec::new();
    let mut referrers = state.index.referrers(name, subject);
    while let Some(digest) = referrers.try_next().await? {
        let Some(record) = state.index.manifest(name, &digest).await? else {
            continue;
        };
        if filter.is_some_and(|f| record.artifact_type.as_deref() != Some(f)) {
            continue;
        }
        manifests.push(ReferrerDescriptor {
            media_type: record.media_type,
            digest: digest.oci(),
            size: record.size,
            artifact_type: record.artifact_type,
            annotations: record.annotations,
        });
    }
    let body = serde_json::to_vec(&ReferrersIndex {
        schema_version: 2,
        media_type: OCI_INDEX,
        manifests,
    })
    .expect("the referrers index serialises");
    let mut response = json_response(StatusCode::OK, body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    if filter.is_some() {
        response.headers_mut().insert(
            OCI_FILTERS_APPLIED,
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(response)
}

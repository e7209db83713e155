//! Blob endpoints: pull (with Range), delete, and every upload flavour — monolithic,
//! POST-only, chunked, streamed, cross-repository mount — plus status and cancel.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use kiln_store::{ContentHash, ExpectedDigest};
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::Principal;
use crate::call::{empty_response, Call, DOCKER_CONTENT_DIGEST, DOCKER_UPLOAD_UUID};
use crate::config::Action;
use crate::endpoint::{parse_digest, validate_name};
use crate::error::{upload_range, RegistryError, Result};
use crate::request_body::BodyReader;
use crate::RegistryState;

fn upload_location(name: &str, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

fn blob_location(name: &str, hash: &ContentHash) -> String {
    format!("/v2/{name}/blobs/{hash}")
}

/// A slot for one streaming upload, or 429 when all are taken.
fn upload_permit(state: &RegistryState) -> Result<OwnedSemaphorePermit> {
    state
        .upload_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| RegistryError::TooManyRequests {
            message: format!(
                "more than {} uploads in progress (limits.max_concurrent_uploads)",
                state.config.limits.max_concurrent_uploads
            ),
            retry_after_secs: state.config.limits.retry_after_secs,
        })
}

/// What the client said a request body holds, when it said so.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| RegistryError::SizeInvalid("Content-Length is not a number".into()))
        })
        .transpose()
}

/// The `Content-Range` of a chunk, `<start>-<end>` inclusive.
pub(crate) fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let invalid = || RegistryError::BlobUploadInvalid("Content-Range must be <start>-<end>".into());
    let text = value.to_str().map_err(|_| invalid())?;
    let text = text.strip_prefix("bytes ").unwrap_or(text);
    let text = text.split('/').next().unwrap_or(text);
    let (start, end) = text.split_once('-').ok_or_else(invalid)?;
    let start: u64 = start.trim().parse().map_err(|_| invalid())?;
    let end: u64 = end.trim().parse().map_err(|_| invalid())?;
    if end < start {
        return Err(invalid());
    }
    Ok(Some((start, end)))
}

/// Checks a chunk's Content-Range against its Content-Length, returning where it starts.
pub(crate) fn chunk_start(headers: &HeaderMap) -> Result<Option<u64>> {
    let Some((start, end)) = content_range(headers)? else {
        return Ok(None);
    };
    if let Some(length) = content_length(headers)? {
        // In u128: `0-18446744073709551615` covers one byte more than u64 holds.
        let covered = u128::from(end - start) + 1;
        if u128::from(length) != covered {
            return Err(RegistryError::SizeInvalid(format!(
                "Content-Range {start}-{end} covers {covered} bytes but Content-Length is {length}"
            )));
        }
    }
    Ok(Some(start))
}

/// Records a finished blob in `name` and answers 201.
async fn blob_created(
    state: &RegistryState,
    name: &str,
    hash: &ContentHash,
    was_present: bool,
) -> Result<Response> {
    state.index.ensure_repository(name).await?;
    state.index.link_blob(name, hash).await?;
    if !was_present {
        state.index.mark_owned(hash).await?;
    }
    state.index.flush().await?;
    Ok(empty_response(
        StatusCode::CREATED,
        &[
            (header::LOCATION, blob_location(name, hash)),
            (DOCKER_CONTENT_DIGEST, hash.oci()),
        ],
    ))
}

pub async fn get(
    state: &Arc<RegistryState>,
    name: &str,
    digest: &ContentHash,
    call: Call,
) -> Result<Response> {
    state.index.require_repository(name).await?;
    let unknown = || RegistryError::BlobUnknown(format!("{digest} in {name}"));
    if !state.index.is_linked(name, digest).await? {
        return Err(unknown());
    }
    let size = state.blobs.size_of(digest).await?.ok_or_else(unknown)?;
    let mut headers = vec![
        (DOCKER_CONTENT_DIGEST, digest.oci()),
        (header::ACCEPT_RANGES, "bytes".to_string()),
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
    ];
    if call.method == axum::http::Method::HEAD {
        // A HEAD is how pushers check for a layer before pushing the manifest that
        // needs it; restarting the grace period keeps GC from taking it in between.
        state.index.refresh_owned(digest).await?;
        let mut response = empty_response(StatusCode::OK, &headers);
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        return Ok(response);
    }
    let (status, offset, length) = match requested_range(&call.headers, size)? {
        Some((start, end)) => {
            headers.push((header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}")));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        None => (StatusCode::OK, 0, size),
    };
    let stream = state.blobs.read(digest, offset, Some(length)).await?;
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let map = response.headers_mut();
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            map.insert(name, value);
        }
    }
    map.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(response)
}

/// A single `bytes=` range within a blob of `size` bytes, inclusive. Anything this does
/// not understand (multiple ranges, other units) is ignored and the whole blob is sent,
/// as RFC 9110 allows; a range past the end is 416.
pub(crate) fn requested_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>> {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let unsatisfiable = RegistryError::BlobRangeNotSatisfiable { size };
    let range = match (start.parse::<u64>(), end.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => (start, end.min(size.saturating_sub(1))),
        (Ok(start), Err(_)) if end.is_empty() => (start, size.saturating_sub(1)),
        (Err(_), Ok(suffix)) if start.is_empty() => {
            if suffix == 0 {
                return Err(unsatisfiable);
            }
            (size.saturating_sub(suffix), size.saturating_sub(1))
        }
        _ => return Ok(None),
    };
    if range.0 >= size {
        return Err(unsatisfiable);
    }
    Ok(Some(range))
}

pub async fn delete(
    state: &Arc<RegistryState>,
    name: &str,
    digest: &ContentHash,
) -> Result<Response> {
    state.index.require_repository(name).await?;
    if !state.index.unlink_blob(name, digest).await? {
        return Err(RegistryError::BlobUnknown(format!("{digest} in {name}")));
    }
    state.index.flush().await?;
    // The bytes stay until GC finds no repository or manifest needing them.
    Ok(empty_response(StatusCode::ACCEPTED, &[]))
}

pub async fn start_upload(state: &Arc<RegistryState>, name: &str, call: Call) -> Result<Response> {
    if let Some(mount) = call.query.get("mount") {
        let digest = parse_digest(mount)?;
        if let Some(response) = mount_blob(
            state,
            name,
            &digest,
            call.query.get("from"),
            &call.principal,
        )
        .await?
        {
            return Ok(response);
        }
    }
    if let Some(digest) = call.query.get("digest") {
        let digest = parse_digest(digest)?;
        return monolithic_upload(state, name, &digest, call.body).await;
    }
    let id = state.uploads.create(name).await?;
    Ok(empty_response(
        StatusCode::ACCEPTED,
        &[
            (header::LOCATION, upload_location(name, &id)),
            (header::RANGE, "0-0".to_string()),
            (DOCKER_UPLOAD_UUID, id),
        ],
    ))
}

/// Links a blob from `from` (or, with auth off and no `from`, any blob the store holds,
/// which is how build outputs in the CAS become layers without a second upload).
/// `None` means the client should upload instead.
async fn mount_blob(
    state: &Arc<RegistryState>,
    name: &str,
    digest: &ContentHash,
    from: Option<&str>,
    principal: &Principal,
) -> Result<Option<Response>> {
    let _fence = state.gc_fence.read().await;
    if state.blobs.size_of(digest).await?.is_none() {
        return Ok(None);
    }
    let mountable = match from {
        Some(from) => {
            validate_name(from).is_ok()
                && state.auth.allows(principal, from, Action::Pull)
                && state.index.is_linked(from, digest).await?
        }
        None => !state.auth.enabled(),
    };
    if !mountable {
        return Ok(None);
    }
    state.index.refresh_owned(digest).await?;
    let response = blob_created(state, name, digest, true).await?;
    tracing::info!(repository = name, from = from.unwrap_or("the store"), %digest, "blob mounted");
    Ok(Some(response))
}

async fn monolithic_upload(
    state: &Arc<RegistryState>,
    name: &str,
    digest: &ContentHash,
    body: Body,
) -> Result<Response> {
    let _permit = upload_permit(state)?;
    let was_present = state.blobs.size_of(digest).await?.is_some();
    let mut writer = state.blobs.begin_write(digest.function, None).await?;
    let mut body = BodyReader::new(body, &state.config.limits);
    while let Some(chunk) = body.next().await? {
        writer.write(chunk).await?;
    }
    writer
        .commit(ExpectedDigest::Hash(*digest))
        .await
        .map_err(RegistryError::from_commit)?;
    blob_created(state, name, digest, was_present).await
}

fn upload_accepted(status: StatusCode, name: &str, id: &str, offset: u64) -> Response {
    let mut response = empty_response(
        status,
        &[
            (header::LOCATION, upload_location(name, id)),
            (DOCKER_UPLOAD_UUID, id.to_string()),
        ],
    );
    response
        .headers_mut()
        .insert(header::RANGE, upload_range(offset));
    response
}

pub async fn upload_status(state: &Arc<RegistryState>, name: &str, id: &str) -> Result<Response> {
    let mut session = state.uploads.lock(name, id).await?;
    let offset = state.uploads.offset(&mut session).await?;
    state.uploads.release(session).await?;
    Ok(upload_accepted(StatusCode::NO_CONTENT, name, id, offset))
}

pub async fn patch_upload(
    state: &Arc<RegistryState>,
    name: &str,
    id: &str,
    call: Call,
) -> Result<Response> {
    let start = chunk_start(&call.headers)?;
    let _permit = upload_permit(state)?;
    let mut session = state.uploads.lock(name, id).await?;
    let offset = state
        .uploads
        .append(
            &mut session,
            start,
            BodyReader::new(call.body, &state.config.limits),
            &upload_location(name, id),
        )
        .await?;
    state.uploads.release(session).await?;
    Ok(upload_accepted(StatusCode::ACCEPTED, name, id, offset))
}

pub async fn finish_upload(
    state: &Arc<RegistryState>,
    name: &str,
    id: &str,
    call: Call,
) -> Result<Response> {
    let digest = call
        .query
        .get("digest")
        .ok_or_else(|| {
            RegistryError::DigestInvalid("the digest query parameter is required".into())
        })
        .and_then(parse_digest)?;
    let start = chunk_start(&call.headers)?;
    let _permit = upload_permit(state)?;
    let mut session = state.uploads.lock(name, id).await?;
    state
        .uploads
        .append(
            &mut session,
            start,
            BodyReader::new(call.body, &state.config.limits),
            &upload_location(name, id),
        )
        .await?;
    let was_present = state.blobs.size_of(&digest).await?.is_some();
    state.uploads.complete(session, digest).await?;
    blob_created(state, name, &digest, was_present).await
}

pub async fn cancel_upload(state: &Arc<RegistryState>, name: &str, id: &str) -> Result<Response> {
    let session = state.uploads.lock(name, id).await?;
    state.uploads.cancel(session).await?;
    state.index.flush().await?;
    Ok(empty_response(StatusCode::NO_CONTENT, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(value: &str, size: u64) -> Result<Option<(u64, u64)>> {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, value.parse().unwrap());
        requested_range(&headers, size)
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(range("bytes=0-9", 100).unwrap(), Some((0, 9)));
        assert_eq!(range("bytes=90-200", 100).unwrap(), Some((90, 99)));
        assert_eq!(range("bytes=95-", 100).unwrap(), Some((95, 99)));
        assert_eq!(range("bytes=-10", 100).unwrap(), Some((90, 99)));
        assert_eq!(range("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(range("items=0-1", 100).unwrap(), None);
        assert!(matches!(
            range("bytes=100-", 100),
            Err(RegistryError::BlobRangeNotSatisfiable { size: 100 })
        ));
    }

    #[test]
    fn chunk_ranges() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_RANGE, "10-19".parse().unwrap());
        headers.insert(header::CONTENT_LENGTH, "10".parse().unwrap());
        assert_eq!(chunk_start(&headers).unwrap(), Some(10));
        headers.insert(header::CONTENT_LENGTH, "9".parse().unwrap());
        assert!(matches!(
            chunk_start(&headers),
            Err(RegistryError::SizeInvalid(_))
        ));
        // Found by fuzz/http_range: the length of this range overflowed u64.
        headers.insert(
            header::CONTENT_RANGE,
            "0-18446744073709551615".parse().unwrap(),
        );
        headers.insert(header::CONTENT_LENGTH, "0".parse().unwrap());
        assert!(matches!(
            chunk_start(&headers),
            Err(RegistryError::SizeInvalid(_))
        ));
        headers.insert(header::CONTENT_RANGE, "19-10".parse().unwrap());
        assert!(matches!(
            chunk_start(&headers),
            Err(RegistryError::BlobUploadInvalid(_))
        ));
    }
}

//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, off in every build
//! that ships): the private parsers, re-exported or wrapped, never changed. Not an API.

use axum::http::{header, HeaderMap, HeaderValue};

pub use crate::auth::{fuzz_decode_basic as decode_basic, Authenticator, TokenAccess, TokenClaims};
pub use crate::call::{pagination, Query};
pub use crate::error::Result;
pub use crate::manifest::{parse as parse_manifest, ParsedManifest, Reference};

/// A header map holding `name: value`, or None when `value` is not a valid header value
/// (the HTTP layer would have refused the request before any parser ran).
fn headers(name: header::HeaderName, value: &[u8]) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    headers.insert(name, HeaderValue::from_bytes(value).ok()?);
    Some(headers)
}

/// A blob GET's `Range` header against a blob of `size` bytes.
pub fn requested_range(value: &[u8], size: u64) -> Option<Result<Option<(u64, u64)>>> {
    headers(header::RANGE, value).map(|h| crate::blob_api::requested_range(&h, size))
}

/// A chunk PATCH's `Content-Range`, and with `Content-Length` where it starts.
pub fn chunk_start(content_range: &[u8], content_length: &[u8]) -> Option<Result<Option<u64>>> {
    let mut h = headers(header::CONTENT_RANGE, content_range)?;
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from_bytes(content_length).ok()?,
    );
    Some(crate::blob_api::chunk_start(&h))
}

/// A chunk PATCH's `Content-Range` alone.
pub fn content_range(value: &[u8]) -> Option<Result<Option<(u64, u64)>>> {
    headers(header::CONTENT_RANGE, value).map(|h| crate::blob_api::content_range(&h))
}

/// A request's query string, as the HTTP edge splits it.
pub fn parse_query(query: &str) -> Query {
    Query::parse(Some(query))
}

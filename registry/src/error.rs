//! The registry's one error type, mapped once to OCI error bodies and HTTP statuses.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_store::StoreError;
use oci_spec::distribution::ErrorCode;

/// Everything the registry can fail with. [`IntoResponse`] turns each variant into the
/// Distribution Spec's `{"errors":[{"code":…,"message":…}]}` body and status.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to registry: {0}")]
    BlobUnknown(String),
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    /// A request body too slow to keep its slot: 408, with the upload's code.
    #[error("request body too slow: {0}")]
    SlowBody(String),
    #[error("blob upload unknown to registry: {0}")]
    BlobUploadUnknown(String),
    #[error("provided digest did not match uploaded content or is malformed: {0}")]
    DigestInvalid(String),
    #[error("manifest references a manifest or blob unknown to this repository: {0}")]
    ManifestBlobUnknown(String),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest is {size} bytes; the limit is {limit} bytes (limits.max_manifest_bytes)")]
    ManifestTooLarge { size: u64, limit: u64 },
    #[error("manifest unknown to registry: {0}")]
    ManifestUnknown(String),
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    #[error("repository name not known to registry: {0}")]
    NameUnknown(String),
    #[error("provided length did not match content length: {0}")]
    SizeInvalid(String),
    /// No or bad credentials. `challenge` is the `WWW-Authenticate` value to send.
    #[error("authentication required")]
    Unauthorized { challenge: String },
    #[error("requested access to the resource is denied: {0}")]
    Denied(String),
    #[error("the operation is unsupported: {0}")]
    Unsupported(String),
    /// An endpoint that exists but does not accept this method.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("too many requests: {message}")]
    TooManyRequests {
        message: String,
        retry_after_secs: u64,
    },
    /// A chunk that does not start where the upload currently ends. The response carries
    /// the upload's location and current range so the client can resume.
    #[error("chunk starts at {got}, but the upload is at {offset}")]
    RangeNotSatisfiable {
        offset: u64,
        got: u64,
        location: String,
        upload_id: String,
    },
    /// A blob `Range` request outside the blob.
    #[error("requested range is outside the {size}-byte blob")]
    BlobRangeNotSatisfiable { size: u64 },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<kiln_store::MetadataError> for RegistryError {
    fn from(error: kiln_store::MetadataError) -> Self {
        RegistryError::Store(error.into())
    }
}

impl RegistryError {
    /// Maps a failed blob commit: a digest mismatch is the client's DIGEST_INVALID.
    pub(crate) fn from_commit(error: StoreError) -> Self {
        match error {
            StoreError::DigestMismatch { expected, actual } => RegistryError::DigestInvalid(
                format!("content hashes to {}, not {}", actual.oci(), expected.oci()),
            ),
            other => other.into(),
        }
    }

    fn code_and_status(&self) -> (Option<ErrorCode>, StatusCode) {
        use RegistryError as E;
        match self {
            E::BlobUnknown(_) => (Some(ErrorCode::BlobUnknown), StatusCode::NOT_FOUND),
            E::SlowBody(_) => (
                Some(ErrorCode::BlobUploadInvalid),
                StatusCode::REQUEST_TIMEOUT,
            ),
            E::BlobUploadInvalid(_) => {
                (Some(ErrorCode::BlobUploadInvalid), StatusCode::BAD_REQUEST)
            }
            E::BlobUploadUnknown(_) => (Some(ErrorCode::BlobUploadUnknown), StatusCode::NOT_FOUND),
            E::DigestInvalid(_) => (Some(ErrorCode::DigestInvalid), StatusCode::BAD_REQUEST),
            E::ManifestBlobUnknown(_) => (
                Some(ErrorCode::ManifestBlobUnknown),
                StatusCode::BAD_REQUEST,
            ),
            E::ManifestInvalid(_) => (Some(ErrorCode::ManifestInvalid), StatusCode::BAD_REQUEST),
            E::ManifestTooLarge { .. } => (
                Some(ErrorCode::ManifestInvalid),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            E::ManifestUnknown(_) => (Some(ErrorCode::ManifestUnknown), StatusCode::NOT_FOUND),
            E::NameInvalid(_) => (Some(ErrorCode::NameInvalid), StatusCode::BAD_REQUEST),
            E::NameUnknown(_) => (Some(ErrorCode::NameUnknown), StatusCode::NOT_FOUND),
            E::SizeInvalid(_) => (Some(ErrorCode::SizeInvalid), StatusCode::BAD_REQUEST),
            E::Unauthorized { .. } => (Some(ErrorCode::Unauthorized), StatusCode::UNAUTHORIZED),
            E::Denied(_) => (Some(ErrorCode::Denied), StatusCode::FORBIDDEN),
            E::Unsupported(_) => (Some(ErrorCode::Unsupported), StatusCode::BAD_REQUEST),
            E::MethodNotAllowed { .. } => {
                (Some(ErrorCode::Unsupported), StatusCode::METHOD_NOT_ALLOWED)
            }
            E::NotFound(_) => (None, StatusCode::NOT_FOUND),
            E::TooManyRequests { .. } => (
                Some(ErrorCode::TooManyRequests),
                StatusCode::TOO_MANY_REQUESTS,
            ),
            E::RangeNotSatisfiable { .. } => (
                Some(ErrorCode::BlobUploadInvalid),
                StatusCode::RANGE_NOT_SATISFIABLE,
            ),
            E::BlobRangeNotSatisfiable { .. } => (None, StatusCode::RANGE_NOT_SATISFIABLE),
            E::Store(StoreError::InvalidDigest(_))
            | E::Store(StoreError::UnsupportedDigestFunction(_))
            | E::Store(StoreError::DigestMismatch { .. }) => {
                (Some(ErrorCode::DigestInvalid), StatusCode::BAD_REQUEST)
            }
            E::Store(StoreError::LimitExceeded(_)) => {
                (Some(ErrorCode::BlobUploadInvalid), StatusCode::BAD_REQUEST)
            }
            E::Store(StoreError::NotFound(_)) => {
                (Some(ErrorCode::BlobUnknown), StatusCode::NOT_FOUND)
            }
            // No spec code says "full"; the upload is what failed, and 507 says why.
            E::Store(StoreError::Full { .. }) => (
                Some(ErrorCode::BlobUploadInvalid),
                StatusCode::INSUFFICIENT_STORAGE,
            ),
            E::Store(StoreError::Io(io)) if io.kind() == std::io::ErrorKind::StorageFull => (
                Some(ErrorCode::BlobUploadInvalid),
                StatusCode::INSUFFICIENT_STORAGE,
            ),
            // The object store or the database is down: 503, which every client retries.
            E::Store(StoreError::Unavailable(_))
            | E::Store(StoreError::Metadata(kiln_store::MetadataError::Unavailable(_))) => {
                (None, StatusCode::SERVICE_UNAVAILABLE)
            }
            E::Store(_) | E::Io(_) | E::Internal(_) | E::Config(_) => {
                (None, StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    errors: [ErrorEntry<'a>; 1],
}

#[derive(serde::Serialize)]
struct ErrorEntry<'a> {
    code: &'a ErrorCode,
    message: String,
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (code, status) = self.code_and_status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, %status, "request refused");
        }
        // Endpoints outside the spec (a 404 for an unknown path) and internal failures have
        // no spec code; they still get a JSON body so clients can show something.
        let code = code.unwrap_or(ErrorCode::Unsupported);
        // A full store and an unreachable object store say so: the client can act on it.
        let says_why = [
            StatusCode::INSUFFICIENT_STORAGE,
            StatusCode::SERVICE_UNAVAILABLE,
        ];
        let message = if status.is_server_error() && !says_why.contains(&status) {
            // Internal details (paths, sled errors) stay in the log.
            "internal server error".to_string()
        } else {
            self.to_string()
        };
        let body = serde_json::to_vec(&ErrorBody {
            errors: [ErrorEntry {
                code: &code,
                message,
            }],
        })
        .unwrap_or_default();
        let mut response = (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        let headers = response.headers_mut();
        match &self {
            RegistryError::Unauthorized { challenge } => {
                if let Ok(value) = HeaderValue::from_str(challenge) {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            RegistryError::TooManyRequests {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            RegistryError::RangeNotSatisfiable {
                offset,
                location,
                upload_id,
                ..
            } => {
                if let Ok(value) = HeaderValue::from_str(location) {
                    headers.insert(header::LOCATION, value);
                }
                headers.insert(header::RANGE, upload_range(*offset));
                if let Ok(value) = HeaderValue::from_str(upload_id) {
                    headers.insert("docker-upload-uuid", value);
                }
            }
            RegistryError::BlobRangeNotSatisfiable { size } => {
                if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, value);
                }
            }
            _ => {}
        }
        response
    }
}

/// The `Range` header of an upload holding `offset` bytes: `0-<last byte>`. An empty
/// upload reports `0-0`, as distribution does and clients expect.
pub(crate) fn upload_range(offset: u64) -> HeaderValue {
    HeaderValue::try_from(format!("0-{}", offset.saturating_sub(1)))
        .unwrap_or(HeaderValue::from_static("0-0"))
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

impl From<crate::request_body::BodyError> for RegistryError {
    fn from(error: crate::request_body::BodyError) -> Self {
        match error {
            crate::request_body::BodyError::Slow(reason) => RegistryError::SlowBody(reason),
            crate::request_body::BodyError::Failed(reason) => {
                RegistryError::BlobUploadInvalid(format!("request body failed: {reason}"))
            }
        }
    }
}

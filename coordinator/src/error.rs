//! The coordinator's one error type, and its single mapping to gRPC statuses.

use kiln_proto::prost::Message;
use kiln_proto::rpc;
use kiln_store::{Digest, StoreError};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Everything that can go wrong in the coordinator. Handlers return this; it becomes a
/// `tonic::Status` (with google.rpc details where REAPI asks for them) only at the edge.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// One request field is malformed: INVALID_ARGUMENT with a `BadRequest` detail.
    #[error("invalid {field}: {description}")]
    BadRequest { field: String, description: String },
    /// The request as a whole is unacceptable (over a size limit, a wrong offset).
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    OutOfRange(String),
    /// Blobs the request refers to are not in the CAS: FAILED_PRECONDITION with a
    /// `PreconditionFailure` naming each of them.
    #[error("{} referenced blob(s) are missing from the CAS", .0.len())]
    MissingBlobs(Vec<Digest>),
    #[error("{0} is not supported by this server")]
    Unimplemented(&'static str),
    /// No credentials, or credentials that name no valid token. Never says which token.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token without the scope the call needs: PERMISSION_DENIED with an
    /// `ErrorInfo` naming the scope (reason `MISSING_SCOPE`).
    #[error("this call needs the scope {scope} on instance {instance:?}, which the token does not grant")]
    PermissionDenied {
        scope: crate::auth::Scope,
        instance: String,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    /// The client sent nothing on its stream for too long: DEADLINE_EXCEEDED, so that
    /// Bazel retries (a ByteStream upload resumes from QueryWriteStatus).
    #[error("{what}: nothing arrived for {idle:?}; the server closed the stream")]
    Idle {
        what: &'static str,
        idle: std::time::Duration,
    },
    /// A CAS read of a blob pushed to the registry, by a token that is not `admin`.
    #[error("{0} is an image blob of the registry: pull it from the registry, whose access rules govern it (through the CAS it needs the admin scope)")]
    RegistryBlob(Digest),
    /// A bound on what the server holds for clients was reached; retrying later may work.
    #[error("{0}")]
    ResourceExhausted(String),
    /// This replica cannot answer now but another, or this one shortly, can: a farm
    /// without a leader yet, or a leader that just lost its lease. The client retries.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The client's request stream failed (a broken connection, a cancelled call).
    #[error("request stream: {}", .0.message())]
    ClientStream(Status),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<kiln_store::ResourceNameError> for CoordinatorError {
    fn from(error: kiln_store::ResourceNameError) -> Self {
        CoordinatorError::bad_request("resource_name", error)
    }
}

impl From<kiln_store::MetadataError> for CoordinatorError {
    fn from(error: kiln_store::MetadataError) -> Self {
        CoordinatorError::Store(error.into())
    }
}

impl CoordinatorError {
    pub(crate) fn bad_request(field: impl Into<String>, description: impl ToString) -> Self {
        CoordinatorError::BadRequest {
            field: field.into(),
            description: description.to_string(),
        }
    }

    /// The status of one entry of a batch response, which carries a `google.rpc.Status`
    /// message rather than a gRPC status.
    pub(crate) fn into_rpc_status(self) -> rpc::Status {
        let status = Status::from(self);
        // `Status::details` holds an encoded google.rpc.Status whenever details were
        // attached; otherwise the code and message are all there is.
        rpc::Status::decode(status.details())
            .ok()
            .filter(|decoded| decoded.code == status.code() as i32)
            .unwrap_or_else(|| rpc::Status {
                code: status.code() as i32,
                message: status.message().to_string(),
                details: Vec::new(),
            })
    }
}

/// The status of a batch entry that succeeded.
pub(crate) fn ok_rpc_status() -> rpc::Status {
    rpc::Status {
        code: Code::Ok as i32,
        ..Default::default()
    }
}

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Self {
        let message = error.to_string();
        match error {
            CoordinatorError::BadRequest { field, description } => Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation(field, description),
            ),
            CoordinatorError::InvalidArgument(_) => Status::invalid_argument(message),
            CoordinatorError::NotFound(_) => Status::not_found(message),
            CoordinatorError::OutOfRange(_) => Status::out_of_range(message),
            CoordinatorError::MissingBlobs(digests) => {
                let mut details = ErrorDetails::new();
                for digest in &digests {
                    details.add_precondition_failure_violation(
                        kiln_store::MISSING_VIOLATION,
                        kiln_store::missing_blob_subject(digest),
                        format!("{digest} is not in the CAS"),
                    );
                }
                Status::with_error_details(Code::FailedPrecondition, message, details)
            }
            CoordinatorError::Unimplemented(_) => Status::unimplemented(message),
            CoordinatorError::Unauthenticated(_) => Status::unauthenticated(message),
            CoordinatorError::PermissionDenied { scope, instance } => Status::with_error_details(
                Code::PermissionDenied,
                message,
                ErrorDetails::with_error_info(
                    "MISSING_SCOPE",
                    "kiln",
                    [
                        ("scope".to_string(), scope.to_string()),
                        ("instance".to_string(), instance),
                    ],
                ),
            ),
            CoordinatorError::FailedPrecondition(_) => Status::failed_precondition(message),
            CoordinatorError::Idle { .. } => Status::deadline_exceeded(message),
            CoordinatorError::RegistryBlob(_) => Status::permission_denied(message),
            CoordinatorError::ResourceExhausted(_) => Status::resource_exhausted(message),
            CoordinatorError::Unavailable(_) => Status::unavailable(message),
            CoordinatorError::Store(store_error) => store_status(store_error, message),
            CoordinatorError::ClientStream(status) => status,
            CoordinatorError::Transport(_) | CoordinatorError::Internal(_) => {
                tracing::error!(%message, "internal error");
                Status::internal(message)
            }
        }
    }
}

fn store_status(error: StoreError, message: String) -> Status {
    match error {
        StoreError::InvalidDigest(_)
        | StoreError::UnsupportedDigestFunction(_)
        | StoreError::DigestMismatch { .. } => Status::invalid_argument(message),
        StoreError::NotFound(_) => Status::not_found(message),
        StoreError::OffsetOutOfRange { .. } => Status::out_of_range(message),
        // The store's limit or the disk: retryable once eviction (or an operator) frees room.
        StoreError::Full { .. } | StoreError::LimitExceeded(_) => {
            Status::resource_exhausted(message)
        }
        StoreError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            Status::resource_exhausted(message)
        }
        // The object store or the database is down: the client retries.
        StoreError::Unavailable(_)
        | StoreError::Metadata(kiln_store::MetadataError::Unavailable(_)) => {
            tracing::warn!(%message, "blob backend unavailable");
            Status::unavailable(message)
        }
        StoreError::Io(_) | StoreError::Metadata(_) => {
            tracing::error!(%message, "storage error");
            Status::internal(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_carry_a_field_violation() {
        let status = Status::from(CoordinatorError::bad_request("digest_function", "no"));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let violations = &details.bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, "digest_function");
    }

    #[test]
    fn batch_entries_keep_the_details() {
        let digest = Digest::of_bytes(kiln_store::DigestFunction::Sha256, b"x");
        let status = CoordinatorError::MissingBlobs(vec![digest]).into_rpc_status();
        assert_eq!(status.code, Code::FailedPrecondition as i32);
        assert_eq!(status.details.len(), 1);
        assert!(status.details[0].type_url.ends_with("PreconditionFailure"));
    }
}

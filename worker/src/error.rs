//! The worker's one error type, and its mapping to the `google.rpc.Status` a LeaseResult
//! carries (the coordinator copies it into `ExecuteResponse.status`).

use std::time::Duration;

use kiln_client::ClientError;
use kiln_proto::prost::Message;
use kiln_proto::{protobuf, rpc};
use kiln_store::{Digest, StoreError};
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{call} failed: {status}")]
    Rpc {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("the coordinator refused this worker: {0}")]
    Rejected(String),
    #[error("the coordinator broke the worker protocol: {0}")]
    Protocol(String),
    /// Inputs the action names are absent from the CAS.
    #[error("{} input blob(s) are missing from the CAS", .0.len())]
    MissingInputs(Vec<Digest>),
    /// A CAS call (through kiln-client) failed, or the CAS served corrupt bytes.
    #[error(transparent)]
    Cas(#[from] ClientError),
    #[error("invalid action: {0}")]
    InvalidAction(String),
    #[error("output path {path:?} escapes the action directory: {reason}")]
    OutputPathEscapes { path: String, reason: String },
    /// REAPI: an output_files entry that is a directory, or the reverse.
    #[error("output {path:?} is not {expected}")]
    OutputWrongType {
        path: String,
        expected: &'static str,
    },
    #[error("the action timed out after {0:?}")]
    Timeout(Duration),
    #[error("the action was cancelled")]
    Cancelled,
    #[error("no free slot for another action")]
    NoFreeSlot,
    /// An Assign from a farm leader older than one this worker has heard from.
    #[error("the Assign came from leader epoch {epoch}, but epoch {newest} has already assigned work here")]
    StaleLeader { epoch: u64, newest: u64 },
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// bubblewrap could not set an action's sandbox up: the worker's fault, not the
    /// action's, so UNAVAILABLE (another worker, or a later try, may manage).
    #[error("the sandbox could not start: {0}")]
    SandboxSetup(String),
    /// The action's `container-image` cannot be had: missing, unreachable, not matching
    /// its digest, or too large. Another worker would fare no better.
    #[error("container image {image}: {reason}")]
    ImageUnavailable { image: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl WorkerError {
    /// Wraps an I/O error with what the worker was doing.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> WorkerError {
        let context = context.into();
        move |source| WorkerError::Io { context, source }
    }

    pub fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> WorkerError {
        move |status| WorkerError::Rpc { call, status }
    }

    /// The gRPC code REAPI prescribes for this failure.
    pub fn code(&self) -> Code {
        match self {
            WorkerError::MissingInputs(_)
            | WorkerError::OutputWrongType { .. }
            | WorkerError::ImageUnavailable { .. } => Code::FailedPrecondition,
            WorkerError::InvalidAction(_) | WorkerError::OutputPathEscapes { .. } => {
                Code::InvalidArgument
            }
            WorkerError::Store(
                StoreError::InvalidDigest(_) | StoreError::UnsupportedDigestFunction(_),
            ) => Code::InvalidArgument,
            WorkerError::Timeout(_) => Code::DeadlineExceeded,
            WorkerError::SandboxSetup(_) => Code::Unavailable,
            WorkerError::Cancelled => Code::Cancelled,
            WorkerError::NoFreeSlot | WorkerError::StaleLeader { .. } => Code::ResourceExhausted,
            // Bytes that do not match their digest: another try may get good ones.
            WorkerError::Cas(ClientError::CorruptBlob { .. }) => Code::Unavailable,
            WorkerError::Cas(error) => retry_code(error.status()),
            WorkerError::Rpc { status, .. } => retry_code(Some(status)),
            WorkerError::Config(_)
            | WorkerError::Rejected(_)
            | WorkerError::Protocol(_)
            | WorkerError::Sandbox(_)
            | WorkerError::Io { .. }
            | WorkerError::Store(_) => Code::Internal,
        }
    }

    /// The status for a LeaseResult. Missing inputs carry a `PreconditionFailure` with one
    /// `MISSING` violation per blob, subject `blobs/{hash}/{size}`, as REAPI requires.
    pub fn to_rpc_status(&self) -> rpc::Status {
        let mut details = Vec::new();
        if let WorkerError::MissingInputs(digests) = self {
            let failure = tonic_types::PreconditionFailure {
                violations: digests
                    .iter()
                    .map(|digest| tonic_types::PreconditionViolation {
                        r#type: kiln_store::MISSING_VIOLATION.to_string(),
                        subject: kiln_store::missing_blob_subject(digest),
                        description: format!("{digest} is not in the CAS"),
                    })
                    .collect(),
            };
            details.push(protobuf::Any {
                type_url: "type.googleapis.com/google.rpc.PreconditionFailure".to_string(),
                value: tonic_types::pb::PreconditionFailure::from(failure).encode_to_vec(),
            });
        }
        rpc::Status {
            code: self.code() as i32,
            message: self.to_string(),
            details,
        }
    }
}

/// A call the coordinator could not serve right now is worth a retry elsewhere; any other
/// failure is the worker's own.
fn retry_code(status: Option<&tonic::Status>) -> Code {
    match status.map(tonic::Status::code) {
        Some(Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded) => {
            Code::Unavailable
        }
        _ => Code::Internal,
    }
}

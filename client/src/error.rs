//! The one error type of kiln-client.

use std::path::PathBuf;

/// Everything that can go wrong between hashing a working tree and placing the outputs.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid coordinator address {url:?}: {reason}")]
    InvalidEndpoint { url: String, reason: String },

    #[error("cannot connect to the coordinator at {url}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },

    /// A gRPC call failed; `call` names the method.
    #[error("{call} failed: {code:?}: {message}", code = status.code(), message = status.message())]
    Rpc {
        call: &'static str,
        status: Box<tonic::Status>,
    },

    /// The io error is part of the message (not a `source`): the run manifest records
    /// errors as one line.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// An input the REAPI data model cannot express (a non-UTF-8 name, say).
    #[error("{}: {reason}", path.display())]
    UnsupportedInput { path: PathBuf, reason: String },

    #[error("{} changed while it was being uploaded; run again", path.display())]
    InputChanged { path: PathBuf },

    #[error("the coordinator does not support {0}")]
    Unsupported(String),

    #[error("the coordinator sent an invalid response: {0}")]
    InvalidResponse(String),

    /// The CAS served bytes that do not hash to the digest asked for.
    #[error("the CAS returned corrupt data: expected {expected}, got {actual}")]
    CorruptBlob {
        expected: kiln_store::Digest,
        actual: kiln_store::Digest,
    },

    /// An output path in an ActionResult that would land outside the output directory.
    #[error("refusing output path {path:?}: {reason}")]
    UnsafeOutputPath { path: String, reason: &'static str },

    #[error("invalid run request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    pub(crate) fn rpc(call: &'static str, status: tonic::Status) -> Self {
        ClientError::Rpc {
            call,
            status: Box::new(status),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        ClientError::Io {
            path: path.into(),
            error,
        }
    }

    /// Whether a call failed because the server does not hold what it was asked for.
    pub fn is_not_found(&self) -> bool {
        self.status()
            .is_some_and(|s| s.code() == tonic::Code::NotFound)
    }

    /// The gRPC status behind this error, if it came from a call.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Rpc { status, .. } => Some(status),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

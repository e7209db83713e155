//! The one error type of kiln-publish.

use std::path::PathBuf;

use kiln_store::ContentHash;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Source { path: PathBuf, reason: String },
    #[error("git: {0}")]
    Git(String),
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    /// A repository name or tag outside the OCI grammar.
    #[error(transparent)]
    InvalidName(#[from] kiln_store::NameError),
    #[error("invalid option: {0}")]
    Option(String),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("HTTP request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an error status; `code`/`message` come from its OCI
    /// error body when it sent one.
    #[error("registry refused {what}: HTTP {status}{}", describe_registry_error(.code, .message))]
    Registry {
        what: String,
        status: u16,
        code: Option<String>,
        message: Option<String>,
    },
    #[error("authentication with {registry} failed: {reason}")]
    Auth { registry: String, reason: String },
    #[error("image: {0}")]
    Image(String),
    #[error("{what}: digest mismatch, expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: ContentHash,
        actual: ContentHash,
    },
    /// A digest kiln cannot name a blob by: malformed, or of a function other than
    /// sha256 and blake3.
    #[error("{what}: {source}")]
    InvalidDigest {
        what: String,
        #[source]
        source: kiln_store::StoreError,
    },
    #[error("OCI document: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// kiln-client's error is part of the message rather than a `source`: it is one
    /// line, and repeating it in a cause chain would say it twice.
    #[error("coordinator at {address}: {error}")]
    Coordinator {
        address: String,
        error: kiln_client::ClientError,
    },
    #[error("run manifest {0}")]
    RunManifest(kiln_client::ClientError),
    #[error("action {action}: {reason}")]
    Action { action: String, reason: String },
    /// A document the registry sent is larger than kiln reads whole into memory.
    #[error("{what} from {url} is larger than the {limit} bytes kiln accepts")]
    TooLarge {
        what: String,
        url: String,
        limit: u64,
    },
}

impl PublishError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        PublishError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn http(url: &reqwest::Url, source: reqwest::Error) -> Self {
        PublishError::Http {
            url: url.to_string(),
            source,
        }
    }
}

fn describe_registry_error(code: &Option<String>, message: &Option<String>) -> String {
    match (code, message) {
        (Some(code), Some(message)) => format!(" {code}: {message}"),
        (Some(code), None) => format!(" {code}"),
        (None, Some(message)) => format!(": {message}"),
        (None, None) => String::new(),
    }
}

pub type Result<T, E = PublishError> = std::result::Result<T, E>;

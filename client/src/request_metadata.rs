//! The `RequestMetadata` header that tells the coordinator which invocation and which
//! action a call belongs to. The scheduler's fairness groups actions by
//! `tool_invocation_id`, so every call of one `kiln run` carries the same one.

use std::fmt;

use kiln_proto::reapi;
use prost::Message;
use tonic::metadata::{Ascii, MetadataValue};

const HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// A token sent as `authorization: Bearer <token>` with every call. Marked sensitive, so
/// HTTP/2 never puts it in its header table, and it never appears in a Debug print.
#[derive(Clone)]
pub struct Credentials(MetadataValue<Ascii>);

impl Credentials {
    /// None for a token that cannot be a header value (not visible ASCII).
    pub fn bearer(token: &str) -> Option<Self> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim()).parse().ok()?;
        value.set_sensitive(true);
        Some(Credentials(value))
    }

    /// Adds the header to `request`.
    pub fn apply<T>(&self, request: &mut tonic::Request<T>) {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// One client invocation (one `kiln run`).
#[derive(Clone, Debug)]
pub struct Invocation {
    pub tool_invocation_id: String,
    /// Groups several invocations that belong together (a CI job, say); may be empty.
    pub correlated_invocations_id: String,
    /// Sent with every call of the invocation when the server wants a token.
    pub credentials: Option<Credentials>,
}

impl Invocation {
    /// A new invocation with a random id.
    pub fn new() -> Self {
        Invocation {
            tool_invocation_id: uuid::Uuid::new_v4().to_string(),
            correlated_invocations_id: String::new(),
            credentials: None,
        }
    }

    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// `message` with this invocation's RequestMetadata (see [`Invocation::metadata`]) and
    /// credentials.
    pub fn request<T>(&self, message: T, action_id: &str, target_id: &str) -> tonic::Request<T> {
        let mut request = request_with(message, &self.metadata(action_id, target_id));
        if let Some(credentials) = &self.credentials {
            credentials.apply(&mut request);
        }
        request
    }

    /// The metadata for calls on behalf of one action (`action_id` empty for calls, like
    /// uploads of the input tree, that serve several).
    pub fn metadata(&self, action_id: &str, target_id: &str) -> reapi::RequestMetadata {
        reapi::RequestMetadata {
            tool_details: Some(reapi::ToolDetails {
                tool_name: "kiln".to_string(),
                tool_version: env!("CARGO_PKG_VERSION").to_string(),
            }),
            action_id: action_id.to_string(),
            tool_invocation_id: self.tool_invocation_id.clone(),
            correlated_invocations_id: self.correlated_invocations_id.clone(),
            action_mnemonic: "KilnRun".to_string(),
            target_id: target_id.to_string(),
            configuration_id: String::new(),
        }
    }
}

impl Default for Invocation {
    fn default() -> Self {
        Self::new()
    }
}

/// Wraps `message` in a request that carries `metadata` in the REAPI header.
pub fn request_with<T>(message: T, metadata: &reapi::RequestMetadata) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert_bin(HEADER, MetadataValue::from_bytes(&metadata.encode_to_vec()));
    request
}

/// Reads the header back (servers and tests use this).
pub fn from_request<T>(request: &tonic::Request<T>) -> Option<reapi::RequestMetadata> {
    let value = request.metadata().get_bin(HEADER)?;
    let bytes = value.to_bytes().ok()?;
    reapi::RequestMetadata::decode(bytes).ok()
}

//! Connecting to an S3-compatible bucket from kiln's settings.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use crate::tracked_upload::Bucket;
use serde::Deserialize;

/// A credential: deserialised like a string, never printed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(secret: impl Into<String>) -> Self {
        SecretString(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where the blobs live (`[storage]` with `backend = "s3"` in kiln's configuration).
///
/// Credentials left out here come from the standard AWS variables (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), as every S3 tool reads them.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    pub bucket: String,
    /// The service's URL; leave out for AWS. `http://` is accepted only when given here
    /// explicitly (a Garage or MinIO on a private network).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// Keys are made under this prefix, so one bucket can hold several kilns.
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<SecretString>,
    /// How long one request may take, and how long retries of a failing one go on before
    /// the error reaches the client as UNAVAILABLE / 503.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    #[serde(default = "default_retry_timeout_secs")]
    pub retry_timeout_secs: u64,
    /// Blobs nobody has used for this many days are deleted from the bucket (0: never),
    /// except what the registry references. Uses are recorded in the bucket itself.
    #[serde(default = "default_evict_unused_after_days")]
    pub evict_unused_after_days: u64,
}

fn default_evict_unused_after_days() -> u64 {
    30
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_request_timeout_secs() -> u64 {
    60
}

fn default_retry_timeout_secs() -> u64 {
    30
}

impl S3Settings {
    /// Settings for `bucket` with every default.
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Settings {
            bucket: bucket.into(),
            endpoint: None,
            region: default_region(),
            prefix: String::new(),
            access_key_id: None,
            secret_access_key: None,
            request_timeout_secs: default_request_timeout_secs(),
            retry_timeout_secs: default_retry_timeout_secs(),
            evict_unused_after_days: default_evict_unused_after_days(),
        }
    }
}

/// A client for the bucket. Nothing is sent yet: the store's first listing is the first
/// request, and says whether the bucket and credentials work.
pub fn connect_s3(settings: &S3Settings) -> Result<Arc<dyn Bucket>, object_store::Error> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&settings.bucket)
        .with_region(&settings.region);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            // Garage, MinIO and Ceph address buckets by path unless set up otherwise.
            .with_virtual_hosted_style_request(false);
    }
    if let Some(key) = &settings.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &settings.secret_access_key {
        builder = builder.with_secret_access_key(secret.expose());
    }
    let request_timeout = Duration::from_secs(settings.request_timeout_secs.max(1));
    // Plain HTTP only when the endpoint says so; AWS is always HTTPS.
    let allow_http = settings
        .endpoint
        .as_deref()
        .is_some_and(|endpoint| endpoint.starts_with("http://"));
    let client = ClientOptions::new()
        .with_allow_http(allow_http)
        .with_timeout(request_timeout)
        .with_connect_timeout(Duration::from_secs(5));
    // Throttling (503 SlowDown) and server errors are retried with exponential backoff
    // until the retry timeout; past it the caller sees the error.
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 10,
        retry_timeout: Duration::from_secs(settings.retry_timeout_secs),
    };
    let store = builder
        .with_client_options(client)
        .with_retry(retry)
        .build()?;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_never_prints() {
        let mut settings = S3Settings::new("kiln");
        settings.secret_access_key = Some(SecretString::new("hunter2"));
        let printed = format!("{settings:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }
}

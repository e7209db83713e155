//! kiln-publish: build outputs become OCI images in a registry.
//!
//! - [`build_layer`] turns a directory into a reproducible tar+gzip or tar+zstd layer,
//!   computing its digest and diff_id while it streams to a temporary file.
//! - [`image_config`] builds the image config and manifest (runtime settings, a non-root
//!   user, `org.opencontainers.image.*` labels and annotations dated by the commit).
//! - [`RegistryClient`] speaks the OCI Distribution API, with the Docker token flow.
//! - [`GitMetadata`] reads HEAD and derives `vX.Y.Z`, short-SHA and `<branch>-<sha>` tags.
//! - [`LayerContent`] is what the layer holds: a directory, or the outputs of actions
//!   (`--from-action`, `--from-run`), which kiln-client fetches from the coordinator.
//! - [`publish`] ties them together, in one `publish` span whose trace context goes with
//!   every request to the coordinator and the registry.

mod action_outputs;
mod credentials;
mod error;
mod git_metadata;
pub mod image_config;
mod image_reference;
mod image_resolution;
mod layer;
mod oci_digest;
mod progress;
mod publisher;
mod registry_auth;
mod registry_client;
mod registry_tls;

pub use action_outputs::{CoordinatorSource, LayerContent, PublishedAction};
pub use credentials::{docker_config_credentials, CredentialStore, Credentials};
pub use error::{PublishError, Result};
pub use git_metadata::{branch_tag, GitMetadata, SHORT_SHA_LEN};
pub use image_config::{Provenance, ResolvedImage, RuntimeSettings, TargetPlatform, DEFAULT_USER};
pub use image_reference::{ImageReference, ManifestReference};
pub use image_resolution::resolve_image;
pub use layer::{build_layer, Compression, LayerBlob};
pub use progress::{BlobProgress, BlobTransfer, NoProgress, ProgressSink, PublishProgress};
pub use publisher::{publish, PublishOutcome, PublishRequest};
pub use registry_client::{MountOutcome, RegistryClient, SourceRepository, OCI_MANIFEST};
pub use registry_tls::RegistryTls;

//! kiln-coordinator: the coordinator's gRPC services.
//!
//! REAPI v2 (Capabilities, ContentAddressableStorage, ActionCache, ByteStream,
//! Execution, Operations), kiln's worker protocol (`kiln.worker.v1.Workers`), the admin
//! API (`kiln.admin.v1.Admin`) and the standard gRPC health service, all on one tonic
//! server ([`Coordinator::serve`]).
//!
//! Instance names: the action cache keeps one namespace per instance name, while the CAS
//! is shared by all instances. Blobs are named by their content, so sharing them cannot
//! leak one instance's results into another, and it stores each blob once.

mod action_cache;
mod admin;
pub mod auth;
mod byte_stream;
mod cache_references;
mod capabilities;
mod cas;
mod client_stream;
mod config;
mod counters;
mod error;
mod execution;
mod message_blob;
mod reapi_digest;
mod rpc_attributes;
mod scheduler;
mod secret;
mod server;
mod tree;
mod upload_sweeper;
mod zstd_codec;

/// Entry points for the fuzz targets in `fuzz/`; not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::zstd_codec::{decompress, StreamingDecoder, DECODED_CHUNK};
}

pub use admin::{RegistryCatalog, RepositorySummary};
pub use cache_references::action_cache_references;
pub use config::{AuthConfig, CoordinatorConfig};
pub use counters::{describe_metrics, names as metric_names, STAGE_BUCKETS};
pub use error::CoordinatorError;
pub use execution::InFlightInputs;
pub use server::Coordinator;

//! kiln-coordinator: the coordinator's gRPC services.
//!
//! Today that is the REAPI v2 remote cache: Capabilities, ContentAddressableStorage,
//! ActionCache and ByteStream, all on one tonic server ([`Coordinator::serve`]). The
//! scheduler and the worker protocol will join them on the same port.
//!
//! Instance names: the action cache keeps one namespace per instance name, while the CAS
//! is shared by all instances. Blobs are named by their content, so sharing them cannot
//! leak one instance's results into another, and it stores each blob once.

mod action_cache;
mod byte_stream;
mod capabilities;
mod cas;
mod config;
mod error;
mod execution;
mod reapi_digest;
mod resource_name;
mod scheduler;
mod server;
mod tree;
mod zstd_codec;

pub use config::CoordinatorConfig;
pub use error::CoordinatorError;
pub use server::Coordinator;

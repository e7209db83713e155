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
mod farm;
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

    /// GetTree's pages for `root`, from the one `page_token` names on, as the service
    /// walks them (`coordinator.max_tree_directories`, `max_message_bytes`).
    pub async fn get_tree_pages(
        blobs: std::sync::Arc<dyn kiln_store::BlobStore>,
        root: kiln_store::Digest,
        max_directories: usize,
        max_message_bytes: u64,
        page_token: u64,
        page_size: usize,
    ) -> Result<Vec<kiln_proto::reapi::GetTreeResponse>, crate::CoordinatorError> {
        use futures::TryStreamExt;
        let limits = crate::tree::TreeLimits {
            max_directories,
            max_message_bytes,
        };
        let walk = crate::tree::TreeWalk::start(blobs, root, limits).await?;
        crate::tree::TreePages::new(walk, page_token, page_size)
            .into_stream()
            .try_collect()
            .await
    }
}

/// The scheduler's state machine, for the farm simulation in `loadtests/`; not an API.
#[cfg(feature = "simulation")]
#[doc(hidden)]
pub mod simulation {
    pub use crate::scheduler::{Platform, QueuedAction, Scheduler, SchedulerConfig};
}

pub use admin::{RegistryCatalog, RepositorySummary};
pub use cache_references::action_cache_references;
pub use config::{AuthConfig, CoordinatorConfig, FarmConfig};
pub use counters::{describe_metrics, names as metric_names, STAGE_BUCKETS};
pub use error::CoordinatorError;
pub use execution::InFlightInputs;
pub use farm::{Role as FarmRole, Standing as FarmStanding};
pub use server::Coordinator;
